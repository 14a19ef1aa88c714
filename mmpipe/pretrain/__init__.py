"""Cross-modal alignment from unlabelled pairs (the pretrain stage) and retrieval over aligned embeddings.

``align``: the encoders train builds, each with a small projection head, trained so that the modalities
of one sample land close together (SigLIP's pairwise sigmoid loss, or InfoNCE) on every row, labelled or
not. ``retrieval``: recall@k / median rank and a top-k search over normalised embeddings (numpy only:
shipped in the bundle).
"""

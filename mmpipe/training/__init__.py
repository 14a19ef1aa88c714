"""Training: the loop (``train``), a trained model on disk (``model_io``), torchrun (``distributed``).

Where the networks (``mmpipe.models``), the modality registry and the feature sets meet: above all three.
"""

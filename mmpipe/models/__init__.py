"""Networks (PyTorch only): encoder architectures, pretrained backbones, the fusion model.

They know no modality registry and no data: a modality's ``build_encoder`` picks an architecture from
here, and ``mmpipe.training.model_io.build_model`` hands the fusion model its encoders.
"""

"""Models: per-modality encoders and the fusion classifier (PyTorch)."""

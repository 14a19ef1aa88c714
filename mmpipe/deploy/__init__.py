"""The deployment bundle: standalone predictor, manifest, model card, verification."""

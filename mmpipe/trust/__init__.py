"""How far to trust a prediction: calibrated confidence and conformal prediction sets per modality-availability
pattern (``calibration``), and how much each modality contributes (``attribution``)."""

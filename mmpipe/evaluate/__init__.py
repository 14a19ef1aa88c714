"""Evaluation of trained models: metrics, missing modalities, robustness, latency, report."""

"""Evaluation: sample quality (FID / IS / CAS on pluggable feature extractors), held-out denoising loss,
router diagnostics, the ``dyncompute eval`` command and the in-training evaluator."""

"""Evaluation of face-privacy outputs: the paper's metrics, blur/pixelation/mosaic baselines and
the report (JSON + HTML) that ``scripts/evaluate.py`` and the evaluation nodes produce.

Plain torch/numpy; optional packages (dlib, matplotlib, scikit-learn) are imported inside the
functions that need them. Nothing here loads a model at import time.
"""

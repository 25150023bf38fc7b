"""neuclip-bench: NeuCLIP and the normaliser estimators it competes with, as a reproducible harness."""

__version__ = "0.1.0"

"""Training side of iam: models, data and training loops (PyTorch)."""

__version__ = "0.1.0"

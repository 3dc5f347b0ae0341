"""Torch-free runtime: runs an exported IAM bundle over images (see DESIGN.md)."""

__version__ = "0.1.0"

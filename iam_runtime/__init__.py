"""Torch-free runtime: runs an exported IAM bundle on images (docs/architecture.md).

``Segmenter`` is the in-memory API; ``iam-infer`` (``iam_runtime.pipeline``) runs the same
stages over folders."""

__version__ = "0.1.0"

from .segmenter import Instance, PredictOptions, Segmenter  # noqa: E402

__all__ = ["Instance", "PredictOptions", "Segmenter", "__version__"]

"""End-to-end latency and throughput of every path, side by side, on the same weights, images
and number of peaks per image (issue 6).

    python -m benchmarks.latency --backbone resnet50 --image-size 448 --peaks 5 --batch-sizes 1,4,8 --out bench/

Paths: ``reference`` (the method's inference as the reference code does it: one image at a time, one
autograd backward per peak with the modified rule, the filling propagation as the reference's
per-step unfold loop, one full-resolution dense CRF per instance), ``torch`` (our model in eager
PyTorch: batched peak backprop, the propagation op), ``onnxruntime-cpu`` (the iam-infer
pipeline on the exported bundle, per batch size) and, where a GPU is present, ``reference-cuda``
and ``torch-cuda`` (the same two on the GPU), onnxruntime's CUDA and TensorRT providers and the
native TensorRT engines (fp32, fp16, INT8 calibrated on the benchmark's photos). A GPU path that
cannot run here is recorded as skipped or failed, with the reason. Writes DIR/latency.json (raw
timings, per-path ``speedup`` over the CPU reference, and ``speedup_vs_reference_cuda`` where
that ran), DIR/latency.md and DIR/latency.png.

The package: ``photos`` (the images), ``paths`` (the reference and torch paths, the iam-infer
paths in processes of their own, FLOP rates), ``crf`` (the CRF stage alone), ``report`` (table
and chart) and ``cli`` (the command that runs them all).
"""

from .cli import main

__all__ = ["main"]

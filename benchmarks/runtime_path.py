"""One runtime path of the latency benchmark, in a process of its own, as users run it: the
torch-free ``iam-infer`` pipeline (no torch imported, its own peak RSS), after a warm-up batch
(copies of one image) that is not timed.

    python -m benchmarks.runtime_path PATH.json RESULT.json

PATH.json: {"bundle", "images", "warmup_image", "out", "backend": "onnxruntime" (with "providers") or
"tensorrt" (the bundle's engines), "options": InferOptions fields}.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from iam_runtime.backends import OnnxRuntimeBackend, TensorRTBackend
from iam_runtime.bundle import load_bundle
from iam_runtime.pipeline import InferOptions, run

from .common import own_peak_rss_mb, write_json


def run_path(spec: dict) -> dict:
    bundle = load_bundle(spec["bundle"])
    if spec.get("backend", "onnxruntime") == "tensorrt":
        backend = TensorRTBackend(bundle)
    else:
        backend = OnnxRuntimeBackend(bundle, spec["providers"], propagation=spec.get("propagation", "auto"),
                                     share_forward=spec.get("share_forward"))
    options = InferOptions(**spec["options"], progress=False)
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    # Warm-up on a full batch: GPU providers pick their kernels per input shape on first use.
    warm = out.with_name(out.name + "-warmup")
    shutil.rmtree(warm, ignore_errors=True)
    (warm / "images").mkdir(parents=True)
    for i in range(options.batch_size):
        shutil.copy(spec["warmup_image"], warm / "images" / f"warmup_{i}{Path(spec['warmup_image']).suffix}")
    run(bundle, backend, warm / "images", warm / "out", options)
    summary = run(bundle, backend, spec["images"], out, options)
    done = max(summary.completed, 1)
    stage = {k: v / done for k, v in summary.stage_seconds.items()}
    return {
        "images_per_s": summary.images_per_second, "end_to_end_per_image_s": summary.seconds / done,
        "completed": summary.completed,
        "stage_mean_s": {"decode": stage["decode"], "detect": stage["detect"], "segment": stage["segment"],
                         "crf": stage["refine"], "write": stage["write"]},
        "latency": {f"{k}_s": v for k, v in summary.latency_s.items()},
        "peak_rss_mb": {"self": own_peak_rss_mb()},
        "busy": summary.busy, "refine_workers": summary.refine_workers,
        "engine": backend.describe(),
    }


if __name__ == "__main__":
    spec_path, result_path = sys.argv[1:3]
    write_json(Path(result_path), run_path(json.loads(Path(spec_path).read_text())))

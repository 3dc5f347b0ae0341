"""The benchmark's paths: the reference (the reference code's way), torch eager, and iam-infer
in processes of their own; FLOP counts and hardware rates."""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F

from iam_runtime.images import decode_image, preprocess
from iam_runtime.masks import mask_iou
from iam_runtime.pipeline import percentiles
from iam_runtime.voc import IMAGENET_MEAN, IMAGENET_STD
from iam_train.models import InstanceExtentFilling, ResNetFCN
from iam_train.models.peaks import find_peaks

from ..common import own_peak_rss_mb, write_json

STAGES = ("decode", "detect", "segment", "crf", "write")
FAST_CRF_SIDE = 320  # the reduced-resolution CRF compared against the full-resolution one


def reference_crf(rgb: np.ndarray, frame: np.ndarray, prob: np.ndarray, crf, schedule=None) -> np.ndarray:
    """The reference's CRF for one instance (SPEC section 7): a DenseCRF built for it alone on
    ``frame``, the photo resized to the network's input size (PIL bilinear), with the
    activation map at that size; the mask brought to the photo's size from the refined
    probabilities (bilinear, then q(fg) > q(bg)); pydensecrf's own 2-label mean-field."""
    from iam_runtime.refine import dense_crf_margin, resize_map

    return resize_map(dense_crf_margin(frame, prob, crf, schedule), rgb.shape[:2]) > 0


def reference_filling(filling: InstanceExtentFilling, prm: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """The reference's filling: the same network, the propagation as its per-step unfold loop."""
    x = filling.encode(prm.unsqueeze(1))
    p, d, h, w = x.shape
    k = filling.kernel_size
    weights = kernels.reshape(kernels.shape[0], d * k * k, h * w)
    for _ in range(filling.steps):
        cols = F.unfold(x, k, padding=k // 2) * weights
        x = cols.view(p, d, k * k, h, w).sum(2)
    return filling.decode(x).squeeze(1)


# Median spread (std) of the decoder's pre-sigmoid logits of our trained demo filling network
# (resnet18 @ 224, synthetic shapes; 30 maps): 1.18.
TRAINED_LOGIT_STD = 1.18


@torch.no_grad()
def calibrate_maps(model: ResNetFCN, filling: InstanceExtentFilling, photo: Path, image_size: int,
                   upsample: int, num_peaks: int, fraction: float = 0.25) -> dict[str, float]:
    """Random weights give activation maps within 0.01 of 0.5 everywhere: masks would be empty
    (or arbitrary) on every path and their agreement meaningless. Rescale the decoder's last
    BatchNorm so that, on the first photo, the logits have the spread of a trained network's
    and about ``fraction`` of the pixels exceed 0.5. Returns the calibration."""
    from iam_export.graphs import SegmentGraph

    x = torch.from_numpy(preprocess(decode_image(photo), (image_size, image_size), IMAGENET_MEAN, IMAGENET_STD))[None]
    pk = find_peaks(model(x).crm, 3, "median", 0.0, upsample, num_peaks)
    bn = filling.decode.decode3[1]
    logits = []
    handle = bn.register_forward_hook(lambda _m, _i, o: logits.append(o))
    SegmentGraph(model, filling, upsample)(x, pk.coords[0, :num_peaks])
    handle.remove()
    shift = torch.quantile(logits[0].flatten(), 1 - fraction)
    scale = TRAINED_LOGIT_STD / logits[0].std().clamp_min(1e-12)
    bn.weight *= scale
    bn.bias.copy_((bn.bias - shift) * scale)
    return {"foreground_fraction": fraction, "logit_std": TRAINED_LOGIT_STD}


def gemm_rate(n: int = 2048, repeats: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def gemm_rate_cuda(dtype: str, n: int = 8192, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matrix product on the GPU: fp32 (TF32 off), tf32 or fp16."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        t = torch.float16 if dtype == "fp16" else torch.float32
        a, b = torch.randn(n, n, device="cuda", dtype=t), torch.randn(n, n, device="cuda", dtype=t)
        a @ b
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        torch.cuda.synchronize()
        return 2 * n**3 * repeats / (start.elapsed_time(end) / 1000)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _synced(device: torch.device, t0: float) -> float:
    """Seconds since t0 once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def count_flops(module, *args) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*args)
    return int(counter.get_total_flops())


def achieved_rates(result: dict, detect_flops: int, segment_flops: int) -> dict[str, float]:
    """FLOP/s a runtime path reached: per graph (``detect``, ``segment``) where its stages are
    the two graphs, and ``engine``: the work done once per image over detect + segment time.
    With the shared forward the detect stage runs the segment graph's forward half, so only
    ``engine`` means anything, and the work is the segment graph's alone."""
    stages = result["stage_mean_s"]
    engine_s = stages["detect"] + stages["segment"]
    if "shared forward" in result.get("engine", ""):
        return {"engine": segment_flops / engine_s} if engine_s > 0 else {}
    rates = {stage: flops / stages[stage] for stage, flops in (("detect", detect_flops), ("segment", segment_flops))
             if stages[stage] > 0}
    if engine_s > 0:
        rates["engine"] = (detect_flops + segment_flops) / engine_s
    return rates


def summarise(samples: list[float]) -> dict[str, float]:
    return {**{f"{k}_s": v for k, v in percentiles(samples).items()}, "n": len(samples)}


def peak_rss_mb() -> dict[str, float]:
    return {"self": own_peak_rss_mb(), "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _runtime_path(out: Path, key: str, spec: dict) -> dict:
    """One iam-infer path in a process of its own (benchmarks.runtime_path): no torch loaded, its
    own peak RSS, the CRF worker processes started from a clean process. A path that fails (a GPU
    provider that does not load, say) is recorded as failed, with the end of its error output."""
    import subprocess
    import sys

    spec_path, result_path = out / "runs" / f"{key}.spec.json", out / "runs" / f"{key}.result.json"
    write_json(spec_path, spec)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.runtime_path", str(spec_path), str(result_path)],
                          cwd=Path(__file__).resolve().parents[2], stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        click.echo(f"{key} failed: {reason[0]}", err=True)
        return {"failed": reason[0]}
    return json.loads(result_path.read_text())


def _tensorrt_engines(out: Path, bundle_dir: Path, ckpt: Path, export_options, results: dict,
                      sizes: list[int], num_peaks: int, calib: Path) -> list[tuple[str, dict]]:
    """Native TensorRT engines for the runtime paths: fp32 (the fp32 bundle), fp16 (an fp16
    bundle: TensorRT 11 is strongly typed) and int8 (an int8 bundle with symmetric activations,
    ``--int8-activations s8``, calibrated on ``calib``). Where TensorRT or a GPU is missing, or a
    build fails, the path is recorded as skipped or failed with the reason."""
    import dataclasses
    import shutil

    from iam_export.export_onnx import export_bundle
    from iam_export.tensorrt_build import (
        BuildOptions,
        TensorRTUnavailable,
        build_bundle_engines,
        import_tensorrt,
    )

    try:
        import_tensorrt()
        if not torch.cuda.is_available():
            raise TensorRTUnavailable("no CUDA GPU on this machine")
    except TensorRTUnavailable as exc:
        results["paths"]["tensorrt"] = {"skipped": str(exc)}
        return []
    engines = []
    for precision in ("fp32", "fp16", "int8"):
        name = f"tensorrt-{precision}"
        target = out / f"bundle-{name}"
        try:
            shutil.rmtree(target, ignore_errors=True)
            if precision == "fp32":
                shutil.copytree(bundle_dir, target)
            else:
                int8 = dict(int8_activations="s8", calib_images=calib, calib_count=64) if precision == "int8" else {}
                export_bundle(ckpt / "prm.pt", ckpt / "filling.pt", target,
                              dataclasses.replace(export_options, precision=precision, **int8),
                              log=lambda *_: None)
            t = time.perf_counter()
            build_bundle_engines(target, BuildOptions(fp16=precision == "fp16", max_batch=max(sizes),
                                                      opt_batch=max(sizes), max_segment_peaks=max(32, num_peaks),
                                                      opt_segment_peaks=num_peaks), log=click.echo)
            results.setdefault("tensorrt_build_seconds", {})[precision] = time.perf_counter() - t
        except Exception as exc:  # noqa: BLE001 - recorded with its reason, the other paths go on
            results["paths"][name] = {"failed": f"{type(exc).__name__}: {exc}"}
            continue
        engines.append((name, dict(bundle=str(target), backend="tensorrt")))
    return engines


def _path_result(times: list[dict]) -> dict:
    stages = {k: statistics.median([t[k] for t in times]) for k in STAGES}
    per_image = [sum(t.values()) for t in times]
    return {"stage_mean_s": stages, "end_to_end_per_image_s": statistics.median(per_image),
            "images_per_s": 1 / statistics.median(per_image), "latency": summarise(per_image), "peak_rss_mb": peak_rss_mb()}


def _peak_sets(run_dir: Path) -> dict[str, list]:
    preds = json.loads((run_dir / "predictions.json").read_text())
    out: dict[str, list] = {}
    for p in preds:
        out.setdefault(p["image_id"], []).append((p["category_id"], *p["peak"]))
    return {k: sorted(v) for k, v in out.items()}


def peaks_identical(run_dir: Path, base_dir: Path) -> float:
    """Fraction of images whose instances' (class, peak) sets are those of the run in ``base_dir``."""
    a, b = _peak_sets(run_dir), _peak_sets(base_dir)
    images = set(a) | set(b)
    return sum(a.get(i) == b.get(i) for i in images) / max(len(images), 1)


def _agreement(run_dir: Path, ref_masks: dict) -> dict:
    from pycocotools import mask as mask_utils

    preds = json.loads((run_dir / "predictions.json").read_text())
    ious = []
    for stem, masks in ref_masks.items():
        ours = [mask_utils.decode(p["segmentation"]).astype(bool) for p in preds if p["image_id"] == stem]
        for m in masks:
            best = max([mask_iou(m, o) for o in ours], default=0.0)
            ious.append(best if m.any() else 1.0)
    nonempty = sum(m.any() for masks in ref_masks.values() for m in masks)
    return {"mean_iou": float(np.mean(ious)) if ious else None, "reference_masks": len(ious),
            "reference_masks_nonempty": int(nonempty)}

"""End-to-end latency and throughput of every path, side by side, on the same weights, images
and number of peaks per image (issue 6).

    python -m benchmarks.latency --backbone resnet50 --image-size 448 --peaks 5 --batch-sizes 1,4,8 --out bench/

Paths: ``reference`` (SPEC's inference as the reference code does it: one image at a time, one
autograd backward per peak with the modified rule, the filling propagation as the reference's
per-step unfold loop, one full-resolution dense CRF per instance), ``torch`` (our model in eager
PyTorch: batched peak backprop, the propagation op), ``onnxruntime-cpu`` (the iam-infer
pipeline on the exported bundle, per batch size) and, where a GPU is present, onnxruntime's CUDA
and TensorRT providers. Writes DIR/latency.json (raw timings, per-path ``speedup`` over the
reference), DIR/latency.md and DIR/latency.png.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F

from iam_runtime.bundle import load_bundle
from iam_runtime.images import decode_image, preprocess
from iam_runtime.pipeline import percentiles
from iam_runtime.refine import dense_crf, resize_map
from iam_runtime.voc import IMAGENET_MEAN, IMAGENET_STD
from iam_train.checkpoint import save_checkpoint
from iam_train.models import InstanceExtentFilling, ResNetFCN, reference_peak_response_maps
from iam_train.models.peaks import find_peaks

from .common import machine_info, own_peak_rss_mb, write_json

STAGES = ("decode", "detect", "segment", "crf", "write")
FAST_CRF_SIDE = 320  # the reduced-resolution CRF compared against the full-resolution one


def demo_photos(folder: Path, count: int, size_hint: int) -> list[Path]:
    """Real photos, written as JPEGs: scikit-image's sample photos and, when present, the VOC
    sample images of the development checkout."""
    from PIL import Image
    from skimage import data as skdata

    folder.mkdir(parents=True, exist_ok=True)
    sources = [getattr(skdata, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")]
    voc = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc-sample" / "JPEGImages"
    if voc.is_dir():
        sources += [np.asarray(Image.open(p).convert("RGB")) for p in sorted(voc.glob("*.jpg"))]
    paths = []
    for i in range(count):
        img = Image.fromarray(sources[i % len(sources)]).convert("RGB")
        if max(img.size) > 2 * size_hint:
            img.thumbnail((2 * size_hint, 2 * size_hint))
        p = folder / f"photo_{i:03d}.jpg"
        img.save(p, quality=92)
        paths.append(p)
    return paths


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


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def count_flops(module, *args) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*args)
    return int(counter.get_total_flops())


def summarise(samples: list[float]) -> dict[str, float]:
    return {**{f"{k}_s": v for k, v in percentiles(samples).items()}, "n": len(samples)}


def peak_rss_mb() -> dict[str, float]:
    return {"self": own_peak_rss_mb(), "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


@click.command()
@click.option("--backbone", default="resnet50", show_default=True)
@click.option("--image-size", default=448, show_default=True)
@click.option("--peaks", "num_peaks", default=5, show_default=True, help="Peaks per image, held fixed.")
@click.option("--batch-sizes", default="1,4,8", show_default=True)
@click.option("--images", "num_images", default=8, show_default=True)
@click.option("--reference-images", default=0, show_default=True,
              help="Images timed on the (slow) reference and torch paths; 0: all of them, so that every path "
                   "runs on the same images (the CRF's cost depends on the image).")
@click.option("--steps", default=112, show_default=True, help="Filling propagation steps (reference 112).")
@click.option("--hidden", default=64, show_default=True)
@click.option("--upsample", default=8, show_default=True)
@click.option("--warmup", default=1, show_default=True)
@click.option("--crf-workers", default=0, show_default=True)
@click.option("--no-crf/--crf-only", "no_crf", default=True, show_default=True,
              help="Also time the runtime without CRF (threshold refinement).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def main(backbone, image_size, num_peaks, batch_sizes, num_images, reference_images, steps, hidden, upsample, warmup,
         crf_workers, no_crf, out) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    classes = [f"class{i}" for i in range(20)]
    model = ResNetFCN(backbone, num_classes=20).eval()
    filling = InstanceExtentFilling(model.feature_channels, hidden=hidden, steps=steps).eval()
    photos = demo_photos(out / "images", num_images, image_size)
    results: dict = {"config": dict(backbone=backbone, image_size=image_size, peaks=num_peaks, steps=steps,
                                    images=num_images, batch_sizes=batch_sizes), "machine": machine_info(), "paths": {}}

    results["map_calibration"] = calibrate_maps(model, filling, photos[0], image_size, upsample, num_peaks)
    # The same weights for every path: checkpoints -> bundle.
    ckpt = out / "checkpoints"
    ckpt.mkdir(exist_ok=True)
    meta = {"classes": classes, "arch": backbone, "image_size": image_size, "upsample_factor": upsample,
            "win_size": 3, "threshold_mode": "median"}
    save_checkpoint(ckpt / "prm.pt", "iam-prm", {"model": model.state_dict(), "epoch": 0, **meta})
    save_checkpoint(ckpt / "filling.pt", "iam-filling", {
        "model": filling.state_dict(), "epoch": 0, "prm_meta": meta,
        "filling": {"channels": 16, "kernel_size": 3, "hidden": hidden, "steps": steps}})
    bundle_dir = out / "bundle"
    from iam_export.export_onnx import ExportOptions, export_bundle

    click.echo("exporting the bundle ...")
    t = time.perf_counter()
    export_bundle(ckpt / "prm.pt", ckpt / "filling.pt", bundle_dir,
                  ExportOptions(max_peaks=max(32, num_peaks), force=True, class_threshold=float("-inf")), log=lambda *_: None)
    results["export_seconds"] = time.perf_counter() - t
    bundle = load_bundle(bundle_dir)
    size = (image_size, image_size)

    # ---------------- reference path ----------------
    def run_reference(path: Path):
        times = dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        rgb = decode_image(path)
        x = torch.from_numpy(preprocess(rgb, size, IMAGENET_MEAN, IMAGENET_STD))[None]
        times["decode"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            feats = model(x)
        pk = find_peaks(feats.crm, 3, "median", 0.0, upsample, num_peaks)
        peaks = pk.coords[0, :num_peaks]
        times["detect"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        prm = reference_peak_response_maps(model, x, peaks, upsample)
        with torch.no_grad():
            iam = reference_filling(filling, prm, filling.affinity_kernels(feats.c2, feats.c3, feats.c4)).numpy()
        times["segment"] = time.perf_counter() - t0
        masks, crf_times = [], []  # one full-resolution CRF per instance, each timed
        for m in iam:
            t0 = time.perf_counter()
            masks.append(dense_crf(rgb, resize_map(m, rgb.shape[:2]), bundle.manifest.crf, 0))
            crf_times.append(time.perf_counter() - t0)
        times["crf"] = sum(crf_times)
        return times, masks, iam, crf_times

    reference_images = reference_images or num_images
    results["config"]["reference_images"] = reference_images
    click.echo(f"reference path on {reference_images} images ...")
    for _ in range(warmup):
        run_reference(photos[0])
    ref_times, ref_masks, ref_maps, crf_full = [], {}, {}, []
    for p in photos[:reference_images]:
        times, masks, iam, crf_times = run_reference(p)
        ref_times.append(times)
        ref_masks[p.stem], ref_maps[p.stem] = masks, iam
        crf_full += crf_times
    results["paths"]["reference"] = _path_result(ref_times, 1)

    # ---------------- torch eager path ----------------
    from iam_export.graphs import DetectGraph, SegmentGraph

    detect_t = DetectGraph(model, 3, "median", 0.0, upsample, num_peaks).eval()
    segment_t = SegmentGraph(model, filling, upsample).eval()
    click.echo("torch eager path ...")
    torch_times = []
    for i, p in enumerate([photos[0]] * warmup + photos[:reference_images]):
        times = dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        rgb = decode_image(p)
        x = torch.from_numpy(preprocess(rgb, size, IMAGENET_MEAN, IMAGENET_STD))[None]
        times["decode"] = time.perf_counter() - t0
        with torch.no_grad():
            t0 = time.perf_counter()
            _, coords, _, _ = detect_t(x)
            times["detect"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, iam = segment_t(x, coords[0, :num_peaks])
            times["segment"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for m in iam.numpy():
            dense_crf(rgb, resize_map(m, rgb.shape[:2]), bundle.manifest.crf, 0)
        times["crf"] = time.perf_counter() - t0
        if i >= warmup:
            torch_times.append(times)
    results["paths"]["torch"] = _path_result(torch_times, 1)

    # ---------------- runtime (onnxruntime) paths ----------------
    import onnxruntime as ort

    provider_sets = [("onnxruntime-cpu", ["CPUExecutionProvider"])]
    for name, prov in (("onnxruntime-cuda", "CUDAExecutionProvider"), ("onnxruntime-tensorrt", "TensorrtExecutionProvider")):
        if prov in ort.get_available_providers() and torch.cuda.is_available():
            provider_sets.append((name, [prov, "CPUExecutionProvider"]))
        else:
            results["paths"][name] = {"skipped": f"{prov} not available (no GPU or onnxruntime-gpu here)"}
    agreement = {}
    sizes = [int(b) for b in batch_sizes.split(",")]
    # (suffix, refinement, CRF max side, batch sizes): the default runtime (full-resolution CRF, as
    # the reference), the CRF at reduced resolution (faster, approximate), no CRF.
    variants = [("", "crf", 0, sizes), (f"-crf{FAST_CRF_SIDE}", "crf", FAST_CRF_SIDE, sizes[-1:])]
    variants += [("-nocrf", "threshold", 0, sizes)] if no_crf else []
    for name, providers in provider_sets:
        for suffix, refine, max_side, bs in [(*v[:3], b) for v in variants for b in v[3]]:
            key = f"{name}-b{bs}{suffix}"
            run_dir = out / "runs" / key
            options = dict(batch_size=bs, max_peaks=num_peaks, score_threshold=float("-inf"), refine=refine,
                           peak_threshold=float("-inf"), nms_iou=1.01, crf_workers=crf_workers, crf_max_side=max_side)
            results["paths"][key] = _runtime_path(out, key, dict(
                bundle=str(bundle_dir), images=str(out / "images"), warmup_image=str(photos[0]), out=str(run_dir),
                providers=providers, options=options))
            if name == "onnxruntime-cpu" and refine == "crf" and suffix not in agreement:
                agreement[suffix] = _agreement(run_dir, ref_masks)
    results["agreement_onnxruntime_vs_reference"] = agreement.get("")
    results[f"agreement_onnxruntime_crf{FAST_CRF_SIDE}_vs_reference"] = agreement.get(f"-crf{FAST_CRF_SIDE}")

    # ---------------- CRF comparison ----------------
    # The reference path's full-resolution masks and times against the reduced resolution.
    crf_fast, ious, nonempty = [], [], 0
    for stem, maps in ref_maps.items():
        rgb = decode_image(out / "images" / f"{stem}.jpg")
        for m, a in zip(maps, ref_masks[stem]):
            t0 = time.perf_counter()
            b = dense_crf(rgb, resize_map(m, rgb.shape[:2]), bundle.manifest.crf, FAST_CRF_SIDE)
            crf_fast.append(time.perf_counter() - t0)
            ious.append(float((a & b).sum() / max((a | b).sum(), 1)) if (a | b).any() else 1.0)
            nonempty += bool(a.any())
    workers = crf_workers or os.cpu_count() or 1
    full = statistics.median(crf_full)
    # What the runtime's CRF stage took per instance (wall, its worker processes), by default
    # (full resolution: the reference's masks) and at the reduced resolution.
    stage = {suffix: results["paths"].get(f"onnxruntime-cpu-b{sizes[-1]}{suffix}", {}).get("stage_mean_s", {}).get("crf")
             for suffix in ("", f"-crf{FAST_CRF_SIDE}")}
    per_instance = {k: v / num_peaks if v else None for k, v in stage.items()}
    results["crf"] = {"full_resolution_per_instance_s": full, "runtime_workers": workers,
                      "runtime_default_per_instance_s": per_instance[""],
                      "runtime_default_speedup": full / per_instance[""] if per_instance[""] else None,
                      "runtime_max_side": FAST_CRF_SIDE,
                      "reduced_per_instance_one_process_s": statistics.median(crf_fast),
                      "runtime_per_instance_s": per_instance[f"-crf{FAST_CRF_SIDE}"],
                      "speedup": full / per_instance[f"-crf{FAST_CRF_SIDE}"] if per_instance[f"-crf{FAST_CRF_SIDE}"] else None,
                      "mean_iou_vs_full_resolution": float(np.mean(ious)), "instances": len(ious),
                      "instances_nonempty": nonempty}

    # ---------------- FLOPs and hardware rate ----------------
    x1 = torch.randn(1, 3, image_size, image_size)
    peaks = torch.tensor([[i % 20, i % 8, (3 * i) % 8] for i in range(num_peaks)])
    detect_flops = count_flops(detect_t, x1)
    segment_flops = count_flops(segment_t, x1, peaks)
    rate = gemm_rate()
    cpu = results["paths"].get("onnxruntime-cpu-b1", {}).get("stage_mean_s", {})
    results["flops"] = {"detect_per_image": detect_flops, "segment_per_image": segment_flops, "gemm_flops_per_s": rate,
                        "detect_achieved_flops_per_s": detect_flops / cpu["detect"] if cpu.get("detect") else None,
                        "segment_achieved_flops_per_s": segment_flops / cpu["segment"] if cpu.get("segment") else None}

    ref_e2e = results["paths"]["reference"]["end_to_end_per_image_s"]
    for r in results["paths"].values():
        if "end_to_end_per_image_s" in r:
            r["speedup"] = ref_e2e / r["end_to_end_per_image_s"]
            if "stage_mean_s" in r:
                r["segment_speedup_per_peak"] = (results["paths"]["reference"]["stage_mean_s"]["segment"]
                                                 / max(r["stage_mean_s"]["segment"], 1e-9))
    write_json(out / "latency.json", results)
    table = markdown_table(results)
    (out / "latency.md").write_text(table)
    click.echo(table)
    chart(results, out / "latency.png")


def _runtime_path(out: Path, key: str, spec: dict) -> dict:
    """One iam-infer path in a process of its own (benchmarks.runtime_path): no torch loaded, its
    own peak RSS, the CRF worker processes started from a clean process."""
    import subprocess
    import sys

    spec_path, result_path = out / "runs" / f"{key}.spec.json", out / "runs" / f"{key}.result.json"
    write_json(spec_path, spec)
    subprocess.run([sys.executable, "-m", "benchmarks.runtime_path", str(spec_path), str(result_path)], check=True,
                   cwd=Path(__file__).resolve().parents[1])
    return json.loads(result_path.read_text())


def _path_result(times: list[dict], batch: int) -> dict:
    stages = {k: statistics.median([t[k] for t in times]) for k in STAGES}
    per_image = [sum(t.values()) for t in times]
    return {"stage_mean_s": stages, "end_to_end_per_image_s": statistics.median(per_image),
            "images_per_s": 1 / statistics.median(per_image), "latency": summarise(per_image), "peak_rss_mb": peak_rss_mb()}


def _agreement(run_dir: Path, ref_masks: dict) -> dict:
    from pycocotools import mask as mask_utils

    preds = json.loads((run_dir / "predictions.json").read_text())
    ious = []
    for stem, masks in ref_masks.items():
        ours = [mask_utils.decode(p["segmentation"]).astype(bool) for p in preds if p["image_id"] == stem]
        for m in masks:
            best = max([((m & o).sum() / max((m | o).sum(), 1)) for o in ours], default=0.0)
            ious.append(best if m.any() else 1.0)
    nonempty = sum(m.any() for masks in ref_masks.values() for m in masks)
    return {"mean_iou": float(np.mean(ious)) if ious else None, "reference_masks": len(ious),
            "reference_masks_nonempty": int(nonempty)}


def markdown_table(results: dict) -> str:
    c = results["config"]
    lines = [f"{c['backbone']}@{c['image_size']}, {c['peaks']} peaks/image, T={c['steps']}, "
             f"{results['machine'].get('cpus')} CPUs, torch {results['machine'].get('torch')}",
             "", "| path | images/s | per image (s) | decode | detect | segment | CRF | write | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["paths"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | | | | |")
            continue
        s = r["stage_mean_s"]
        lines.append(f"| {name} | {r['images_per_s']:.3f} | {r['end_to_end_per_image_s']:.2f} | {s['decode']:.3f} | "
                     f"{s['detect']:.3f} | {s['segment']:.2f} | {s['crf']:.2f} | {s['write']:.3f} | {r['speedup']:.2f}x |")
    crf = results["crf"]
    fmt = lambda v, f: format(v, f) if v is not None else "n/a"  # noqa: E731
    lines += ["", f"CRF per instance: reference (full resolution, one process) {crf['full_resolution_per_instance_s']:.3f} s; "
              f"runtime default (full resolution, {crf['runtime_workers']} processes) "
              f"{fmt(crf['runtime_default_per_instance_s'], '.3f')} s -> {fmt(crf['runtime_default_speedup'], '.1f')}x, same masks; "
              f"runtime at max side {crf['runtime_max_side']} {fmt(crf['runtime_per_instance_s'], '.3f')} s -> "
              f"{fmt(crf['speedup'], '.1f')}x, mean mask IoU vs full resolution {crf['mean_iou_vs_full_resolution']:.3f}"
              f" ({crf['instances_nonempty']} of {crf['instances']} reference masks non-empty)"]
    for key, label in (("agreement_onnxruntime_vs_reference", "full-resolution CRF, the default"),
                       (f"agreement_onnxruntime_crf{FAST_CRF_SIDE}_vs_reference", f"CRF at max side {FAST_CRF_SIDE}")):
        ag = results.get(key)
        if ag and ag["mean_iou"] is not None:
            lines.append(f"Final masks, onnxruntime ({label}) vs reference: mean IoU {ag['mean_iou']:.3f} "
                         f"({ag['reference_masks_nonempty']} of {ag['reference_masks']} reference masks non-empty)")
    f = results["flops"]
    lines.append(f"FLOPs per image: detect {f['detect_per_image'] / 1e9:.1f} G, segment ({c['peaks']} peaks) "
                 f"{f['segment_per_image'] / 1e9:.1f} G; fp32 GEMM rate {f['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s; achieved "
                 + ", ".join(f"{k.split('_')[0]} {v / 1e9:.0f} GFLOP/s" for k, v in f.items()
                             if k.endswith("achieved_flops_per_s") and v))
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [n for n, r in results["paths"].items() if "stage_mean_s" in r]
    fig, ax = plt.subplots(figsize=(9, 4))
    left = np.zeros(len(names))
    for stage in STAGES:
        vals = np.array([results["paths"][n]["stage_mean_s"][stage] for n in names])
        ax.barh(names, vals, left=left, label=stage)
        left += vals
    ax.set_xlabel("seconds per image, by stage (medians; on a CPU engine the runtime refines between engine calls)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

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
"""

from __future__ import annotations

import copy
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
from iam_runtime.masks import mask_iou
from iam_runtime.pipeline import percentiles
from iam_runtime.refine import CRFSchedule, dense_crf, resize_map
from iam_runtime.voc import IMAGENET_MEAN, IMAGENET_STD
from iam_train.checkpoint import PRMMetadata, save_checkpoint
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


def object_shaped_maps(rgb: np.ndarray, count: int) -> list[np.ndarray]:
    """Up to ``count`` (H, W) activation maps shaped like a trained filling network's, for the CRF
    comparison: the photo's largest graph-based segments of 2 to 40 % of its area, blurred
    (sigma 2 % of the diagonal) and scaled into [0.05, 0.95]. Random weights give near-uniform
    maps that the CRF mostly erases, and on those a mask IoU says little."""
    from scipy.ndimage import gaussian_filter
    from skimage.segmentation import felzenszwalb

    h, w = rgb.shape[:2]
    labels = felzenszwalb(rgb, scale=1000, sigma=0.8, min_size=max(20, int(0.01 * h * w)))
    ids, counts = np.unique(labels, return_counts=True)
    chosen = [i for i, c in sorted(zip(ids, counts), key=lambda ic: -ic[1]) if 0.02 * h * w <= c <= 0.4 * h * w]
    maps = []
    for i in chosen[:count]:
        blurred = gaussian_filter((labels == i).astype(np.float32), 0.02 * float(np.hypot(h, w)))
        maps.append((0.05 + 0.9 * blurred / blurred.max()).astype(np.float32))
    return maps


def crf_on_object_maps(photos: list[Path], count: int, crf, workers: int, max_side: int) -> dict:
    """The CRF stage alone on object-shaped maps (:func:`object_shaped_maps`): the reference
    (one full-resolution DenseCRF per instance, one process) against the runtime's refinement
    (``refine_instances``: one CRF per image for all its instances, whole images spread over
    ``workers`` processes, as iam-infer does between engine calls on the CPU) at full resolution,
    at ``max_side`` with the last iteration at full resolution (iam-infer --crf-max-side), and
    at ``max_side`` throughout. Per-instance times are wall seconds; IoU against the reference's
    masks."""
    from concurrent.futures import ProcessPoolExecutor

    from iam_runtime.pipeline import _worker_context
    from iam_runtime.refine import refine_instances

    images = []
    for path in photos:
        rgb = decode_image(path)
        if maps := object_shaped_maps(rgb, count):
            images.append((rgb, np.stack(maps)))
    if not images:
        return {"instances": 0, "images": 0}
    reference, times = [], []
    for rgb, maps in images:
        for m in maps:
            t0 = time.perf_counter()
            reference.append(dense_crf(rgb, m, crf))
            times.append(time.perf_counter() - t0)
    instances = len(reference)
    result = {"instances": instances, "images": len(images), "reference_per_instance_s": float(np.mean(times)),
              "runtime_workers": workers}
    with ProcessPoolExecutor(workers, mp_context=_worker_context()) as pool:
        warm = [pool.submit(refine_instances, rgb, maps[:1], "crf", crf) for rgb, maps in images[:1] * workers]
        [job.result() for job in warm]  # the workers started, pydensecrf imported
        for key, schedule in (("runtime_full_resolution", CRFSchedule()),
                              (f"runtime_max_side_{max_side}", CRFSchedule(max_side)),
                              (f"runtime_max_side_{max_side}_coarse_only", CRFSchedule(max_side, full_iterations=0))):
            t0 = time.perf_counter()
            jobs = [pool.submit(refine_instances, rgb, maps, "crf", crf, 0.5, schedule) for rgb, maps in images]
            masks = [m for job in jobs for m in job.result()]
            per_instance = (time.perf_counter() - t0) / max(instances, 1)
            ious = [mask_iou(a, b) for a, b in zip(reference, masks)]
            result[key] = {"per_instance_s": per_instance, "speedup": result["reference_per_instance_s"] / per_instance,
                           "mean_iou": float(np.mean(ious)), "min_iou": float(np.min(ious))}
    return result


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
@click.option("--cpu-paths/--gpu-paths-only", default=True, show_default=True,
              help="With --gpu-paths-only, the torch and onnxruntime paths run on the GPU only (the CPU "
                   "reference still runs: it is the base of every speed-up).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def main(backbone, image_size, num_peaks, batch_sizes, num_images, reference_images, steps, hidden, upsample, warmup,
         crf_workers, no_crf, cpu_paths, out) -> None:
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
    meta = PRMMetadata(tuple(classes), backbone, image_size, upsample, 3, "median").to_dict()
    save_checkpoint(ckpt / "prm.pt", "iam-prm", {"model": model.state_dict(), "epoch": 0, **meta})
    save_checkpoint(ckpt / "filling.pt", "iam-filling", {
        "model": filling.state_dict(), "epoch": 0, "prm_meta": meta,
        "filling": filling.architecture()})
    bundle_dir = out / "bundle"
    from iam_export.export_onnx import ExportOptions, export_bundle

    click.echo("exporting the bundle ...")
    t = time.perf_counter()
    export_options = ExportOptions(max_peaks=max(32, num_peaks), force=True, class_threshold=float("-inf"))
    export_bundle(ckpt / "prm.pt", ckpt / "filling.pt", bundle_dir, export_options, log=lambda *_: None)
    results["export_seconds"] = time.perf_counter() - t
    bundle = load_bundle(bundle_dir)
    size = (image_size, image_size)

    # ---------------- reference and torch paths (CPU, and CUDA where present) ----------------
    from iam_export.graphs import DetectGraph, SegmentGraph

    def load(path: Path, device: torch.device, times: dict) -> tuple[np.ndarray, torch.Tensor]:
        """The photo (H, W, 3) and its (1, 3, S, S) network input on the device, timed as decode."""
        t0 = time.perf_counter()
        rgb = decode_image(path)
        x = torch.from_numpy(preprocess(rgb, size, IMAGENET_MEAN, IMAGENET_STD))[None].to(device)
        times["decode"] = _synced(device, t0)
        return rgb, x

    def run_reference(path: Path, net: ResNetFCN, fill: InstanceExtentFilling, device: torch.device):
        times = dict.fromkeys(STAGES, 0.0)
        rgb, x = load(path, device, times)
        t0 = time.perf_counter()
        with torch.no_grad():
            feats = net(x)
        pk = find_peaks(feats.crm, 3, "median", 0.0, upsample, num_peaks)
        peaks = pk.coords[0, :num_peaks]
        times["detect"] = _synced(device, t0)
        t0 = time.perf_counter()
        prm = reference_peak_response_maps(net, x, peaks, upsample)
        with torch.no_grad():
            iam = reference_filling(fill, prm, fill.affinity_kernels(feats.c2, feats.c3, feats.c4)).cpu().numpy()
        times["segment"] = time.perf_counter() - t0
        masks, crf_times = [], []  # one full-resolution CRF per instance, each timed
        for m in iam:
            t0 = time.perf_counter()
            masks.append(dense_crf(rgb, resize_map(m, rgb.shape[:2]), bundle.manifest.crf))
            crf_times.append(time.perf_counter() - t0)
        times["crf"] = sum(crf_times)
        return times, masks, iam, crf_times

    def run_torch(path: Path, detect_t: DetectGraph, segment_t: SegmentGraph, device: torch.device) -> dict:
        times = dict.fromkeys(STAGES, 0.0)
        rgb, x = load(path, device, times)
        with torch.no_grad():
            t0 = time.perf_counter()
            _, coords, _, _ = detect_t(x)
            times["detect"] = _synced(device, t0)
            t0 = time.perf_counter()
            _, iam = segment_t(x, coords[0, :num_peaks])
            iam = iam.cpu().numpy()
            times["segment"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for m in iam:
            dense_crf(rgb, resize_map(m, rgb.shape[:2]), bundle.manifest.crf)
        times["crf"] = time.perf_counter() - t0
        return times

    reference_images = reference_images or num_images
    results["config"]["reference_images"] = reference_images
    timed_photos = photos[:reference_images]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    ref_masks, ref_maps, crf_full = {}, {}, []
    for device in devices:
        suffix = "" if device.type == "cpu" else "-cuda"
        net, fill = (model, filling) if device.type == "cpu" else (copy.deepcopy(model).to(device),
                                                                    copy.deepcopy(filling).to(device))
        click.echo(f"reference path on {device.type}, {reference_images} images ...")
        for _ in range(warmup):
            run_reference(photos[0], net, fill, device)
        ref_times = []
        for p in timed_photos:
            times, masks, iam, crf_times = run_reference(p, net, fill, device)
            ref_times.append(times)
            if device.type == "cpu":  # the masks every path is compared with
                ref_masks[p.stem], ref_maps[p.stem] = masks, iam
                crf_full += crf_times
        results["paths"][f"reference{suffix}"] = _path_result(ref_times)

        if device.type == "cpu" and not cpu_paths:
            continue
        click.echo(f"torch eager path on {device.type} ...")
        detect_t = DetectGraph(net, 3, "median", 0.0, upsample, num_peaks).eval()
        segment_t = SegmentGraph(net, fill, upsample).eval()
        torch_times = [run_torch(p, detect_t, segment_t, device) for p in [photos[0]] * warmup + timed_photos]
        results["paths"][f"torch{suffix}"] = _path_result(torch_times[warmup:])
    if len(devices) == 1:
        results["paths"]["torch-cuda"] = {"skipped": "no CUDA GPU (torch.cuda.is_available() is False)"}

    # ---------------- runtime paths (iam-infer) ----------------
    import onnxruntime as ort

    provider_sets = [("onnxruntime-cpu", ["CPUExecutionProvider"])] if cpu_paths else []
    for name, prov in (("onnxruntime-cuda", ["CUDAExecutionProvider"]),
                       ("onnxruntime-tensorrt", ["TensorrtExecutionProvider", "CUDAExecutionProvider"])):
        if prov[0] in ort.get_available_providers() and torch.cuda.is_available():
            provider_sets.append((name, [*prov, "CPUExecutionProvider"]))
        else:
            results["paths"][name] = {"skipped": f"{prov[0]} not available (no GPU or onnxruntime-gpu here)"}
    agreement = {}
    sizes = [int(b) for b in batch_sizes.split(",")]
    # (suffix, refinement, CRF max side, batch sizes): the default runtime (full-resolution CRF, as
    # the reference), the CRF at reduced resolution (faster, approximate), no CRF.
    variants = [("", "crf", 0, sizes), (f"-crf{FAST_CRF_SIDE}", "crf", FAST_CRF_SIDE, sizes[-1:])]
    variants += [("-nocrf", "threshold", 0, sizes)] if no_crf else []
    engines = [(name, dict(bundle=str(bundle_dir), backend="onnxruntime", providers=providers))
               for name, providers in provider_sets]
    engines += _tensorrt_engines(out, bundle_dir, ckpt, export_options, results, sizes, num_peaks)
    for name, engine in engines:
        for suffix, refine, max_side, bs in [(*v[:3], b) for v in variants for b in v[3]]:
            key = f"{name}-b{bs}{suffix}"
            run_dir = out / "runs" / key
            # The CRF at the photo's resolution, as this benchmark's reference path runs it (moving both
            # to the reference's 448 frame, now iam-infer's default, is issue 17's).
            options = dict(batch_size=bs, max_instances=num_peaks, class_threshold=float("-inf"), refine=refine,
                           peak_threshold=float("-inf"), nms_iou=1.01, crf_workers=crf_workers, crf_max_side=max_side,
                           crf_frame="image", crf_photo_max_side=0)
            results["paths"][key] = _runtime_path(out, key, dict(
                **engine, images=str(out / "images"), warmup_image=str(photos[0]), out=str(run_dir), options=options))
            if refine == "crf" and "failed" not in results["paths"][key]:
                agreement[f"{name}{suffix}"] = _agreement(run_dir, ref_masks)
    results["agreement_onnxruntime_vs_reference"] = agreement.get("onnxruntime-cpu")
    results[f"agreement_onnxruntime_crf{FAST_CRF_SIDE}_vs_reference"] = agreement.get(f"onnxruntime-cpu-crf{FAST_CRF_SIDE}")
    results["agreement_vs_reference"] = agreement

    # ---------------- CRF comparison ----------------
    # The reference path's full-resolution masks and times against the reduced resolution.
    crf_fast, ious, nonempty = [], [], 0
    for stem, maps in ref_maps.items():
        rgb = decode_image(out / "images" / f"{stem}.jpg")
        for m, a in zip(maps, ref_masks[stem]):
            t0 = time.perf_counter()
            b = dense_crf(rgb, resize_map(m, rgb.shape[:2]), bundle.manifest.crf, CRFSchedule(FAST_CRF_SIDE))
            crf_fast.append(time.perf_counter() - t0)
            ious.append(mask_iou(a, b))
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

    click.echo("CRF on object-shaped maps ...")
    results["crf"]["object_maps"] = crf_on_object_maps(timed_photos, num_peaks, bundle.manifest.crf, workers,
                                                       FAST_CRF_SIDE)

    # ---------------- FLOPs and hardware rate ----------------
    x1 = torch.randn(1, 3, image_size, image_size)
    peaks = torch.tensor([[i % 20, i % 8, (3 * i) % 8] for i in range(num_peaks)])
    detect_flops = count_flops(DetectGraph(model, 3, "median", 0.0, upsample, num_peaks).eval(), x1)
    segment_flops = count_flops(SegmentGraph(model, filling, upsample).eval(), x1, peaks)
    rate = gemm_rate()
    cpu = results["paths"].get("onnxruntime-cpu-b1", {}).get("stage_mean_s", {})
    results["flops"] = {"detect_per_image": detect_flops, "segment_per_image": segment_flops, "gemm_flops_per_s": rate,
                        "detect_achieved_flops_per_s": detect_flops / cpu["detect"] if cpu.get("detect") else None,
                        "segment_achieved_flops_per_s": segment_flops / cpu["segment"] if cpu.get("segment") else None}
    if torch.cuda.is_available():
        results["flops"]["gpu_gemm_flops_per_s"] = {dtype: gemm_rate_cuda(dtype) for dtype in ("fp32", "tf32", "fp16")}
    # achieved rate of every path that ran, per stage (for a batch > 1: per image of the batch)
    results["flops"]["achieved_per_path"] = {
        name: {stage: flops / r["stage_mean_s"][stage] for stage, flops in (("detect", detect_flops),
                                                                           ("segment", segment_flops))
               if r["stage_mean_s"][stage] > 0}
        for name, r in results["paths"].items() if "stage_mean_s" in r}

    for ref_name, key in (("reference", ""), ("reference-cuda", "_vs_reference_cuda")):
        ref = results["paths"].get(ref_name)
        if ref is None:
            continue
        for r in results["paths"].values():
            if "end_to_end_per_image_s" in r:
                r[f"speedup{key}"] = ref["end_to_end_per_image_s"] / r["end_to_end_per_image_s"]
                r[f"segment_speedup_per_peak{key}"] = (ref["stage_mean_s"]["segment"]
                                                       / max(r["stage_mean_s"]["segment"], 1e-9))
    write_json(out / "latency.json", results)
    table = markdown_table(results)
    (out / "latency.md").write_text(table)
    click.echo(table)
    chart(results, out / "latency.png")


def _runtime_path(out: Path, key: str, spec: dict) -> dict:
    """One iam-infer path in a process of its own (benchmarks.runtime_path): no torch loaded, its
    own peak RSS, the CRF worker processes started from a clean process. A path that fails (a GPU
    provider that does not load, say) is recorded as failed, with the end of its error output."""
    import subprocess
    import sys

    spec_path, result_path = out / "runs" / f"{key}.spec.json", out / "runs" / f"{key}.result.json"
    write_json(spec_path, spec)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.runtime_path", str(spec_path), str(result_path)],
                          cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        click.echo(f"{key} failed: {reason[0]}", err=True)
        return {"failed": reason[0]}
    return json.loads(result_path.read_text())


def _tensorrt_engines(out: Path, bundle_dir: Path, ckpt: Path, export_options, results: dict, sizes: list[int],
                      num_peaks: int) -> list[tuple[str, dict]]:
    """Native TensorRT engines for the runtime paths: fp32 (the fp32 bundle), fp16 (an fp16
    bundle: TensorRT 11 is strongly typed) and INT8 (the detect graph quantised with Q/DQ,
    calibrated on the benchmark's photos). Where TensorRT or a GPU is missing, or a build fails,
    the path is recorded as skipped or failed with the reason."""
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
            if precision == "fp16":
                export_bundle(ckpt / "prm.pt", ckpt / "filling.pt", target,
                              dataclasses.replace(export_options, fp16=True), log=lambda *_: None)
            else:
                shutil.copytree(bundle_dir, target)
            t = time.perf_counter()
            build_bundle_engines(target, BuildOptions(fp16=precision == "fp16", int8=precision == "int8",
                                                      max_batch=max(sizes), opt_batch=max(sizes),
                                                      max_segment_peaks=max(32, num_peaks), opt_segment_peaks=num_peaks),
                                 calib_images=out / "images" if precision == "int8" else None, log=click.echo)
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


def markdown_table(results: dict) -> str:
    c = results["config"]
    lines = [f"{c['backbone']}@{c['image_size']}, {c['peaks']} peaks/image, T={c['steps']}, "
             f"{results['machine'].get('cpus')} CPUs, torch {results['machine'].get('torch')}",
             "", "| path | images/s | per image (s) | decode | detect | segment | CRF | write | speed-up"
             + (" (vs CPU / CUDA reference)" if "reference-cuda" in results["paths"] else "") + " |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["paths"].items():
        if "skipped" in r or "failed" in r:
            status = "skipped" if "skipped" in r else "failed"
            lines.append(f"| {name} | {status}: {r[status]} | | | | | | | |")
            continue
        s = r["stage_mean_s"]
        lines.append(f"| {name} | {r['images_per_s']:.3f} | {r['end_to_end_per_image_s']:.2f} | {s['decode']:.3f} | "
                     f"{s['detect']:.3f} | {s['segment']:.2f} | {s['crf']:.2f} | {s['write']:.3f} | {r['speedup']:.2f}x"
                     + (f" / {r['speedup_vs_reference_cuda']:.2f}x" if "speedup_vs_reference_cuda" in r else "") + " |")
    crf = results["crf"]
    fmt = lambda v, f: format(v, f) if v is not None else "n/a"  # noqa: E731
    lines += ["", f"CRF per instance: reference (full resolution, one process) {crf['full_resolution_per_instance_s']:.3f} s; "
              f"runtime default (full resolution, {crf['runtime_workers']} processes) "
              f"{fmt(crf['runtime_default_per_instance_s'], '.3f')} s -> {fmt(crf['runtime_default_speedup'], '.1f')}x, same masks; "
              f"runtime at max side {crf['runtime_max_side']} {fmt(crf['runtime_per_instance_s'], '.3f')} s -> "
              f"{fmt(crf['speedup'], '.1f')}x, mean mask IoU vs full resolution {crf['mean_iou_vs_full_resolution']:.3f}"
              f" ({crf['instances_nonempty']} of {crf['instances']} reference masks non-empty)"]
    if crf.get("object_maps", {}).get("instances"):
        o = crf["object_maps"]
        full, small = o["runtime_full_resolution"], o[f"runtime_max_side_{crf['runtime_max_side']}"]
        lines.append(f"CRF per instance on object-shaped maps ({o['instances']} instances): reference "
                     f"{o['reference_per_instance_s']:.3f} s; runtime ({o['runtime_workers']} processes, one CRF per "
                     f"image) at full resolution {full['per_instance_s']:.3f} s -> {full['speedup']:.1f}x, mean mask IoU "
                     f"{full['mean_iou']:.3f}; at max side {crf['runtime_max_side']} {small['per_instance_s']:.3f} s -> "
                     f"{small['speedup']:.1f}x, mean mask IoU {small['mean_iou']:.3f} (min {small['min_iou']:.3f})")
    agreements = results.get("agreement_vs_reference") or {
        "onnxruntime-cpu": results.get("agreement_onnxruntime_vs_reference"),
        f"onnxruntime-cpu-crf{FAST_CRF_SIDE}": results.get(f"agreement_onnxruntime_crf{FAST_CRF_SIDE}_vs_reference")}
    for name, ag in agreements.items():
        if ag and ag["mean_iou"] is not None:
            label = f"CRF at max side {FAST_CRF_SIDE}" if name.endswith(f"crf{FAST_CRF_SIDE}") else "full-resolution CRF"
            lines.append(f"Final masks, {name.removesuffix(f'-crf{FAST_CRF_SIDE}')} ({label}) vs reference: mean IoU "
                         f"{ag['mean_iou']:.3f} ({ag['reference_masks_nonempty']} of {ag['reference_masks']} reference "
                         "masks non-empty)")
    f = results["flops"]
    lines.append(f"FLOPs per image: detect {f['detect_per_image'] / 1e9:.1f} G, segment ({c['peaks']} peaks) "
                 f"{f['segment_per_image'] / 1e9:.1f} G; fp32 GEMM rate {f['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s; achieved "
                 + ", ".join(f"{k.split('_')[0]} {v / 1e9:.0f} GFLOP/s" for k, v in f.items()
                             if k.endswith("achieved_flops_per_s") and v))
    if any("stage_mean_s" in r and ("cuda" in n or "tensorrt" in n) for n, r in results["paths"].items()):
        lines.append("On a GPU engine the runtime's CRF runs in worker processes overlapped with the engine: its "
                     "CRF stage is worker seconds per image, and the stages add up to more than the end-to-end time.")
    if "gpu_gemm_flops_per_s" in f:
        gpu = {k: v for k, v in f["achieved_per_path"].items() if "cuda" in k or "tensorrt" in k}
        lines.append("GPU GEMM rate " + ", ".join(f"{k} {v / 1e12:.0f}" for k, v in f["gpu_gemm_flops_per_s"].items())
                     + " TFLOP/s; achieved (TFLOP/s, detect / segment): "
                     + "; ".join(f"{k} {v.get('detect', 0) / 1e12:.2f} / {v.get('segment', 0) / 1e12:.2f}"
                                 for k, v in gpu.items()))
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> None:
    """Stacked stage times per path, and each path's end-to-end time per image as a black tick:
    where the runtime overlaps its CRF workers with a GPU engine, the stages add up to more."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [n for n, r in results["paths"].items() if "stage_mean_s" in r]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.6))
    left = np.zeros(len(names))
    for stage in STAGES:
        vals = np.array([results["paths"][n]["stage_mean_s"][stage] for n in names])
        ax.barh(names, vals, left=left, label=stage)
        left += vals
    ax.scatter([results["paths"][n]["end_to_end_per_image_s"] for n in names], names, marker="|", s=400,
               color="black", zorder=3, label="end to end")
    ax.set_xlabel("seconds per image: stage medians (bars) and end to end (tick)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

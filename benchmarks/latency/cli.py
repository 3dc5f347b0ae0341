"""``python -m benchmarks.latency``: every path on the same weights, images and peaks."""

from __future__ import annotations

import copy
import os
import statistics
import time
from pathlib import Path

import click
import numpy as np
import torch

from iam_runtime.bundle import load_bundle
from iam_runtime.images import decode_image, preprocess, resize_rgb
from iam_runtime.masks import mask_iou
from iam_runtime.refine import CRFSchedule
from iam_runtime.voc import IMAGENET_MEAN, IMAGENET_STD
from iam_train.checkpoint import PRMMetadata, save_checkpoint
from iam_train.models import InstanceExtentFilling, ResNetFCN, reference_peak_response_maps
from iam_train.models.peaks import find_peaks

from ..common import machine_info, write_json
from .crf import crf_on_object_maps
from .paths import (
    FAST_CRF_SIDE,
    STAGES,
    _agreement,
    _path_result,
    _runtime_path,
    _synced,
    _tensorrt_engines,
    achieved_rates,
    calibrate_maps,
    count_flops,
    gemm_rate,
    gemm_rate_cuda,
    peaks_identical,
    reference_crf,
    reference_filling,
)
from .photos import PHOTOS_ENV, demo_photos, distinct_photos
from .report import chart, markdown_table


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
@click.option("--photos", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help=f"More photos to benchmark on, after scikit-image's (default: ${PHOTOS_ENV}, if set).")
@click.option("--calib-images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Calibration images of the int8 bundle (default: the benchmark's own photos, in-sample).")
@click.option("--int8/--no-int8", default=True, show_default=True, help="Also export and time an int8 bundle.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def main(backbone, image_size, num_peaks, batch_sizes, num_images, reference_images, steps, hidden, upsample, warmup,
         crf_workers, no_crf, cpu_paths, photos, calib_images, int8, out) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    classes = [f"class{i}" for i in range(20)]
    model = ResNetFCN(backbone, num_classes=20).eval()
    # The reference's inference (SPEC section 7): the filling network normalises an image's peaks
    # together (batch statistics), the CRF runs in the network's input frame.
    filling = InstanceExtentFilling(model.feature_channels, hidden=hidden, steps=steps, normalization="batch").eval()
    photos = demo_photos(out / "images", num_images, image_size, photos)
    distinct = distinct_photos(photos)
    if distinct < len(photos):
        click.echo(f"note: the {len(photos)} images are {distinct} distinct photos, cycled: the agreement figures "
                   f"count the copies again (add photos with --photos DIR or ${PHOTOS_ENV})", err=True)
    results: dict = {"config": dict(backbone=backbone, image_size=image_size, peaks=num_peaks, steps=steps,
                                    images=num_images, distinct_images=distinct, batch_sizes=batch_sizes),
                     "machine": machine_info(), "paths": {}}

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
    export_options = ExportOptions(max_peaks=max(32, num_peaks), force=True, class_threshold=float("-inf"),
                                   filling_normalization="batch")
    export_bundle(ckpt / "prm.pt", ckpt / "filling.pt", bundle_dir, export_options, log=lambda *_: None)
    results["export_seconds"] = time.perf_counter() - t
    bundle = load_bundle(bundle_dir)
    size = (image_size, image_size)

    # ---------------- reference and torch paths (CPU, and CUDA where present) ----------------
    from iam_export.graphs import DetectGraph, SegmentGraph

    def load(path: Path, device: torch.device, times: dict) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """The photo (H, W, 3), the CRF's frame (the photo at the input size) and the (1, 3, S, S)
        network input on the device, timed as decode."""
        t0 = time.perf_counter()
        rgb = decode_image(path)
        frame = resize_rgb(rgb, size)
        x = torch.from_numpy(preprocess(rgb, size, IMAGENET_MEAN, IMAGENET_STD))[None].to(device)
        times["decode"] = _synced(device, t0)
        return rgb, frame, x

    def run_reference(path: Path, net: ResNetFCN, fill: InstanceExtentFilling, device: torch.device):
        times = dict.fromkeys(STAGES, 0.0)
        rgb, frame, x = load(path, device, times)
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
        masks, crf_times = [], []  # one CRF per instance, in the input frame, each timed
        for m in iam:
            t0 = time.perf_counter()
            masks.append(reference_crf(rgb, frame, m, bundle.manifest.crf))
            crf_times.append(time.perf_counter() - t0)
        times["crf"] = sum(crf_times)
        return times, masks, iam, crf_times

    def run_torch(path: Path, detect_t: DetectGraph, segment_t: SegmentGraph, device: torch.device) -> dict:
        times = dict.fromkeys(STAGES, 0.0)
        rgb, frame, x = load(path, device, times)
        with torch.no_grad():
            t0 = time.perf_counter()
            _, coords, _, _ = detect_t(x)
            times["detect"] = _synced(device, t0)
            t0 = time.perf_counter()
            iam = segment_t(x, coords[0, :num_peaks])[1]
            iam = iam.cpu().numpy()
            times["segment"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for m in iam:
            reference_crf(rgb, frame, m, bundle.manifest.crf)
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

    # After the in-process reference and torch paths, which it would otherwise share the process with.
    bundles = {"fp32": bundle_dir}
    if int8:
        import dataclasses

        click.echo("exporting the int8 bundle ...")
        calib = calib_images or out / "images"
        results["config"]["int8_calibration"] = str(calib) if calib_images else "the benchmark's photos (in-sample)"
        t = time.perf_counter()
        try:
            manifest = export_bundle(ckpt / "prm.pt", ckpt / "filling.pt", out / "bundle-int8", dataclasses.replace(
                export_options, precision="int8", calib_images=calib, calib_count=64, verify=False),
                log=lambda *_: None)
            results["int8_export"] = {"seconds": time.perf_counter() - t, "vs_fp32": manifest.verification["int8"]}
            bundles["int8"] = out / "bundle-int8"
        except Exception as exc:  # noqa: BLE001 - recorded, the other paths go on
            results["int8_export"] = {"failed": f"{type(exc).__name__}: {exc}"}

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
    engines = [(name, dict(bundle=str(bundle_dir), backend="onnxruntime", providers=providers), variants)
               for name, providers in provider_sets]
    if cpu_paths:
        # the segment graph's own propagation nodes instead of the fused kernel: the kernel's gain
        engines.append(("onnxruntime-cpu-graphprop", dict(bundle=str(bundle_dir), backend="onnxruntime",
                        providers=["CPUExecutionProvider"], propagation="graph"), [("", "crf", 0, sizes[:1])]))
        # detect and segment each running the backbone (the two graphs whole): the shared forward's gain
        engines.append(("onnxruntime-cpu-twoforwards", dict(bundle=str(bundle_dir), backend="onnxruntime",
                        providers=["CPUExecutionProvider"], share_forward=False), [("", "crf", 0, sizes[:1])]))
        if "int8" in bundles:
            engines.append(("onnxruntime-cpu-int8", dict(bundle=str(bundles["int8"]), backend="onnxruntime",
                            providers=["CPUExecutionProvider"]), variants))
    engines += [(*e, variants) for e in _tensorrt_engines(out, bundle_dir, ckpt, export_options, results, sizes,
                                                          num_peaks, calib_images or out / "images")]
    for name, engine, engine_variants in engines:
        for suffix, refine, max_side, bs in [(*v[:3], b) for v in engine_variants for b in v[3]]:
            key = f"{name}-b{bs}{suffix}"
            run_dir = out / "runs" / key
            # iam-infer's defaults but for the peaks: every path segments the same num_peaks peaks
            options = dict(batch_size=bs, max_instances=num_peaks, class_threshold=float("-inf"), refine=refine,
                           peak_threshold=float("-inf"), nms_iou=1.01, crf_workers=crf_workers, crf_max_side=max_side)
            results["paths"][key] = _runtime_path(out, key, dict(
                **engine, images=str(out / "images"), warmup_image=str(photos[0]), out=str(run_dir), options=options))
            if refine == "crf" and "failed" not in results["paths"][key]:
                agreement[f"{name}{suffix}"] = _agreement(run_dir, ref_masks)
                base = out / "runs" / f"onnxruntime-cpu-b{bs}{suffix}"
                if "int8" in name and (base / "predictions.json").is_file():
                    agreement[f"{name}{suffix}"]["peaks_identical_vs_fp32"] = peaks_identical(run_dir, base)
    results["agreement_onnxruntime_vs_reference"] = agreement.get("onnxruntime-cpu")
    results[f"agreement_onnxruntime_crf{FAST_CRF_SIDE}_vs_reference"] = agreement.get(f"onnxruntime-cpu-crf{FAST_CRF_SIDE}")
    results["agreement_vs_reference"] = agreement

    # ---------------- CRF comparison ----------------
    # The reference path's masks and times against the reduced resolution (in the same frame).
    crf_fast, ious, nonempty = [], [], 0
    for stem, maps in ref_maps.items():
        rgb = decode_image(out / "images" / f"{stem}.jpg")
        frame = resize_rgb(rgb, size)
        for m, a in zip(maps, ref_masks[stem]):
            t0 = time.perf_counter()
            b = reference_crf(rgb, frame, m, bundle.manifest.crf, CRFSchedule(FAST_CRF_SIDE))
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
    cpu = results["paths"].get("onnxruntime-cpu-b1", {})
    cpu = cpu if "stage_mean_s" in cpu else None
    results["flops"] = {"detect_per_image": detect_flops, "segment_per_image": segment_flops, "gemm_flops_per_s": rate,
                        "engine_achieved_flops_per_s": achieved_rates(cpu, detect_flops, segment_flops).get("engine")
                        if cpu else None}
    if torch.cuda.is_available():
        results["flops"]["gpu_gemm_flops_per_s"] = {dtype: gemm_rate_cuda(dtype) for dtype in ("fp32", "tf32", "fp16")}
    # achieved rate of every path that ran (for a batch > 1: per image of the batch)
    results["flops"]["achieved_per_path"] = {name: achieved_rates(r, detect_flops, segment_flops)
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

"""The benchmark's table (markdown) and chart (PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .paths import FAST_CRF_SIDE, STAGES


def _fp32_cpu(path: str) -> bool:
    return not any(tag in path for tag in ("cuda", "tensorrt", "int8"))


def demonstrated_limit(flops: dict) -> tuple[float, str]:
    """The CPU's fp32 limit as this run shows it: the best of the GEMM's rate and every fp32 CPU
    path's graph rates (FLOPs counted / seconds measured), with where it was reached. A GEMM rate
    below a graph's own is not a limit. int8 paths do not count: their FLOPs are not fp32's."""
    candidates = [(flops["gemm_flops_per_s"], "the fp32 GEMM")]
    for path, parts in flops.get("achieved_per_path", {}).items():
        if not _fp32_cpu(path):
            continue
        candidates += [(rate, f"{path} {part}" + ("" if part == "engine" else " graph")) for part, rate in parts.items()
                       if rate]
    return max(candidates)


def markdown_table(results: dict) -> str:
    c = results["config"]
    photos = f"{c['images']} images" + (f" ({c['distinct_images']} distinct photos)" if "distinct_images" in c else "")
    cpu = results["machine"].get("cpu") or {}
    features = ", ".join(cpu.get("features") or [])
    cpu = f" ({cpu['model']}{': ' + features if features else ''})" if cpu.get("model") else ""
    lines = [f"{c['backbone']}@{c['image_size']}, {c['peaks']} peaks/image, T={c['steps']}, {photos}, "
             f"{results['machine'].get('cpus')} CPUs{cpu}, torch {results['machine'].get('torch')}",
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
    busy = [f"{name} engine {r['busy']['engine']:.0%}, CRF {r['busy']['refine']:.0%} of {r['refine_workers']} workers"
            for name, r in results["paths"].items() if r.get("busy")]
    if busy:
        lines += ["", "Overlap of the iam-infer paths (busy fraction of the wall time; the CRF column above is "
                      "worker-seconds per image): " + "; ".join(busy)]
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
                 + ", ".join(f"{k.split('_')[0]} {v / 1e9:.0f} GFLOP/s (onnxruntime-cpu-b1)" for k, v in f.items()
                             if k.endswith("achieved_flops_per_s") and v))
    rate, source = demonstrated_limit(f)
    best = {part: max((v.get(part, 0.0) for k, v in f.get("achieved_per_path", {}).items() if _fp32_cpu(k)),
                      default=0.0) for part in ("detect", "segment", "engine")}
    graphs = "".join(f", the best {part} graph (two forwards) at {best[part] / rate:.0%}" for part in ("segment", "detect")
                     if best[part])
    lines.append(f"Limit: {rate / 1e9:.0f} GFLOP/s, the best fp32 rate this CPU reached in this run ({source}); the "
                 f"best fp32 engine (detect + segment, each image's work counted once) ran at "
                 f"{best['engine'] / rate:.0%} of it{graphs}")
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


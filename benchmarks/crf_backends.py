"""The dense CRF's two backends side by side (docs/crf.md): pydensecrf (permutohedral lattice, one
call per instance) and the CRF graph (bilateral grid, every instance of the image in one
onnxruntime call), on the same photos and the same object-shaped maps, in the runtime's default
frame (the image resized to the network's input size). Prints and writes seconds per image
(medians), their ratio, the graph's peak memory and the masks' agreement.

    python -m benchmarks.crf_backends --out bench/crf [--photos DIR] [--providers CUDAExecutionProvider]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

from iam_runtime.bundle import CRFSpec
from iam_runtime.images import decode_image, resize_rgb
from iam_runtime.masks import mask_iou
from iam_runtime.refine import crf_kernel, crf_margins

from .common import machine_info, own_peak_rss_mb, write_json
from .latency.crf import object_shaped_maps
from .latency.photos import demo_photos


def _graph_peak_memory(size: int, count: int, providers: tuple[str, ...]) -> float:
    """Peak RSS growth (MB) of a fresh process that runs the graph once on a size x size image
    with ``count`` instances (the session's arena and activations)."""
    code = ("import numpy as np, sys; sys.path.insert(0, '.');"
            "from benchmarks.common import own_peak_rss_mb; from iam_runtime.crf_graph import crf_graph;"
            "from iam_runtime.refine import crf_kernel; from iam_runtime.bundle import CRFSpec;"
            f"g = crf_graph(None, 5, {providers!r}); rng = np.random.default_rng(0);"
            f"rgb = rng.integers(0, 256, ({size}, {size}, 3), dtype=np.uint8);"
            f"p = rng.random(({count}, {size}, {size}), dtype=np.float32);"
            "g.foreground(rgb, p[:1], crf_kernel(CRFSpec())); base = own_peak_rss_mb();"
            "g.foreground(rgb, p, crf_kernel(CRFSpec())); print(own_peak_rss_mb() - base)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--photos", "photo_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--count", default=8, show_default=True, help="Photos.")
@click.option("--instances", default=5, show_default=True, help="Object-shaped maps per photo (at most).")
@click.option("--size", default=448, show_default=True, help="The CRF's frame (the network's input size).")
@click.option("--providers", default="", help="onnxruntime providers for the graph, comma-separated.")
def main(out: Path, photo_dir: Path | None, count: int, instances: int, size: int, providers: str) -> None:
    from iam_runtime.crf_graph import crf_graph

    crf = CRFSpec()
    chosen = tuple(p for p in providers.split(",") if p)
    graph = crf_graph(None, crf.iterations, chosen)
    rows, ious = [], []
    for path in demo_photos(out / "photos", count, size, photo_dir):
        frame = resize_rgb(decode_image(path), (size, size))
        maps = object_shaped_maps(frame, instances)
        if not maps:
            continue
        probs = (0.5 + 0.4 * (np.stack(maps) - 0.5)).astype(np.float32)  # flattened as a filling network's
        graph.foreground(frame, probs[:1], crf_kernel(crf))  # warm-up (first-run allocations)
        timing = {}
        for backend in ("pydensecrf", "graph"):
            start = time.perf_counter()
            masks = crf_margins(frame, probs, crf, backend, graph=graph if backend == "graph" else None) > 0
            timing[backend] = time.perf_counter() - start
            timing[f"{backend}_masks"] = masks
        ious += [mask_iou(g, d) for g, d in zip(timing["graph_masks"], timing["pydensecrf_masks"])]
        rows.append({"photo": path.name, "instances": len(probs), "pydensecrf_s": timing["pydensecrf"],
                     "graph_s": timing["graph"]})
        click.echo(f"{path.name}: {len(probs)} instances, pydensecrf {timing['pydensecrf']:.3f} s, "
                   f"graph {timing['graph']:.3f} s")
    med = {k: statistics.median(r[k] for r in rows) for k in ("pydensecrf_s", "graph_s")}
    report = {
        "frame": [size, size], "instances_per_image": instances, "providers": list(graph.providers),
        "median_s_per_image": med, "graph_over_pydensecrf": med["graph_s"] / med["pydensecrf_s"],
        "mask_iou_graph_vs_pydensecrf": {"mean": float(np.mean(ious)), "min": float(np.min(ious))},
        "graph_peak_memory_mb": _graph_peak_memory(size, instances, graph.providers),
        "rows": rows, "machine": machine_info(), "peak_rss_mb": own_peak_rss_mb(),
    }
    write_json(out / "crf_backends.json", report)
    click.echo(f"median per image ({size}x{size}, up to {instances} instances): pydensecrf {med['pydensecrf_s']:.3f} s, "
               f"graph {med['graph_s']:.3f} s on {graph.providers[0]} ({report['graph_over_pydensecrf']:.2f}x the time); "
               f"masks agree at mean IoU {report['mask_iou_graph_vs_pydensecrf']['mean']:.3f}; graph peak memory "
               f"{report['graph_peak_memory_mb']:.0f} MB")


if __name__ == "__main__":
    main()

"""Speed of the model parts in PyTorch eager: forward, peak backprop (reference vs batched)
and filling, per image and per peak.

    python -m benchmarks.model_speed --backbone resnet50 --image-size 448 --out bench/model.json
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from iam_train.models import InstanceExtentFilling, PeakBackprop, ResNetFCN, reference_peak_response_maps

from .common import machine_info, time_call, write_json


@click.command()
@click.option("--backbone", default="resnet50", show_default=True)
@click.option("--image-size", default=448, show_default=True)
@click.option("--upsample", default=8, show_default=True, help="Sub-pixel locating factor.")
@click.option("--steps", default=112, show_default=True, help="Filling propagation steps T.")
@click.option("--peaks", "peak_counts", default="1,4,16", show_default=True, help="Batched peak counts.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="JSON output file.")
def main(backbone: str, image_size: int, upsample: int, steps: int, peak_counts: str, repeats: int, out: Path | None):
    torch.manual_seed(0)
    model = ResNetFCN(backbone, num_classes=20).eval()
    filling = InstanceExtentFilling(model.feature_channels, steps=steps).eval()
    image = torch.randn(1, 3, image_size, image_size)
    grid = image_size // 32 * upsample
    counts = [int(c) for c in peak_counts.split(",")]
    g = torch.Generator().manual_seed(0)
    all_peaks = torch.stack(
        [torch.randint(0, 20, (max(counts),), generator=g), torch.randint(0, grid, (max(counts),), generator=g),
         torch.randint(0, grid, (max(counts),), generator=g)], dim=1
    )
    results: dict[str, object] = {"config": dict(backbone=backbone, image_size=image_size, upsample=upsample,
                                                 steps=steps), "machine": machine_info()}

    with torch.no_grad():
        results["forward"] = time_call(lambda: model(image), repeats)
    results["reference_backprop_1_peak"] = time_call(
        lambda: reference_peak_response_maps(model, image, all_peaks[:1], upsample), repeats
    )
    bp = PeakBackprop(model, upsample)
    batched = {}
    with torch.no_grad():
        for n in counts:
            t = time_call(lambda n=n: bp(image, all_peaks[:n]), repeats)
            t["per_peak_s"] = t["median_s"] / n
            batched[str(n)] = t
        results["batched_backprop"] = batched
        feats = model(image)
        kernels = filling.affinity_kernels(feats.c2, feats.c3, feats.c4)
        prm = torch.rand(1, image_size, image_size)
        results["filling_1_peak"] = time_call(lambda: filling(prm, kernels), repeats)
        results["filling_kernels"] = time_call(lambda: filling.affinity_kernels(feats.c2, feats.c3, feats.c4), repeats)

    ref = results["reference_backprop_1_peak"]["median_s"]
    click.echo(f"{backbone}@{image_size}, torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {repeats}")
    click.echo(f"  forward per image             {results['forward']['median_s'] * 1e3:8.1f} ms")
    click.echo(f"  reference backprop per peak   {ref * 1e3:8.1f} ms")
    for n, t in batched.items():
        ratio = t["per_peak_s"] / ref
        click.echo(f"  batched backprop, {n:>2} peaks    {t['median_s'] * 1e3:8.1f} ms  "
                   f"({t['per_peak_s'] * 1e3:.1f} ms/peak, {ratio:.2f}x the reference per peak)")
    click.echo(f"  filling kernels per image     {results['filling_kernels']['median_s'] * 1e3:8.1f} ms")
    click.echo(f"  filling per peak (T={steps})     {results['filling_1_peak']['median_s'] * 1e3:8.1f} ms")
    if out:
        write_json(out, results)
        click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()

"""End to end on synthetic data: generate a VOC-layout dataset, train briefly, export, infer
with the runtime and evaluate with iam-eval's metrics; prints the papers' table.

    python -m benchmarks.synthetic_eval --out bench/synthetic

The figures are for the synthetic shapes task (marked as such in the README), not VOC.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from iam_runtime.backends import OnnxRuntimeBackend
from iam_runtime.bundle import load_bundle
from iam_runtime.demo import ensure_demo_bundle
from iam_runtime.pipeline import InferOptions, run
from iam_train.evaluate import evaluate, format_table, load_ground_truth

from .common import write_json


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--refine", default="crf", show_default=True)
def main(out: Path, refine: str) -> None:
    bundle_dir = ensure_demo_bundle(echo=click.echo, root=out)
    data = out / "data"
    ids = (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    listing = out / "val-images.txt"
    listing.write_text("".join(f"data/JPEGImages/{i}.jpg\n" for i in ids))
    bundle = load_bundle(bundle_dir)
    summary = run(bundle, OnnxRuntimeBackend(bundle), listing, out / "predictions", InferOptions(refine=refine))
    predictions = json.loads((out / "predictions" / "predictions.json").read_text())
    for p in predictions:  # the listing's paths are data/JPEGImages/<id>: evaluate by VOC id
        p["image_id"] = Path(p["image_id"]).name
    classes, gt = load_ground_truth(data, "val")
    report = evaluate(predictions, gt, list(classes))
    report["inference"] = {"images_per_s": summary.images_per_second, "instances": summary.instances}
    write_json(out / "report.json", report)
    click.echo(format_table(report, name="ours (synthetic)"))
    click.echo(f"{summary.completed} images, {summary.instances} instances; report in {out / 'report.json'}")


if __name__ == "__main__":
    main()

"""End to end on synthetic data: generate a VOC-layout dataset, train briefly, export, infer
with the runtime and evaluate with iam-eval's metrics; prints the papers' table. By default the
demo's own recipe (iam_runtime.demo.DemoRecipe); ``--set field=value`` tries another one, which is
how the demo's recipe was chosen (docs/demo.md).

    python -m benchmarks.synthetic_eval --out bench/synthetic
    python -m benchmarks.synthetic_eval --out bench/more-epochs --set prm_epochs=12 --set images=240

The figures are for the synthetic shapes task (marked as such in the README), not VOC.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click

from iam_runtime.backends import OnnxRuntimeBackend
from iam_runtime.bundle import load_bundle
from iam_runtime.demo import DemoRecipe, demo_images, ensure_demo_bundle
from iam_runtime.pipeline import InferOptions, run
from iam_train.evaluate import evaluate, format_table, load_ground_truth

from .common import machine_info, write_json


def parse_recipe(settings: tuple[str, ...]) -> DemoRecipe:
    """``field=value`` overrides of the demo recipe, each value read as its field's type."""
    fields = {f.name: f for f in dataclasses.fields(DemoRecipe)}
    values = {}
    for item in settings:
        name, _, raw = item.partition("=")
        if name not in fields:
            raise click.BadParameter(f"{name!r} is not a DemoRecipe field ({', '.join(fields)})", param_hint="--set")
        kind = type(getattr(DemoRecipe(), name))
        values[name] = kind(raw)
    return DemoRecipe(**values)


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--refine", default="crf", show_default=True)
@click.option("--set", "settings", multiple=True, help="A DemoRecipe field=value (repeatable).")
@click.option("--class-threshold", type=float, default=None, help="Inference override (default: the bundle's).")
@click.option("--peak-threshold", type=float, default=None, help="Inference override (default: the bundle's).")
@click.option("--predictions", "pred_name", default="predictions", show_default=True, help="Subfolder of OUT.")
def main(out: Path, refine: str, settings: tuple[str, ...], class_threshold: float | None,
         peak_threshold: float | None, pred_name: str) -> None:
    recipe = parse_recipe(settings)
    start = time.perf_counter()
    built = not (out / "bundle" / "manifest.json").is_file()
    bundle_dir = ensure_demo_bundle(echo=click.echo, root=out, recipe=recipe)
    build_s = time.perf_counter() - start if built else None
    bundle = load_bundle(bundle_dir)
    summary = run(bundle, OnnxRuntimeBackend(bundle), demo_images(out), out / pred_name,
                  InferOptions(refine=refine, class_threshold=class_threshold, peak_threshold=peak_threshold))
    predictions = json.loads((out / pred_name / "predictions.json").read_text())
    classes, gt = load_ground_truth(out / "data", "val")
    report = evaluate(predictions, gt, list(classes))
    report["recipe"] = dataclasses.asdict(recipe)
    report["build_s"] = build_s
    report["inference_overrides"] = {"class_threshold": class_threshold, "peak_threshold": peak_threshold}
    report["inference"] = {"images_per_s": summary.images_per_second, "instances": summary.instances}
    report["machine"] = machine_info()
    write_json(out / pred_name / "report.json", report)
    click.echo(format_table(report, name="ours (synthetic)"))
    built_note = f"built in {build_s:.0f} s; " if build_s is not None else ""
    click.echo(f"{built_note}{summary.completed} images, {summary.instances} instances; report in "
               f"{out / pred_name / 'report.json'}")


if __name__ == "__main__":
    main()

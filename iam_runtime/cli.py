"""``iam-infer``: run a bundle over images and write masks, overlays and COCO-style JSON."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .backends import BackendError, select_backend
from .bundle import BundleError, describe_semantics, load_bundle
from .pipeline import SAVE_CHOICES, InferOptions, run
from .refine import CRFSchedule, check_crf_schedule, resolve_crf_backend

EXIT_OK, EXIT_IMAGES_FAILED, EXIT_INTERRUPTED = 0, 1, 130


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("input_path", metavar="INPUT", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default with --demo: ./iam-demo-output).")
@click.option("--bundle", type=click.Path(path_type=Path), default=None, help="Bundle directory (iam-export).")
@click.option("--demo", is_flag=True, help="Use the embedded demo: build it once (cached), run on its images.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True)
@click.option("--providers", default=None, help="onnxruntime providers, comma-separated (default: best available).")
@click.option("--tf32", is_flag=True, help="CUDA provider: fp32 convolutions in TF32 (faster on Ampere and newer; "
                                         "masks agree less with the reference's).")
@click.option("--propagation", type=click.Choice(["auto", "fused", "graph"]), default="auto", show_default=True,
              help="The filling network's propagation on the CPU: fused = one compiled kernel (numba) between the "
                   "segment graph's halves; graph = the graph's own nodes; auto = fused on the CPU provider.")
@click.option("--share-forward/--no-share-forward", default=None,
              help="CPU: detect on the segment graph's forward pass and keep it for the image's peaks, so the "
                   "backbone runs once per image (costs memory: about 385 MB per image of a batch, resnet50@448). "
                   "Default: on the CPU provider where the bundle allows it.")
@click.option("--batch-size", default=4, show_default=True,
              help="Images per detect call (with the CPU's shared forward detect goes image by image).")
@click.option("--refine", type=click.Choice(["crf", "threshold", "none"]), default="crf", show_default=True,
              help="crf: dense CRF per instance; threshold/none: activation map >= --mask-threshold.")
@click.option("--crf-backend", type=click.Choice(["auto", "graph", "pydensecrf"]), default="auto", show_default=True,
              help="graph: the CRF as an ONNX graph (bilateral grid; every instance of an image in one onnxruntime "
                   "call, on CUDA where onnxruntime has it); pydensecrf: the reference's library in worker "
                   "processes; auto: the graph where CUDA runs it, else pydensecrf (the faster on the CPU).")
@click.option("--crf-workers", default=0, show_default=True,
              help="Refinement processes (0: one per core; 1: refine in this process); with the CRF graph, threads "
                   "sharing its session (0: 1).")
@click.option("--crf-max-side", default=0, show_default=True, type=click.IntRange(min=0),
              help="Run the CRF's mean-field iterations on its frame scaled to this longer side, e.g. 320, but "
                   "for the last --crf-full-iterations (faster; masks close to, not equal to, the reference's). "
                   "0: every iteration in the frame itself, as the reference.")
@click.option("--crf-full-iterations", default=1, show_default=True, type=click.IntRange(min=0),
              help="With --crf-max-side: how many of the last iterations run at full resolution.")
@click.option("--crf-per-instance", is_flag=True,
              help="pydensecrf: one mean-field per instance, the reference's arithmetic bit for bit. Default: an "
                   "image's instances filtered together through its lattices (2-3x faster, refined probabilities "
                   "within about 1e-4 of it; docs/crf.md).")
@click.option("--crf-frame", type=click.Choice(["input", "image"]), default=None,
              help="Where the CRF runs: input = on the image resized to the network's input size, masks brought "
                   "to the photo's size (the reference's frame; cost independent of the photo); image = at the "
                   "photo's resolution, capped by --crf-photo-max-side. Default: the bundle's (input).")
@click.option("--crf-photo-max-side", default=1024, show_default=True, type=click.IntRange(min=0),
              help="With --crf-frame image: larger photos are refined at this longer side (0: no cap).")
@click.option("--max-instances", type=click.IntRange(min=1), default=None,
              help="Instances per image at most, the highest peaks (default: every valid peak the bundle's detect "
                   "graph returns; a warning names the images it cuts).")
@click.option("--class-threshold", type=float, default=None,
              help="A class is present when its score (logit) is at least this (default: the bundle's; "
                   "reference: -3).")
@click.option("--peak-threshold", type=float, default=None,
              help="Peak value threshold (default: the bundle's; reference: 30).")
@click.option("--mask-threshold", type=float, default=None, help="Without CRF (default: the bundle's, 0.5).")
@click.option("--nms-iou", type=float, default=None,
              help="Same-class masks overlapping more than this: the lower score is dropped; above 1: keep every "
                   "instance (default: the bundle's; reference: off).")
@click.option("--save", default=",".join(SAVE_CHOICES), show_default=True, help="What to write.")
@click.option("--resume", is_flag=True, help="Skip images whose outputs are complete.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run on Ray Data (a local Ray, or the cluster of --ray-address / $RAY_ADDRESS); OUT must be a path "
                   "every node can write.")
@click.option("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray).")
@click.option("--ray-engine-actors", default=0, show_default=True, type=click.IntRange(min=0),
              help="Engine actors (0: one per GPU of the cluster, else 1).")
@click.option("--ray-crf-actors", default=0, show_default=True, type=click.IntRange(min=0),
              help="CRF actors, a fixed pool (0: the cluster's CPUs not taken by engine actors).")
@click.option("--no-progress", is_flag=True)
def main(input_path, out, bundle, demo, backend, providers, tf32, propagation, share_forward, batch_size, refine, crf_backend, crf_workers, crf_max_side,
         crf_full_iterations, crf_per_instance, crf_frame, crf_photo_max_side, max_instances, class_threshold, peak_threshold, mask_threshold,
         nms_iou, save, resume, use_ray, ray_address, ray_engine_actors, ray_crf_actors, no_progress) -> None:
    """Segment instances in INPUT (a folder, an image, or a .txt list of paths).

    Exit status: 0 when every image completed, 1 when some images could not be read or
    processed (listed in OUT/summary.json), 2 for usage errors, 130 when interrupted.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if demo:
        from .demo import demo_images, ensure_demo_bundle

        try:
            bundle = bundle or ensure_demo_bundle(echo=click.echo)
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from exc
        input_path = input_path or demo_images()
        out = out or Path("iam-demo-output")
    if input_path is None or out is None or bundle is None:
        raise click.UsageError("give INPUT, -o OUT and --bundle DIR (or --demo)")
    unknown = [s for s in save.split(",") if s and s not in SAVE_CHOICES]
    if unknown:
        raise click.BadParameter(f"unknown {unknown}; choose from {', '.join(SAVE_CHOICES)}", param_hint="--save")
    if not input_path.exists():
        raise click.ClickException(f"input not found: {input_path}")
    if refine == "crf":
        try:
            check_crf_schedule(resolve_crf_backend(crf_backend, providers.split(",") if providers else None),
                               CRFSchedule(crf_max_side, per_instance=crf_per_instance))
        except ValueError as exc:
            hint = "--crf-max-side" if crf_max_side else "--crf-per-instance"
            raise click.BadParameter(str(exc), param_hint=hint) from None
    try:
        loaded = load_bundle(bundle)
        engine = None if use_ray else select_backend(loaded, backend, providers.split(",") if providers else None,
                                                     tf32=tf32, propagation=propagation, share_forward=share_forward)
    except (BundleError, BackendError) as exc:
        raise click.ClickException(str(exc)) from exc
    options = InferOptions(batch_size=batch_size, refine=refine, crf_backend=crf_backend, crf_workers=crf_workers, crf_max_side=crf_max_side,
                           crf_full_iterations=crf_full_iterations, crf_per_instance=crf_per_instance, crf_frame=crf_frame,
                           crf_photo_max_side=crf_photo_max_side, max_instances=max_instances,
                           class_threshold=class_threshold, peak_threshold=peak_threshold,
                           mask_threshold=mask_threshold, nms_iou=nms_iou, save=tuple(s for s in save.split(",") if s),
                           resume=resume, progress=not no_progress)
    try:
        if use_ray:
            from .ray_pipeline import RayOptions, run_ray

            click.echo(f"Ray Data; bundle {bundle} ({describe_semantics(loaded.manifest)})", err=True)
            summary = run_ray(bundle, input_path, out, options, RayOptions(
                ray_address, ray_engine_actors, ray_crf_actors, providers=tuple(providers.split(",")) if providers
                else None, backend=backend, tf32=tf32, propagation=propagation, share_forward=share_forward))
        else:
            refinement = (f"CRF: {resolve_crf_backend(crf_backend, getattr(engine, 'providers', None))}"
                          if refine == "crf" else f"refine: {refine}")
            click.echo(f"{engine.describe()}; {refinement}; bundle {bundle} ({describe_semantics(loaded.manifest)})",
                       err=True)
            summary = run(loaded, engine, input_path, out, options)
    except RuntimeError as exc:  # Ray missing or not reachable
        if not use_ray:
            raise
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        click.echo("interrupted: completed images are in place; run again with --resume to finish", err=True)
        sys.exit(EXIT_INTERRUPTED)
    click.echo(f"{summary.completed} images done, {summary.skipped_complete} already complete, {summary.failed} failed; "
               f"{summary.instances} instances; {summary.images_per_second:.2f} images/s")
    if summary.busy:
        click.echo(f"busy: engine {summary.busy['engine']:.0%} of the time, refinement {summary.busy['refine']:.0%} "
                   f"of {summary.refine_workers} worker(s)", err=True)
    for err in summary.errors:
        click.echo(f"  failed: {err['file']} ({err['stage']}): {err['reason']}", err=True)
    click.echo(f"results at a glance: {(out / 'index.html').resolve()}")
    click.echo(f"overlays in {out / 'overlays'}, predictions in {out / 'predictions.json'}")
    sys.exit(EXIT_IMAGES_FAILED if summary.failed else EXIT_OK)


if __name__ == "__main__":
    main()

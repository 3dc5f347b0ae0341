"""``iam-export``: checkpoints -> ONNX bundle -> TensorRT engines."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from .int8 import ACTIVATIONS, CALIBRATIONS, Int8Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Export trained IAM models for deployment."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    for noisy in ("torch.onnx", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@main.command("onnx")
@click.option("--prm", required=True, type=click.Path(path_type=Path),
              help="PRM run directory or checkpoint (with --from-reference: model_prm_latest.pth.tar).")
@click.option("--filling", required=True, type=click.Path(path_type=Path),
              help="Filling run directory or checkpoint (with --from-reference: model_filling_latest.pth.tar).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Bundle directory.")
@click.option("--image-size", type=int, default=None, help="Input size (default: as trained; reference 448).")
@click.option("--opset", default=20, show_default=True)
@click.option("--max-peaks", default=100, show_default=True,
              help="Peaks per image the detect graph returns (its fixed-size outputs; TensorRT's TopK allows 3840).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="fp16: the convolution trunk in half precision (fp32 peak finding, heads and I/O); int8: Q/DQ "
                   "convolutions (detect's, and peak backprop's backward pass) calibrated on --calib-images, their "
                   "agreement with fp32 measured and recorded.")
@click.option("--calib-images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="With --precision int8: a folder of representative images.")
@click.option("--int8-activations", type=click.Choice(ACTIVATIONS), default=Int8Settings.activations, show_default=True,
              help="With --precision int8: u8 = asymmetric activations, onnxruntime's fast CPU path; s8 = symmetric "
                   "(zero point 0), what TensorRT takes (slower than fp32 on onnxruntime's CPU provider).")
@click.option("--calib-method", "int8_calibration", type=click.Choice(CALIBRATIONS), default=Int8Settings.calibration,
              show_default=True,
              help="With --precision int8: each activation's range, the --calib-percentile of its calibration values "
                   "or their min/max (which gave peak backprop's heavy-tailed activations too few levels: "
                   "docs/int8.md).")
@click.option("--calib-percentile", "int8_percentile", default=Int8Settings.percentile, show_default=True, type=float,
              help="With --calib-method percentile.")
@click.option("--calib-count", default=16, show_default=True, type=click.IntRange(min=2),
              help="With --precision int8: distinct images read from --calib-images (three quarters calibrate, "
                   "the rest measure the agreement with fp32; copies are skipped).")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check onnxruntime against PyTorch.")
@click.option("--from-reference", is_flag=True,
              help="The checkpoints are the reference implementation's: the bundle computes its inference.")
@click.option("--reference-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --from-reference: the reference's config.yml (image_size, iterate_num, win_size, "
                   "sub_pixel_locating_factor, filter_type).")
@click.option("--steps", type=int, default=None, help="Filling propagation steps (default: as trained).")
@click.option("--class-threshold", type=float, default=None,
              help="Runtime default: a class is present when its score (logit) is at least this "
                   "[reference: -3; ours: 0].")
@click.option("--peak-threshold", type=float, default=None,
              help="Runtime default: use peaks with a value above this [reference: 30; ours: -inf].")
@click.option("--nms-iou", type=float, default=None,
              help="Runtime default: same-class masks overlapping more than this are dropped; above 1: off "
                   "[reference: off; ours: 0.5].")
@click.option("--filling-normalization", type=click.Choice(["running", "batch"]), default=None,
              help="BatchNorm of the filling network at inference: running statistics, or the statistics of "
                   "each image's peaks together [reference: batch; ours: running].")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def export_onnx(prm, filling, out, image_size, opset, max_peaks, precision, calib_images, int8_activations,
                int8_calibration, int8_percentile, calib_count,
                verify, from_reference, reference_config,
                steps, class_threshold, peak_threshold, nms_iou, filling_normalization, force) -> None:
    """Write an ONNX bundle (detect + segment graphs, manifest) and verify it."""
    from iam_runtime.bundle import describe_semantics
    from iam_train.checkpoint import CheckpointFileError
    from iam_train.models import CheckpointError

    from .export_onnx import ExportError, export_bundle, options_from

    options = options_from(image_size=image_size, opset=opset, max_peaks=max_peaks, precision=precision,
                           calib_images=calib_images, int8_activations=int8_activations,
                           int8_calibration=int8_calibration, int8_percentile=int8_percentile, calib_count=calib_count,
                           verify=verify,
                           from_reference=from_reference, reference_config=reference_config, steps=steps,
                           class_threshold=class_threshold, peak_threshold=peak_threshold, nms_iou=nms_iou,
                           filling_normalization=filling_normalization, force=force)
    try:
        manifest = export_bundle(prm, filling, out, options, log=click.echo)
    except (ExportError, CheckpointError, CheckpointFileError, FileNotFoundError, PermissionError) as exc:
        raise click.ClickException(str(exc)) from exc
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    click.echo(f"wrote {out} ({size:.0f} MiB, {len(manifest.classes)} classes, "
               f"{manifest.input.size[0]}x{manifest.input.size[1]}, {manifest.graphs['detect'].precision}) in "
               f"{manifest.verification['export_seconds']:.0f} s")
    click.echo(describe_semantics(manifest))


@main.command("tensorrt")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--fp16", is_flag=True, help="TensorRT 10 FP16 flag (on 11 export a --precision fp16 bundle instead).")
@click.option("--workspace", "workspace_gb", default=4.0, show_default=True, help="Builder workspace in GB.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--max-batch", default=16, show_default=True)
@click.option("--max-segment-peaks", default=64, show_default=True,
              help="Largest number of peaks the segment engine takes in one call (its optimisation profile).")
def export_tensorrt(bundle, fp16, workspace_gb, timing_cache, max_batch, max_segment_peaks) -> None:
    """Build TensorRT engines for BUNDLE's graphs on this machine's GPU (int8 engines from an int8
    bundle: iam-export onnx --precision int8 --calib-images DIR)."""
    from iam_runtime.bundle import BundleError

    from .tensorrt_build import BuildOptions, TensorRTUnavailable, build_bundle_engines

    options = BuildOptions(fp16=fp16, workspace_gb=workspace_gb, timing_cache=timing_cache,
                           max_batch=max_batch, opt_batch=min(8, max_batch), max_segment_peaks=max_segment_peaks,
                           opt_segment_peaks=min(8, max_segment_peaks))
    try:
        engines = build_bundle_engines(bundle, options, log=click.echo)
    except (TensorRTUnavailable, BundleError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    for e in engines:
        click.echo(f"{e.graph}: {e.file} ({e.precision}, {e.gpu}, TensorRT {e.tensorrt_version})")


@main.command("crf")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Write the graph again where the bundle has one.")
def export_crf(bundle, force) -> None:
    """Add the dense CRF graph (iam-infer --crf-backend graph) to BUNDLE, made before it existed.
    Without it the runtime builds the graph in memory at each start."""
    from iam_runtime.bundle import BundleError

    from .crf import add_crf_graph

    try:
        manifest = add_crf_graph(bundle, force)
    except (BundleError, FileExistsError, PermissionError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {bundle / manifest.graphs['crf'].file} ({manifest.crf.iterations} mean-field iterations)")


if __name__ == "__main__":
    main()

"""``iam-train``: synthetic data, proposals and the two training stages."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from .config import FillingTrainConfig, PRMTrainConfig, load_config
from .data.synthetic import SynthConfig, generate

_USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError, RuntimeError)


def _run(fn, *args, **kwargs):
    """Turn the errors a user can fix into one clear line instead of a traceback."""
    try:
        return fn(*args, **kwargs)
    except _USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train Instance Activation Maps from image-level labels (VOC layout)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--images", default=SynthConfig.images, show_default=True, help="Number of images.")
@click.option("--size", default=SynthConfig.size, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=SynthConfig.seed, show_default=True)
@click.option("--val-fraction", default=SynthConfig.val_fraction, show_default=True)
@click.option("--proposals", "proposals_per_image", default=SynthConfig.proposals_per_image, show_default=True)
def synth(out: Path, images: int, size: int, seed: int, val_fraction: float, proposals_per_image: int) -> None:
    """Write a synthetic VOC-layout dataset (shapes on textured backgrounds) to OUT."""
    if images < 1 or size < 32:
        raise click.BadParameter("need --images >= 1 and --size >= 32")
    config = SynthConfig(images=images, size=size, seed=seed, val_fraction=val_fraction,
                         proposals_per_image=proposals_per_image)
    generate(out, config)
    click.echo(f"wrote {images} images to {out}")


@main.command()
@click.argument("voc_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", default=None, help="Only the images of this split (default: all JPEGImages).")
@click.option("--limit", default=200, show_default=True, help="Proposals per image.")
@click.option("--overwrite", is_flag=True, help="Replace existing proposal files.")
def proposals(voc_dir: Path, split: str | None, limit: int, overwrite: bool) -> None:
    """Generate ImageProposals/<id>.json (graph-based segments) for a dataset without them."""
    from .data.generate_proposals import generate_for_dataset

    written, errors = _run(generate_for_dataset, voc_dir, split, limit, overwrite)
    for e in errors:
        click.echo(f"skipped {e}", err=True)
    click.echo(f"wrote {written} proposal files under {voc_dir / 'ImageProposals'}"
               + (f"; {len(errors)} images could not be read" if errors else ""))
    if errors:
        raise SystemExit(1)


def _common(f):
    options = [
        click.option("--data", type=click.Path(path_type=Path), default=None, help="VOC-layout dataset folder."),
        click.option("--split", default=None, help="Training split (ImageSets/Main/<split>.txt)."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run directory."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="YAML config; flags override it."),
        click.option("--epochs", type=int, default=None),
        click.option("--batch-size", type=int, default=None),
        click.option("--lr", type=float, default=None),
        click.option("--workers", type=int, default=None, help="Data loader processes."),
        click.option("--seed", type=int, default=None),
        click.option("--device", default=None, help="auto (default), cpu or cuda."),
        click.option("--bn-batches", "bn_recalibration_batches", type=int, default=None,
                     help="Batches for re-estimating BatchNorm statistics after each epoch (0: off)."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _resolve(cls, out: Path, resume: bool, config_file: Path | None, overrides: dict):
    """On --resume, the run's saved config is the base and only epochs/workers/device change."""
    if resume:
        saved = out / "config.yaml"
        if not saved.is_file():
            raise click.ClickException(f"--resume: {saved} not found")
        allowed = {k: overrides.get(k) for k in ("epochs", "workers", "device")}
        return _run(load_config, cls, saved, **allowed)
    config = _run(load_config, cls, config_file, **overrides)
    if not config.data:
        raise click.ClickException("--data is required (or 'data:' in --config)")
    return config


@main.command()
@_common
@click.option("--val-split", default=None, help="Split for classification mAP after each epoch.")
@click.option("--backbone", default=None, help="resnet18, resnet34, resnet50 (default) or resnet101.")
@click.option("--weights", default=None, help="Backbone init: 'imagenet' (torchvision) or a local file. Default: none.")
@click.option("--image-size", type=int, default=None)
@click.option("--backbone-lr-mult", type=float, default=None)
def prm(out, resume, config_file, no_progress, **flags) -> None:
    """Stage 1: train the classification/peak network."""
    from .train_prm import train_prm

    overrides = {k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()}
    config = _resolve(PRMTrainConfig, out, resume, config_file, overrides)
    summary = _run(train_prm, config, out, resume=resume, progress=not no_progress)
    if summary["rank"] != 0:  # under torchrun, rank 0 reports
        return
    click.echo(f"done: {summary.get('epoch', 0)} epochs in {out}; best {'val mAP' if config.val_split else '-loss'} "
               f"{summary['best_metric']:.4f}; checkpoints {out / 'best.pt'}, {out / 'last.pt'}")


@main.command()
@_common
@click.option("--prm", "prm_run", default=None, help="PRM run directory or checkpoint (stage 1).")
@click.option("--val-split", default=None, help="Split with SegmentationObject: instance IoU after each epoch.")
@click.option("--steps", type=int, default=None, help="Propagation steps T (reference 112).")
@click.option("--max-peaks-per-image", type=int, default=None)
@click.option("--optimizer", default=None, help="rmsprop (reference) or adam.")
def filling(out, resume, config_file, no_progress, prm_run, **flags) -> None:
    """Stage 2: train the instance extent filling network on proposal pseudo ground truth."""
    from .train_filling import train_filling

    overrides = {k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()}
    overrides["prm"] = prm_run
    config = _resolve(FillingTrainConfig, out, resume, config_file, overrides)
    if not config.prm:
        raise click.ClickException("--prm is required (the stage-1 run directory)")
    summary = _run(train_filling, config, out, resume=resume, progress=not no_progress)
    if summary["rank"] != 0:
        return
    click.echo(f"done: {summary.get('epoch', 0)} epochs in {out}; checkpoints {out / 'best.pt'}, {out / 'last.pt'}")


if __name__ == "__main__":
    main()

"""``iam-train``: synthetic data, proposals and the two training stages."""

from __future__ import annotations

from pathlib import Path

import click

from .data.synthetic import SynthConfig, generate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train Instance Activation Maps from image-level labels (VOC layout)."""


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
if __name__ == "__main__":
    main()

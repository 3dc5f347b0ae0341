from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when the folder is absent (a user's clone)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared test data only exists in the development checkout")
    return path


def randomise_batchnorm(model, generator=None) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.2, 0.2, generator=generator)


# ---------------------------------------------------------------------------------------------
# A small model trained on synthetic data, shared by the training, runtime and evaluation tests
# (trained once per session through the CLI, the way a user would).
# ---------------------------------------------------------------------------------------------

def _invoke(*args: str) -> None:
    from click.testing import CliRunner

    from iam_train.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    from iam_train.data.synthetic import SynthConfig, generate

    # 90 training and 30 held-out images of 128 px, trained at 224 (a 7x7 CRM; the reference
    # has 14x14 at 448) so that peaks can localise shapes of 20-45 px.
    return generate(tmp_path_factory.mktemp("synth"), SynthConfig(images=120, size=128, seed=0), progress=False)


@pytest.fixture(scope="session")
def prm_run(synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "prm"
    _invoke("prm", "--data", str(synthetic), "--split", "train", "--val-split", "val", "--out", str(out),
            "--backbone", "resnet18", "--image-size", "224", "--epochs", "6", "--batch-size", "16",
            "--backbone-lr-mult", "1.0", "--workers", "0", "--bn-batches", "4", "--no-progress")
    return out


@pytest.fixture(scope="session")
def filling_run(synthetic, prm_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    config = root / "filling.yaml"
    config.write_text("hidden: 16\nsteps: 28\noptimizer: adam\nmax_peaks_per_image: 2\nbatch_size: 4\n")
    out = root / "filling"
    _invoke("filling", "--data", str(synthetic), "--split", "train", "--val-split", "val", "--prm", str(prm_run),
            "--out", str(out), "--config", str(config), "--epochs", "3", "--lr", "0.01", "--workers", "0",
            "--bn-batches", "10", "--no-progress")
    return out


@pytest.fixture(scope="session")
def trained_bundle(prm_run, filling_run, tmp_path_factory):
    from iam_export.export_onnx import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "trained"
    export_bundle(prm_run, filling_run, out, ExportOptions(max_peaks=32), log=lambda *_: None)
    return out


def copy_val_images(synthetic, folder, count: int):
    """The first ``count`` held-out images of the synthetic dataset, copied into ``folder``."""
    import shutil

    for image_id in (synthetic / "ImageSets" / "Main" / "val.txt").read_text().split()[:count]:
        shutil.copy(synthetic / "JPEGImages" / f"{image_id}.jpg", folder / f"{image_id}.jpg")
    return folder

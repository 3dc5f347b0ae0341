"""Configs, checkpoints and bad input on the training side."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner

from iam_train.checkpoint import CheckpointFileError, load_checkpoint, save_checkpoint
from iam_train.cli import main
from iam_train.config import PRMTrainConfig, load_config
from iam_train.data.datasets import ClassificationDataset, FillingDataset
from iam_train.data.synthetic import SynthConfig, generate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("tiny"), SynthConfig(images=6, size=64, seed=3, proposals_per_image=8),
                    progress=False)


def test_config_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("backbone: resnet18\nepochs: 3\nlr: 0.5\n")
    config = load_config(PRMTrainConfig, path, epochs=7, lr=None)
    assert (config.backbone, config.epochs, config.lr, config.batch_size) == ("resnet18", 7, 0.5, 8)
    path.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="unknown PRMTrainConfig options: epochz"):
        load_config(PRMTrainConfig, path)


def test_reference_defaults():
    c = PRMTrainConfig()
    assert (c.lr, c.momentum, c.weight_decay, c.backbone_lr_mult, c.batch_size, c.image_size, c.flip) == (
        0.01, 0.9, 1e-4, 0.01, 8, 448, 0.5)


def test_checkpoint_atomic_kind_and_corruption(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, "iam-prm", {"model": {"w": torch.ones(2)}, "epoch": 1})
    assert load_checkpoint(path, "iam-prm")["epoch"] == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with pytest.raises(CheckpointFileError, match="is a iam-prm checkpoint, expected iam-filling"):
        load_checkpoint(path, "iam-filling")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointFileError, match="corrupt"):
        load_checkpoint(path, "iam-prm")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointFileError, match="not an iam training checkpoint"):
        load_checkpoint(foreign, "iam-prm")


def test_missing_and_unreadable_images_are_skipped_and_named(tiny, caplog, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny, root)
    ids = (root / "ImageSets" / "Main" / "train.txt").read_text().split()
    (root / "JPEGImages" / f"{ids[0]}.jpg").unlink()
    (root / "JPEGImages" / f"{ids[1]}.jpg").write_bytes(b"\xff\xd8 truncated")
    (root / "ImageProposals" / f"{ids[2]}.json").write_text("{not json")
    data = ClassificationDataset(root, "train", 64)
    assert data.skipped == [ids[0]] and len(data) == len(ids) - 1
    assert ids[0] in caplog.text
    assert data[0] is None and f"{ids[1]}.jpg" in caplog.text
    filling = FillingDataset(root, "train", 64)
    assert filling[1] is None and f"{ids[2]}.json" in caplog.text
    assert filling[2] is not None


def test_cli_errors_are_one_line_not_tracebacks(tiny, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["prm", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "dataset folder not found" in result.output and "Traceback" not in result.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    result = runner.invoke(main, ["prm", "--data", str(tiny), "--out", str(tmp_path / "busy")])
    assert result.exit_code == 1 and "already holds a run" in result.output
    result = runner.invoke(main, ["filling", "--data", str(tiny), "--out", str(tmp_path / "f"),
                                  "--prm", str(tmp_path / "none")])
    assert result.exit_code == 1 and "checkpoint not found" in result.output
    result = runner.invoke(main, ["prm", "--out", str(tmp_path / "r2"), "--resume"])
    assert result.exit_code == 1 and "--resume" in result.output

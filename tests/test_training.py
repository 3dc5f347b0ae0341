"""End-to-end training on synthetic data through the CLI: it learns, it resumes bit for bit,
and it runs under torchrun with gloo (issue 3)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from iam_train.checkpoint import load_checkpoint
from iam_train.cli import main
from iam_train.data.datasets import FillingDataset
from iam_train.data.synthetic import SynthConfig, generate
from iam_train.models import InstanceExtentFilling
from iam_train.train_filling import PeakTeacher, load_prm
from iam_train.validate import instance_quality

pytestmark = pytest.mark.slow


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_prm_learns_and_peaks_localise(prm_run, synthetic):
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.csv"):
        assert (prm_run / name).is_file(), name
    assert list((prm_run / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = load_checkpoint(prm_run / "last.pt", "iam-prm")
    assert ckpt["epoch"] == 6 and ckpt["classes"] == ["circle", "cross", "square", "triangle"]
    # Classification mAP on held-out images: chance is the positive rate (about 0.4 here).
    import csv

    rows = list(csv.DictReader((prm_run / "metrics.csv").open()))
    val_map = float(rows[-1]["val_mAP"])
    assert rows[-1]["val_skipped"] == "0"
    data = FillingDataset(synthetic, "val", 224)
    prevalence = float((data.labels == 1).mean())
    print(f"\nheld-out classification mAP {val_map:.3f} (chance about {prevalence:.3f})")
    assert val_map > 0.75 and val_map > prevalence + 0.3
    # Peaks of the trained network fall inside instances of their class far more often than chance.
    model, meta = load_prm(prm_run)
    quality = instance_quality(PeakTeacher(model, meta), None, data, peaks_per_image=2)
    print(f"peaks inside their instances {quality.peaks_inside:.2f} (chance {quality.chance_inside:.3f}); "
          f"PRM mean IoU {quality.prm_mean_iou:.3f}")
    assert quality.peaks_inside > 5 * quality.chance_inside and quality.peaks_inside > 0.3


def test_filling_maps_overlap_instances(prm_run, filling_run, synthetic):
    out = filling_run
    ckpt = load_checkpoint(out / "best.pt", "iam-filling")
    model, meta = load_prm(prm_run)
    f = ckpt["filling"]
    filling = InstanceExtentFilling.from_architecture(model.feature_channels, f)
    filling.load_state_dict(ckpt["model"])
    quality = instance_quality(PeakTeacher(model, meta), filling, FillingDataset(synthetic, "val", 224), 2)
    print(f"\ninstance activation maps: mean IoU {quality.mean_iou:.3f} over {quality.peaks} peaks "
          f"(thresholded PRMs {quality.prm_mean_iou:.3f})")
    assert quality.mean_iou > 0.4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("tiny"), SynthConfig(images=12, size=64, seed=1, proposals_per_image=10),
                    progress=False)



def _prm_args(data, out, epochs):
    # On the CPU: bit-exact resumption is a CPU guarantee (CUDA's atomic-add backward kernels vary
    # in their last bits from run to run).
    return ["prm", "--data", str(data), "--out", str(out), "--backbone", "resnet18", "--image-size", "64",
            "--batch-size", "4", "--workers", "0", "--bn-batches", "2", "--no-progress", "--epochs", str(epochs),
            "--backbone-lr-mult", "1.0", "--device", "cpu"]


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_prm_resume_is_bit_exact(tiny, tmp_path):
    invoke(*_prm_args(tiny, tmp_path / "straight", 2))
    invoke(*_prm_args(tiny, tmp_path / "stopped", 1))
    invoke("prm", "--out", str(tmp_path / "stopped"), "--resume", "--epochs", "2", "--no-progress", "--device", "cpu")
    a = load_checkpoint(tmp_path / "straight" / "last.pt", "iam-prm")
    b = load_checkpoint(tmp_path / "stopped" / "last.pt", "iam-prm")
    assert a["epoch"] == b["epoch"] == 2
    _same_state(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert len((tmp_path / "stopped" / "metrics.csv").read_text().splitlines()) == 3


def test_filling_resume_is_bit_exact(tiny, tmp_path):
    invoke(*_prm_args(tiny, tmp_path / "prm", 1))
    config = tmp_path / "f.yaml"
    config.write_text("hidden: 8\nsteps: 4\nmax_peaks_per_image: 2\nbatch_size: 4\nbn_recalibration_batches: 2\n")

    def run(out, epochs, *extra):
        invoke("filling", "--data", str(tiny), "--prm", str(tmp_path / "prm"), "--out", str(out), "--config",
               str(config), "--epochs", str(epochs), "--workers", "0", "--no-progress", "--device", "cpu", *extra)

    run(tmp_path / "straight", 2)
    run(tmp_path / "stopped", 1)
    invoke("filling", "--out", str(tmp_path / "stopped"), "--resume", "--epochs", "2", "--no-progress", "--device",
           "cpu")
    _same_state(load_checkpoint(tmp_path / "straight" / "last.pt", "iam-filling")["model"],
                load_checkpoint(tmp_path / "stopped" / "last.pt", "iam-filling")["model"])


def test_ddp_two_processes_gloo(tiny, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    out = tmp_path / "ddp"
    args = [*_prm_args(tiny, out, 1), "--val-split", "val"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "iam_train.cli", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt", "iam-prm")
    assert ckpt["epoch"] == 1
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    # one summary, from rank 0; the logged loss is the mean over both ranks' (equal) step counts
    assert proc.stdout.count("done:") == 1, proc.stdout
    import csv

    row = next(csv.DictReader((out / "metrics.csv").open()))
    ranks = [float(row["train_loss_rank0"]), float(row["train_loss_rank1"])]
    assert ranks[0] != ranks[1] and float(row["train_loss"]) == pytest.approx(np.mean(ranks), rel=1e-9)
    assert np.isfinite(float(row["val_mAP"])) and row["val_skipped"] == "0"
    assert ckpt["best_metric"] == pytest.approx(float(row["val_mAP"]))


def test_validation_leaves_out_an_unreadable_image_and_keeps_the_others_aligned(tiny, tmp_path):
    """A validation split with an unreadable image gives exactly the metric of the split
    without it (the training is deterministic, so only the alignment can differ)."""
    import csv

    corrupt, removed = tmp_path / "corrupt", tmp_path / "removed"
    shutil.copytree(tiny, corrupt)
    shutil.copytree(tiny, removed)
    val_ids = (tiny / "ImageSets" / "Main" / "val.txt").read_text().split()
    bad = val_ids[0]
    (corrupt / "JPEGImages" / f"{bad}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    for split_file in (removed / "ImageSets" / "Main").glob("*val.txt"):
        lines = [ln for ln in split_file.read_text().splitlines() if ln.split()[:1] != [bad]]
        split_file.write_text("\n".join(lines) + "\n")
    rows = []
    for data in (corrupt, removed):
        invoke(*_prm_args(data, tmp_path / f"run-{data.name}", 1), "--val-split", "val")
        rows.append(next(csv.DictReader((tmp_path / f"run-{data.name}" / "metrics.csv").open())))
    assert rows[0]["val_mAP"] == rows[1]["val_mAP"]
    assert (rows[0]["val_skipped"], rows[1]["val_skipped"]) == ("1", "0")

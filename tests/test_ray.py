"""iam-infer --ray on a local Ray (2 CPUs): the local pipeline's outputs, byte for byte, and its
summary's counts of capped images; bad images named; --resume after an interrupted run finishes
the rest. Ray starts once, here."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from iam_runtime.cli import main as infer_cli

from .conftest import copy_val_images

ray = pytest.importorskip("ray", reason="Ray Data is not installed (the 'ray' extra)")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(synthetic, tmp_path_factory):
    root = copy_val_images(synthetic, tmp_path_factory.mktemp("ray_images"), 5)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def infer(*args: str):
    result = CliRunner().invoke(infer_cli, [*args, "--no-progress", "--providers", "CPUExecutionProvider"])
    return result.exit_code, result.output


def test_ray_gives_the_local_outputs_and_names_bad_images(local_ray, trained_bundle, folder, tmp_path):
    code, output = infer(str(folder), "-o", str(tmp_path / "local"), "--bundle", str(trained_bundle),
                         "--crf-workers", "1")
    assert code == 1, output
    code, output = infer(str(folder), "-o", str(tmp_path / "ray"), "--bundle", str(trained_bundle), "--ray")
    assert code == 1, output  # one image failed, the others completed
    assert "broken.jpg" in output
    local = json.loads((tmp_path / "local" / "predictions.json").read_text())
    on_ray = json.loads((tmp_path / "ray" / "predictions.json").read_text())
    assert on_ray == local and len(local) >= 3  # masks (RLE), scores, classes: identical
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert (summary["completed"], summary["failed"]) == (5, 1)
    assert summary["errors"][0]["file"] == "broken.jpg" and summary["errors"][0]["stage"] == "decode"
    local_summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    # what the caps cut, counted as the local run counts it (this bundle's K outputs fill up on one image)
    assert summary["capped"] == local_summary["capped"] and sum(summary["capped"].values()) >= 1
    assert set(summary["busy"]) == {"engine", "refine"} and all(0 < v <= 1 for v in summary["busy"].values())
    for sub in ("instances", "classes", "records"):
        assert sorted(p.name for p in (tmp_path / "ray" / sub).iterdir()) == \
            sorted(p.name for p in (tmp_path / "local" / sub).iterdir())


def test_ray_resume_finishes_an_interrupted_run(local_ray, trained_bundle, folder, tmp_path):
    out = tmp_path / "out"
    infer(str(folder), "-o", str(out), "--bundle", str(trained_bundle), "--ray")
    full = (out / "predictions.json").read_text()
    # as an interrupted run leaves it: two images without their record, a partial file left over
    records = sorted((out / "records").iterdir())
    for record in records[:2]:
        record.unlink()
    (out / "instances" / ".half-written.png.123.tmp").write_bytes(b"partial")
    shutil.rmtree(out / "overlays")
    code, output = infer(str(folder), "-o", str(out), "--bundle", str(trained_bundle), "--ray", "--resume",
                         "--save", "masks,json")
    assert code == 1, output  # broken.jpg still fails
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_complete"] == 3 and summary["completed"] == 2
    assert not list(out.rglob("*.tmp"))
    assert json.loads((out / "predictions.json").read_text()) == json.loads(full)

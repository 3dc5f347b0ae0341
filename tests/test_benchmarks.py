"""Benchmark smoke test: a tiny model, one repetition; the JSON has every path with outputs.
No timing assertions (figures live in the benchmark's output, not in tests)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from benchmarks.latency import main


def test_latency_benchmark_smoke(tmp_path):
    result = CliRunner().invoke(main, [
        "--backbone", "resnet18", "--image-size", "128", "--peaks", "2", "--batch-sizes", "1,2", "--images", "3",
        "--reference-images", "2", "--steps", "2", "--hidden", "8", "--upsample", "4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "latency.json").read_text())
    assert report["config"]["distinct_images"] == 3 and "note:" not in result.output
    paths = report["paths"]
    for name in ("reference", "torch", "onnxruntime-cpu-b1", "onnxruntime-cpu-b2"):
        r = paths[name]
        assert set(r["stage_mean_s"]) == {"decode", "detect", "segment", "crf", "write"}
        assert r["end_to_end_per_image_s"] > 0 and r["images_per_s"] > 0 and r["speedup"] > 0
    assert paths["reference"]["speedup"] == 1.0
    for name in ("onnxruntime-cpu-b1", "onnxruntime-cpu-b2"):  # the overlap the pipeline got
        assert 0 < paths[name]["busy"]["engine"] <= 1 and 0 < paths[name]["busy"]["refine"] <= 1
    assert "Overlap of the iam-infer paths" in (tmp_path / "latency.md").read_text()
    for name in ("onnxruntime-cpu-b1", "onnxruntime-cpu-b2", "onnxruntime-cpu-b1-nocrf"):
        run_dir = tmp_path / "runs" / name
        # every image went through the pipeline (random weights may leave a mask empty after CRF)
        assert json.loads((run_dir / "summary.json").read_text())["completed"] == 3
        assert len(list((run_dir / "records").glob("*.json"))) == 3
        assert isinstance(json.loads((run_dir / "predictions.json").read_text()), list)
    # the calibrated random weights give masks to compare, so the agreement is not vacuous; the
    # runtime's default CRF is the reference's (full resolution), so its masks are the reference's
    agreement = report["agreement_onnxruntime_vs_reference"]
    assert agreement["reference_masks"] == 4 and agreement["reference_masks_nonempty"] >= 1
    assert agreement["mean_iou"] >= 0.98
    assert 0 <= report["agreement_onnxruntime_crf320_vs_reference"]["mean_iou"] <= 1
    assert "onnxruntime-cpu-b2-crf320" in paths
    assert {"speedup", "mean_iou_vs_full_resolution", "runtime_default_speedup"} <= set(report["crf"])
    # the CRF alone on object-shaped maps: the runtime at full resolution gives the reference's masks
    objects = report["crf"]["object_maps"]
    assert objects["instances"] >= 1
    assert objects["runtime_full_resolution"]["mean_iou"] == 1.0
    assert 0 <= objects["runtime_max_side_320_coarse_only"]["mean_iou"] <= 1
    assert report["flops"]["detect_per_image"] > 0 and report["flops"]["segment_per_image"] > 0
    assert (tmp_path / "latency.md").read_text().count("|") > 20
    assert (tmp_path / "latency.png").stat().st_size > 1000


def test_photos_come_from_an_option_or_the_environment(tmp_path, monkeypatch):
    import numpy as np
    import pytest
    from PIL import Image

    from benchmarks.latency.photos import PHOTOS_ENV, demo_photos, distinct_photos

    extra = tmp_path / "mine"
    extra.mkdir()
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(extra / "flat.png")
    paths = demo_photos(tmp_path / "a", 6, 64, extra)  # five of scikit-image's, then ours
    assert len(paths) == 6 and Image.open(paths[5]).size == (60, 40)
    assert distinct_photos(paths) == 6
    assert distinct_photos(demo_photos(tmp_path / "d", 8, 64, extra)) == 6  # cycled past the six
    monkeypatch.setenv(PHOTOS_ENV, str(extra))
    assert Image.open(demo_photos(tmp_path / "b", 6, 64)[5]).size == (60, 40)
    monkeypatch.setenv(PHOTOS_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="photo folder not found"):
        demo_photos(tmp_path / "c", 2, 64)

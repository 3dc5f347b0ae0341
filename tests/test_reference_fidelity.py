"""Reference fidelity (docs/reference.md): checkpoints in the reference's format, exported with
--from-reference, give the reference's instances and masks in iam-infer.

The checkpoints are made here, as a new user's would look: ResNet-50 with random weights and one
live class (the other classes' classifier biases about 1000 logits lower), and a random filling
network. The yardstick is an oracle of the reference's inference written from our PyTorch modules
in their reference form (docs/method.md, section 7): one autograd backward per peak with the modified
conv rule, every valid peak (class score >= -3, value > 30) in nonzero order, the filling network
on batch statistics with all of an image's peaks together, a dense CRF per peak in the input
frame."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as mask_utils

from iam_export.cli import main as export_cli
from iam_runtime.bundle import CRFSpec, load_bundle
from iam_runtime.cli import main as infer_cli
from iam_runtime.images import decode_image, preprocess, resize_rgb
from iam_runtime.peaks import peak_input_coordinates
from iam_runtime.pipeline import InferOptions, run
from iam_runtime.refine import dense_crf
from iam_train.models import (
    InstanceExtentFilling,
    ResNetFCN,
    find_peaks,
    load_reference_filling,
    load_reference_prm,
)
from iam_train.models.peak_backprop import reference_peak_response_maps
from iam_train.models.peaks import peak_stimulated_scores

from .conftest import randomise_batchnorm

pytestmark = pytest.mark.slow

SIZE = 64  # the reference's config.yml sets image_size; small here to keep the test quick
STEPS = 8
LIVE = 9  # "cow"


def reference_format_state(model: torch.nn.Module) -> dict:
    """Our ResNetFCN keys -> the reference's released PRM layout (``0.res_block1..5``,
    ``0.classifier.0``), the inverse of ``convert_prm_keys``."""
    out = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"^stem\.", "res_block1.", key)
        key = re.sub(r"^layer([1-4])\.", lambda m: f"res_block{int(m.group(1)) + 1}.", key)
        key = re.sub(r"^classifier\.", "classifier.0.", key)
        out[f"0.{key}"] = value
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos (scikit-image's), stored at the network's input size so that the input frame
    is the photo's frame and masks compare pixel for pixel."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR).save(
            folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def checkpoints(photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    backbone = ResNetFCN("resnet50", num_classes=20).eval()
    randomise_batchnorm(backbone, g)
    images = torch.from_numpy(np.stack([preprocess(decode_image(p), (SIZE, SIZE), (0.485, 0.456, 0.406),
                                                   (0.229, 0.224, 0.225)) for p in sorted(photos.iterdir())]))
    with torch.no_grad():
        backbone.classifier.bias.fill_(-1000.0)
        backbone.classifier.bias[LIVE] = 0.0
        raw = backbone(images).crm[:, LIVE]
        backbone.classifier.bias[LIVE] = 30.0 - torch.quantile(raw.flatten(), 0.7)  # some peaks above 30
    torch.save({"arch": "iam", "lr": 0.01, "epoch": 20, "state_dict": reference_format_state(backbone), "error": 0.0},
               root / "model_prm_latest.pth.tar")
    filling = InstanceExtentFilling().eval()
    randomise_batchnorm(filling, g)
    torch.save({"arch": "iam", "lr": 0.01, "epoch": 20, "state_dict": filling.state_dict(), "error": 0.0},
               root / "model_filling_latest.pth.tar")
    (root / "config.yml").write_text(
        f"class_num: 20\nimage_size: {SIZE}\niterate_num: {STEPS}\nsub_iterate_num: 4\n"
        "model:\n  win_size: 3\n  sub_pixel_locating_factor: 8\n  enable_peak_stimulation: true\n"
        "  filter_type: median\noptimizer:\n  lr: 0.001\n")
    return root


@pytest.fixture(scope="module")
def reference_bundle(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "reference"
    result = CliRunner().invoke(export_cli, [
        "onnx", "--from-reference", "--prm", str(checkpoints / "model_prm_latest.pth.tar"),
        "--filling", str(checkpoints / "model_filling_latest.pth.tar"),
        "--reference-config", str(checkpoints / "config.yml"), "--out", str(out)])
    assert result.exit_code == 0, result.output  # verification on, and it passes
    assert "reference semantics" in result.output
    return out


def oracle(checkpoints, photo) -> list[tuple[int, int, int, np.ndarray]]:
    """The reference's inference on one photo: (class, y, x, mask) per valid peak, nonzero order."""
    backbone = load_reference_prm(checkpoints / "model_prm_latest.pth.tar")
    filling = load_reference_filling(checkpoints / "model_filling_latest.pth.tar", steps=STEPS)
    rgb = decode_image(photo)
    image = torch.from_numpy(preprocess(rgb, (SIZE, SIZE), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))[None]
    with torch.no_grad():
        out = backbone(image)
        found = find_peaks(out.crm, 3, "median", 0.0, 8, max_peaks=10_000)
        scores = peak_stimulated_scores(out.crm, found.peak_map, 8)[0]
        maps = torch.nn.functional.interpolate(out.crm, scale_factor=8, mode="bilinear", align_corners=True)[0]
    peaks = [(c, y, x) for c, y, x in torch.nonzero(found.peak_map[0]).tolist()
             if scores[c] >= -3 and maps[c, y, x] > 30]
    if not peaks:
        return []
    prm = reference_peak_response_maps(backbone, image, torch.tensor(peaks), 8)
    with torch.no_grad():
        iam = filling(prm, filling.affinity_kernels(out.c2, out.c3, out.c4)).numpy()
    frame = resize_rgb(rgb, (SIZE, SIZE))
    return [(c, y, x, dense_crf(frame, m, CRFSpec())) for (c, y, x), m in zip(peaks, iam)]


def test_reference_export_carries_the_reference_semantics(reference_bundle):
    m = load_bundle(reference_bundle).manifest
    assert m.producer["source"] == "reference" and m.input.size == [SIZE, SIZE] and m.filling.steps == STEPS
    assert (m.peaks.class_threshold, m.peaks.peak_threshold, m.peaks.nms_iou) == (-3.0, 30.0, None)
    assert (m.peaks.threshold_mode, m.peaks.upsample_factor, m.peaks.win_size) == ("median", 8, 3)
    assert (m.filling.normalization, m.filling.align_corners, m.crf.frame) == ("batch", True, "input")
    assert m.verification["passed"]


def test_iam_infer_gives_the_reference_instances_and_masks(reference_bundle, checkpoints, photos, tmp_path):
    result = CliRunner().invoke(infer_cli, [str(photos), "-o", str(tmp_path / "out"), "--bundle",
                                            str(reference_bundle), "--no-progress", "--crf-workers", "1"])
    assert result.exit_code == 0, result.output
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    m = load_bundle(reference_bundle).manifest
    total, ious = 0, []
    for photo in sorted(photos.iterdir()):
        want = oracle(checkpoints, photo)
        got = [p for p in predictions if p["file_name"] == photo.name]
        total += len(want)
        assert len(got) == len(want), photo.name  # every valid peak, duplicates included
        by_peak = {(p["category_id"] - 1, *p["peak"]): p for p in got}
        for c, y, x, mask in want:
            py, px = peak_input_coordinates(np.array([c, y, x]), (SIZE // 32, SIZE // 32), 8, 32)
            ours = mask_utils.decode(by_peak[(c, int(py), int(px))]["segmentation"]).astype(bool)
            ious.append((ours & mask).sum() / max((ours | mask).sum(), 1))
    print(f"\n{total} instances, mask IoU vs the oracle: mean {np.mean(ious):.4f}, min {min(ious):.4f}")
    assert total >= 4, "the live class found too few valid peaks for the test to mean anything"
    assert np.mean(ious) >= 0.95 and min(ious) >= 0.8, ious
    assert m.peaks.nms_iou is None


def test_batch_statistics_bundle_segments_all_peaks_of_an_image_at_once(reference_bundle, photos, tmp_path):
    """--peak-chunk does not split an image's peaks for a batch-statistics bundle: outputs are
    byte-identical whatever the chunk."""
    from iam_runtime.backends import OnnxRuntimeBackend

    bundle = load_bundle(reference_bundle)
    backend = OnnxRuntimeBackend(bundle, ["CPUExecutionProvider"])
    outs = []
    for chunk in (1, 8):
        out = tmp_path / f"chunk{chunk}"
        run(bundle, backend, photos, out, InferOptions(peak_chunk=chunk, crf_workers=1, progress=False,
                                                       save=("masks", "json")))
        outs.append(json.loads((out / "predictions.json").read_text()))
    assert outs[0] == outs[1] and len(outs[0]) >= 4
    # a cap that cuts valid peaks is counted in the summary (and said once, naming the images)
    summary = run(bundle, backend, photos, tmp_path / "capped", InferOptions(max_instances=1, crf_workers=1,
                                                                           progress=False, save=("json",)))
    per_image = max(sum(p["file_name"] == name for p in outs[0]) for name in {p["file_name"] for p in outs[0]})
    assert per_image > 1 and summary.capped["max_instances"] >= 1 and summary.capped["detect_outputs_full"] == 0
    assert summary.instances == len({p["file_name"] for p in outs[0]})

"""The synthetic generator writes the VOC layout that our readers parse back exactly."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from iam_runtime.voc import voc_palette
from iam_train.data.proposals import ProposalError, decode_mask, encode_mask, read_proposals
from iam_train.data.synthetic import SYNTH_CLASSES, SynthConfig, generate, image_labels, render_image
from iam_train.data.voc import DatasetError, VOCLayout

from .conftest import shared_path

CONFIG = SynthConfig(images=8, size=96, seed=5, proposals_per_image=20)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth"), CONFIG, progress=False)


def test_layout_files_exist(dataset):
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject", "ImageProposals"):
        assert len(list((dataset / sub).iterdir())) == 8, sub
    for split in ("train", "val", "trainval"):
        assert (dataset / "ImageSets" / "Segmentation" / f"{split}.txt").is_file()
    png = Image.open(dataset / "SegmentationObject" / "synth_000000.png")
    assert png.mode == "P" and np.array_equal(np.asarray(png.getpalette(), np.uint8).reshape(-1, 3), voc_palette())


def test_round_trip_labels_instances_and_proposals(dataset):
    voc = VOCLayout(dataset)
    assert voc.classes == SYNTH_CLASSES
    assert len(voc.image_ids("train")) == 6 and len(voc.image_ids("val")) == 2
    labels = voc.labels("trainval")
    for index, image_id in enumerate(voc.image_ids("trainval")):
        truth = render_image(CONFIG, index)
        expected = image_labels(truth.instances)
        assert labels[image_id].tolist() == [expected[c] for c in SYNTH_CLASSES]
        inst = voc.instances(image_id)
        assert len(inst.masks) == len(truth.instances)
        for mask, cls, (name, true_mask, _) in zip(inst.masks, inst.classes, truth.instances):
            assert SYNTH_CLASSES[cls] == name
            # instance pixels = the true shape minus the 255 boundary band
            assert np.array_equal(mask, true_mask & ~inst.ignore)
        proposals = voc.proposals(image_id)
        assert len(proposals) == len(truth.proposals)
        assert all(np.array_equal(a, b) for a, b in zip(proposals, truth.proposals))
        # the true segments are among the proposals, not necessarily first
        for _, true_mask, _ in truth.instances:
            assert any(np.array_equal(p, true_mask) for p in proposals)


def test_deterministic_for_a_seed(tmp_path):
    small = SynthConfig(images=3, size=64, seed=11)
    a = generate(tmp_path / "a", small, progress=False)
    b = generate(tmp_path / "b", small, progress=False)
    c = generate(tmp_path / "c", SynthConfig(images=3, size=64, seed=12), progress=False)

    def digest(root):
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())).hexdigest()

    assert digest(a) == digest(b) != digest(c)


def test_some_labels_are_difficult_over_a_larger_set():
    config = SynthConfig(images=60, size=96, seed=0, min_scale=0.08)
    labels = [image_labels(render_image(config, i).instances) for i in range(config.images)]
    values = {v for row in labels for v in row.values()}
    assert values == {-1, 0, 1}


def test_proposal_codec_edge_cases():
    for mask in (np.zeros((3, 4), bool), np.ones((3, 4), bool), np.eye(5, dtype=bool)):
        assert np.array_equal(decode_mask(encode_mask(mask)), mask)
    with pytest.raises(ValueError, match="outside"):
        decode_mask({"shape": [2, 2], "data": encode_mask(np.ones((3, 3), bool))["data"]})


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        VOCLayout(tmp_path / "nope")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"shape": [2, 2], "data": "!!!"}]')
    with pytest.raises(ProposalError, match="bad.json"):
        read_proposals(bad)


def test_real_voc_sample_mcg_proposals_round_trip():
    import json

    root = shared_path("voc-sample")
    voc = VOCLayout(root)
    assert len(voc.classes) == 20
    labels = voc.labels("trainval")
    assert voc.classes[int(np.flatnonzero(labels["sample0"] == 1)[0])] == "cow"
    for image_id in voc.image_ids("trainval"):
        entries = json.loads(voc.proposals_path(image_id).read_text())
        masks = voc.proposals(image_id)
        size = Image.open(voc.image_path(image_id)).size
        assert len(masks) == 200 and masks[0].shape == (size[1], size[0])
        assert all(encode_mask(m) == e for m, e in zip(masks, entries))

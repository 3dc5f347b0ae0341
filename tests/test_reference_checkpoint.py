"""Reference checkpoints: a state dict with the reference layout loads, and our model computes
what the reference architecture computes with those weights (an independent functional forward
written here from the layout)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from iam_export.filling_graph import filling_forward
from iam_train.models import CheckpointError, load_reference_filling, load_reference_prm
from iam_train.models.filling import normalise_kernels

from .conftest import shared_path


def random_state(layout: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(".weight") and len(shape) == 1:  # BatchNorm gamma
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=g) / fan_in**0.5
    return state


def bn(x, s, p, batch_stats=False):
    """Eval-mode BatchNorm, or (``batch_stats``) the reference's filling inference: train mode
    with momentum 0, normalising with the statistics of the batch."""
    running = (None, None) if batch_stats else (s[p + ".running_mean"], s[p + ".running_var"])
    return F.batch_norm(x, *running, s[p + ".weight"], s[p + ".bias"], batch_stats, 0.0, 1e-5)


def reference_prm_forward(s: dict, x: torch.Tensor):
    """ResNet-50 FCN written from the reference key layout."""
    x = F.relu(bn(F.conv2d(x, s["0.res_block1.0.weight"], stride=2, padding=3), s, "0.res_block1.1"))
    x = F.max_pool2d(x, 3, 2, 1)
    feats = []
    for block_idx, first_stride in zip(range(2, 6), (1, 2, 2, 2)):
        i = 0
        while f"0.res_block{block_idx}.{i}.conv1.weight" in s:
            p = f"0.res_block{block_idx}.{i}"
            stride = first_stride if i == 0 else 1
            out = F.relu(bn(F.conv2d(x, s[p + ".conv1.weight"]), s, p + ".bn1"))
            out = F.relu(bn(F.conv2d(out, s[p + ".conv2.weight"], stride=stride, padding=1), s, p + ".bn2"))
            out = bn(F.conv2d(out, s[p + ".conv3.weight"]), s, p + ".bn3")
            short = bn(F.conv2d(x, s[p + ".downsample.0.weight"], stride=stride), s, p + ".downsample.1") if i == 0 else x
            x = F.relu(out + short)
            i += 1
        feats.append(x)
    crm = F.conv2d(x, s["0.classifier.0.weight"], s["0.classifier.0.bias"])
    return crm, feats[:3]


def reference_filling_forward(s: dict, prm, c2, c3, c4, steps, batch_stats=True, align_corners=True):
    """The reference's filling inference written from its code (docs/method.md, section 7): every
    BatchNorm on batch statistics (the kernel branch over the image, the encoder and decoder
    over all the peaks), pyramid upsampling with align_corners=True, the unfold propagation."""
    def cbn(x, p, padding):
        return bn(F.conv2d(x, s[p + ".0.weight"], s[p + ".0.bias"], padding=padding), s, p + ".1", batch_stats)

    up = lambda a, b: F.interpolate(a, size=b.shape[-2:], mode="bilinear", align_corners=align_corners) + b  # noqa: E731
    p4 = F.conv2d(c4, s["feature_pyramid.toplayer.weight"], s["feature_pyramid.toplayer.bias"])
    p3 = cbn(up(p4, cbn(c3, "feature_pyramid.latlayer3", 0)), "feature_pyramid.smooth3", 1)
    p2 = F.relu(cbn(up(p3, cbn(c2, "feature_pyramid.latlayer2", 0)), "feature_pyramid.smooth2", 1))
    n, _, h, w = p2.shape
    weight = normalise_kernels(p2, 16)
    x = prm.unsqueeze(1)
    for name in ("encode.encode1", "encode.encode2"):
        x = F.max_pool2d(F.relu(cbn(x, name, 1)), 2)
    unfold_w = weight.view(1, 144, h * w)
    for _ in range(steps):  # the reference's unfold formulation
        cols = F.unfold(x, 3, padding=1) * unfold_w
        x = cols.view(x.shape[0], 16, 9, h, w).sum(2)

    def dbn(x, p):
        return bn(F.conv_transpose2d(x, s[p + ".0.weight"], s[p + ".0.bias"], padding=1), s, p + ".1", batch_stats)

    x = F.relu(dbn(x, "decode.decode1"))
    x = F.relu(dbn(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True), "decode.decode2"))
    x = torch.sigmoid(dbn(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True), "decode.decode3"))
    return x.squeeze(1)


@pytest.fixture(scope="module")
def layout():
    return json.loads(shared_path("reference-checkpoint-layout.json").read_text())


def test_prm_checkpoint_loads_and_matches_reference_forward(layout):
    state = random_state(layout["prm"], 0)
    model = load_reference_prm({"arch": "resnet50", "epoch": 20, "state_dict": state})
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        out = model(x)
        crm, (c2, c3, c4) = reference_prm_forward(state, x)
    assert out.crm.shape == (1, 20, 3, 3)
    torch.testing.assert_close(out.crm, crm, rtol=1e-4, atol=1e-4)
    for ours, ref in zip((out.c2, out.c3, out.c4), (c2, c3, c4)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_filling_checkpoint_loads_and_matches_reference_forward(layout):
    state = random_state(layout["filling"], 1)
    model = load_reference_filling({"state_dict": state}, steps=6)
    assert model.normalization == "batch" and model.align_corners
    g = torch.Generator().manual_seed(2)
    c2, c3, c4 = (torch.randn(1, c, s, s, generator=g) for c, s in ((256, 16), (512, 8), (1024, 4)))
    prm = torch.rand(3, 64, 64, generator=g)
    prm = prm / prm.sum(dim=(1, 2), keepdim=True)  # as peak response maps: each sums to 1
    with torch.no_grad():
        ours = model(prm, model.affinity_kernels(c2, c3, c4))
        ref = reference_filling_forward(state, prm, c2, c3, c4, steps=6)
        # the departure, on request: running statistics and our old align_corners=False
        model.normalization = "running"
        model.feature_pyramid.align_corners = False
        running = model(prm, model.affinity_kernels(c2, c3, c4))
        ref_running = reference_filling_forward(state, prm, c2, c3, c4, steps=6, batch_stats=False, align_corners=False)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(running, ref_running, rtol=1e-5, atol=1e-5)
    # with batch statistics, a peak's map depends on the image's other peaks (as in the reference)
    assert (ours[:1] - model.eval()(prm[:1], model.affinity_kernels(c2, c3, c4))).abs().max() > 1e-3


def test_filling_reproduces_the_reference_module_on_its_own_outputs():
    """The reference's own filling module, run by its own code on fixed inputs
    (shared/data/reference-filling): our network loaded from the same checkpoint gives its maps."""
    import numpy as np

    folder = shared_path("reference-filling")
    data = np.load(folder / "filling_case.npz")
    cases = json.loads((folder / "filling_case.json").read_text())
    model = load_reference_filling(folder / "model_filling_latest.pth.tar")
    feats = [torch.from_numpy(data[k].astype(np.float32) / cases["feature_scale"]) for k in ("p2", "p3", "p4")]
    with torch.no_grad():
        kernels = model.affinity_kernels(*feats)
        for name, case in cases["cases"].items():
            prms = torch.from_numpy(data[f"{name}_prms"].astype(np.float32))
            assert len(case["peak_list"]) == len(prms)
            got = model(prms, kernels).numpy()
            # float32 over 112 steps and batch statistics: 5e-4 to 9e-4 measured (the module run
            # with running statistics or align_corners=False differs by 0.7 to 1.0)
            np.testing.assert_allclose(got, data[f"{name}_iam"], atol=3e-3, rtol=0)
            # the export form: within 5e-5 of the network (7.5e-6 measured), as close to the reference
            exported = filling_forward(model, prms, kernels).numpy()  # the segment graph's form
            np.testing.assert_allclose(exported, got, atol=5e-5, rtol=0)
            np.testing.assert_allclose(exported, data[f"{name}_iam"], atol=3e-3, rtol=0)


def test_wrong_or_missing_keys_are_named(layout):
    state = random_state(layout["prm"], 0)
    state["0.res_block9.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unknown keys \['0\.res_block9\.extra\.weight'\]"):
        load_reference_prm(state)
    state = random_state(layout["filling"], 0)
    del state["decode.decode3.1.running_var"]
    with pytest.raises(CheckpointError, match="decode.decode3.1.running_var"):
        load_reference_filling(state)


def test_wrong_shape_and_unreadable_file_are_clear_errors(layout, tmp_path):
    state = random_state(layout["prm"], 0)
    state["0.res_block2.0.conv1.weight"] = torch.zeros(64, 64, 3, 3)
    with pytest.raises(CheckpointError, match="layer1.0.conv1.weight"):
        load_reference_prm(state)
    bad = tmp_path / "model_prm_latest.pth.tar"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_reference_prm(bad)


def test_reference_config_is_read(tmp_path):
    from iam_train.models import ReferenceSettings, read_reference_config

    path = tmp_path / "config.yml"
    path.write_text("class_num: 20\nimage_size: 320\niterate_num: 64\nsub_iterate_num: 16\n"
                    "model:\n  win_size: 5\n  sub_pixel_locating_factor: 4\n  enable_peak_stimulation: true\n"
                    "  filter_type: mean\noptimizer:\n  lr: 0.001\n")
    s = read_reference_config(path)
    assert (s.image_size, s.iterate_num, s.win_size, s.sub_pixel_locating_factor, s.threshold) == (
        320, 64, 5, 4, ("mean", 0.0))
    path.write_text("image_size: [448, 448]\nmodel:\n  filter_type: 2.5\n")
    s = read_reference_config(path)
    assert (s.image_size, s.iterate_num, s.threshold) == (448, ReferenceSettings.iterate_num, ("constant", 2.5))
    path.write_text("model:\n  win_size: 4\n")
    with pytest.raises(CheckpointError, match="win_size must be odd"):
        read_reference_config(path)
    path.write_text("model:\n  filter_type: mode\n")
    with pytest.raises(CheckpointError, match="filter_type 'mode'"):
        read_reference_config(path)

"""Instance extent filling: iam::propagate_affinity against a direct loop (docs/method.md, section 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iam_train.models.filling import InstanceExtentFilling, normalise_kernels, propagate_affinity

from .conftest import randomise_batchnorm


def loop_propagation(x: np.ndarray, kernels: np.ndarray, steps: int) -> np.ndarray:
    """x(p) <- sum_{q in kxk(p)} w_p(q) x(q), written pixel by pixel."""
    n, d, h, w = x.shape
    k = int(round((kernels.shape[1] / d) ** 0.5))
    r = k // 2
    wk = kernels.reshape(kernels.shape[0], d, k, k, h, w)
    for _ in range(steps):
        new = np.zeros_like(x)
        for b in range(n):
            kb = wk[b if wk.shape[0] > 1 else 0]
            for c in range(d):
                for y in range(h):
                    for xx in range(w):
                        acc = 0.0
                        for i in range(k):
                            for j in range(k):
                                qy, qx = y + i - r, xx + j - r
                                if 0 <= qy < h and 0 <= qx < w:
                                    acc += kb[c, i, j, y, xx] * x[b, c, qy, qx]
                        new[b, c, y, xx] = acc
        x = new
    return x


def test_propagation_matches_loop_with_shared_and_per_item_kernels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 6, 7, generator=g, dtype=torch.float64)
    for batch in (1, 3):
        kernels = normalise_kernels(torch.rand(batch, 2 * 9, 6, 7, generator=g, dtype=torch.float64), 2)
        out = propagate_affinity(x, kernels, steps=4)
        np.testing.assert_allclose(out.numpy(), loop_propagation(x.numpy(), kernels.numpy(), 4), rtol=1e-12)


def test_propagation_kernel_5():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 5, 5, generator=g, dtype=torch.float64)
    kernels = normalise_kernels(torch.rand(1, 25, 5, 5, generator=g, dtype=torch.float64), 1)
    np.testing.assert_allclose(
        propagate_affinity(x, kernels, 2).numpy(), loop_propagation(x.numpy(), kernels.numpy(), 2), rtol=1e-12
    )


def test_propagation_gradient():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    kernels = normalise_kernels(torch.rand(1, 18, 4, 4, generator=g, dtype=torch.float64), 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: propagate_affinity(a, b, 3), (x, kernels))


def test_kernel_normalisation_sums_to_one_and_zero_sum_stays_zero():
    raw = torch.rand(1, 2 * 9, 3, 3)
    raw[0, :9, 1, 1] = 0  # one all-zero kernel
    kernels = normalise_kernels(raw, 2).view(1, 2, 9, 3, 3).sum(2)
    expected = torch.ones(1, 2, 3, 3)
    expected[0, 0, 1, 1] = 0
    torch.testing.assert_close(kernels, expected)


def test_filling_shapes_range_and_running_stats_at_inference():
    torch.manual_seed(0)
    net = InstanceExtentFilling(feature_channels=(64, 128, 256), steps=8).eval()
    randomise_batchnorm(net)
    c2, c3, c4 = torch.randn(1, 64, 16, 16), torch.randn(1, 128, 8, 8), torch.randn(1, 256, 4, 4)
    kernels = net.affinity_kernels(c2, c3, c4)
    assert kernels.shape == (1, 144, 16, 16)
    prm = torch.rand(4, 64, 64)
    with torch.no_grad():
        iam = net(prm, kernels)
        alone = net(prm[:1], kernels)
    assert iam.shape == (4, 64, 64) and iam.min() >= 0 and iam.max() <= 1
    # Running statistics: an instance's map does not depend on the other peaks in the batch.
    torch.testing.assert_close(iam[:1], alone)


def test_pyramid_upsampling_follows_align_corners():
    """The reference's pyramid: F.interpolate(..., align_corners=True), checked against the
    align_corners interpolation matrices (corners kept); False (our older checkpoints) differs."""
    from iam_train.models.filling import FeaturePyramid
    from iam_train.models.peak_backprop import interpolation_matrix

    top = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    lateral = torch.zeros(1, 3, 7, 9, dtype=torch.float64)
    pyramid = FeaturePyramid((8, 8, 8), 9, width=3, align_corners=True)
    got = pyramid._upsample_add(top, lateral)
    rows, cols = interpolation_matrix(7, 4, torch.float64), interpolation_matrix(9, 5, torch.float64)
    torch.testing.assert_close(got, rows @ top @ cols.T)
    torch.testing.assert_close(got[..., [0, -1], :][..., [0, -1]], top[..., [0, -1], :][..., [0, -1]])
    pyramid.align_corners = False
    assert not torch.allclose(pyramid._upsample_add(top, lateral), got)


def test_checkpoint_architecture_round_trips_and_old_records_keep_their_semantics():
    net = InstanceExtentFilling(feature_channels=(64, 128, 256), channels=4, hidden=8, steps=3,
                                align_corners=True, normalization="batch")
    arch = net.architecture()
    again = InstanceExtentFilling.from_architecture((64, 128, 256), arch)
    assert again.architecture() == arch
    old = {k: arch[k] for k in ("channels", "kernel_size", "hidden", "steps")}  # written before the fields
    legacy = InstanceExtentFilling.from_architecture((64, 128, 256), old)
    assert (legacy.align_corners, legacy.normalization) == (False, "running")
    assert InstanceExtentFilling.from_architecture((64, 128, 256), old, steps=7).steps == 7
    with pytest.raises(ValueError, match="unknown filling normalization"):
        net.normalization = "instance"


@pytest.mark.parametrize("normalization", ["batch", "running"])
@pytest.mark.parametrize("hidden", [32, 8])
def test_export_form_is_the_filling_network(normalization, hidden):
    """iam_export's filling_forward (statistics from patch moments, the normalisation after the
    pooling, the decoder's last layer summed before the upsampling) computes the network's maps:
    float64, BatchNorm scales of both signs. With hidden 8 the decoder's last layer has more taps
    (1 x 9) than inputs and runs as the model's own; in "running" mode the encoder does."""
    from iam_export.filling_graph import filling_forward, pools_after_norm, sums_taps_first

    g = torch.Generator().manual_seed(1)
    net = InstanceExtentFilling(feature_channels=(8, 16, 32), hidden=hidden, steps=5, normalization=normalization)
    randomise_batchnorm(net, g)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(-1.5, 1.5, generator=g)  # negative scales flip the max-pool's order
    net = net.double().eval()
    batch = normalization == "batch"
    assert [pools_after_norm(m) for m in (net.encode.encode1, net.encode.encode2)] == [batch, batch]
    assert sums_taps_first(net.decode.decode3) == (hidden > 9)
    kernels = net.affinity_kernels(torch.rand(1, 8, 16, 16, generator=g).double(),
                                   torch.rand(1, 16, 8, 8, generator=g).double(),
                                   torch.rand(1, 32, 4, 4, generator=g).double())
    prm = torch.rand(3, 64, 64, generator=g, dtype=torch.float64) ** 4  # peaked, as response maps are
    prm = prm / prm.sum(dim=(1, 2), keepdim=True)
    with torch.no_grad():
        for maps in (prm, prm[:1]):
            expected, got = net(maps, kernels), filling_forward(net, maps, kernels)
            assert expected.std() > 1e-3  # not a constant map
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)

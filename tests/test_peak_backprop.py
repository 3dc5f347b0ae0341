"""The batched explicit peak backprop equals the autograd oracle, peak by peak (docs/method.md, section 2)."""

from __future__ import annotations

import pytest
import torch

from iam_train.models.backbone import ResNetFCN
from iam_train.models.peak_backprop import (
    WINDOW_COVERAGE,
    PeakBackprop,
    interpolation_matrix,
    reference_peak_response_maps,
)
from iam_train.models.peaks import find_peaks, upsample_crm

from .conftest import randomise_batchnorm

# Relative error = max |ours - oracle| / max |oracle|, per peak.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def _model_and_peaks(arch: str, dtype: torch.dtype, factor: int, size: int = 64, peaks: int = 5):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ResNetFCN(arch, num_classes=4).eval()
    randomise_batchnorm(model, g)
    model = model.to(dtype)
    image = torch.randn(1, 3, size, size, generator=g, dtype=dtype)
    with torch.no_grad():
        crm = model(image).crm
    found = find_peaks(crm, upsample_factor=factor, max_peaks=peaks)
    return model, image, found.coords[0, : found.counts[0]]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_equals_reference_per_peak(arch, dtype):
    model, image, peaks = _model_and_peaks(arch, dtype, factor=8)
    assert len(peaks) == 5
    oracle = reference_peak_response_maps(model, image, peaks, upsample_factor=8)
    with torch.no_grad():
        ours = PeakBackprop(model, upsample_factor=8)(image, peaks)
    assert ours.shape == (5, 64, 64)
    rel = (ours - oracle).abs().amax(dim=(1, 2)) / oracle.abs().amax(dim=(1, 2))
    assert (rel < TOLERANCE[dtype]).all(), rel
    # The maps are real distributions: non-negative, summing to 1, and peak-specific.
    assert (ours >= 0).all()
    torch.testing.assert_close(ours.sum(dim=(1, 2)), torch.ones(5, dtype=dtype))
    assert (ours[0] - ours[1]).abs().max() > 0


def test_batch_of_peaks_equals_one_at_a_time():
    model, image, peaks = _model_and_peaks("resnet18", torch.float64, factor=4)
    bp = PeakBackprop(model, upsample_factor=4)
    with torch.no_grad():
        together = bp(image, peaks)
        alone = torch.cat([bp(image, peaks[i : i + 1]) for i in range(len(peaks))])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-15)


def test_maxpool_ties_route_to_first_maximum_like_torch():
    # A constant image gives equal values inside max-pool windows: routing must pick the first.
    model, _, _ = _model_and_peaks("resnet18", torch.float64, factor=1)
    image = torch.full((1, 3, 64, 64), 0.5, dtype=torch.float64)
    image[..., 20:40, 10:30] = -1.0
    with torch.no_grad():
        crm = model(image).crm
    found = find_peaks(crm, max_peaks=3)
    peaks = found.coords[0, : found.counts[0]]
    oracle = reference_peak_response_maps(model, image, peaks)
    with torch.no_grad():
        ours = PeakBackprop(model)(image, peaks)
    torch.testing.assert_close(ours, oracle, rtol=1e-9, atol=1e-12)


def test_seed_pullback_matches_bilinear_upsampling_adjoint():
    crm = torch.randn(1, 3, 5, 7, dtype=torch.float64)
    a_h, a_w = interpolation_matrix(40, 5, torch.float64), interpolation_matrix(56, 7, torch.float64)
    torch.testing.assert_close(a_h @ crm[0, 0] @ a_w.T, upsample_crm(crm, 8)[0, 0])


def test_reference_form_refuses_training_mode():
    model = ResNetFCN("resnet18", num_classes=2)
    with pytest.raises(ValueError, match="eval mode"):
        reference_peak_response_maps(model, torch.randn(1, 3, 32, 32), torch.tensor([[0, 0, 0]]))


def test_one_recorded_batch_gives_each_images_maps_and_the_networks_forward():
    # The filling trainer finds peaks on the tape's crm and backprops from the same pass: per
    # image, the batch's maps must be the one-image maps, and its outputs the network's.
    g = torch.Generator().manual_seed(1)
    model, _, _ = _model_and_peaks("resnet18", torch.float64, factor=4)
    images = torch.randn(3, 3, 64, 64, generator=g, dtype=torch.float64)
    images[1] *= 4.0  # a different minimum per image: the rule's shift must be per image
    bp = PeakBackprop(model, upsample_factor=4)
    with torch.no_grad():
        tape = bp.record(images)
        want = model(images)
        for got, ref in zip(tape.features, want):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        for i in range(3):
            found = find_peaks(tape.features.crm[i : i + 1], upsample_factor=4, max_peaks=3)
            peaks = found.coords[0, : found.counts[0]]
            assert len(peaks) > 0
            torch.testing.assert_close(tape.backward(peaks, i), bp(images[i : i + 1], peaks), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_boxed_deep_blocks_give_the_whole_frames_maps(arch):
    # The deep blocks run on each peak's box (Window) while it covers little of its frame: the same
    # sums as on the whole frame. Peaks in the corners and on the edges put boxes past the frame's
    # edge; coverage inf boxes every block (boxes larger than their frames, on both sides).
    model, image, found = _model_and_peaks(arch, torch.float64, factor=8, size=128, peaks=4)
    n = 128 // 32 * 8  # the upsampled CRM's side
    edges = torch.tensor([[0, 0, 0], [1, n - 1, n - 1], [2, 0, n - 1], [3, n - 1, 3], [1, n // 2, n // 2 + 3]])
    peaks = torch.cat([found, edges])
    oracle = reference_peak_response_maps(model, image, peaks, upsample_factor=8)
    with torch.no_grad():
        tape = PeakBackprop(model, upsample_factor=8).record(image)
        for coverage in (0.0, WINDOW_COVERAGE, float("inf")):
            tape.window_coverage = coverage
            ours = tape.backward(peaks)
            rel = (ours - oracle).abs().amax(dim=(1, 2)) / oracle.abs().amax(dim=(1, 2))
            assert (rel < TOLERANCE[torch.float64]).all(), (coverage, rel)


def test_seed_boxes_hold_every_bilinear_weight():
    # A peak's seed reaches at most 2 x 2 CRM cells; its box must hold all of them, on every
    # row of the upsampled grid (the last rows put their weight on the last cell alone).
    model, image, _ = _model_and_peaks("resnet18", torch.float64, factor=8, size=96)
    tape = PeakBackprop(model, upsample_factor=8).record(image)
    n = 3 * 8
    grid = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"), -1).reshape(-1, 2)
    peaks = torch.cat([torch.ones(len(grid), 1, dtype=torch.int64), grid], dim=1)
    boxed, window = tape.seeds_window(peaks, torch.float64)
    full = tape.seeds(peaks, torch.float64)
    torch.testing.assert_close(window.to_frame(boxed), full, rtol=0, atol=0)

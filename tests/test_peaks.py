"""iam::find_peaks against a brute-force loop (docs/method.md, section 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iam_train.models.peaks import find_peaks, peak_stimulated_scores, upsample_crm


def brute_force_peaks(maps: np.ndarray, win: int, mode: str, const: float = 0.0):
    """All peaks of (B, C, H, W) maps as lists of (value, class, y, x), sorted like the op."""
    b, c, h, w = maps.shape
    r = win // 2
    out = []
    for bi in range(b):
        found = []
        for ci in range(c):
            m = maps[bi, ci]
            flat = np.sort(m.ravel())
            thr = {"median": flat[(flat.size - 1) // 2], "mean": m.mean(), "max": m.max(), "constant": const}[mode]
            for y in range(h):
                for x in range(w):
                    v = m[y, x]
                    if v < thr:
                        continue
                    is_peak = True
                    for yy in range(y - r, y + r + 1):
                        for xx in range(x - r, x + r + 1):
                            if not (0 <= yy < h and 0 <= xx < w) or (yy, xx) == (y, x):
                                continue
                            before = (yy, xx) < (y, x)  # row-major order inside the window
                            if m[yy, xx] > v or (before and m[yy, xx] == v):
                                is_peak = False
                    if is_peak:
                        found.append((v, ci, y, x))
        found.sort(key=lambda t: (-t[0], t[1], t[2], t[3]))
        out.append(found)
    return out


def check_against_brute_force(crm: torch.Tensor, win=3, mode="median", const=0.0, factor=1, k=1000):
    result = find_peaks(crm, win, mode, const, factor, k)
    maps = upsample_crm(crm, factor).numpy()
    expected = brute_force_peaks(maps, win, mode, const)
    for bi, peaks in enumerate(expected):
        n = min(len(peaks), k)
        assert result.counts[bi].item() == n
        coords = result.coords[bi, :n].tolist()
        assert coords == [[c, y, x] for _, c, y, x in peaks[:n]]
        np.testing.assert_array_equal(result.values[bi, :n].numpy(), [v for v, *_ in peaks[:n]])
        assert (result.coords[bi, n:] == -1).all() and (result.values[bi, n:] == 0).all()
        full = {(c, y, x) for _, c, y, x in peaks}
        assert set(map(tuple, result.peak_map[bi].nonzero().tolist())) == full
    return result


@pytest.mark.parametrize("mode", ["median", "mean", "max", "constant"])
def test_random_maps_all_threshold_modes(mode):
    g = torch.Generator().manual_seed(0)
    check_against_brute_force(torch.randn(2, 3, 9, 11, generator=g), mode=mode, const=0.3)


def test_plateaus_and_ties_follow_first_in_window_rule():
    g = torch.Generator().manual_seed(1)
    crm = torch.randint(0, 3, (2, 4, 8, 8), generator=g).float()  # many equal neighbours
    crm[0, 0] = 1.0  # a whole flat map: only locations with no equal earlier neighbour
    result = check_against_brute_force(crm)
    assert result.peak_map[0, 0, 0, 0] and not result.peak_map[0, 0, 0, 1]


def test_border_peaks_and_window_5():
    crm = torch.zeros(1, 1, 6, 6)
    crm[0, 0, 0, 0] = 5.0  # corner
    crm[0, 0, 5, 3] = 4.0  # bottom edge
    crm[0, 0, 3, 3] = 3.0  # within 2 px of the edge peak: suppressed only by the 5x5 window
    r3 = check_against_brute_force(crm, win=3, mode="constant", const=1.0)
    assert r3.counts.item() == 3
    r5 = check_against_brute_force(crm, win=5, mode="constant", const=1.0)
    assert r5.coords[0, : r5.counts.item()].tolist() == [[0, 0, 0], [0, 5, 3]]


def test_sub_pixel_factor_8_and_k_smaller_than_peak_count():
    g = torch.Generator().manual_seed(2)
    crm = torch.randn(2, 5, 4, 5, generator=g)
    result = check_against_brute_force(crm, factor=8, k=4)
    assert result.peak_map.shape == (2, 5, 32, 40)
    assert (result.counts == 4).all()
    # the upsampling is bilinear with align_corners=True: corners keep their values
    up = upsample_crm(crm, 8)
    torch.testing.assert_close(up[..., 0, 0], crm[..., 0, 0])
    torch.testing.assert_close(up[..., -1, -1], crm[..., -1, -1])


def test_k_larger_than_number_of_locations_pads():
    result = find_peaks(torch.randn(1, 1, 2, 2), max_peaks=10)
    assert result.coords.shape == (1, 10, 3) and result.counts.item() >= 1
    assert (result.coords[0, result.counts.item() :] == -1).all()


def test_scores_are_mean_at_peaks_and_gradient_reaches_only_peaks():
    g = torch.Generator().manual_seed(3)
    crm = torch.randn(2, 3, 6, 6, generator=g, requires_grad=True)
    peaks = find_peaks(crm.detach(), upsample_factor=1)
    scores = peak_stimulated_scores(crm, peaks.peak_map)
    expected = (crm * peaks.peak_map).sum((2, 3)) / peaks.peak_map.sum((2, 3))
    torch.testing.assert_close(scores, expected)
    scores.sum().backward()
    assert ((crm.grad != 0) == peaks.peak_map).all()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="threshold mode"):
        find_peaks(torch.randn(1, 1, 4, 4), threshold_mode="nope")
    with pytest.raises(ValueError, match="odd"):
        find_peaks(torch.randn(1, 1, 4, 4), win_size=4)


def test_valid_peak_rules_are_the_reference_ones():
    """Class score >= the class threshold (inclusive), peak value > the peak threshold (strict);
    every valid peak in detect order up to the cap."""
    from iam_runtime.peaks import select_peaks

    scores = np.array([-3.0, -3.0001, 5.0], np.float32)
    coords = np.array([[0, 1, 1], [0, 2, 2], [1, 3, 3], [2, 4, 4], [2, 5, 5], [0, 0, 0]])
    values = np.array([40.0, 30.0, 90.0, 30.0001, 12.0, 0.0], np.float32)
    chosen = select_peaks(scores, coords, values, 5, class_threshold=-3, peak_threshold=30, max_peaks=100)
    assert chosen.tolist() == [0, 3]  # class 1 is below -3; values of exactly 30 and 12 are not > 30
    assert select_peaks(scores, coords, values, 5, -3, 30, max_peaks=1).tolist() == [0]
    assert select_peaks(scores, coords, values, 0, -3, 30, 100).tolist() == []

"""Peak finding on class response maps and peak-stimulated class scores (docs/method.md, section 1).

``iam::find_peaks`` is a ``torch.library`` custom op so that it keeps its name when exported
(iam_export registers its ONNX translation). The implementation below is the reference
semantics that every other backend is tested against:

* the map is first upsampled bilinearly (``align_corners=True``) by ``upsample_factor``;
* a location is a peak when it is the arg-max of its ``win_size`` x ``win_size`` window
  (border padded with -inf). On ties the first location in row-major window order wins,
  exactly as ``max_pool2d``'s indices in the reference code;
* and its value is >= the per-map threshold: the lower median (``torch.median``), the mean,
  the max, or a constant;
* the ``max_peaks`` highest peaks of each image (over all classes) are returned in fixed-size
  arrays, sorted by value (ties: lower flat index (class, y, x) first), with a count.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

THRESHOLD_MODES = ("median", "mean", "max", "constant")


class Peaks(NamedTuple):
    """peak_map: (B, C, H, W) bool over the upsampled grid; coords: (B, K, 3) int64 rows of
    (class, y, x), padded with -1; values: (B, K) upsampled-map values, padded with 0;
    counts: (B,) int64 number of valid rows."""

    peak_map: Tensor
    coords: Tensor
    values: Tensor
    counts: Tensor


def upsample_crm(crm: Tensor, factor: int) -> Tensor:
    """Sub-pixel locating: (B, C, h, w) -> (B, C, h*factor, w*factor), bilinear, align_corners."""
    if factor == 1:
        return crm
    return F.interpolate(crm, scale_factor=factor, mode="bilinear", align_corners=True)


def map_threshold(maps: Tensor, mode: str, value: float) -> Tensor:
    """Per-map threshold of (B, C, H, W) maps -> (B, C, 1, 1)."""
    flat = maps.flatten(2)
    if mode == "median":
        thr = flat.median(dim=2).values
    elif mode == "mean":
        thr = flat.mean(dim=2)
    elif mode == "max":
        thr = flat.amax(dim=2)
    elif mode == "constant":
        thr = torch.full(flat.shape[:2], value, dtype=maps.dtype, device=maps.device)
    else:
        raise ValueError(f"unknown threshold mode {mode!r}; choose one of {THRESHOLD_MODES}")
    return thr[:, :, None, None]


def window_argmax_map(maps: Tensor, win_size: int) -> Tensor:
    """(B, C, H, W) -> bool map of locations that are the arg-max of their window."""
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd number, got {win_size}")
    r = (win_size - 1) // 2
    padded = F.pad(maps, (r, r, r, r), value=float("-inf"))
    _, idx = F.max_pool2d(padded, kernel_size=win_size, stride=1, return_indices=True)
    hp, wp = padded.shape[-2:]
    own = torch.arange(hp * wp, device=maps.device).view(hp, wp)[r : hp - r, r : wp - r]
    return idx == own


def _find_peaks_impl(
    crm: Tensor, win_size: int, threshold_mode: str, threshold_value: float, upsample_factor: int, max_peaks: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    maps = upsample_crm(crm, upsample_factor)
    b, c, h, w = maps.shape
    peak_map = window_argmax_map(maps, win_size) & (maps >= map_threshold(maps, threshold_mode, threshold_value))
    scored = torch.where(peak_map, maps, torch.full_like(maps, float("-inf"))).flatten(1)
    k = min(max_peaks, scored.shape[1])
    order = torch.sort(scored, dim=1, descending=True, stable=True).indices[:, :k]
    top = scored.gather(1, order)
    valid = torch.isfinite(top)
    cls = order // (h * w)
    rest = order - cls * (h * w)
    coords = torch.stack((cls, rest // w, rest - (rest // w) * w), dim=2)
    coords = torch.where(valid[..., None], coords, torch.full_like(coords, -1))
    values = torch.where(valid, top, torch.zeros_like(top))
    if k < max_peaks:  # fewer locations than K: pad to the fixed size
        coords = F.pad(coords, (0, 0, 0, max_peaks - k), value=-1)
        values = F.pad(values, (0, max_peaks - k), value=0.0)
    return peak_map, coords, values, valid.sum(dim=1)


@torch.library.custom_op("iam::find_peaks", mutates_args=())
def find_peaks_op(
    crm: Tensor, win_size: int, threshold_mode: str, threshold_value: float, upsample_factor: int, max_peaks: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _find_peaks_impl(crm, win_size, threshold_mode, threshold_value, upsample_factor, max_peaks)


@find_peaks_op.register_fake
def _(crm, win_size, threshold_mode, threshold_value, upsample_factor, max_peaks):
    b, c, h, w = crm.shape
    shape = (b, c, h * upsample_factor, w * upsample_factor)
    return (
        crm.new_empty(shape, dtype=torch.bool),
        crm.new_empty((b, max_peaks, 3), dtype=torch.int64),
        crm.new_empty((b, max_peaks)),
        crm.new_empty((b,), dtype=torch.int64),
    )


def find_peaks(
    crm: Tensor,
    win_size: int = 3,
    threshold_mode: str = "median",
    threshold_value: float = 0.0,
    upsample_factor: int = 1,
    max_peaks: int = 100,
) -> Peaks:
    """Find peaks of (B, C, h, w) class response maps; see the module docstring."""
    if threshold_mode not in THRESHOLD_MODES:
        raise ValueError(f"unknown threshold mode {threshold_mode!r}; choose one of {THRESHOLD_MODES}")
    if upsample_factor < 1 or max_peaks < 1:
        raise ValueError("upsample_factor and max_peaks must be >= 1")
    return Peaks(*find_peaks_op(crm, win_size, threshold_mode, float(threshold_value), upsample_factor, max_peaks))


def peak_stimulated_scores(crm: Tensor, peak_map: Tensor, upsample_factor: int = 1) -> Tensor:
    """Class scores (B, C): mean of the upsampled CRM at its peaks. Differentiable in ``crm``;
    the gradient reaches only the peak locations (``peak_map`` is a constant)."""
    maps = upsample_crm(crm, upsample_factor)
    mask = peak_map.to(maps.dtype)
    return (maps * mask).sum(dim=(2, 3)) / mask.sum(dim=(2, 3)).clamp_min(1.0)


def peak_input_coordinates(coords: Tensor, crm_size: tuple[int, int], upsample_factor: int, stride: int = 32) -> Tensor:
    """(..., 3) peak rows (class, y, x) on the upsampled grid -> (..., 2) float (y, x) in input
    pixels (see :func:`iam_runtime.peaks.peak_input_coordinates`, which this wraps)."""
    from iam_runtime.peaks import peak_input_coordinates as to_input

    return torch.from_numpy(to_input(coords.cpu().numpy(), tuple(crm_size), upsample_factor, stride)).float()

"""The custom ops written with standard, TensorRT-parsable operations only.

These are the bodies of the ONNX functions ``iam.FindPeaks`` and ``iam.PropagateAffinity``:
exported from here, they travel inside every model so that any onnxruntime (or TensorRT's
parser, after inlining) runs them. Each is tested against the reference implementation of
its ``torch.library`` op (``iam_train.models``). Constraints honoured (TensorRT's ONNX parser):

* no MaxPool index output: the window arg-max with its first-in-row-major tie rule is written
  as comparisons with shifted copies of the map;
* TopK with K <= 3840: the exact lower median of a map with n > 3840 values is found by sorting
  chunks of at most 3840 values and a binary search, in each chunk, for the first value whose
  rank over the whole map exceeds (n - 1) // 2 (the median is the smallest of these);
* no data-dependent shapes: fixed-size top-K outputs with counts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

TOPK_LIMIT = 3840


def window_argmax(maps: Tensor, win_size: int) -> Tensor:
    """(B, C, H, W) -> bool: each location is the first maximum, in row-major order, of its
    win x win window (border padded with -inf)."""
    r = win_size // 2
    h, w = maps.shape[-2:]
    padded = F.pad(maps, (r, r, r, r), value=float("-inf"))
    result = torch.ones_like(maps, dtype=torch.bool)
    for dy in range(win_size):
        for dx in range(win_size):
            if (dy, dx) == (r, r):
                continue
            neighbour = padded[:, :, dy : dy + h, dx : dx + w]
            before = (dy, dx) < (r, r)
            result = result & ((maps > neighbour) if before else (maps >= neighbour))
    return result


def lower_median(maps: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, 1, 1): the ((n - 1) // 2)-th smallest value, exactly, with TopK of
    at most 3840 elements."""
    b, c = maps.shape[:2]
    flat = maps.flatten(2)
    n = flat.shape[-1]
    rank = (n - 1) // 2
    chunks = math.ceil(n / TOPK_LIMIT)
    size = math.ceil(n / chunks)
    padded = F.pad(flat, (0, chunks * size - n), value=float("inf")).view(b, c, chunks, size)
    ordered = torch.topk(padded, size, dim=-1, largest=False, sorted=True).values
    ordered = F.pad(ordered, (0, 1), value=float("inf"))  # index `size` stands for "none"
    lo = torch.zeros(b, c, chunks, 1, dtype=torch.int64, device=maps.device)
    hi = torch.full_like(lo, size)
    for _ in range(math.ceil(math.log2(size + 1))):
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        candidate = ordered.gather(-1, mid)  # (B, C, chunks, 1)
        count = (flat.unsqueeze(2) <= candidate).sum(-1, keepdim=True)  # rank over the whole map
        above = count > rank
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid + 1)
    return ordered.gather(-1, lo).amin(dim=2, keepdim=True).view(b, c, 1, 1)


def map_threshold(maps: Tensor, mode: str, value: float) -> Tensor:
    if mode == "median":
        return lower_median(maps)
    if mode == "mean":
        return maps.mean(dim=(2, 3), keepdim=True)
    if mode == "max":
        return maps.amax(dim=(2, 3), keepdim=True)
    if mode == "constant":
        return torch.full_like(maps[:, :, :1, :1], value)
    raise ValueError(f"unknown threshold mode {mode!r}")


def find_peaks(crm: Tensor, win_size: int, threshold_mode: str, threshold_value: float, upsample_factor: int,
               max_peaks: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as ``iam::find_peaks`` (see iam_train.models.peaks)."""
    if max_peaks > TOPK_LIMIT:
        raise ValueError(f"max_peaks {max_peaks} exceeds TensorRT's TopK limit of {TOPK_LIMIT}")
    maps = crm
    if upsample_factor > 1:
        maps = F.interpolate(crm, scale_factor=upsample_factor, mode="bilinear", align_corners=True)
    b, c, h, w = maps.shape
    peak_map = window_argmax(maps, win_size) & (maps >= map_threshold(maps, threshold_mode, threshold_value))
    scored = torch.where(peak_map, maps, torch.full_like(maps, float("-inf"))).flatten(1)
    k = min(max_peaks, c * h * w)
    top, order = torch.topk(scored, k, dim=1, largest=True, sorted=True)
    valid = top > float("-inf")
    cls = torch.div(order, h * w, rounding_mode="floor")
    rest = order - cls * (h * w)
    y = torch.div(rest, w, rounding_mode="floor")
    coords = torch.stack((cls, y, rest - y * w), dim=2)
    coords = torch.where(valid.unsqueeze(2), coords, torch.full_like(coords, -1))
    values = torch.where(valid, top, torch.zeros_like(top))
    if k < max_peaks:
        coords = F.pad(coords, (0, 0, 0, max_peaks - k), value=-1)
        values = F.pad(values, (0, max_peaks - k), value=0.0)
    return peak_map, coords, values, valid.sum(dim=1)


def propagate_affinity(x: Tensor, kernels: Tensor, steps: int) -> Tensor:
    """Same contract as ``iam::propagate_affinity``: T steps, each k*k shifted multiply-adds."""
    n, d, h, w = x.shape
    kk = kernels.shape[1] // d
    k = math.isqrt(kk)
    r = k // 2
    weights = [kernels[:, i::kk] for i in range(kk)]  # channel d*kk + i -> (N, D, H, W) per offset i
    for _ in range(steps):
        padded = F.pad(x, (r, r, r, r))
        acc = weights[0] * padded[:, :, :h, :w]
        for i in range(1, kk):
            dy, dx = divmod(i, k)
            acc = acc + weights[i] * padded[:, :, dy : dy + h, dx : dx + w]
        x = acc
    return x

"""Pseudo ground truth for the filling network from segment proposals (docs/method.md, section 3).

For each peak response map, every proposal is scored by
``balance * sum(PRM inside the mask) + sum(PRM on the mask's contour)``, where the contour is
the band of ``contour_width`` pixels inside the mask's edge. The ``top_k`` best are kept,
near-duplicates (IoU above ``duplicate_iou`` with a better kept one) are removed, and one of
the rest is drawn uniformly as the target. Size limits and the first-100 cut are applied when
the proposals are loaded (:class:`iam_train.data.datasets.FillingDataset`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from iam_runtime.masks import mask_ious


def _box_sum(x: Tensor, k: int, dim: int) -> Tensor:
    """Sums of k consecutive entries along ``dim`` (output shorter by k - 1)."""
    c = torch.cumsum(x, dim=dim)
    zero = torch.zeros_like(c.narrow(dim, 0, 1))
    c = torch.cat((zero, c), dim=dim)
    n = c.shape[dim] - k
    return c.narrow(dim, k, n) - c.narrow(dim, 0, n)


def contour_band(masks: Tensor, width: int) -> Tensor:
    """(N, H, W) bool -> the inner band of ``width`` pixels along each mask's edge (pixels with
    an outside pixel, or the image border, in their (2w+1)^2 neighbourhood)."""
    if masks.numel() == 0:
        return masks
    k = 2 * width + 1
    outside = F.pad((~masks).float(), (width,) * 4, value=1.0)
    near_outside = _box_sum(_box_sum(outside, k, 1), k, 2) > 0  # box sums via cumsum: O(1) per pixel
    return masks & near_outside


def score_proposals(prm: Tensor, masks: Tensor, balance: float = 0.1, contour_width: int = 5) -> Tensor:
    """prm: (P, H, W); masks: (N, H, W) bool -> (P, N) retrieval scores."""
    flat_prm = prm.flatten(1).float()
    inside = flat_prm @ masks.flatten(1).float().T
    contour = flat_prm @ contour_band(masks, contour_width).flatten(1).float().T
    return balance * inside + contour


def pseudo_targets(
    prm: Tensor,
    masks: Tensor,
    generator: torch.Generator,
    balance: float = 0.1,
    contour_width: int = 5,
    top_k: int = 5,
    duplicate_iou: float = 0.8,
) -> tuple[Tensor, Tensor]:
    """prm: (P, H, W); masks: (N, H, W) bool proposals of the same image.
    Returns (targets (P, H, W) float, valid (P,) bool); a peak has no target when the image
    has no usable proposal."""
    p = prm.shape[0]
    if masks.shape[0] == 0 or p == 0:
        return prm.new_zeros(prm.shape), torch.zeros(p, dtype=torch.bool, device=prm.device)
    scores = score_proposals(prm, masks, balance, contour_width)
    k = min(top_k, masks.shape[0])
    best = scores.topk(k, dim=1).indices  # (P, k), best first
    targets = []
    for row in best:
        candidates = masks[row]
        iou = mask_ious(candidates.cpu().numpy(), candidates.cpu().numpy())
        kept = []
        for i in range(k):
            if all(iou[i, j] <= duplicate_iou for j in kept):
                kept.append(i)
        choice = kept[int(torch.randint(len(kept), (1,), generator=generator))]
        targets.append(candidates[choice])
    return torch.stack(targets).to(prm.dtype), torch.ones(p, dtype=torch.bool, device=prm.device)

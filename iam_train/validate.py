"""Quality of a trained model on a split with instance ground truth: where the peaks fall and
how well instance activation maps overlap the instances (used by tests and validation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from iam_runtime.masks import mask_ious

from .data.datasets import FillingDataset
from .models import InstanceExtentFilling, peak_input_coordinates


@dataclass
class InstanceQuality:
    peaks: int  # peaks evaluated
    peaks_inside: float  # fraction of peaks inside an instance of their class
    chance_inside: float  # expected fraction for a location drawn uniformly from the image
    mean_iou: float  # mean over peaks of the best IoU of the map (> 0.5) with a same-class instance
    prm_mean_iou: float  # the same for the peak response map thresholded at 20% of its max
    skipped: int = 0  # images of the split that could not be read (left out)


def _best_iou(mask: np.ndarray, instances: list[np.ndarray], ignore: np.ndarray) -> float:
    return float(mask_ious(mask[None], np.stack(instances), ignore).max()) if instances else 0.0


@torch.no_grad()
def instance_quality(teacher, filling: InstanceExtentFilling | None, data: FillingDataset,
                     peaks_per_image: int = 4, device="cpu") -> InstanceQuality:
    """``teacher`` is a :class:`iam_train.train_filling.PeakTeacher`; ``filling`` may be None
    (peaks and PRMs only)."""
    if filling is not None:
        filling.eval()
    inside, chance, ious, prm_ious, skipped = [], [], [], [], 0
    for index in range(len(data)):
        item = data[index]  # ground truth below by the same index: a skipped image shifts nothing
        if item is None:
            skipped += 1
            continue
        gt = data.voc.instances(data.ids[index])
        size = gt.ignore.shape
        feats, prm, owners, peaks = teacher([item], peaks_per_image, device)
        if prm is None:
            continue
        yx = peak_input_coordinates(peaks.cpu(), feats.crm.shape[-2:], teacher.meta.upsample_factor)
        yx = yx * torch.tensor([size[0] / item.image.shape[1], size[1] / item.image.shape[2]])
        maps = [prm]
        if filling is not None:
            maps.append(filling(prm, filling.affinity_kernels(feats.c2, feats.c3, feats.c4)[owners]))
        maps = [F.interpolate(m[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0].cpu() for m in maps]
        for k, peak in enumerate(peaks.tolist()):
            same = [m for m, c in zip(gt.masks, gt.classes) if c == peak[0]]
            y, x = (int(min(max(v, 0), s - 1)) for v, s in zip(yx[k].tolist(), size))
            inside.append(any(m[y, x] for m in same))
            chance.append(sum(m.mean() for m in same))
            p = maps[0][k].numpy()
            prm_ious.append(_best_iou(p > 0.2 * p.max(), same, gt.ignore))
            if filling is not None:
                ious.append(_best_iou(maps[1][k].numpy() > 0.5, same, gt.ignore))
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return InstanceQuality(len(inside), mean(inside), mean(chance), mean(ious), mean(prm_ious), skipped)

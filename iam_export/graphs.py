"""Export-only modules: the two graphs of a bundle, composed from the model's parts.

* :class:`DetectGraph`: images (B, 3, S, S), ImageNet-normalised -> class_scores (B, C),
  peak_coords (B, K, 3) int64 (class, y, x) on the sub-pixel grid, peak_values (B, K),
  peak_counts (B,). Peak finding stays one ``iam.FindPeaks`` node.
* :class:`SegmentGraph`: one image (1, 3, S, S) and P of its peaks (P, 3) int64 -> peak
  response maps (P, S, S), instance activation maps (P, S, S) and the image's class response
  maps (1, C, S/32, S/32). Peak backprop in the batched explicit form, filling with one
  ``iam.PropagateAffinity`` node, in its export form (:mod:`.filling_graph`). The crm output is the forward pass that peak backprop runs
  anyway: an engine that splits the graph where ``peaks`` enters can find the image's peaks on
  it (with the detect graph's peak finding) and not run the backbone a second time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from iam_train.models import InstanceExtentFilling, PeakBackprop, ResNetFCN, peak_stimulated_scores
from iam_train.models.peaks import find_peaks_op

from .filling_graph import filling_forward


class DetectGraph(nn.Module):
    def __init__(self, backbone: ResNetFCN, win_size: int, threshold_mode: str, threshold_value: float,
                 upsample_factor: int, max_peaks: int):
        super().__init__()
        self.backbone = backbone
        self.peak_args = (win_size, threshold_mode, float(threshold_value), upsample_factor, max_peaks)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        crm = self.backbone(images).crm
        peak_map, coords, values, counts = find_peaks_op(crm, *self.peak_args)
        scores = peak_stimulated_scores(crm, peak_map, self.peak_args[3])
        return scores, coords, values, counts


class SegmentGraph(nn.Module):
    def __init__(self, backbone: ResNetFCN, filling: InstanceExtentFilling, upsample_factor: int):
        super().__init__()
        self.backprop = PeakBackprop(backbone, upsample_factor)
        self.filling = filling

    def forward(self, image: Tensor, peaks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        tape = self.backprop.record(image)
        prm = tape.backward(peaks)
        feats = tape.features
        kernels = self.filling.affinity_kernels(feats.c2, feats.c3, feats.c4)
        return prm, filling_forward(self.filling, prm, kernels), feats.crm


@torch.no_grad()
def detect_reference(backbone: ResNetFCN, images: Tensor, **peak_kwargs) -> tuple[Tensor, ...]:
    """The PyTorch outputs the detect graph must reproduce."""
    return DetectGraph(backbone, **peak_kwargs)(images)

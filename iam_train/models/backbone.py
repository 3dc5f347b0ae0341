"""Fully convolutional ResNet classifier producing class response maps (docs/method.md, section 1)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torchvision
from torch import Tensor, nn

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


class BackboneOutput(NamedTuple):
    """crm: (B, C, H/32, W/32) class response maps; c2, c3, c4: layer1..layer3 features
    at strides 4, 8 and 16 (the inputs of the filling network's feature pyramid)."""

    crm: Tensor
    c2: Tensor
    c3: Tensor
    c4: Tensor


def _resnet(arch: str, weights: str | Path | None) -> torchvision.models.ResNet:
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {', '.join(ARCHS)}")
    builder = getattr(torchvision.models, arch)
    if weights is None:
        return builder(weights=None)
    if weights == "imagenet":
        # torchvision fetches the file on first use (only where the machine has internet).
        return builder(weights="DEFAULT")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    model = builder(weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not k.startswith("fc.")]
    if real_missing or [k for k in unexpected if not k.startswith("fc.")]:
        raise ValueError(
            f"{path} is not a torchvision {arch} state dict "
            f"(missing: {real_missing[:5]}, unexpected: {unexpected[:5]})"
        )
    return model


class ResNetFCN(nn.Module):
    """ResNet kept up to ``layer4`` (stride 32) followed by a 1x1 conv classifier.

    Input: (B, 3, H, W) ImageNet-normalised images. Output: :class:`BackboneOutput`.
    """

    def __init__(self, arch: str = "resnet50", num_classes: int = 20, weights: str | Path | None = None):
        super().__init__()
        resnet = _resnet(arch, weights)
        self.arch = arch
        self.num_classes = num_classes
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        self.classifier = nn.Conv2d(resnet.fc.in_features, num_classes, kernel_size=1)

    @property
    def feature_channels(self) -> tuple[int, int, int]:
        """Channels of (c2, c3, c4)."""
        return tuple(layer[0].conv1.in_channels for layer in (self.layer2, self.layer3, self.layer4))

    def forward(self, images: Tensor) -> BackboneOutput:
        c2 = self.layer1(self.stem(images))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        crm = self.classifier(self.layer4(c4))
        return BackboneOutput(crm, c2, c3, c4)

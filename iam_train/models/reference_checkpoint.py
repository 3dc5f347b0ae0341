"""Import of the reference implementation's released checkpoints.

``model_prm_latest.pth.tar`` and ``model_filling_latest.pth.tar`` are dicts with keys arch, lr,
epoch, state_dict, error. The PRM state dict wraps a ResNet-50 FCN so that every key starts with
``0.``: ``res_block1`` = stem (conv1 at .0, bn1 at .1), ``res_block2..5`` = layer1..layer4 and
``classifier.0`` = the 1x1 conv. The filling state dict already uses our module names.

The loaded models compute what the reference's inference computes with those weights (docs/method.md,
section 7, docs/reference.md): the filling network upsamples its pyramid with
align_corners=True and normalises with batch statistics at inference.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .backbone import ResNetFCN
from .filling import InstanceExtentFilling

_PRM_RENAMES = (
    (re.compile(r"^0\.res_block1\.0\."), "stem.0."),
    (re.compile(r"^0\.res_block1\.1\."), "stem.1."),
    (re.compile(r"^0\.res_block([2-5])\."), lambda m: f"layer{int(m.group(1)) - 1}."),
    (re.compile(r"^0\.classifier\.0\."), "classifier."),
)


class CheckpointError(ValueError):
    """A checkpoint that is not what the caller asked for (named keys, kinds or shapes)."""


def _state_dict(source: str | Path | Mapping[str, object]) -> dict[str, Tensor]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
    state = source.get("state_dict", source) if isinstance(source, Mapping) else None
    if not isinstance(state, Mapping):
        raise CheckpointError("checkpoint holds no state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_strict(model: torch.nn.Module, state: dict[str, Tensor], what: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise CheckpointError(
            f"not a reference {what} checkpoint: "
            + (f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"unknown keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''}" if unknown else "")
        )
    wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"reference {what} checkpoint has wrong shapes: {wrong[:5]}")
    model.load_state_dict(state)


def convert_prm_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Reference PRM keys -> :class:`ResNetFCN` keys. Keys that match no rule are kept, so that
    loading reports them as unknown by their original name."""
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _PRM_RENAMES:
            if pattern.match(key):
                new = pattern.sub(repl, key)
                break
        out[new] = value
    return out


def load_reference_prm(source: str | Path | Mapping[str, object], arch: str = "resnet50") -> ResNetFCN:
    """Build a :class:`ResNetFCN` from a reference PRM checkpoint (path or loaded dict)."""
    state = convert_prm_keys(_state_dict(source))
    weight = state.get("classifier.weight")
    if weight is None:
        raise CheckpointError("not a reference PRM checkpoint: missing keys ['0.classifier.0.weight']")
    model = ResNetFCN(arch, num_classes=weight.shape[0], weights=None)
    _load_strict(model, state, "PRM")
    return model.eval()


def load_reference_filling(
    source: str | Path | Mapping[str, object], steps: int = 112, normalization: str = "batch"
) -> InstanceExtentFilling:
    """Build an :class:`InstanceExtentFilling` from a reference filling checkpoint, with the
    reference's inference semantics (``normalization="running"`` departs from them)."""
    state = _state_dict(source)
    try:
        hidden = state["encode.encode1.0.weight"].shape[0]
        channels = state["encode.encode2.0.weight"].shape[0]
        pyramid_out = state["feature_pyramid.smooth2.0.weight"].shape[0]
        feature_channels = (
            state["feature_pyramid.latlayer2.0.weight"].shape[1],
            state["feature_pyramid.latlayer3.0.weight"].shape[1],
            state["feature_pyramid.toplayer.weight"].shape[1],
        )
    except KeyError as exc:
        raise CheckpointError(f"not a reference filling checkpoint: missing key {exc.args[0]!r}") from None
    kernel_size = int(round((pyramid_out / channels) ** 0.5))
    model = InstanceExtentFilling(feature_channels, channels, kernel_size, hidden, steps, align_corners=True,
                                  normalization=normalization)
    _load_strict(model, state, "filling")
    return model.eval()


@dataclass(frozen=True)
class ReferenceSettings:
    """The settings of the reference's ``config.yml`` that change what its inference computes,
    with its defaults (docs/method.md, section 7). ``filter_type`` is "median", "mean", "max" or a
    number (a constant peak threshold)."""

    image_size: int = 448
    iterate_num: int = 112
    win_size: int = 3
    sub_pixel_locating_factor: int = 8
    filter_type: str | float = "median"

    @property
    def threshold(self) -> tuple[str, float]:
        """(threshold_mode, threshold_value) for :func:`iam_train.models.find_peaks`."""
        if isinstance(self.filter_type, (int, float)):
            return "constant", float(self.filter_type)
        return self.filter_type, 0.0


def read_reference_config(path: str | Path) -> ReferenceSettings:
    """Read the reference's ``config.yml``: ``image_size``, ``iterate_num`` and, under ``model``,
    ``win_size``, ``sub_pixel_locating_factor`` and ``filter_type``; absent keys keep the
    reference's defaults, and other keys (training settings) are ignored."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path} is not valid YAML: {exc}") from exc
    model = data.get("model") or {} if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: expected the reference's config.yml (a mapping with a 'model' section)")
    size = data.get("image_size", ReferenceSettings.image_size)
    if isinstance(size, (list, tuple)):  # [h, w]: the graphs take square inputs
        if len(set(size)) != 1:
            raise CheckpointError(f"{path}: image_size {size} is not square")
        size = size[0]
    values = {"image_size": size, "iterate_num": data.get("iterate_num", ReferenceSettings.iterate_num)}
    for key in ("win_size", "sub_pixel_locating_factor", "filter_type"):
        if key in model:
            values[key] = model[key]
    settings = ReferenceSettings(**values)
    for key in ("image_size", "iterate_num", "win_size", "sub_pixel_locating_factor"):
        value = getattr(settings, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{path}: {key} must be a positive integer, not {value!r}")
    if settings.win_size % 2 == 0:
        raise CheckpointError(f"{path}: model.win_size must be odd, not {settings.win_size}")
    mode, _ = settings.threshold
    if mode not in ("median", "mean", "max", "constant"):
        raise CheckpointError(f"{path}: model.filter_type {settings.filter_type!r} is not median, mean, max or a number")
    return settings

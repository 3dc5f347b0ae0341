"""Import of the reference implementation's released checkpoints.

``model_prm_latest.pth.tar`` and ``model_filling_latest.pth.tar`` are dicts with keys arch, lr,
epoch, state_dict, error. The PRM state dict wraps a ResNet-50 FCN so that every key starts with
``0.``: ``res_block1`` = stem (conv1 at .0, bn1 at .1), ``res_block2..5`` = layer1..layer4 and
``classifier.0`` = the 1x1 conv. The filling state dict already uses our module names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
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
    source: str | Path | Mapping[str, object], steps: int = 112
) -> InstanceExtentFilling:
    """Build an :class:`InstanceExtentFilling` from a reference filling checkpoint."""
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
    model = InstanceExtentFilling(feature_channels, channels, kernel_size, hidden, steps)
    _load_strict(model, state, "filling")
    return model.eval()

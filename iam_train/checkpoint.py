"""Training checkpoints: written atomically, tagged with their kind, holding everything a
bit-for-bit resume needs (model, optimizer, scheduler, epoch, RNG states, config)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iam_runtime.files import atomic_write

FORMAT_VERSION = 1
KINDS = ("iam-prm", "iam-filling")


@dataclass(frozen=True)
class PRMMetadata:
    """What a PRM checkpoint says about its network, beside the weights: written by the PRM
    trainer, read by the filling trainer and the exporter, copied into filling checkpoints."""

    classes: tuple[str, ...]
    arch: str
    image_size: int
    upsample_factor: int
    win_size: int
    threshold_mode: str

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "checkpoint") -> PRMMetadata:
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data]
        if missing:
            raise CheckpointFileError(f"{where} lacks the PRM metadata {missing}")
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)} | {"classes": tuple(data["classes"])})


class CheckpointFileError(ValueError):
    """A checkpoint file that is missing, corrupt, foreign or of the wrong kind."""


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, kind: str, payload: dict[str, Any]) -> None:
    """torch.save to a temporary name in the same folder, fsync, then rename over ``path``."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}")
    with atomic_write(path, "wb", sync=True) as f:
        torch.save({"iam_kind": kind, "format_version": FORMAT_VERSION, **payload}, f)


def load_checkpoint(path: str | Path, kind: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointFileError(f"{path} is corrupt or not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "iam_kind" not in ckpt:
        raise CheckpointFileError(
            f"{path} is not an iam training checkpoint (for the reference's released checkpoints use "
            "iam_train.models.load_reference_prm / load_reference_filling)"
        )
    if ckpt["iam_kind"] != kind:
        raise CheckpointFileError(f"{path} is a {ckpt['iam_kind']} checkpoint, expected {kind}")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointFileError(f"{path} has format {ckpt['format_version']}; this iam reads up to {FORMAT_VERSION}")
    return ckpt

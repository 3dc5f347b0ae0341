"""Segment proposals in the reference's format (docs/method.md, section 6).

``ImageProposals/<id>.json`` is a JSON list, best first, of ``{"shape": [h, w], "data": b64}``
where the base64 decodes to little-endian uint32 pairs (start, length) of the runs of 1s of the
mask flattened row-major, starts counted from 1.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import numpy as np

from iam_runtime.files import atomic_write_text


class ProposalError(ValueError):
    """A proposal file that does not decode; the message names the file."""


def encode_mask(mask: np.ndarray) -> dict:
    """(H, W) bool mask -> one proposal entry."""
    flat = np.asarray(mask, dtype=bool).ravel()
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flat.view(np.uint8), [0])).astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    runs = np.stack((starts + 1, ends - starts), axis=1).astype("<u4")
    return {"shape": [int(mask.shape[0]), int(mask.shape[1])], "data": base64.b64encode(runs.tobytes()).decode("ascii")}


def decode_mask(entry: dict) -> np.ndarray:
    """One proposal entry -> (H, W) bool mask. Raises ValueError on malformed entries."""
    h, w = (int(v) for v in entry["shape"])
    runs = np.frombuffer(base64.b64decode(entry["data"], validate=True), dtype="<u4").reshape(-1, 2).astype(np.int64)
    starts, lengths = runs[:, 0] - 1, runs[:, 1]
    if len(runs) and (starts.min() < 0 or (starts + lengths).max() > h * w):
        raise ValueError(f"runs fall outside a {h}x{w} mask")
    delta = np.bincount(starts, minlength=h * w + 1) - np.bincount(starts + lengths, minlength=h * w + 1)
    return (np.cumsum(delta[:-1]) > 0).reshape(h, w)


def read_proposals(path: str | Path, limit: int | None = None) -> list[np.ndarray]:
    """Read the first ``limit`` proposals of a file as (H, W) bool masks."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, list):
            raise ValueError("top level is not a list")
        return [decode_mask(e) for e in entries[:limit]]
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ProposalError(f"proposal file {path} does not decode: {exc}") from exc


def write_proposals(path: str | Path, masks: list[np.ndarray]) -> None:
    """Write masks (best first) atomically in the reference format."""
    atomic_write_text(path, json.dumps([encode_mask(m) for m in masks]))

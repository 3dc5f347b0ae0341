"""Parity of exported graphs with PyTorch: max abs / relative error per output, with stated
tolerances (fp32 and, looser, fp16)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Relative error = max |onnx - torch| / max |torch|. Integer outputs (peak coordinates, counts)
# must be identical in fp32; in fp16, rounding reorders near-tied peaks, so there the measure is
# the fraction of peak rows (or counts) that differ.
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
INTEGER_MISMATCH_TOLERANCE = {"fp32": 0.0, "fp16": 0.2}


@dataclass
class ParityRow:
    graph: str
    output: str
    max_abs: float
    max_rel: float
    tolerance: float
    ok: bool


def compare(graph: str, names: list[str], onnx_outputs: list[np.ndarray], torch_outputs: list[np.ndarray],
            precision: str) -> list[ParityRow]:
    rows = []
    for name, got, want in zip(names, onnx_outputs, torch_outputs):
        got, want = np.asarray(got), np.asarray(want)
        if got.shape != want.shape:
            rows.append(ParityRow(graph, name, float("inf"), float("inf"), 0.0, False))
            continue
        if np.issubdtype(want.dtype, np.integer) or want.dtype == bool:
            diff = float(np.abs(got.astype(np.int64) - want.astype(np.int64)).max(initial=0))
            rows_differ = got != want
            if want.ndim == 3:  # (B, K, 3) peak rows: a row differs when any coordinate does
                rows_differ = rows_differ.any(-1)
            fraction = float(rows_differ.mean()) if rows_differ.size else 0.0
            tol = INTEGER_MISMATCH_TOLERANCE[precision]
            rows.append(ParityRow(graph, name, diff, fraction, tol, fraction <= tol))
            continue
        diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max(initial=0))
        scale = float(np.abs(want).max(initial=0)) or 1.0
        tol = TOLERANCE[precision]
        rows.append(ParityRow(graph, name, diff, diff / scale, tol, diff / scale <= tol))
    return rows


def format_table(rows: list[ParityRow]) -> str:
    lines = [f"{'graph':<8} {'output':<14} {'max abs':>10} {'max rel':>10} {'tolerance':>10}  ok"]
    for r in rows:
        lines.append(f"{r.graph:<8} {r.output:<14} {r.max_abs:10.3g} {r.max_rel:10.3g} {r.tolerance:10.3g}  "
                     f"{'yes' if r.ok else 'NO'}")
    return "\n".join(lines)


def rows_as_dicts(rows: list[ParityRow]) -> list[dict]:
    return [asdict(r) for r in rows]

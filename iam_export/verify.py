"""Parity of exported graphs with PyTorch: max abs / relative error per output, with stated
tolerances (fp32 and, looser, fp16).

Peak finding makes discrete decisions (window maxima, the per-map threshold, the top-K cut) on
float values, and two correct engines round differently: a value within rounding of its map's
threshold, of a neighbour in its window or of the K-th value can fall either way.
:func:`compare_detect` therefore accepts a peak that one side has and the other lacks only where
such a decision is marginal (within the tolerance of the map's scale), requires every other peak
on both sides with matching values, and checks each class score against the range of means
that the marginal peaks allow. Everything else must match as for any other output.
"""

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

    def __post_init__(self):  # numpy scalars in, JSON-ready Python numbers out
        self.max_abs, self.max_rel, self.tolerance = float(self.max_abs), float(self.max_rel), float(self.tolerance)
        self.ok = bool(self.ok)


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


def _neighbour_margin(maps: np.ndarray, win_size: int) -> np.ndarray:
    """(B, C, H, W) -> min over the window's other locations of (value - neighbour), with -inf
    padding (+inf where the window has no other finite value)."""
    r = win_size // 2
    h, w = maps.shape[-2:]
    padded = np.pad(maps, ((0, 0), (0, 0), (r, r), (r, r)), constant_values=-np.inf)
    margin = np.full(maps.shape, np.inf)
    for dy in range(win_size):
        for dx in range(win_size):
            if (dy, dx) != (r, r):
                margin = np.minimum(margin, maps - padded[:, :, dy : dy + h, dx : dx + w])
    return margin


def _mean_range(certain: np.ndarray, optional: np.ndarray) -> tuple[float, float]:
    """Smallest and largest mean of ``certain`` plus any subset of ``optional``: adding values
    below the running mean lowers it, smallest first (likewise upwards). An empty set has the
    score of a map without peaks, 0."""

    def extreme(ordered: np.ndarray, improves) -> float:
        total, count = float(certain.sum()), len(certain)
        for v in ordered:
            if count and not improves(float(v), total / count):
                break
            total, count = total + float(v), count + 1
        return total / count if count else 0.0

    ordered = np.sort(optional)
    lo, hi = extreme(ordered, lambda v, m: v < m), extreme(ordered[::-1], lambda v, m: v > m)
    if len(certain) == 0:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    return lo, hi


def compare_detect(graph: str, maps: np.ndarray, thresholds: np.ndarray, win_size: int,
                   torch_outputs: list[np.ndarray], onnx_outputs: list[np.ndarray], precision: str) -> list[ParityRow]:
    """Detect outputs (class_scores (B, C), peak_coords (B, K, 3), peak_values (B, K),
    peak_counts (B,)) of onnxruntime against PyTorch's, given PyTorch's upsampled maps
    (B, C, H, W) and per-map thresholds (B, C, 1, 1). Tolerance tau = TOLERANCE x the map's
    largest magnitude. Rows:

    * peak_coords: peaks on one side only that are not marginal (value within tau of the
      threshold, of a window neighbour, or of the K-th value when the K outputs are full),
      invalid padding, or values out of order; max_abs is their count, max_rel their fraction;
    * peak_values: at the peaks both sides found, |onnx - torch| / scale;
    * class_scores: the distance of each ONNX score from the mean of PyTorch's map over the
      ONNX's own (checked) peaks, beyond tau, / scale; when the K outputs are full, from the
      range of means over the certain peaks plus any subset of the marginal ones; max_abs is
      |onnx - torch|;
    * peak_counts: the number of valid rows must equal the count; max_abs is |onnx - torch|.
    """
    tol = TOLERANCE[precision]
    maps = maps.astype(np.float64)
    thr = thresholds.astype(np.float64)
    scale = np.maximum(np.abs(maps).max(axis=(2, 3), keepdims=True), 1e-30)  # (B, C, 1, 1)
    tau = tol * scale
    margin = _neighbour_margin(maps, win_size)
    certain = (maps >= thr + tau) & (margin > tau)
    possible = (maps >= thr - tau) & (margin >= -tau)
    t_scores, t_coords, t_values, t_counts = (np.asarray(a) for a in torch_outputs)
    o_scores, o_coords, o_values, o_counts = (np.asarray(a) for a in onnx_outputs)
    b, c, h, w = maps.shape
    k = o_coords.shape[1]
    unexplained, value_rel, score_excess, count_bad = 0, 0.0, 0.0, 0
    for i in range(b):
        n_o, n_t = int(o_counts[i]), int(t_counts[i])
        rows = o_coords[i, :n_o]
        pad_ok = (o_coords[i, n_o:] == -1).all() and (o_values[i, n_o:] == 0).all()
        inside = ((rows >= 0) & (rows < np.array([c, h, w]))).all(axis=1)
        count_bad += int(not pad_ok) + int((~inside).sum())
        unexplained += int((~inside).sum()) + int((np.diff(o_values[i, :n_o]) > tau.max()).sum())
        rows = rows[inside]
        got = {tuple(r): float(v) for r, v in zip(rows.tolist(), o_values[i, :n_o][inside])}
        want = {tuple(r): float(v) for r, v in zip(t_coords[i, :n_t].tolist(), t_values[i, :n_t])}
        # when the K outputs are full, peaks near the K-th value may be cut on either side
        cut = min(o_values[i, n_o - 1] if n_o == k else -np.inf, t_values[i, n_t - 1] if n_t == k else -np.inf)
        for (cls, y, x), v in got.items():
            near_cut = v <= cut + tau[i, cls, 0, 0]
            value_rel = max(value_rel, abs(v - maps[i, cls, y, x]) / scale[i, cls, 0, 0])
            if (cls, y, x) not in want and not (possible[i, cls, y, x] and (near_cut or not certain[i, cls, y, x])):
                unexplained += 1
        for (cls, y, x), v in want.items():
            if (cls, y, x) not in got and certain[i, cls, y, x] and not v <= cut + tau[i, cls, 0, 0]:
                unexplained += 1
        for cls in range(c):
            if n_o < k:  # every ONNX peak is listed (and was checked above): its score is their mean
                lo = hi = float(np.mean([maps[i, cls, y, x] for (cc, y, x) in got if cc == cls] or [0.0]))
            else:  # peaks past the K outputs are unknown: any choice of the marginal ones
                lo, hi = _mean_range(maps[i, cls][certain[i, cls]], maps[i, cls][possible[i, cls] & ~certain[i, cls]])
            slack = tau[i, cls, 0, 0]
            excess = max(0.0, lo - slack - float(o_scores[i, cls]), float(o_scores[i, cls]) - hi - slack)
            score_excess = max(score_excess, excess / scale[i, cls, 0, 0])
    total_rows = max(1, int(np.maximum(o_counts, t_counts).sum()))
    int_tol = INTEGER_MISMATCH_TOLERANCE[precision]
    score_diff = float(np.abs(o_scores.astype(np.float64) - t_scores).max(initial=0))
    return [
        ParityRow(graph, "class_scores", score_diff, score_excess, tol, score_excess <= tol),
        ParityRow(graph, "peak_coords", float(unexplained), unexplained / total_rows, int_tol,
                  unexplained / total_rows <= int_tol),
        ParityRow(graph, "peak_values", float(value_rel * scale.max()), value_rel, tol, value_rel <= tol),
        ParityRow(graph, "peak_counts", float(np.abs(o_counts - t_counts).max(initial=0)), float(count_bad), 0.0,
                  count_bad == 0),
    ]


def format_table(rows: list[ParityRow]) -> str:
    lines = [f"{'graph':<8} {'output':<14} {'max abs':>10} {'max rel':>10} {'tolerance':>10}  ok"]
    for r in rows:
        lines.append(f"{r.graph:<8} {r.output:<14} {r.max_abs:10.3g} {r.max_rel:10.3g} {r.tolerance:10.3g}  "
                     f"{'yes' if r.ok else 'NO'}")
    return "\n".join(lines)


def rows_as_dicts(rows: list[ParityRow]) -> list[dict]:
    return [asdict(r) for r in rows]

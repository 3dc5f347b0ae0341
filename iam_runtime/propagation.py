"""The filling network's affinity propagation as one fused CPU kernel (numba, compiled on first
use and cached), run between the two halves of the segment graph.

The bundle's segment graph keeps ``iam.PropagateAffinity`` as one node whose function body (the
portable form: per step a Pad, k*k Slices, Muls and Adds) every engine can run. On onnxruntime's
CPU provider that body is memory-bound: each of the T steps writes k*k shifted copies of the
maps. :class:`FusedSegmentGraph` splits the graph at that node into a head (everything before:
peak backprop, the encoder, the affinity kernels) and a tail (the decoder), each an onnxruntime
session, and runs :func:`propagate_affinity` in between, which reads each map once per step.

(Registering the kernel as a Python custom op through onnxruntime-extensions was measured and
not taken: its PyOp hands results back to onnxruntime as Python lists, which cost 0.12 s per
call at 5 peaks on top of the kernel's 0.09 s, resnet50@448.)
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass

import numpy as np
import onnx

from .graph_split import GraphIndex, Partition, partition

OP_DOMAIN, OP_TYPE = "iam", "PropagateAffinity"


def fused_kernel_unavailable() -> str | None:
    """None when the fused kernel can run here, else why not."""
    try:
        import numba  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: use the graph's own body
        return f"numba does not import ({exc})"
    return None


@functools.cache
def _kernel():
    import numba

    @numba.njit(parallel=True, cache=True, fastmath=True, nogil=True, boundscheck=False)
    def propagate(x, weights, steps):  # pragma: no cover - compiled
        p_count, d_count, h, w = x.shape
        kk = weights.shape[1] // d_count
        k = int(np.sqrt(kk))
        r = k // 2
        shared = weights.shape[0] == 1
        a = x.copy()
        b = np.empty_like(x)
        for _ in range(steps):
            # one (map, channel) plane per task; a channel's kernels stay in cache over its maps
            for task in numba.prange(d_count * p_count):
                d, p = task // p_count, task % p_count
                wb = 0 if shared else p
                for y in range(h):
                    out = b[p, d, y]
                    out[:] = 0
                    for i in range(k):
                        yy = y + i - r
                        if yy < 0 or yy >= h:
                            continue
                        src = a[p, d, yy]
                        base = d * kk + i * k
                        if k == 3:  # the reference's kernel size: the row's three taps in one pass
                            w0, w1, w2 = weights[wb, base, y], weights[wb, base + 1, y], weights[wb, base + 2, y]
                            out[0] += w1[0] * src[0] + w2[0] * src[1]
                            for q in range(1, w - 1):
                                out[q] += w0[q] * src[q - 1] + w1[q] * src[q] + w2[q] * src[q + 1]
                            out[w - 1] += w0[w - 1] * src[w - 2] + w1[w - 1] * src[w - 1]
                        else:
                            for j in range(k):
                                dx = j - r
                                lo, hi = max(0, -dx), min(w, w - dx)
                                row, shifted, dst = weights[wb, base + j, y, lo:hi], src[lo + dx : hi + dx], out[lo:hi]
                                for q in range(hi - lo):
                                    dst[q] += row[q] * shifted[q]
            a, b = b, a
        return a

    return propagate


_KERNEL_LOAD_LOCK = threading.Lock()
_KERNEL_LOADED = False


def load_kernel_in_background() -> threading.Thread:
    """Start loading the compiled kernel (from numba's cache, or compiling it on a fresh install)
    in a daemon thread, and return the thread. onnxruntime releases the GIL while it sets up a
    session, so started before the sessions the load costs nothing (0.5 s from the cache on the
    first image otherwise, measured: resnet50@448's segment session took 1.9 s either way).
    A failure here is left for the first real call to raise. Loaded once per process: a later
    backend's load would otherwise run beside an earlier one's kernel, which numba's workqueue
    threading layer does not allow."""

    def load():
        global _KERNEL_LOADED
        with _KERNEL_LOAD_LOCK:
            if _KERNEL_LOADED:
                return
            try:
                propagate_affinity(np.zeros((1, 1, 2, 2), np.float32), np.zeros((1, 9, 2, 2), np.float32), 1)
                _KERNEL_LOADED = True
            except Exception as exc:  # noqa: BLE001 - the real call reports it
                logging.getLogger(__name__).debug("loading the fused propagation kernel failed: %s", exc)

    thread = threading.Thread(target=load, name="iam-propagation-kernel", daemon=True)
    thread.start()
    return thread


def propagate_affinity(x: np.ndarray, kernels: np.ndarray, steps: int, threads: int = 0) -> np.ndarray:
    """T steps of x(p) <- sum_{q in kxk(p)} w_p(q) x(q), per channel, zero padding at the border:
    what ``iam.PropagateAffinity`` computes (iam_train.models.filling). x: (N, D, H, W) float32;
    kernels: (N or 1, D*k*k, H, W) float32, channel d*k*k + i*k + j weighting the neighbour at
    offset (i - k//2, j - k//2). Returns (N, D, H, W). Sums in a different order than the graph's
    body: agreement to float32 rounding, not bit for bit. ``threads`` 0: numba's default."""
    if x.ndim != 4 or kernels.ndim != 4 or kernels.shape[0] not in (1, x.shape[0]) or kernels.shape[2:] != x.shape[2:]:
        raise ValueError(f"propagate_affinity: x {x.shape} and kernels {kernels.shape} do not fit")
    kk, rem = divmod(kernels.shape[1], x.shape[1])
    k = int(round(kk**0.5))
    if rem or k * k != kk or k % 2 == 0:
        raise ValueError(f"kernels have {kernels.shape[1]} channels: not D={x.shape[1]} times an odd k*k")
    kernel = _kernel()
    if threads:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return kernel(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(kernels, dtype=np.float32),
                  int(steps))


@dataclass
class SplitSegmentGraph:
    """A graph cut at its ``iam.PropagateAffinity`` node: the head computes the node's inputs
    ``x`` and ``kernels`` (either may also be a graph input), the tail continues from the
    propagated maps."""

    parts: Partition
    x: str
    kernels: str
    propagated: str
    steps: int

    @property
    def head(self) -> onnx.ModelProto:
        return self.parts.head

    @property
    def tail(self) -> onnx.ModelProto:
        return self.parts.tail


def split_at_propagation(model: onnx.ModelProto) -> SplitSegmentGraph:
    """Cut a graph with exactly one ``iam.PropagateAffinity`` node in its main graph."""
    index = GraphIndex(model)
    props = index.nodes(OP_TYPE, OP_DOMAIN)
    if len(props) != 1:
        raise ValueError(f"the graph has {len(props)} {OP_DOMAIN}.{OP_TYPE} nodes; the fused kernel needs exactly one")
    node = props[0]
    steps = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "steps"), None)
    if steps is None:
        raise ValueError(f"{OP_DOMAIN}.{OP_TYPE} has no steps attribute")
    x, kernels, propagated = node.input[0], node.input[1], node.output[0]
    parts = partition(index, index.downstream([propagated]), [propagated], [x, kernels])
    return SplitSegmentGraph(parts, x, kernels, propagated, int(steps))


class FusedSegmentGraph:
    """A graph run as head session -> :func:`propagate_affinity` -> tail session, with the
    same inputs and outputs as the whole graph's session."""

    def __init__(self, model: onnx.ModelProto, make_session, threads: int = 0):
        """``make_session(model)`` -> an onnxruntime InferenceSession of a cut graph's ModelProto
        (the caller's options), which it may consume."""
        self.split = split_at_propagation(model)
        self.head = make_session(self.split.head)
        self.tail = make_session(self.split.tail)
        self.head_inputs = [i.name for i in self.split.head.graph.input]
        self.threads = threads

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        s, p = self.split, self.split.parts
        values = dict(feeds)
        names = p.head_names
        values.update(zip(names, self.head.run(names, {k: feeds[k] for k in self.head_inputs})))
        values[s.propagated] = propagate_affinity(values[s.x], values[s.kernels], s.steps, self.threads)
        values.update(zip(p.tail_outputs, self.tail.run(p.tail_outputs, {k: values[k] for k in [*p.fed, *p.carried]})))
        return [values[name] for name in output_names]

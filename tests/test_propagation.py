"""The fused CPU kernel of the filling's propagation, and the segment graph split around it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from iam_runtime.backends import BackendError, OnnxRuntimeBackend
from iam_runtime.bundle import SEGMENT_INPUTS, SEGMENT_OUTPUTS, load_bundle
from iam_runtime.propagation import FusedSegmentGraph, propagate_affinity, split_at_propagation


def direct_propagation(x: np.ndarray, kernels: np.ndarray, steps: int) -> np.ndarray:
    """float64, one neighbour at a time: the definition, written independently of both forms."""
    n, d, h, w = x.shape
    k = int(round((kernels.shape[1] // d) ** 0.5))
    r = k // 2
    weights = kernels.astype(np.float64).reshape(kernels.shape[0], d, k, k, h, w)
    x = x.astype(np.float64)
    for _ in range(steps):
        padded = np.pad(x, ((0, 0), (0, 0), (r, r), (r, r)))
        x = sum(weights[:, :, i, j] * padded[:, :, i : i + h, j : j + w] for i in range(k) for j in range(k))
    return x


@pytest.mark.parametrize("k,shared", [(3, True), (3, False), (5, True), (1, False)])
def test_kernel_is_the_propagation(k, shared):
    rng = np.random.default_rng(k)
    x = rng.random((3, 4, 17, 23), dtype=np.float32)
    raw = rng.random((1 if shared else 3, 4, k * k, 17, 23), dtype=np.float32)
    kernels = (raw / raw.sum(2, keepdims=True)).reshape(raw.shape[0], -1, 17, 23)
    got = propagate_affinity(x, kernels, 9)
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, direct_propagation(x, kernels, 9), rtol=1e-5, atol=1e-6)


def test_kernel_refuses_shapes_that_do_not_fit():
    x = np.zeros((2, 4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="not D=4 times an odd k"):
        propagate_affinity(x, np.zeros((1, 16, 8, 8), np.float32), 1)
    with pytest.raises(ValueError, match="do not fit"):
        propagate_affinity(x, np.zeros((1, 36, 9, 8), np.float32), 1)


def test_split_needs_one_propagation_node(trained_bundle):
    detect = onnx.load(str(load_bundle(trained_bundle).graph_path("detect")))
    with pytest.raises(ValueError, match="0 iam.PropagateAffinity nodes"):
        split_at_propagation(detect)


def test_fused_segment_graph_gives_the_graphs_outputs(trained_bundle):
    """Head -> kernel -> tail against the whole segment graph in onnxruntime: the same peak
    response maps (the head is the same nodes), activation maps to float32 rounding."""
    bundle = load_bundle(trained_bundle)
    path = str(bundle.graph_path("segment"))
    model = onnx.load(path)
    split = split_at_propagation(model)
    assert split.parts.head_outputs == ["prm", "crm"] and split.parts.tail_outputs == ["iam"]
    assert not any(n.domain == "iam" for n in [*split.head.graph.node, *split.tail.graph.node])
    fused = FusedSegmentGraph(model, lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]))
    whole = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    size = bundle.manifest.input.size
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 3, *size), dtype=np.float32)
    grid = size[0] // bundle.manifest.peaks.stride * bundle.manifest.peaks.upsample_factor
    peaks = np.array([[c % len(bundle.manifest.classes), (3 * c) % grid, (5 * c) % grid] for c in range(4)], np.int64)
    feeds = dict(zip(SEGMENT_INPUTS, [image, peaks]))
    got = fused.run(list(SEGMENT_OUTPUTS), feeds)
    want = whole.run(list(SEGMENT_OUTPUTS), feeds)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)
    assert got[1].std() > 1e-3  # maps with structure, not a constant


def test_backend_propagation_choice(trained_bundle):
    bundle = load_bundle(trained_bundle)
    assert OnnxRuntimeBackend(bundle, ["CPUExecutionProvider"]).fused_propagation
    assert "fused propagation" in OnnxRuntimeBackend(bundle, ["CPUExecutionProvider"]).describe()
    assert not OnnxRuntimeBackend(bundle, ["CPUExecutionProvider"], propagation="graph").fused_propagation
    with pytest.raises(BackendError, match="unknown propagation 'fast'"):
        OnnxRuntimeBackend(bundle, ["CPUExecutionProvider"], propagation="fast")

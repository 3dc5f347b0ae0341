"""Detect and segment on one forward pass per image: the segment graph cut where the peaks
enter, the detect graph's peak finding run on its class response maps (iam_runtime.staged)."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import onnx
import pytest

from iam_runtime.backends import FORWARD_STATE, BackendError, OnnxRuntimeBackend
from iam_runtime.bundle import MANIFEST, SEGMENT_CRM, load_bundle, sha256_file
from iam_runtime.images import decode_image
from iam_runtime.segmenter import PredictOptions, Segmenter

from .conftest import copy_val_images

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def photos(synthetic, tmp_path_factory):
    folder = copy_val_images(synthetic, tmp_path_factory.mktemp("shared-photos"), 4)
    return [decode_image(p) for p in sorted(folder.iterdir())]


def test_shared_forward_gives_the_two_graphs_results(trained_bundle, photos):
    bundle = load_bundle(trained_bundle)
    shared = OnnxRuntimeBackend(bundle, CPU, propagation="graph", share_forward=True)
    whole = OnnxRuntimeBackend(bundle, CPU, propagation="graph", share_forward=False)
    assert "shared forward" in shared.describe() and "shared forward" not in whole.describe()
    assert "detect" not in shared.sessions  # the detect graph's forward never runs
    seg = Segmenter(bundle, shared)
    tensors = np.stack([seg.preprocess(rgb) for rgb in photos])
    got, want = shared.detect(tensors), whole.detect(tensors)
    states = got.pop(FORWARD_STATE)
    assert len(states) == len(photos) and FORWARD_STATE not in want
    # detect runs the forward pass alone: the rule's factors wait for an image's segment, so an
    # image without peaks never computes them, and what waits between the two is the forward's
    factors = set(shared.shared.factors.tail_outputs)
    assert factors and all(not factors & set(state) for state in states)
    assert "Conv" in {n.op_type for n in shared.shared.factors.tail.graph.node}  # the normalisers
    assert set(got) == set(want)
    np.testing.assert_array_equal(got["peak_counts"], want["peak_counts"])
    np.testing.assert_array_equal(got["peak_coords"], want["peak_coords"])
    np.testing.assert_allclose(got["peak_values"], want["peak_values"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["class_scores"], want["class_scores"], rtol=1e-4, atol=1e-4)
    assert got["peak_counts"].sum() > 0
    for i, state in enumerate(states):
        n = int(got["peak_counts"][i])
        if not n:
            continue
        peaks = got["peak_coords"][i, :n]
        a, b = shared.segment(tensors[i : i + 1], peaks, state), whole.segment(tensors[i : i + 1], peaks)
        assert factors <= set(state)  # computed once: a second chunk of this image's peaks reuses them
        np.testing.assert_array_equal(shared.segment(tensors[i : i + 1], peaks, state)["iam"], a["iam"])
        for name in ("prm", "iam"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5 * float(np.abs(b[name]).max()))
        # without the state from detect, segment computes it: the same maps
        np.testing.assert_array_equal(shared.segment(tensors[i : i + 1], peaks)["iam"], a["iam"])
        # an empty state is filled for the image's later chunks (peaks another segmenter found)
        filled: dict = {}
        np.testing.assert_array_equal(shared.segment(tensors[i : i + 1], peaks, filled)["iam"], a["iam"])
        assert set(shared.shared.kept_names) | factors <= set(filled)
        kept = dict(filled)
        np.testing.assert_array_equal(shared.segment(tensors[i : i + 1], peaks, filled)["iam"], a["iam"])
        assert all(filled[k] is v for k, v in kept.items())  # reused, not computed again


def test_segmenter_consumes_the_state_and_matches_whole_graphs(trained_bundle, photos):
    bundle = load_bundle(trained_bundle)
    shared = Segmenter(bundle, OnnxRuntimeBackend(bundle, CPU, share_forward=True))
    whole = Segmenter(bundle, OnnxRuntimeBackend(bundle, CPU, share_forward=False))
    tensors = np.stack([shared.preprocess(rgb) for rgb in photos])
    found = shared.detect(tensors)
    with_peaks = [p for p in found if len(p)]
    assert with_peaks and all(p.forward for p in with_peaks)
    assert all(p.forward is None for p in found if not len(p))
    maps = [shared.segment(t, p) for t, p in zip(tensors, found)]
    assert all(p.forward is None for p in found)  # released once the image is segmented
    for t, p, m in zip(tensors, whole.detect(tensors), maps):
        np.testing.assert_allclose(m, whole.segment(t, p), atol=1e-4)
    # peaks one shared segmenter found, handed to another engine: segmented on that engine's own
    # forward pass (the state's tensors belong to the first's graphs), the first's state kept for it
    other = Segmenter(bundle, OnnxRuntimeBackend(bundle, CPU, share_forward=True))
    t, p = next((t, p) for t, p in zip(tensors, shared.detect(tensors)) if len(p))
    sent = pickle.loads(pickle.dumps(p))  # as Ray's stages pass peaks on: without the process's state
    assert p.forward is not None and sent.forward is None and sent.forward_engine is None
    np.testing.assert_array_equal(sent.coords, p.coords)
    theirs = other.segment(t, p)
    assert p.forward is not None  # left for the segmenter that made it
    np.testing.assert_allclose(theirs, shared.segment(t, p), atol=1e-5)
    assert p.forward is None
    np.testing.assert_allclose(shared.segment(t, sent), theirs, atol=1e-5)
    # detect goes image by image where the forward is shared; predict_batch gives the same instances
    assert shared.detect_batch(8) == 1 and whole.detect_batch(8) == 8
    options = PredictOptions(refine="threshold")
    a, b = (Segmenter(bundle, s.backend, options).predict_batch(photos[:3]) for s in (shared, whole))
    assert [len(x) for x in a] == [len(x) for x in b] and sum(map(len, a)) > 0
    for xs, ys in zip(a, b):
        for x, y in zip(xs, ys):
            assert (x.class_index, x.peak) == (y.class_index, y.peak)
            assert (x.mask != y.mask).mean() < 1e-3


def _bundle_without_crm(src, dst):
    """A bundle as an earlier iam-export wrote it: the segment graph without its crm output."""
    shutil.copytree(src, dst)
    path = dst / "segment.onnx"
    model = onnx.load(str(path))
    keep = [o for o in model.graph.output if o.name != SEGMENT_CRM]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, str(path))
    manifest = json.loads((dst / MANIFEST).read_text())
    graph = manifest["graphs"]["segment"]
    graph["sha256"] = sha256_file(path)
    graph["outputs"] = [o for o in graph["outputs"] if o["name"] != SEGMENT_CRM]
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return load_bundle(dst)


def test_bundles_without_the_crm_output_run_both_forwards(trained_bundle, tmp_path):
    old = _bundle_without_crm(trained_bundle, tmp_path / "old")
    backend = OnnxRuntimeBackend(old, CPU)
    assert backend.shared is None and "detect" in backend.sessions
    with pytest.raises(BackendError, match="no 'crm' output"):
        OnnxRuntimeBackend(old, CPU, share_forward=True)
    assert OnnxRuntimeBackend(load_bundle(trained_bundle), CPU).shared is not None  # the default where it can


def test_detached_weights_give_the_same_session():
    """A cut graph's weights handed to onnxruntime beside the graph (iam_runtime.graph_split)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from iam_runtime.backends import cut_graph_session
    from iam_runtime.graph_split import detach_weights

    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((16, 8, 3, 3), np.float32), rng.standard_normal(16, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((1, 8, 6, 6), np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=CPU).run(None, {"x": x})[0]

    data, weights = detach_weights(onnx.ModelProto.FromString(model.SerializeToString()))
    assert list(weights) == ["w"] and np.array_equal(weights["w"], weight)  # the 64-byte bias stays in
    assert len(data) < weight.nbytes
    got = cut_graph_session(ort, model, ort.SessionOptions(), providers=CPU).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    with pytest.raises(Exception, match="External data"):  # the graph alone no longer holds them
        ort.InferenceSession(data, providers=CPU)

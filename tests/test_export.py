"""iam-export: ONNX bundle with iam custom ops, parity with PyTorch, TensorRT checks (issue 4)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from iam_export import onnx_ops
from iam_export.cli import main as export_cli
from iam_export.export_onnx import ExportError, ExportOptions, export_bundle
from iam_export.rewrites import conv_transpose_as_conv
from iam_export.tensorrt_build import inline_for_tensorrt, static_check
from iam_runtime.bundle import BundleError, load_bundle
from iam_train.checkpoint import save_checkpoint
from iam_train.models import InstanceExtentFilling, ResNetFCN
from iam_train.models.peaks import _find_peaks_impl, find_peaks_op

from .conftest import randomise_batchnorm, shared_path

CLASSES = ["circle", "cross", "square", "triangle"]
SIZE = 64


def write_checkpoints(root, classes=CLASSES, seed=0):
    """A PRM and a filling checkpoint of tiny random models, in iam-train's format."""
    torch.manual_seed(seed)
    backbone = ResNetFCN("resnet18", num_classes=len(classes)).eval()
    randomise_batchnorm(backbone)
    filling = InstanceExtentFilling(backbone.feature_channels, channels=4, hidden=8, steps=4).eval()
    randomise_batchnorm(filling)
    meta = {"classes": classes, "arch": "resnet18", "image_size": SIZE, "upsample_factor": 4, "win_size": 3,
            "threshold_mode": "median"}
    prm = root / "prm.pt"
    save_checkpoint(prm, "iam-prm", {"model": backbone.state_dict(), "epoch": 1, **meta})
    fill = root / "filling.pt"
    save_checkpoint(fill, "iam-filling", {"model": filling.state_dict(), "epoch": 1, "prm_meta": meta,
                                          "filling": {"channels": 4, "kernel_size": 3, "hidden": 8, "steps": 4}})
    return prm, fill


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    prm, fill = write_checkpoints(root)
    export_bundle(prm, fill, root / "bundle", ExportOptions(max_peaks=16), log=lambda *_: None)
    return root / "bundle"


def test_bundle_manifest_and_parity(bundle):
    b = load_bundle(bundle)
    m = b.manifest
    assert m.classes == CLASSES and m.input.size == [SIZE, SIZE]
    assert m.peaks.upsample_factor == 4 and m.filling.steps == 4
    assert {g: [t.name for t in s.inputs] for g, s in m.graphs.items()} == {"detect": ["images"],
                                                                            "segment": ["image", "peaks"]}
    assert m.graphs["detect"].inputs[0].shape == ["batch", 3, SIZE, SIZE]
    assert m.graphs["segment"].inputs[1].shape == ["peaks", 3]
    assert {"torch", "onnx", "onnxruntime", "iam"} <= set(m.producer)
    rows = m.verification["rows"]
    assert m.verification["passed"] and all(r["ok"] for r in rows)
    # dynamic batch 1 and 3, dynamic peak count 1 and 7; peak coordinates identical
    assert {r["graph"] for r in rows} == {"detect/1", "detect/3", "segment/1", "segment/7"}
    assert all(r["max_abs"] == 0 for r in rows if r["output"] in ("peak_coords", "peak_counts"))


def test_graphs_hold_iam_nodes_with_function_definitions(bundle):
    for key, op in (("detect", "FindPeaks"), ("segment", "PropagateAffinity")):
        model = onnx.load(bundle / f"{key}.onnx")
        assert [n.op_type for n in model.graph.node if n.domain == "iam"] == [op]
        assert [(f.domain, f.name) for f in model.functions] == [("iam", op)]
        assert any(o.domain == "iam" for o in model.opset_import)
        onnx_ops.register_schemas()
        onnx.checker.check_model(model, full_check=True)
        inlined = inline_for_tensorrt(model)
        assert not [n for n in inlined.graph.node if n.domain == "iam"]
        assert static_check(model) == []


def test_segment_graph_runs_any_peak_count(bundle):
    sess = ort.InferenceSession(str(bundle / "segment.onnx"), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).normal(size=(1, 3, SIZE, SIZE)).astype(np.float32)
    for n in (1, 2, 5):
        peaks = np.stack([np.arange(n) % 4, np.arange(n) % 8, (3 * np.arange(n)) % 8], axis=1).astype(np.int64)
        prm, iam = sess.run(None, {"image": image, "peaks": peaks})
        assert prm.shape == iam.shape == (n, SIZE, SIZE)
        np.testing.assert_allclose(prm.sum(axis=(1, 2)), 1.0, rtol=1e-4)
        assert iam.min() >= 0 and iam.max() <= 1


def _conv_transpose_model(rng) -> onnx.ModelProto:
    """x (2, 32, 9, 11) through five ConvTransposes: four eligible for the Conv rewrite (1x1,
    3x3 padded with bias, 5x5 dilated with asymmetric pads, weight computed in the graph) and a
    stride-2 one and a 1-channel one that must stay."""
    h = onnx.helper
    inits, nodes = [], []

    def weight(name, shape):
        inits.append(onnx.numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name))
        return name

    nodes.append(h.make_node("ConvTranspose", ["x", weight("w1", (32, 24, 1, 1))], ["a"], kernel_shape=[1, 1]))
    nodes.append(h.make_node("ConvTranspose", ["a", weight("w2", (24, 16, 3, 3)), weight("b2", (16,))], ["b"],
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    nodes.append(h.make_node("Relu", [weight("w3", (16, 16, 5, 5))], ["w3pos"]))
    nodes.append(h.make_node("ConvTranspose", ["b", "w3pos"], ["c"], kernel_shape=[5, 5], dilations=[2, 1],
                             pads=[3, 2, 4, 1]))
    nodes.append(h.make_node("ConvTranspose", ["c", weight("w4", (16, 16, 3, 3))], ["d"], kernel_shape=[3, 3],
                             strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]))
    nodes.append(h.make_node("ConvTranspose", ["d", weight("w5", (16, 1, 3, 3))], ["y"], kernel_shape=[3, 3],
                             pads=[1, 1, 1, 1]))
    graph = h.make_graph(nodes, "t", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 32, 9, 11])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 1, 20, 24])], inits)
    # IR 10 (opset 20's), not onnx's newest default, which older onnxruntime releases refuse
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 20)], ir_version=10)


def test_conv_transpose_rewrite_is_exact():
    rng = np.random.default_rng(0)
    model = _conv_transpose_model(rng)
    x = rng.normal(size=(2, 32, 9, 11)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rewritten, count = conv_transpose_as_conv(onnx.ModelProto.FromString(model.SerializeToString()))
    onnx.checker.check_model(rewritten, full_check=True)
    assert count == 3
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("Conv") == 3 and ops.count("ConvTranspose") == 2
    after = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert after.shape == before.shape
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())


class _PeaksOnly(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, crm):
        return find_peaks_op(crm, **self.kw)


@pytest.mark.parametrize("mode", ["median", "mean", "max", "constant"])
@pytest.mark.parametrize("ties", [False, True])
def test_find_peaks_function_in_onnxruntime_equals_torch_op(mode, ties):
    # 112x112 = 12544 values per map (14x14 upsampled 8x, or plateaus of integers given at
    # 112x112): the median needs the chunked form. Plateaus are tested without upsampling, where
    # values are exact; upsampled, onnxruntime's Resize and torch differ in the last bit.
    g = torch.Generator().manual_seed(1)
    if ties:
        crm, factor = torch.randint(0, 3, (2, 3, 112, 112), generator=g).float(), 1
    else:
        crm, factor = torch.randn(2, 3, 14, 14, generator=g), 8
    kw = dict(win_size=3, threshold_mode=mode, threshold_value=0.1, upsample_factor=factor, max_peaks=40)
    model = torch.onnx.export(_PeaksOnly(**kw), (crm,), dynamo=True, custom_translation_table=onnx_ops.translation_table(),
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).model_proto
    onnx_ops.attach_functions(model, [onnx_ops.find_peaks_function(3, tuple(crm.shape[2:]), 20, **kw)])
    assert static_check(model) == []  # includes TopK K <= 3840 for the median chunks
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (crm, crm[:1]):
        got = sess.run(None, {sess.get_inputs()[0].name: batch.numpy()})
        want = _find_peaks_impl(batch, **kw)
        np.testing.assert_array_equal(got[0], want[0].numpy())  # peak maps
        np.testing.assert_array_equal(got[3], want[3].numpy())  # counts
        # equal values rank by lower flat index first in both (ONNX TopK's rule, a stable sort)
        np.testing.assert_array_equal(got[1], want[1].numpy())
        np.testing.assert_allclose(got[2], want[2].numpy(), rtol=1e-5, atol=1e-6)


def test_static_check_catches_what_tensorrt_rejects():
    class Bad(torch.nn.Module):
        def forward(self, x):
            pooled, idx = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
            return pooled, idx, torch.topk(x.flatten(), 5000).values, torch.nonzero(x > 0)

    model = torch.onnx.export(Bad(), (torch.randn(1, 1, 80, 80),), dynamo=True).model_proto
    problems = "\n".join(static_check(model))
    assert "MaxPool index output" in problems and "K = 5000 > 3840" in problems and "NonZero" in problems


def test_tensorrt_parser_accepts_the_graphs(bundle):
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx (TensorRT's CPU-installable parser) is not installed")
    from iam_export.tensorrt_build import BuildOptions, build_engine, parse_onnx, profiles_for

    b = load_bundle(bundle)
    for key in ("detect", "segment"):
        _, network, _, _ = parse_onnx(trt, onnx.load(bundle / f"{key}.onnx"), strongly_typed=True)
        assert network.num_layers > 10
    options = BuildOptions(max_batch=4, opt_batch=2)
    blob = build_engine(trt, onnx.load(bundle / "detect.onnx"), profiles_for("detect", b.manifest.graphs["detect"].inputs,
                                                                             options), options)
    assert len(blob) > 1000


def _has_gpu_tensorrt() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (it needs an NVIDIA GPU machine and the 'gpu' extra)"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    return None


@pytest.mark.skipif(_has_gpu_tensorrt() is not None, reason=str(_has_gpu_tensorrt()))
def test_tensorrt_engines_match_onnx(bundle, tmp_path):
    import shutil

    from iam_export.tensorrt_build import BuildOptions, build_bundle_engines
    from iam_runtime.backends import TensorRTBackend

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    engines = build_bundle_engines(copy, BuildOptions(max_batch=4, opt_batch=2, max_peaks=8, opt_peaks=4))
    assert {e.graph for e in engines} == {"detect", "segment"}
    b = load_bundle(copy)
    images = np.random.default_rng(0).normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    want = ort.InferenceSession(str(copy / "detect.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": images})
    got = TensorRTBackend(b).detect(images)
    np.testing.assert_allclose(got["class_scores"], want[0], rtol=1e-2, atol=1e-2)


def test_tensorrt_command_without_tensorrt_is_a_clear_error(bundle):
    if _has_gpu_tensorrt() is None:
        pytest.skip("TensorRT and a GPU are present")
    result = CliRunner().invoke(export_cli, ["tensorrt", str(bundle)])
    assert result.exit_code == 1 and "Error:" in result.output and "Traceback" not in result.output


def test_int8_qdq_detect_graph_on_cpu(bundle, tmp_path):
    from iam_export.tensorrt_build import quantize_int8

    rng = np.random.default_rng(0)
    calib = [rng.normal(size=(1, 3, SIZE, SIZE)).astype(np.float32) for _ in range(4)]
    quantize_int8(bundle / "detect.onnx", tmp_path / "detect.int8.onnx", calib)
    model = onnx.load(tmp_path / "detect.int8.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 5 and "FindPeaks" in ops
    assert static_check(model) == []
    got = ort.InferenceSession(str(tmp_path / "detect.int8.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"images": calib[0]})
    want = ort.InferenceSession(str(bundle / "detect.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"images": calib[0]})
    assert got[0].shape == want[0].shape and np.corrcoef(got[0].ravel(), want[0].ravel())[0, 1] > 0.9


def test_reference_checkpoints_export_and_match(tmp_path):
    from .test_reference_checkpoint import random_state

    layout = json.loads(shared_path("reference-checkpoint-layout.json").read_text())
    torch.save({"arch": "resnet50", "epoch": 20, "state_dict": random_state(layout["prm"], 0)},
               tmp_path / "model_prm_latest.pth.tar")
    torch.save({"arch": "fill", "epoch": 20, "state_dict": random_state(layout["filling"], 1)},
               tmp_path / "model_filling_latest.pth.tar")
    result = CliRunner().invoke(export_cli, [
        "onnx", "--from-reference", "--prm", str(tmp_path / "model_prm_latest.pth.tar"),
        "--filling", str(tmp_path / "model_filling_latest.pth.tar"), "--out", str(tmp_path / "ref"),
        "--image-size", "64", "--steps", "2", "--max-peaks", "8"])
    assert result.exit_code == 0, result.output
    m = load_bundle(tmp_path / "ref").manifest
    assert len(m.classes) == 20 and m.classes[0] == "aeroplane" and m.producer["source"] == "reference"
    assert m.verification["passed"] and "segment/1" in {r["graph"] for r in m.verification["rows"]}


def test_bad_inputs_are_clear_and_leave_nothing(tmp_path, bundle):
    prm, fill = write_checkpoints(tmp_path)
    with pytest.raises(Exception, match="is a iam-filling checkpoint, expected iam-prm"):
        export_bundle(fill, fill, tmp_path / "x", ExportOptions())
    other_prm, _ = write_checkpoints(tmp_path / "..", classes=["a", "b"])
    with pytest.raises(ExportError, match="classes"):
        export_bundle(other_prm, fill, tmp_path / "y", ExportOptions())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty; pass --force"):
        export_bundle(prm, fill, tmp_path / "busy", ExportOptions())
    (tmp_path / "afile").write_text("")
    with pytest.raises((ExportError, OSError)):
        export_bundle(prm, fill, tmp_path / "afile" / "bundle", ExportOptions())
    # a failing verification leaves no bundle and no partial folder behind
    import iam_export.verify as verify

    old = dict(verify.TOLERANCE)
    verify.TOLERANCE["fp32"] = -1.0
    try:
        with pytest.raises(ExportError, match="tolerance"):
            export_bundle(prm, fill, tmp_path / "failed", ExportOptions(max_peaks=4))
    finally:
        verify.TOLERANCE.update(old)
    assert not (tmp_path / "failed").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    # the runtime refuses tampered bundles, naming the problem
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "detect.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(copy)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(copy)

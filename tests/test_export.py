"""iam-export: ONNX bundle with iam custom ops, parity with PyTorch, TensorRT checks (issue 4)."""

from __future__ import annotations

import json
import shutil

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
from iam_export.verify import compare, compare_detect, format_table
from iam_runtime.bundle import BundleError, load_bundle
from iam_train.checkpoint import PRMMetadata, save_checkpoint
from iam_train.models import InstanceExtentFilling, ResNetFCN
from iam_train.models.peaks import _find_peaks_impl, find_peaks_op

from .conftest import randomise_batchnorm

CLASSES = ["circle", "cross", "square", "triangle"]
SIZE = 64


def write_checkpoints(root, classes=CLASSES, seed=0):
    """A PRM and a filling checkpoint of tiny random models, in iam-train's format."""
    torch.manual_seed(seed)
    backbone = ResNetFCN("resnet18", num_classes=len(classes)).eval()
    randomise_batchnorm(backbone)
    filling = InstanceExtentFilling(backbone.feature_channels, channels=4, hidden=8, steps=4).eval()
    randomise_batchnorm(filling)
    meta = PRMMetadata(tuple(classes), "resnet18", SIZE, 4, 3, "median").to_dict()
    prm = root / "prm.pt"
    save_checkpoint(prm, "iam-prm", {"model": backbone.state_dict(), "epoch": 1, **meta})
    fill = root / "filling.pt"
    save_checkpoint(fill, "iam-filling", {"model": filling.state_dict(), "epoch": 1, "prm_meta": meta,
                                          "filling": filling.architecture()})
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
    assert {g: [t.name for t in s.inputs] for g, s in m.graphs.items()} == {
        "detect": ["images"], "segment": ["image", "peaks"], "crf": ["rgb", "probs", "kernel"]}
    assert m.graphs["detect"].inputs[0].shape == ["batch", 3, SIZE, SIZE]
    assert m.graphs["segment"].inputs[1].shape == ["peaks", 3]
    assert {"torch", "onnx", "onnxruntime", "iam"} <= set(m.producer)
    rows = m.verification["rows"]
    assert m.verification["passed"] and all(r["ok"] for r in rows)
    # dynamic batch 1 and 3, dynamic peak count 1 and 7; peak coordinates identical
    assert {r["graph"] for r in rows} == {"detect/1", "detect/3", "segment/1", "segment/7"}
    assert all(r["max_abs"] == 0 for r in rows if r["output"] in ("peak_coords", "peak_counts"))


def test_crf_graph_in_the_bundle_and_added_to_an_old_one(bundle, tmp_path):
    """Every bundle carries the CRF graph (issue 16); one made before it gets it from
    ``iam-export crf``, and without it the runtime builds the same graph in memory."""
    import shutil

    from iam_runtime.crf_graph import CRFGraph
    from iam_runtime.refine import crf_kernel

    b = load_bundle(bundle)
    assert [t.dtype for t in b.manifest.graphs["crf"].inputs] == ["uint8", "float32", "float32"]
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["graphs"]["crf"]
    (old / "crf.onnx").unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert "crf" not in load_bundle(old).manifest.graphs
    result = CliRunner().invoke(export_cli, ["crf", str(old)])
    assert result.exit_code == 0 and "5 mean-field iterations" in result.output, result.output
    assert load_bundle(old).manifest.graphs["crf"].sha256 == b.manifest.graphs["crf"].sha256
    again = CliRunner().invoke(export_cli, ["crf", str(old)])
    assert again.exit_code != 0 and "has a CRF graph already" in again.output
    rng = np.random.default_rng(0)
    rgb, probs = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), rng.random((2, 24, 32), dtype=np.float32)
    in_bundle = CRFGraph(str(old / "crf.onnx"), 5).foreground(rgb, probs, crf_kernel(b.manifest.crf))
    in_memory = CRFGraph(None, 5).foreground(rgb, probs, crf_kernel(b.manifest.crf))
    np.testing.assert_array_equal(in_bundle, in_memory)
    with pytest.raises(ValueError, match="runs 5 mean-field iterations, the run asks for 3"):
        CRFGraph(str(old / "crf.onnx"), 3)


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
        prm, iam, crm = sess.run(None, {"image": image, "peaks": peaks})
        assert prm.shape == iam.shape == (n, SIZE, SIZE)
        assert crm.shape[0] == 1 and crm.shape[2:] == (SIZE // 32, SIZE // 32)
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


class _RuleNormaliser(torch.nn.Module):
    """x (1, 1, 1, W) -> the rule's 1 / (|N| + eps) (0 where N < eps) at a 1x1 conv of weight 1."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1, bias=False)
        torch.nn.init.ones_(self.conv.weight)

    def forward(self, x):
        from iam_train.models.peak_backprop import _ConvRule

        return _ConvRule(self.conv, x).inv_norm


def test_exported_rule_keeps_its_eps():
    """torch.onnx.export's optimizer takes x + c for a no-op when c is a scalar under 1e-8: the rule's
    eps (1e-10) must reach the graph, where N (here x - min x) is within a few decades of it."""
    from iam_export.export_onnx import _export

    x = torch.tensor([[[[0.0, 5e-11, 1e-10, 2e-10, 1e-9, 1e-8, 1e-6, 1.0]]]])
    model = _export(_RuleNormaliser().eval(), (x,), None, ["x"], ["inv_norm"], 20)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = _RuleNormaliser().eval()(x).numpy()
    assert want[0, 0, 0, 2] == pytest.approx(5e9, rel=1e-6)  # 1 / (1e-10 + 1e-10), not 1 / 1e-10
    np.testing.assert_allclose(got, want, rtol=1e-6)


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
    engines = build_bundle_engines(copy, BuildOptions(max_batch=4, opt_batch=2, max_segment_peaks=8, opt_segment_peaks=4))
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


def _photos(folder, count: int):
    """Real photos (scikit-image's), at the bundle's size, as calibration images."""
    from PIL import Image
    from skimage import data

    folder.mkdir()
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"][:count]):
        Image.fromarray(getattr(data, name)()).resize((SIZE * 2, SIZE * 2)).save(folder / f"{i}_{name}.jpg")
    return folder


def test_int8_selects_the_rules_convolutions_by_their_positive_weights():
    """backward_convs: convs of transposed W+ (a Relu node, or relu(W) the exporter folded into a
    non-negative constant), spatially flipped or not; not the filling decoder's transposed convs,
    which the rewrite also turns into convs of flipped, transposed weights. normaliser_convs:
    convs of W+ (either form) over x - min(x); not a conv of W+ over anything else, nor of W."""
    from onnx import TensorProto, helper, numpy_helper

    from iam_export.int8 import backward_convs, normaliser_convs, segment_int8_convs

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.abs(rng.standard_normal((4, 4, 1, 1))).astype(np.float32), "relu_folded"),
             numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "decode_w")]
    for name, value in (("starts", [-1, -1]), ("ends", [-(2**62), -(2**62)]), ("axes", [2, 3]), ("steps", [-1, -1])):
        inits.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    flip = ["starts", "ends", "axes", "steps"]
    nodes = [
        helper.make_node("Relu", ["w"], ["w_pos"]),
        helper.make_node("Slice", ["w_pos", *flip], ["w_pos_flipped"]),
        helper.make_node("Transpose", ["w_pos_flipped"], ["w_backward"], perm=[1, 0, 2, 3]),
        helper.make_node("Conv", ["x", "w_backward"], ["y1"], name="backward_3x3", pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["relu_folded"], ["w_backward_1x1"], perm=[1, 0, 2, 3]),
        helper.make_node("Conv", ["y1", "w_backward_1x1"], ["y2"], name="backward_1x1"),
        helper.make_node("Slice", ["decode_w", *flip], ["decode_flipped"]),
        helper.make_node("Transpose", ["decode_flipped"], ["decode_conv_w"], perm=[1, 0, 2, 3]),
        helper.make_node("Conv", ["y2", "decode_conv_w"], ["y3"], name="decoder", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["y3", "w"], ["y4"], name="forward", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMin", ["y4"], ["y4_min"], keepdims=1),
        helper.make_node("Sub", ["y4", "y4_min"], ["y4_shifted"]),
        helper.make_node("Conv", ["y4_shifted", "w_pos"], ["y5"], name="normaliser", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["y5", "w_pos"], ["y6"], name="positive_not_shifted", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMin", ["y6"], ["y6_min"], keepdims=1),
        helper.make_node("Sub", ["y6", "y6_min"], ["y6_shifted"]),
        helper.make_node("Conv", ["y6_shifted", "relu_folded"], ["y7"], name="normaliser_folded"),
        helper.make_node("Conv", ["y7", "w"], ["y"], name="forward_over_shifted", pads=[1, 1, 1, 1]),
    ]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8, 8])  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "g", [vi("x")], [vi("y")], inits))
    assert backward_convs(model) == ["backward_3x3", "backward_1x1"]
    assert normaliser_convs(model) == ["normaliser", "normaliser_folded"]
    assert segment_int8_convs(model) == ["backward_3x3", "backward_1x1", "normaliser", "normaliser_folded"]


def test_int8_percentile_ranges_follow_the_values_not_their_extremes(tmp_path):
    """On heavy-tailed activations (peak backprop's are) a min/max range gives the bulk of the
    values a few levels; the percentile calibration's range is the values' percentile, to the
    resolution of the histograms it merges over the feeds (collected one at a time)."""
    from onnx import helper, numpy_helper

    from iam_export.int8 import Int8Settings, _quantize

    vi = lambda name: helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1, 4, 32, 32])  # noqa: E731
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32)[:, :, None, None], "w")
    model = helper.make_model(helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                                                [vi("x")], [vi("y")], [weight]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"x": (rng.exponential(1.0, (1, 4, 32, 32)) ** 3).astype(np.float32)} for _ in range(3)]
    feeds[1]["x"][0, 0, 0, :3] = 1e4  # a few outliers
    values = np.concatenate([f["x"].ravel() for f in feeds])

    def input_scale(settings):
        out = tmp_path / f"{settings.calibration}.onnx"
        _quantize(tmp_path / "m.onnx", out, feeds, None, settings)
        inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
        return float(inits["x_scale"])

    minmax = input_scale(Int8Settings(calibration="minmax"))
    percentile = input_scale(Int8Settings(calibration="percentile", percentile=99.9))
    assert minmax == pytest.approx(values.max() / 255, rel=1e-3)
    upper = np.quantile(values, 1 - (100 - 99.9) / 200)  # onnxruntime cuts half the rest at each end
    assert percentile * 255 == pytest.approx(upper, rel=0.05)
    assert percentile < minmax / 10
    with pytest.raises(ValueError, match=r"percentile must be in \(50, 100\]"):
        Int8Settings(percentile=20)


def test_int8_bundle_from_the_cli(tmp_path):
    """iam-export onnx --precision int8: Q/DQ on detect's convolutions and on peak backprop's
    backward convolutions and normalisers only; the iam ops kept; the agreement with fp32 measured and recorded;
    TensorRT's static checks pass; the runtime runs it, with the fused propagation."""
    from iam_export.int8 import normaliser_convs, segment_int8_convs
    from iam_runtime.backends import OnnxRuntimeBackend
    from iam_runtime.segmenter import Segmenter

    prm, fill = write_checkpoints(tmp_path)
    photos = _photos(tmp_path / "calib", 5)
    # a copy of a calibration photo, sorted last: kept, it would be "held out" while calibrating
    shutil.copy(photos / "0_astronaut.jpg", photos / "5_astronaut_again.jpg")
    out = tmp_path / "int8"
    result = CliRunner().invoke(export_cli, ["onnx", "--prm", str(prm), "--filling", str(fill), "--out", str(out),
                                             "--max-peaks", "8", "--precision", "int8", "--calib-images", str(photos)])
    assert result.exit_code == 0, result.output
    assert "int8 against fp32 on 2 images" in result.output and "precision int8" in result.output
    assert "skipped 1 image(s)" in result.output and "5_astronaut_again.jpg" in result.output
    b = load_bundle(out)
    assert {k: (g.file, g.precision) for k, g in b.manifest.graphs.items() if k != "crf"} == {
        "detect": ("detect.int8.onnx", "int8"), "segment": ("segment.int8.onnx", "int8")}
    assert not (out / "detect.onnx").exists() and not (out / "segment.onnx").exists()
    measured = b.manifest.verification["int8"]
    assert measured["images"] == 2 and measured["calibration_images"] == 3 and measured["activations"] == "u8"
    assert measured["calibration"] == "percentile" and measured["percentile"] == 99.99
    assert 0 <= measured["peaks_identical"] <= 1 and measured["masks"] > 0
    # on the CPU the peaks come from the segment graph's forward pass, which int8 leaves fp32
    assert measured["peaks_identical_shared_forward"] == 1.0

    fp32 = tmp_path / "fp32"
    export_bundle(prm, fill, fp32, ExportOptions(max_peaks=8, verify=False), log=lambda *_: None)
    # TensorRT takes symmetric int8 only: a u8 bundle is refused with the way out
    result = CliRunner().invoke(export_cli, ["tensorrt", str(out)])
    assert result.exit_code != 0 and "--int8-activations s8" in result.output and "Traceback" not in result.output
    s8 = tmp_path / "int8-s8"
    result = CliRunner().invoke(export_cli, ["onnx", "--prm", str(prm), "--filling", str(fill), "--out", str(s8),
                                             "--max-peaks", "8", "--precision", "int8", "--int8-activations", "s8",
                                             "--calib-images", str(photos), "--no-verify"])
    assert result.exit_code == 0, result.output
    zero_points = [t for t in onnx.load(s8 / "detect.int8.onnx").graph.initializer if t.name.endswith("_zero_point")]
    assert zero_points and all(not onnx.numpy_helper.to_array(t).any() for t in zero_points)
    for key, iam_op in (("detect", "FindPeaks"), ("segment", "PropagateAffinity")):
        model = onnx.load(s8 / f"{key}.int8.onnx")
        ops = [n.op_type for n in model.graph.node]
        assert iam_op in ops and static_check(model) == []
        model = onnx.load(out / f"{key}.int8.onnx")
        producer = {o: n for n in model.graph.node for o in n.output}
        quantised = [n for n in model.graph.node if n.op_type == "Conv" and n.input[0] in producer
                     and producer[n.input[0]].op_type == "DequantizeLinear"]
        convs = [n for n in onnx.load(fp32 / f"{key}.onnx").graph.node if n.op_type == "Conv"]
        if key == "detect":
            assert len(quantised) == len(convs)
        else:  # the backward pass and the normalisers: the forward's activations steer the rule
            segment = onnx.load(fp32 / "segment.onnx")
            assert normaliser_convs(segment) and {n.name for n in quantised} == set(segment_int8_convs(segment))

    rgb = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(next(photos.iterdir())).convert("RGB"))
    seg8 = Segmenter(b, OnnxRuntimeBackend(b, ["CPUExecutionProvider"]))
    assert seg8.backend.fused_propagation
    seg32 = Segmenter.from_bundle(fp32, providers=["CPUExecutionProvider"])
    x = seg32.preprocess(rgb)
    peaks = seg32.detect(x[None])[0]
    assert len(peaks)
    maps8, maps32 = seg8.segment(x, peaks), seg32.segment(x, peaks)
    assert maps8.shape == maps32.shape
    assert np.corrcoef(maps8.ravel(), maps32.ravel())[0, 1] > 0.9
    assert len(seg8.predict(rgb)) > 0


def test_int8_needs_calibration_images(tmp_path):
    prm, fill = write_checkpoints(tmp_path)
    args = ["onnx", "--prm", str(prm), "--filling", str(fill), "--out", str(tmp_path / "b"), "--precision", "int8"]
    result = CliRunner().invoke(export_cli, args)
    assert result.exit_code != 0 and "--calib-images" in result.output and "Traceback" not in result.output
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(export_cli, [*args, "--calib-images", str(tmp_path / "empty")])
    assert result.exit_code != 0 and "no readable images" in result.output
    result = CliRunner().invoke(export_cli, [*args, "--calib-images", str(tmp_path / "empty"), "--calib-percentile", "20"])
    assert result.exit_code != 0 and "percentile must be in (50, 100]" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


def _detect_outputs(maps: torch.Tensor, k: int) -> list[np.ndarray]:
    """What a detect graph returns for these (already upsampled) maps: the torch op's outputs."""
    peak_map, coords, values, counts = _find_peaks_impl(maps, 3, "median", 0.0, 1, k)
    from iam_train.models.peaks import peak_stimulated_scores

    return [t.numpy() for t in (peak_stimulated_scores(maps, peak_map), coords, values, counts)]


def _near_tie_maps() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 8x8 maps as two correct engines might compute them, differing by 2e-3 where a peak
    decision is marginal: a window maximum just below the lower median in one and just above it
    in the other (so one engine has a peak the other lacks), and two equal neighbouring maxima
    that one engine breaks the other way."""
    values = torch.arange(64, dtype=torch.float32)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    a = values[order].view(1, 1, 8, 8).clone()
    # the window maximum at (4, 4): value 30.999, its neighbours all below 30
    low = [v for v in range(30)]
    a[0, 0].view(-1)[(a[0, 0].view(-1) == 30).nonzero()] = a[0, 0, 4, 4].clone()
    a[0, 0, 4, 4] = 30.999
    for (dy, dx), v in zip([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)], low[-8:]):
        y, x = 4 + dy, 4 + dx
        a[0, 0].view(-1)[(a[0, 0].view(-1) == v).nonzero()] = a[0, 0, y, x].clone()
        a[0, 0, y, x] = v
    # a second map: a tie between two neighbours at the top, 63 and 63
    b = torch.linspace(-5, 5, 64).view(1, 1, 8, 8).flip(-1).clone()
    b[0, 0, 0, 0] = b[0, 0, 0, 1] = 63.0
    maps = torch.cat([a, b], dim=1)
    other = maps.clone()
    other[0, 0, 4, 4] = 31.001  # now the map's lower median: a peak
    other[0, 1, 0, 1] = 63.002  # the second of the tied pair wins
    return maps, other


def test_detect_verification_accepts_marginal_peaks_only():
    maps, other = _near_tie_maps()
    thresholds = torch.stack([m.flatten().kthvalue(32).values for m in maps[0]]).view(1, 2, 1, 1)
    want, got = _detect_outputs(maps, 16), _detect_outputs(other, 16)
    assert int(got[3][0]) == int(want[3][0]) + 1  # the engines disagree on a peak...
    assert not all(r.ok for r in compare("detect/1", ["class_scores", "peak_coords", "peak_values", "peak_counts"],
                                         got, want, "fp32"))  # ...which exact comparison calls an error
    rows = compare_detect("detect/1", maps.numpy(), thresholds.numpy(), 3, want, got, "fp32")
    assert all(r.ok for r in rows), format_table(rows)
    # real errors still fail: a peak moved, a value off by 1%, a score off, a strong peak dropped
    broken = [a.copy() for a in got]
    broken[1][0, 0] = [0, 7, 7]
    assert not compare_detect("d", maps.numpy(), thresholds.numpy(), 3, want, broken, "fp32")[1].ok
    broken = [a.copy() for a in got]
    broken[2][0, 0] *= 1.01
    assert not compare_detect("d", maps.numpy(), thresholds.numpy(), 3, want, broken, "fp32")[2].ok
    broken = [a.copy() for a in got]
    broken[0][0, 1] += 0.5
    assert not compare_detect("d", maps.numpy(), thresholds.numpy(), 3, want, broken, "fp32")[0].ok
    broken = [a.copy() for a in got]
    n, j = int(broken[3][0]), int(np.flatnonzero((got[1][0, :, 0] == 0) & (got[2][0] == 63.0))[0])
    broken[1][0, j : n - 1], broken[2][0, j : n - 1] = got[1][0, j + 1 : n], got[2][0, j + 1 : n]
    broken[1][0, n - 1], broken[2][0, n - 1], broken[3][0] = -1, 0.0, n - 1
    assert not compare_detect("d", maps.numpy(), thresholds.numpy(), 3, want, broken, "fp32")[1].ok


def test_a_broken_graph_fails_verification(bundle, tmp_path):
    """The same verification that passes the bundle fails it with a weight tensor altered: the
    classifier's first filter 2% larger (detect), a filling decoder filter negated (segment)."""
    from iam_export.export_onnx import load_models, verify_graphs

    prm, fill = write_checkpoints(tmp_path)
    options = ExportOptions(max_peaks=16)
    models = load_models(prm, fill, options)
    paths = {"detect": bundle / "detect.onnx", "segment": bundle / "segment.onnx"}
    assert all(r.ok for r in verify_graphs(paths, models, options, "fp32"))
    for key, name, factor in (("detect", "backbone.classifier.weight", 1.02),
                              ("segment", "filling.decode.decode1.0.weight", -1.0)):
        model = onnx.load(bundle / f"{key}.onnx")
        weight = next(t for t in model.graph.initializer if t.name.endswith(name))
        array = onnx.numpy_helper.to_array(weight).copy()
        array[0] *= factor
        weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
        onnx.save(model, tmp_path / f"{key}.onnx")
        rows = verify_graphs({**paths, key: tmp_path / f"{key}.onnx"}, models, options, "fp32")
        failed = {r.graph.split("/")[0] for r in rows if not r.ok}
        assert failed == {key}, format_table(rows)


def test_batch_statistics_batchnorm_in_onnx_equals_torch_train_mode():
    """The filling network's BatchNorm with batch statistics, exported, against torch's own
    train-mode BatchNorm with momentum 0 over the same peaks (running statistics untouched)."""
    from iam_train.models.filling import BatchNorm2d, ConvNorm

    torch.manual_seed(0)
    block = ConvNorm(torch.nn.Conv2d(1, 6, 3, padding=1), BatchNorm2d(6)).eval()
    randomise_batchnorm(block)
    block[1].batch_statistics = True
    prm = torch.rand(5, 1, 40, 40)
    prm = prm / prm.sum(dim=(2, 3), keepdim=True)  # peak response maps: a bias 1e5 times the signal
    program = torch.onnx.export(block, (prm[:2],), dynamo=True, dynamic_shapes=({0: torch.export.Dim("p", min=1)},),
                                verbose=False)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/bn.onnx"
        program.save(path)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        reference = torch.nn.BatchNorm2d(6, momentum=0.0).train()
        reference.load_state_dict(block[1].state_dict())
        before = reference.running_mean.clone()
        for n in (1, 5):
            got = session.run(None, {session.get_inputs()[0].name: prm[:n].numpy()})[0]
            with torch.no_grad():
                want = reference(block[0](prm[:n].double().float()))
            np.testing.assert_allclose(got, want.numpy(), atol=2e-4, rtol=0)
            np.testing.assert_allclose(block(prm[:n]).detach().numpy(), want.numpy(), atol=2e-4, rtol=0)
        torch.testing.assert_close(reference.running_mean, before)
    # the statistics are the batch's: one peak's output depends on the others
    assert not np.allclose(session_output := block(prm[:1]).detach().numpy(), block(prm[:2])[:1].detach().numpy())
    assert session_output.shape == (1, 6, 40, 40)


def test_manifest_round_trips_every_field_with_infinities(bundle, tmp_path):
    import dataclasses
    import shutil

    from iam_runtime.bundle import save_manifest

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    m = load_bundle(copy).manifest
    m.peaks = dataclasses.replace(m.peaks, class_threshold=float("-inf"), peak_threshold=float("inf"), nms_iou=None)
    m.filling = dataclasses.replace(m.filling, normalization="batch", align_corners=True)
    m.crf = dataclasses.replace(m.crf, frame="image")
    save_manifest(copy, m)
    assert load_bundle(copy).manifest == m
    data = json.loads((copy / "manifest.json").read_text())
    assert data["peaks"]["class_threshold"] == "-inf"
    data["filling"]["normalization"] = "batches"
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="normalization: 'batches' is not one of running, batch"):
        load_bundle(copy)


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

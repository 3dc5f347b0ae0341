"""int8 graphs: explicit Q/DQ (onnxruntime's static quantisation), per-channel symmetric int8
weights, activation ranges calibrated on images (by default each activation's 99.99th percentile;
``minmax``: its extremes), the activations in one of two forms:

* ``u8`` (default): asymmetric uint8 activations, onnxruntime's fast path on x86 (U8S8): the
  resnet50@448 detect graph ran at 0.067 s per image against 0.118 s in fp32 (batch 8, 2 cores);
* ``s8``: symmetric int8 activations (zero point 0), what TensorRT takes; on onnxruntime's CPU
  provider slower than fp32 (0.130 s per image, the same run).

Both run anywhere onnxruntime does; TensorRT engines are built from ``s8`` bundles.

What is quantised, and why:

* detect: every convolution (the backbone and the classifier). Peak finding stays fp32.
* segment: the convolutions of peak backprop's backward pass (the transposed convolutions with
  the positive weights, the bulk of the graph's work: one per conv per peak). The forward pass
  stays fp32: its activations decide the backward rule's masks, shifts and max-pool routing
  (which compares values for equality) and its normalisers 1 / (|N| + eps); quantised, they
  zeroed every peak response map (measured: resnet50@448, 5 peaks, all maps 0). The filling
  network stays fp32 (a small share of the work).

The agreement of an int8 bundle with its fp32 graphs is measured at export on the calibration
images and recorded in the manifest (``verification.int8``); it is not a parity check, so the
export reports it rather than failing on it. On the CPU the runtime finds peaks on the segment
graph's forward pass (the shared forward, :mod:`iam_runtime.staged`), which is fp32: there the
int8 detect graph's convolutions do not run, and the peaks are fp32's
(``peaks_identical_shared_forward``); ``peaks_identical`` is the int8 detect graph's, as GPUs
and ``--no-share-forward`` run it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from iam_runtime.bundle import DETECT_INPUTS, SEGMENT_INPUTS

CALIBRATION_PEAKS = 4  # per image, the highest
AGREEMENT_PEAKS = 8  # per image, the highest (memory: resnet50@448 needs about 0.5 GB per peak)


@dataclass
class CalibrationSample:
    image: np.ndarray  # (1, 3, S, S) float32, preprocessed
    peaks: np.ndarray  # (P, 3) int64, the fp32 bundle's selected peaks of the image (may be empty)


def _reader(items: list[dict]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(items)

        def get_next(self):
            return next(self.items, None)

    return Reader()


ACTIVATIONS = ("u8", "s8")
CALIBRATIONS = ("percentile", "minmax")
DEFAULT_PERCENTILE = 99.99


@dataclass(frozen=True)
class Int8Settings:
    """How the graphs are quantised. ``calibration``: ``percentile`` takes each activation's range
    as the ``percentile`` of its calibration values (the backward pass's activations are
    heavy-tailed: a min/max range leaves most of them a few levels); ``minmax`` their extremes."""

    activations: str = "u8"
    calibration: str = "percentile"
    percentile: float = DEFAULT_PERCENTILE

    def __post_init__(self):
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"unknown int8 activations {self.activations!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"unknown int8 calibration {self.calibration!r}; "
                             f"choose one of {', '.join(CALIBRATIONS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"the calibration percentile must be in (50, 100], not {self.percentile}")


def _percentile_ranges(model_path: Path, feeds: list[dict], symmetric: bool, percentile: float) -> dict:
    """Per-tensor (rmin, rmax) of every Conv's tensors: the ``percentile`` of each one's values over
    ``feeds`` (onnxruntime's percentile calibrator, 2048 bins), as ``TensorQuantOverrides``. The
    feeds run one at a time, so memory holds one feed's activations, not all of them."""
    import contextlib
    import io
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # its progress prints
        calibrator = create_calibrator(model_path, ["Conv"], augmented_model_path=Path(tmp) / "augmented.onnx",
                                       calibrate_method=CalibrationMethod.Percentile,
                                       extra_options={"symmetric": symmetric, "percentile": percentile, "num_bins": 2048})
        for feed in feeds:
            calibrator.collect_data(_reader([feed]))
        ranges = calibrator.compute_data()
    return {name: [{"rmin": data.range_value[0], "rmax": data.range_value[1]}] for name, data in ranges.items()}


def _quantize(model_path: Path, out_path: Path, feeds: list[dict], nodes: list[str] | None,
              settings: Int8Settings) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise ValueError("no calibration inputs")
    symmetric = settings.activations == "s8"
    extra = {"ActivationSymmetric": symmetric, "WeightSymmetric": True}
    if settings.calibration == "percentile":
        # The ranges come in as overrides; onnxruntime's own min/max pass then needs one feed only.
        extra["TensorQuantOverrides"] = _percentile_ranges(model_path, feeds, symmetric, settings.percentile)
        feeds = feeds[:1]
    quantize_static(str(model_path), str(out_path), _reader(feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["Conv"], nodes_to_quantize=nodes, per_channel=True,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, extra_options=extra)


def quantize_detect(model_path: Path, out_path: Path, images: list[np.ndarray],
                    settings: Int8Settings = Int8Settings()) -> None:
    """Every Conv of the detect graph; ``images``: (1, 3, S, S) preprocessed arrays."""
    _quantize(model_path, out_path, [{DETECT_INPUTS[0]: im} for im in images], None, settings)


def _positive_part(name: str, producer: dict, inits: dict) -> bool:
    """Whether the weight tensor ``name`` is relu(W), seen through the transposes and flips of a
    backward convolution: a Relu node, or a non-negative constant the exporter folded."""
    from onnx import numpy_helper

    while name in producer and producer[name].op_type in ("Transpose", "Slice"):
        name = producer[name].input[0]
    if name in producer:
        return producer[name].op_type == "Relu"
    return name in inits and bool((numpy_helper.to_array(inits[name]) >= 0).all())


def backward_convs(model: onnx.ModelProto) -> list[str]:
    """The segment graph's backward-pass convolutions: those whose weights the graph derives from
    the model's weights by a transpose of their positive part (W+, spatially flipped where the
    kernel is larger than 1x1), rather than takes as they are. The filling decoder's transposed
    convolutions, rewritten as convolutions of flipped weights too, are not W+ and stay fp32."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "Conv" and n.input[1] not in inits and n.input[1] in producer
            and producer[n.input[1]].op_type == "Transpose" and _positive_part(n.input[1], producer, inits)]


def normaliser_convs(model: onnx.ModelProto) -> list[str]:
    """The modified rule's normalisers N = conv(x - m, W+), one per convolution and image (the
    segment graph's image stage): convolutions of relu(W) (a Relu node, or a non-negative
    constant the exporter folded) whose input is a Sub of a ReduceMin. Their inputs and weights
    are non-negative, and N only scales the relevance it divides."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def shifted(name: str) -> bool:
        sub = producer.get(name)
        return (sub is not None and sub.op_type == "Sub" and sub.input[1] in producer
                and producer[sub.input[1]].op_type == "ReduceMin")

    return [n.name for n in model.graph.node
            if n.op_type == "Conv" and _positive_part(n.input[1], producer, inits) and shifted(n.input[0])]


def segment_int8_convs(model: onnx.ModelProto) -> list[str]:
    """What an int8 segment graph quantises: the backward pass's convolutions and the rule's
    normalisers (not the forward pass, whose activations steer the rule, nor the filling)."""
    return backward_convs(model) + normaliser_convs(model)


def fold_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold the main graph (the backward weights become initialisers, so that they get
    per-channel scales); function bodies are left as they are."""
    import onnx_ir
    import onnxscript.optimizer

    ir_model = onnx_ir.from_proto(model)
    onnxscript.optimizer.fold_constants(ir_model, onnx_shape_inference=False, input_size_limit=1 << 31,
                                        output_size_limit=1 << 31)
    return onnx_ir.to_proto(ir_model)


def quantize_segment(model_path: Path, out_path: Path, samples: list[CalibrationSample],
                     settings: Int8Settings = Int8Settings()) -> None:
    model = onnx.load(str(model_path))
    nodes = segment_int8_convs(model)
    if not nodes:
        raise ValueError(f"{model_path} has no backward-pass convolutions or normalisers to quantise")
    folded = out_path.with_name(out_path.stem + ".folded.onnx")
    onnx.save(fold_weights(model), folded)
    try:
        # Each peak's backward pass is its own (the quantised convolutions mix no peaks), so a few
        # peaks per image give the ranges; all of them would multiply the calibration's memory.
        feeds = [dict(zip(SEGMENT_INPUTS, [s.image, s.peaks[:CALIBRATION_PEAKS]])) for s in samples if len(s.peaks)]
        if not feeds:
            raise ValueError("no calibration image has a peak to segment")
        _quantize(folded, out_path, feeds, nodes, settings)
    finally:
        folded.unlink(missing_ok=True)


def _peaks_identical(segmenter, samples: list[CalibrationSample]) -> float | None:
    """The fraction of ``samples`` on which ``segmenter`` selects their (fp32) peaks, as a set."""
    same = [sorted(map(tuple, segmenter.detect(s.image)[0].coords.tolist())) == sorted(map(tuple, s.peaks.tolist()))
            for s in samples]
    return float(np.mean(same)) if same else None


def agreement(fp32, int8, samples: list[CalibrationSample], max_peaks: int, int8_shared=None) -> dict:
    """``fp32`` and ``int8``: :class:`iam_runtime.segmenter.Segmenter` over each form of one
    bundle, ``int8`` running its detect graph. On ``samples`` (their fp32 peaks selected as the
    runtime does): the fraction of images whose int8 graphs select the same peaks (the same
    (class, y, x) set), and the mean IoU of the activation maps' masks (>= the bundle's mask
    threshold) per peak, both segment graphs given the fp32 graph's first ``max_peaks`` peaks.
    ``int8_shared``: the int8 form with the shared forward (peaks found on the segment graph's
    forward pass, which stays fp32), measured as ``peaks_identical_shared_forward``."""
    threshold = fp32.manifest.filling.mask_threshold
    ious = []
    for s in samples:
        if len(s.peaks):
            peaks = np.ascontiguousarray(s.peaks[:max_peaks])
            ma, mb = (seg.backend.segment(s.image, peaks)["iam"] >= threshold for seg in (fp32, int8))
            for x, y in zip(ma, mb):
                union = np.logical_or(x, y).sum()
                ious.append(float(np.logical_and(x, y).sum() / union) if union else 1.0)
    out = {"images": len(samples), "peaks_identical": _peaks_identical(int8, samples),
           "mask_iou_mean": float(np.mean(ious)) if ious else None,
           "mask_iou_min": float(np.min(ious)) if ious else None, "masks": len(ious)}
    if int8_shared is not None:
        out["peaks_identical_shared_forward"] = _peaks_identical(int8_shared, samples)
    return out


def quantize_bundle(root: Path, calib_images: Path, count: int, settings: Int8Settings = Int8Settings(), log=print):
    """Turn the fp32 bundle at ``root`` (complete, manifest included) into an int8 one, in place:
    the calibration images' peaks come from the fp32 bundle as the runtime selects them; the first
    three quarters of the folder's distinct images calibrate, the rest measure the agreement (all
    of them when fewer than 4; copies are skipped, see :func:`~iam_runtime.images.calibration_batches`). Returns the new manifest; the agreement is its ``verification["int8"]``."""
    import copy

    from iam_runtime.backends import OnnxRuntimeBackend
    from iam_runtime.bundle import Bundle, load_bundle, save_manifest, sha256_file
    from iam_runtime.images import calibration_batches
    from iam_runtime.segmenter import Segmenter

    def segmenter(bundle: Bundle, share_forward: bool | None = None) -> Segmenter:
        # the graphs' own propagation: the kernel (and numba's threads) stay out of the exporting process
        return Segmenter(bundle, OnnxRuntimeBackend(bundle, ["CPUExecutionProvider"], propagation="graph",
                                                    share_forward=share_forward))

    fp32_bundle = load_bundle(root)
    fp32 = segmenter(fp32_bundle)
    images = calibration_batches(calib_images, fp32_bundle.manifest, limit=count, log=lambda m: log(f"int8: {m}"))
    samples = [CalibrationSample(im, fp32.detect(im)[0].coords) for im in images]
    split = len(samples) * 3 // 4 if len(samples) >= 4 else len(samples)
    calibration, held_out = samples[:split], samples[split:] or samples
    log(f"int8: calibrating on {len(calibration)} images of {calib_images}, measuring on {len(held_out)}"
        + ("" if samples[split:] else " (the same: fewer than 4 images)"))
    fp32_paths = {key: fp32_bundle.graph_path(key) for key in ("detect", "segment")}
    manifest = copy.deepcopy(fp32_bundle.manifest)
    for key, path in fp32_paths.items():
        quantised = root / f"{key}.int8.onnx"
        if key == "detect":
            quantize_detect(path, quantised, [s.image for s in calibration], settings)
        else:
            quantize_segment(path, quantised, calibration, settings)
        spec = manifest.graphs[key]
        spec.file, spec.sha256, spec.precision = quantised.name, sha256_file(quantised), "int8"
    int8_bundle = Bundle(root, manifest)
    shared = segmenter(int8_bundle)  # the CPU runtime's default, where the bundle allows it
    shared = shared if shared.backend.shared is not None else None
    measured = agreement(fp32, segmenter(int8_bundle, share_forward=False), held_out, AGREEMENT_PEAKS, shared)
    measured.update(calibration_images=len(calibration), **dataclasses.asdict(settings))
    for path in fp32_paths.values():
        path.unlink()
    manifest.verification["int8"] = measured
    save_manifest(root, manifest)
    summary = f"int8 against fp32 on {measured['images']} images: peaks identical on {measured['peaks_identical']:.0%}"
    if measured.get("peaks_identical_shared_forward") is not None:
        summary += f" (with the shared forward, the CPU's default: {measured['peaks_identical_shared_forward']:.0%})"
    log(summary + (f", activation masks mean IoU {measured['mask_iou_mean']:.3f} (min {measured['mask_iou_min']:.3f}, "
                   f"{measured['masks']} masks)" if measured["masks"] else "; no peaks to compare masks on"))
    return manifest

"""``iam-export onnx``: checkpoints -> a verified ONNX bundle (written to a temporary folder,
then renamed into place)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

import iam_runtime
from iam_runtime.bundle import (
    DETECT_INPUTS,
    DETECT_OUTPUTS,
    SEGMENT_CRM,
    SEGMENT_INPUTS,
    SEGMENT_OUTPUTS,
    CRFSpec,
    FillingSpec,
    GraphSpec,
    InputSpec,
    Manifest,
    PeakSpec,
    TensorSpec,
    save_manifest,
    sha256_file,
)
from iam_runtime.voc import IMAGENET_MEAN, IMAGENET_STD, VOC_CLASSES
from iam_train.checkpoint import PRMMetadata, load_checkpoint
from iam_train.models import (
    InstanceExtentFilling,
    ReferenceSettings,
    ResNetFCN,
    load_reference_filling,
    load_reference_prm,
    read_reference_config,
)
from iam_train.models.peaks import map_threshold, upsample_crm

from . import onnx_ops
from .crf import CRF_GRAPH, write_crf_graph
from .graphs import DetectGraph, SegmentGraph
from .int8 import Int8Settings, quantize_bundle
from .rewrites import conv_transpose_as_conv
from .verify import ParityRow, compare, compare_detect, format_table, rows_as_dicts


class ExportError(ValueError):
    """An export that cannot proceed; the message says why."""


@dataclass
class ExportOptions:
    """What to export and with which semantics. The semantics fields left at None take the
    checkpoints' own: for ``from_reference``, the reference's inference (docs/method.md, section 7:
    class score >= -3, peak value > 30, every valid peak kept without NMS, batch-statistics
    filling); for our checkpoints, ours (0, -inf, NMS at 0.5, running statistics)."""

    image_size: int | None = None  # default: the size the PRM network was trained at
    opset: int = 20
    max_peaks: int = 100
    precision: str = "fp32"  # fp32 | fp16 (convolution trunk) | int8 (Q/DQ, calibrated on calib_images)
    calib_images: str | Path | None = None  # with int8: a folder of representative images
    int8_activations: str = Int8Settings.activations  # with int8: u8 (onnxruntime's fast CPU path) | s8 (TensorRT)
    int8_calibration: str = Int8Settings.calibration  # with int8: activation ranges, percentile | minmax
    int8_percentile: float = Int8Settings.percentile  # with int8 and percentile calibration
    calib_count: int = 16  # with int8: images used (the fp32 peaks of the later quarter measure the agreement)
    verify: bool = True
    from_reference: bool = False
    reference_config: str | Path | None = None  # the reference's config.yml (with from_reference)
    steps: int | None = None  # filling propagation steps; default: as trained
    class_threshold: float | None = None
    peak_threshold: float | None = None
    nms_iou: float | None = None  # a value > 1 turns NMS off
    filling_normalization: str | None = None  # "running" | "batch"
    force: bool = False


# The semantics of each source when the options leave them open.
REFERENCE_SELECTION = {"class_threshold": -3.0, "peak_threshold": 30.0, "nms_iou": None, "normalization": "batch"}
OWN_SELECTION = {"class_threshold": 0.0, "peak_threshold": float("-inf"), "nms_iou": 0.5, "normalization": "running"}


@dataclass
class LoadedModels:
    backbone: ResNetFCN
    filling: InstanceExtentFilling
    classes: list[str]
    image_size: int
    win_size: int
    threshold_mode: str
    upsample_factor: int
    threshold_value: float = 0.0
    class_threshold: float = 0.0
    peak_threshold: float = float("-inf")
    nms_iou: float | None = 0.5

    @property
    def peak_kwargs(self) -> dict:
        return dict(win_size=self.win_size, threshold_mode=self.threshold_mode, threshold_value=self.threshold_value,
                    upsample_factor=self.upsample_factor)


def load_models(prm: str | Path, filling: str | Path, options: ExportOptions) -> LoadedModels:
    """Our run checkpoints (kind-checked) or, with ``from_reference``, the reference's."""
    if options.reference_config and not options.from_reference:
        raise ExportError("--reference-config goes with --from-reference")
    if options.from_reference:
        settings = read_reference_config(options.reference_config) if options.reference_config else ReferenceSettings()
        backbone = load_reference_prm(prm)
        fill = load_reference_filling(filling, steps=options.steps or settings.iterate_num)
        mode, value = settings.threshold
        models = LoadedModels(backbone, fill, list(VOC_CLASSES), settings.image_size, settings.win_size, mode,
                              settings.sub_pixel_locating_factor, value)
        defaults = REFERENCE_SELECTION
    else:
        from iam_train.train_filling import load_prm

        backbone, meta = load_prm(prm)
        ckpt = load_checkpoint(Path(filling) / "best.pt" if Path(filling).is_dir() else filling, "iam-filling")
        trained_on = PRMMetadata.from_dict(ckpt["prm_meta"], str(filling)).classes
        if trained_on != meta.classes:
            raise ExportError(f"the filling checkpoint was trained with a PRM network of classes {list(trained_on)}, "
                              f"but {prm} has {list(meta.classes)}")
        fill = InstanceExtentFilling.from_architecture(backbone.feature_channels, ckpt["filling"], steps=options.steps)
        try:
            fill.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise ExportError(f"the filling checkpoint does not fit the {meta.arch} backbone: {exc}") from exc
        models = LoadedModels(backbone, fill, list(meta.classes), meta.image_size, meta.win_size,
                              meta.threshold_mode, meta.upsample_factor)
        defaults = OWN_SELECTION
    models.class_threshold = _pick(options.class_threshold, defaults["class_threshold"])
    models.peak_threshold = _pick(options.peak_threshold, defaults["peak_threshold"])
    nms = _pick(options.nms_iou, defaults["nms_iou"])
    models.nms_iou = None if nms is None or nms > 1 else nms
    models.filling.normalization = _pick(options.filling_normalization, defaults["normalization"])
    if options.image_size:
        models.image_size = options.image_size
    if models.image_size % 32:
        raise ExportError(f"image size {models.image_size} is not a multiple of 32")
    models.backbone.eval()
    models.filling.eval()
    return models


def _pick(value, default):
    return default if value is None else value


def _tensor_specs(values: list[onnx.ValueInfoProto]) -> list[TensorSpec]:
    names = {1: "float32", 10: "float16", 7: "int64", 9: "bool", 2: "uint8"}
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append(TensorSpec(v.name, names.get(t.elem_type, str(t.elem_type)), shape))
    return out


def _export(module, args, dynamic_shapes, input_names, output_names, opset) -> onnx.ModelProto:
    program = torch.onnx.export(module, args, dynamo=True, custom_translation_table=onnx_ops.translation_table(),
                                dynamic_shapes=dynamic_shapes, input_names=input_names, output_names=output_names,
                                opset_version=opset, verbose=False)
    return program.model_proto




def build_graphs(models: LoadedModels, options: ExportOptions) -> dict[str, onnx.ModelProto]:
    s = models.image_size
    peak_kwargs = dict(**models.peak_kwargs, max_peaks=options.max_peaks)
    detect = DetectGraph(models.backbone, **peak_kwargs).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    detect_model = _export(detect, (torch.randn(2, 3, s, s),), ({0: batch},), list(DETECT_INPUTS), list(DETECT_OUTPUTS), options.opset)
    onnx_ops.attach_functions(detect_model, [onnx_ops.find_peaks_function(
        len(models.classes), (s // 32, s // 32), options.opset, **peak_kwargs)])

    segment = SegmentGraph(models.backbone, models.filling, models.upsample_factor).eval()
    peaks = torch.export.Dim("peaks", min=1, max=4096)
    example_peaks = torch.tensor([[0, 0, 0], [0, 1, 1]], dtype=torch.int64)
    segment_model = _export(segment, (torch.randn(1, 3, s, s), example_peaks), (None, {0: peaks}),
                            list(SEGMENT_INPUTS), [*SEGMENT_OUTPUTS, SEGMENT_CRM], options.opset)
    f = models.filling
    onnx_ops.attach_functions(segment_model, [onnx_ops.propagate_affinity_function(
        f.channels, f.kernel_size, (s // 4, s // 4), f.steps, options.opset)])
    for model in (detect_model, segment_model):
        conv_transpose_as_conv(model)
        onnx.checker.check_model(model, full_check=True)
    return {"detect": detect_model, "segment": segment_model}


def verify_graphs(paths: dict[str, Path], models: LoadedModels, options: ExportOptions, precision: str,
                  seed: int = 0) -> list[ParityRow]:
    """Run onnxruntime (CPU) next to PyTorch: detect on 1 and 3 images, segment on 1 and up to 7 peaks."""
    import onnxruntime as ort

    s = models.image_size
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, s, s, generator=g)
    detect = DetectGraph(models.backbone, **models.peak_kwargs, max_peaks=options.max_peaks).eval()
    det_sess = ort.InferenceSession(str(paths["detect"]), providers=["CPUExecutionProvider"])
    rows = []
    with torch.no_grad():
        for n in (1, 3):
            ref = [t.numpy() for t in detect(images[:n])]
            got = det_sess.run(list(DETECT_OUTPUTS), dict(zip(DETECT_INPUTS, [images[:n].numpy()])))
            maps = upsample_crm(models.backbone(images[:n]).crm, models.upsample_factor)
            thresholds = map_threshold(maps, models.threshold_mode, models.threshold_value)
            rows += compare_detect(f"detect/{n}", maps.numpy(), thresholds.numpy(), models.win_size, ref, got,
                                   precision)
        scores, coords, values, counts = detect(images[:1])
        peaks = coords[0, : min(7, int(counts[0]))]
        if len(peaks) < 7:  # top up with other grid locations: any (class, y, x) is a valid input
            grid = (s // 32) * models.upsample_factor
            extra = torch.tensor([[i % len(models.classes), (3 * i) % grid, (5 * i) % grid] for i in range(7)])
            peaks = torch.cat([peaks, extra])[:7]
        segment = SegmentGraph(models.backbone, models.filling, models.upsample_factor).eval()
        seg_sess = ort.InferenceSession(str(paths["segment"]), providers=["CPUExecutionProvider"])
        for n in sorted({1, len(peaks)}):
            ref = [t.numpy() for t in segment(images[:1], peaks[:n])]
            names = [*SEGMENT_OUTPUTS, SEGMENT_CRM]
            got = seg_sess.run(names, dict(zip(SEGMENT_INPUTS, [images[:1].numpy(), peaks[:n].numpy()])))
            rows += compare(f"segment/{n}", names, got, ref, precision)
    return rows


def _versions() -> dict[str, str]:
    import onnxruntime
    import onnxscript
    import torchvision

    return {"iam": iam_runtime.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


def _check_destination(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty; pass --force to replace it")
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write to {parent}")


PRECISIONS = ("fp32", "fp16", "int8")


def _int8_settings(options: ExportOptions) -> Int8Settings:

    try:
        return Int8Settings(options.int8_activations, options.int8_calibration, options.int8_percentile)
    except ValueError as exc:
        raise ExportError(f"int8: {exc}") from exc


def _check_precision(options: ExportOptions) -> None:
    if options.precision not in PRECISIONS:
        raise ExportError(f"unknown precision {options.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if options.precision == "int8":
        if options.calib_images is None:
            raise ExportError("--precision int8 needs --calib-images DIR (a folder of representative images)")
        if not Path(options.calib_images).is_dir():
            raise ExportError(f"calibration folder not found: {options.calib_images}")
        if options.calib_count < 2:
            raise ExportError("--calib-count must be at least 2")
        _int8_settings(options)
    elif options.calib_images is not None:
        raise ExportError("--calib-images goes with --precision int8")


def export_bundle(prm: str | Path, filling: str | Path, out: str | Path, options: ExportOptions,
                  log=print) -> Manifest:
    """Export, verify and write a bundle; nothing is left at ``out`` unless all of it succeeded."""
    out = Path(out)
    _check_precision(options)
    _check_destination(out, options.force)
    models = load_models(prm, filling, options)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        started = time.perf_counter()
        graphs = build_graphs(models, options)
        precision = "fp32"
        if options.precision == "fp16":
            from .fp16 import convert_to_fp16

            graphs = {k: convert_to_fp16(m) for k, m in graphs.items()}
            precision = "fp16"
        paths = {}
        specs = {}
        for key, model in graphs.items():
            path = tmp / f"{key}.onnx"
            onnx.save(model, path)
            paths[key] = path
            specs[key] = GraphSpec(path.name, sha256_file(path), _tensor_specs(list(model.graph.input)),
                                   _tensor_specs(list(model.graph.output)), precision, options.opset)
        crf = CRFSpec()  # the reference's kernels; the CRF graph unrolls its iterations
        specs[CRF_GRAPH] = write_crf_graph(tmp, crf.iterations)
        export_s = time.perf_counter() - started
        verification: dict = {"export_seconds": round(export_s, 2)}
        if options.verify:
            rows = verify_graphs(paths, models, options, precision)
            log(format_table(rows))
            verification.update(precision=precision, rows=rows_as_dicts(rows), passed=all(r.ok for r in rows))
            if not verification["passed"]:
                raise ExportError("exported graphs differ from PyTorch beyond the tolerance (table above)")
        manifest = Manifest(
            classes=models.classes,
            input=InputSpec([models.image_size, models.image_size], list(IMAGENET_MEAN), list(IMAGENET_STD)),
            peaks=PeakSpec(models.win_size, models.threshold_mode, models.threshold_value, models.upsample_factor,
                           options.max_peaks, models.class_threshold, models.peak_threshold, nms_iou=models.nms_iou),
            filling=FillingSpec(models.filling.channels, models.filling.kernel_size, models.filling.steps,
                                normalization=models.filling.normalization,
                                align_corners=models.filling.align_corners),
            crf=crf,
            graphs=specs,
            producer={**_versions(), "source": "reference" if options.from_reference else "iam-train",
                      "prm": str(prm), "filling": str(filling), "backbone": models.backbone.arch},
            verification=verification,
        )
        save_manifest(tmp, manifest)
        if options.precision == "int8":
            try:
                manifest = quantize_bundle(tmp, Path(options.calib_images), options.calib_count,
                                           _int8_settings(options), log)
            except ValueError as exc:
                raise ExportError(f"int8: {exc}") from exc
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def options_from(**kwargs) -> ExportOptions:
    names = {f.name for f in dataclasses.fields(ExportOptions)}
    return ExportOptions(**{k: v for k, v in kwargs.items() if k in names and v is not None})

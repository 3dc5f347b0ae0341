"""The bundle: the only contract between iam-export and the runtime.

A bundle is a directory with ``manifest.json``, the ONNX graphs and optionally TensorRT engines.
This module defines the manifest's schema once: the exporter writes through :func:`save_manifest`
and the runtime reads through :func:`load_bundle`, which refuses what it does not understand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import atomic_write_text

FORMAT = "iam-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle the runtime cannot use; the message says why."""


@dataclass
class TensorSpec:
    name: str
    dtype: str  # "float32", "float16", "int64", "bool"
    shape: list[int | str]  # symbolic dimensions by name


@dataclass
class GraphSpec:
    file: str
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: str = "fp32"  # fp32, fp16, int8
    opset: int = 20


@dataclass
class EngineSpec:
    graph: str  # key in ``graphs``
    file: str
    sha256: str
    gpu: str
    compute_capability: str
    tensorrt_version: str
    precision: str
    profiles: dict[str, list[list[int]]] = field(default_factory=dict)  # input -> [min, opt, max] shapes


@dataclass
class InputSpec:
    size: list[int]  # [height, width] the graphs take
    mean: list[float]
    std: list[float]
    color: str = "RGB"
    resize: str = "bilinear"  # the image is stretched to size, as in training


@dataclass
class PeakSpec:
    """Which peaks become instances. The reference's: class score >= -3, peak value > 30, every
    valid peak kept (no cap below the detect graph's K, no NMS)."""

    win_size: int = 3
    threshold_mode: str = "median"
    threshold_value: float = 0.0
    upsample_factor: int = 8
    max_peaks: int = 100  # per image, in the detect graph's fixed-size outputs
    class_threshold: float = 0.0  # a class is present when its score (a logit) is >= this
    peak_threshold: float = float("-inf")  # and a peak is used when its value is > this
    stride: int = 32  # CRM cell j is centred on input pixel stride * j
    # Same-class masks overlapping more than this: the lower-scored is dropped (with empty masks).
    # None: every valid peak's instance is kept, duplicates included (the reference).
    nms_iou: float | None = 0.5


FILLING_NORMALIZATIONS = ("running", "batch")


@dataclass
class FillingSpec:
    channels: int = 16
    kernel_size: int = 3
    steps: int = 112
    mask_threshold: float = 0.5  # instance activation map -> mask when no CRF is used
    # "running": BatchNorm on running statistics (peaks independent of each other); "batch": each
    # BatchNorm on the statistics of the image's peaks together (the reference's inference), so
    # the segment graph must get all of an image's peaks in one call. Bundles written before this
    # field: "running".
    normalization: str = "running"
    align_corners: bool = False  # the feature pyramid's upsampling, baked into the segment graph


CRF_FRAMES = ("input", "image")


@dataclass
class CRFSpec:
    iterations: int = 5
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    # "input": on the image resized to the network's input size (the reference's frame; kernel
    # widths in its pixels; cost independent of the photo's size), masks brought to the photo's
    # size from the refined probabilities. "image": at the photo's resolution.
    frame: str = "input"


@dataclass
class Manifest:
    classes: list[str]
    input: InputSpec
    peaks: PeakSpec
    filling: FillingSpec
    crf: CRFSpec
    graphs: dict[str, GraphSpec]
    engines: list[EngineSpec] = field(default_factory=list)
    producer: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(_encode_floats(dataclasses.asdict(self)), indent=2, allow_nan=False)


def _encode_floats(obj):
    """JSON has no infinities: non-finite floats are written as the strings "inf", "-inf", "nan"
    (read back by :func:`_build` for fields declared float)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _encode_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_encode_floats(v) for v in obj]
    return obj


REQUIRED_GRAPHS = ("detect", "segment")
# The graphs' tensor names, the contract between iam-export and every engine.
DETECT_INPUTS = ("images",)  # (B, 3, S, S) float32, normalised
DETECT_OUTPUTS = ("class_scores", "peak_coords", "peak_values", "peak_counts")  # (B, C), (B, K, 3), (B, K), (B,)
SEGMENT_INPUTS = ("image", "peaks")  # (1, 3, S, S) float32, (P, 3) int64 (class, y, x)
SEGMENT_OUTPUTS = ("prm", "iam")  # (P, S, S) peak response maps, (P, S, S) instance activation maps
# The segment graph's third output, (1, C, S/32, S/32): the class response maps of the forward pass
# its peak backprop runs. Engines that split the graph find peaks on it instead of running detect's
# forward as well (iam_runtime.staged); bundles exported before it lack it and run both forwards.
SEGMENT_CRM = "crm"


def _build(cls, data: Any, where: str) -> dict:
    """Check an object against a dataclass's fields; returns its fields, with non-finite floats
    decoded (see :func:`_encode_floats`)."""
    if not isinstance(data, dict):
        raise BundleError(f"manifest {where}: expected an object, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise BundleError(f"manifest {where}: unknown fields {unknown} (written by a newer iam?)")
    missing = [n for n, f in names.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise BundleError(f"manifest {where}: missing fields {missing}")
    out = dict(data)
    for name, value in data.items():
        if str(names[name].type).startswith("float") and isinstance(value, str):
            if value not in ("inf", "-inf", "nan"):
                raise BundleError(f"manifest {where}.{name}: {value!r} is not a number")
            out[name] = float(value)
    return out


def _choice(value: str, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise BundleError(f"manifest {where}: {value!r} is not one of {', '.join(choices)}")
    return value


def manifest_from_dict(data: dict) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"not an iam bundle manifest (format {data.get('format') if isinstance(data, dict) else None!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle format version {version} is not supported by this runtime (it reads {FORMAT_VERSION})")
    _build(Manifest, data, "top level")
    if not isinstance(data["graphs"], dict):
        raise BundleError("manifest graphs: expected an object of name -> graph")
    graphs = {}
    for key, g in data["graphs"].items():
        _build(GraphSpec, g, f"graphs.{key}")
        graphs[key] = GraphSpec(**{**g, "inputs": [TensorSpec(**_build(TensorSpec, t, f"graphs.{key}.inputs")) for t in g["inputs"]],
                                   "outputs": [TensorSpec(**_build(TensorSpec, t, f"graphs.{key}.outputs")) for t in g["outputs"]]})
    missing = [k for k in REQUIRED_GRAPHS if k not in graphs]
    if missing:
        raise BundleError(f"manifest lists no {' or '.join(missing)} graph")
    filling = FillingSpec(**_build(FillingSpec, data["filling"], "filling"))
    _choice(filling.normalization, FILLING_NORMALIZATIONS, "filling.normalization")
    crf = CRFSpec(**_build(CRFSpec, data["crf"], "crf"))
    _choice(crf.frame, CRF_FRAMES, "crf.frame")
    return Manifest(
        classes=list(data["classes"]),
        input=InputSpec(**_build(InputSpec, data["input"], "input")),
        peaks=PeakSpec(**_build(PeakSpec, data["peaks"], "peaks")),
        filling=filling,
        crf=crf,
        graphs=graphs,
        engines=[EngineSpec(**_build(EngineSpec, e, "engines[]")) for e in data.get("engines", [])],
        producer=data.get("producer", {}),
        verification=data.get("verification", {}),
    )


def describe_semantics(manifest: Manifest) -> str:
    """One line: what the bundle's inference computes (for logs and the CLIs)."""
    p, f = manifest.peaks, manifest.filling
    nms = "no NMS" if p.nms_iou is None else f"NMS at {p.nms_iou:g}"
    source = manifest.producer.get("source", "?")
    return (f"{source} semantics: class score >= {p.class_threshold:g}, peak > {p.peak_threshold:g}, {nms}, "
            f"filling on {f.normalization} statistics, CRF in the {manifest.crf.frame} frame; "
            f"precision {manifest.graphs['detect'].precision}")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_manifest(directory: str | Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    atomic_write_text(path, manifest.to_json())
    return path


@dataclass
class Bundle:
    root: Path
    manifest: Manifest

    def graph_path(self, key: str) -> Path:
        return self.root / self.manifest.graphs[key].file


def load_bundle(directory: str | Path, verify_checksums: bool = True) -> Bundle:
    """Read and validate a bundle directory; checksums of the graphs are checked."""
    root = Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not an iam bundle: {MANIFEST} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    try:
        manifest = manifest_from_dict(data)
    except TypeError as exc:
        raise BundleError(f"{path}: {exc}") from exc
    for key, graph in manifest.graphs.items():
        file = root / graph.file
        if not file.is_file():
            raise BundleError(f"bundle {root}: graph {key!r} file {graph.file} is missing")
        if verify_checksums and sha256_file(file) != graph.sha256:
            raise BundleError(f"bundle {root}: {graph.file} does not match its sha256 in the manifest (corrupt or edited)")
    return Bundle(root, manifest)

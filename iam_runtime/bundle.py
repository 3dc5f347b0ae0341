"""The bundle: the only contract between iam-export and the runtime.

A bundle is a directory with ``manifest.json``, the ONNX graphs and optionally TensorRT engines.
This module defines the manifest's schema once: the exporter writes through :func:`save_manifest`
and the runtime reads through :func:`load_bundle`, which refuses what it does not understand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    win_size: int = 3
    threshold_mode: str = "median"
    threshold_value: float = 0.0
    upsample_factor: int = 8
    max_peaks: int = 100  # per image, in the detect graph's fixed-size outputs
    class_threshold: float = 0.0  # a class is present when its score (a logit) is >= this
    peak_threshold: float = float("-inf")  # and a peak is used when its value is > this
    stride: int = 32  # CRM cell j is centred on input pixel stride * j


@dataclass
class FillingSpec:
    channels: int = 16
    kernel_size: int = 3
    steps: int = 112
    mask_threshold: float = 0.5  # instance activation map -> mask when no CRF is used


@dataclass
class CRFSpec:
    iterations: int = 5
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0


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
        def encode(obj):
            if isinstance(obj, float) and obj == float("-inf"):
                return "-inf"
            if isinstance(obj, dict):
                return {k: encode(v) for k, v in obj.items()}
            if isinstance(obj, list):
                return [encode(v) for v in obj]
            return obj

        return json.dumps(encode(dataclasses.asdict(self)), indent=2)


REQUIRED_GRAPHS = ("detect", "segment")


def _build(cls, data: Any, where: str):
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
    return data


def manifest_from_dict(data: dict) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"not an iam bundle manifest (format {data.get('format') if isinstance(data, dict) else None!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle format version {version} is not supported by this runtime (it reads {FORMAT_VERSION})")
    _build(Manifest, data, "top level")
    peaks = dict(_build(PeakSpec, data["peaks"], "peaks"))
    if peaks.get("peak_threshold") == "-inf":
        peaks["peak_threshold"] = float("-inf")
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
    return Manifest(
        classes=list(data["classes"]),
        input=InputSpec(**_build(InputSpec, data["input"], "input")),
        peaks=PeakSpec(**peaks),
        filling=FillingSpec(**_build(FillingSpec, data["filling"], "filling")),
        crf=CRFSpec(**_build(CRFSpec, data["crf"], "crf")),
        graphs=graphs,
        engines=[EngineSpec(**_build(EngineSpec, e, "engines[]")) for e in data.get("engines", [])],
        producer=data.get("producer", {}),
        verification=data.get("verification", {}),
    )


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_manifest(directory: str | Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, path)
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

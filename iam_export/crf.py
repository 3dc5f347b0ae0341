"""The bundle's CRF graph (iam_runtime.crf_graph): written by ``iam-export onnx``, and added to a
bundle made before it existed by ``iam-export crf BUNDLE``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx

from iam_runtime.bundle import GraphSpec, Manifest, load_bundle, save_manifest, sha256_file
from iam_runtime.crf_graph import build_crf_graph
from iam_runtime.files import atomic_write_bytes

CRF_GRAPH = "crf"
CRF_OPSET = 18


def write_crf_graph(directory: str | Path, iterations: int) -> GraphSpec:
    """Write ``crf.onnx`` (``iterations`` mean-field steps) into ``directory``; its manifest entry."""
    from .export_onnx import _tensor_specs

    model = build_crf_graph(iterations, opset=CRF_OPSET)
    onnx.checker.check_model(model)
    path = Path(directory) / f"{CRF_GRAPH}.onnx"
    atomic_write_bytes(path, model.SerializeToString())
    return GraphSpec(path.name, sha256_file(path), _tensor_specs(list(model.graph.input)),
                     _tensor_specs(list(model.graph.output)), "fp32", CRF_OPSET)


def add_crf_graph(bundle_dir: str | Path, force: bool = False) -> Manifest:
    """Add the CRF graph to an existing bundle (for its manifest's CRF iterations); the manifest
    is rewritten last, atomically, so an interrupted call leaves the bundle as it was."""
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    if CRF_GRAPH in manifest.graphs and not force:
        raise FileExistsError(f"{bundle_dir} has a CRF graph already ({manifest.graphs[CRF_GRAPH].file}); "
                              "--force writes it again")
    spec = write_crf_graph(bundle_dir, manifest.crf.iterations)
    updated = dataclasses.replace(manifest, graphs={**manifest.graphs, CRF_GRAPH: spec})
    save_manifest(bundle_dir, updated)
    return updated

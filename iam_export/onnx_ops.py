"""The ``iam`` ONNX domain: schemas of FindPeaks and PropagateAffinity, the exporter's
translations of the torch custom ops to those nodes, and the ONNX functions that define them
(exported from :mod:`iam_export.decompositions`, specialised to the bundle's map sizes)."""

from __future__ import annotations

import functools

import onnx
import torch
from onnx.defs import OpSchema
from onnxscript.values import Opset

from . import decompositions

DOMAIN = "iam"
DOMAIN_VERSION = 1
IAM_OPSET = Opset(DOMAIN, DOMAIN_VERSION)

FIND_PEAKS_ATTRS = ("win_size", "threshold_mode", "threshold_value", "upsample_factor", "max_peaks")


@functools.cache
def register_schemas() -> None:
    """Make onnx (checker, onnxscript) know the two ops; idempotent."""
    p = OpSchema.FormalParameter
    a = OpSchema.Attribute
    t = OpSchema.AttrType
    schemas = [
        OpSchema(
            "FindPeaks", DOMAIN, DOMAIN_VERSION,
            doc="Peaks of class response maps (see iam_train.models.peaks for the contract).",
            inputs=[p("crm", "T")],
            outputs=[p("peak_map", "B"), p("coords", "I"), p("values", "T"), p("counts", "I")],
            type_constraints=[("T", ["tensor(float)"], ""), ("B", ["tensor(bool)"], ""), ("I", ["tensor(int64)"], "")],
            attributes=[a("win_size", t.INT, ""), a("threshold_mode", t.STRING, ""), a("threshold_value", t.FLOAT, ""),
                        a("upsample_factor", t.INT, ""), a("max_peaks", t.INT, "")],
        ),
        OpSchema(
            "PropagateAffinity", DOMAIN, DOMAIN_VERSION,
            doc="T steps of per-pixel kxk affinity propagation (see iam_train.models.filling).",
            inputs=[p("x", "T"), p("kernels", "T")],
            outputs=[p("y", "T")],
            type_constraints=[("T", ["tensor(float)"], "")],
            attributes=[a("steps", t.INT, "")],
        ),
    ]
    for schema in schemas:
        try:
            onnx.defs.get_schema(schema.name, DOMAIN_VERSION, DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)


def translate_find_peaks(crm, win_size: int, threshold_mode: str, threshold_value: float, upsample_factor: int,
                         max_peaks: int):
    return IAM_OPSET.FindPeaks(crm, win_size=win_size, threshold_mode=threshold_mode,
                               threshold_value=threshold_value, upsample_factor=upsample_factor, max_peaks=max_peaks)


def translate_propagate_affinity(x, kernels, steps: int):
    return IAM_OPSET.PropagateAffinity(x, kernels, steps=steps)


def translation_table() -> dict:
    register_schemas()
    return {
        torch.ops.iam.find_peaks.default: translate_find_peaks,
        torch.ops.iam.propagate_affinity.default: translate_propagate_affinity,
    }


class _FindPeaksBody(torch.nn.Module):
    def __init__(self, **attrs):
        super().__init__()
        self.attrs = attrs

    def forward(self, crm):
        return decompositions.find_peaks(crm, **self.attrs)


class _PropagateBody(torch.nn.Module):
    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def forward(self, x, kernels):
        return decompositions.propagate_affinity(x, kernels, self.steps)


def _as_function(module: torch.nn.Module, args: tuple, dynamic_shapes, name: str, attributes: list[str],
                 opset: int) -> onnx.FunctionProto:
    """Export a decomposition and wrap its graph as ``iam.<name>`` (initialisers become Constants)."""
    # The exporter's full optimiser (pattern rewrites) takes minutes over the unrolled propagation
    # steps (T = 112); the decomposition is plain ops already, so only constants are folded (this
    # also turns CastLike into Cast, which TensorRT's parser takes) and dead nodes dropped.
    import onnx_ir
    import onnxscript.optimizer
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    program = torch.onnx.export(module.eval(), args, dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=opset,
                                verbose=False, optimize=False)
    onnxscript.optimizer.fold_constants(program.model)
    RemoveUnusedNodesPass()(program.model)
    proto = onnx_ir.to_proto(program.model)
    graph = proto.graph
    nodes = [onnx.helper.make_node("Constant", [], [init.name], value=init) for init in graph.initializer]
    nodes += list(graph.node)
    return onnx.helper.make_function(
        DOMAIN, name, [i.name for i in graph.input], [o.name for o in graph.output], nodes,
        opset_imports=[o for o in proto.opset_import if o.domain == ""], attributes=attributes,
        doc_string=f"iam.{name}, specialised at export to this model's map sizes and attribute values.",
    )


def find_peaks_function(num_classes: int, crm_size: tuple[int, int], opset: int, **attrs) -> onnx.FunctionProto:
    crm = torch.randn(2, num_classes, *crm_size)
    batch = torch.export.Dim("batch", min=1)
    return _as_function(_FindPeaksBody(**attrs), (crm,), ({0: batch},), "FindPeaks", list(FIND_PEAKS_ATTRS), opset)


def propagate_affinity_function(channels: int, kernel_size: int, grid: tuple[int, int], steps: int,
                                opset: int) -> onnx.FunctionProto:
    x = torch.rand(3, channels, *grid)
    kernels = torch.rand(1, channels * kernel_size**2, *grid)
    peaks = torch.export.Dim("peaks", min=1)
    return _as_function(_PropagateBody(steps), (x, kernels), ({0: peaks}, None), "PropagateAffinity", ["steps"], opset)


def attach_functions(model: onnx.ModelProto, functions: list[onnx.FunctionProto]) -> onnx.ModelProto:
    """Add the function definitions of the iam nodes the model uses, and the iam opset import."""
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    for fn in functions:
        if fn.name in used and all(f.name != fn.name for f in model.functions):
            model.functions.append(fn)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model

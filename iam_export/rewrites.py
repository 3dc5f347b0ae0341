"""Exact graph rewrites applied to every exported graph, for speed on the runtimes we target.

* Stride-1 ConvTranspose -> Conv. A stride-1 transposed convolution is the convolution with the
  kernel flipped in space and its in/out channels swapped, padded by ``d*(k-1) - p``. Peak
  backprop is mostly such transposes (one per conv of the backbone, per peak), and onnxruntime's
  CPU ConvTranspose (GEMM then col2im) runs at about a third of the rate of its blocked Conv.
  The flip and swap are inserted as Slice/Transpose nodes on the weight, which onnxruntime and
  TensorRT fold into constants when they load the graph, so the bundle stores the weights once.
  Transposes to fewer than ``MIN_CONV_OUT_CHANNELS`` channels stay as they are: onnxruntime's
  blocked Conv pads the output channels to a block of 16, which makes a 1-channel output (the
  filling decoder's last layer) cost 16 times its arithmetic.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MIN_CONV_OUT_CHANNELS = 16


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _as_conv(node: onnx.NodeProto, index: int, shapes: dict[str, list[int]]) -> list[onnx.NodeProto] | None:
    """Nodes computing ``node`` (a ConvTranspose) as a Conv, or None when it is not eligible."""
    weight_shape = shapes.get(node.input[1])
    if weight_shape is None or weight_shape[1] < MIN_CONV_OUT_CHANNELS:
        return None
    a = _attrs(node)
    kernel = list(a.get("kernel_shape", []))
    rank = len(kernel)
    if rank == 0 or a.get("output_shape") or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    strides = list(a.get("strides", [1] * rank))
    dilations = list(a.get("dilations", [1] * rank))
    output_padding = list(a.get("output_padding", [0] * rank))
    pads = list(a.get("pads", [0] * 2 * rank))
    if a.get("group", 1) != 1 or any(s != 1 for s in strides) or any(output_padding):
        return None
    conv_pads = [dilations[i % rank] * (kernel[i % rank] - 1) - p for i, p in enumerate(pads)]
    if any(p < 0 for p in conv_pads):
        return None
    prefix = f"{node.name or node.output[0]}__as_conv{index}"
    weight = node.input[1]
    nodes = []
    if any(k > 1 for k in kernel):  # flip every spatial axis
        axes = list(range(2, 2 + rank))
        consts = {
            "starts": [-1] * rank, "ends": [np.iinfo(np.int64).min] * rank, "axes": axes, "steps": [-1] * rank,
        }
        names = []
        for key, value in consts.items():
            names.append(f"{prefix}_{key}")
            nodes.append(helper.make_node("Constant", [], [names[-1]],
                                          value=numpy_helper.from_array(np.array(value, dtype=np.int64), names[-1])))
        nodes.append(helper.make_node("Slice", [weight, *names], [f"{prefix}_flipped"]))
        weight = f"{prefix}_flipped"
    nodes.append(helper.make_node("Transpose", [weight], [f"{prefix}_weight"], perm=[1, 0, *range(2, 2 + rank)]))
    inputs = [node.input[0], f"{prefix}_weight", *node.input[2:]]
    nodes.append(helper.make_node("Conv", inputs, list(node.output), name=prefix, kernel_shape=kernel,
                                  pads=conv_pads, dilations=dilations, strides=[1] * rank))
    return nodes


def conv_transpose_as_conv(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite every eligible ConvTranspose of the main graph (stride 1, group 1, no output
    padding or shape) as a Conv. Returns the model (modified in place) and the count rewritten."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    for v in [*inferred.graph.value_info, *inferred.graph.input]:
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = [d.dim_value for d in dims]
    new_nodes, count = [], 0
    for node in model.graph.node:
        replacement = _as_conv(node, count, shapes) if node.op_type == "ConvTranspose" and node.domain in ("", "ai.onnx") else None
        if replacement is None:
            new_nodes.append(node)
        else:
            new_nodes.extend(replacement)
            count += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return model, count

"""fp16 graphs (TensorRT 11 is strongly typed: reduced precision must live in the ONNX graph).

The convolution trunk runs in fp16: every Conv and ConvTranspose gets fp16 weights, its input
cast to fp16 and its output cast back to fp32, so TensorRT (or onnxruntime on a GPU) runs the
convolutions in half precision and fuses the casts. Everything else stays fp32: peak finding
(``iam.FindPeaks``), score heads, the normalisers and divisions of peak backprop, the
propagation and the graphs' inputs and outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP16_OPS = ("Conv", "ConvTranspose")


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    new_nodes = []
    converted: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in FP16_OPS or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        for k, name in enumerate(node.input[1:], 1):  # weights and bias -> fp16 copies
            if name and name in inits:
                if name not in converted:
                    half = numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(np.float16), f"{name}__fp16")
                    graph.initializer.append(half)
                    converted[name] = half.name
                node.input[k] = converted[name]
        x16 = f"{node.input[0]}__fp16__{node.name}"
        new_nodes.append(helper.make_node("Cast", [node.input[0]], [x16], to=TensorProto.FLOAT16,
                                          name=f"{node.name}__cast_in"))
        out = node.output[0]
        node.input[0] = x16
        node.output[0] = f"{out}__fp16"
        new_nodes.append(node)
        new_nodes.append(helper.make_node("Cast", [node.output[0]], [out], to=TensorProto.FLOAT,
                                          name=f"{node.name}__cast_out"))
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {n for node in graph.node for n in node.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    # value_info of rewritten tensors is stale: drop it, onnx shape inference redoes it.
    del graph.value_info[:]
    onnx.checker.check_model(model, full_check=False)
    return model

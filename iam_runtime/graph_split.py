"""Cutting an ONNX graph in two where a tensor enters, so that an engine can run the halves as
separate onnxruntime sessions with work of its own in between (the fused propagation, the
shared forward pass: :mod:`iam_runtime.propagation`, :mod:`iam_runtime.staged`)."""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass
class Partition:
    """A graph cut into a head and a tail. The tail takes ``fed`` (what the cut feeds it) and
    ``carried`` (tensors of the head, or graph inputs, that it also reads) and computes
    ``tail_outputs``; the head computes ``head_outputs`` (the graph's outputs that do not depend
    on the cut), ``extra`` and the carried tensors it produces."""

    head: onnx.ModelProto | None  # None where not asked for
    tail: onnx.ModelProto
    fed: list[str]
    carried: list[str]
    extra: list[str]
    head_outputs: list[str]
    tail_outputs: list[str]
    graph_inputs: list[str]  # the original graph's inputs

    @property
    def head_names(self) -> list[str]:
        """Everything the head session is asked for: original outputs, extra and carried."""
        produced = {o.name for o in self.head.graph.output}
        return [n for n in dict.fromkeys([*self.head_outputs, *self.extra, *self.carried]) if n in produced]


class GraphIndex:
    """Who produces and who consumes each tensor of a model's main graph."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers = collections.defaultdict(list)
        for n in self.graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.initializers = {i.name for i in self.graph.initializer}
        self.inputs = [i.name for i in self.graph.input]
        self.outputs = [o.name for o in self.graph.output]

    def nodes(self, op_type: str, domain: str = "") -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if n.op_type == op_type and n.domain == domain]

    def downstream(self, names) -> set[int]:
        """Ids of the nodes that depend on any of ``names``."""
        seen, stack = set(), list(names)
        while stack:
            for n in self.consumers[stack.pop()]:
                if id(n) not in seen:
                    seen.add(id(n))
                    stack.extend(n.output)
        return seen

    def ancestors(self, names) -> set[int]:
        """Ids of the nodes that ``names`` are computed from."""
        seen, stack = set(), list(names)
        while stack:
            n = self.producer.get(stack.pop())
            if n is not None and id(n) not in seen:
                seen.add(id(n))
                stack.extend(n.input)
        return seen

    @functools.cached_property
    def _values(self) -> dict[str, onnx.ValueInfoProto]:
        g = self.graph
        return {v.name: v for v in reversed([*g.input, *g.output, *g.value_info])}  # the first of a name wins

    def value(self, name: str) -> onnx.ValueInfoProto:
        original = self._values.get(name)
        return original if original is not None else onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)

    def submodel(self, node_ids: set[int], inputs: list[str], outputs: list[str], name: str) -> onnx.ModelProto:
        """The nodes (in the graph's order), with the initializers they read, as a model."""
        nodes = [n for n in self.graph.node if id(n) in node_ids]
        used = {i for n in nodes for i in n.input}
        sub = onnx.helper.make_graph(nodes, name, [self.value(i) for i in inputs], [self.value(o) for o in outputs],
                                     [t for t in self.graph.initializer if t.name in used])
        out = onnx.helper.make_model(sub, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        out.functions.extend(self.model.functions)
        return out


def partition(index: GraphIndex, tail_ids: set[int], fed: list[str], extra: list[str] = (),
              name: str | None = None, with_head: bool = True) -> Partition:
    """Cut ``index``'s graph: the tail is the nodes ``tail_ids``, fed the tensors ``fed``; the head
    is what the graph's remaining outputs, ``extra`` and the tail's other inputs are computed from.
    A tail input that depends on no graph input (weights prepared from constants) is computed in
    the tail rather than carried across; a graph input the tail reads is carried as it is.
    ``with_head=False``: only the tail is built (the head's model would copy its weights)."""
    fed, extra = list(fed), list(extra)
    name = name or index.graph.name
    graph_inputs = set(index.inputs)

    @functools.cache
    def constant_only(t: str) -> bool:
        if t in index.initializers or not t:
            return True
        if t in graph_inputs or t in fed or t not in index.producer:
            return False
        n = index.producer[t]
        return id(n) not in tail_ids and all(constant_only(i) for i in n.input)

    tail_nodes = [n for n in index.graph.node if id(n) in tail_ids]
    produced = {o for n in tail_nodes for o in n.output}
    needed = list(dict.fromkeys(i for n in tail_nodes for i in n.input
                                if i and i not in produced and i not in index.initializers and i not in fed))
    carried = [t for t in needed if not constant_only(t)]
    copied = index.ancestors(t for t in needed if constant_only(t))

    tail_outputs = [o for o in index.outputs if o in produced]
    head_outputs = [o for o in index.outputs if o not in produced]
    from_head = [t for t in dict.fromkeys([*head_outputs, *extra, *carried]) if t not in graph_inputs]
    head = None
    if with_head:
        head_ids = index.ancestors(from_head)
        head_used = {i for n in index.graph.node if id(n) in head_ids for i in n.input}
        head = index.submodel(head_ids, [i for i in index.inputs if i in head_used], from_head, f"{name}_head")
    tail = index.submodel(copied | tail_ids, [*fed, *carried], tail_outputs, f"{name}_tail")
    return Partition(head, tail, fed, carried, extra, head_outputs, tail_outputs, list(index.inputs))


def detach_weights(model: onnx.ModelProto, min_bytes: int = 1024) -> tuple[bytes, dict[str, np.ndarray]]:
    """``model`` serialised without the data of its initialisers of ``min_bytes`` or more, which come
    back as arrays by name. Each one left in the model refers to external data, the form that
    onnxruntime's ``SessionOptions.add_external_initializers`` fills in. Serialising a cut graph's
    weights costs more than building its session (resnet50@448: 0.5-0.7 s of 100 MB). ``model``
    itself is emptied of that data."""
    weights = {}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or len(init.raw_data) < min_bytes:
            continue
        weights[init.name] = numpy_helper.to_array(init)
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", "detached"), ("offset", "0"), ("length", str(weights[init.name].nbytes))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
    return model.SerializeToString(), weights

"""fp16 conversion of the exported graph for GPU serving; the model's inputs and outputs stay float32.

Every float initializer and constant becomes float16, one Cast after the input and one before each output
keep the interface float32, so clients and the service never see the precision change.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _half(tensor: TensorProto) -> TensorProto:
    if tensor.data_type != TensorProto.FLOAT:
        return tensor
    array = numpy_helper.to_array(tensor)
    if np.abs(array).max(initial=0.0) > np.finfo(np.float16).max:
        raise ValueError(f"{tensor.name}: values exceed the float16 range")
    return numpy_helper.from_array(array.astype(np.float16), tensor.name)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of a float32 graph with float32 inputs and outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for i, init in enumerate(graph.initializer):
        graph.initializer[i].CopyFrom(_half(init))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                attr.t.CopyFrom(_half(attr.t))
        if node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute):
            raise ValueError("graph already casts to float32 internally; refusing an ambiguous conversion")

    casts_in = []
    for value in graph.input:
        half_name = f"{value.name}_fp16"
        for node in graph.node:
            node.input[:] = [half_name if name == value.name else name for name in node.input]
        casts_in.append(helper.make_node("Cast", [value.name], [half_name], to=TensorProto.FLOAT16))
    casts_out = []
    for value in graph.output:
        half_name = f"{value.name}_fp16"
        for node in graph.node:  # producer and any internal consumer (Gemm reads the embedding) move over
            node.output[:] = [half_name if name == value.name else name for name in node.output]
            node.input[:] = [half_name if name == value.name else name for name in node.input]
        casts_out.append(helper.make_node("Cast", [half_name], [value.name], to=TensorProto.FLOAT))
    nodes = [*casts_in, *graph.node, *casts_out]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale float32 annotations; ORT re-infers them
    onnx.checker.check_model(out)
    return out

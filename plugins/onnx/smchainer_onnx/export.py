"""A focused exporter from a Chainer model to ONNX.

The model is traced: it runs once in evaluation mode on a sample batch with
backprop enabled, and the computational graph is walked back from the output
(``Variable.creator_node``, ``FunctionNode.inputs``). Each Chainer function
node becomes one or a few ONNX nodes; parameters and constants become
initializers. The batch dimension is left dynamic (``N``); the other
dimensions are those of the sample.

Translated function nodes (what the Chainer CIFAR VGG and similar
convolutional classifiers use):

=============================  =============================================
Chainer                        ONNX
=============================  =============================================
Convolution2DFunction          Conv (``cover_all`` as extra end padding)
FixedBatchNormalization        folded into the Conv / Gemm right before it,
                               else BatchNormalization
ReLU                           Relu
MaxPoolingND (2-D and N-D)     MaxPool (``cover_all`` as extra end padding)
LinearFunction                 Gemm (``transB=1``)
Reshape                        Reshape (batch dimension kept dynamic)
BroadcastTo                    dropped before an elementwise op (ONNX
                               broadcasts), else Expand
Add, Sub, Mul, Div, Neg and    Add, Sub, Mul, Div, Neg with a constant
their ``*Constant`` forms      initializer
=============================  =============================================

Dropout is no function node in evaluation mode (``F.dropout`` returns its
input). Any other function node raises :class:`UnsupportedLayer` naming it.
The exporter does not check numerics itself: :mod:`smchainer_onnx.runtime`
compares ONNX Runtime's answer with Chainer's before serving it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import chainer
import numpy as np
import onnx
from chainer.functions.activation.relu import ReLU
from chainer.functions.array.broadcast import BroadcastTo
from chainer.functions.array.reshape import Reshape
from chainer.functions.connection.convolution_2d import Convolution2DFunction
from chainer.functions.connection.linear import LinearFunction
from chainer.functions.math import basic_math
from chainer.functions.normalization.batch_normalization import FixedBatchNormalization
from chainer.functions.pooling.max_pooling_nd import MaxPoolingND
from onnx import TensorProto, helper, numpy_helper

from smchainer.errors import SmchainerError

logger = logging.getLogger(__name__)

#: ONNX operator set the exporter writes (ONNX Runtime 1.14+ runs it).
OPSET = 17
#: ONNX IR version written, the oldest that carries opset 17.
IR_VERSION = 8
#: Bumped whenever the exporter's output changes, so cached files are redone.
EXPORTER_VERSION = 1

INPUT_NAME = "input"
OUTPUT_NAME = "output"


class UnsupportedLayer(SmchainerError):
    """The model uses something the exporter cannot translate faithfully."""


@dataclass
class Trace:
    """One evaluation-mode forward pass with its computational graph.

    :ivar input_node: the variable node of the sample input.
    :ivar output: the model's output variable.
    :ivar functions: the function nodes that lead to the output, each after
        the nodes that produced its inputs.
    :ivar input_data: the arrays each function node received, by ``id``.
    :ivar parameter_names: the model's parameter names, by ``id`` of their
        variable node.
    """

    input_node: Any
    output: chainer.Variable
    functions: list[Any]
    input_data: dict[int, tuple[np.ndarray, ...]]
    parameter_names: dict[int, str] = field(default_factory=dict)


class _InputRecorder(chainer.FunctionHook):
    """Keeps the input arrays of every function node run while it is active.

    Constants such as batch-norm statistics enter the graph as variables that
    nobody keeps, so their variable nodes no longer hold the data after the
    forward pass; the hook sees the arrays as they go in.
    """

    name = "smchainer_onnx_trace"

    def __init__(self) -> None:
        self.input_data: dict[int, tuple[np.ndarray, ...]] = {}

    def forward_preprocess(self, function: Any, in_data: tuple[np.ndarray, ...]) -> None:
        self.input_data[id(function)] = tuple(in_data)


def trace(model: chainer.Link, sample: np.ndarray) -> Trace:
    """Run ``model`` once on ``sample`` in evaluation mode and record its graph.

    :raises UnsupportedLayer: when the model does not return one variable.
    """
    recorder = _InputRecorder()
    x = chainer.Variable(sample)
    # A model with smchainer's channels-last path (VGG.fused) is traced through Chainer's
    # own functions, the ones this exporter translates; the same network either way.
    fused = getattr(model, "fused", False)
    if fused is not False:
        model.fused = False
    try:
        with chainer.using_config("train", False), chainer.force_backprop_mode(), recorder:
            output = model(x)
    finally:
        if fused is not False:
            model.fused = fused
    if not isinstance(output, chainer.Variable):
        raise UnsupportedLayer(
            f"the model returns {type(output).__name__}, not one chainer.Variable"
        )
    functions: list[Any] = []
    visited: set[int] = set()
    # Iterative post-order walk: a function is listed after its inputs' creators.
    stack: list[tuple[Any, bool]] = []
    if output.creator_node is not None:
        stack.append((output.creator_node, False))
    while stack:
        function, expanded = stack.pop()
        if expanded:
            functions.append(function)
            continue
        if id(function) in visited:
            continue
        visited.add(id(function))
        stack.append((function, True))
        for node in reversed(function.inputs):
            creator = node.creator_node
            if creator is not None and id(creator) not in visited:
                stack.append((creator, False))
    names = {
        id(param.node): name.lstrip("/").replace("/", ".")
        for name, param in model.namedparams()
    }
    return Trace(x.node, output, functions, recorder.input_data, names)


def _function_name(function: Any) -> str:
    inner = getattr(function, "function", None)  # old-style chainer.Function
    return type(inner if inner is not None else function).__name__


class _GraphBuilder:
    """Translates a :class:`Trace` into ONNX nodes and initializers."""

    def __init__(self, traced: Trace) -> None:
        self.trace = traced
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.names: dict[int, str] = {id(traced.input_node): INPUT_NAME}
        self.skipped: set[int] = set()
        self.counter = 0
        self.consumers: dict[int, list[Any]] = {}
        for function in traced.functions:
            for node in function.inputs:
                self.consumers.setdefault(id(node), []).append(function)
        # The model's output is consumed by the graph itself: never fold it away.
        self.consumers.setdefault(id(traced.output.node), []).append(None)

    # names and initializers -------------------------------------------------

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_{self.counter}"

    def output_name(self, function: Any, index: int = 0) -> str:
        """The tensor name of a function's output, allocated on first use."""
        node = function.outputs[index]()
        if node is None:  # an output nobody consumed
            return self.fresh("unused")
        if id(node) not in self.names:
            is_output = node is self.trace.output.node
            self.names[id(node)] = OUTPUT_NAME if is_output else self.fresh("t")
        return self.names[id(node)]

    def alias(self, function: Any, name: str) -> None:
        """Make a function's output refer to an existing tensor."""
        node = function.outputs[0]()
        if node is self.trace.output.node:
            self.emit("Identity", [name], [OUTPUT_NAME])
            name = OUTPUT_NAME
        if node is not None:
            self.names[id(node)] = name

    def initializer(self, array: Any, prefix: str) -> str:
        name = self.fresh(prefix)
        self.add_initializer(name, array)
        return name

    def add_initializer(self, name: str, array: Any) -> None:
        array = np.asarray(array)
        if array.dtype.kind == "f" and array.dtype != np.float32:
            raise UnsupportedLayer(
                f"{name} is {array.dtype}: only float32 models are exported"
            )
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))

    def is_computed(self, function: Any, index: int) -> bool:
        node = function.inputs[index]
        return node.creator_node is not None or id(node) == id(self.trace.input_node)

    def data(self, function: Any, index: int) -> np.ndarray:
        return self.trace.input_data[id(function)][index]

    def operand(self, function: Any, index: int) -> str:
        """The tensor name of a function's input; a constant becomes an initializer."""
        node = function.inputs[index]
        if id(node) not in self.names:
            if node.creator_node is not None:
                raise UnsupportedLayer(f"{_function_name(function)} input {index} has no tensor")
            prefix = self.trace.parameter_names.get(id(node))
            name = prefix or self.fresh("const")
            self.add_initializer(name, self.data(function, index))
            self.names[id(node)] = name
        return self.names[id(node)]

    def emit(self, op: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: Any) -> None:
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs),
                                           name=self.fresh(op), **attrs))

    # the translation ----------------------------------------------------------

    def build(self) -> None:
        for function in self.trace.functions:
            if id(function) in self.skipped:
                continue
            convert = CONVERTERS.get(type(function))
            if convert is None:
                raise UnsupportedLayer(
                    f"Chainer function {_function_name(function)} has no ONNX translation"
                    f" (label {function.label!r}); supported: "
                    + ", ".join(sorted(cls.__name__ for cls in CONVERTERS))
                )
            convert(self, function)

    def folded_batch_norm(self, function: Any) -> Any | None:
        """The FixedBatchNormalization that alone consumes ``function``'s output."""
        node = function.outputs[0]()
        consumers = self.consumers.get(id(node), []) if node is not None else []
        if len(consumers) != 1 or type(consumers[0]) is not FixedBatchNormalization:
            return None
        batch_norm = consumers[0]
        return batch_norm if _channel_axis_only(batch_norm) else None


def _channel_axis_only(batch_norm: Any) -> bool:
    """Whether a batch norm normalises per channel (axis 1), as ONNX's does."""
    x_node, gamma_node = batch_norm.inputs[0], batch_norm.inputs[1]
    if len(gamma_node.shape) != 1 or len(x_node.shape) < 2:
        return False
    if gamma_node.shape[0] != x_node.shape[1]:
        return False
    standard = (0,) + tuple(range(2, len(x_node.shape)))
    return batch_norm.axis is None or tuple(batch_norm.axis) == standard


def _batch_norm_affine(builder: _GraphBuilder, batch_norm: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(scale, shift)`` of an evaluation-mode batch norm, in float64."""
    _, gamma, beta, mean, var = (
        np.asarray(a, dtype=np.float64) for a in builder.trace.input_data[id(batch_norm)]
    )
    scale = gamma / np.sqrt(var + batch_norm.eps)
    return scale, beta - mean * scale


def _fold_into_weights(
    builder: _GraphBuilder, function: Any, batch_norm: Any, weight: np.ndarray,
    bias: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Weights and bias of ``function`` with the batch norm after it folded in."""
    scale, shift = _batch_norm_affine(builder, batch_norm)
    expand = (-1,) + (1,) * (weight.ndim - 1)
    folded_weight = weight.astype(np.float64) * scale.reshape(expand)
    folded_bias = shift if bias is None else bias.astype(np.float64) * scale + shift
    builder.skipped.add(id(batch_norm))
    return folded_weight.astype(np.float32), folded_bias.astype(np.float32)


def _cover_all_extra(size: int, kernel: int, stride: int, pad: int, cover_all: bool) -> int:
    """End padding that makes ONNX's floor output size equal Chainer's.

    Chainer's ``cover_all=True`` rounds the output size up,
    ``(size + 2 pad - kernel + stride - 1) // stride + 1``; ONNX rounds down,
    so the remainder is added as padding at the end of the axis.
    """
    if not cover_all:
        return 0
    return (stride - (size + 2 * pad - kernel) % stride) % stride


def _convolution(builder: _GraphBuilder, function: Any) -> None:
    x_shape = function.inputs[0].shape
    weight = builder.data(function, 1)
    has_bias = len(function.inputs) == 3
    kernel = weight.shape[2:]
    strides, dilations = (function.sy, function.sx), (function.dy, function.dx)
    pads = (function.ph, function.pw)
    extra = [
        _cover_all_extra(x_shape[2 + i], (kernel[i] - 1) * dilations[i] + 1, strides[i],
                         pads[i], function.cover_all)
        for i in range(2)
    ]
    attrs = dict(
        kernel_shape=list(kernel), strides=list(strides), dilations=list(dilations),
        pads=[pads[0], pads[1], pads[0] + extra[0], pads[1] + extra[1]],
        group=int(function.groups),
    )
    x = builder.operand(function, 0)
    batch_norm = builder.folded_batch_norm(function)
    if batch_norm is not None:
        bias = builder.data(function, 2) if has_bias else None
        w, b = _fold_into_weights(builder, function, batch_norm, weight, bias)
        inputs = [x, builder.initializer(w, "folded_W"), builder.initializer(b, "folded_b")]
        builder.emit("Conv", inputs, [builder.output_name(batch_norm)], **attrs)
        return
    inputs = [x, builder.operand(function, 1)]
    if has_bias:
        inputs.append(builder.operand(function, 2))
    builder.emit("Conv", inputs, [builder.output_name(function)], **attrs)


def _linear(builder: _GraphBuilder, function: Any) -> None:
    x = builder.operand(function, 0)
    has_bias = len(function.inputs) == 3
    batch_norm = builder.folded_batch_norm(function)
    if batch_norm is not None:
        bias = builder.data(function, 2) if has_bias else None
        w, b = _fold_into_weights(builder, function, batch_norm, builder.data(function, 1), bias)
        inputs = [x, builder.initializer(w, "folded_W"), builder.initializer(b, "folded_b")]
        builder.emit("Gemm", inputs, [builder.output_name(batch_norm)], transB=1)
        return
    inputs = [x, builder.operand(function, 1)]
    if has_bias:
        inputs.append(builder.operand(function, 2))
    builder.emit("Gemm", inputs, [builder.output_name(function)], transB=1)


def _batch_normalization(builder: _GraphBuilder, function: Any) -> None:
    if not _channel_axis_only(function):
        raise UnsupportedLayer(
            f"FixedBatchNormalization over axis {function.axis} of a "
            f"{len(function.inputs[0].shape)}-d input (only per-channel is exported)"
        )
    inputs = [builder.operand(function, i) for i in range(5)]
    builder.emit("BatchNormalization", inputs, [builder.output_name(function)],
                 epsilon=float(function.eps))


def _max_pooling(builder: _GraphBuilder, function: Any) -> None:
    spatial = function.inputs[0].shape[2:]
    extra = [
        _cover_all_extra(size, k, s, p, function.cover_all)
        for size, k, s, p in zip(spatial, function.ksize, function.stride, function.pad,
                                 strict=True)
    ]
    ends = [p + e for p, e in zip(function.pad, extra, strict=True)]
    if any(end >= k for end, k in zip(ends, function.ksize, strict=True)):
        raise UnsupportedLayer(
            f"MaxPoolingND with ksize {function.ksize}, stride {function.stride}, "
            f"pad {function.pad} on {tuple(spatial)}: ONNX needs padding below the kernel size"
        )
    builder.emit(
        "MaxPool", [builder.operand(function, 0)], [builder.output_name(function)],
        kernel_shape=list(function.ksize), strides=list(function.stride),
        pads=list(function.pad) + ends,
    )


def _relu(builder: _GraphBuilder, function: Any) -> None:
    builder.emit("Relu", [builder.operand(function, 0)], [builder.output_name(function)])


def _reshape(builder: _GraphBuilder, function: Any) -> None:
    in_shape = function.inputs[0].shape
    target = list(function.shape)
    # The trace's batch size was baked in (``x.reshape(len(x), -1)``); 0 copies it.
    if target and in_shape and target[0] == in_shape[0]:
        target[0] = 0
    shape = builder.initializer(np.asarray(target, dtype=np.int64), "shape")
    builder.emit("Reshape", [builder.operand(function, 0), shape], [builder.output_name(function)])


_ELEMENTWISE = {
    basic_math.Add: "Add", basic_math.Sub: "Sub", basic_math.Mul: "Mul", basic_math.Div: "Div",
}


def _broadcast_to(builder: _GraphBuilder, function: Any) -> None:
    target = tuple(function._shape)
    node = function.outputs[0]()
    consumers = builder.consumers.get(id(node), []) if node is not None else []

    def broadcasts_itself(consumer: Any) -> bool:
        if type(consumer) not in _ELEMENTWISE:
            return False
        other = [n for n in consumer.inputs if n is not node]
        return len(other) == 1 and tuple(other[0].shape) == target

    if not builder.is_computed(function, 0) and consumers and all(
        broadcasts_itself(c) for c in consumers
    ):
        # A constant broadcast to the batch's shape: ONNX's elementwise ops
        # broadcast the small constant themselves, for any batch size.
        builder.alias(function, builder.operand(function, 0))
        return
    in_shape = tuple(function.inputs[0].shape)
    padded = (1,) * (len(target) - len(in_shape)) + in_shape
    # Expand keeps an input dimension where the shape says 1 (this keeps N dynamic).
    shape = [1 if have == want else want for have, want in zip(padded, target, strict=True)]
    name = builder.initializer(np.asarray(shape, dtype=np.int64), "shape")
    builder.emit("Expand", [builder.operand(function, 0), name], [builder.output_name(function)])


def _binary(builder: _GraphBuilder, function: Any) -> None:
    inputs = [builder.operand(function, 0), builder.operand(function, 1)]
    builder.emit(_ELEMENTWISE[type(function)], inputs, [builder.output_name(function)])


def _with_constant(op: str, constant_first: bool) -> Callable[[_GraphBuilder, Any], None]:
    def convert(builder: _GraphBuilder, function: Any) -> None:
        dtype = builder.data(function, 0).dtype
        value = builder.initializer(np.asarray(function.value, dtype=dtype), "const")
        x = builder.operand(function, 0)
        inputs = [value, x] if constant_first else [x, value]
        builder.emit(op, inputs, [builder.output_name(function)])

    return convert


def _neg(builder: _GraphBuilder, function: Any) -> None:
    builder.emit("Neg", [builder.operand(function, 0)], [builder.output_name(function)])


CONVERTERS: dict[type, Callable[[_GraphBuilder, Any], None]] = {
    Convolution2DFunction: _convolution,
    LinearFunction: _linear,
    FixedBatchNormalization: _batch_normalization,
    MaxPoolingND: _max_pooling,
    ReLU: _relu,
    Reshape: _reshape,
    BroadcastTo: _broadcast_to,
    basic_math.Add: _binary,
    basic_math.Sub: _binary,
    basic_math.Mul: _binary,
    basic_math.Div: _binary,
    basic_math.AddConstant: _with_constant("Add", constant_first=False),
    basic_math.SubFromConstant: _with_constant("Sub", constant_first=True),
    basic_math.MulConstant: _with_constant("Mul", constant_first=False),
    basic_math.DivFromConstant: _with_constant("Div", constant_first=True),
    basic_math.Neg: _neg,
}


def export_onnx(model: chainer.Link, sample: np.ndarray) -> onnx.ModelProto:
    """Export a Chainer model to an ONNX model with a dynamic batch dimension.

    :param model: a CPU (NumPy) Chainer link whose call takes one float32
        batch and returns one variable.
    :param sample: a float32 batch of the input shape (its values do not
        matter; its batch size should be above 1 so that it is not mistaken
        for another dimension).
    :return: the checked ONNX model: input ``input`` (``N x ...``), output
        ``output``.
    :raises UnsupportedLayer: for a function node, dtype or layout the
        exporter cannot translate.
    """
    sample = np.asarray(sample)
    if sample.dtype != np.float32:
        raise UnsupportedLayer(f"the sample input is {sample.dtype}: only float32 is exported")
    traced = trace(model, sample)
    if traced.output.dtype != np.float32:
        raise UnsupportedLayer(f"the model returns {traced.output.dtype}: only float32 is exported")
    builder = _GraphBuilder(traced)
    builder.build()
    produced = builder.names.get(id(traced.output.node))
    if produced is None:
        raise UnsupportedLayer("the model's output does not depend on its input")
    if produced != OUTPUT_NAME:  # the model returned its input unchanged
        builder.emit("Identity", [produced], [OUTPUT_NAME])
    graph = helper.make_graph(
        builder.nodes,
        f"chainer_{type(model).__name__}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *sample.shape[1:]])],
        [helper.make_tensor_value_info(
            OUTPUT_NAME, TensorProto.FLOAT, ["N", *traced.output.shape[1:]])],
        initializer=builder.initializers,
    )
    exported = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="smchainer-onnx", producer_version=str(EXPORTER_VERSION),
    )
    exported.ir_version = IR_VERSION
    onnx.checker.check_model(exported)
    logger.debug("exported %s: %d ONNX nodes from %d Chainer functions",
                 type(model).__name__, len(builder.nodes), len(traced.functions))
    return exported

"""ATen op -> ONNX rules for the export: one small function per op family, in a table.

Each rule takes the builder and the fx node and returns the ONNX name of the
node's output. Arguments are normalized against the op's schema first, so a
rule reads them by name with the schema's defaults filled in. A rule that meets
a form it cannot express exactly (a training-mode dropout, a non-unit alpha it
does not handle, ...) raises UnsupportedError naming the node: the export never
produces a model that differs from the graph.

View-like ops (view, reshape, flatten, squeeze, unsqueeze, ...) become Reshape to
the shape recorded on the example inputs: the export is for static shapes.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from ...errors import UnsupportedError
from ...ir.graph import node_location
from ...ir.registry import OpRegistry
from .qdq import _numpy_dtype, _onnx

aten = torch.ops.aten


def _kw(node: fx.Node) -> dict:
    """The node's arguments by schema name, defaults filled in (`self` is called `input`)."""
    pair = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if pair is None:
        raise UnsupportedError("ONNX export: cannot read the op's arguments", where=node_location(node))
    return pair.kwargs


def _refuse(node: fx.Node, why: str):
    raise UnsupportedError(f"ONNX export: {why}", where=node_location(node))


def _rank(b, arg) -> int:
    return b.meta(arg).dim()


def _axis(b, arg, dim: int) -> int:
    return dim % max(_rank(b, arg), 1)


def _operand(b, value, like, hint: str) -> str:
    """A graph value's name, or a scalar constant with the dtype of the tensor `like`."""
    return b.value(value) if isinstance(value, fx.Node) else b.scalar_like(value, like, hint)


# ---- layers -----------------------------------------------------------------------------

def conv(b, node):
    a = _kw(node)
    if a.get("transposed") or any(a.get("output_padding") or ()):
        _refuse(node, "transposed convolution is not supported")
    if isinstance(a["padding"], str):
        if a["padding"] != "valid":
            _refuse(node, f"padding={a['padding']!r} is not supported (use explicit padding)")
        a["padding"] = [0] * (_rank(b, a["input"]) - 2)
    spatial = _rank(b, a["weight"]) - 2
    pads = _ints(a["padding"], spatial)
    inputs = [b.value(a["input"]), b.value(a["weight"])]
    if a.get("bias") is not None:
        inputs.append(b.value(a["bias"]))
    return b.op("Conv", inputs, node.name, strides=_ints(a["stride"], spatial), pads=pads + pads,
                dilations=_ints(a["dilation"], spatial), group=int(a["groups"]),
                kernel_shape=list(b.meta(a["weight"]).shape[2:]))


def _ints(value, n: int) -> list[int]:
    value = [value] if isinstance(value, int) else list(value)
    return [int(v) for v in (value * n if len(value) == 1 else value)]


def linear(b, node):
    a = _kw(node)
    x, w = b.value(a["input"]), b.value(a["weight"])
    bias = a.get("bias")
    if _rank(b, a["input"]) == 2:
        inputs = [x, w] + ([b.value(bias)] if bias is not None else [])
        return b.op("Gemm", inputs, node.name, transB=1)
    y = b.op("MatMul", [x, b.op("Transpose", [w], f"{node.name}.wT", perm=[1, 0])], f"{node.name}.mm")
    return b.op("Add", [y, b.value(bias)], node.name) if bias is not None else y


def matmul(b, node):
    a = _kw(node)
    return b.op("MatMul", [b.value(a["input"]), b.value(a.get("other", a.get("mat2")))], node.name)


def addmm(b, node):
    a = _kw(node)
    if a["beta"] != 1 or a["alpha"] != 1:
        _refuse(node, "addmm with beta or alpha other than 1 is not supported")
    y = b.op("MatMul", [b.value(a["mat1"]), b.value(a["mat2"])], f"{node.name}.mm")
    return b.op("Add", [y, b.value(a["input"])], node.name)


def layer_norm(b, node):
    a = _kw(node)
    if b.opset < 17:
        _refuse(node, f"layer_norm needs LayerNormalization (opset 17), asked for opset {b.opset}")
    shape = list(a["normalized_shape"])
    x = a["input"]
    weight = b.value(a["weight"]) if a["weight"] is not None else b.const(torch.ones(shape), "ln_one")
    inputs = [b.value(x), weight] + ([b.value(a["bias"])] if a["bias"] is not None else [])
    return b.op("LayerNormalization", inputs, node.name, axis=-len(shape), epsilon=float(a["eps"]))


def batch_norm(b, node):
    a = _kw(node)
    if a["training"]:
        _refuse(node, "training-mode batch_norm (batch statistics) is not supported; export in eval mode")
    channels = b.meta(a["input"]).shape[1]
    weight = b.value(a["weight"]) if a["weight"] is not None else b.const(torch.ones(channels), "bn_one")
    bias = b.value(a["bias"]) if a["bias"] is not None else b.const(torch.zeros(channels), "bn_zero")
    inputs = [b.value(a["input"]), weight, bias, b.value(a["running_mean"]), b.value(a["running_var"])]
    return b.op("BatchNormalization", inputs, node.name, epsilon=float(a["eps"]))


def embedding(b, node):
    a = _kw(node)
    return b.op("Gather", [b.value(a["weight"]), b.value(a["indices"])], node.name, axis=0)


# ---- pooling ----------------------------------------------------------------------------

def max_pool(b, node):
    a = _kw(node)
    n = _rank(b, a["input"]) - 2
    kernel = _ints(a["kernel_size"], n)
    stride = _ints(a["stride"] or kernel, n)
    pads = _ints(a["padding"], n)
    return b.op("MaxPool", [b.value(a["input"])], node.name, kernel_shape=kernel, strides=stride,
                pads=pads + pads, dilations=_ints(a["dilation"], n), ceil_mode=int(a["ceil_mode"]))


def avg_pool(b, node):
    a = _kw(node)
    if a.get("divisor_override") is not None:
        _refuse(node, "avg_pool with divisor_override is not supported")
    n = _rank(b, a["input"]) - 2
    kernel = _ints(a["kernel_size"], n)
    pads = _ints(a["padding"], n)
    return b.op("AveragePool", [b.value(a["input"])], node.name, kernel_shape=kernel,
                strides=_ints(a["stride"] or kernel, n), pads=pads + pads,
                ceil_mode=int(a["ceil_mode"]), count_include_pad=int(a["count_include_pad"]))


def adaptive_avg_pool(b, node):
    a = _kw(node)
    x = a["input"]
    size_in, size_out = list(b.meta(x).shape[2:]), list(b.meta(node).shape[2:])
    if all(o == 1 for o in size_out):
        return b.op("GlobalAveragePool", [b.value(x)], node.name)
    if any(i % o for i, o in zip(size_in, size_out)):
        _refuse(node, f"adaptive_avg_pool from {size_in} to {size_out} (not a whole-number ratio)")
    kernel = [i // o for i, o in zip(size_in, size_out)]
    return b.op("AveragePool", [b.value(x)], node.name, kernel_shape=kernel, strides=kernel)


# ---- elementwise ------------------------------------------------------------------------

def _binary(onnx_op: str):
    def rule(b, node):
        a = _kw(node)
        x, other = a["input"], a["other"]
        like = x if isinstance(x, fx.Node) else other
        lhs, rhs = _operand(b, x, like, f"{node.name}.a"), _operand(b, other, like, f"{node.name}.b")
        alpha = a.get("alpha", 1)
        if alpha != 1:
            rhs = b.op("Mul", [rhs, b.scalar_like(alpha, like, f"{node.name}.alpha")], f"{node.name}.scaled")
        return b.op(onnx_op, [lhs, rhs], node.name)
    return rule


def _unary(onnx_op: str, **attrs):
    def rule(b, node):
        return b.op(onnx_op, [b.value(_kw(node)["input"])], node.name, **attrs)
    return rule


def hardtanh(b, node):
    a = _kw(node)
    x = a["input"]
    lo, hi = b.scalar_like(a["min_val"], x, f"{node.name}.min"), b.scalar_like(a["max_val"], x, f"{node.name}.max")
    return b.op("Clip", [b.value(x), lo, hi], node.name)


def relu6(b, node):
    x = _kw(node)["input"]
    lo, hi = b.scalar_like(0.0, x, f"{node.name}.min"), b.scalar_like(6.0, x, f"{node.name}.max")
    return b.op("Clip", [b.value(x), lo, hi], node.name)


def silu(b, node):
    x = b.value(_kw(node)["input"])
    return b.op("Mul", [x, b.op("Sigmoid", [x], f"{node.name}.sigmoid")], node.name)


def gelu(b, node):
    a = _kw(node)
    if b.opset >= 20:
        return b.op("Gelu", [b.value(a["input"])], node.name, approximate=a["approximate"])
    if a["approximate"] != "none":
        _refuse(node, "tanh-approximated gelu needs opset 20")
    x, like = b.value(a["input"]), a["input"]
    erf = b.op("Erf", [b.op("Mul", [x, b.scalar_like(1 / math.sqrt(2), like, "rsqrt2")], f"{node.name}.s")],
               f"{node.name}.erf")
    half = b.op("Mul", [x, b.scalar_like(0.5, like, "half")], f"{node.name}.half")
    return b.op("Mul", [half, b.op("Add", [erf, b.scalar_like(1.0, like, "one")], f"{node.name}.1p")], node.name)


def leaky_relu(b, node):
    a = _kw(node)
    return b.op("LeakyRelu", [b.value(a["input"])], node.name, alpha=float(a["negative_slope"]))


def identity(b, node):
    a = _kw(node)
    if a.get("train"):
        _refuse(node, "training-mode dropout is not supported; export in eval mode")
    return b.op("Identity", [b.value(a["input"])], node.name)


def to_copy(b, node):
    src = _kw(node)["input"]
    if b.meta(src).dtype == b.meta(node).dtype:
        return b.op("Identity", [b.value(src)], node.name)
    elem = _onnx().helper.np_dtype_to_tensor_dtype(_numpy_dtype(b.meta(node).dtype))
    return b.op("Cast", [b.value(src)], node.name, to=elem)


# ---- shapes and reductions ----------------------------------------------------------------

def reshape(b, node):
    x = node.args[0]
    shape = b.const(torch.tensor(list(b.meta(node).shape), dtype=torch.int64), f"{node.name}.shape")
    return b.op("Reshape", [b.value(x), shape], node.name)


def permute(b, node):
    a = _kw(node)
    perm = [_axis(b, a["input"], d) for d in a["dims"]]
    return b.op("Transpose", [b.value(a["input"])], node.name, perm=perm)


def transpose(b, node):
    a = _kw(node)
    x = a["input"]
    perm = list(range(_rank(b, x)))
    d0, d1 = _axis(b, x, a["dim0"]), _axis(b, x, a["dim1"])
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return b.op("Transpose", [b.value(x)], node.name, perm=perm)


def t(b, node):
    x = node.args[0]
    perm = [1, 0] if _rank(b, x) == 2 else [0]
    return b.op("Transpose", [b.value(x)], node.name, perm=perm)


def cat(b, node):
    a = _kw(node)
    tensors = [v for v in a["tensors"] if b.meta(v).numel() or b.meta(v).dim() != 1]   # torch drops empty 1-D
    return b.op("Concat", [b.value(v) for v in tensors], node.name, axis=_axis(b, node, a["dim"]))


def softmax(b, node):
    a = _kw(node)
    onnx_op = "LogSoftmax" if "log" in str(node.target) else "Softmax"
    return b.op(onnx_op, [b.value(a["input"])], node.name, axis=_axis(b, a["input"], a["dim"]))


def _reduce(onnx_op: str, axes_as_input_from: int):
    def rule(b, node):
        a = _kw(node)
        if a.get("dtype") is not None:
            _refuse(node, f"{onnx_op} with a dtype argument is not supported")
        x = a["input"]
        dims = a.get("dim")
        axes = list(range(_rank(b, x))) if not dims else [_axis(b, x, d) for d in dims]
        keep = int(bool(a.get("keepdim", False)))
        if b.opset >= axes_as_input_from:
            axes_name = b.const(torch.tensor(axes, dtype=torch.int64), f"{node.name}.axes")
            return b.op(onnx_op, [b.value(x), axes_name], node.name, keepdims=keep)
        return b.op(onnx_op, [b.value(x)], node.name, axes=axes, keepdims=keep)
    return rule


RULES = OpRegistry.from_table("ONNX export", {
    aten.conv1d: conv, aten.conv2d: conv, aten.conv3d: conv, aten.convolution: conv,
    aten.linear: linear, aten.matmul: matmul, aten.mm: matmul, aten.bmm: matmul, aten.addmm: addmm,
    aten.layer_norm: layer_norm, aten.batch_norm: batch_norm, aten.embedding: embedding,
    aten.max_pool1d: max_pool, aten.max_pool2d: max_pool, aten.max_pool3d: max_pool,
    aten.avg_pool1d: avg_pool, aten.avg_pool2d: avg_pool, aten.avg_pool3d: avg_pool,
    aten.adaptive_avg_pool1d: adaptive_avg_pool, aten.adaptive_avg_pool2d: adaptive_avg_pool,
    aten.add: _binary("Add"), aten.add_: _binary("Add"), aten.sub: _binary("Sub"), aten.sub_: _binary("Sub"),
    aten.mul: _binary("Mul"), aten.mul_: _binary("Mul"), aten.div: _binary("Div"), aten.div_: _binary("Div"),
    aten.relu: _unary("Relu"), aten.relu_: _unary("Relu"), aten.sigmoid: _unary("Sigmoid"),
    aten.sigmoid_: _unary("Sigmoid"), aten.tanh: _unary("Tanh"), aten.tanh_: _unary("Tanh"),
    aten.hardswish: _unary("HardSwish"), aten.hardswish_: _unary("HardSwish"),
    aten.hardsigmoid: _unary("HardSigmoid", alpha=1 / 6, beta=0.5),
    aten.hardsigmoid_: _unary("HardSigmoid", alpha=1 / 6, beta=0.5),
    aten.exp: _unary("Exp"), aten.sqrt: _unary("Sqrt"), aten.neg: _unary("Neg"), aten.abs: _unary("Abs"),
    aten.hardtanh: hardtanh, aten.hardtanh_: hardtanh, aten.relu6: relu6, aten.silu: silu, aten.silu_: silu, aten.gelu: gelu,
    aten.leaky_relu: leaky_relu, aten.leaky_relu_: leaky_relu,
    aten.dropout: identity, aten.contiguous: identity, aten.clone: identity, aten.alias: identity,
    aten.detach: identity, aten._to_copy: to_copy, aten.to: to_copy,
    aten.view: reshape, aten.reshape: reshape, aten._unsafe_view: reshape, aten.flatten: reshape,
    aten.unsqueeze: reshape, aten.squeeze: reshape,
    aten.permute: permute, aten.transpose: transpose, aten.t: t, aten.cat: cat, aten.concat: cat,
    aten.softmax: softmax, aten._softmax: softmax, aten.log_softmax: softmax, aten._log_softmax: softmax,
    aten.mean: _reduce("ReduceMean", 18), aten.sum: _reduce("ReduceSum", 13),
})

"""fake-quant{integer=true}: put the integer ops of an integer-only transformer into the graph.

Before the quantizers go in, every op an integer-only target cannot run in float is replaced
by the fxopt.quant.integer_modules module that runs its integer kernel once frozen:

- scaled_dot_product_attention(q, k, v, mask, scale) becomes
  matmul(q, k^T) -> IntegerSoftmax(scale)(scores, mask) -> matmul(p, v), so both matmuls are
  activation x activation matmuls that fake-quant quantizes like any other;
- softmax over the last axis -> IntegerSoftmax(1); GELU (erf) -> IntegerGELU; tanh-approximate
  GELU, tanh and sigmoid -> IntegerLut; LayerNorm over the last axis -> IntegerLayerNorm.

What cannot be replaced faithfully (attention with a causal or additive float mask or with
dropout, a softmax over another axis, a LayerNorm over several axes) is an UnsupportedError
naming the node: a half-integer model is never left behind silently. An op a `skip` pattern
matches stays float (and the fpga-int8 export then refuses it by name).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import fetch_attr, fresh_attr_name, node_location
from ...ir.meta import TENSOR, TensorInfo
from ...ir.nodes import arg
from ...quant.integer_modules import IntegerGELU, IntegerLayerNorm, IntegerLut, IntegerSoftmax
from .rules import skip_match

aten = torch.ops.aten

PREFIX = "integer_ops"
_SDPA = {aten.scaled_dot_product_attention.default}
_SOFTMAXES = {aten.softmax.int, aten._softmax.default, torch.softmax}
_GELUS = {aten.gelu.default}
_LUTS = {aten.tanh.default: "tanh", torch.tanh: "tanh", aten.sigmoid.default: "sigmoid", torch.sigmoid: "sigmoid"}
_LAYER_NORMS = {aten.layer_norm.default}


def install_integer_ops(gm: fx.GraphModule, observer: str, act_symmetric: bool,
                       skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Replace attention, softmax, GELU, tanh / sigmoid and LayerNorm by integer modules, except
    where a skip pattern matches the op's module path; {module path: kind} of those installed."""
    installed = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or skip_match(node, skip):
            continue
        if node.target in _SDPA:
            path = _split_attention(gm, node, observer)
        elif node.target in _SOFTMAXES:
            path = _replace(gm, node, _softmax(node, observer), [node.args[0]])
        elif node.target in _GELUS:
            approximate = arg(node, 1, "approximate", "none")
            module = IntegerGELU(observer, act_symmetric) if approximate == "none" \
                else IntegerLut("gelu_tanh", observer, act_symmetric)
            path = _replace(gm, node, module, [node.args[0]])
        elif node.target in _LUTS:
            path = _replace(gm, node, IntegerLut(_LUTS[node.target], observer, act_symmetric), [node.args[0]])
        elif node.target in _LAYER_NORMS:
            path = _replace(gm, node, _layer_norm(gm, node, observer, act_symmetric), [node.args[0]])
        else:
            continue
        installed[path] = gm.get_submodule(path).kind
    if installed:
        for node in list(gm.graph.find_nodes(op="get_attr")):
            if not node.users:         # the weight and bias a LayerNorm no longer reads
                gm.graph.erase_node(node)
        gm.graph.lint()
        gm.recompile()
    return installed


def _add(gm: fx.GraphModule, module: torch.nn.Module, kind: str) -> str:
    path = fresh_attr_name(gm, f"{PREFIX}.{kind}")
    gm.add_submodule(path, module)
    for name, fq in (("input_fq", module.input_fq), ("output_fq", module.output_fq)):
        if fq is not None:
            fq.label = f"{path}.{name}"
    return path


def _replace(gm: fx.GraphModule, node: fx.Node, module: torch.nn.Module, args: list) -> str:
    """A call_module of `module` on `args` in place of `node`."""
    path = _add(gm, module, module.kind)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, tuple(args))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return path


def _softmax(node: fx.Node, observer: str) -> IntegerSoftmax:
    rank = len(node.meta[TENSOR].shape)
    dim = arg(node, 1, "dim", -1)
    if dim is None or dim % rank != rank - 1:
        raise UnsupportedError(f"integer softmax: {node.name} is over axis {dim}; the integer kernel runs over "
                               "the last axis", where=node_location(node),
                               hint="move the axis last (transpose) before the softmax")
    return IntegerSoftmax(1.0, observer)


def _layer_norm(gm: fx.GraphModule, node: fx.Node, observer: str, act_symmetric: bool) -> IntegerLayerNorm:
    shape = list(arg(node, 1, "normalized_shape"))
    width = node.meta[TENSOR].shape[-1]
    if shape != [width]:
        raise UnsupportedError(f"integer LayerNorm: {node.name} normalizes over {shape}; the integer kernel "
                               "normalizes the last axis only", where=node_location(node))
    weight, bias = arg(node, 2, "weight"), arg(node, 3, "bias")
    weight = fetch_attr(gm, weight.target) if weight is not None else torch.ones(width)
    bias = fetch_attr(gm, bias.target) if bias is not None else torch.zeros(width)
    return IntegerLayerNorm(weight, bias, float(arg(node, 4, "eps", 1e-5)), observer, act_symmetric)


def _split_attention(gm: fx.GraphModule, node: fx.Node, observer: str) -> str:
    """matmul(q, k^T) -> IntegerSoftmax(scale)(scores, mask) -> matmul(p, v) for one attention node."""
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    if float(arg(node, 4, "dropout_p", 0.0)) != 0.0 or arg(node, 5, "is_causal", False) \
            or arg(node, 7, "enable_gqa", False):
        raise UnsupportedError(f"integer attention: {node.name} uses dropout, a causal mask or grouped "
                               "query heads, which the integer split does not take", where=node_location(node),
                               hint="export the model in eval mode with a boolean key mask")
    if mask is not None and (not isinstance(mask, fx.Node) or mask.meta[TENSOR].dtype != torch.bool):
        raise UnsupportedError(f"integer attention: {node.name} takes an additive float mask; the integer "
                               "softmax drops keys by a boolean mask", where=node_location(node),
                               hint="pass the attention mask as booleans (True: attend)")
    q_info, k_info = q.meta[TENSOR], k.meta[TENSOR]
    scale = arg(node, 6, "scale")
    scale = 1.0 / math.sqrt(q_info.shape[-1]) if scale is None else float(scale)
    path = _add(gm, IntegerSoftmax(scale, observer), "softmax")
    scores_shape = (*q_info.shape[:-1], k_info.shape[-2])
    g = gm.graph
    with g.inserting_before(node):
        kt = g.call_function(aten.transpose.int, (k, -2, -1))
        scores = g.call_function(aten.matmul.default, (q, kt))
        probs = g.call_module(path, (scores,) if mask is None else (scores, mask))
        out = g.call_function(aten.matmul.default, (probs, v))
    shape_t = (*k_info.shape[:-2], k_info.shape[-1], k_info.shape[-2])
    for new, shape in ((kt, shape_t), (scores, scores_shape), (probs, scores_shape)):
        new.meta = {**node.meta, TENSOR: TensorInfo(shape, q_info.dtype, q_info.device, q_info.dynamic)}
    out.meta = dict(node.meta)
    node.replace_all_uses_with(out)
    g.erase_node(node)
    return path

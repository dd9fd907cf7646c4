"""Replace one linear / conv node by its chain of factor ops.

The factors become new Parameters on the GraphModule next to the original weight
(`<layer>.lr_first`, `lr_core`, `lr_last`); the bias moves to the last factor. The new
nodes carry the original node's module stack, so skip patterns and reports of later
passes (fake-quant quantizes each factor) still name the user's layer. The original
weight is dropped from the GraphModule (the traced copy's, never the user's) unless
another op still reads it.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ...ir.graph import fetch_attr, fresh_attr_name, set_attr
from ...ir.meta import TENSOR, TensorInfo
from . import decompose as D
from .layers import Layer
from .plan import Choice, Spectra

aten = torch.ops.aten


def factors(spectra: Spectra, choice: Choice) -> list[tuple[torch.Tensor, dict]]:
    """[(weight, conv geometry kwargs)] of the factor ops, first to last."""
    layer = spectra.layer
    if choice.form == "matrix":
        first, second = spectra.matrix_svd.factors(choice.ranks[0])
        if not layer.is_conv:
            return [(first, {}), (second, {})]
        g = layer.geometry
        return [(first[:, :, None, None], _conv(g.stride, (0, 0), (1, 1))),
                (second[:, :, None, None], _conv((1, 1), (0, 0), (1, 1)))]
    g = layer.geometry
    if choice.form == "tucker2":
        first, core, last = D.tucker2(layer.weight.float(), choice.ranks, spectra.rows)
        return [(first, _conv((1, 1), (0, 0), (1, 1))), (core, _conv(g.stride, g.padding, g.dilation)),
                (last, _conv((1, 1), (0, 0), (1, 1)))]
    vertical, horizontal = D.spatial_factors(spectra.spatial_svd, tuple(layer.weight.shape), choice.ranks[0])
    return [(vertical, _conv((g.stride[0], 1), (g.padding[0], 0), (g.dilation[0], 1))),
            (horizontal, _conv((1, g.stride[1]), (0, g.padding[1]), (1, g.dilation[1])))]


def _conv(stride, padding, dilation) -> dict:
    return {"stride": list(stride), "padding": list(padding), "dilation": list(dilation)}


NAMES = {2: ("lr_first", "lr_last"), 3: ("lr_first", "lr_core", "lr_last")}


def substitute(gm: fx.GraphModule, layer: Layer, chain: list[tuple[torch.Tensor, dict]]) -> fx.Node:
    """Insert the factor ops before `layer.node`, rewire its users, erase it; returns the last op."""
    node = layer.node
    base = str(layer.weight_node.target).rpartition(".")[0] or str(layer.weight_node.target)
    trainable = fetch_attr(gm, layer.weight_node.target).requires_grad
    value = node.args[0]
    with gm.graph.inserting_before(node):
        for index, ((weight, conv), name) in enumerate(zip(chain, NAMES[len(chain)])):
            target = fresh_attr_name(gm, f"{base}.{name}")
            set_attr(gm, target, torch.nn.Parameter(weight.contiguous(), requires_grad=trainable))
            w_node = gm.graph.get_attr(target)
            w_node.meta[TENSOR] = TensorInfo.of(weight)
            bias = layer.bias_node if index == len(chain) - 1 else None
            if layer.is_conv:
                op = gm.graph.call_function(aten.conv2d.default, (value, w_node, bias, conv["stride"],
                                                                  conv["padding"], conv["dilation"], 1))
            else:
                op = gm.graph.call_function(aten.linear.default, (value, w_node, bias))
            op.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
            value = op
    node.replace_all_uses_with(value)
    gm.graph.erase_node(node)
    _drop_if_unread(gm, layer.weight_node)
    return value


def _drop_if_unread(gm: fx.GraphModule, attr: fx.Node) -> None:
    """Erase a get_attr nobody reads any more, and free its tensor when no other node
    names it (the factors replace it: keeping it would count its parameters twice)."""
    if attr.users:
        return
    gm.graph.erase_node(attr)
    if not any(n.target == attr.target for n in gm.graph.find_nodes(op="get_attr")):
        owner_path, _, name = str(attr.target).rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        delattr(owner, name)

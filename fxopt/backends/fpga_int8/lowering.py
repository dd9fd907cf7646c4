"""Lower a calibrated fake-quant GraphModule to an IntegerModel (integer-only, see model.py).

One walk over the graph in order. Each value becomes a tensor of int8 codes on a grid
(scale, zero point, range) or of int32 accumulators (per-channel scale):

- a producer (conv, linear, add, concat, avg-pool) writes int8 codes on the grid of the
  activation quantizer that reads its result: found by following single users through
  clamps (ReLU, ReLU6, hardtanh, clamp: fused into the output's clamp bounds when they
  come first) and value-preserving ops (max-pool, flatten, reshape, dropout, which
  commute with a monotone quantizer and so then run on codes);
- with no such quantizer (e.g. a conv before a global average pool, or the last linear)
  it keeps int32 accumulators, which only avg-pool, max-pool, reshapes and the model
  output read;
- an activation quantizer on codes of another grid becomes a requantize layer; on a
  model input it defines the input's quantization (the host-side float step).

The walk (here) dispatches each node by its target through LOWERINGS, the OpRegistry the
op-family modules (ops_linear, ops_joins, ops_pool, ops_shape, ops_attention, ops_embedding)
register their handlers in (activation quantizers go to ops_quant, the integer ops of
fake-quant{integer=true} to ops_integer); the handlers read and build through a
LoweringContext (context.py). A float value computed from parameters alone is a constant,
evaluated at export (evaluate.py) and folded by the op that reads it; integer values (token
ids, masks, sizes) are read by the ops that take them.

Anything else, or an op reading a value that has no integer form, is an UnsupportedError
naming the node and its source line: the model never gets a silent float island.
"""
from __future__ import annotations

import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import node_location
from ...ir.meta import TENSOR
from ...ir.nodes import target_name
from . import ops_attention, ops_embedding, ops_joins, ops_linear, ops_pool  # noqa: F401  (they register handlers)
from .context import LoweringContext
from .model import IntegerModel
from .ops_integer import integer_op
from .ops_quant import quantizer
from .ops_shape import alias
from .targets import LOWERINGS


class Lowering:
    """`Lowering(gm, rounding, pow2_scales).run()` -> IntegerModel."""

    def __init__(self, gm: fx.GraphModule, rounding: str, pow2_scales: bool):
        self.ctx = LoweringContext(gm, rounding, pow2_scales)

    def run(self) -> IntegerModel:
        ctx = self.ctx
        for node in ctx.gm.graph.nodes:
            if node.op in ("get_attr", "placeholder") or ctx.weight_fq(node) is not None:
                continue
            if node.op == "output":
                _outputs(ctx, node)
            elif node.op == "call_module" and node.target == "_guards_fn":
                continue
            elif node in ctx.fused:
                alias(ctx, node)
            elif ctx.is_constant(node) and _holds_floats(node):
                continue          # a constant: the ops that read it fold it in (ctx.constant_of)
            elif ctx.act_fq(node) is not None:
                quantizer(ctx, node)
            elif ctx.integer_op(node) is not None:
                integer_op(ctx, node)
            elif not _holds_floats(node):
                continue          # ids, masks and sizes: read (and checked) by the ops that take them
            elif (lower := LOWERINGS.lookup(node.target)) is not None:
                lower(ctx, node)
            else:
                raise UnsupportedError(
                    f"fpga-int8: {target_name(node)} has no integer form in "
                    "this export", where=node_location(node),
                    hint="supported: conv2d (incl. grouped / depthwise), linear, matmul of two activations, "
                         "add, cat, max / avg / adaptive-avg pooling, mean over H, W, flatten / reshape, "
                         "transpose / permute, slice / select, embedding, the integer ops of "
                         "fake-quant{integer=true} (softmax, GELU, LayerNorm, tanh / sigmoid), "
                         "ReLU / ReLU6 / hardtanh / clamp; replace the op or keep it out "
                         "of the exported model")
        return ctx.model


def _holds_floats(node: fx.Node) -> bool:
    """Whether a node's value is float data (not integer ids, a boolean mask or a size)."""
    info = node.meta.get(TENSOR)
    infos = info if isinstance(info, (tuple, list)) else [info]
    return any(i is not None and i.dtype.is_floating_point for i in infos)


def _outputs(ctx: LoweringContext, node: fx.Node) -> None:
    """The model's outputs: the tensors the graph's output node returns."""
    outs = node.args[0]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    for out in outs:
        if not isinstance(out, fx.Node):
            raise UnsupportedError("fpga-int8: the model returns a non-tensor value",
                                   where=node_location(node), hint="return tensors only")
        ctx.model.outputs.append(ctx.tensor(out, node)[0])

"""The integer ops fake-quant{integer=true} installs: softmax, GELU, LayerNorm and tables.

Each call_module of a quant.integer_modules op becomes one layer whose constants come from
the same intmath `*_constants` the module's kernel was built from, on the module's own grids:
its producer wrote its codes on the op's input grid (the output-form search reads it from
the op), and its readers read the op's output grid. An attention mask must be the model's
key mask: the mask subgraph is run at export on test masks and must keep key j of sample b
exactly when mask[b, j] is not 0, else the export is refused by name.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import node_location
from ...quant.intmath import gelu_constants, layernorm_constants, softmax_constants
from .context import LoweringContext
from .evaluate import evaluate, feeds_for, integer_input
from .grid import Grid


def integer_op(ctx: LoweringContext, node: fx.Node) -> None:
    """Lower a call_module of an integer op to its layer."""
    op = ctx.integer_op(node)
    name, tensor = _input_on_grid(ctx, node, Grid.of_integer_op(op.in_grid()))
    out = Grid.of_integer_op(op.out_grid())
    fields = {"output_zero_point": out.zero_point, "clamp": [out.qmin, out.qmax]}
    inputs = [name]
    if op.kind == "softmax":
        k = softmax_constants(op.logit_scale())
        fields.update(ln2=k.ln2, exp_b=k.b, exp_c=k.c)
        del fields["clamp"]
        mask = _key_mask(ctx, node, tensor["shape"][-1]) if len(node.args) > 1 else None
        if mask is not None:
            inputs.append(mask)
    elif op.kind == "gelu":
        k = gelu_constants(op.in_grid()[0], out.scale)
        fields.update(input_zero_point=tensor["zero_point"], gelu_b=k.b, gelu_one=k.one, multiplier=k.multiplier,
                      shift=k.shift)
    elif op.kind == "layernorm":
        k = layernorm_constants(op.in_grid()[0], tensor["shape"][-1], op.eps, op.weight.double().numpy(),
                                op.bias.double().numpy(), out.scale)
        fields.update(eps=k.eps, gamma=k.gamma.tolist(), beta=k.beta.tolist(), multiplier=k.multiplier,
                      shift=k.shift)
    else:
        fields = {"table": op.table()}
    ctx.emit(node, op.kind, inputs, out.tensor(tensor["shape"], node.name), fields)


def _input_on_grid(ctx: LoweringContext, node: fx.Node, grid: Grid) -> tuple[str, dict]:
    """The op's input tensor, which must hold codes of the op's input grid."""
    name, tensor = ctx.tensor(node.args[0], node)
    if tensor["dtype"] == "int8":
        ok = not grid.wide and Grid.of_tensor(tensor) == grid
    else:
        ok = grid.wide and tensor["scale"] == [grid.scale] and tensor["bound"] <= max(-grid.qmin, grid.qmax)
    if not ok:
        raise UnsupportedError(f"fpga-int8: {node.name} reads {node.args[0].name}, whose codes are not on its "
                               "input grid", where=node_location(node),
                               hint="let the integer op read its producer's result directly (fake-quant "
                                    "integer=true places the grids)")
    return name, tensor


def _key_mask(ctx: LoweringContext, node: fx.Node, keys: int) -> str | None:
    """The model input that masks the softmax's keys, checked on test masks to keep key j of
    sample b exactly where mask[b, j] != 0; None for a constant mask that keeps every key."""
    keep = node.args[1]
    if ctx.is_constant(keep):
        if bool(ctx.constant_of(keep).all()):
            return None
        raise UnsupportedError(f"fpga-int8: the mask of {node.name} is a constant that drops keys (e.g. a "
                               "causal mask); the integer softmax takes a key mask from an input",
                               where=node_location(node), hint="export an encoder with a [batch, keys] mask")
    placeholder = integer_input(ctx, keep, node, [keys], (-128, 127), "int8")
    info = placeholder.meta["fxopt.tensor"]
    generator = torch.Generator().manual_seed(0)
    masks = [torch.ones(3, keys), torch.zeros(3, keys), torch.randint(0, 2, (3, keys), generator=generator),
             torch.randint(-3, 4, (3, keys), generator=generator)]
    masks[1][:, 0] = 1
    for mask in masks:
        mask = mask.to(info.dtype)
        got = evaluate(ctx.gm, keep, feeds_for(keep, 3, {placeholder: mask}))
        want = (mask != 0).reshape(3, *([1] * (got.dim() - 2)), keys)
        if got.dim() < 2 or got.shape[0] != 3 or got.shape[-1] != keys or not bool((got == want).all()):
            raise UnsupportedError(f"fpga-int8: the mask of {node.name} is not the key mask of input "
                                   f"{placeholder.name} (keep key j of sample b where mask[b, j] != 0)",
                                   where=node_location(node),
                                   hint="give the attention a boolean key mask from a [batch, keys] input")
    return placeholder.name

"""Embedding lookups: int8 tables gathered by token ids.

fake-quant{integer=true} quantizes a table like a weight (symmetric int8, one scale per
column). Indexed by a model input (token ids), the lookup is a layer: the ids enter as int32
clamped to the table and the rows are gathered as int32 codes with per-column scales. A lookup
by constant ids (position ids, token type ids from a buffer) never reaches this handler: its
value is a constant (evaluate.constant_value), which the add that reads it folds into its
constant term (ops_joins.add_terms); a constant read by any other op is refused.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import node_location
from .context import LoweringContext
from .evaluate import integer_input
from .targets import EMBEDDINGS, LOWERINGS


@LOWERINGS.register(*EMBEDDINGS)
def embedding(ctx: LoweringContext, node: fx.Node) -> None:
    """Lower an embedding lookup to a gather layer, or to constant rows."""
    codes, scale = _table_codes(ctx, node)
    index = node.args[1]
    shape = ctx.shape(node)
    if index.op != "placeholder":
        raise UnsupportedError(f"fpga-int8: the index of {node.name} is computed from the inputs' values; an "
                               "embedding takes an integer model input (token ids) or constants",
                               where=node_location(node), hint="pass the ids the table is indexed by as an input")
    integer_input(ctx, index, node, shape[:-1], (0, codes.shape[0] - 1), "int32")
    tensor = {"dtype": "int32", "shape": shape, "source": node.name, "scale": scale.tolist(),
              "scale_shape": [len(scale)], "bound": int(np.abs(codes).max())}
    ctx.emit(node, "embedding", [index.name], tensor, {}, codes)


def _table_codes(ctx: LoweringContext, node: fx.Node) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes [V, C], float64 scales [C]) of a quantized embedding table."""
    w_node = node.args[0]
    fq = ctx.weight_fq(w_node)
    if fq is None or fq.bits > 8 or not fq.symmetric or fq.axis not in (1, None) or fq.group_size is not None:
        raise UnsupportedError(f"fpga-int8: the table of {node.name} is not quantized to symmetric int8 with "
                               "one scale per column", where=node_location(node),
                               hint="fake-quant{integer=true} quantizes embedding tables")
    table = ctx.constant(w_node.args[0])
    with torch.no_grad():
        dequant = fq(table).double()
    scale = fq.scale.double().reshape(-1).expand(table.shape[1])
    codes = torch.round(dequant / scale).clamp(-127, 127).to(torch.int8)
    return codes.numpy(), scale.numpy()

"""Embedding lookups: int8 tables gathered by token ids.

fake-quant{integer=true} quantizes a table like a weight (symmetric int8, one scale per
column). Indexed by a model input (token ids), the lookup is a layer: the ids enter as int32
clamped to the table and the rows are gathered as int32 codes with per-column scales. A lookup
by constant ids (position ids, token type ids from a buffer) never reaches this handler: its
value is a constant (evaluate.constant_value): the add that reads it folds it into its constant
term (ops_joins.add_terms), a quantizer that reads it makes a constant layer of its codes
(ops_quant), and any other reader refuses it.
"""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import node_location
from .context import LoweringContext
from .evaluate import integer_input
from .ops_linear import weight_codes
from .targets import EMBEDDINGS, LOWERINGS


@LOWERINGS.register(*EMBEDDINGS)
def embedding(ctx: LoweringContext, node: fx.Node) -> None:
    """Lower an embedding lookup by token ids to a gather layer."""
    codes, scale = weight_codes(ctx, node, index=0, axis=1)      # int8 [V, C], a scale per column
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

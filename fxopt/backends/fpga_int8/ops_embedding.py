"""Embedding lookups: int8 tables gathered by token ids, or folded to constants.

fake-quant{integer=true} quantizes a table like a weight (symmetric int8, one scale per
column). Indexed by a model input (token ids), the lookup is a layer: the ids enter as int32
clamped to the table and the rows are gathered as int32 codes with per-column scales. Indexed
by a constant (position ids, token type ids from a buffer), the rows are the same for every
sample: they are gathered at export and kept as the real values of their codes, which the add
that reads them folds into its constant term (ops_joins.add_terms). A constant read by any other
op is refused.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import node_location
from ...ir.meta import TENSOR
from .context import LoweringContext
from .evaluate import evaluate, integer_input, placeholders_of
from .targets import EMBEDDINGS, LOWERINGS


@LOWERINGS.register(*EMBEDDINGS)
def embedding(ctx: LoweringContext, node: fx.Node) -> None:
    """Lower an embedding lookup to a gather layer, or to constant rows."""
    codes, scale = _table_codes(ctx, node)
    index = node.args[1]
    shape = ctx.shape(node)
    if index.op == "placeholder":
        integer_input(ctx, index, node, shape[:-1], (0, codes.shape[0] - 1))
        tensor = {"dtype": "int32", "shape": shape, "source": node.name, "scale": scale.tolist(),
                  "scale_shape": [len(scale)], "bound": int(np.abs(codes).max())}
        ctx.emit(node, "embedding", [index.name], tensor, {}, codes)
        return
    rows = _constant_index(ctx, index, node)
    ctx.constants[node] = codes[rows].astype(np.float64) * scale


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


def _constant_index(ctx: LoweringContext, index: fx.Node, node: fx.Node) -> np.ndarray:
    """The per-sample indices of a lookup whose index does not depend on the inputs' values."""
    results = []
    for batch, fill in ((1, 0), (2, 1)):
        feeds = {p: torch.full((batch, *p.meta[TENSOR].shape[1:]), fill, dtype=p.meta[TENSOR].dtype)
                 for p in placeholders_of(index)}
        results.append(evaluate(ctx.gm, index, feeds))
    one, two = results
    same = one.dim() >= 1 and one.shape[0] == 1 and two.shape[0] in (1, 2) and two.shape[1:] == one.shape[1:]
    if not same or not bool((two == one.expand_as(two)).all()):        # [1, ..] broadcasts over the batch
        raise UnsupportedError(f"fpga-int8: the index of {node.name} depends on the inputs' values and is not "
                               "an input itself", where=node_location(node),
                               hint="index embeddings by an integer model input or by constants")
    return one[0].numpy().astype(np.int64)

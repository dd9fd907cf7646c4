"""2:4 sparse linears on torch.sparse.to_sparse_semi_structured weights (CUDA); see the package docstring."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from ...ir.graph import fetch_attr, fresh_attr_name
from ...ir.meta import TENSOR
from .graph_edits import _erase_if_unused

if TYPE_CHECKING:
    from . import InductorReport

aten = torch.ops.aten


class SemiStructured24:
    """Points every fitting 2:4 linear of `graph` at a semi-structured sparse copy of its weight."""

    def __init__(self, graph: fx.GraphModule, device: torch.device, report: InductorReport):
        self.gm, self.device, self.report = graph, device, report

    def run(self) -> None:
        for node in list(self.gm.graph.nodes):
            w = node.args[1] if node.op == "call_function" and node.target is aten.linear.default else None
            weight = fetch_attr(self.gm, w.target) if isinstance(w, fx.Node) and w.op == "get_attr" else None
            if _is_2to4(weight):
                reason = self._why_dense(node.args[0], weight) or self._rewrite(node, w, weight)
                if reason:
                    self.report.dense_2to4.append((node.name, reason))
        self.gm.graph.lint()
        self.gm.recompile()

    def _why_dense(self, x, weight: torch.Tensor) -> str | None:
        dtype = getattr(x.meta.get(TENSOR) if isinstance(x, fx.Node) else None, "dtype", None)
        if self.device.type != "cuda":
            return "torch's semi-structured sparse kernels run on CUDA only"
        if dtype not in (torch.float16, torch.bfloat16) or weight.dtype != dtype:
            return f"needs fp16 / bf16 input and weight, got {dtype} and {weight.dtype}"
        return None

    def _rewrite(self, node: fx.Node, w: fx.Node, weight: torch.Tensor) -> str | None:
        try:
            sparse = torch.sparse.to_sparse_semi_structured(weight.detach().to(self.device).contiguous())
        except (RuntimeError, ValueError) as exc:
            return f"to_sparse_semi_structured refused it: {str(exc).strip().splitlines()[0]}"
        name = fresh_attr_name(self.gm, f"sparse24_{node.name}_weight")
        self.gm.register_buffer(name, sparse)
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.get_attr(name)
        new.meta[TENSOR] = w.meta.get(TENSOR)
        node.replace_input_with(w, new)
        _erase_if_unused(self.gm.graph, w)
        self.report.sparse_2to4.append((node.name, f"{tuple(weight.shape)} {type(sparse).__name__}"))
        return None


def _is_2to4(weight) -> bool:
    """A 2-D float weight with at most 2 nonzeros in every group of 4 along its input dim."""
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] % 4 == 0 \
        and weight.is_floating_point() and bool(((weight.detach().reshape(-1, 4) != 0).sum(-1) <= 2).all())

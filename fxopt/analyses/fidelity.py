"""fidelity: how far a compressed graph's outputs are from the model it came from.

Distillation trains against it, sensitivity ranks layers by it and compress accepts or
refuses a candidate by it, so all three measure the same thing. The measure depends on
what the output is:

- logits (a 2-D output made by a linear layer: a classifier's scores): the KL divergence
  KL(softmax(teacher) || softmax(student)), averaged over rows; 0 when the predictions agree.
- features (anything else: embeddings, probabilities, regressions): 1 - cosine similarity
  along the last dim, averaged over rows; 0 when the directions agree.

A tuple output is measured leaf by leaf and averaged.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import UnsupportedError
from ..ir.inputs import tensor_leaves
from ..ir.nodes import op_name

__all__ = ["OutputKind", "divergence", "output_kind", "output_kinds", "output_nodes"]

OutputKind = Literal["logits", "features"]
LOGIT_PRODUCERS = frozenset({"linear", "addmm"})


def output_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes whose values the graph returns, in pytree leaf order."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    return [v for v in torch.utils._pytree.tree_leaves(output.args[0]) if isinstance(v, fx.Node)]


def output_kinds(gm: fx.GraphModule) -> list[OutputKind]:
    """The kind of each tensor the graph returns, in pytree leaf order."""
    return [_kind_of(v) for v in output_nodes(gm)]


def output_kind(gm: fx.GraphModule) -> OutputKind:
    """The kind of the graph's (first) output."""
    kinds = output_kinds(gm)
    return kinds[0] if kinds else "features"


def _kind_of(value: fx.Node) -> OutputKind:
    example = value.meta.get("val")
    two_d = isinstance(example, torch.Tensor) and example.dim() == 2
    return "logits" if two_d and value.op == "call_function" and op_name(value) in LOGIT_PRODUCERS else "features"


def divergence(student, teacher, kinds: OutputKind | list[OutputKind] = "features") -> torch.Tensor:
    """The mean divergence of `student`'s outputs from `teacher`'s (tensors or pytrees of
    them, `kinds` one per leaf, or one for all); a differentiable scalar."""
    s_leaves, t_leaves = tensor_leaves(student), tensor_leaves(teacher)
    if len(s_leaves) != len(t_leaves) or not s_leaves:
        raise UnsupportedError(f"fidelity: the model returns {len(s_leaves)} tensors where the model it is "
                               f"compared with returns {len(t_leaves)}",
                               hint="compare models with the same outputs (a pass must not drop an output)")
    kinds = [kinds] * len(s_leaves) if isinstance(kinds, str) else list(kinds)
    parts = [_one(s, t, k) for s, t, k in zip(s_leaves, t_leaves, kinds)]
    return torch.stack(parts).mean()


def _one(student: torch.Tensor, teacher: torch.Tensor, kind: OutputKind) -> torch.Tensor:
    s, t = student.float(), teacher.float()
    if s.dim() == 0:
        return (s - t).abs() / t.abs().clamp_min(1e-12)
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    if kind == "logits":
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
    return (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-12)).mean()

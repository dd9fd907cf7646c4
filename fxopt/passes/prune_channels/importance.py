"""Channel importance for prune-channels: one score per channel of a group, aggregated
over the group's weight members, and how many channels to keep (local or global).

Scores are summed over a group's members because a group's channels are removed from
all of them at once: a channel is worth as much as everything it carries.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ...analyses.channel_groups import ChannelGroup
from ...analyses.channel_groups.scores import member_norms, norm_scores, weight_members
from ...errors import PassOptionError
from ...ir.graph import fetch_attr

aten = torch.ops.aten
_BATCH_NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
                aten._native_batch_norm_legit.default, aten.native_batch_norm.default,
                aten.instance_norm.default}


class Importance:
    """Scores the channels of groups of one graph with one criterion.

    l1 / l2: per-channel norm of every weight member's slice (channel c owns indices
        offset + c*block + r of the member's dim), summed over the members.
    bn-scale: |gamma| of the group's BatchNorm weights (the network-slimming criterion);
        a group without BatchNorm falls back to l1.
    taylor: first-order Taylor saliency sum |w * dL/dw| over the weight members, the
        gradients taken on calibration batches (label-free loss, see `_taylor_loss`).
    random: uniform scores, seeded.

    Weights are the members held as nn.Parameter (BatchNorm running stats are buffers
    and left out); a group with no Parameter member uses every tensor member.
    """

    def __init__(self, gm: fx.GraphModule, kind: str, seed: int = 0, batches=None):
        self.gm, self.kind = gm, kind
        self.generator = torch.Generator().manual_seed(seed)
        self.bn_weights = _batch_norm_weights(gm) if kind == "bn-scale" else set()
        self.grads = _gradients(gm, batches) if kind == "taylor" else {}

    def scores(self, group: ChannelGroup) -> torch.Tensor:
        """float64 [group.size]."""
        if self.kind == "random":
            return torch.rand(group.size, generator=self.generator, dtype=torch.float64)
        weights = weight_members(self.gm, group)
        if self.kind == "bn-scale":
            gammas = [m for m in weights if m.name in self.bn_weights]
            return norm_scores(self.gm, group, gammas or weights, 1)
        if self.kind == "taylor":
            return _taylor_sum(self, group, [m for m in weights if m.name in self.grads])
        return norm_scores(self.gm, group, weights, 1 if self.kind == "l1" else 2)


def _taylor_sum(imp: Importance, group: ChannelGroup, members: list) -> torch.Tensor:
    total = torch.zeros(group.size, dtype=torch.float64)
    for m in members:
        saliency = (fetch_attr(imp.gm, m.name).detach().double() * imp.grads[m.name]).abs()
        total += member_norms(saliency, m, group.size, 1)
    return total


def _batch_norm_weights(gm: fx.GraphModule) -> set[str]:
    """FQNs of the get_attr tensors used as a batch norm's weight (gamma)."""
    found = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _BATCH_NORMS and len(node.args) > 1:
            w = node.args[1]
            if isinstance(w, fx.Node) and w.op == "get_attr":
                found.add(str(w.target))
    return found


def _gradients(gm: fx.GraphModule, batches) -> dict[str, torch.Tensor]:
    """Gradients of the label-free loss summed over the batches, per Parameter FQN.
    The graph's tensors are only read: requires_grad and .grad are restored after."""
    if not batches:
        raise PassOptionError("prune-channels: importance=taylor needs calibration batches",
                              hint="pass them to compile: fxopt.compile(model, inputs, pipeline=..., "
                                   "calibration=[batch, ...]), or use importance=l1")
    params = {str(n.target): fetch_attr(gm, str(n.target)) for n in gm.graph.find_nodes(op="get_attr")}
    params = {k: p for k, p in params.items() if isinstance(p, torch.nn.Parameter) and p.is_floating_point()}
    saved = {k: (p.requires_grad, p.grad) for k, p in params.items()}
    grads = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for batch in batches:
                args = batch if isinstance(batch, (tuple, list)) else (batch,)
                loss = _taylor_loss(gm(*args))
                found = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for k, g in zip(params, found):
                    if g is not None:
                        grads[k] += g.double()
    finally:
        for k, p in params.items():
            p.requires_grad_(saved[k][0])
            p.grad = saved[k][1]
    return grads


def _taylor_loss(output) -> torch.Tensor:
    """No labels are given, so: cross-entropy against the model's own prediction for
    (N, classes) logits (how confidently it decides), half the mean square otherwise."""
    leaves = [t for t in torch.utils._pytree.tree_leaves(output)
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not leaves:
        raise PassOptionError("prune-channels: importance=taylor found no output that depends on "
                              "the weights", hint="use importance=l1")
    loss = leaves[0].new_zeros(())
    for t in leaves:
        if t.dim() == 2 and t.shape[1] > 1:
            loss = loss + torch.nn.functional.cross_entropy(t, t.detach().argmax(1))
        else:
            loss = loss + 0.5 * t.pow(2).mean()
    return loss


def channels_to_keep(size: int, ratio: float, round_to: int, min_channels: int) -> int:
    """size minus floor(size * ratio), rounded up to a multiple of round_to, at least
    min_channels (and 1), at most size."""
    return _limits(size - int(size * ratio), size, round_to, min_channels)


def _limits(keep: int, size: int, round_to: int, min_channels: int) -> int:
    if round_to > 1:
        keep = math.ceil(keep / round_to) * round_to
    return max(1, min(size, max(keep, min_channels)))


def global_keep_counts(scored: list[tuple[ChannelGroup, torch.Tensor]], ratio: float,
                       round_to: int, min_channels: int) -> list[int]:
    """Keep counts per group for global scope: every group's scores are divided by
    their mean (so groups with large and small weights compare), and the lowest
    `ratio` of all channels across groups are removed, within each group's limits."""
    flat = []
    for i, (group, scores) in enumerate(scored):
        mean = float(scores.mean()) if group.size else 0.0
        normal = scores / mean if mean > 0 else torch.ones_like(scores)
        flat += [(float(s), i) for s in normal]
    budget = int(len(flat) * ratio)
    removed = [0] * len(scored)
    for _, i in sorted(flat, key=lambda s: s[0]):
        if budget == 0:
            break
        size = scored[i][0].size
        if size - removed[i] - 1 >= max(min_channels, 1):
            removed[i] += 1
            budget -= 1
    return [_limits(g.size - r, g.size, round_to, min_channels) for (g, _), r in zip(scored, removed)]



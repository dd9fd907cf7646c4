"""Channel importance for prune-channels: one score per channel of a group,
aggregated over the group's weight members, and how many channels to keep."""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ...analyses.channel_groups import ChannelGroup
from ...ir.graph import fetch_attr


def channel_scores(gm: fx.GraphModule, group: ChannelGroup, kind: str,
                   generator: torch.Generator) -> torch.Tensor:
    """float64 [group.size]. l1/l2: per-channel norm of every weight member's slice
    (channel c owns indices offset + c*block + r of the member's dim), summed over the
    members. Weights are the members held as nn.Parameter (BatchNorm running stats are
    buffers and left out); a group with no Parameter member uses every tensor member.
    random: uniform scores from `generator`."""
    if kind == "random":
        return torch.rand(group.size, generator=generator, dtype=torch.float64)
    members = [m for m in group.members if m.param]
    weights = [m for m in members if isinstance(fetch_attr(gm, m.name), torch.nn.Parameter)] or members
    total = torch.zeros(group.size, dtype=torch.float64)
    for m in weights:
        t = fetch_attr(gm, m.name).detach().narrow(m.dim, m.offset, group.size * m.block)
        rest = [d for d in range(t.dim()) if d != m.dim]
        if kind == "l1":
            per_index = torch.linalg.vector_norm(t, 1, dim=rest) if rest else t.abs()
            total += per_index.double().reshape(group.size, m.block).sum(1)
        else:
            per_index = torch.linalg.vector_norm(t, 2, dim=rest) if rest else t.abs()
            total += per_index.double().pow(2).reshape(group.size, m.block).sum(1).sqrt()
    return total


def channels_to_keep(size: int, ratio: float, round_to: int, min_channels: int) -> int:
    """size minus floor(size * ratio), rounded up to a multiple of round_to, at least
    min_channels (and 1), at most size."""
    keep = size - int(size * ratio)
    if round_to > 1:
        keep = math.ceil(keep / round_to) * round_to
    return max(1, min(size, max(keep, min_channels)))


def kept_channels(scores: torch.Tensor, keep: int) -> list[int]:
    """The `keep` highest-scoring channels, sorted (ties broken by the lower index)."""
    order = sorted(range(len(scores)), key=lambda c: (-float(scores[c]), c))
    return sorted(order[:keep])

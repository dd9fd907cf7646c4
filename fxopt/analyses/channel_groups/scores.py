"""How a group's channels rank by its weights, and which channels a count keeps.

Shared by prune-channels (its importance criteria) and the Sensitivity analysis, which
measures what removing the lowest-ranked channels costs: both must rank alike. Channel `c`
of a group owns the indices `offset + c*block + r` of each member's dim.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ...ir.graph import fetch_attr
from . import ChannelGroup, GroupMember

__all__ = ["kept_channels", "member_norms", "norm_scores", "weight_members"]


def weight_members(gm: fx.GraphModule, group: ChannelGroup) -> list[GroupMember]:
    """The members that carry weights: those held as nn.Parameter (BatchNorm running stats
    are buffers, left out), or every tensor member when the group has no Parameter."""
    members = [m for m in group.members if m.param]
    return [m for m in members if isinstance(fetch_attr(gm, m.name), torch.nn.Parameter)] or members


def member_norms(tensor: torch.Tensor, member: GroupMember, size: int, p: int) -> torch.Tensor:
    """float64 [size]: the L1 (p=1) or L2 (p=2) norm of each channel's slice of `tensor`."""
    t = tensor.detach().narrow(member.dim, member.offset, size * member.block)
    rest = [d for d in range(t.dim()) if d != member.dim]
    per_index = (torch.linalg.vector_norm(t, p, dim=rest) if rest else t.abs()).double()
    per_index = per_index.reshape(size, member.block)
    return per_index.sum(1) if p == 1 else per_index.pow(2).sum(1).sqrt()


def norm_scores(gm: fx.GraphModule, group: ChannelGroup, members: list[GroupMember], p: int = 1) -> torch.Tensor:
    """float64 [group.size]: each channel's norm summed over `members` (a channel is worth
    as much as everything it carries, since it is removed from all of them at once)."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for m in members:
        total += member_norms(fetch_attr(gm, m.name), m, group.size, p)
    return total


def kept_channels(scores: torch.Tensor, keep: int) -> list[int]:
    """The `keep` highest-scoring channels, sorted (ties broken by the lower index)."""
    order = sorted(range(len(scores)), key=lambda c: (-float(scores[c]), c))
    return sorted(order[:keep])

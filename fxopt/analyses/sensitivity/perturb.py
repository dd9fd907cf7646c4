"""The single-unit changes the Sensitivity analysis measures, each as replacement tensors.

A change is `{attribute FQN: new tensor}`; the caller swaps them in, runs the graph and
puts the original tensor objects back, so the graph's own tensors are never written.

- prune: the group's lowest-l1 channels (prune-channels' default importance,
  channel_groups.scores.norm_scores over the group's weight members) are zeroed
  in every tensor member's slice, the consumers' input-channel slices included, so a
  removed channel contributes nothing downstream, as after removal (a norm computed over
  the channel dim, e.g. LayerNorm, still counts the zeros: there it is an estimate).
- quant: the op's weight fake-quantized per output channel, symmetric, at `bits`.
- lowrank: the layer's weight replaced by its truncated SVD (a conv's as [out, in*k*k]).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.fx as fx

from ...ir.graph import fetch_attr
from ...quant import QSpec, fake_quantize, qparams_from_range
from ...quant.qparams import as_rows
from ..channel_groups import ChannelGroup
from ..channel_groups.scores import kept_channels
from ..cost import CostTable, op_kind

WEIGHTED = ("conv1d", "conv2d", "conv3d", "convolution", "linear")


def removed_count(size: int, share: float) -> int:
    """Channels a share removes, as prune-channels counts them (one channel always stays)."""
    return min(int(size * share), size - 1)


def pruned(gm: fx.GraphModule, group: ChannelGroup, scores: torch.Tensor, share: float) -> dict:
    """The group's members with its `share` lowest-scoring channels zeroed: those
    prune-channels removes at that share (the complement of the channels it keeps)."""
    count = removed_count(group.size, share)
    kept = set(kept_channels(scores, group.size - count))
    gone = torch.tensor([c for c in range(group.size) if c not in kept], dtype=torch.long)
    changed = {}
    for m in group.members:
        if not m.param:
            continue
        tensor = changed.get(m.name, fetch_attr(gm, m.name)).detach().clone()
        index = (m.offset + gone[:, None] * m.block + torch.arange(m.block)[None, :]).reshape(-1)
        tensor.index_fill_(m.dim, index, 0)
        changed[m.name] = tensor
    return changed


def prune_saved(gm: fx.GraphModule, group: ChannelGroup, cost: CostTable, share: float) -> float:
    """MACs the group's pruning at `share` saves: each contraction whose weight (or, for
    weightless ones such as attention, whose output) holds the group loses that part."""
    count = removed_count(group.size, share)
    params = {(m.name, m.dim): m for m in group.members if m.param}
    values = {m.name: m for m in group.members if not m.param}
    saved = 0.0
    for node in gm.graph.nodes:
        macs = cost.nodes.get(node.name)
        if macs is None or not macs.macs:
            continue
        part = 0.0
        for a in node.all_input_nodes:
            if a.op != "get_attr":
                continue
            shape = fetch_attr(gm, str(a.target)).shape
            for dim in range(len(shape)):
                m = params.get((str(a.target), dim))
                if m is not None:
                    part = max(part, count * m.block / shape[dim])
        if not part and node.name in values:
            m, example = values[node.name], node.meta.get("val")
            if isinstance(example, torch.Tensor) and m.dim < example.dim():
                part = count * m.block / example.shape[m.dim]
        saved += macs.macs * part
    return saved


def weight_of(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The FQN of a conv / linear node's weight when it is a floating get_attr of 2+ dims."""
    if node.op != "call_function" or op_kind(node) not in WEIGHTED or len(node.args) < 2:
        return None
    w = node.args[1]
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    value = fetch_attr(gm, str(w.target))
    return str(w.target) if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2 else None


def quantized(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric fake quantization of a weight at `bits`."""
    spec = QSpec(bits=int(bits), symmetric=True, axis=0)
    rows = as_rows(weight.detach().float(), 0)
    scale, zero = qparams_from_range(rows.amin(1), rows.amax(1), spec)
    return fake_quantize(weight.detach().float(), scale, zero, spec).to(weight.dtype)


def grouped(node: fx.Node) -> bool:
    """True for a conv with groups > 1 (its weight is not one matrix to factorize)."""
    groups = node.args[6] if op_kind(node) in ("conv1d", "conv2d", "conv3d") and len(node.args) > 6 else \
        node.args[8] if len(node.args) > 8 else 1
    return isinstance(groups, int) and groups > 1


def rank_of(weight: torch.Tensor, share: float) -> tuple[int, int]:
    """(rank kept, full rank) of a weight as [out, rest] at a share of the full rank."""
    full = min(weight.shape[0], math.prod(weight.shape[1:]))
    return max(1, round(full * share)), full


def low_rank(weight: torch.Tensor, share: float) -> torch.Tensor:
    """The weight's best approximation of rank `share` * full rank (truncated SVD)."""
    rank, _ = rank_of(weight, share)
    matrix = weight.detach().double().reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(weight.shape).to(weight.dtype)


def low_rank_saved(weight: torch.Tensor, macs: int, share: float) -> float:
    """MACs saved when the layer runs as two factors of that rank (negative: it costs more)."""
    out, rest = weight.shape[0], math.prod(weight.shape[1:])
    rank, _ = rank_of(weight, share)
    return macs * (1 - rank * (out + rest) / (out * rest))


@contextlib.contextmanager
def swapped(gm: fx.GraphModule, tensors: dict):
    """The graph with some attribute tensors replaced; the original objects put back after."""
    originals = {}
    try:
        for fqn, tensor in tensors.items():
            owner, name = _owner(gm, fqn)
            slot = owner._parameters if name in owner._parameters else owner._buffers if \
                name in owner._buffers else None
            originals[fqn] = (owner, name, slot, getattr(owner, name))
            if slot is None:
                object.__setattr__(owner, name, tensor)
            else:
                slot[name] = tensor
        yield gm
    finally:
        for owner, name, slot, value in originals.values():
            if slot is None:
                object.__setattr__(owner, name, value)
            else:
                slot[name] = value


def _owner(gm: torch.nn.Module, fqn: str):
    *path, name = fqn.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    return owner, name

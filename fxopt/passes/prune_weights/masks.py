"""Magnitude masks (True = kept) and how a pruned graph keeps them.

Exact counts: a layer pruned to sparsity s loses exactly `round(s * numel)` entries
(Python's round, half to even); global scope removes exactly `round(s * total)` across
all targeted weights. The entries removed are the smallest |w|; ties go by position
(a stable sort: graph order of the weights, then row-major index), so the same weights
always give the same mask. 2:4 keeps the two largest |w| of every group of four
consecutive entries along the op's input dim (ties again by position).

The masks stay with the graph three ways: as bool buffers `<weight fqn>_mask` (in the
state_dict, moved by `.to()`), in `gm.meta["fxopt.sparsity_masks"]` ({weight fqn:
mask}; kept even when dce drops buffers no node reads) and in `report.sparsity.masks`.
To keep the zeros while training the pruned graph:

    handles = mask_gradients(cm)        # masked entries get zero gradients: with SGD, Adam
    fxopt.finetune(cm, ...)             # and AdamW a zero weight with zero gradient stays 0
    for h in handles: h.remove()
    apply_masks(cm)                     # or re-apply after each optimizer.step() of your own loop
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ...errors import FxoptError
from ...ir.graph import fetch_attr

__all__ = ["MASKS_KEY", "apply_masks", "mask_gradients", "masks_of"]

MASKS_KEY = "fxopt.sparsity_masks"   # on gm.meta: {weight fqn: bool mask}; owner: prune-weights


def zeros_for(sparsity: float, numel: int) -> int:
    """How many of `numel` entries a sparsity of `sparsity` removes: round(sparsity * numel)."""
    return min(numel, max(0, round(sparsity * numel)))


def _drop_smallest(scores: torch.Tensor, zeros: int) -> torch.Tensor:
    """A flat keep-mask of `scores` without its `zeros` smallest entries (ties: lower index first)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if zeros:
        order = torch.sort(scores.flatten(), stable=True).indices
        keep[order[:zeros]] = False
    return keep


def layer_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of one weight losing exactly round(sparsity * numel) entries, smallest |w| first."""
    w = weight.detach()
    return _drop_smallest(w.abs(), zeros_for(sparsity, w.numel())).view(w.shape)


def global_masks(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Keep-masks of several weights that together lose exactly round(sparsity * total) entries:
    the smallest |w| over all of them."""
    if not weights:
        return []
    device = weights[0].device
    scores = torch.cat([w.detach().abs().flatten().to(device) for w in weights])
    keep = _drop_smallest(scores, zeros_for(sparsity, scores.numel()))
    parts = torch.split(keep, [w.numel() for w in weights])
    return [p.view(w.shape).to(w.device) for p, w in zip(parts, weights)]


def two_four_mask(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Keep-mask with 2 of every 4 consecutive entries along `dim` kept (the larger |w|)."""
    moved = weight.detach().abs().movedim(dim, -1)
    groups = moved.reshape(-1, 4)
    order = torch.sort(groups, dim=-1, stable=True).indices
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(1, order[:, :2], False)
    return keep.reshape(moved.shape).movedim(-1, dim)


def is_two_four(weight: torch.Tensor, dim: int) -> bool:
    """True if every group of 4 consecutive entries along `dim` has at most 2 nonzeros."""
    if weight.shape[dim] % 4:
        return False
    return bool(((weight.detach().movedim(dim, -1).reshape(-1, 4) != 0).sum(-1) <= 2).all())


# ---- keeping the masks ------------------------------------------------------------------------

def _graph(module) -> fx.GraphModule:
    gm = getattr(module, "graph_module", module)      # a CompiledModel, or the GraphModule itself
    if not isinstance(gm, fx.GraphModule):
        raise FxoptError(f"expected a GraphModule or a compiled model, got {type(module).__name__}",
                         hint="pass cm (what fxopt.compile returned) or cm.graph_module")
    return gm


def masks_of(module) -> dict[str, torch.Tensor]:
    """{weight fqn: keep-mask} that prune-weights recorded on `module` (a CompiledModel or GraphModule)."""
    return dict(_graph(module).meta.get(MASKS_KEY, {}))


def _pairs(module, masks) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    gm = _graph(module)
    masks = masks_of(gm) if masks is None else masks
    if not masks:
        raise FxoptError("no sparsity masks: this graph was not pruned by prune-weights",
                         hint="compile with pipeline='prune-weights{...}', or pass masks=report.sparsity.masks")
    out = []
    for fqn, mask in masks.items():
        try:
            weight = fetch_attr(gm, fqn)
        except AttributeError:
            raise FxoptError(f"the pruned weight {fqn!r} is no longer in the graph",
                             hint="a later pass replaced it; run prune-weights after passes that rewrite weights") \
                from None
        if tuple(weight.shape) != tuple(mask.shape):
            raise FxoptError(f"the mask of {fqn!r} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}",
                             hint="a later pass reshaped the weight (e.g. prune-channels): run prune-weights last")
        out.append((fqn, weight, mask.to(weight.device)))
    return out


def apply_masks(module, masks: dict | None = None) -> int:
    """Zero the masked entries of the pruned weights again (e.g. after an optimizer step);
    returns how many weights were masked. `masks` defaults to the recorded ones."""
    pairs = _pairs(module, masks)
    with torch.no_grad():
        for _, weight, mask in pairs:
            weight.masked_fill_(~mask, 0)
    return len(pairs)


def mask_gradients(module, masks: dict | None = None) -> list:
    """Zero the gradient of every masked entry as it is accumulated, so training (fxopt.finetune
    or your own loop) leaves the pruned weights at zero; returns the hook handles (`.remove()`)."""
    handles = []
    for fqn, weight, mask in _pairs(module, masks):
        if not (isinstance(weight, torch.nn.Parameter) and weight.requires_grad):
            continue
        handles.append(weight.register_post_accumulate_grad_hook(_zero_masked_grad(~mask)))
    return handles


def _zero_masked_grad(drop: torch.Tensor):
    def hook(param: torch.Tensor) -> None:
        if param.grad is not None:
            param.grad.masked_fill_(drop, 0)
    return hook

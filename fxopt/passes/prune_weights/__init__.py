"""prune-weights: magnitude pruning of single weights (unstructured) or in 2:4 groups.

Unlike prune-channels nothing is removed: the pruned entries of each targeted weight
(the constant weight of every linear and conv, see `targets`) become zeros and the
tensors keep their shapes, so the graph computes exactly what the dense graph computes
with the masked weights.

- pattern=unstructured, scope=layer: every weight loses exactly round(sparsity * numel)
  entries, its smallest |w|.
- pattern=unstructured, scope=global: exactly round(sparsity * total) entries over all
  targeted weights, the smallest |w| anywhere (layers of small weights lose more).
- pattern=2:4: of every 4 consecutive entries along the op's input dim (in features;
  in channels per group of a conv) the 2 smallest |w| go: 50% sparsity in the pattern
  sparse tensor cores run. A weight whose input dim is no multiple of 4 is left dense.

Ties go by position, so the result is deterministic (`masks`). The masks are recorded
(buffers `<fqn>_mask`, gm.meta, report.sparsity.masks); `mask_gradients` / `apply_masks`
keep them through finetuning. report.sparsity gives per weight sparsity, nnz and its
size dense, as CSR, as bitmask + values (and 2:4) — storage, not speed: see `report`.
On CUDA, backend="inductor" runs 2:4 fp16/bf16 linears on torch's semi-structured
sparse kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
import torch.fx as fx

from ...analyses import Shapes
from ...errors import PassOptionError
from ...ir.graph import fetch_attr, first_match, fresh_attr_name, set_attr, warn_unmatched
from ...pm import Pass, PassResult, register_pass
from ...pm.options import Range
from .masks import MASKS_KEY, apply_masks, global_masks, layer_mask, mask_gradients, masks_of, two_four_mask
from .report import LayerSparsity, SparsityReport
from .targets import KINDS, Target, find_targets
from ...pm.analysis import AnalysisManager

__all__ = ["PruneWeights", "SparsityReport", "apply_masks", "mask_gradients", "masks_of"]

@register_pass("prune-weights")
@dataclass(frozen=True)
class PruneWeights(Pass):
    """Zero the smallest-magnitude weights of linears and convs (full rules:
    fxopt.passes.prune_weights); report.sparsity gives sizes, never a CPU speed-up.

    sparsity: share of the targeted weights' entries zeroed, in [0, 1]; exactly
        round(sparsity * numel) per weight (scope=layer) or over all of them (global).
    scope: layer (every weight loses `sparsity` of its entries) | global (the smallest
        |w| anywhere go). pattern=2:4 is per group, so takes scope=layer only.
    pattern: unstructured | 2:4 (2 of every 4 consecutive entries along the input dim
        kept; sparsity is then 0.5, the default; leave it out).
    targets: which ops: linear, conv.
    skip: fnmatch patterns of module paths or weight FQNs left dense (e.g. `fc`,
        `*.attention.*`); a pattern matching no targeted weight warns.
    """

    sparsity: Annotated[float, Range(0, 1)] = 0.5
    scope: Literal["layer", "global"] = "layer"
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    targets: tuple[Literal["linear", "conv"], ...] = KINDS
    skip: tuple[str, ...] = ()

    tolerance: ClassVar[float | None] = None  # pruning changes what the model computes
    sees_into_leaves: ClassVar[bool] = False   # layers inside a leaf module are not seen

    def validate(self) -> None:
        if not self.targets:
            raise PassOptionError("prune-weights: targets is empty", hint="e.g. targets=[linear,conv]")
        if self.pattern == "2:4" and self.sparsity != 0.5:
            raise PassOptionError(f"prune-weights: pattern=2:4 zeroes exactly half of every weight, "
                                  f"but sparsity={self.sparsity!r} was asked for",
                                  hint="leave sparsity out with pattern=2:4 (or use pattern=unstructured)")
        if self.pattern == "2:4" and self.scope == "global":
            raise PassOptionError("prune-weights: pattern=2:4 works per group of 4 weights; scope=global "
                                  "does not apply to it", hint="leave scope out with pattern=2:4")

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        report = SparsityReport(self.pattern, self.scope, self.sparsity)
        targets, untargeted = find_targets(gm, self.targets)
        report.skipped.extend(untargeted)
        self._warn_unmatched(targets, report)
        targets = [t for t in targets if self._keep(t, report)]
        masks = self._masks(targets)
        if not targets or not any(bool((~m).any()) for m in masks):
            report.notes.append("sparsity 0: nothing pruned" if targets else "nothing to prune" + (
                f"; first not pruned: {report.skipped[0][0]}: {report.skipped[0][1]}" if report.skipped else ""))
            return PassResult.unchanged(notes=tuple(report.notes), sections={"sparsity": report})
        recorded = dict(gm.meta.get(MASKS_KEY, {}))
        for t, mask in zip(targets, masks):
            mask = _combine(mask, recorded.get(t.fqn))
            pruned = _apply(gm, t, mask)
            recorded[t.fqn] = _record_mask(gm, t.fqn, mask)
            report.masks[t.fqn] = recorded[t.fqn]
            report.layers.append(LayerSparsity.measure(t.fqn, t.path, t.kind, pruned, mask,
                                                       self.pattern == "2:4"))
            if t.other_readers:
                report.notes.append(f"{t.fqn} is also read by {', '.join(t.other_readers)} (no target), "
                                    "which sees the pruned weight")
        gm.meta[MASKS_KEY] = recorded
        return PassResult.changed(preserves=(Shapes,), notes=(_summary(report), *report.notes),
                                  sections={"sparsity": report})

    def _masks(self, targets: list[Target]) -> list[torch.Tensor]:
        if self.pattern == "2:4":
            return [two_four_mask(t.weight, t.input_dim) for t in targets]
        if self.scope == "global":
            return global_masks([t.weight for t in targets], self.sparsity)
        return [layer_mask(t.weight, self.sparsity) for t in targets]

    def _keep(self, t: Target, report: SparsityReport) -> bool:
        """False (with the reason in report.skipped) for a weight skip or the 2:4 pattern leaves dense."""
        hit = first_match(self.skip, [t.path, *t.names])
        if hit is not None:
            report.skipped.append((t.fqn, f"skipped: matches skip pattern '{hit}'"))
            return False
        size = t.weight.shape[t.input_dim]
        if self.pattern == "2:4" and size % 4:
            report.skipped.append((t.fqn, f"2:4 needs an input dim that is a multiple of 4; "
                                          f"dim {t.input_dim} of shape {tuple(t.weight.shape)} is {size}"))
            return False
        return True

    def _warn_unmatched(self, targets: list[Target], report: SparsityReport) -> None:
        names = [n for t in targets for n in (t.path, *t.names)]
        report.notes.extend(warn_unmatched("prune-weights", self.skip, names, "weight"))


def _combine(mask: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """A second prune-weights keeps what the first one pruned pruned."""
    if previous is None or tuple(previous.shape) != tuple(mask.shape):
        return mask
    return mask & previous.to(mask.device)


def _apply(gm: fx.GraphModule, t: Target, mask: torch.Tensor) -> torch.Tensor:
    """Set the masked weight (a new tensor: the traced one is never written) under every
    name of the target; tied names keep sharing one Parameter."""
    w = t.weight
    new = torch.where(mask, w.detach(), torch.zeros((), dtype=w.dtype, device=w.device))
    if isinstance(w, torch.nn.Parameter):
        new = torch.nn.Parameter(new, requires_grad=w.requires_grad)
    set_attr(gm, t.fqn, new)
    value = fetch_attr(gm, t.fqn)
    for alias in t.aliases:
        owner_path, _, name = alias.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if isinstance(value, torch.nn.Parameter):
            owner.register_parameter(name, value)
        else:
            owner.register_buffer(name, value)
    return value


def _record_mask(gm: fx.GraphModule, fqn: str, mask: torch.Tensor) -> torch.Tensor:
    """Store the mask as the bool buffer `<fqn>_mask` (a fresh name where that names
    something else); returns the buffer."""
    name = f"{fqn}_mask"
    try:
        current = fetch_attr(gm, name)
        if not (isinstance(current, torch.Tensor) and current.dtype == torch.bool
                and not isinstance(current, torch.nn.Parameter)):
            name = fresh_attr_name(gm, name)
    except AttributeError:
        pass
    set_attr(gm, name, mask)
    return fetch_attr(gm, name)


def _summary(report: SparsityReport) -> str:
    return (f"pruned {report.pruned} of {report.numel} weights ({report.sparsity:.1%}) in {len(report.layers)} "
            f"layers; smallest storage {report.bytes()} B vs {report.bytes('dense')} B dense "
            "(sizes only, see report.sparsity)")

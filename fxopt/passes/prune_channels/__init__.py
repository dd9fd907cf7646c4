"""prune-channels: structured pruning that physically removes channels.

The ChannelGroups analysis says which channel dims must be pruned together and how
a group's channel maps to indices of every member (offset, block). For every prunable
group this pass scores the channels (importance aggregated over the group's weights),
keeps the highest-scoring ones and removes the rest from every member: get_attr
tensors are sliced (new tensors; the traced originals are never mutated) and literal
shape arguments are rewritten (reshape/view/expand sizes, conv and GroupNorm groups,
split sizes, slice bounds, LayerNorm shapes). A group whose literals cannot be
rewritten is left unpruned, with a note; the result is checked by shape propagation.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch.fx as fx

import warnings

from ...analyses.channel_groups import ChannelGroups, channel_groups_for
from ...errors import PassOptionError
from ...ir.graph import first_match, first_twelve, fqn_matches, report_unmatched
from ...pm import Pass, PassResult, format_pipeline, register_pass
from ...pm.options import Range
from ...analyses.channel_groups.scores import kept_channels
from .importance import Importance, channels_to_keep, global_keep_counts
from .apply import apply_choices
from .budget import allocate, ratios_note
from .grouped import choose_grouped, has_channels_in_groups
from .plan import record_plan
from ...pm.analysis import AnalysisManager

__all__ = ["PruneChannels"]


@register_pass("prune-channels")
@dataclass(frozen=True)
class PruneChannels(Pass):
    """Remove a fraction of the channels of every prunable channel group.

    ratio: fraction of the prunable channels removed, in [0, 1).
    importance: l1 | l2 (per-channel norm of each weight member's slice, summed over
        the group) | bn-scale (|gamma| of the group's BatchNorms) | taylor (|w * grad|
        on the calibration batches given to compile) | random (seeded by `seed`).
    scope: local (every group loses `ratio` of its own channels) | global (scores
        normalised per group, the lowest `ratio` of all channels go, so unimportant
        groups lose more).
    round_to: keep a multiple of this many channels per group.
    min_channels: never keep fewer than this many channels in a group.
    ignore: fnmatch patterns of parameter FQNs or module paths (e.g. `layer1.*`,
        `fc`); a group with a matching member is left intact. The model's outputs
        (e.g. the classifier's classes) are never pruned.
    heads: prune whole attention heads (each keeps its head_dim); false leaves every
        heads group intact.
    seed: the seed of `importance=random`.
    grouped: how grouped convolutions (ResNeXt, RegNet) lose channels: channels (each
        conv keeps its groups, every group loses the same in-group channels) | groups
        (whole conv groups go); unset: both are tried and the one leaving fewer MACs kept.
    target_macs: the share of the graph's MACs to keep, in (0, 1]: each group's ratio is
        chosen from the measured Sensitivity (least output divergence per MAC saved first,
        in steps of round-to channels; needs data= or calibration batches), and the MACs
        reached are measured, within 2% of the target or said so in the report. Replaces
        ratio and scope; grouped convs lose whole conv groups.
    """

    ratio: Annotated[float, Range(0, 1, high_open=True)] = 0.5
    importance: Literal["l1", "l2", "bn-scale", "taylor", "random"] = "l1"
    scope: Literal["local", "global"] = "local"
    round_to: Annotated[int, Range(1)] = 1
    min_channels: Annotated[int, Range(1)] = 1
    ignore: tuple[str, ...] = ()
    heads: bool = True
    seed: Annotated[int, Range(0)] = 0
    grouped: Literal["channels", "groups"] | None = None
    target_macs: Annotated[float, Range(0, 1, low_open=True)] | None = None

    tolerance: ClassVar[float | None] = None  # pruning changes what the model computes
    sees_into_leaves: ClassVar[bool] = False   # layers inside a leaf module are not seen

    def validate(self) -> None:
        if self.target_macs is None:
            return
        clashes = [f"{key}={value}" for key, value, default in (("ratio", self.ratio, 0.5), ("scope", self.scope, "local"),
                                                                ("grouped", self.grouped, None)) if value != default]
        if clashes:
            raise PassOptionError(f"prune-channels: target-macs={self.target_macs:g} chooses each group's ratio "
                                  f"itself; it does not combine with {', '.join(clashes)}",
                                  hint="give either target-macs or ratio / scope / grouped")

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        self._warn_unmatched(gm)
        if self.target_macs is not None:
            return self._prune_to_target(gm, am)
        if self.grouped is not None or not has_channels_in_groups(gm):
            return self._prune(gm, am, self.grouped or "groups")
        return choose_grouped(gm, am, self._prune)

    def _prune(self, gm: fx.GraphModule, am, grouped: str) -> PassResult:
        groups = am.get(channel_groups_for(grouped))
        notes: list[str] = []
        importance = Importance(gm, self.importance, self.seed, am.calibration)
        candidates = self._candidates(groups, notes)
        if self.ratio == 0:
            return PassResult.unchanged(notes=("ratio=0 removes no channel",))
        if not candidates:
            return PassResult.unchanged(notes=(_none_prunable(groups),) + tuple(notes))
        scored = [(g, importance.scores(g)) for g in candidates]
        if self.scope == "global":
            keeps = global_keep_counts(scored, self.ratio, self.round_to, self.min_channels)
        else:
            keeps = [channels_to_keep(g.size, self.ratio, self.round_to, self.min_channels) for g, _ in scored]
        choices = [(g, kept_channels(s, k)) for (g, s), k in zip(scored, keeps) if k < g.size]
        if not choices:
            why = (f"at ratio={self.ratio} every one of the {len(candidates)} prunable groups keeps all its "
                   f"channels (min-channels={self.min_channels}, round-to={self.round_to}; the largest group "
                   f"has {max(g.size for g in candidates)})")
            return PassResult.unchanged(notes=(why,) + tuple(notes))
        pruned = apply_choices(gm, choices, notes)
        if not pruned:
            return PassResult.unchanged(notes=tuple(notes))
        before = format_pipeline(am.run.passes_before) if am.run is not None else ""   # what a replay runs first
        record_plan(gm, pruned, grouped, before)
        removed = sum(g.size - len(k) for g, k in pruned)
        notes.insert(0, f"pruned {len(pruned)} of {len(groups.groups)} groups, removed {removed} channels")
        return PassResult.changed(notes=tuple(notes))

    def _prune_to_target(self, gm: fx.GraphModule, am) -> PassResult:
        """target-macs: ratios allocated from sensitivity (budget.py), then applied."""
        groups = am.get(ChannelGroups)
        notes: list[str] = []
        candidates = self._candidates(groups, notes)
        if not candidates:
            return PassResult.unchanged(notes=(_none_prunable(groups),) + tuple(notes))
        importance = Importance(gm, self.importance, self.seed, am.calibration)
        allocation = allocate(gm, am, candidates, importance.scores, self)
        for note in allocation.notes[1:]:
            warnings.warn(f"prune-channels: {note}", stacklevel=2)
        if not allocation.choices:
            return PassResult.unchanged(notes=tuple(allocation.notes) + tuple(notes))
        pruned = apply_choices(gm, allocation.choices, notes)
        if not pruned:
            return PassResult.unchanged(notes=tuple(allocation.notes) + tuple(notes))
        before = format_pipeline(am.run.passes_before) if am.run is not None else ""
        record_plan(gm, pruned, "groups", before)
        removed = sum(g.size - len(k) for g, k in pruned)
        head = f"pruned {len(pruned)} of {len(groups.groups)} groups, removed {removed} channels"
        return PassResult.changed(notes=(head, *allocation.notes, ratios_note(pruned), *notes))

    def _candidates(self, groups, notes: list[str]) -> list:
        """The prunable groups this pass may prune: not ignored, heads only if `heads`."""
        found = []
        for group in groups.prunable():
            hit = self._ignored(group)
            if hit:
                notes.append(f"group {group.id} ({','.join(group.sources)}) ignored: {hit} matches an ignore pattern")
            elif group.kind == "heads" and not self.heads:
                notes.append(f"group {group.id} ({','.join(group.sources)}) left intact: heads=false")
            else:
                found.append(group)
        return found

    def _ignored(self, group) -> str | None:
        for m in group.members:
            if m.param and any(fqn_matches(m.name, p) for p in self.ignore):
                return m.name
        return None

    def _warn_unmatched(self, gm: fx.GraphModule) -> None:
        fqns = sorted({str(n.target) for n in gm.graph.find_nodes(op="get_attr")})
        report_unmatched("prune-channels", self.ignore, lambda pattern: first_match([pattern], fqns) is not None,
                         lambda pattern: f"ignore pattern {pattern!r} matches no parameter; "
                                         f"parameters are e.g. {first_twelve(fqns)}")


def _none_prunable(groups) -> str:
    """Why no group may be pruned: the commonest reasons the analysis gave."""
    if not groups.groups:
        return "no channel group: the graph has no conv, linear or other layer with channels"
    reasons = Counter((g.reason or "ignored or left intact").split("; ")[0] for g in groups.groups
                      if not g.prunable)
    shown = "; ".join(f"{n} x {why}" for why, n in reasons.most_common(3))
    return (f"no prunable group: {len(groups.groups)} groups, {len(groups.prunable())} prunable; "
            f"blocked by: {shown or 'nothing (all ignored or left intact)'}; "
            "fxopt.explain_pruning(model, inputs) lists every group")



"""The replayable record of what prune-channels removed: a PruningPlan.

A pruned graph's weights alone cannot be loaded into the user's model class (every
pruned tensor has another shape), and its graph cannot be pickled portably. What can
be kept is *which* indices survived: per parameter FQN, the kept indices (in the
original tensor's coordinates) of every dim that shrank, plus the original shapes
and the input shapes the model was traced with. Replaying that on a fresh copy of the
model (`choices_from_plan` + `apply_choices`) rebuilds the pruned graph exactly, and
a weights file then fills it.

The pass stores the plan in `gm.meta["fxopt.pruning_plan"]` (`record_plan`); a
second prune pass composes with the first, so the plan always refers to the
original model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ...errors import FxoptError
from ...util.files import write_atomically
from ...ir.graph import fetch_attr
from ...ir.meta import INPUT_SHAPES, TensorInfo
from .rewrite import Plan as _Drops

__all__ = ["PLAN_KEY", "PruningPlan", "choices_from_plan", "plan_from_choices", "record_plan"]

PLAN_KEY = "fxopt.pruning_plan"  # on gm.meta; owner: prune-channels (record_plan)
FORMAT = "fxopt.pruning-plan"
VERSION = 1


@dataclass
class PruningPlan:
    """Kept indices per parameter FQN and dim (only dims that shrank), in original
    coordinates; `shapes` the original shape of every such tensor; `inputs` the traced
    inputs as {"shape", "dtype"} dicts (None for a None input); `before` the pipeline
    text that rewrote the graph before the first prune pass (e.g. `fold-bn`), replayed
    first, so the plan's FQNs and shapes are those the pruning saw; `grouped` how grouped
    convs were pruned (prune-channels' option), so a replay finds the same groups."""

    params: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    inputs: list[dict | None] = field(default_factory=list)
    version: int = VERSION
    before: str = ""
    grouped: str = "groups"

    # -- queries --------------------------------------------------------------------------------
    def kept(self, fqn: str, dim: int) -> list[int] | None:
        """Kept original indices of one dim, or None where the dim was not pruned."""
        return self.params.get(fqn, {}).get(dim)

    def pruned_shape(self, fqn: str) -> tuple[int, ...]:
        shape = list(self.shapes[fqn])
        for dim, kept in self.params.get(fqn, {}).items():
            shape[dim] = len(kept)
        return tuple(shape)

    def example_inputs(self, device=None) -> tuple:
        """Zeros of the recorded shapes and dtypes: enough to trace the model again."""
        return tuple(None if spec is None else
                     torch.zeros(spec["shape"], dtype=_dtype(spec["dtype"]), device=device)
                     for spec in self.inputs)

    def compose(self, later: "PruningPlan") -> "PruningPlan":
        """This plan followed by `later`, whose indices are positions in the tensors this
        plan left (a second prune pass over an already pruned graph)."""
        params = {fqn: {d: list(k) for d, k in dims.items()} for fqn, dims in self.params.items()}
        shapes = dict(self.shapes)
        for fqn, dims in later.params.items():
            shapes.setdefault(fqn, later.shapes[fqn])
            own = params.setdefault(fqn, {})
            for dim, positions in dims.items():
                base = own.get(dim, range(shapes[fqn][dim]))
                own[dim] = [base[p] for p in positions]
        return PruningPlan(params, shapes, list(self.inputs or later.inputs), self.version, self.before,
                           later.grouped)

    def __str__(self) -> str:
        removed = sum(self.shapes[f][d] - len(k) for f, dims in self.params.items() for d, k in dims.items())
        inputs = ", ".join("None" if s is None else f"{s['dtype']}[{'x'.join(map(str, s['shape']))}]"
                           for s in self.inputs)
        return (f"PruningPlan v{self.version}: {len(self.params)} tensors pruned, {removed} indices "
                f"removed; traced on ({inputs})")

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": self.version, "before": self.before, "grouped": self.grouped,
                "inputs": [None if s is None else dict(s) for s in self.inputs],
                "params": {fqn: {"shape": list(self.shapes[fqn]),
                                 "kept": {str(d): list(k) for d, k in sorted(dims.items())}}
                           for fqn, dims in self.params.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise FxoptError("not a pruning plan (no 'format': 'fxopt.pruning-plan' field)",
                             hint="load a plan.json written by fxopt.save_pruned or PruningPlan.save")
        if data.get("version") != VERSION:
            raise FxoptError(f"pruning plan format version {data.get('version')!r} is not supported "
                             f"(this fxopt reads version {VERSION})", hint="write the plan with this fxopt")
        try:
            params = {fqn: {int(d): [int(i) for i in k] for d, k in entry["kept"].items()}
                      for fqn, entry in data["params"].items()}
            shapes = {fqn: tuple(int(s) for s in entry["shape"]) for fqn, entry in data["params"].items()}
            inputs = [None if s is None else {"shape": [int(x) for x in s["shape"]], "dtype": str(s["dtype"])}
                      for s in data["inputs"]]
            before = str(data.get("before", ""))
            grouped = data.get("grouped", "groups")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FxoptError(f"malformed pruning plan: {type(exc).__name__}: {exc}") from exc
        for spec in inputs:
            if spec is not None:
                _dtype(spec["dtype"])
                _bounded(spec["shape"])
        if grouped not in ("channels", "groups"):
            raise FxoptError(f"malformed pruning plan: grouped is {grouped!r}", hint="use channels or groups")
        return cls(params, shapes, inputs, VERSION, before, grouped)

    def to_json(self) -> str:
        """JSON with one line per tensor: long index lists stay readable and diffable."""
        data = self.to_dict()
        params = data.pop("params")
        head = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in data.items()]
        rows = ",\n".join(f"  {json.dumps(fqn)}: {json.dumps(entry)}" for fqn, entry in params.items())
        return "\n".join(["{", *head, ' "params": {', rows, " }", "}"]) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FxoptError(f"pruning plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path) -> None:
        """Write to a temp file beside `path`, then rename: a reader never sees half a plan."""
        write_atomically(path, self.to_json())

    @classmethod
    def load(cls, path) -> "PruningPlan":
        with open(path, encoding="utf-8") as fh:
            return cls.from_json(fh.read())


_MAX_INPUT_ELEMENTS = 1 << 31   # an example input the plan may ask to allocate


def _bounded(shape: list[int]) -> None:
    """An input shape the plan can build zeros of: sizes >= 0, at most 2^31 elements."""
    numel = 1
    for size in shape:
        numel *= size
    if any(size < 0 for size in shape) or numel > _MAX_INPUT_ELEMENTS:
        raise FxoptError(f"pruning plan asks for an input of shape {shape} ({numel} elements; at most "
                         f"{_MAX_INPUT_ELEMENTS})", where="plan.json: inputs",
                         hint="the plan is damaged or was edited; save the pruned model again")


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise FxoptError(f"pruning plan names an unknown dtype {name!r}")
    return value


def inputs_of(gm: fx.GraphModule) -> list[dict | None]:
    """The traced input shapes of `gm` as plan entries."""
    return [{"shape": list(i.shape), "dtype": str(i.dtype).removeprefix("torch.")}
            if isinstance(i, TensorInfo) else None for i in gm.meta.get(INPUT_SHAPES, ())]


# -- building a plan from the pass's choices ------------------------------------------------------
def plan_from_choices(gm: fx.GraphModule, applied_choices: list, grouped: str = "groups",
                      before: str = "") -> PruningPlan:
    """The plan of `applied_choices` ((group, kept channels) pairs), called AFTER
    apply_choices sliced `gm`: a dim's original size is its current size plus what
    the choices dropped from it. `before`: the pipeline text that ran before the pass."""
    drops = _Drops(list(applied_choices)).params
    params, shapes = {}, {}
    for (fqn, dim), dropped in sorted(drops.items()):
        if not dropped:
            continue
        current = tuple(fetch_attr(gm, fqn).shape)
        shape = list(shapes.get(fqn, current))
        shape[dim] = current[dim] + len(dropped)
        shapes[fqn] = tuple(shape)
        params.setdefault(fqn, {})[dim] = [i for i in range(shape[dim]) if i not in dropped]
    return PruningPlan(params, shapes, inputs_of(gm), before=before, grouped=grouped)


def record_plan(gm: fx.GraphModule, applied_choices: list, grouped: str = "groups",
                before: str = "") -> PruningPlan:
    """Store the plan of this pass's applied choices in gm.meta, composed with the plan
    an earlier prune pass left there. Call right after apply_choices succeeds."""
    new = plan_from_choices(gm, applied_choices, grouped, before)
    old = gm.meta.get(PLAN_KEY)
    gm.meta[PLAN_KEY] = old.compose(new) if isinstance(old, PruningPlan) else new
    return gm.meta[PLAN_KEY]


# -- replaying a plan on a fresh graph ------------------------------------------------------------
def choices_from_plan(groups_result, plan: PruningPlan, gm: fx.GraphModule | None = None) -> list:
    """(group, kept channels) pairs of a freshly traced graph that reproduce `plan`.

    Each prunable group's kept channels are read off its parameter members the plan
    lists (a channel is kept when any of its indices is); every listed member must agree,
    and the derived choices must drop exactly what the plan dropped.
    With `gm`, each plan FQN must exist there with the recorded shape. Raises
    FxoptError naming the FQN when the plan does not fit this model."""
    if gm is not None:
        _check_tensors(gm, plan)
    choices = []
    for group in groups_result.prunable():
        kept = _group_kept(group, plan)
        if kept is not None and len(kept) < group.size:
            if not kept:
                raise FxoptError(f"the plan removes every channel of group {group.id} "
                                 f"({','.join(group.sources)})", hint="the plan does not fit this model")
            choices.append((group, kept))
    _check_covered(groups_result, plan, choices)
    return choices


def _group_kept(group, plan: PruningPlan) -> list[int] | None:
    """The group's kept channels by the plan, or None when no member is in the plan.

    A channel is kept when any index it owns in a tensor's dim is kept, not all: groups
    can share a dim (heads x head_dim), and a head that keeps some of its dims is a
    kept head. Members of one (tensor, dim) are read together (a group may own several
    stripes of one dim); `_check_covered` then checks the whole result exactly."""
    owned: dict[tuple[str, int], list[set[int]]] = {}
    for m in group.members:
        if m.param and m.name in plan.params:
            stripes = owned.setdefault((m.name, m.dim), [set() for _ in range(group.size)])
            for c in range(group.size):
                stripes[c].update(m.indices(c))
    verdicts = []
    for (fqn, dim), stripes in owned.items():
        kept = plan.kept(fqn, dim)
        kept_set = set(range(plan.shapes[fqn][dim])) if kept is None else set(kept)
        verdicts.append((fqn, dim, [c for c, indices in enumerate(stripes) if indices & kept_set]))
    if not verdicts:
        return None
    name, dim, kept = verdicts[0]
    for other_name, other_dim, other in verdicts[1:]:
        if other != kept:
            raise FxoptError(
                f"the plan disagrees with itself on group {group.id} ({','.join(group.sources)}): "
                f"{name} dim {dim} keeps channels {_short(kept)} but {other_name} dim {other_dim} "
                f"keeps {_short(other)}", where=other_name,
                hint="these tensors must be pruned together in this model; the plan came from another model")
    return kept


def _check_tensors(gm: fx.GraphModule, plan: PruningPlan) -> None:
    missing = []
    for fqn, shape in plan.shapes.items():
        try:
            value = fetch_attr(gm, fqn)
        except AttributeError:
            value = None
        if not isinstance(value, torch.Tensor):
            missing.append(fqn)
        elif tuple(value.shape) != tuple(shape):
            raise FxoptError(f"the plan expects {fqn} of shape {tuple(shape)}, this model has "
                             f"{tuple(value.shape)}", where=fqn,
                             hint="apply the plan to a fresh (unpruned) instance of the model it was made from")
    if missing:
        raise FxoptError(f"the plan prunes {first_five(missing)}, which this model does not have", where=missing[0],
                         hint="apply the plan to a fresh instance of the model it was made from")


def _check_covered(groups_result, plan: PruningPlan, choices: list) -> None:
    """Every dim the plan shrinks must be shrunk the same way by the derived choices."""
    drops = _Drops(choices).params
    for fqn, dims in plan.params.items():
        for dim, kept in dims.items():
            dropped = drops.get((fqn, dim), set())
            if [i for i in range(plan.shapes[fqn][dim]) if i not in dropped] == list(kept):
                continue
            groups = groups_result.groups_of(fqn, dim)
            why = "; ".join(f"group {g.id} is not prunable ({g.reason})" for g in groups if not g.prunable)
            raise FxoptError(f"the plan prunes {fqn} dim {dim}, which cannot be pruned that way in this model"
                             + (f": {why}" if why else "" if groups else ": it is in no channel group"),
                             where=fqn, hint="the plan came from another model (or another fxopt version)")


def first_five(items: list[str]) -> str:
    """The first five items, and how many more."""
    return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")


def _short(values: list[int]) -> str:
    return str(values) if len(values) <= 8 else f"[{', '.join(map(str, values[:8]))}, ... ({len(values)})]"

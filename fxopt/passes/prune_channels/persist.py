"""Pruning, seen from outside the pass: explain it, and keep its result.

`explain_pruning` shows what prune-channels would see (the channel groups, and why
a group cannot be pruned). A pruned model is kept as two files that need no pickle
and no fxopt graph format: `plan.json` (which indices survived, see
`passes/prune_channels/plan.py`) and `model.safetensors` (the pruned weights).
`load_pruned` replays the plan on a fresh instance of the user's model class, which
rebuilds the pruned graph, and fills it from the weights file.
"""
from __future__ import annotations

import json
import os

import torch
import torch.fx as fx

from ...analyses import ChannelGroups
from ...analyses.channel_groups import ChannelGroupsResult, channel_groups_for
from ...util.artefacts import check_destination, check_manifest, writing
from ...errors import FxoptError
from ...ir.graph import graph_module_of
from ...ir.trace import trace
from ...pm import AnalysisManager, PassManager
from .apply import apply_choices
from .plan import PLAN_KEY, PruningPlan, choices_from_plan, first_five, inputs_of

__all__ = ["PruningPlan", "apply_plan", "explain_pruning", "load_pruned",
           "pruning_plan", "save_pruned"]

MODEL_FILE, PLAN_FILE = "model.safetensors", "plan.json"
PRUNED_FORMAT = "fxopt.pruned/1"   # the manifest's kind
AFTER_KEY, FROZEN_KEY = "fxopt.after", "fxopt.frozen"   # metadata of the weights file


# -- explain --------------------------------------------------------------------------------------
def explain_pruning(model: torch.nn.Module, example_inputs, **trace_kwargs) -> ChannelGroupsResult:
    """The channel groups of the traced `model` (which dims prune-channels removes
    together, which groups it cannot touch and why). Prints as a table; `.to_dict()`
    for JSON. `trace_kwargs` go to fxopt.trace (leaf_modules, concrete_args)."""
    gm = trace(model, example_inputs, **trace_kwargs)
    return AnalysisManager(gm).get(ChannelGroups)


# -- the plan of a pruned model -------------------------------------------------------------------
def pruning_plan(compiled_or_gm) -> PruningPlan | None:
    """The plan prune-channels recorded on this compiled model / graph, or None when
    nothing was pruned."""
    plan = graph_module_of(compiled_or_gm, "pruning_plan").meta.get(PLAN_KEY)
    return plan if isinstance(plan, PruningPlan) else None


def apply_plan(fresh_model: torch.nn.Module, plan: PruningPlan, example_inputs=None) -> fx.GraphModule:
    """Trace `fresh_model` (an unpruned instance of the model the plan came from; it is
    not modified) and remove the channels the plan removed. With the same weights the
    result computes exactly what the pruned model computed.

    `example_inputs` default to zeros of the shapes and dtypes the plan recorded."""
    if not isinstance(plan, PruningPlan):
        raise FxoptError(f"expected a PruningPlan, got {type(plan).__name__}",
                         hint="use fxopt.pruning_plan(compiled) or PruningPlan.load(path)")
    if example_inputs is None:
        example_inputs = plan.example_inputs(_device_of(fresh_model))
    gm = trace(fresh_model, example_inputs)
    if plan.before:  # the rewrites the pruning saw, e.g. fold-bn: same FQNs and shapes
        PassManager(plan.before).run(gm, example_inputs=tuple(example_inputs))
    groups = AnalysisManager(gm).get(channel_groups_for(plan.grouped))
    choices = choices_from_plan(groups, plan, gm)
    notes: list[str] = []
    applied = apply_choices(gm, choices, notes) if choices else []
    if len(applied) != len(choices):
        failed = sorted({g.id for g, _ in choices} - {g.id for g, _ in applied})
        raise FxoptError(f"the plan could not be replayed: groups {failed} could not be pruned here",
                         where="; ".join(notes)[:500] or None,
                         hint="apply the plan to the model class and fxopt version it was made with")
    gm.recompile()
    gm.meta[PLAN_KEY] = PruningPlan.from_dict(plan.to_dict())  # a copy: later passes compose on it
    if not gm.meta[PLAN_KEY].inputs:
        gm.meta[PLAN_KEY].inputs = inputs_of(gm)
    return gm


def _device_of(model: torch.nn.Module):
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return None


# -- saving and loading ---------------------------------------------------------------------------
def save_pruned(compiled_or_gm, directory) -> None:
    """Write `directory/model.safetensors` (the pruned graph's tensors), `directory/plan.json`
    and their manifest, as one unit (fxopt.util.artefacts: staged, then switched in by one
    rename), into a new or empty folder or over an earlier save_pruned folder. A graph
    that nothing pruned is saved with an empty plan. Passes that ran after the pruning
    (e.g. fake-quant of `prune50+int8`) are named in the weights file's metadata, with
    which quantizers were frozen, so load_pruned rebuilds them with their calibrated scales."""
    from safetensors.torch import save_file

    gm = graph_module_of(compiled_or_gm, "save_pruned")
    check_destination(directory, PRUNED_FORMAT)
    plan = pruning_plan(gm) or PruningPlan(inputs=inputs_of(gm))
    # clone each tensor: safetensors refuses shared or non-contiguous storage; a
    # module's extra state (a quantizer's observing flag) is not a tensor: see metadata
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
               for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)}
    metadata = {"fxopt.format": "pruned-state-dict", AFTER_KEY: _passes_after_pruning(compiled_or_gm),
                FROZEN_KEY: json.dumps(sorted(n for n, m in gm.named_modules() if getattr(m, "observing", True) is False))}
    with writing(directory, PRUNED_FORMAT) as staging:
        save_file(tensors, os.path.join(staging, MODEL_FILE), metadata=metadata)
        with open(os.path.join(staging, PLAN_FILE), "w", encoding="utf-8") as fh:
            fh.write(plan.to_json())


def _passes_after_pruning(compiled_or_gm) -> str:
    """The pipeline text of the passes after the last prune-channels in a compiled model's
    report ("" for a plain graph, whose later passes are not known)."""
    report = getattr(compiled_or_gm, "report", None)
    records = list(getattr(report, "records", []))
    last = max((i for i, r in enumerate(records) if r.name == "prune-channels"), default=None)
    return "" if last is None else ",".join(r.text for r in records[last + 1:])


def load_pruned(fresh_model: torch.nn.Module, directory) -> fx.GraphModule:
    """Rebuild a model saved by save_pruned: replay `directory/plan.json` on
    `fresh_model` (an unpruned instance of the same class, not modified; its weights do
    not matter) and load `directory/model.safetensors` into the result (strict)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    paths = check_manifest(directory, PRUNED_FORMAT)
    missing = [name for name in (PLAN_FILE, MODEL_FILE) if name not in paths]
    if missing:
        raise FxoptError(f"{os.fspath(directory)} has no {' and no '.join(missing)}", where=os.fspath(directory),
                         hint="point at a directory written by fxopt.save_pruned")
    plan = PruningPlan.load(paths[PLAN_FILE])
    gm = apply_plan(fresh_model, plan)
    with safe_open(paths[MODEL_FILE], "pt") as fh:
        metadata = fh.metadata() or {}
    if metadata.get(AFTER_KEY):   # e.g. fake-quant: its quantizers get the saved scales below
        PassManager(metadata[AFTER_KEY]).run(gm, example_inputs=plan.example_inputs(_device_of(fresh_model)))
    state = load_file(paths[MODEL_FILE])
    _check_state(gm, state, paths[MODEL_FILE])
    gm.load_state_dict(state, strict=False)   # every tensor checked above; extra state is not one
    for name in json.loads(metadata.get(FROZEN_KEY, "[]")):
        gm.get_submodule(name).observing = False
    return gm


def _check_state(gm: fx.GraphModule, state: dict, path: str) -> None:
    """Missing / unexpected keys and shape mismatches, said plainly before loading."""
    own = {k: v for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = ([f"missing {first_five(missing)}"] if missing else []) + (
        [f"unexpected {first_five(unexpected)}"] if unexpected else []) + (
        [f"shape mismatch {first_five(wrong)}"] if wrong else [])
    if problems:
        raise FxoptError(f"the weights in {path} do not fit the replayed model: " + "; ".join(problems),
                         where=path,
                         hint="load into a fresh instance of the model class that was pruned; the plan "
                              "replays the passes that ran before the pruning, not passes run after it "
                              "that change parameters")

"""Run the stages split-stages made on torch.distributed.pipelining, one stage per process.

Library (torch only; every rank holds the whole split model, which is small):

    stage = build_stage(split_gm, rank, world, device, example_microbatch)
    schedule = make_schedule(stage, "gpipe" | "1f1b", microbatches, loss_fn=None)
    out = run_inference(schedule, stage, inputs)              # the output on the last rank, else None
    grads = run_training_step(schedule, stage, inputs, target)  # this rank's {parameter FQN: grad}

`split_gm` is `fxopt.compile(model, microbatch_inputs, pipeline="...,split-stages{num-stages=K}")
.graph_module`. A pipeline schedule sends fixed shapes between stages, so the model is compiled
with dynamic_shapes="static" on ONE MICROBATCH (`first_microbatch(inputs, microbatches)`) and the
schedule splits the whole batch into that many.

Training: `default_loss(reference)` picks the loss a step without labels can use (cross-entropy
against the model's own argmax for 2-D logits, else the mean of the squares of the output; mean
per microbatch, and the schedule averages the microbatches' gradients, which equals the
whole-batch gradient). Stage parameters keep the model's parameter names (FQNs) unless a pass
renames them (fold-bn folds BatchNorm into new weights).

Starting the processes (torchrun, the process group) is `fxopt.runtime.launch`; comparing a run
with one process is `fxopt.runtime.compare`; the command line is `fxopt pipeline-run`.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from ..errors import FxoptError

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_modules(split_gm: fx.GraphModule) -> list[fx.GraphModule]:
    """The children stage_0 .. stage_{k-1} of a split GraphModule, in order."""
    names = sorted((n for n, _ in split_gm.named_children() if n.startswith("stage_") and n[6:].isdigit()),
                   key=lambda n: int(n[6:]))
    if not names:
        raise FxoptError("the graph module has no stage_i children",
                         hint="run split-stages{num-stages=K} first")
    return [split_gm.get_submodule(n) for n in names]


def stage_io(split_gm: fx.GraphModule, example_microbatch: tuple) -> list[tuple[tuple, tuple]]:
    """[(inputs, outputs)] per stage, from running the stages in sequence on one microbatch,
    detached, each flagged `requires_grad` where autograd would track it (what the schedule
    reads to know which activations send gradients back)."""
    values, found = tuple(example_microbatch), []
    with torch.enable_grad():
        for stage in stage_modules(split_gm):
            out = stage(*_fresh(values))
            out = out if isinstance(out, tuple) else (out,)
            out = tuple(_leaf(t) for t in out)
            found.append((values, out))
            values = out
    return found


def _leaf(t):
    return t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t


def _fresh(values: tuple) -> tuple:
    """Inputs that require grad as non-leaf copies: a stage may begin with an in-place op on
    its input (split-stages can cut between `add_` and `relu_`), which autograd refuses on a
    leaf, and a received activation is a leaf."""
    return tuple(v.clone() if isinstance(v, torch.Tensor) and v.requires_grad else v for v in values)


def _mutates_an_input(gm: fx.GraphModule) -> bool:
    for p in gm.graph.find_nodes(op="placeholder"):
        for user in p.users:
            schema = getattr(user.target, "_schema", None)
            if schema is None:
                continue
            for arg, value in zip(schema.arguments, user.args):
                if value is p and arg.alias_info is not None and arg.alias_info.is_write:
                    return True
    return False


def build_stage(split_gm: fx.GraphModule, rank: int, world: int, device, example_microbatch) -> PipelineStage:
    """The PipelineStage running stage_{rank} on `device`, with its input / output shapes
    (one stage per process: the split must have `world` stages)."""
    stages = stage_modules(split_gm)
    if len(stages) != world:
        raise FxoptError(f"the model is split into {len(stages)} stages but there are {world} processes: "
                         f"one stage per process")
    device = torch.device(device)
    inputs, outputs = stage_io(split_gm, example_microbatch)[rank]
    module = stages[rank].to(device)
    if _mutates_an_input(module):   # training feeds it leaf activations: copy them first
        module.register_forward_pre_hook(lambda _, args: _fresh(args))
    return PipelineStage(module, rank, world, device,
                         input_args=tuple(_leaf(t.to(device)) for t in inputs),
                         output_args=tuple(_leaf(t.to(device)) for t in outputs))


def make_schedule(stage: PipelineStage, kind: str, microbatches: int, loss_fn=None):
    """ScheduleGPipe ("gpipe") or Schedule1F1B ("1f1b") over `microbatches`; with a loss_fn
    (mean over its microbatch) the gradients are averaged over the microbatches."""
    if kind not in SCHEDULES:
        raise FxoptError(f"unknown schedule {kind!r}", hint=f"use {' | '.join(SCHEDULES)}")
    return SCHEDULES[kind](stage, microbatches, loss_fn=loss_fn)


def run_inference(schedule, stage: PipelineStage, inputs: tuple):
    """Forward only. `inputs` (the whole batch) are read on the first stage; returns the merged
    output on the last stage, None elsewhere."""
    with torch.no_grad():
        out = schedule.eval(*_on(inputs, stage.device)) if stage.is_first else schedule.eval()
    return out if stage.is_last else None


def run_training_step(schedule, stage: PipelineStage, inputs: tuple, target=None) -> dict:
    """One forward + backward. `inputs` are read on the first stage, `target` (the whole
    batch's, split like the inputs) on the last. Returns this stage's parameter gradients by
    name (the stage's get_attr targets: the model's FQNs), on the CPU."""
    stage.submod.zero_grad(set_to_none=True)
    args = _on(inputs, stage.device) if stage.is_first else ()
    kwargs = {"target": target.to(stage.device)} if stage.is_last else {}
    schedule.step(*args, **kwargs)
    return {name: p.grad.detach().cpu() for name, p in stage.submod.named_parameters() if p.grad is not None}


def mean_square_loss(output, target=None):
    """The mean of the squares of the output (of every floating output, summed); `target` is unused."""
    leaves = output if isinstance(output, (tuple, list)) else (output,)
    return sum(t.float().pow(2).mean() for t in leaves if t.is_floating_point())


def cross_entropy_loss(logits, labels):
    """Cross-entropy of `logits` against class `labels` (mean over the microbatch)."""
    return torch.nn.functional.cross_entropy(logits, labels)


def default_loss(reference):
    """(loss_fn, whole-batch target) for a step without labels, from the model's output on the
    batch: cross-entropy vs its argmax for 2-D float logits, else the mean of squares (the
    target, zeros per sample, is unused but split like the inputs)."""
    if isinstance(reference, torch.Tensor) and reference.dim() == 2 and reference.is_floating_point():
        return cross_entropy_loss, reference.argmax(dim=1)
    first = torch.utils._pytree.tree_leaves(reference)[0]
    return mean_square_loss, torch.zeros(first.shape[0])


def divides_batch(inputs: tuple, microbatches: int) -> bool:
    """True if every input has one batch dimension (dim 0, the same size) that `microbatches`
    divides: a schedule splits every input along it into equal microbatches."""
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 0
    return microbatches >= 1 and batch % microbatches == 0 and all(
        x.dim() and x.shape[0] == batch for x in inputs)


def first_microbatch(inputs: tuple, microbatches: int) -> tuple:
    """The first of `microbatches` equal slices of the batch: what the model is compiled on
    (the stages' shapes are one microbatch's). Check `divides_batch` first."""
    size = inputs[0].shape[0] // microbatches
    return tuple(x[:size].clone() for x in inputs)


def stage_parameter_counts(split_gm: fx.GraphModule) -> list[dict]:
    """[{"stage": i, "params": n}] per stage: how the weights spread over the processes."""
    return [{"stage": i, "params": sum(p.numel() for p in s.parameters())}
            for i, s in enumerate(stage_modules(split_gm))]


def _on(values: tuple, device) -> tuple:
    return tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in values)

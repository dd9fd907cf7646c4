"""Run the stages split-stages made on torch.distributed.pipelining, one stage per process.

Library (torch only; every rank holds the whole split model, which is small):

    stage = build_stage(split_gm, rank, world, device, example_microbatch)
    schedule = make_schedule(stage, "gpipe" | "1f1b", microbatches, loss_fn=None)
    out = run_inference(schedule, stage, inputs)              # the output on the last rank, else None
    grads = run_training_step(schedule, stage, inputs, target)  # this rank's {parameter FQN: grad}

`split_gm` is `fxopt.compile(model, microbatch_inputs, pipeline="...,split-stages{num-stages=K}")
.graph_module`. A pipeline schedule sends fixed shapes between stages, so the model is compiled
with dynamic_shapes="static" on ONE MICROBATCH (batch // microbatches) and the schedule splits the
whole batch into that many.

Process entry point (`python -m fxopt.runtime.pipeline`, or under torchrun):

    torchrun --nproc-per-node 2 -m fxopt.runtime.pipeline torchvision:resnet18 \\
        --microbatches 4 --input-shape 8x3x64x64 [--schedule 1f1b] [--train] [--json out.json]

Every rank builds the same model and inputs from `--seed`, compiles `-p` (default fold-bn)
followed by `split-stages{num-stages=WORLD_SIZE}` and runs its own stage; rank 0 also runs the
original eager model on the whole batch in one process and prints
"max |pipeline - single process| = X". `--train` runs one training step instead: the loss is
cross-entropy against the single-process model's argmax when the output is 2-D logits, else the
mean of the squares of the output (mean per microbatch; the schedule averages the microbatches'
gradients, which equals the whole-batch gradient); rank 0 gathers every stage's parameter
gradients and prints "max |grad pipeline - grad single process| = Y". Stage parameters keep the
model's parameter names (FQNs) unless a pass renames them (fold-bn folds BatchNorm into new
weights), so --train should run with `-p ""` (no passes before split-stages). The graph is traced
in eval mode, so the step is too (BatchNorm uses its running statistics, dropout is off).
Without torchrun (no WORLD_SIZE) it runs one stage in one process, or, given
`--nproc-per-node N`, launches itself under torchrun with N processes on this machine.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


# ---- library ------------------------------------------------------------------------------
def stage_modules(split_gm: fx.GraphModule) -> list[fx.GraphModule]:
    """The children stage_0 .. stage_{k-1} of a split GraphModule, in order."""
    names = sorted((n for n, _ in split_gm.named_children() if n.startswith("stage_") and n[6:].isdigit()),
                   key=lambda n: int(n[6:]))
    if not names:
        raise ValueError("the graph module has no stage_i children: run split-stages{num-stages=K} first")
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
        raise ValueError(f"the model is split into {len(stages)} stages but there are {world} processes: "
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
        raise ValueError(f"unknown schedule {kind!r}: use {' | '.join(SCHEDULES)}")
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
    return torch.nn.functional.cross_entropy(logits, labels)


def _on(values: tuple, device) -> tuple:
    return tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in values)


# ---- launching ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, module_args: list[str]) -> list[str]:
    """`python -m torch.distributed.run` on this machine (loopback, a free port) running this module."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "-m", "fxopt.runtime.pipeline", *module_args]


# ---- the process entry point --------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fxopt.runtime.pipeline",
                                description="Run a model's split stages as a pipeline, one stage per process, "
                                            "and compare with one process.")
    p.add_argument("model", help="torchvision:NAME, path/file.py:ATTR or pkg.module:ATTR")
    p.add_argument("-p", "--pipeline", default="fold-bn",
                   help="passes before split-stages (default: %(default)s; '' for none, as --train wants)")
    p.add_argument("--num-stages", type=int, help="default: the number of processes (WORLD_SIZE)")
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--input-shape", action="append", required=True,
                   help="the WHOLE batch, e.g. 8x3x64x64; repeat for several inputs")
    p.add_argument("--input-dtype", action="append", choices=("bfloat16", "float16", "float32", "int32", "int64"),
                   help="dtype per input (default float32; integer inputs are ids in [0, 100))")
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default="gpipe")
    p.add_argument("--train", action="store_true", help="one training step; compare the gradients")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs (the same on every rank)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", metavar="FILE", help="rank 0 writes the results here")
    p.add_argument("--nproc-per-node", type=int,
                   help="not under torchrun: launch this many processes with torchrun")
    return p


def main(argv=None) -> int:
    import fxopt   # the public API, only in the process entry point

    args = _parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "WORLD_SIZE" not in os.environ and args.nproc_per_node and args.nproc_per_node > 1:
        argv = list(sys.argv[1:] if argv is None else argv)
        return subprocess.run(torchrun_command(args.nproc_per_node, _without_nproc(argv))).returncode
    try:
        return _run(args, world, int(os.environ.get("RANK", "0")))
    except (fxopt.FxoptError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(args, world: int, rank: int) -> int:
    import fxopt
    from fxopt.api.cli import load_model, make_inputs

    stages = args.num_stages or world
    if stages != world:
        raise fxopt.FxoptError(f"--num-stages {stages} with {world} processes: one stage per process",
                               hint=f"run {stages} processes (torchrun --nproc-per-node {stages}) "
                                    f"or leave --num-stages out")
    torch.manual_seed(args.seed)
    model = load_model(args.model)
    inputs = _seeded(make_inputs(args.input_shape, args.input_dtype), args.seed)
    microbatch = _microbatch(inputs, args.microbatches)
    text = ",".join(t for t in (args.pipeline.strip(), f"split-stages{{num-stages={stages}}}") if t)
    compiled = fxopt.compile(model, microbatch, pipeline=text, instruments=(), dynamic_shapes="static")
    device = _init(args.device, world, rank)
    stage = build_stage(compiled.graph_module, rank, world, device, microbatch)
    with torch.no_grad():
        reference = model(*inputs)
    start = time.perf_counter()
    if args.train:
        loss_fn, target = _loss(reference)
        schedule = make_schedule(stage, args.schedule, args.microbatches, loss_fn)
        result = run_training_step(schedule, stage, inputs, target)
    else:
        result = run_inference(schedule=make_schedule(stage, args.schedule, args.microbatches),
                               stage=stage, inputs=inputs)
        result = _cpu(result)
    seconds = time.perf_counter() - start
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(result, gathered, dst=0)
    if rank != 0:
        return 0
    summary = {"model": args.model, "pipeline": text, "processes": world, "microbatches": args.microbatches,
               "schedule": args.schedule, "inputs": args.input_shape, "train": args.train,
               "seconds": seconds, "stages": _stage_rows(compiled.graph_module)}
    if args.train:
        summary["max_abs_grad_diff"] = _grad_difference(model, inputs, gathered, loss_fn, target)
        print(f"max |grad pipeline - grad single process| = {summary['max_abs_grad_diff']:.3g}")
    else:
        summary["max_abs_diff"] = _max_difference(reference, gathered[-1])
        print(f"max |pipeline - single process| = {summary['max_abs_diff']:.3g}")
    print(f"{world} process(es), {args.microbatches} microbatches, {args.schedule}: {seconds:.3f} s")
    if args.json:
        import json

        from fxopt.util.files import write_atomically
        write_atomically(args.json, json.dumps(summary, indent=2))
    return 0


def _init(device: str, world: int, rank: int) -> torch.device:
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        backend, dev = "nccl", torch.device("cuda", local)
    else:
        backend, dev = "gloo", torch.device("cpu")
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, device_id=dev if backend == "nccl" else None)
    else:   # one process, no torchrun
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dev


def _seeded(inputs: tuple, seed: int) -> tuple:
    """Inputs of the shapes and dtypes make_inputs parsed, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(x.shape, generator=g).to(x.dtype) if x.is_floating_point()
                 else torch.randint(0, 100, x.shape, generator=g, dtype=x.dtype) for x in inputs)


def _microbatch(inputs: tuple, microbatches: int) -> tuple:
    import fxopt

    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 0
    if microbatches < 1 or batch % microbatches or any(x.dim() == 0 or x.shape[0] != batch for x in inputs):
        raise fxopt.FxoptError(f"--microbatches {microbatches} does not divide the batch: every input's first "
                               f"dimension must be a multiple of it (inputs {[tuple(x.shape) for x in inputs]})",
                               hint="pick a batch that is a multiple of --microbatches")
    size = batch // microbatches
    return tuple(x[:size].clone() for x in inputs)


def _loss(reference):
    """(loss_fn, whole-batch target): cross-entropy vs the single-process argmax for 2-D float
    logits, else the mean of squares (the target, zeros per sample, is unused)."""
    if isinstance(reference, torch.Tensor) and reference.dim() == 2 and reference.is_floating_point():
        return cross_entropy_loss, reference.argmax(dim=1)
    first = torch.utils._pytree.tree_leaves(reference)[0]
    return mean_square_loss, torch.zeros(first.shape[0])


def _grad_difference(model, inputs, gathered: list[dict], loss_fn, target) -> float:
    import fxopt

    pipeline: dict[str, torch.Tensor] = {}
    for grads in gathered:            # a weight two stages read is held (and trained) by both: sum
        for name, g in grads.items():
            pipeline[name] = pipeline[name] + g if name in pipeline else g
    model.zero_grad(set_to_none=True)
    loss_fn(model(*inputs), target).backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    unknown = sorted(set(pipeline) - set(single))
    missing = sorted(set(single) - set(pipeline))
    if unknown or missing:
        raise fxopt.FxoptError(f"the stages' parameters do not match the model's: unknown {unknown[:5]}, "
                               f"missing {missing[:5]}",
                               hint="a pass renamed or folded weights: run --train with -p \"\"")
    return max((float((pipeline[n].double() - g.double()).abs().max()) for n, g in single.items()), default=0.0)


def _max_difference(expected, actual) -> float:
    leaves_e = torch.utils._pytree.tree_leaves(expected)
    leaves_a = torch.utils._pytree.tree_leaves(actual)
    if len(leaves_e) != len(leaves_a):
        raise ValueError(f"the pipeline gave {len(leaves_a)} outputs, the model {len(leaves_e)}")
    return max((float((e.double() - a.double()).abs().max()) for e, a in zip(leaves_e, leaves_a)
                if isinstance(e, torch.Tensor) and e.numel()), default=0.0)


def _cpu(value):
    return torch.utils._pytree.tree_map(lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, value)


def _stage_rows(split_gm) -> list[dict]:
    return [{"stage": i, "params": sum(p.numel() for p in s.parameters())}
            for i, s in enumerate(stage_modules(split_gm))]


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())

"""What `fxopt pipeline-run` does (its flags are in cli.py): run a model's split stages on
torch.distributed.pipelining, one stage per process, and compare with the model in one process.

One command line, two roles. Started by a user (no WORLD_SIZE in the environment) it checks the
arguments, then starts torchrun on this machine with one process per stage, each running this
same command; with one process it runs the stage itself. Started by torchrun (WORLD_SIZE set,
also when a user runs `torchrun ... -m fxopt.api.cli pipeline-run ...` across machines) it is a
worker: every rank builds the same model and inputs from `--seed`, compiles `-p` (default
fold-bn) followed by `split-stages{num-stages=WORLD_SIZE}` on one microbatch and runs its own
stage; rank 0 also runs the eager model on the whole batch and prints
"max |pipeline - single process| = X". `--train` runs one training step instead (eval mode, as
traced; the loss is `fxopt.runtime.pipeline.default_loss`) and rank 0 prints
"max |grad pipeline - grad single process| = Y" over every parameter, matched by name, so
--train wants `-p ""` (fold-bn makes new weights).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

import fxopt
from fxopt.util.artefacts import check_writable
from fxopt.util.files import write_atomically
from fxopt.runtime.compare import max_difference, max_gradient_difference, model_gradients
from fxopt.runtime.launch import join_process_group, torchrun_command
from fxopt.runtime.pipeline import (build_stage, default_loss, divides_batch, first_microbatch, make_schedule,
                                    run_inference, run_training_step, stage_parameter_counts)


def pipeline_run(args, load_model, make_inputs) -> int:
    """`fxopt pipeline-run`: start the processes, or, under torchrun or for one process, be one.
    `load_model` / `make_inputs` are the CLI's (MODEL spec -> module, shape strings -> tensors)."""
    under_torchrun = "WORLD_SIZE" in os.environ
    processes = int(os.environ["WORLD_SIZE"]) if under_torchrun else (
        args.nproc_per_node or args.num_stages or 2)
    inputs = make_inputs(args.input_shape, args.input_dtype)
    _check_args(args, processes, inputs)
    if args.json and not under_torchrun:
        check_writable(args.json, "the --json results")
    if not under_torchrun and processes > 1:
        sys.stdout.flush()
        command = torchrun_command(processes, ["-m", "fxopt.api.cli", "pipeline-run", *_worker_argv(args)])
        return subprocess.run(command).returncode
    try:   # the runtime's refusals are FxoptErrors, which the CLI prints as `error: ...`
        return _run_stage(args, load_model, inputs, processes, int(os.environ.get("RANK", "0")))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_args(args, processes: int, inputs: tuple) -> None:
    """What the command line asks for, checked before any model is loaded or process started."""
    for option, value in (("--num-stages", args.num_stages), ("--nproc-per-node", args.nproc_per_node)):
        if value is not None and value < 1:
            raise fxopt.FxoptError(f"{option} {value}: it must be at least 1", hint=f"e.g. {option} 2")
    stages = args.num_stages or processes
    if stages != processes:
        raise fxopt.FxoptError(f"--num-stages {stages} with {processes} processes: one stage per process",
                               hint=f"run {stages} processes (torchrun --nproc-per-node {stages}) "
                                    f"or leave --num-stages out")
    if not divides_batch(inputs, args.microbatches):
        raise fxopt.FxoptError(f"--microbatches {args.microbatches} does not divide the batch: every input's "
                               f"first dimension must be a multiple of it (--input-shape {args.input_shape})",
                               hint="pick a batch that is a multiple of --microbatches")


def _worker_argv(args) -> list[str]:
    """The arguments each torchrun process gets: this command's, less --nproc-per-node."""
    argv = [args.model, "-p", args.pipeline, "--microbatches", str(args.microbatches),
            "--schedule", args.schedule, "--seed", str(args.seed), "--device", args.device]
    argv += ["--num-stages", str(args.num_stages)] if args.num_stages else []
    for shape in args.input_shape:
        argv += ["--input-shape", shape]
    for dtype in args.input_dtype or []:
        argv += ["--input-dtype", dtype]
    argv += ["--train"] if args.train else []
    argv += ["--json", args.json] if args.json else []
    return argv


def _run_stage(args, load_model, shaped: tuple, world: int, rank: int) -> int:
    """This process's part: compile, run its stage, and on rank 0 compare and report. `shaped`
    gives the inputs' shapes and dtypes; their values are drawn from --seed."""
    torch.manual_seed(args.seed)
    model = load_model(args.model)
    inputs = _seeded(shaped, args.seed)
    microbatch = first_microbatch(inputs, args.microbatches)
    text = ",".join(t for t in (args.pipeline.strip(), f"split-stages{{num-stages={world}}}") if t)
    compiled = fxopt.compile(model, microbatch, pipeline=text, instruments=(), dynamic_shapes="static")
    device = join_process_group(args.device)
    stage = build_stage(compiled.graph_module, rank, world, device, microbatch)
    with torch.no_grad():
        reference = model(*inputs)
    start = time.perf_counter()
    if args.train:
        loss_fn, target = default_loss(reference)
        schedule = make_schedule(stage, args.schedule, args.microbatches, loss_fn)
        result = run_training_step(schedule, stage, inputs, target)
    else:
        result = run_inference(schedule=make_schedule(stage, args.schedule, args.microbatches),
                               stage=stage, inputs=inputs)
        result = _on_cpu(result)
    seconds = time.perf_counter() - start
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(result, gathered, dst=0)
    if rank != 0:
        return 0
    summary = {"model": args.model, "pipeline": text, "processes": world, "microbatches": args.microbatches,
               "schedule": args.schedule, "inputs": args.input_shape, "train": args.train,
               "seconds": seconds, "stages": stage_parameter_counts(compiled.graph_module)}
    if args.train:
        single = model_gradients(model, inputs, loss_fn, target)
        summary["max_abs_grad_diff"] = max_gradient_difference(gathered, single)
        print(f"max |grad pipeline - grad single process| = {summary['max_abs_grad_diff']:.3g}")
    else:
        summary["max_abs_diff"] = max_difference(reference, gathered[-1])
        print(f"max |pipeline - single process| = {summary['max_abs_diff']:.3g}")
    print(f"{world} process(es), {args.microbatches} microbatches, {args.schedule}: {seconds:.3f} s")
    if args.json:
        write_atomically(args.json, json.dumps(summary, indent=2))
    return 0


def _seeded(inputs: tuple, seed: int) -> tuple:
    """Inputs of the shapes and dtypes make_inputs parsed, drawn from `seed` (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(x.shape, generator=g).to(x.dtype) if x.is_floating_point()
                 else torch.randint(0, 100, x.shape, generator=g, dtype=x.dtype) for x in inputs)


def _on_cpu(value):
    """`value` with every tensor detached and on the CPU, to gather across processes."""
    return torch.utils._pytree.tree_map(lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, value)

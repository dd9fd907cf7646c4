"""finetune: a short training loop that wins back the accuracy a rewrite cost.

Pruning removes channels, so the pruned network starts from weights chosen for
the full one; a few hundred steps of training, best guided by the unpruned
model's soft predictions (knowledge distillation), usually recover most of the
loss. This is deliberately a plain loop (Adam, cosine-decayed learning rate, no
hooks): recovery needs little more, and anything fancier belongs in the user's
own training code, which can train `cm.graph_module` like any nn.Module.

    cm = fxopt.compile(model, (x,), pipeline="prune-channels{ratio=0.5}")
    fxopt.finetune(cm, batches, teacher=model, steps=300, lr=1e-3)
    cm.finetune_history.loss    # the loss of every step

Launched by torchrun with several processes it trains data-parallel (DistributedDataParallel,
gloo on CPU, NCCL on GPU), each rank on its share of the batches, with gradient accumulation
and a checkpoint every N steps that a restarted run resumes from (distributed.py, checkpoint.py).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..util.artefacts import check_writable
from ..errors import TrainingError
from ..ir.inputs import check_inputs, inputs_and_target
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import Stream, join_world
from .losses import Step, TeacherOutputs, kd_loss

__all__ = ["FinetuneHistory", "finetune", "kd_loss"]


@dataclass
class FinetuneHistory:
    """What each step did, stored on the trained model as `finetune_history`.

    `loss` is the optimised loss of every step; `task` and `distill` its two
    parts (NaN where a part was not computed: no targets, or no teacher); `lr`
    the learning rate used. `epochs` counts the passes made over the data.
    Under data parallelism or accumulation a step's values are the means over the
    step's batches, on every rank. `resumed` is the step a checkpoint resumed from
    (0 when the run began afresh); the steps before it are the checkpoint's.
    """

    loss: list[float] = field(default_factory=list)
    task: list[float] = field(default_factory=list)
    distill: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    epochs: int = 0
    resumed: int = 0


def finetune(model, teacher=None, data=None, steps: int = 100, lr: float = 1e-3, *, alpha: float = 0.5,
             temperature: float = 4.0, loss=None, accumulate: int = 1, checkpoint=None,
             checkpoint_every: int = 100, distill_loss=None, progress: bool = False):
    """Train `model`'s parameters in place on `data` and return `model`.

    model: a CompiledModel (its `graph_module` is trained, and lowered again with
        its backend afterwards, so every later call sees the trained weights) or
        any nn.Module. Only Parameters with requires_grad are trained, so frozen
        weights and buffers stay as they are. The module is in train mode while
        training and gets its own modes back afterwards.
    data: an iterable of batches, re-iterated as often as `steps` needs (so a
        list or DataLoader, not a one-shot generator, when steps exceed one
        epoch). A batch is `x`, `(x, target)` or `(x, None)`, where `x` is a
        tensor or a tuple of the model's inputs. Without targets the loss is the
        distillation loss alone, which needs a teacher. Batches of a CompiledModel
        may have any size along its dynamic dims (by default the batch).
    teacher: the unpruned model (nn.Module or CompiledModel); run in eval mode
        without gradients, its weights and modes are left exactly as they were.
    steps, lr: optimiser steps, and Adam's initial learning rate, which decays
        along a half cosine to 0 so the last steps settle rather than jump.
    alpha: the weight of the distillation loss; the task loss gets 1 - alpha.
    temperature: T of the softened softmaxes; the KL divergence between teacher
        and student is scaled by T^2 so its gradients keep their size as T grows.
        Logits are taken along the last dimension.
    loss: the task loss, `loss(output, target) -> scalar`; default cross-entropy.
    distill_loss: the distillation loss, `distill_loss(output, teacher_output) -> scalar`,
        in place of the T^2-scaled KL of softened logits (e.g. MSE for embeddings, or a
        sum over several outputs); `temperature` is then unused.
    progress: show a progress bar of the steps with the latest loss (rank 0 only).
    accumulate: the batches each process runs per step, their gradients averaged
        (gradient accumulation): a step takes `world size × accumulate` batches.
    checkpoint: a file path. Every `checkpoint_every` steps and after the last one,
        rank 0 writes the weights, the optimiser and schedule, the step, where the
        data stood, every rank's RNG states and the history there, atomically
        (temp file, then rename). A run that finds the file resumes from it (all
        ranks load it) and goes on to `steps`: killed and restarted with the same
        call, it loses nothing and repeats no step. A checkpoint made with other
        steps, lr, alpha, temperature or world size × accumulate is refused.

    Data parallelism: launched by torchrun with several processes (WORLD_SIZE > 1),
    or with torch.distributed initialised, the model is wrapped in
    DistributedDataParallel (the group is initialised if needed, gloo for a model on
    the CPU, NCCL for one on cuda:LOCAL_RANK, and destroyed when finetune returns
    or fails; a group the caller made stays). Every rank calls finetune with
    the same model, teacher and data; the data are read as one sequence of
    batches, global batch i going to rank i % world, so one step takes the next
    world × accumulate batches, `accumulate` on each rank, and DDP averages their
    gradients. The equivalence rule: runs with the same world × accumulate see the
    same batches in every step and make the same updates, up to float rounding (2
    processes with accumulate=1 = 1 process with accumulate=2), provided the loss
    is a mean over a batch's rows and the model draws no random numbers (dropout).
    Every rank ends with the same weights and the same history.

    The per-step losses are stored on `model.finetune_history` (a FinetuneHistory).
    """
    if data is None:
        raise TrainingError("finetune: no data given",
                              hint="pass batches: fxopt.finetune(pruned, teacher, data=[(x, y), ...])")
    _check_options(model, teacher, steps, lr, alpha, temperature)
    _check_run_options(accumulate, checkpoint, checkpoint_every)
    net = _trained_module(model)
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("finetune: the model has no parameter that requires grad",
                              hint="set requires_grad=True on the weights to train")
    device = params[0].device
    world = join_world(device)
    try:
        soft = TeacherOutputs(teacher, len(data) if isinstance(data, (list, tuple)) else 0)
        step = Step(world.wrap(net, device), soft, loss or F.cross_entropy, alpha,
                     distill_loss or functools.partial(kd_loss, temperature=temperature))
        optimizer = torch.optim.Adam(params, lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: 0.5 * (1.0 + math.cos(math.pi * i / steps)))
        settings = {"steps": steps, "lr": lr, "alpha": alpha, "temperature": temperature,
                    "batches_per_step": world.size * accumulate}
        run = _Run(net, optimizer, schedule, Stream(data, world), settings)
        if checkpoint is not None and os.path.exists(checkpoint):
            run.resume(checkpoint)
        with _modes(net, True), _modes(teacher, False), _bar(progress and world.rank == 0, steps) as bar:
            bar(run.step, None)
            while run.step < steps:
                run.advance(step, accumulate, device)
                if checkpoint is not None and (run.step % checkpoint_every == 0 or run.step == steps):
                    run.save(checkpoint)
                bar(run.step, run.parts[-1])
        optimizer.zero_grad(set_to_none=True)
        world.share_buffers(net)
    finally:
        world.leave()
    model.finetune_history = run.history()
    if net is not model:
        model.relower()
    return model


def _trained_module(model) -> torch.nn.Module:
    """What trains: a CompiledModel's `graph_module` (it has `relower` to pick the trained
    weights up), else the module itself. Read by its attributes, since the training layer
    sits below the backends (a pass trains through it too)."""
    graph = getattr(model, "graph_module", None)
    if isinstance(graph, torch.fx.GraphModule) and callable(getattr(model, "relower", None)):
        return graph
    return model


@contextlib.contextmanager
def _bar(shown: bool, steps: int):
    """`update(step, parts)`: a rich progress bar of the steps with the latest loss, or nothing."""
    if not shown:
        yield lambda step, parts: None
        return
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError as exc:
        raise TrainingError("finetune: progress=True draws its bar with rich, which is not installed",
                            hint="pip install rich (or fxopt[bench]), or leave progress off") from exc

    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[loss]}"))
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("training", total=steps, loss="")

        def update(step: int, parts) -> None:
            loss = "" if parts is None else f"loss {float(parts[0]):.4g}"
            bar.update(task, completed=step, loss=loss)

        yield update


_FORMAT = "fxopt.finetune/1"


class _Run:
    """The state of a run, which a checkpoint holds: weights, optimiser, schedule, step, data
    position, RNG and history (the checkpoint's steps as lists, the steps run here as tensors)."""

    def __init__(self, net, optimizer, schedule, stream: Stream, settings: dict):
        self.net, self.optimizer, self.schedule, self.stream = net, optimizer, schedule, stream
        self.settings = settings
        self.step = self.resumed = 0
        self.earlier = {"loss": [], "task": [], "distill": [], "lr": []}
        self.parts: list[torch.Tensor] = []
        self.lrs: list[float] = []

    def advance(self, step: Step, accumulate: int, device) -> None:
        """One optimiser step on this rank's share of the next world × accumulate batches."""
        world = self.stream.world
        self.optimizer.zero_grad(set_to_none=True)
        batches = self.stream.take(world.size * accumulate)
        summed = 0
        for k, batch in enumerate(batches):
            inputs, target = inputs_and_target(batch, "a finetune batch")
            inputs = tuple(_to(x, device) for x in inputs)
            if isinstance(self.net, torch.fx.GraphModule):   # any size along its dynamic dims
                check_inputs(self.net, inputs, {}, what="finetune: a batch was given")
            sync = k == len(batches) - 1 or not world.parallel   # DDP averages on the last backward
            with contextlib.nullcontext() if sync else step.net.no_sync():
                total, task, distill = step(inputs, _to(target, device))
                (total / accumulate if accumulate > 1 else total).backward()
            summed = summed + torch.stack([total.detach().float(), task.float(), distill.float()])
        self.optimizer.step()
        self.lrs.append(self.schedule.get_last_lr()[0])
        self.schedule.step()
        self.parts.append(world.mean(summed / accumulate if accumulate > 1 else summed))
        self.step += 1

    def lists(self) -> dict:
        loss, task, distill = torch.stack(self.parts).T.cpu().tolist() if self.parts else ([], [], [])
        new = {"loss": loss, "task": task, "distill": distill, "lr": self.lrs}
        return {k: list(self.earlier[k]) + new[k] for k in self.earlier}

    def history(self) -> FinetuneHistory:
        return FinetuneHistory(**self.lists(), epochs=self.stream.epochs, resumed=self.resumed)

    def save(self, path) -> None:
        """Rank 0 writes the checkpoint (every rank's RNG gathered into it); the others wait."""
        world = self.stream.world
        rng = world.gather({"now": rng_state(), "epoch": self.stream.epoch_rng})
        if world.rank == 0:
            save_checkpoint(path, {"format": _FORMAT, "settings": self.settings, "step": self.step,
                                   "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                                   "schedule": self.schedule.state_dict(), "data": self.stream.position(),
                                   "history": self.lists(), "rng": rng})
        world.barrier()

    def resume(self, path) -> None:
        state = load_checkpoint(path)
        saved = state.get("settings", {}) if isinstance(state, dict) else {}
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise TrainingError(f"finetune: {os.fspath(path)!r} is not a finetune checkpoint",
                                  hint="give another checkpoint path, or delete the file to start afresh")
        changed = [f"{k} {saved.get(k)!r} there, {v!r} here" for k, v in self.settings.items() if saved.get(k) != v]
        if changed:
            raise TrainingError(f"finetune: the checkpoint {os.fspath(path)!r} is of another run: "
                                  + "; ".join(changed),
                                  hint="call with the settings it was made with (batches_per_step is world "
                                       "size × accumulate), or delete it to start afresh")
        try:
            self.net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TrainingError(f"finetune: the checkpoint {os.fspath(path)!r} does not fit this model: {exc}",
                                  hint="resume with the model it was made for, or delete it to start afresh") from exc
        self.schedule.load_state_dict(state["schedule"])
        self.step = self.resumed = state["step"]
        self.earlier = state["history"]
        rng = state["rng"][min(self.stream.world.rank, len(state["rng"]) - 1)]
        self.stream.resume(state["data"], rng["epoch"])
        set_rng_state(rng["now"])


def _check_options(model, teacher, steps, lr, alpha, temperature) -> None:
    """Reject bad arguments before any work, each with what to pass instead."""
    checks = [
        (isinstance(steps, int) and steps >= 1, f"steps must be an integer >= 1, got {steps!r}"),
        (_finite(lr) and lr > 0, f"lr must be > 0 (and finite), got {lr!r}"),
        (_finite(alpha) and 0 <= alpha <= 1, f"alpha must be in [0, 1], got {alpha!r}"),
        (_finite(temperature) and temperature > 0, f"temperature must be > 0 (and finite), got {temperature!r}"),
        (isinstance(model, torch.nn.Module), f"model must be an nn.Module or CompiledModel, "
                                             f"got {type(model).__name__}"),
        (teacher is None or isinstance(teacher, torch.nn.Module),
         f"teacher must be an nn.Module, CompiledModel or None, got {type(teacher).__name__}"),
        (teacher is None or teacher is not model, "teacher is the model being trained"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainingError(f"finetune: {message}",
                                  hint="see help(fxopt.finetune) for what each argument takes")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_run_options(accumulate, checkpoint, checkpoint_every) -> None:
    checks = [
        (isinstance(accumulate, int) and accumulate >= 1, f"accumulate must be an integer >= 1, got {accumulate!r}"),
        (isinstance(checkpoint_every, int) and checkpoint_every >= 1,
         f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}"),
        (checkpoint is None or isinstance(checkpoint, (str, os.PathLike)),
         f"checkpoint must be a file path or None, got {type(checkpoint).__name__}"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainingError(f"finetune: {message}",
                                  hint="see help(fxopt.finetune) for what each argument takes")
    if checkpoint is not None:   # before training: a run must not end at its first write
        if os.path.isdir(checkpoint):
            raise TrainingError(f"finetune: checkpoint {os.fspath(checkpoint)!r} is a folder",
                                  hint="give a file path, e.g. 'run/finetune.ckpt'")
        check_writable(checkpoint, "a finetune checkpoint")


@contextlib.contextmanager
def _modes(module, training: bool):
    """Set train/eval mode for the block, then give every submodule back its own mode."""
    if module is None:
        yield
        return
    saved = [(m, m.training) for m in module.modules()]
    try:
        module.train(training)
    except NotImplementedError:  # torch.export's module refuses train(); its ops ignore the flag
        for m in module.modules():
            m.training = training
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def _to(value, device):
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value

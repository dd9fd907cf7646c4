"""The loss of one training step: the task loss, the distillation loss against a frozen
teacher (its outputs computed once per batch of a fixed list), or their mix."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import TrainingError
from ..ir.inputs import tensor_leaves

__all__ = ["Step", "TeacherOutputs", "kd_loss"]


class TeacherOutputs:
    """The teacher's outputs for a batch, computed once per batch of a fixed list of batches.

    The teacher is frozen and in eval mode, so a batch seen again in a later epoch gives the
    same outputs; recomputing them would cost a teacher forward pass every step. At most
    `remember` batches are kept (the list's length; 0 for a one-shot iterable), each with the
    input tensors it was computed on, and a hit must be those very tensors."""

    def __init__(self, teacher, remember: int):
        self.teacher, self.remember, self.seen = teacher, remember, {}

    def __bool__(self) -> bool:
        return self.teacher is not None

    def __call__(self, inputs: tuple):
        key = tuple(id(x) for x in inputs)
        hit = self.seen.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], inputs)):
            return hit[1]
        with torch.no_grad():
            soft = self.teacher(*inputs)
        if len(self.seen) < self.remember:
            self.seen[key] = (inputs, soft)
        return soft


class Step:
    """The loss of one batch: task loss, distillation loss, or their alpha mix."""

    def __init__(self, net, teacher: TeacherOutputs, task_loss, alpha: float, distill_loss):
        self.net, self.teacher, self.task_loss = net, teacher, task_loss
        self.alpha, self.distill_loss = alpha, distill_loss

    def __call__(self, inputs: tuple, target):
        """(total, task, distill); a part not computed is NaN, kept out of the total."""
        if target is None and not self.teacher:
            raise TrainingError("finetune: a batch has no target and there is no teacher",
                                  hint="give (inputs, target) batches, or a teacher to distil from")
        out = self.net(*inputs)
        nan = torch.full((), math.nan, device=device_of(out))
        task = distill = nan
        if target is not None and (not self.teacher or self.alpha < 1):
            if self.task_loss is F.cross_entropy:
                _check_classes(out, target)
            task = self.task_loss(out, target)
        if self.teacher and (target is None or self.alpha > 0):
            distill = self.distill_loss(out, self.teacher(inputs))
        if target is None or not self.teacher:
            total = task if not self.teacher else distill
        else:
            total = _mix(task, distill, self.alpha)
        return total, task.detach(), distill.detach()


def _check_classes(out, target) -> None:
    """Targets the default cross-entropy can take: class indices in [0, classes)."""
    if not isinstance(out, torch.Tensor) or not isinstance(target, torch.Tensor):
        return
    classes = out.shape[-1] if out.dim() else 0
    if target.is_floating_point() and target.shape == out.shape:
        return   # class probabilities
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TrainingError(f"finetune: targets are {str(target.dtype).removeprefix('torch.')}; the default "
                              "loss (cross-entropy) takes class indices", where="a batch's target",
                              hint="give integer class indices (target.long()), or pass loss=... for "
                                   "other targets (e.g. loss=torch.nn.functional.mse_loss)")
    low, high = (int(target.min()), int(target.max())) if target.numel() else (0, 0)
    if low < 0 or high >= classes:
        raise TrainingError(f"finetune: a target holds class {high if high >= classes else low}, "
                              f"the model predicts {classes} classes (0 .. {classes - 1})",
                              where="a batch's target", hint="check the labels, or the model's output size")


def _mix(task, distill, alpha: float):
    """alpha * distill + (1 - alpha) * task, leaving out a part whose weight is 0."""
    if alpha == 0:
        return task
    if alpha == 1:
        return distill
    return alpha * distill + (1 - alpha) * task


def kd_loss(student, teacher, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over rows."""
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise TrainingError(
            f"finetune: distillation needs tensor outputs, got {type(student).__name__} from the "
            f"model and {type(teacher).__name__} from the teacher",
            hint="wrap the models so forward returns the logits tensor")
    if student.shape != teacher.shape:
        raise TrainingError(
            f"finetune: teacher output shape {tuple(teacher.shape)} differs from the model's "
            f"{tuple(student.shape)}",
            hint="the teacher must predict the same classes for the same batch; was the "
                 "classifier pruned? (prune-channels never prunes the model's outputs)")
    classes = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, classes).float() / temperature, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, classes).float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2


def device_of(value) -> torch.device:
    leaves = tensor_leaves(value)
    return leaves[0].device if leaves else torch.device("cpu")

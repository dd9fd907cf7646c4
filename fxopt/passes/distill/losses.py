"""The distillation loss of each output (and feature), and the fidelity measured before and after.

Logits are matched as their softened distributions (T²·KL, as fxopt.finetune does), since
the teacher's wrong-class scores carry what it knows; other outputs (embeddings,
probabilities, regressions) by MSE, which keeps both direction and scale, or 1 - cosine,
which keeps the direction only. Intermediate features are matched by MSE. Every MSE is
relative to the teacher's mean square (||s - t||² / ||t||²): outputs that are mostly near
zero, such as a pitch model's 360 bin probabilities, would otherwise give a loss so small
that a student predicting zeros everywhere looks nearly right.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from ...analyses.fidelity import divergence
from ...ir.inputs import tensor_leaves
from ...ir.inputs import inputs_and_target
from ...train.finetune import kd_loss

__all__ = ["OutputLoss", "eval_mode", "first_output_task_loss", "measure_fidelity", "on_device"]

AUTO = {"logits": "kl", "features": "mse"}


class OutputLoss:
    """`loss(student_out, teacher_out)`: the mean of each output leaf's loss (`kinds`: kl | mse |
    cosine, one per leaf), plus `feature_weight` × the mean MSE of the features when the
    graphs return `(outputs, features)` (features.returning_features)."""

    def __init__(self, kinds: list[str], temperature: float, feature_weight: float | None = None):
        self.kinds, self.feature_weight = kinds, feature_weight
        self.by_kind = {"kl": functools.partial(kd_loss, temperature=temperature),
                        "mse": relative_mse,
                        "cosine": lambda s, t: divergence(s, t, "features")}

    def __call__(self, student, teacher) -> torch.Tensor:
        if self.feature_weight is not None:
            (student, s_features), (teacher, t_features) = student, teacher
        s_leaves, t_leaves = tensor_leaves(student), tensor_leaves(teacher)
        loss = torch.stack([self.by_kind[k](s, t) for s, t, k in zip(s_leaves, t_leaves, self.kinds)]).mean()
        if self.feature_weight:
            matched = torch.stack([relative_mse(s, t) for s, t in zip(s_features, t_features)])
            loss = loss + self.feature_weight * matched.mean()
        return loss


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE over the teacher's mean square: scale-free, 1 for a student that outputs zeros."""
    teacher = teacher.float()
    return F.mse_loss(student.float(), teacher) / teacher.pow(2).mean().clamp_min(1e-12)


def first_output_task_loss(out, target) -> torch.Tensor:
    """Cross-entropy of the labels and the first output leaf (of a tuple output, or of the
    `(outputs, features)` a feature-returning view gives)."""
    return F.cross_entropy(tensor_leaves(out)[0], target)


@torch.no_grad()
def measure_fidelity(student, teacher, batches, kinds) -> float:
    """The mean divergence (fxopt.analyses.fidelity) of student from teacher over `batches`,
    both in eval mode without gradients."""
    device = next(iter(student.parameters()), torch.zeros(())).device
    with eval_mode(student), eval_mode(teacher):
        parts = []
        for batch in batches:
            inputs = on_device(inputs_and_target(batch, "a distill batch")[0], device)
            parts.append(float(divergence(student(*inputs), teacher(*inputs), kinds)))
    return sum(parts) / len(parts)


def on_device(inputs: tuple, device) -> tuple:
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Eval mode for the block, then every submodule's own mode back."""
    saved = [(m, m.training) for m in module.modules()]
    for m, _ in saved:
        m.training = False
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode

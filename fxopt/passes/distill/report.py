"""DistillReport: what the distill pass trained, against what, and what it won back.

Read it as `compiled.report.distill`; `str()` is a short summary, `to_dict()` is JSON-ready.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class DistillReport:
    """`loss` is the optimised loss of every step; `distill` its distillation part and `task` its
    task part (NaN where a batch had no labels); `losses` the loss used per output (by the
    output node's name); `fidelity_before` / `fidelity_after` the mean divergence of the
    student's outputs from the teacher's (KL for logits, 1 - cosine otherwise) over
    `measured_on` data batches; `quantizers` what happened to fake quantizers (QAT)."""

    teacher: str = ""
    steps: int = 0
    seconds: float = 0.0
    lr: float = 0.0
    temperature: float = 0.0
    alpha: float | None = None            # None: no batch had labels, the loss is distillation alone
    losses: dict[str, str] = field(default_factory=dict)
    features: list[str] = field(default_factory=list)
    feature_weight: float = 0.0
    loss: list[float] = field(default_factory=list)
    distill: list[float] = field(default_factory=list)
    task: list[float] = field(default_factory=list)
    fidelity_before: float = math.nan
    fidelity_after: float = math.nan
    measured_on: int = 0
    quantizers: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        outputs = ", ".join(f"{name}: {kind}" + (f" (T={self.temperature:g})" if kind == "kl" else "")
                            for name, kind in self.losses.items())
        lines = [f"distill: {self.steps} steps in {self.seconds:.1f} s (lr {self.lr:g}) against {self.teacher}",
                 f"  loss {_ends(self.loss)} (first -> last steps)", f"  outputs: {outputs}"]
        if self.alpha is not None:
            lines.append(f"  labels: task loss mixed in, alpha {self.alpha:g} on distillation; distillation "
                         f"part {_ends(self.distill)}, task part {_ends(self.task)}")
        if self.features:
            lines.append(f"  features (MSE x {self.feature_weight:g}): {', '.join(self.features)}")
        lines.append(f"  fidelity (KL for logits, 1 - cosine otherwise; mean over {self.measured_on} batches): "
                     f"{self.fidelity_before:.4g} -> {self.fidelity_after:.4g}")
        if self.quantizers:
            lines.append(f"  quantizers: {self.quantizers}")
        return "\n".join(lines)


def _ends(curve: list[float]) -> str:
    """`first -> last`, each the mean of up to 10 steps at that end (NaN steps left out)."""
    def mean(part):
        values = [v for v in part if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    if not curve:
        return "-"
    ends = max(1, min(10, len(curve) // 4))
    return f"{mean(curve[:ends]):.4g} -> {mean(curve[-ends:]):.4g}"

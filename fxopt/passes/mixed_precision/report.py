"""PrecisionReport: which ops compute in 16 bits, which stayed fp32 and why.

Read it as `compiled.report.precision`; `str()` is a readable summary, `to_dict()` is JSON-ready.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from ...pm.report import nodes_by_reason, reason_of


@dataclass(frozen=True)
class PrecisionOp:
    """One computing op: where it came from, why it is fp32 ('' for a 16-bit op) and, with
    auto, its measured relative output error in 16 bits."""

    node: str
    op: str
    module: str                  # the model's module path ('' if unknown)
    reason: str = ""
    error: float | None = None


@dataclass
class PrecisionReport:
    """The mixed-precision pass's account of the graph.

    low: every op computing in `dtype`. kept: every floating-point op kept in fp32, with its
    reason (rule table, keep pattern, auto measurement, ...). follows: ops exact in any
    precision (views, data movement, relu, max) that run in their input's precision.
    casts: the cast nodes inserted at precision boundaries; constants: the weights stored
    converted (new attributes), their bytes before / after; notes: option warnings.
    """

    dtype: str = "bf16"
    auto: bool = False
    layer_tolerance: float | None = None
    low: list[PrecisionOp] = field(default_factory=list)
    kept: list[PrecisionOp] = field(default_factory=list)
    follows: int = 0
    casts: int = 0
    constants: int = 0
    constant_bytes: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """{'low': ops in 16 bits, 'fp32': ops kept fp32, 'follow': exact ops in between}."""
        return {"low": len(self.low), "fp32": len(self.kept), "follow": self.follows}

    def low_by_op(self) -> dict[str, int]:
        """ATen op name -> how many of them compute in 16 bits."""
        return dict(Counter(p.op for p in self.low))

    def kept_reasons(self) -> dict[str, list[str]]:
        """reason -> the nodes kept fp32 for it."""
        return nodes_by_reason(self.kept)

    def reason_for(self, node: str) -> str | None:
        """Why `node` stayed fp32 (None if it computes in 16 bits or is not listed)."""
        return reason_of(self.kept, node)

    def kept_ops(self) -> set[str]:
        """The ATen op names with at least one op kept fp32."""
        return {p.op for p in self.kept}

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "auto": self.auto, "layer_tolerance": self.layer_tolerance,
                "counts": self.counts(), "low_by_op": self.low_by_op(),
                "low": [asdict(p) for p in self.low], "kept": [asdict(p) for p in self.kept],
                "casts": self.casts, "constants": self.constants,
                "constant_bytes": list(self.constant_bytes), "notes": list(self.notes)}

    def __str__(self) -> str:
        before, after = self.constant_bytes
        mode = f", auto (layer-tolerance {self.layer_tolerance:g})" if self.auto else ""
        lines = [f"mixed-precision {self.dtype}{mode}: {len(self.low)} ops in {self.dtype}, "
                 f"{len(self.kept)} kept fp32, {self.follows} follow their input; {self.casts} casts, "
                 f"{self.constants} constants converted ({_mb(before)} -> {_mb(after)})"]
        by_op = ", ".join(f"{op} {n}" for op, n in sorted(self.low_by_op().items(), key=lambda x: -x[1]))
        if by_op:
            lines.append(f"  {self.dtype:<6} {by_op}")
        for p in self.kept:
            error = f" (error {p.error:.3g})" if p.error is not None else ""
            where = f" [{p.module}]" if p.module else ""
            lines.append(f"  fp32   {p.node:<24} {p.op}{where}: {p.reason}{error}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"

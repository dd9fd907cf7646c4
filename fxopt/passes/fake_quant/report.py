"""QuantReport: what fake-quant quantized, with which bits, and every op it left in float and why.

Read it as `compiled.report.quant`; `str()` is a readable summary, `to_dict()` is JSON-ready.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ...pm.report import nodes_by_reason, reason_of


@dataclass(frozen=True)
class QuantizedOp:
    """A conv / linear / matmul whose operands are quantized."""

    node: str
    op: str
    module: str                   # the model's module path ('' if unknown)
    weight_bits: int | None       # None: no constant weight operand (e.g. activation @ activation)
    act_bits: int
    granularity: str              # per-channel | per-tensor | none
    quantizers: tuple[str, ...]   # the FakeQuantize modules its operands go through


@dataclass(frozen=True)
class FloatOp:
    """An op node left in float, with the reason."""

    node: str
    op: str
    module: str
    reason: str


@dataclass
class QuantReport:
    """The fake-quant pass's account of the graph.

    quantized: every quantized conv/linear/matmul. joins: add/sub/cat/stack nodes
    whose inputs share one quantizer (node -> quantizer). float_ops: every other
    op node and why it is float. integer_ops: with integer=true, the softmax / GELU /
    LayerNorm / table nodes that run integer kernels on their own grids. bookkeeping: nodes with no tensor data (shape
    reads, asserts), counted, not listed. notes: option warnings and hints.
    """

    quantized: list[QuantizedOp] = field(default_factory=list)
    joins: dict[str, str] = field(default_factory=dict)
    float_ops: list[FloatOp] = field(default_factory=list)
    integer_ops: dict[str, str] = field(default_factory=dict)    # node -> kind (integer=true)
    quantizers: int = 0
    bookkeeping: int = 0
    notes: list[str] = field(default_factory=list)

    def float_reasons(self) -> dict[str, list[str]]:
        """reason -> node names left float for it."""
        return nodes_by_reason(self.float_ops)

    def reason_for(self, node: str) -> str | None:
        """Why `node` stayed float (None if it was quantized or is not listed)."""
        return reason_of(self.float_ops, node)

    def to_dict(self) -> dict:
        return {"quantized": [asdict(q) for q in self.quantized], "joins": dict(self.joins),
                "float_ops": [asdict(f) for f in self.float_ops],
                "integer_ops": dict(self.integer_ops), "quantizers": self.quantizers,
                "bookkeeping": self.bookkeeping, "notes": list(self.notes)}

    def __str__(self) -> str:
        lines = [f"fake-quant: {len(self.quantized)} ops quantized, {len(self.joins)} joins sharing a "
                 f"quantizer, {len(self.float_ops)} ops in float, {self.quantizers} quantizers"]
        for q in self.quantized:
            w = f"w{q.weight_bits}" if q.weight_bits is not None else "w-"
            lines.append(f"  quantized  {q.node:<24} {w}/a{q.act_bits} {q.granularity:<11} {q.module}")
        for node, quantizer in self.joins.items():
            lines.append(f"  join       {node:<24} inputs share {quantizer}")
        for node, kind in self.integer_ops.items():
            lines.append(f"  integer    {node:<24} {kind} on its own calibrated grids")
        for reason, nodes in self.float_reasons().items():
            shown = ", ".join(nodes[:8]) + (f", ... ({len(nodes)} in all)" if len(nodes) > 8 else "")
            lines.append(f"  float      {reason}: {shown}")
        if self.bookkeeping:
            lines.append(f"  ({self.bookkeeping} shape/assert nodes carry no tensor data)")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

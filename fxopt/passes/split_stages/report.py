"""StagesReport: what each pipeline stage computes, holds and sends.

Read it as `compiled.report.stages`; `str()` is a table, `to_dict()` is JSON-ready.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StageRow:
    index: int
    ops: int
    first: str                 # first and last op of the stage
    last: str
    cost: float                # in the balance unit (MACs, parameters or seconds)
    macs: int
    params: int                # parameter count of the weights it holds
    param_bytes: int
    activation_bytes: int      # bytes of the activations its ops produce
    sends: int                 # bytes it sends to the next stage (0 for the last)
    sends_tensors: int


@dataclass
class StagesReport:
    balance: str = ""
    stages: list[StageRow] = field(default_factory=list)
    cuts: list[str] = field(default_factory=list)          # the op after which each cut falls
    notes: list[str] = field(default_factory=list)

    def imbalance(self) -> float:
        """Largest stage cost over the mean stage cost (1.0: perfectly balanced)."""
        costs = [s.cost for s in self.stages]
        mean = sum(costs) / len(costs) if costs else 0.0
        return max(costs) / mean if mean else 1.0

    def to_dict(self) -> dict:
        return {"balance": self.balance, "imbalance": self.imbalance(), "cuts": list(self.cuts),
                "stages": [asdict(s) for s in self.stages], "notes": list(self.notes)}

    def __str__(self) -> str:
        lines = [f"split-stages ({self.balance}): {len(self.stages)} stages, largest / mean cost "
                 f"{self.imbalance():.2f}"]
        header = ("stage", "ops", "first .. last", "cost", "MACs", "params", "sends")
        rows = [header] + [(f"stage_{s.index}", str(s.ops), f"{s.first} .. {s.last}", _h(s.cost), _h(s.macs),
                            _h(s.params), f"{_h(s.sends)}B in {s.sends_tensors}" if s.sends_tensors else "-")
                           for s in self.stages]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _h(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.3g}" if isinstance(n, float) and n != int(n) else str(int(n))

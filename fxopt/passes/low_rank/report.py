"""LowRankReport: per targeted layer, what low-rank did and what it cost.

Read it as `compiled.report.lowrank`; `str()` is a table, `to_dict()` is JSON-ready.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerRow:
    """One targeted layer. `error` is the relative output error ||y' - y|| / ||y|| measured on
    the calibration batches (error_kind "output"), or the relative weight error of the
    approximation when no batches were given ("weight"); None when the layer was kept."""

    node: str
    path: str
    shape: tuple[int, ...]
    form: str = ""             # matrix | tucker2 | spatial ('' when kept)
    rank: str = ""             # "r" or "r_out x r_in"
    full_rank: str = ""
    macs_before: int = 0
    macs_after: int = 0
    error: float | None = None
    error_kind: str = ""
    speedup: float | None = None   # measured dense / factorized time, when min-speedup is set
    kept: str = ""             # why the layer stays dense ('' when factorized)
    targeted: bool = True      # False: left out by a skip pattern (not in the MAC totals)


@dataclass
class LowRankReport:
    method: str = ""
    policy: str = ""
    layers: list[LayerRow] = field(default_factory=list)
    untargeted: list[tuple[str, str]] = field(default_factory=list)   # (node, why it is no target)

    @property
    def factorized(self) -> list[LayerRow]:
        return [r for r in self.layers if not r.kept]

    def macs(self) -> tuple[int, int]:
        """(before, after) MACs over the targeted layers (the ones no skip pattern left out):
        what `budget` is a share of."""
        rows = [r for r in self.layers if r.targeted]
        return (sum(r.macs_before for r in rows), sum(r.macs_after if not r.kept else r.macs_before for r in rows))

    def to_dict(self) -> dict:
        before, after = self.macs()
        return {"method": self.method, "policy": self.policy, "macs_before": before, "macs_after": after,
                "layers": [asdict(r) for r in self.layers], "untargeted": [list(u) for u in self.untargeted]}

    def __str__(self) -> str:
        before, after = self.macs()
        kept = before and after / before
        lines = [f"low-rank ({self.method}, {self.policy}): {len(self.factorized)} of "
                 f"{sum(r.targeted for r in self.layers)} targeted layers factorized; "
                 f"their MACs {_h(before)} -> {_h(after)} ({kept:.1%} kept)"]
        header = ("layer", "form", "rank/full", "MACs before", "MACs after", "error", "")
        rows = [header] + [_row(r) for r in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        for row in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        for node, why in self.untargeted:
            lines.append(f"  not a target: {node}: {why}")
        return "\n".join(line.rstrip() for line in lines)


def _row(r: LayerRow) -> tuple[str, ...]:
    error = "" if r.error is None else f"{r.error:.4f} ({r.error_kind})"
    note = r.kept and f"kept: {r.kept}"
    if r.speedup is not None:
        note = (note + "; " if note else "") + f"measured speedup {r.speedup:.2f}x"
    rank = f"{r.rank}/{r.full_rank}" if r.rank else f"-/{r.full_rank}"
    return (r.path or r.node, r.form or "-", rank, _h(r.macs_before),
            _h(r.macs_after) if not r.kept else "-", error, note)


def _h(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))

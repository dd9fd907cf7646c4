"""What a pipeline did, pass by pass: a printable table and a JSON-ready dict."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class PassRecord:
    """One pass run: its text, time, whether it changed the graph, metrics, notes."""

    name: str
    text: str
    seconds: float = 0.0
    changed: bool = False
    notes: tuple[str, ...] = ()
    metrics: dict = field(default_factory=dict)   # e.g. params_before/after, macs_before/after
    preserves: tuple | None = ()                  # analysis types kept valid; None: all of them


@dataclass
class Report:
    """Per-pass records; later passes may add named sections (e.g. `quant`, `stages`)."""

    pipeline: str = ""
    records: list[PassRecord] = field(default_factory=list)
    sections: dict = field(default_factory=dict)

    def __getattr__(self, name):
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def to_dict(self) -> dict:
        return {"pipeline": self.pipeline, "passes": [_record_dict(r) for r in self.records],
                "sections": {k: _plain(v) for k, v in self.sections.items()}}

    def __str__(self) -> str:
        header = ["pass", "seconds", "changed", "params", "MACs", "notes"]
        rows = [header]
        for r in self.records:
            m = r.metrics
            rows.append([r.text, f"{r.seconds:.3f}", "yes" if r.changed else "no",
                         _before_after(m, "params"), _before_after(m, "macs"), "; ".join(r.notes)])
        rows.append(["total", f"{self.seconds:.3f}", "", "", "", ""])
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = []
        for i, row in enumerate(rows):
            cells = [c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]
            lines.append("  ".join(cells).rstrip())
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths) + "  -----")
        return "\n".join(lines)


def _record_dict(record: PassRecord) -> dict:
    out = asdict(record)
    out["preserves"] = None if record.preserves is None else [t.__name__ for t in record.preserves]
    return out


def nodes_by_reason(records) -> dict[str, list[str]]:
    """reason -> the nodes given for it, in order, of report rows that each have `.node` and
    `.reason` (the ops a pass left as they were, and why)."""
    out: dict[str, list[str]] = {}
    for record in records:
        out.setdefault(record.reason, []).append(record.node)
    return out


def reason_of(records, node: str) -> str | None:
    """The reason the row for `node` gives (None when no row names it)."""
    return next((record.reason for record in records if record.node == node), None)


def short_number(n: float) -> str:
    """12345678 -> '12.35M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _before_after(metrics: dict, key: str) -> str:
    before, after = metrics.get(f"{key}_before"), metrics.get(f"{key}_after")
    if before is None:
        return ""
    if before == after:
        return short_number(before)
    return f"{short_number(before)} -> {short_number(after)}"


def _plain(value):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)

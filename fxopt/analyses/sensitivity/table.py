"""The Sensitivity analysis's result: one row per (kind, unit, setting), read as curves.

Kept apart from the measuring so the passes that allocate a budget from it (pruning
ratios, bit widths, ranks) read plain data: a curve of divergence against setting per
unit, and what each setting saves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...pm.report import short_number

Kind = Literal["prune", "quant", "lowrank"]
KINDS: tuple[Kind, ...] = ("prune", "quant", "lowrank")

# prune: share of a group's channels removed; quant: weight bits; lowrank: share of the rank kept
SETTINGS = {"prune": (0.25, 0.5, 0.75), "quant": (8, 6, 4, 3, 2), "lowrank": (0.5, 0.25, 0.125)}
SETTING_NAMES = {"prune": "share removed", "quant": "weight bits", "lowrank": "rank share kept"}
SAVED_NAMES = {"prune": "MACs saved", "quant": "bits saved", "lowrank": "MACs saved"}


@dataclass
class SensitivityRow:
    """How far the outputs move when only `unit` is changed to `setting`.

    unit: prune: str(group.id) of a prunable ChannelGroups group; quant: the op node's
    name; lowrank: the layer node's name. where: for people (module path, group sources).
    divergence: fidelity.divergence against the unchanged graph, mean over the batches.
    saved: prune / lowrank: MACs saved; quant: weight bits saved (params * (32 - bits)).
    """

    kind: Kind
    unit: str
    where: str
    setting: float
    divergence: float
    saved: float


@dataclass
class SensitivityTable:
    """Every measured row, how many batches were run and which measure was used."""

    rows: list[SensitivityRow] = field(default_factory=list)
    batches: int = 0
    measure: str = ""
    source: str = ""   # which batches: "data" or "calibration"
    rows_per_batch: int = 0

    def curve(self, kind: Kind, unit: str) -> dict[float, float]:
        """setting -> divergence of one unit, in SETTINGS order."""
        return {r.setting: r.divergence for r in self.rows if r.kind == kind and r.unit == unit}

    def saved(self, kind: Kind, unit: str) -> dict[float, float]:
        """setting -> what that setting saves for one unit."""
        return {r.setting: r.saved for r in self.rows if r.kind == kind and r.unit == unit}

    def units(self, kind: Kind) -> list[str]:
        """The units of one kind, in graph order."""
        return list(dict.fromkeys(r.unit for r in self.rows if r.kind == kind))

    def where(self, kind: Kind, unit: str) -> str:
        return next((r.where for r in self.rows if r.kind == kind and r.unit == unit), "")

    def to_dict(self) -> dict:
        return {"batches": self.batches, "measure": self.measure, "source": self.source,
                "rows": [vars(r).copy() for r in self.rows]}

    def __str__(self) -> str:
        """One block per kind: a row per unit, a column per setting (divergence), and the
        saving at the strongest setting."""
        lines = [f"sensitivity: {self.measure}, on {self.batches} batch(es) of {self.rows_per_batch} rows "
                 f"from {self.source or 'data'}"]
        for kind in KINDS:
            units = self.units(kind)
            if not units:
                continue
            settings = SETTINGS[kind]
            lines.append(f"{kind} ({SETTING_NAMES[kind]}; {SAVED_NAMES[kind]} at {settings[-1]:g})")
            lines.append(f"  {'unit':<14} {'where':<28} " + " ".join(f"{s:>9g}" for s in settings)
                         + f" {'saved':>11}")
            for unit in units:
                curve, saved = self.curve(kind, unit), self.saved(kind, unit)
                cells = " ".join(f"{curve[s]:>9.3g}" if s in curve else f"{'-':>9}" for s in settings)
                lines.append(f"  {unit[:14]:<14} {self.where(kind, unit)[:28]:<28} {cells} "
                             f"{short_number(saved.get(settings[-1], 0.0)):>11}")
        return "\n".join(lines)

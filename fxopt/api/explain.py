"""fxopt.explain: which parts of a model can be cut, and what each cut costs in output.

Before choosing a recipe (how much to prune where, which layers to keep at more bits,
which to factorize), a user wants the measured answer per layer: this traces the model,
optionally runs a pipeline first (e.g. fold-bn, so the units are those a later
compression sees), measures the Sensitivity analysis on `data`, and can draw it.
"""
from __future__ import annotations

import io
import os

import torch

from ..analyses.sensitivity import KINDS, SETTINGS, Sensitivity, SensitivityTable
from ..analyses.sensitivity.table import SETTING_NAMES
from ..errors import UnsupportedError
from ..ir.trace import trace
from ..pm import AnalysisManager, PassManager
from ..util.files import write_atomically

__all__ = ["explain", "plot_sensitivity"]


def explain(model: torch.nn.Module, example_inputs, data, pipeline: str | None = None,
            plot: str | os.PathLike | None = None, **trace_kwargs) -> SensitivityTable:
    """The SensitivityTable of `model` measured on `data` (batches: `x`, `(x, y)` or
    `(x, None)`; a few are used), after `pipeline` when given; with `plot` a PNG of
    divergence against setting per unit, one panel per kind, is written there.
    `trace_kwargs` go to fxopt.trace (leaf_modules, concrete_args)."""
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    gm = trace(model, example_inputs, **trace_kwargs)
    data = list(data) if data is not None else None
    am = AnalysisManager(gm, data=data)
    if pipeline:
        PassManager(pipeline).run(gm, am, example_inputs=example_inputs)
    table = am.get(Sensitivity)
    if plot is not None:
        plot_sensitivity(table, plot)
    return table


def plot_sensitivity(table: SensitivityTable, path: str | os.PathLike) -> str:
    """Write a PNG: one panel per kind measured, a line per unit (divergence against the
    setting, log scale where it spans decades). Returns the path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise UnsupportedError("fxopt.explain: drawing the plot needs matplotlib",
                               hint="pip install matplotlib, or leave out plot= / --out") from exc
    kinds = [k for k in KINDS if table.units(k)]
    if not kinds:
        raise UnsupportedError("fxopt.explain: the table has no row to plot",
                               hint="the model has no prunable group and no conv or linear weight")
    fig = Figure(figsize=(5.2 * len(kinds), 4.2), layout="constrained")
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        for unit in table.units(kind):
            curve = table.curve(kind, unit)
            xs = [s for s in SETTINGS[kind] if s in curve]
            label = f"{unit} ({table.where(kind, unit)})"[:40]
            ax.plot(xs, [max(curve[s], 1e-9) for s in xs], marker="o", label=label)
        ax.set_yscale("log")
        ax.set_title(kind)
        ax.set_xlabel(SETTING_NAMES[kind])
        ax.set_ylabel(table.measure)
        ax.grid(alpha=0.3)
        if len(table.units(kind)) <= 12:
            ax.legend(fontsize=7)
    fig.suptitle(f"sensitivity: {table.batches} batch(es) of {table.rows_per_batch} rows from {table.source}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return str(write_atomically(str(path), buf.getvalue()))

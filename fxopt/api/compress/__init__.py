"""fxopt.compress: name a speed, size or MAC target and a tolerated loss, get back the fastest
(or smallest) compiled model that keeps its task.

    cm = fxopt.compress(model, (x,), data=batches, target={"speedup": 4}, max_drop=0.01)
    print(cm.report.compress)              # every candidate: pipeline, speed-up, size, score
    cm.report.compress.plot("front.png")   # score against speed-up, the Pareto front

How the search goes: see `search`. What is measured and how: see `measure`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch

from ...errors import FxoptError, UnsupportedError
from ...ir.inputs import inputs_and_target
from ...ir.trace import as_args, trace
from ...pm import AnalysisManager, PassManager
from ...analyses import ChannelGroups, Shapes, ShapeTable
from ...analyses.sensitivity import SETTINGS, Sensitivity
from ...analyses.sensitivity import measure as measure_sensitivity
from .measure import Score, default_score
from .report import Candidate, CompressReport
from .search import Goal, Search, Setup

__all__ = ["Candidate", "CompressReport", "compress"]

PREPARE = "canonicalize,fold-bn,dce"
CALIBRATION_BATCHES = 4
SENSITIVITY_ROWS = 32     # rows the sensitivity is measured on


def compress(model, example_inputs, data, metric=None, target=None, max_drop: float = 0.01,
             backend: str = "int8", *, example_kwargs=None, eval_data=None, steps: int = 300,
             time_budget: float | None = None, progress: bool = False, **backend_options):
    """The fastest (or smallest) CompiledModel of `model` within `max_drop` of its score.

    data: batches `x`, `(x, target)` or `(x, None)` (labels optional): what distillation trains
        on and sensitivity is measured on. Without `metric` and `eval_data` the last fifth of
        them (at least one batch) is held out to score candidates and never trained on.
    metric: `metric(model) -> float`, higher is better, called with the fp32 model and with each
        candidate (a CompiledModel, called like the model): the user's task score on their own
        held-out data. Default: accuracy on labelled held-out batches for a classifier, top-1
        agreement with fp32 for an unlabelled one, mean cosine to fp32 otherwise.
    eval_data: held-out batches for the default score (then all of `data` is trained on).
    target: one of {"speedup": s} (latency on `backend` at the example inputs' size, fp32
        module / candidate, measured here), {"size": r} (weight bytes kept, a share of fp32's),
        {"macs": r} (a share of the MACs kept). Default {"speedup": 4}.
    max_drop: the largest tolerated fall of the score below fp32's (e.g. 0.01 = one point of
        accuracy).
    backend: where the model will run; "int8" and "fpga-int8" quantize, the others prune only.
    steps: distillation steps per recovered candidate (a third as many again for QAT).
    time_budget: seconds after which no new candidate starts; the best so far is returned.
    progress: print each candidate and show the distillation bars.

    report.compress (a CompressReport) lists every candidate tried; the returned model is the
    accepted one that went furthest towards the target. When none keeps the score within
    max_drop an FxoptError says so, with the table (its `.report`).
    """
    goal = _goal(target, max_drop)
    started = time.monotonic()
    example_inputs, example_kwargs = as_args(example_inputs), dict(example_kwargs or {})
    if example_kwargs:
        raise UnsupportedError("compress: keyword inputs are not supported yet",
                               hint="compile with the inputs by position")
    train, held_out = _split(data, metric, eval_data)
    model = copy.deepcopy(model).eval()   # the fp32 reference; the user's model keeps its modes
    gm = trace(model, example_inputs)
    PassManager(PREPARE).run(gm, AnalysisManager(gm), example_inputs=example_inputs)
    score = Score(getattr(metric, "__name__", "metric"), metric) if metric is not None \
        else default_score(model, gm, held_out)
    calibration = [inputs_and_target(b)[0] for b in train[:CALIBRATION_BATCHES]]
    report = CompressReport(dict(target or {"speedup": 4.0}), max_drop, backend, score.name, score.of(model))
    setup = Setup(model, gm, (example_inputs, example_kwargs), train, calibration, score, goal, backend,
                  backend_options, steps, started + time_budget if time_budget else math.inf, progress)
    am = AnalysisManager(gm, calibration, train)   # one cache for the measurements below
    am.put(Shapes, ShapeTable(gm))
    setup.known = _measure_once(gm, am)
    setup.round_to = _round_to(am)
    search = Search(setup, report)
    chosen = search.run()
    report.seconds = time.monotonic() - started
    if chosen is None:
        err = FxoptError(f"compress: no candidate kept {score.name} within max_drop={max_drop:g} of fp32's "
                         f"{report.baseline_score:.4f}\n{report}",
                         hint="allow a larger max_drop, give more data or steps, or ask for a milder target")
        err.report = report
        raise err
    chosen.report = dataclasses.replace(chosen.report, sections={**chosen.report.sections, "compress": report})
    return chosen


def _goal(target, max_drop) -> Goal:
    target = {"speedup": 4.0} if target is None else target
    if not isinstance(target, dict) or len(target) != 1 or next(iter(target)) not in ("speedup", "size", "macs"):
        raise UnsupportedError(f"compress: target must be one of {{'speedup': s}}, {{'size': r}} or "
                               f"{{'macs': r}}, got {target!r}", hint="e.g. target={'speedup': 4}")
    (kind, value), = target.items()
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0 or \
            (kind == "speedup" and value < 1) or (kind != "speedup" and value > 1):
        raise UnsupportedError(f"compress: target {kind}={value!r} is out of range",
                               hint="speedup is >= 1 (times faster); size and macs are shares in (0, 1]")
    if not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop) or max_drop < 0:
        raise UnsupportedError(f"compress: max_drop must be >= 0, got {max_drop!r}",
                               hint="e.g. max_drop=0.01 for one point of accuracy")
    return Goal(kind, float(value), float(max_drop))


def _split(data, metric, eval_data) -> tuple[list, list]:
    """(training batches, held-out batches for the default score)."""
    if data is None or isinstance(data, (torch.Tensor, dict, str)) or not hasattr(data, "__iter__"):
        raise UnsupportedError(f"compress: data takes a list of batches, got {type(data).__name__}",
                               hint="data=[x1, x2, ...] or [(x1, y1), ...]")
    batches = list(data)
    if metric is not None or eval_data is not None:
        if not batches:
            raise UnsupportedError("compress: data is empty", hint="give the batches to train on")
        return batches, list(eval_data or [])
    if len(batches) < 2:
        raise UnsupportedError("compress: data needs at least 2 batches without a metric or eval_data: "
                               "one fifth is held out to score the candidates",
                               hint="give more batches, eval_data=[...], or metric=...")
    held = max(1, len(batches) // 5)
    return batches[:-held], batches[-held:]


def _round_to(am: AnalysisManager) -> int:
    """8 when the prunable channel groups are wide (a median of 64 channels or more): SIMD
    kernels run fastest on channel counts in multiples of 8, and such groups still prune in fine
    steps; 1 for narrower groups, whose every channel count is a useful step."""
    sizes = sorted(g.size for g in am.get(ChannelGroups).prunable())
    return 8 if sizes and sizes[len(sizes) // 2] >= 64 else 1


def _measure_once(gm, am: AnalysisManager) -> dict:
    """The Sensitivity table of the prepared graph, shared by every candidate's allocation: the
    prune shares (target-macs spends by them) and 8-bit weights (the fallback sends the worst
    back to float), on SENSITIVITY_ROWS rows, which keeps it to a few dozen forward passes."""
    settings = {"prune": SETTINGS["prune"], "quant": (8,)}
    return {Sensitivity: measure_sensitivity(gm, am, settings, SENSITIVITY_ROWS)}

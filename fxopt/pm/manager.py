"""The pass manager: instrument -> run -> invalidate -> instrument, per pass.

A failure is re-raised as an FxoptError naming the pass that failed and the
passes that already ran (after the instruments' failure hooks, e.g. the
Reproducer, have seen it).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch.fx as fx

from ..errors import FxoptError, PassFailedError
from .analysis import AnalysisManager
from .pass_base import Pass, PassResult
from .pipeline import format_pipeline, parse_pipeline
from .report import PassRecord, Report
from ..ir.graph import opaque_leaves


@dataclass
class RunContext:
    """What instruments see of a pipeline run."""

    passes: list[Pass]
    am: AnalysisManager
    example_inputs: tuple | None = None
    report: Report = field(default_factory=Report)
    example_kwargs: dict = field(default_factory=dict)
    original: fx.GraphModule | None = None   # the graph before the first lossy pass (see Pass.needs_original)

    @property
    def passes_run(self) -> list[str]:
        return [r.text for r in self.report.records]

    @property
    def passes_before(self) -> list[Pass]:
        """The passes that ran before the one running now (or all of them, after the run)."""
        return self.passes[:len(self.report.records)]


class PassManager:
    """Runs a list of passes (or pipeline text) over a GraphModule."""

    def __init__(self, passes, instruments=()):
        self.passes = parse_pipeline(passes)
        self.instruments = tuple(instruments)

    def run(self, gm: fx.GraphModule, am: AnalysisManager | None = None,
            example_inputs=None, example_kwargs=None) -> Report:
        """Run every pass in order on `gm` (in place); returns the report."""
        am = am or AnalysisManager(gm)
        ctx = RunContext(self.passes, am, example_inputs, Report(pipeline=format_pipeline(self.passes)),
                         dict(example_kwargs or {}))
        am.run = ctx
        self._notify("before_pipeline", ctx, gm)
        keep_original = any(p.needs_original for p in self.passes)
        for index, p in enumerate(self.passes):
            record = PassRecord(p.name, format_pipeline([p]))
            _check_values(p, gm)
            if keep_original and ctx.original is None and p.tolerance is None:
                ctx.original = _snapshot(gm)
            self._notify("before_pass", ctx, p, gm)
            try:
                start = time.perf_counter()
                result = p.run(gm, am)
                record.seconds = time.perf_counter() - start
                self._check_result(p, result)
                record.changed, record.notes = result.is_changed, result.notes + _leaf_note(p, gm)
                ctx.report.sections.update(result.sections)
                if result.is_changed:
                    gm.recompile()
                am.invalidate(result.preserves, result.preserves_all)
                record.preserves = result.preserves if not result.preserves_all else None
                self._notify("after_pass", ctx, p, gm, record)
            except Exception as exc:
                for inst in self.instruments:
                    inst.after_pass_failed(ctx, p, gm, exc)
                raise _annotate(exc, p, index, ctx) from exc
            ctx.report.records.append(record)
        self._notify("after_pipeline", ctx, gm)
        return ctx.report

    def _notify(self, hook: str, *args) -> None:
        for inst in self.instruments:
            getattr(inst, hook)(*args)

    @staticmethod
    def _check_result(p: Pass, result) -> None:
        if not isinstance(result, PassResult):
            raise PassFailedError(
                f"pass '{p.name}' returned {type(result).__name__}, not a PassResult",
                hint="end run() with `return PassResult.changed(preserves=...)` or `PassResult.unchanged()`")


def _snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph and its weights that later passes and training cannot touch."""
    original = copy.deepcopy(gm)
    original.eval()
    for param in original.parameters():
        param.requires_grad_(False)
    return original


def _check_values(p: Pass, gm: fx.GraphModule) -> None:
    """A pass that reads weight values refuses meta-device weights by name, before it runs."""
    if not p.reads_weights:
        return
    meta = [name for name, t in list(gm.named_parameters()) + list(gm.named_buffers()) if t.is_meta]
    if meta:
        raise FxoptError(f"pass '{p.name}' reads weight values, and the model's weights are on the meta device "
                         f"(shapes only): {', '.join(meta[:3])}{' ...' if len(meta) > 3 else ''}",
                         where=meta[0], hint="load real weights first (model.to_empty(device='cpu') and "
                                             "load_state_dict), or run only passes that read shapes "
                                             "(canonicalize, dce, split-stages)")


def _leaf_note(p: Pass, gm: fx.GraphModule) -> tuple[str, ...]:
    """A pass that rewrites layers says which leaf modules it could not look inside."""
    leaves = [] if p.sees_into_leaves else opaque_leaves(gm)
    if not leaves:
        return ()
    shown = ", ".join(leaves[:5]) + (f" and {len(leaves) - 5} more" if len(leaves) > 5 else "")
    return (f"did not look inside {len(leaves)} leaf modules ({shown}): their layers are left as they are",)


def _annotate(exc: Exception, p: Pass, index: int, ctx: RunContext) -> FxoptError:
    ran = ", ".join(ctx.passes_run) or "none"
    line = f"in pass '{format_pipeline([p])}' (#{index + 1} of {len(ctx.passes)}); passes already run: {ran}"
    if isinstance(exc, FxoptError):
        exc.add_context(line)
        return exc
    err = PassFailedError(f"pass '{p.name}' failed: {type(exc).__name__}: {exc}",
                          hint="rerun with the Reproducer instrument to capture the failing graph")
    err.add_context(line)
    return err

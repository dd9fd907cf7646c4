"""Pass instrumentation (MLIR's PassInstrumentation, kept small).

An instrument overrides any of the five hooks. Built in: Timing, PrintIR,
Verify and Reproducer.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback

import torch
import torch.fx as fx

from ..errors import InputShapeError, VerificationError
from ..ir.inputs import check_inputs, resized_inputs
from ..ir.meta import TENSOR
from ..ir.shape_prop import propagate_shapes
from .pipeline import format_pipeline


class Instrument:
    """Base: every hook does nothing."""

    def before_pipeline(self, ctx, gm: fx.GraphModule) -> None: ...
    def after_pipeline(self, ctx, gm: fx.GraphModule) -> None: ...
    def before_pass(self, ctx, p, gm: fx.GraphModule) -> None: ...
    def after_pass(self, ctx, p, gm: fx.GraphModule, record) -> None: ...
    def after_pass_failed(self, ctx, p, gm: fx.GraphModule, exc: Exception) -> None: ...


class Timing(Instrument):
    """Collects seconds per pass; prints a summary at the end if `print_summary`."""

    def __init__(self, print_summary: bool = False, stream=None):
        self.print_summary = print_summary
        self.stream = stream
        self.seconds: list[tuple[str, float]] = []

    def after_pass(self, ctx, p, gm, record) -> None:
        self.seconds.append((record.text, record.seconds))

    def after_pipeline(self, ctx, gm) -> None:
        if not self.print_summary:
            return
        stream = self.stream or sys.stderr
        total = sum(s for _, s in self.seconds) or 1e-12
        print("===- pass timing -===", file=stream)
        for text, s in sorted(self.seconds, key=lambda x: -x[1]):
            print(f"  {s:9.4f}s  {100 * s / total:5.1f}%  {text}", file=stream)
        print(f"  {total:9.4f}s  100.0%  total", file=stream)


class PrintIR(Instrument):
    """Prints the graph code before/after the named passes (after: only if it changed)."""

    def __init__(self, after=(), before=(), stream=None, only_on_change: bool = True):
        self.after, self.before = set(after), set(before)
        self.stream, self.only_on_change = stream, only_on_change

    def before_pass(self, ctx, p, gm) -> None:
        if p.name in self.before or "all" in self.before:
            self._print(f"IR before {p.name}", gm)

    def after_pass(self, ctx, p, gm, record) -> None:
        wanted = p.name in self.after or "all" in self.after
        if wanted and (record.changed or not self.only_on_change):
            self._print(f"IR after {record.text}", gm)

    def _print(self, title: str, gm) -> None:
        print(f"// ----- {title} -----\n{gm.code.strip()}\n", file=self.stream or sys.stdout)


class Verify(Instrument):
    """After each pass: graph.lint, shape metadata consistency and (optionally) outputs.

    Metadata: the graph must still run on fake tensors; if the pass said it
    preserves the shapes analysis, the recorded shapes must equal fresh ones.
    Outputs (`check_outputs=True`, needs example inputs): compared with the
    outputs before the pass, within the pass's `tolerance` (skipped if None), at
    the example inputs and, where an input has dynamic dims, at one size less along
    them (one more where the dim's range stops at the example's size): a pass that
    bakes the example's batch into the graph fails there.
    """

    def __init__(self, check_outputs: bool = False, example_inputs=None):
        self.check_outputs = check_outputs
        self.example_inputs = example_inputs
        self._reference = None

    def before_pipeline(self, ctx, gm) -> None:
        self._reference = None

    def before_pass(self, ctx, p, gm) -> None:
        if self._inputs(ctx) is not None and self._reference is None:
            self._calls = self._sizes(ctx, gm)
            self._reference = [_run(gm, call) for call in self._calls]

    def after_pass(self, ctx, p, gm, record) -> None:
        try:
            gm.graph.lint()
        except Exception as exc:
            raise VerificationError(f"graph.lint failed after '{record.text}': {exc}",
                                    hint="the pass left a malformed graph") from exc
        self._check_meta(gm, record)
        if self._inputs(ctx) is not None and record.changed:
            kept = [(c, r) for c, r in zip(self._calls, self._reference) if _accepts(gm, c)]
            self._calls, self._reference = [c for c, _ in kept], [r for _, r in kept]
            outputs = []
            for call, reference in kept:
                try:
                    outputs.append(_run(gm, call))
                except Exception as exc:
                    raise VerificationError(
                        f"after '{record.text}' the graph no longer runs on inputs of shapes "
                        f"{_shapes(call)}: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}",
                        hint="the pass may have fixed a dynamic size (e.g. the batch) to the "
                             "example's; build sizes from the input's shape instead") from exc
                if p.tolerance is not None:
                    _compare(reference, outputs[-1], p.tolerance, record.text)
            self._reference = outputs

    def _inputs(self, ctx):
        if not self.check_outputs:
            return None
        return self.example_inputs if self.example_inputs is not None else ctx.example_inputs

    def _sizes(self, ctx, gm) -> list:
        """The calls to check: the example, and the example grown along its dynamic dims."""
        args, kwargs = tuple(self._inputs(ctx)), dict(getattr(ctx, "example_kwargs", {}) or {})
        other = resized_inputs(gm, args, kwargs, smaller=True)
        return [(args, kwargs)] + ([(other, {})] if other is not None else [])

    @staticmethod
    def _check_meta(gm, record) -> None:
        claims = record.preserves is None or any(getattr(a, "meta_key", None) == TENSOR
                                                  for a in record.preserves)
        before = {n: n.meta.get(TENSOR) for n in gm.graph.nodes} if claims else {}
        try:
            propagate_shapes(gm)
        except Exception as exc:
            raise VerificationError(f"after '{record.text}' the graph no longer runs on fake tensors",
                                    where=str(getattr(exc, "where", "") or exc),
                                    hint="the pass produced inconsistent shapes") from exc
        for node, old in before.items():
            if node.meta.get(TENSOR) != old:
                raise VerificationError(
                    f"'{record.text}' claims to preserve shapes but node '{node.name}' changed from "
                    f"{old} to {node.meta.get(TENSOR)}",
                    hint="drop Shapes from the pass's preserves, or fix the rewrite")


def _accepts(gm, call) -> bool:
    """Whether the graph still takes this call (a pass may fix the sizes, as split-stages does)."""
    try:
        check_inputs(gm, *call)
    except InputShapeError:
        return False
    return True


def _shapes(call) -> str:
    args, kwargs = call
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return ", ".join(str(tuple(x.shape)) for x in leaves if isinstance(x, torch.Tensor))


def _run(gm, call):
    """Run the graph for a comparison without side effects: the same random stream each
    time (training-mode dropout draws the same masks) and buffers restored afterwards
    (a training-mode BN's running stats are not moved by verification)."""
    buffers = {name: b.clone() for name, b in gm.named_buffers()}
    try:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            args, kwargs = call
            return gm(*args, **kwargs)
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])


def _compare(expected, actual, tolerance: float, text: str) -> None:
    flat_e = torch.utils._pytree.tree_leaves(expected)
    flat_a = torch.utils._pytree.tree_leaves(actual)
    if len(flat_e) != len(flat_a):
        raise VerificationError(f"'{text}' changed the number of outputs ({len(flat_e)} -> {len(flat_a)})")
    for i, (e, a) in enumerate(zip(flat_e, flat_a)):
        if not isinstance(e, torch.Tensor):
            continue
        if e.shape != a.shape:
            raise VerificationError(f"'{text}' changed output {i}'s shape {tuple(e.shape)} -> {tuple(a.shape)}")
        scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
        diff = (e.double() - a.double()).abs().max().item() if e.numel() else 0.0
        if diff > tolerance * scale:
            raise VerificationError(
                f"'{text}' changed output {i} by {diff:.3g} (allowed {tolerance:g} x scale {scale:.3g})",
                hint="the rewrite is not semantics-preserving; rerun with the Reproducer instrument")


class Reproducer(Instrument):
    """On a failure, writes graph code, pipeline text, failing pass and error to `folder`.

    The folder is written under a temporary name and renamed into place, so a
    crash never leaves half a reproducer.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self._code_before = ""

    def before_pass(self, ctx, p, gm) -> None:
        self._code_before = gm.code

    def after_pass_failed(self, ctx, p, gm, exc) -> None:
        parent = os.path.dirname(os.path.abspath(self.folder))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".reproducer-", dir=parent)
        files = {
            "graph_before.py": self._code_before,
            "pipeline.txt": format_pipeline(ctx.passes) + "\n",
            "failing_pass.txt": format_pipeline([p]) + "\n",
            "passes_run.txt": "\n".join(ctx.passes_run) + "\n",
            "error.txt": "".join(traceback.format_exception(exc)),
        }
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w") as fh:
                fh.write(text)
        if os.path.exists(self.folder):
            shutil.rmtree(self.folder)
        os.replace(tmp, self.folder)

"""The user-facing entry points: trace, compile, lower, calibrate, freeze."""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.fx as fx

from ..analyses import CostTracker, Shapes, ShapeTable
from ..backends import get_backend
from ..backends.compiled import CompiledModel
from ..errors import UnsupportedError
from ..ir.graph import graph_module_of
from ..ir.inputs import check_inputs, guard_errors, positional, split_batch, traced_inputs
from ..ir.meta import CALIBRATION_SAMPLE, CALIBRATION_SAMPLE_SIZE
from ..ir.trace import as_args, trace
from ..pm import AnalysisManager, PassManager, Timing, Verify
from ..quant import quantizers_in

__all__ = ["CompiledModel", "Recipe", "build", "calibrate", "compile", "freeze", "lower", "trace"]


def _verify_by_default() -> bool:
    return os.environ.get("FXOPT_VERIFY", "") not in ("", "0")


def compile(model, example_inputs, example_kwargs=None, pipeline="default", backend: str = "eager",
            dynamic_shapes="batch", calibration=None, data=None, instruments=None,
            verify: bool | None = None, leaf_modules=(), concrete_args=None,
            **backend_options) -> CompiledModel:
    """Trace `model`, run `pipeline` over the graph, lower it with `backend`.

    `example_kwargs`: keyword inputs of the example call (the compiled model takes the
    same keywords). `dynamic_shapes`: "batch" (default: dim 0 of every tensor input
    may vary), "static", or a torch.export `dynamic_shapes` spec.
    `verify` (default: the FXOPT_VERIFY environment variable) adds the Verify
    instrument with output checks on the example inputs (and, where a dim is
    dynamic, at one more size) after every pass.
    `calibration` batches (any size along the dynamic dims) are run through the
    rewritten graph before lowering. `data` batches are for the passes that train or
    measure (distill, sensitivity-driven allocation): each `x`, `(x, target)` or `(x, None)`,
    targets optional. `instruments`: the pass manager's instruments
    (default: a new Timing for this call; () for none).
    """
    if "on_new_shape" in backend_options:
        raise UnsupportedError("on_new_shape was removed: a compiled model runs at any size along its "
                               "dynamic dims (by default the batch), and retracing would lose the work "
                               "done on the compiled graph",
                               hint="drop it; to vary other dims give dynamic_shapes={'x': {0: Dim.AUTO, "
                                    "2: Dim.AUTO}} (torch.export.Dim)")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise UnsupportedError(f"example_kwargs must be a dict of keyword inputs, got "
                               f"{type(example_kwargs).__name__}",
                               hint="name the other settings: fxopt.compile(model, inputs, pipeline=...)")
    if not isinstance(pipeline, (str, list, tuple)):
        raise UnsupportedError(f"pipeline must be pipeline text (e.g. 'prune50' or 'fold-bn,fake-quant') or a "
                               f"list of passes, got {type(pipeline).__name__}",
                               hint="`fxopt passes` lists the passes; presets: default, prune50, int8, ...")
    example_inputs = as_args(example_inputs)
    example_kwargs = dict(example_kwargs or {})
    gm = trace(model, example_inputs, example_kwargs, dynamic_shapes=dynamic_shapes,
               leaf_modules=leaf_modules, concrete_args=concrete_args)
    instruments = (Timing(),) if instruments is None else tuple(instruments)
    if verify if verify is not None else _verify_by_default():
        instruments += (Verify(check_outputs=True),)
    recipe = Recipe(pipeline, backend, calibration, data, instruments, backend_options)
    return build(gm, (example_inputs, example_kwargs), recipe)


@dataclasses.dataclass
class Recipe:
    """What turns a traced graph into a CompiledModel: the passes, their data and the backend."""

    pipeline: object = "default"
    backend: str = "eager"
    calibration: object = None
    data: object = None
    instruments: tuple = ()
    backend_options: dict = dataclasses.field(default_factory=dict)


def build(gm: fx.GraphModule, example: tuple, recipe: Recipe, analyses: dict | None = None) -> CompiledModel:
    """Run `recipe` over the traced graph `gm` (rewritten in place) and lower it.

    `example` is (example_inputs, example_kwargs). `analyses` are results already known for
    `gm` ({analysis type: result}), put in the cache before the first pass, so a caller that
    builds many variants of one graph measures them once.
    """
    example_inputs, example_kwargs = example
    calibration = _batches(recipe.calibration, "calibration") if recipe.calibration is not None else None
    data = _batches(recipe.data, "data") if recipe.data is not None else None
    am = AnalysisManager(gm, calibration, data)
    am.put(Shapes, ShapeTable(gm))
    for analysis, result in (analyses or {}).items():
        am.put(analysis, result)
    report = PassManager(recipe.pipeline, tuple(recipe.instruments) + (CostTracker(),)).run(
        gm, am, example_inputs=example_inputs, example_kwargs=example_kwargs)
    if calibration is not None:
        _run_batches(gm, calibration)
        if quantizers_in(gm):  # observers have seen the batches: fix the scales before lowering
            _freeze_module(gm)
    options = dict(recipe.backend_options)
    lowered = get_backend(recipe.backend).lower(gm, positional(gm, example_inputs, example_kwargs), **options)
    return CompiledModel(gm, lowered, _with_backend_sections(report, lowered), (recipe.backend, options))


def lower(compiled: CompiledModel, backend: str = "eager", example_inputs=None, **options) -> CompiledModel:
    """Lower an already compiled model's graph with another backend."""
    if not isinstance(compiled, CompiledModel):
        raise UnsupportedError(f"lower takes what fxopt.compile returned, got {type(compiled).__name__}",
                               hint="compile the model first: fxopt.compile(model, inputs, backend=...)")
    gm = compiled.graph_module
    if example_inputs is None:
        example_inputs = traced_inputs(gm)
    lowered = get_backend(backend).lower(gm, tuple(example_inputs), **options)
    return CompiledModel(gm, lowered, _with_backend_sections(compiled.report, lowered), (backend, options))


def _with_backend_sections(report, lowered):
    """The report plus the sections a backend attached to its lowered module (e.g.
    `int8`: what runs in int8 and what stays float); a copy, the original is kept."""
    extra = getattr(lowered, "report_sections", None)
    if not extra:
        return report
    return dataclasses.replace(report, sections={**report.sections, **extra})


def calibrate(compiled: CompiledModel, batches, progress: bool = False) -> CompiledModel:
    """Run calibration batches through the rewritten graph (observers record ranges).

    A batch is the model's input (a tensor, or a tuple of its inputs). The model
    must hold fake quantizers (a pipeline with fake-quant); `progress` shows a bar.
    Call `freeze` afterwards to fix the scales.
    """
    gm = graph_module_of(compiled, "calibrate")
    batches = _batches(batches, "calibrate: batches")
    if not quantizers_in(gm):
        raise UnsupportedError("calibrate: the model has no fake quantizers, so there is nothing to "
                               "calibrate",
                               hint="compile with a pipeline that quantizes, e.g. "
                                    "pipeline='fold-bn,fake-quant'")
    _run_batches(gm, batches, progress)
    return compiled


def freeze(compiled: CompiledModel) -> CompiledModel:
    """Stop observers: every submodule with a `freeze()` method is frozen."""
    _freeze_module(graph_module_of(compiled, "freeze"))
    return compiled


def _batches(batches, what: str) -> list:
    """A list of batches (each a tensor, a tuple of inputs or a dict of keyword inputs)."""
    if isinstance(batches, (torch.Tensor, str, bytes, dict)) or not hasattr(batches, "__iter__"):
        raise UnsupportedError(f"{what} takes a list of batches, got {type(batches).__name__}",
                               hint="e.g. calibration=[x1, x2, ...], each batch shaped like the example inputs")
    return list(batches)


def _freeze_module(gm: torch.nn.Module) -> None:
    for module in gm.modules():
        if module is not gm and callable(getattr(module, "freeze", None)):
            module.freeze()


def _run_batches(gm: fx.GraphModule, batches, progress: bool = False) -> None:
    """Run each batch (a tensor, a tuple of inputs, or a dict of keyword inputs) through `gm`."""
    batches = list(batches)
    gm.meta[CALIBRATION_SAMPLE] = batches[:CALIBRATION_SAMPLE_SIZE]   # int8 kernels are checked on them
    iterator = batches
    if progress:
        from rich.progress import track

        iterator = track(batches, description="calibrating")
    with torch.no_grad():
        for batch in iterator:
            args, kwargs = split_batch(batch)
            check_inputs(gm, args, kwargs, what="a calibration batch was given")
            with guard_errors(gm):
                gm(*positional(gm, args, kwargs))

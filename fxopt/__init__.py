"""fxopt: a graph-rewriting compiler over torch.fx.

    cm = fxopt.compile(model, example_inputs, pipeline="fold-bn,canonicalize,dce")
    print(cm.report)

Everything public is re-exported here; submodules are implementation. Passes and
backends are imported on first use (by name, from a pipeline or `backend=`).
"""
from . import analyses, backends, passes, quant  # noqa: F401
from .api import calibrate, compile, explain, freeze, load, lower, save, trace
from .backends import list_backends, register_backend
from .backends.compiled import CompiledModel
from .errors import (BackendOptionError, FxoptError, InputShapeError, PassFailedError, PassOptionError,
                     PipelineSyntaxError, TraceError, TrainingError, UnknownPassError, UnsupportedError,
                     VerificationError)
from .pm import (PRESETS, Analysis, AnalysisManager, Pass, PassManager, PassResult, Report,
                 format_pipeline, instruments, list_passes, parse_pipeline, register_pass)
from .quant import FakeQuantize
from .train import FinetuneHistory, finetune

__version__ = "0.1.0"

# public names whose modules belong to one pass or one exporter: imported when first used
_LAZY = {"PruningPlan": "fxopt.passes.prune_channels.persist", "apply_plan": "fxopt.passes.prune_channels.persist",
         "explain_pruning": "fxopt.passes.prune_channels.persist", "load_pruned": "fxopt.passes.prune_channels.persist",
         "pruning_plan": "fxopt.passes.prune_channels.persist", "save_pruned": "fxopt.passes.prune_channels.persist",
         "QuantReport": "fxopt.passes.fake_quant.report", "export_onnx": "fxopt.backends.onnx",
         "compress": "fxopt.api.compress", "CompressReport": "fxopt.api.compress"}

__all__ = [
    "PRESETS", "Analysis", "AnalysisManager", "BackendOptionError", "CompiledModel", "FxoptError",
    "InputShapeError", "Pass", "PassFailedError", "PassManager", "PassOptionError", "PassResult",
    "PipelineSyntaxError", "Report", "TraceError", "TrainingError", "UnknownPassError",
    "UnsupportedError", "VerificationError", "analyses", "backends", "calibrate", "compile", "explain",
    "format_pipeline", "freeze", "instruments", "list_backends", "list_passes", "lower",
    "parse_pipeline", "register_backend", "register_pass", "trace",
    "PruningPlan", "apply_plan", "explain_pruning", "load_pruned", "pruning_plan", "save_pruned",
    "FinetuneHistory", "finetune",
    "FakeQuantize", "QuantReport", "quant",
    "export_onnx",
    "load", "save",
    "CompressReport", "compress",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fxopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

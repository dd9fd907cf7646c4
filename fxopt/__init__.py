"""fxopt: a graph-rewriting compiler over torch.fx.

    cm = fxopt.compile(model, example_inputs, pipeline="fold-bn,canonicalize,dce")
    print(cm.report)

Everything public is re-exported here; submodules are implementation.
"""
from . import analyses, backends, passes, quant  # noqa: F401  (passes registers the built-ins)
from .api import CompiledModel, calibrate, compile, freeze, lower, trace
from .backends import list_backends, register_backend
from .errors import (BackendOptionError, FxoptError, InputShapeError, PassFailedError, PassOptionError,
                     PipelineSyntaxError, TraceError, UnknownPassError, UnsupportedError,
                     VerificationError)
from .export import export_onnx
from .finetune import FinetuneHistory, finetune
from .pruning import (PruningPlan, apply_plan, explain_pruning, load_pruned, pruning_plan,
                      save_pruned)
from .quant import FakeQuantize, QuantReport
from .saving import load, save
from .pm import (PRESETS, Analysis, AnalysisManager, Pass, PassManager, PassResult, Report,
                 format_pipeline, instruments, list_passes, parse_pipeline, register_pass)

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "Analysis", "AnalysisManager", "BackendOptionError", "CompiledModel", "FxoptError", "InputShapeError",
    "Pass", "PassFailedError", "PassManager", "PassOptionError", "PassResult", "PipelineSyntaxError",
    "Report", "TraceError", "UnknownPassError", "UnsupportedError", "VerificationError", "analyses",
    "backends", "calibrate", "compile", "format_pipeline", "freeze", "instruments", "list_backends",
    "list_passes", "lower", "parse_pipeline", "register_backend", "register_pass", "trace",
    "PruningPlan", "apply_plan", "explain_pruning", "load_pruned", "pruning_plan",
    "save_pruned",
    "FinetuneHistory", "finetune",
    "FakeQuantize", "QuantReport", "quant",
    "export_onnx",
    "load", "save",
]

"""fxopt: a graph-rewriting compiler over torch.fx.

    cm = fxopt.compile(model, example_inputs, pipeline="fold-bn,canonicalize,dce")
    print(cm.report)

Everything public is re-exported here; submodules are implementation. Passes and
backends are imported on first use (by name, from a pipeline or `backend=`).
"""
from . import analyses, backends, passes, quant  # noqa: F401
from .api import calibrate, compile, freeze, load, lower, save, trace
from .backends import list_backends, register_backend
from .backends.compiled import CompiledModel
from .backends.onnx import export_onnx
from .errors import (BackendOptionError, FxoptError, InputShapeError, PassFailedError, PassOptionError,
                     PipelineSyntaxError, TraceError, TrainingError, UnknownPassError, UnsupportedError,
                     VerificationError)
from .passes.prune_channels.persist import (PruningPlan, apply_plan, explain_pruning, load_pruned,
                                            pruning_plan, save_pruned)
from .pm import (PRESETS, Analysis, AnalysisManager, Pass, PassManager, PassResult, Report,
                 format_pipeline, instruments, list_passes, parse_pipeline, register_pass)
from .passes.fake_quant.report import QuantReport
from .quant import FakeQuantize
from .train import FinetuneHistory, finetune

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "Analysis", "AnalysisManager", "BackendOptionError", "CompiledModel", "FxoptError",
    "InputShapeError", "Pass", "PassFailedError", "PassManager", "PassOptionError", "PassResult",
    "PipelineSyntaxError", "Report", "TraceError", "TrainingError", "UnknownPassError",
    "UnsupportedError", "VerificationError", "analyses", "backends", "calibrate", "compile",
    "format_pipeline", "freeze", "instruments", "list_backends", "list_passes", "lower",
    "parse_pipeline", "register_backend", "register_pass", "trace",
    "PruningPlan", "apply_plan", "explain_pruning", "load_pruned", "pruning_plan", "save_pruned",
    "FinetuneHistory", "finetune",
    "FakeQuantize", "QuantReport", "quant",
    "export_onnx",
    "load", "save",
]

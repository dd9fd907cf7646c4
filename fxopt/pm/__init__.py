"""The pass manager layer: passes, analyses, pipelines and instruments."""
from .analysis import Analysis, AnalysisManager
from .instruments import Instrument, PrintIR, Reproducer, Timing, Verify
from .manager import PassManager, RunContext
from .options import Options, OptionSpec, Range
from .pass_base import Pass, PassResult, declare_passes, get_pass, list_passes, pass_names, register_pass
from .pipeline import PRESETS, format_pipeline, parse_pipeline
from .report import PassRecord, Report
from .stages import Stages

__all__ = [
    "PRESETS", "Analysis", "AnalysisManager", "Instrument", "OptionSpec", "Options", "Pass", "PassManager",
    "PassRecord", "PassResult", "PrintIR", "Range", "Report", "Reproducer", "RunContext", "Stages", "Timing",
    "Verify", "declare_passes", "format_pipeline", "get_pass", "list_passes", "parse_pipeline",
    "pass_names", "register_pass",
]

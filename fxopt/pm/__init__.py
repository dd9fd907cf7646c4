"""The pass manager layer: passes, analyses, pipelines and instruments."""
from .analysis import Analysis, AnalysisManager
from .instruments import Instrument, PrintIR, Reproducer, Timing, Verify
from .manager import PassManager, RunContext
from .options import Options, OptionSpec, Range
from .pass_base import Pass, PassResult, list_passes, register_pass
from .pipeline import PRESETS, format_pipeline, parse_pipeline
from .report import PassRecord, Report
from .stages import Stages

__all__ = [
    "PRESETS", "Analysis", "AnalysisManager", "Instrument", "OptionSpec", "Options", "Pass", "PassManager",
    "PassRecord", "PassResult", "PrintIR", "Range", "Report", "Reproducer", "RunContext", "Stages", "Timing",
    "Verify", "format_pipeline", "list_passes", "parse_pipeline", "register_pass",
]

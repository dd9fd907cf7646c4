"""The pass manager layer: passes, analyses, pipelines and instruments."""
from .analysis import Analysis, AnalysisManager
from .instruments import Instrument, PrintIR, Reproducer, Timing, Verify
from .manager import PassManager, RunContext
from .pass_base import OptionSpec, Pass, PassResult, list_passes, register_pass
from .pipeline import PRESETS, format_pipeline, parse_pipeline
from .report import PassRecord, Report
from .stages import Stages

__all__ = [
    "PRESETS", "Analysis", "AnalysisManager", "Instrument", "OptionSpec", "Pass", "PassManager",
    "PassRecord", "PassResult", "PrintIR", "Report", "Reproducer", "RunContext", "Stages", "Timing",
    "Verify", "format_pipeline", "list_passes", "parse_pipeline", "register_pass",
]

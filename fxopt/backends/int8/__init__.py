"""int8: run a calibrated fake-quant graph on real int8 CPU kernels.

    cm = fxopt.compile(model, x, pipeline="fold-bn,fake-quant", backend="int8", calibration=batches)
    # or, after fxopt.calibrate / fxopt.freeze (or QAT):
    cm = fxopt.lower(cm, backend="int8")
    print(fxopt.backends.int8.int8_report(cm))

The quantize-dequantize patterns fake-quant left become quantized conv / linear /
add / cat kernels (x86, fbgemm or oneDNN engine; see `kernels` and `lowering`);
int8 values flow between them as quantized tensors. What has no int8 kernel stays
float, and the report lists it with the reason: nothing fails for it.

Options: `Int8Options` (`fxopt backends` lists them).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ...errors import FxoptError, UnsupportedError
from ...ir.meta import CALIBRATION_SAMPLE
from ...quant.integer_modules import has_integer_ops
from .. import BackendOptions, register_backend, require_frozen_quantizers
from .agreement import layer_agreement
from .kernels import INT8_MODULES, candidate_engines, pick_engine
from .lowering import Lowering
from .report import Int8Report

__all__ = ["INT8_MODULES", "Int8Backend", "Int8Report", "int8_report"]


@dataclass(frozen=True)
class Int8Options(BackendOptions):
    """engine: the quantized CPU engine (x86 | fbgemm | onednn | qnnpack, as this PyTorch build
        has them); none: the fastest supported, x86 first, whose kernels agree with the
        fake-quant model on the calibration batches, layer by layer (see `agreement`).
    """

    engine: str | None = None

    owner_name: ClassVar[str] = "backend 'int8'"


class Int8Backend:
    name = "int8"
    Options = Int8Options

    def lower(self, gm: fx.GraphModule, example_inputs: tuple, **options):
        engine = Int8Options.from_kwargs(options).engine
        require_frozen_quantizers(gm, "int8")
        if has_integer_ops(gm):
            raise UnsupportedError("backend 'int8': the graph holds the integer ops of fake-quant{integer=true} "
                                   "(I-BERT's softmax / GELU / LayerNorm), which torch's int8 kernels do not run",
                                   hint="export it with backend='fpga-int8', run it with 'eager' or 'inductor', "
                                        "or quantize with fake-quant (without integer=true) for 'int8'")
        try:
            engines = [pick_engine(engine)] if engine is not None else candidate_engines()
        except ValueError as exc:
            raise UnsupportedError(f"backend 'int8': {exc}") from None
        lowered, report = _agreeing(gm, engines, gm.meta.get(CALIBRATION_SAMPLE), chosen_by_user=engine is not None)
        lowered.int8_report = report
        lowered.report_sections = {"int8": report}  # compiled.report.int8
        lowered.eval()
        return lowered

    def available(self) -> str | None:
        engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
        return None if engines else "a PyTorch build with quantized CPU kernels (fbgemm / x86 / onednn)"


def _agreeing(gm: fx.GraphModule, engines: list[str], batches, chosen_by_user: bool):
    """The lowering on the first engine whose kernels agree with the fake-quant graph on the
    calibration batches (agreement.py); FxoptError naming the layer when none does."""
    notes, bad = [], None
    for name in engines:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # quantized tensor constructors: deprecation
            lowered, report = Lowering(gm, name).run()
            checks = layer_agreement(gm, lowered, batches) if batches else None
        if checks is None:
            return lowered, report
        bad = next((c for c in checks if not c.agrees), None)
        if bad is None:
            report.checked = (f"checked: {len(checks)} int8 ops agree with the fake-quant model on "
                              f"{len(batches)} calibration batches")
            report.engine_notes = notes
            return lowered, report
        notes.append(f"engine {name} passed over: {bad}")
    others = [e for e in candidate_engines() if e not in engines]
    raise FxoptError(f"backend 'int8': the int8 kernels disagree with the fake-quant model at {bad.layer} "
                     f"(engine {', '.join(engines)}): {bad}", where=bad.layer,
                     hint=(f"try engine={others[0]!r}, " if chosen_by_user and others else "")
                     + "or keep that layer in float (fake-quant{skip=[...]}); the eager backend runs the "
                       "fake-quant model as it is")


def int8_report(compiled) -> Int8Report:
    """The Int8Report of a model compiled or lowered with backend='int8'."""
    lowered = getattr(compiled, "_lowered", compiled)
    report = getattr(lowered, "int8_report", None)
    if report is None:
        raise UnsupportedError("this model was not lowered with backend='int8'",
                               hint="fxopt.lower(compiled, backend='int8')")
    return report


register_backend(Int8Backend())

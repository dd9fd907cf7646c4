"""fpga-int8: an integer-only int8 export, bit-exact across a simulator and plain C++.

    cm = fxopt.compile(model, x, pipeline="fold-bn,fake-quant", backend="fpga-int8",
                       calibration=batches, export_dir="out/")     # writes the artefacts
    y = cm(x)                                                      # runs the bit-exact simulator
    report = fxopt.backends.fpga_int8.verify("out/", x, cm)        # simulator / C++ / fake-quant
    print(cm.report.fpga)                                          # resources per layer

With rtl=True the export also holds synthesizable Verilog (rtl/), which verify simulates
bit-exact against the simulator, and synth="ice40" | "generic" (or synth(export_dir, ...))
runs Yosys (and nextpnr-ice40) on it and puts the real figures into cm.report.fpga.

Integer arithmetic (Jacob et al. 2018, as gemmlowp / TFLite): int8 weights (symmetric,
per channel, [-127, 127]) and activations (per tensor, zero point), int32 biases at
scale s_x * s_w[c] and accumulators whose width is proven at export, requantization
by an int32 multiplier and a shift (fixedpoint). The layers are listed in model.py,
the lowering walk in lowering.py and its rules in ops_*.py. Files under export_dir: model.json, weights/*.npy,
model.onnx (the fake-quant model as QDQ ONNX; none for integer transformers), weights.h and model.cpp.

Options: `FpgaInt8Options` (`fxopt backends` lists them).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
import torch.fx as fx

from ...util.artefacts import check_destination
from ...errors import BackendOptionError, UnsupportedError
from ...pm.options import Range
from ...quant.fixedpoint import ROUNDINGS, Rounding
from .. import BackendOptions, register_backend, require_frozen_quantizers
from ..onnx import export_onnx
from .cpp import emit_cpp
from .lowering import Lowering
from .model import ARTEFACT, IntegerModel, load, save
from .pow2 import pow2_cost, with_pow2_scales
from .reference import with_int32_biases
from .resources import ResourceReport, resource_report
from .simulate import dequantize_outputs, quantize_inputs, run_floats, run_integer, simulate
from .rtl import emit_rtl
from .synth import SynthReport, synth
from .verify import VerifyReport, verify

__all__ = ["FpgaInt8Backend", "FpgaInt8Model", "ResourceReport", "SynthReport", "VerifyReport", "dequantize_outputs",
           "export", "load", "quantize_inputs", "resource_report", "run_floats", "run_integer", "simulate", "synth",
           "verify"]


@dataclass(frozen=True)
class FpgaInt8Options(BackendOptions):
    """export_dir: write the artefact there (model.json, weights, C++, ONNX; a new or empty
        folder, or an earlier fpga-int8 artefact); none: write nothing.
    rounding: single (one 64-bit multiply and one rounded shift, the exact rounding of
        acc * M0 * 2^(shift-31)) | double (gemmlowp / TFLite: SaturatingRoundingDoublingHighMul
        then RoundingDivideByPOT; its two roundings put 0.27% of mobilenet_v2's first-layer
        codes one above the exact rounding).
    pow2_scales: every scale a power of two, so every requantization of conv / linear / add
        is a shift.
    reuse_factor: how many MACs share one multiplier, for the DSP and cycle estimates and the
        RTL's folding.
    rtl: also write rtl/ (needs export_dir): synthesizable Verilog of the integer model, ROM
        images and a testbench; verify then simulates it against the simulator.
    rtl_io: stream (one element per beat between layers: every op the RTL has) | parallel
        (a whole vector per beat, hls4ml's io_parallel: fully connected models only, a few
        cycles per layer at a low reuse factor).
    synth: none | ice40 (Yosys synth_ice40 and nextpnr-ice40 for an iCE40 UP5K) | generic
        (Yosys synth, 4-input LUTs): synthesise the RTL and put the figures in report.fpga.
    """

    export_dir: str | os.PathLike | None = None
    rounding: Rounding = "single"
    pow2_scales: bool = False
    reuse_factor: Annotated[int, Range(1)] = 1
    rtl: bool = False
    rtl_io: Literal["stream", "parallel"] = "stream"
    synth: Literal["none", "ice40", "generic"] = "none"

    owner_name: ClassVar[str] = "backend 'fpga-int8'"

    def validate(self) -> None:
        if (self.rtl or self.synth != "none") and self.export_dir is None:
            raise BackendOptionError("backend 'fpga-int8': rtl and synth write files, and no export_dir was given",
                                     hint="add export_dir='out/' (a new or empty folder)")
        if self.rtl_io != "stream" and not self.rtl:
            raise BackendOptionError(f"backend 'fpga-int8': rtl_io={self.rtl_io!r} shapes the RTL, and rtl is off",
                                     hint="add rtl=True")
        if self.synth != "none" and not self.rtl:
            raise BackendOptionError(f"backend 'fpga-int8': synth={self.synth!r} synthesises the RTL, and rtl is "
                                     "off", hint="add rtl=True")


class FpgaInt8Model(torch.nn.Module):
    """Runs the integer model in the numpy simulator; `reference` is the fake-quant model exported."""

    def __init__(self, spec: dict, weights: dict, reference: fx.GraphModule, export_dir=None):
        super().__init__()
        self.spec, self.weights, self.export_dir = spec, weights, export_dir
        self.reference = reference

    def forward(self, *inputs):
        outs = [torch.from_numpy(o) for o in run_floats(self.spec, self.weights, inputs)]
        return outs[0] if len(outs) == 1 else tuple(outs)


def export(gm: fx.GraphModule, example_inputs: tuple, export_dir=None, rounding: str = "single",
           pow2_scales: bool = False, rtl_reuse: int | None = None,
           rtl_io: str = "stream") -> tuple[IntegerModel, fx.GraphModule]:
    """(integer model, its reference); writes the files if export_dir.

    The reference is the fake-quant model the integer model implements: gm, with pow2 scales
    if asked, and its biases on their int32 grid (reference.py); always a copy. rtl_reuse:
    also write rtl/ at that reuse factor, with rtl_io's interfaces."""
    if rounding not in ROUNDINGS:
        raise UnsupportedError(f"fpga-int8: rounding must be one of {ROUNDINGS}, got {rounding!r}",
                               hint="rounding='double' (gemmlowp / TFLite) or 'single'")
    require_frozen_quantizers(gm, "fpga-int8")
    if export_dir is not None:
        check_destination(export_dir, ARTEFACT)    # before the work: never another folder's files
    reference = with_int32_biases(with_pow2_scales(gm) if pow2_scales else gm)
    model = Lowering(reference, rounding, bool(pow2_scales)).run()
    if export_dir is not None:
        files = _derived_files(model, reference, example_inputs)
        if rtl_reuse is not None:
            files.update(emit_rtl(model.to_json(), model.weights(), rtl_reuse, rtl_io))
        save(model, export_dir, files)
    return model, reference


def _derived_files(model: IntegerModel, reference: fx.GraphModule, example_inputs: tuple) -> dict:
    """weights.h, model.cpp and model.onnx as bytes (made before anything is written). A model
    that QDQ ONNX cannot express exactly (the integer ops of fake-quant{integer=true}, an
    embedding or a slice the ONNX table lacks) has no model.onnx, and model.notes says why: a
    float stand-in would not be the model exported."""

    files = emit_cpp(model.to_json(), model.weights())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:
            export_onnx(reference, path, example_inputs)
        except UnsupportedError as exc:
            model.notes.append(f"no model.onnx: {str(exc).splitlines()[0]}")
            return files
        with open(path, "rb") as f:
            files["model.onnx"] = f.read()
    return files


class FpgaInt8Backend:
    name = "fpga-int8"

    Options = FpgaInt8Options

    def lower(self, gm: fx.GraphModule, example_inputs: tuple, **options):
        opts = FpgaInt8Options.from_kwargs(options)
        model, reference = export(gm, example_inputs, opts.export_dir, opts.rounding, opts.pow2_scales,
                                  opts.reuse_factor if opts.rtl else None, opts.rtl_io)
        spec = model.to_json()
        weights = model.weights()
        lowered = FpgaInt8Model(spec, weights, reference, opts.export_dir)
        report = resource_report(spec, weights, opts.reuse_factor)
        report.notes.extend(model.notes)
        if opts.pow2_scales:
            report.pow2_cost = pow2_cost(gm, reference, example_inputs)
        if opts.synth != "none":
            report.synthesis = synth(opts.export_dir, target=opts.synth)
        lowered.report_sections = {"fpga": report}
        return lowered

    def available(self) -> str | None:
        return None


register_backend(FpgaInt8Backend())

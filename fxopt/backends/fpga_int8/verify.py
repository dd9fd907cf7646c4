"""The three-way check: numpy simulator, compiled C++ and the fake-quant torch model (and the RTL).

All three run on the same inputs, and every layer of the integer model is compared:

- simulator against C++, end to end: bit for bit (any difference is a bug);
- simulator against the fake-quant model, layer by layer with the same inputs: each
  integer layer is run on the fake-quant model's own input codes and its result is
  compared with the fake-quant model's value at the same point (its `source` node) in
  the tensor's LSBs (codes round(v / scale) + zero point for int8, v / scale for int32).
  Rounding may differ by 1 LSB (the bias is rounded to int32 and the multiplier to
  Q31, where the fake-quant model keeps both in float); anything more is a defect.
- end to end drift is reported too: a 1-LSB rounding flip early in a deep network
  moves later layers by more, so the integer model's final outputs differ from the
  fake-quant model's by a few LSB on some elements; the top-1 agreement says what that
  costs a classifier.
- the RTL (rtl/, when the export has it or rtl=True), end to end: its outputs in Verilator,
  and in Icarus for short runs, bit for bit against the simulator's, with the cycles per
  inference and the initiation interval the simulation measured.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx

from ...quant import quantizer_of
from ...errors import FxoptError
from .model import load_export
from .rtl import RtlCheck, check_rtl, rtl_settings
from .kernels import KERNELS
from .cpp import compile_cpp, emit_cpp, run_cpp
from .simulate import named_inputs, quantize_inputs, run_integer


@dataclass
class TensorCheck:
    tensor: str
    layer: str
    cpp_max_diff: int            # max |simulator - C++| (integers), end to end
    ref_max_lsb: float           # max |layer - fake-quant| in LSBs, on the fake-quant model's inputs
    ref_within_1: float          # fraction of elements within 1 LSB, on the fake-quant model's inputs
    drift_within_1: float        # fraction within 1 LSB end to end (the integer model's own inputs)


@dataclass
class VerifyReport:
    inputs: int
    checks: list[TensorCheck] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    min_within: float = 0.999
    top1_agreement: float | None = None
    rtl: RtlCheck | None = None

    @property
    def cpp_exact(self) -> bool:
        return all(c.cpp_max_diff == 0 for c in self.checks)

    @property
    def within_1(self) -> float:
        """The lowest per-layer fraction of elements within 1 LSB of the fake-quant model."""
        return min((c.ref_within_1 for c in self.checks), default=1.0)

    @property
    def output_drift_within_1(self) -> float:
        rows = [c.drift_within_1 for c in self.checks if c.tensor in self.outputs]
        return min(rows, default=1.0)

    @property
    def ok(self) -> bool:
        rtl_ok = self.rtl is None or not self.rtl.max_diff or self.rtl.exact
        return self.cpp_exact and self.within_1 >= self.min_within and rtl_ok

    def __str__(self) -> str:
        lines = [f"fpga-int8 verify on {self.inputs} inputs: {'OK' if self.ok else 'FAILED'}",
                 f"  simulator vs C++: {'bit-exact' if self.cpp_exact else 'DIFFER'}",
                 f"  layers vs fake-quant (same inputs): worst layer {self.within_1:.4%} of elements within "
                 f"1 LSB (needs {self.min_within:.1%})",
                 f"  end to end: outputs {self.output_drift_within_1:.2%} within 1 LSB of the fake-quant model"
                 + (f", top-1 agreement {self.top1_agreement:.2%}" if self.top1_agreement is not None else "")]
        if self.rtl is not None:
            lines.append(str(self.rtl))
        first_cpp = next((c for c in self.checks if c.cpp_max_diff), None)
        if first_cpp:
            lines.append(f"  first layer where simulator and C++ differ: {first_cpp.layer} "
                         f"(by up to {first_cpp.cpp_max_diff} LSB)")
        first_ref = next((c for c in self.checks if c.ref_max_lsb > 1), None)
        if first_ref:
            lines.append(f"  first layer more than 1 LSB from the fake-quant model: {first_ref.layer} "
                         f"(up to {first_ref.ref_max_lsb:.3g} LSB, {first_ref.ref_within_1:.4%} within 1)")
        return "\n".join(lines)


def reference_graph(reference) -> fx.GraphModule:
    """The fake-quant GraphModule behind a CompiledModel (the exported one) or a GraphModule."""
    lowered = getattr(reference, "_lowered", None)
    if lowered is not None and getattr(lowered, "reference", None) is not None:
        return lowered.reference
    gm = getattr(reference, "graph_module", reference)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError("reference must be the fake-quant model: a CompiledModel or an fxopt GraphModule, "
                        f"got {type(reference).__name__}")
    return gm


class _Recorder(fx.Interpreter):
    def __init__(self, gm, wanted: set[str]):
        super().__init__(gm)
        self.wanted, self.seen = wanted, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.wanted:
            self.seen[n.name] = out.detach().double().numpy()
        return out


def reference_lsb(tensor: dict, value: np.ndarray) -> np.ndarray:
    """A float value of the fake-quant model in the tensor's integer units."""
    if tensor["dtype"] == "int8":
        return np.clip(np.round(value / tensor["scale"]) + tensor["zero_point"], tensor["qmin"], tensor["qmax"])
    # int32 values never leave their proven bound: a layer onto a 16-bit grid clamps there, as
    # the quantizer that reads the fake-quant value does
    lsb = value / np.asarray(tensor["scale"]).reshape(tensor["scale_shape"])
    return np.clip(lsb, -tensor["bound"], tensor["bound"])


def _quantized_sources(spec: dict, gm: fx.GraphModule) -> dict[str, str]:
    """tensor name -> the activation quantizer node that reads its source on the same grid.

    That quantizer's output holds the fake-quant model's own codes (torch rounds x * (1/s)
    in float32), so the comparison uses them rather than re-rounding the float value."""
    nodes = {n.name: n for n in gm.graph.nodes}
    found = {}
    for name, tensor in spec["tensors"].items():
        for user in nodes[tensor["source"]].users if tensor["dtype"] == "int8" else ():
            fq = quantizer_of(gm, user, "activation")
            if fq is not None and float(fq.scale.reshape(-1)[0]) == tensor["scale"]:
                found[name] = user.name
                break
    return found


def reference_values(spec: dict, gm: fx.GraphModule, floats: dict, batch: int) -> dict[str, np.ndarray]:
    """Every tensor of the integer model as the fake-quant model computes it, in LSBs."""
    quantized = _quantized_sources(spec, gm)
    sources = {name: quantized.get(name, t["source"]) for name, t in spec["tensors"].items()}
    recorder = _Recorder(gm, set(sources.values()))
    with torch.no_grad():
        recorder.run(*[torch.as_tensor(floats[e["name"]]) for e in spec["inputs"]])
    return {name: reference_lsb(t, recorder.seen[sources[name]].reshape(batch, *t["shape"]))
            for name, t in spec["tensors"].items()}


def verify(export_dir, inputs, reference, min_within: float = 0.999, rtl: bool | None = None) -> VerifyReport:
    """Run the three (four) and compare (see module docstring); `inputs`: a float batch (or tuple).

    rtl: None checks the RTL when the export has it; True requires it (and a simulator)."""
    spec, weights, files = load_export(export_dir)
    settings = rtl_settings(files) if rtl is not False else None
    if rtl and settings is None:
        raise FxoptError(f"{export_dir}: the export has no RTL to check", where=str(export_dir),
                         hint="export with backend='fpga-int8', rtl=True")
    floats = named_inputs(spec, inputs)
    codes = quantize_inputs(spec, floats)
    batch = len(next(iter(codes.values())))
    sim = {k: v.astype(np.int64) for k, v in run_integer(spec, weights, codes).items()}
    with tempfile.TemporaryDirectory(prefix="fxopt-verify-") as tmp:
        # the C++ is generated again from the checked model.json and weights, and built in a
        # private folder: whatever source sits in the export folder is never compiled
        for name, data in emit_cpp(spec, weights).items():
            Path(tmp, name).write_bytes(data)
        cpp = run_cpp(compile_cpp(tmp, out_binary=f"{tmp}/model"), spec, codes)
    ref = reference_values(spec, reference_graph(reference), floats, batch)
    report = VerifyReport(inputs=batch, outputs=list(spec["outputs"]), min_within=min_within)
    for layer in spec["layers"]:
        name = layer["output"]
        forced = [np.rint(ref[i]).astype(np.int64) for i in layer["inputs"]]
        ours = KERNELS[layer["op"]](layer, forced, weights.get(layer["name"]), spec["rounding"])
        gap, drift = np.abs(ours.astype(np.int64) - ref[name]), np.abs(sim[name] - ref[name])
        report.checks.append(TensorCheck(name, layer["name"], int(np.abs(sim[name] - cpp[name]).max()),
                                         float(gap.max()), float((gap <= 1 + 1e-9).mean()),
                                         float((drift <= 1 + 1e-9).mean())))
    first = spec["outputs"][0]
    if settings is not None:
        report.rtl = check_rtl(spec, weights, codes, sim[first], settings["reuse_factor"], io=settings["io"])
        if rtl and not report.rtl.max_diff:
            raise FxoptError("the RTL could not be simulated: " + "; ".join(report.rtl.skipped.values()),
                             where=str(export_dir), hint="apt-get install verilator (or iverilog)")
    if sim[first].ndim == 2:
        report.top1_agreement = float((sim[first].argmax(1) == ref[first].argmax(1)).mean())
    return report

"""Resource report: per layer MACs, bit widths, on-chip bytes, accumulator width, DSPs.

The accumulator width is the one the export proved (worst case from the integer
ranges of inputs, weights and biases), not a guess. DSPs count one slice per int8 x
int8 multiplier working in parallel: a layer's weight count divided by the reuse
factor (each multiplier is reused that many times per output, as in hls4ml's
`reuse_factor`); requantization multipliers are not counted (pow2-scales needs none).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ...errors import BackendOptionError

BIAS_BYTES, MULTIPLIER_BYTES, SHIFT_BYTES = 4, 4, 1


@dataclass
class LayerResources:
    name: str
    op: str
    macs: int
    weight_bits: int | None
    activation_bits: int
    weight_bytes: int
    accumulator_bits: int | None
    dsp: int


@dataclass
class ResourceReport:
    reuse_factor: int
    layers: list[LayerResources] = field(default_factory=list)
    pow2_cost: dict | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)   # per sample, fixed at export
    synthesis: object | None = None     # a synth.SynthReport when synthesised (synth= option)

    @property
    def total_macs(self) -> int:
        return sum(r.macs for r in self.layers)

    @property
    def total_weight_bytes(self) -> int:
        return sum(r.weight_bytes for r in self.layers)

    @property
    def total_dsp(self) -> int:
        return sum(r.dsp for r in self.layers)

    @property
    def max_accumulator_bits(self) -> int:
        return max((r.accumulator_bits or 0) for r in self.layers)

    def to_dict(self) -> dict:
        return {**asdict(self), "total_macs": self.total_macs, "total_weight_bytes": self.total_weight_bytes,
                "total_dsp": self.total_dsp, "max_accumulator_bits": self.max_accumulator_bits}

    def __str__(self) -> str:
        lines = [f"{'layer':28s} {'op':11s} {'MACs':>11s} {'w bits':>6s} {'a bits':>6s} {'bytes':>9s} "
                 f"{'acc bits':>8s} {'DSP':>6s}"]
        for r in self.layers:
            lines.append(f"{r.name[:28]:28s} {r.op:11s} {r.macs:11d} {r.weight_bits or '-':>6} "
                         f"{r.activation_bits:6d} {r.weight_bytes:9d} {r.accumulator_bits or '-':>8} {r.dsp:6d}")
        lines.append(f"total: {self.total_macs} MACs, {self.total_weight_bytes} bytes on chip, "
                     f"{self.total_dsp} DSP at reuse factor {self.reuse_factor}, widest accumulator "
                     f"{self.max_accumulator_bits} bits (int32 holds every one: proven)")
        if self.input_shapes:
            lines.append("fixed shapes: " + ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in
                                                      self.input_shapes.items())
                         + " per sample (only the batch streams; other sizes need another export)")
        if self.synthesis is not None:
            lines.append(f"estimate {self.total_dsp} DSP, {self.total_weight_bytes} bytes; {self.synthesis}")
        if self.pow2_cost:
            lines.append("pow2-scales cost at the outputs (vs the fake-quant model): "
                         + ", ".join(f"{k} {v:.4g}" for k, v in self.pow2_cost.items()))
        return "\n".join(lines)


def resource_report(spec: dict, weights: dict, reuse_factor: int = 1) -> ResourceReport:
    if isinstance(reuse_factor, bool) or not isinstance(reuse_factor, int) or reuse_factor < 1:
        raise BackendOptionError(f"backend 'fpga-int8': reuse_factor must be a positive integer, got "
                                 f"{reuse_factor!r}", hint="reuse_factor=1 (one multiplier per MAC) or more (fewer, reused)")
    report = ResourceReport(reuse_factor, input_shapes={e["name"]: list(e["shape"]) for e in spec["inputs"]})
    for layer in spec["layers"]:
        out = spec["tensors"][layer["output"]]
        weight = weights.get(layer["name"])
        channels = len(np.atleast_1d(layer.get("multiplier", [])))
        param_bytes = (len(layer.get("bias", [])) * BIAS_BYTES
                       + channels * (MULTIPLIER_BYTES + SHIFT_BYTES))
        macs, mults, wbits = 0, 0, None
        if weight is not None:
            mults = int(weight.size)
            per_output = int(np.prod(weight.shape[1:]))
            macs = int(np.prod(out["shape"])) * per_output
            param_bytes += mults
            wbits = 8
        report.layers.append(LayerResources(
            layer["name"], layer["op"], macs, wbits, 8 if out["dtype"] == "int8" else 32, param_bytes,
            layer.get("acc_bits"),
            math.ceil(mults / reuse_factor)))
    return report

"""Resource report: per layer MACs, bit widths, on-chip bytes, accumulator width, DSPs.

The accumulator width is the one the export proved (worst case from the integer
ranges of inputs, weights and biases), not a guess. DSPs count one slice per int8 x
int8 multiplier working in parallel: a layer's weight count divided by the reuse
factor (each multiplier is reused that many times per output, as in hls4ml's
`reuse_factor`); requantization multipliers are not counted (pow2-scales needs none).

The attention ops have no weights; their multipliers are per lane, with ceil(elements /
reuse_factor) lanes (ATTENTION_COSTS: softmax squares p + b and divides each share, GELU
squares and multiplies, LayerNorm squares D, scales by gamma and divides by the root, a
matmul of activations has K x N / reuse_factor multipliers like a linear); a lut is a
256-byte table and no multiplier, an embedding its int8 table; a sum has one requantization
multiplier per term, per lane, and rounds its total with a shift. Every layer's cycle estimate is its MACs (or elements)
over its multipliers (or lanes).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ...errors import BackendOptionError
from .checks_attention import ATTENTION_OPS

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
    table_bytes: int = 0        # lookup tables (a lut's 256 codes)
    dividers: int = 0           # integer dividers (softmax's shares, LayerNorm's 1 / root)
    cycles: int = 0             # per sample at this reuse factor


@dataclass
class ResourceReport:
    reuse_factor: int
    layers: list[LayerResources] = field(default_factory=list)
    pow2_cost: dict | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)   # per sample, fixed at export
    synthesis: object | None = None     # a synth.SynthReport when synthesised (synth= option)
    notes: list[str] = field(default_factory=list)

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
                 f"{'acc bits':>8s} {'DSP':>6s} {'div':>5s} {'cycles':>9s}"]
        for r in self.layers:
            lines.append(f"{r.name[:28]:28s} {r.op:11s} {r.macs:11d} {r.weight_bits or '-':>6} "
                         f"{r.activation_bits:6d} {r.weight_bytes:9d} {r.accumulator_bits or '-':>8} {r.dsp:6d} "
                         f"{r.dividers:5d} {r.cycles:9d}")
        lines.append(f"total: {self.total_macs} MACs, {self.total_weight_bytes} bytes on chip, "
                     f"{self.total_dsp} DSP at reuse factor {self.reuse_factor}, widest accumulator "
                     f"{self.max_accumulator_bits} bits (int32 holds every one: proven)")
        if self.input_shapes:
            lines.append("fixed shapes: " + ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in
                                                      self.input_shapes.items())
                         + " per sample (only the batch streams; other sizes need another export)")
        if self.synthesis is not None:
            lines.append(f"estimate {self.total_dsp} DSP, {self.total_weight_bytes} bytes; {self.synthesis}")
        lines.extend(f"note: {n}" for n in self.notes)
        if self.pow2_cost:
            lines.append("pow2-scales cost at the outputs (vs the fake-quant model): "
                         + ", ".join(f"{k} {v:.4g}" for k, v in self.pow2_cost.items()))
        return "\n".join(lines)


# op -> (multipliers, dividers) per lane of an element-wise attention op
ATTENTION_COSTS = {"softmax": (1, 1), "gelu": (3, 0), "layernorm": (3, 1), "lut": (0, 0), "transpose": (0, 0),
                   "embedding": (0, 0), "constant": (0, 0), "slice": (0, 0)}


def _attention(layer: dict, spec: dict, reuse_factor: int) -> LayerResources:
    ins = [spec["tensors"][n] for n in layer["inputs"]]
    out = spec["tensors"][layer["output"]]
    elements = int(np.prod(out["shape"]))
    table = 256 if layer["op"] == "lut" else 0
    params = 4 * (len(layer.get("gamma", [])) + len(layer.get("beta", [])))
    if layer["op"] == "matmul":
        *_, k = ins[0]["shape"]
        n = out["shape"][-1]
        macs = elements * k
        dsp = math.ceil(k * n / reuse_factor)
        return LayerResources(layer["name"], "matmul", macs, None, 8, params, 32, dsp, 0, 0, math.ceil(macs / dsp))
    mults, divs = ATTENTION_COSTS.get(layer["op"], (len(ins), 0))            # sum: one requant per term
    lanes = math.ceil(elements / reuse_factor)
    on_chip = elements if layer["op"] == "transpose" else 0       # a transpose buffers its whole input
    if layer["op"] in ("embedding", "constant"):
        table = int(np.prod(layer["weight_shape"]))               # the int8 table itself
    params += 4 * len(layer.get("offset", [])) + 5 * len(layer.get("multipliers", []))
    return LayerResources(layer["name"], layer["op"], 0, None, 8 if out["dtype"] == "int8" else 32,
                          params + table + on_chip, None, lanes * mults, table, lanes * divs,
                          math.ceil(elements / lanes))


def resource_report(spec: dict, weights: dict, reuse_factor: int = 1) -> ResourceReport:
    if isinstance(reuse_factor, bool) or not isinstance(reuse_factor, int) or reuse_factor < 1:
        raise BackendOptionError(f"backend 'fpga-int8': reuse_factor must be a positive integer, got "
                                 f"{reuse_factor!r}", hint="reuse_factor=1 (one multiplier per MAC) or more (fewer, reused)")
    report = ResourceReport(reuse_factor, input_shapes={e["name"]: list(e["shape"]) for e in spec["inputs"]})
    for layer in spec["layers"]:
        if layer["op"] in ATTENTION_OPS:
            report.layers.append(_attention(layer, spec, reuse_factor))
            continue
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
        dsp = math.ceil(mults / reuse_factor)
        report.layers.append(LayerResources(
            layer["name"], layer["op"], macs, wbits, 8 if out["dtype"] == "int8" else 32, param_bytes,
            layer.get("acc_bits"), dsp, cycles=math.ceil(macs / dsp) if dsp else 0))
    return report

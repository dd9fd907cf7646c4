"""RTL of the integer model: synthesizable Verilog-2005, simulated bit-exact, synthesised with open tools.

    cm = fxopt.compile(model, x, pipeline="fold-bn,fake-quant{outputs=true}", backend="fpga-int8",
                       calibration=batches, export_dir="out/", rtl=True, reuse_factor=64)
    report = fxopt.backends.fpga_int8.verify("out/", x, cm)     # + Verilator (and Icarus) vs the simulator
    figures = fxopt.backends.fpga_int8.synth("out/", target="ice40")   # Yosys + nextpnr-ice40

`rtl=True` adds to the export, under rtl/: `fxopt_top.v` (one module per layer, see window.py
and stream.py, and the top that wires their valid / ready streams), the ROM images
`*_w.mem` (weights) and `*_tab.mem` (per channel: bias, requantisation, clamp), the
testbench `tb.v`, and `rtl.json` (the reuse factor and, per layer, its multipliers and a
cycle estimate). The arithmetic is model.json's contract bit for bit: int8 x int8 products,
int32 accumulators, the requantisation of fixedpoint.requantize in either rounding.

Checks and synthesis never read Verilog from the export folder: they generate it again from
the checked model.json, weights and rtl.json, in a private folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from ....errors import FxoptError
from ..model import read_json
from .dense import parallel_design
from .simulate import SIMULATORS, RtlRun, missing_tool, run_rtl
from .top import Design, design as stream_design

RTL_JSON = "rtl/rtl.json"
IO = ("stream", "parallel")
ICARUS_CYCLE_LIMIT = 3_000_000      # Icarus interprets: ~1M cycles of a small design take seconds

__all__ = ["Design", "IO", "RtlCheck", "RtlRun", "SIMULATORS", "check_rtl", "design", "emit_rtl", "rtl_settings",
           "run_rtl"]


def design(spec: dict, weights: dict, reuse_factor: int = 1, io: str = "stream") -> Design:
    """The RTL of the integer model: `io="stream"` moves one element per beat and covers every
    op (top.py); `io="parallel"` moves whole vectors, for fully connected models (dense.py)."""
    if io not in IO:
        raise FxoptError(f"fpga-int8 RTL: io must be one of {IO}, got {io!r}", where="rtl_io",
                         hint="rtl_io='stream' (any model) or 'parallel' (linears over vectors)")
    return parallel_design(spec, weights, reuse_factor) if io == "parallel" else \
        stream_design(spec, weights, reuse_factor)


def emit_rtl(spec: dict, weights: dict, reuse_factor: int = 1, io: str = "stream") -> dict[str, bytes]:
    """{"rtl/<file>": bytes} for the export (generated before anything is written: a layer the
    RTL cannot express is refused by name and no artefact is left half written)."""
    d = design(spec, weights, reuse_factor, io)
    files = {f"rtl/{name}": text.encode() for name, text in d.files.items()}
    facts = {"format": "fxopt-fpga-int8-rtl", "version": 1, "reuse_factor": reuse_factor, "io": io,
             "top": "fxopt_top",
             "multipliers": d.multipliers, "cycle_estimate": d.cycle_estimate, "layers": d.layers}
    files[RTL_JSON] = json.dumps(facts, indent=1).encode()
    return files


def rtl_settings(files: dict[str, str]) -> dict | None:
    """rtl.json of an export, from its checked manifest's files (model.load_export), or None
    when it was exported without rtl."""
    if RTL_JSON not in files:
        return None
    source = files[RTL_JSON]
    facts = read_json(source, source)
    rf = facts.get("reuse_factor") if isinstance(facts, dict) else None
    if isinstance(rf, bool) or not isinstance(rf, int) or rf < 1:
        raise FxoptError(f"{source}: reuse_factor must be a positive integer, got {rf!r}", where=source,
                         hint="the export folder is damaged or was edited; export the model again")
    io = facts.setdefault("io", "stream")
    if io not in IO:
        raise FxoptError(f"{source}: io must be one of {IO}, got {io!r}", where=source,
                         hint="the export folder is damaged or was edited; export the model again")
    return facts


@dataclass
class RtlCheck:
    """The fourth check of verify: the RTL's outputs against the simulator's, per simulator."""
    reuse_factor: int
    multipliers: int
    max_diff: dict[str, int] = field(default_factory=dict)     # simulator -> max |RTL - simulator|
    skipped: dict[str, str] = field(default_factory=dict)      # simulator -> why it did not run
    latency: int | None = None                                  # cycles, first input to last output
    interval: float | None = None                               # cycles between inferences, streaming
    seconds: dict[str, float] = field(default_factory=dict)    # simulator -> build + run
    outputs: np.ndarray | None = field(default=None, repr=False)   # the RTL's output codes, [N, *shape]

    @property
    def exact(self) -> bool:
        return bool(self.max_diff) and all(v == 0 for v in self.max_diff.values())

    def __str__(self) -> str:
        runs = ", ".join(f"{k} {'bit-exact' if v == 0 else f'DIFFERS by up to {v}'} ({self.seconds[k]:.1f} s)"
                         for k, v in self.max_diff.items())
        skips = "".join(f"; {k} not run: {why}" for k, why in self.skipped.items())
        timing = (f"latency {self.latency} cycles, initiation interval "
                  f"{self.interval:.0f} cycles" if self.interval else f"latency {self.latency} cycles")
        return (f"  RTL vs simulator (reuse factor {self.reuse_factor}, {self.multipliers} multipliers): "
                f"{runs or 'not run'}{skips}; {timing}")


def check_rtl(spec: dict, weights: dict, codes: dict, expected: np.ndarray, reuse_factor: int,
              simulators=SIMULATORS, io: str = "stream") -> RtlCheck:
    """Run the RTL on the input codes in each simulator installed; Icarus only where the run is
    short (it interprets), which the check reports."""
    d = design(spec, weights, reuse_factor, io)
    batch = next(iter(codes.values()))
    check = RtlCheck(reuse_factor, d.multipliers)
    for simulator in simulators:
        why = missing_tool(simulator)
        if why is None and simulator == "icarus" and d.cycle_estimate * len(batch) > ICARUS_CYCLE_LIMIT:
            why = (f"~{d.cycle_estimate * len(batch):,} cycles is too long for an interpreting simulator "
                   f"(limit {ICARUS_CYCLE_LIMIT:,})")
        if why:
            check.skipped[simulator] = why
            continue
        run = run_rtl(d, batch, simulator)
        got = run.outputs.reshape(expected.shape)
        check.max_diff[simulator] = int(np.abs(got - expected.astype(np.int64)).max())
        check.seconds[simulator] = run.build_seconds + run.run_seconds
        check.latency, check.interval, check.outputs = run.latency, run.interval, got
    return check

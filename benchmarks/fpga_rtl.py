"""The RTL rows of the fpga suite: generation, simulation and synthesis of the exported Verilog.

Models: the digits CNN (real data: the RTL's accuracy on the 448 held-out images it
simulates) and the jet-tagging-style MLP 16 -> 64 -> 32 -> 32 -> 5 of hls4ml's reference
benchmark (benchmarks.jets, synthetic data with a known answer). Per model, reuse factor
and io (stream: one element per beat between layers; parallel: a whole vector per beat,
hls4ml's io_parallel, fully connected models only), one run:
- generation: the export with rtl=True (model.json, C++ and the RTL), seconds;
- simulation: Verilator build and run on every evaluation input, its outputs against the
  numpy simulator's (bit for bit), cycles per inference (latency of the first) and the
  initiation interval (spacing of the later ones, streaming back to back);
- synthesis: Yosys synth_ice40 + nextpnr-ice40 for an iCE40 UP5K (5,280 LUT4, 8 DSP, 30
  BRAM), or Yosys' generic synth (4-input LUTs; without block RAMs, the weight ROMs and line
  buffers become logic too) where the design is far too big for it.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import fxopt
from fxopt.backends.fpga_int8 import synth
from fxopt.backends.fpga_int8.model import load
from fxopt.backends.fpga_int8.rtl import design, run_rtl
from fxopt.backends.fpga_int8.rtl.simulate import missing_tool
from fxopt.backends.fpga_int8.simulate import quantize_inputs, named_inputs, run_integer

from . import digits, jets

PIPELINE = "fold-bn,fake-quant{outputs=true}"
class Config(NamedTuple):
    model: str
    reuse: int
    target: str | None         # synthesis target, or None
    io: str = "stream"
    pow2: bool = False         # pow2_scales: every requantisation a shift (no requant multipliers)


CONFIGS = [Config("jet_mlp", 1, None), Config("jet_mlp", 64, "generic"), Config("jet_mlp", 256, "ice40"),
           Config("jet_mlp", 1024, "ice40"), Config("jet_mlp", 1, None, "parallel"),
           Config("jet_mlp", 1, None, "parallel", pow2=True), Config("jet_mlp", 4, None, "parallel"),
           Config("jet_mlp", 16, None, "parallel"), Config("jet_mlp", 64, "generic", "parallel"),
           Config("jet_mlp", 256, None, "parallel"), Config("jet_mlp", 1024, "ice40", "parallel"),
           Config("digits_cnn", 32, None), Config("digits_cnn", 4096, "ice40")]
QUICK = [Config("jet_mlp", 1024, "ice40"), Config("jet_mlp", 1024, None, "parallel"),
         Config("digits_cnn", 4096, None)]

def _io_text(config: Config) -> str:
    return config.io + (" + pow2 scales" if config.pow2 else "")


def _task(name: str, quick: bool):
    """(fp32 model, calibration batches, evaluation inputs, labels)."""
    if name == "digits_cnn":
        data = digits.load()
        model = digits.train(data, epochs=4 if quick else 10)
        n = len(data[2]) - len(data[2]) % digits.BATCH
        return model, [data[0][:n], data[0][n:2 * n]], data[2][:n], data[3][:n]
    data = jets.load()
    return jets.train(data), [data[0][:512], data[0][512:1024]], data[2][:512 if quick else 2000], \
        data[3][:512 if quick else 2000]


def bench(config: Config, task, workdir: Path) -> dict:
    model, calib, x, labels = task
    name, reuse, target, io, _ = config
    out = workdir / "export"
    start = time.perf_counter()
    fxopt.compile(model, (x[:64],), pipeline=PIPELINE, backend="fpga-int8", calibration=[(c,) for c in calib],
                  export_dir=out, rtl=True, rtl_io=io, reuse_factor=reuse, pow2_scales=config.pow2, verify=False,
                  instruments=())
    row = {"model": name, "reuse_factor": reuse, "io": _io_text(config), "export_s": time.perf_counter() - start}
    spec, weights = load(out)
    codes = quantize_inputs(spec, named_inputs(spec, x))
    expected = run_integer(spec, weights, codes)[spec["outputs"][0]]
    d = design(spec, weights, reuse, io)
    row["multipliers"] = d.multipliers
    row["requant_multipliers"] = sum(f.get("requant_multipliers", 0) for f in d.layers.values())
    row["rtl_files_bytes"] = sum(len(t) for t in d.files.values())
    if missing_tool("verilator") is None:
        run = run_rtl(d, next(iter(codes.values())), "verilator")
        got = run.outputs.reshape(expected.shape)
        with torch.no_grad():
            fp32 = model(x).argmax(1)
        row.update(verilator_build_s=run.build_seconds, verilator_run_s=run.run_seconds, inputs=len(x),
                   rtl_equals_sim=bool(np.array_equal(got, expected)), latency_cycles=run.latency,
                   interval_cycles=run.interval, acc_fp32=float((fp32 == labels).float().mean()),
                   acc_rtl=float((torch.as_tensor(got).argmax(1) == labels).float().mean()))
    if target:
        figures = synth(out, target=target)
        row["synth"] = {"target": target, "luts": figures.luts, "ffs": figures.flip_flops, "dsps": figures.dsps,
                        "brams": figures.brams, "memory_bits": figures.memory_bits, "fmax_mhz": figures.fmax_mhz,
                        "fits": figures.fits, "problem": figures.problem, "seconds": figures.seconds}
    return row


def run(quick: bool, log=print) -> list[dict]:
    rows, tasks = [], {}
    for config in QUICK if quick else CONFIGS:
        if config.model not in tasks:
            tasks[config.model] = _task(config.model, quick)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                row = bench(config, tasks[config.model], Path(tmp))
            except Exception as exc:  # noqa: BLE001 — a failing run is a result
                row = {"model": config.model, "reuse_factor": config.reuse, "io": _io_text(config),
                       "error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
        log(f"  rtl {config.model} reuse {config.reuse} {row['io']}: "
            f"{row.get('error') or row.get('latency_cycles')} cycles")
    return rows


HEADERS = ["model", "reuse factor", "io", "multipliers", "requant multipliers", "export + RTL s", "Verilator build s",
           "run s", "inputs", "RTL = sim", "acc fp32", "acc RTL", "latency cycles", "interval cycles", "synthesis"]


def table_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["model"], r["reuse_factor"], r.get("io", "stream"), r["error"][:100]]
                       + [""] * (len(HEADERS) - 4))
            continue
        s = r.get("synth")
        if s is None:
            synth_text = "-"
        elif s["target"] == "ice40":
            synth_text = (f"iCE40 UP5K: {s['luts']} LUT4, {s['ffs']} FF, {s['dsps']} DSP, {s['brams']} BRAM; "
                          + (f"routes, fmax {s['fmax_mhz']:.1f} MHz" if s["fits"] else f"does not fit ({s['problem']})")
                          + f" ({s['seconds']:.0f} s)")
        else:
            synth_text = (f"generic: {s['luts']} LUT4, {s['ffs']} FF, {s['dsps']} multipliers, "
                          f"{s['memory_bits']} memory bits ({s['seconds']:.0f} s)")
        out.append([r["model"], r["reuse_factor"], r.get("io", "stream"), r["multipliers"],
                    r.get("requant_multipliers", "-"), f"{r['export_s']:.1f}",
                    f"{r.get('verilator_build_s', float('nan')):.1f}", f"{r.get('verilator_run_s', float('nan')):.1f}",
                    r.get("inputs", "-"), "yes" if r.get("rtl_equals_sim") else "NO",
                    f"{r.get('acc_fp32', float('nan')):.4f}", f"{r.get('acc_rtl', float('nan')):.4f}",
                    r.get("latency_cycles", "-"), f"{r.get('interval_cycles') or 0:.0f}", synth_text])
    return out

"""Synthesis of an export's RTL with open tools: Yosys, and nextpnr-ice40 for Lattice iCE40.

    figures = synth("out/", target="ice40")      # an export written with rtl=True
    print(figures)                                # LUTs, flip-flops, DSPs, block RAMs, fmax, fits?

target "ice40": `synth_ice40 -dsp` (multipliers into SB_MAC16 DSP blocks, memories into
SB_RAM40_4K) and, when the cell counts fit the device, place and route with nextpnr-ice40,
which reports the utilisation and the maximum clock. target "generic": Yosys `synth` and
4-input LUT mapping, no device: LUTs, flip-flops and the multipliers Yosys found before
mapping them to logic (with no block RAM to map to, the line buffers and weight ROMs become
logic too, so these figures bound a device without memory blocks). A design too big for the device is reported with its
numbers (`fits` False, `problem` says what overflows), not raised.

The Verilog is generated again from the checked model.json, weights and rtl.json in a
private folder (nothing from the export folder is read as code).
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import FxoptError
from .model import load_export
from .rtl import design, rtl_settings
from .rtl.simulate import absent, write_design

DEVICES = {"up5k": {"flag": "--up5k", "package": "sg48", "LUT": 5280, "DSP": 8, "BRAM": 30, "IO": 39}}
TARGETS = ("ice40", "generic")


@dataclass
class SynthReport:
    target: str
    device: str | None
    reuse_factor: int
    luts: int = 0
    flip_flops: int = 0
    dsps: int = 0              # SB_MAC16 (ice40); multipliers before mapping (generic)
    brams: int = 0             # SB_RAM40_4K (ice40); memory bits in `memory_bits` (generic)
    memory_bits: int = 0
    fmax_mhz: float | None = None
    fits: bool | None = None
    problem: str | None = None
    port_bits: int = 0         # the top's pins (a parallel-io top takes whole tensors)
    seconds: float = 0.0
    cells: dict = field(default_factory=dict)

    def __str__(self) -> str:
        where = f"{self.target} {self.device}" if self.device else self.target
        if self.target == "ice40":
            caps = DEVICES[self.device]
            body = (f"{self.luts} LUT4 / {caps['LUT']}, {self.flip_flops} FF, {self.dsps} DSP / {caps['DSP']}, "
                    f"{self.brams} BRAM / {caps['BRAM']}")
        else:
            body = (f"{self.luts} LUT4, {self.flip_flops} FF, {self.dsps} multipliers, "
                    f"{self.memory_bits} memory bits")
        clock = f", fmax {self.fmax_mhz:.1f} MHz" if self.fmax_mhz else ""
        verdict = "" if self.fits is None else (" - fits and routes" if self.fits else f" - DOES NOT FIT: {self.problem}")
        return f"synthesised ({where}, reuse factor {self.reuse_factor}, {self.seconds:.0f} s): {body}{clock}{verdict}"


def missing_tools(target: str) -> str | None:
    return absent("yosys", *(["nextpnr-ice40"] if target == "ice40" else []))


def _run(argv, cwd, what, timeout):
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise FxoptError(f"{what} took over {timeout:.0f} s", where=argv[0],
                         hint="synthesise at a larger reuse_factor, or give a longer timeout") from exc


def _counts(stat_file: Path) -> dict:
    stats = json.loads(stat_file.read_text())
    module = stats["modules"].get("\\fxopt_top") or next(iter(stats["modules"].values()))
    return dict(module.get("num_cells_by_type", {})), int(module.get("num_memory_bits", 0))


def _yosys(cwd: Path, target: str, timeout: float) -> tuple[dict, dict, int]:
    """(cells before mapping, cells after, memory bits) from Yosys."""
    if target == "ice40":
        script = ("read_verilog fxopt_top.v; synth_ice40 -dsp -top fxopt_top -json net.json; "
                  "tee -q -o post.json stat -json")
    else:
        script = ("read_verilog fxopt_top.v; synth -top fxopt_top -flatten -run :fine; "
                  "tee -q -o pre.json stat -json; synth -top fxopt_top -flatten -run fine:; abc -lut 4; "
                  "opt_clean; tee -q -o post.json stat -json")
    done = _run(["yosys", "-q", "-p", script], cwd, "yosys", timeout)
    if done.returncode != 0:
        raise FxoptError(f"yosys failed on the generated RTL:\n{(done.stdout + done.stderr)[-3000:]}", where="yosys",
                         hint="a defect of the RTL generator; the log above says where")
    pre, bits = _counts(cwd / "pre.json") if target == "generic" else ({}, 0)
    post, post_bits = _counts(cwd / "post.json")
    return pre, post, bits or post_bits


def _place_and_route(cwd: Path, report: SynthReport, timeout: float) -> None:
    caps = DEVICES[report.device]
    over = [f"{kind} {used} > {caps[kind]}" for kind, used in
            (("LUT", report.luts), ("DSP", report.dsps), ("BRAM", report.brams), ("IO", report.port_bits))
            if used > caps[kind]]
    if over:
        report.fits = False
        report.problem = f"the {report.device} ({caps['package']}) has too few cells or pins: " + ", ".join(over)
        return
    done = _run(["nextpnr-ice40", caps["flag"], "--package", caps["package"], "--json", "net.json",
                 "--pcf-allow-unconstrained", "--report", "report.json", "--asc", "design.asc", "--seed", "1",
                 "--freq", "12"], cwd, "nextpnr-ice40", timeout)
    if done.returncode != 0:
        lines = [ln for ln in (done.stdout + done.stderr).splitlines() if "ERROR" in ln or "error" in ln]
        report.fits, report.problem = False, "; ".join(lines[-3:]) or "nextpnr-ice40 failed"
        return
    placed = json.loads((cwd / "report.json").read_text())
    clocks = [c.get("achieved") for c in placed.get("fmax", {}).values() if c.get("achieved")]
    report.fmax_mhz = min(clocks) if clocks else None
    lc = placed.get("utilization", {}).get("ICESTORM_LC", {})
    report.cells["ICESTORM_LC"] = lc.get("used")
    report.fits = True


def synth(export_dir, target: str = "ice40", device: str = "up5k", timeout: float = 1800) -> SynthReport:
    if target not in TARGETS:
        raise FxoptError(f"synth: unknown target {target!r}", hint=f"one of {TARGETS}")
    if device not in DEVICES:
        raise FxoptError(f"synth: unknown iCE40 device {device!r}", hint=f"one of {tuple(DEVICES)}")
    why = missing_tools(target)
    if why:
        raise FxoptError(f"cannot synthesise for {target}: {why}", where=target, hint="install the tools first")
    spec, weights, files = load_export(export_dir)
    settings = rtl_settings(files)
    if settings is None:
        raise FxoptError(f"{export_dir}: the export has no RTL to synthesise", where=str(export_dir),
                         hint="export with backend='fpga-int8', rtl=True")
    report = SynthReport(target, device if target == "ice40" else None, settings["reuse_factor"])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fxopt-synth-") as tmp:
        cwd = Path(tmp)
        rtl = design(spec, weights, settings["reuse_factor"], settings["io"])
        report.port_bits = rtl.port_bits
        write_design(rtl, cwd)
        pre, post, report.memory_bits = _yosys(cwd, target, timeout)
        report.cells = post
        report.flip_flops = sum(n for cell, n in post.items() if "DFF" in cell.upper())
        if target == "ice40":
            report.luts, report.dsps = post.get("SB_LUT4", 0), post.get("SB_MAC16", 0)
            report.brams = post.get("SB_RAM40_4K", 0)
            _place_and_route(cwd, report, timeout)
        else:
            report.luts = post.get("$lut", 0)
            report.dsps = sum(n for cell, n in pre.items() if cell in ("$mul", "$macc"))
    report.seconds = time.perf_counter() - start
    return report

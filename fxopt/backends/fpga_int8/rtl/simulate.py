"""Run the generated RTL in a Verilog simulator: Verilator (compiled, fast) or Icarus Verilog.

    run = run_rtl(design, codes, simulator="verilator")   # codes: int8 [N, *input shape]
    run.outputs                                           # int [N, *output shape], row-major
    run.latency, run.interval                             # cycles per inference, initiation interval

The design is written to a private temporary folder and built there, so nothing found in an
export folder is ever compiled. The inputs stream back to back; latency is the first sample's
cycles from its first input to its last output, the initiation interval the mean spacing of
the later samples' last outputs (the steady-state throughput).
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ....errors import FxoptError
from .top import Design

SIMULATORS = ("verilator", "icarus")
TOOLS = {"verilator": "verilator", "icarus": "iverilog"}


class RtlSimulationError(FxoptError, RuntimeError):
    """The simulator could not build or finish the design."""


@dataclass
class RtlRun:
    simulator: str
    outputs: np.ndarray
    latency: int
    interval: float | None
    build_seconds: float
    run_seconds: float


def absent(*tools: str) -> str | None:
    """Which of the Debian-packaged `tools` are not on PATH, as a reason to show, or None."""
    missing = [t for t in tools if shutil.which(t) is None]
    return f"{', '.join(missing)} not installed (apt-get install {' '.join(missing)})" if missing else None


def missing_tool(simulator: str) -> str | None:
    """Why `simulator` cannot run here, or None."""
    return absent(TOOLS[simulator])


def write_design(d: Design, folder) -> None:
    for name, text in d.files.items():
        Path(folder, name).write_text(text)


def _hex_inputs(d: Design, codes: np.ndarray) -> str:
    flat = np.asarray(codes, dtype=np.int64).reshape(len(codes), -1)[:, d.input_perm]
    return "\n".join(f"{v & 0xFF:02x}" for v in flat.reshape(-1)) + "\n"


def _command(simulator: str, cwd: Path, samples: int, stall: bool) -> list[list[str]]:
    sources = ["tb.v", "fxopt_top.v"]
    if simulator == "verilator":
        return [["verilator", "--binary", "--timing", "-j", "2", "-Wno-fatal", "-Wno-lint", "-Wno-style",
                 "--top-module", "tb", f"-GN={samples}", f"-GSTALL={int(stall)}", "--Mdir", "obj", "-o", "sim",
                 *sources], [str(cwd / "obj" / "sim")]]
    return [["iverilog", "-g2005", "-s", "tb", "-P", f"tb.N={samples}", "-P", f"tb.STALL={int(stall)}",
             "-o", "sim.vvp", *sources], ["vvp", "-n", "sim.vvp"]]


def _call(argv: list[str], cwd: Path, what: str, timeout: float) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RtlSimulationError(f"{what} took over {timeout:.0f} s", where=argv[0],
                                 hint="simulate fewer inputs, or a larger reuse_factor") from exc
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RtlSimulationError(f"{what} failed (exit {done.returncode}):\n{tail}", where=argv[0],
                                 hint="this is a defect of the RTL generator; the log above says where")
    return done.stdout


def run_rtl(d: Design, codes, simulator: str = "verilator", stall: bool = False, timeout: float = 600) -> RtlRun:
    if simulator not in SIMULATORS:
        raise FxoptError(f"unknown simulator {simulator!r}", hint=f"one of {SIMULATORS}")
    why = missing_tool(simulator)
    if why:
        raise RtlSimulationError(f"cannot simulate the RTL: {why}", where=simulator,
                                 hint="install it, or verify without rtl")
    codes = np.asarray(codes)
    samples = len(codes)
    with tempfile.TemporaryDirectory(prefix="fxopt-rtl-") as tmp:
        cwd = Path(tmp)
        write_design(d, cwd)
        (cwd / "inputs.hex").write_text(_hex_inputs(d, codes))
        build, execute = _command(simulator, cwd, samples, stall)
        start = time.perf_counter()
        _call(build, cwd, f"{simulator} build", timeout)
        built = time.perf_counter()
        log = _call(execute, cwd, f"{simulator} run", timeout)
        ran = time.perf_counter()
        if "STALLED" in log:
            raise RtlSimulationError(f"the RTL stopped moving: {log.strip().splitlines()[-1]}", where="fxopt_top",
                                     hint="this is a defect of the RTL generator (a handshake deadlock)")
        values = np.array((cwd / "outputs.txt").read_text().split(), dtype=np.int64)
        events = [line.split() for line in (cwd / "cycles.txt").read_text().splitlines()]
    if values.size != samples * d.output_size:
        raise RtlSimulationError(f"the RTL gave {values.size} output elements for {samples} samples of "
                                 f"{d.output_size}", where="fxopt_top", hint="a defect of the RTL generator")
    stream = values.reshape(samples, -1)
    outputs = np.empty_like(stream)
    outputs[:, d.output_perm] = stream
    first_in = {int(s): int(c) for kind, s, c in events if kind == "in"}
    last_out = {int(s): int(c) for kind, s, c in events if kind == "out"}
    ends = [last_out[s] for s in range(samples)]
    interval = (ends[-1] - ends[0]) / (samples - 1) if samples > 1 else None
    return RtlRun(simulator, outputs, ends[0] - first_in[0] + 1, interval, built - start, ran - built)

"""xla: FX -> StableHLO (torch-mlir) -> compiled and run by XLA (jax's PJRT client).

    cm = fxopt.compile(model, x, pipeline="fold-bn,canonicalize,dce", backend="xla")
    cm = fxopt.compile(model, x, backend="xla", export_dir="out/resnet18")   # + the artefact
    print(cm.report.xla)

The graph becomes `main(*weights, *inputs)` (see `stablehlo`: XLA rejects weights
frozen into the program), compiled once for the example inputs' shapes; the
lowered module keeps the weights on the device and takes and returns torch
tensors in the model's structure (see `runner`). `export_dir` also writes a folder
that runs with jax alone, no torch or fxopt (see `artefact`).

Options:
- `export_dir`: write the artefact there (a new or empty folder, or an earlier artefact).
- `device`: None or "cpu" (jax's CPU client), "tpu" (jax's TPU client, on a host
  with jax[tpu]; not tested in CI, which has no TPU).

Needs `pip install fxopt[xla]` (jax[cpu] and torch-mlir); jax and torch-mlir are
imported only when the backend is used.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field

import torch.fx as fx

from ...errors import UnsupportedError
from .. import register_backend

__all__ = ["XlaBackend", "XlaReport"]

INSTALL = "needs `pip install fxopt[xla]` (jax[cpu] and torch-mlir; jax[tpu] on a TPU host)"
_REQUIRED = ("jax", "jax.extend.backend", "torch_mlir.fx")


@dataclass
class XlaReport:
    """What the xla backend built: the device, the program's size and arguments, and
    seconds per phase (export: torch.export of the functional graph; stablehlo:
    torch-mlir's lowering; compile: XLA's; write: the artefact)."""

    device: str = "cpu"
    weights: int = 0
    inputs: int = 0
    outputs: int = 0
    stablehlo_chars: int = 0
    x64: bool = False
    export_dir: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"device": self.device, "weights": self.weights, "inputs": self.inputs,
                "outputs": self.outputs, "stablehlo_chars": self.stablehlo_chars, "x64": self.x64,
                "export_dir": self.export_dir, "seconds": dict(self.seconds)}

    def __str__(self) -> str:
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
        where = f"; artefact in {self.export_dir}" if self.export_dir else ""
        return (f"xla ({self.device}): main({self.weights} weights, {self.inputs} inputs) -> "
                f"{self.outputs} outputs, {self.stablehlo_chars} chars of StableHLO"
                f"{', x64' if self.x64 else ''}; {phases}{where}")


class XlaBackend:
    name = "xla"

    def lower(self, gm: fx.GraphModule, example_inputs: tuple, export_dir=None, device: str | None = None,
              **options):
        if options:
            raise UnsupportedError(f"backend 'xla' takes only the options 'export_dir' and 'device', "
                                   f"got {sorted(options)}",
                                   hint="e.g. backend='xla', export_dir='out/model', device='cpu'")
        from .artefact import check_export_dir, write_artefact
        from .runner import XlaModule, xla_client
        from .stablehlo import export_stablehlo

        xla_client(device)  # an unknown or absent device fails before the export's work
        if export_dir is not None:
            export_dir = check_export_dir(export_dir)
        program = export_stablehlo(gm, tuple(example_inputs))
        start = time.perf_counter()
        module = XlaModule(program, device)
        seconds = {**program.seconds, "compile": time.perf_counter() - start}
        if export_dir is not None:
            start = time.perf_counter()
            write_artefact(program, export_dir)
            seconds["write"] = time.perf_counter() - start
        report = XlaReport(device=module.device_name, weights=len(program.weights),
                           inputs=len(program.inputs), outputs=len(program.outputs),
                           stablehlo_chars=len(program.text), x64=program.x64,
                           export_dir=export_dir, seconds=seconds)
        module.xla_report = report
        module.report_sections = {"xla": report}  # compiled.report.xla
        return module.eval()

    def available(self) -> str | None:
        for name in _REQUIRED:
            try:
                importlib.import_module(name)
            except ImportError:
                return INSTALL
            except Exception as exc:  # noqa: BLE001 - installed but broken (e.g. an ABI mismatch)
                return f"{INSTALL}; importing {name} failed: {type(exc).__name__}: {exc}"
        return None


register_backend(XlaBackend())

"""xla: FX -> StableHLO (torch-mlir) -> compiled and run by XLA (jax's PJRT client).

    cm = fxopt.compile(model, x, pipeline="fold-bn,canonicalize,dce", backend="xla")
    cm = fxopt.compile(model, x, backend="xla", export_dir="out/resnet18")   # + the artefact
    print(cm.report.xla)

The graph becomes `main(*weights, *inputs)` (see `stablehlo`: XLA rejects weights
frozen into the program), compiled for the example inputs' shapes and, at the
first call with other sizes along the graph's dynamic dims (by default the batch),
once more for those (an executable cached per distinct shape: XLA programs are
static); the lowered module keeps the weights on the device and takes and
returns torch tensors in the model's structure (see `runner`). `export_dir` also writes a folder
that runs with jax alone, no torch or fxopt (see `artefact`).

Options: `XlaOptions` (`fxopt backends` lists them).

Needs `pip install fxopt[xla]` (jax[cpu] and torch-mlir); jax and torch-mlir are
imported only when the backend is used.
"""
from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx as fx

from .. import BackendOptions, register_backend
from .artefact import check_export_dir, write_artefact
from .runner import Device, XlaModule, xla_client
from .stablehlo import export_stablehlo

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
    shapes_compiled: list = field(default_factory=list)   # input shapes with an executable

    def to_dict(self) -> dict:
        return {"device": self.device, "weights": self.weights, "inputs": self.inputs,
                "outputs": self.outputs, "stablehlo_chars": self.stablehlo_chars, "x64": self.x64,
                "export_dir": self.export_dir, "seconds": dict(self.seconds),
                "shapes_compiled": list(self.shapes_compiled)}

    def __str__(self) -> str:
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
        where = f"; artefact in {self.export_dir}" if self.export_dir else ""
        return (f"xla ({self.device}): main({self.weights} weights, {self.inputs} inputs) -> "
                f"{self.outputs} outputs, {self.stablehlo_chars} chars of StableHLO"
                f"{', x64' if self.x64 else ''}; {phases}{where}; "
                f"{len(self.shapes_compiled)} input shapes compiled")


@dataclass(frozen=True)
class XlaOptions(BackendOptions):
    """export_dir: write the artefact there, a folder that runs with jax alone (a new or empty
        folder, or an earlier artefact); none: write nothing.
    device: cpu (jax's CPU client) | tpu (jax's TPU client, on a host with jax[tpu]; not
        tested in CI, which has no TPU); none: cpu.
    """

    export_dir: str | os.PathLike | None = None
    device: Device | None = None

    owner_name: ClassVar[str] = "backend 'xla'"


class XlaBackend:
    name = "xla"
    Options = XlaOptions

    def lower(self, gm: fx.GraphModule, example_inputs: tuple, **options):
        opts = XlaOptions.from_kwargs(options)
        export_dir, device = opts.export_dir, opts.device
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
        per_shape = XlaPerShape(gm, module, report)
        per_shape.xla_report = report
        per_shape.report_sections = {"xla": report}  # compiled.report.xla
        return per_shape.eval()

    def available(self) -> str | None:
        for name in _REQUIRED:
            try:
                importlib.import_module(name)
            except ImportError:
                return INSTALL
            except Exception as exc:  # noqa: BLE001 - installed but broken (e.g. an ABI mismatch)
                return f"{INSTALL}; importing {name} failed: {type(exc).__name__}: {exc}"
        return None


class XlaPerShape(torch.nn.Module):
    """The lowered model: one XLA executable per distinct input shape, compiled at the first
    call with that shape (the caller has checked that only dynamic dims differ). The
    graph's weights as they are at that first call are the ones compiled in."""

    def __init__(self, gm: fx.GraphModule, first, report: XlaReport):
        super().__init__()
        self.__dict__["_graph"] = gm            # not a submodule: the CompiledModel holds it
        self.program = first.program
        self._device_name = None if report.device == "cpu" else report.device
        self._executables = {_key(first.program.inputs): first}
        report.shapes_compiled.append(_text(_key(first.program.inputs)))
        self._report = report

    def forward(self, *args):
        flat = [x for x in torch.utils._pytree.tree_leaves(args) if isinstance(x, torch.Tensor)]
        key = tuple((tuple(x.shape), x.dtype) for x in flat)
        if key not in self._executables:
            program = export_stablehlo(self._graph, tuple(args))
            self._executables[key] = XlaModule(program, self._device_name)
            self._report.shapes_compiled.append(_text(key))
        return self._executables[key](*args)


def _key(inputs) -> tuple:
    return tuple((tuple(shape), dtype) for shape, dtype in inputs)


def _text(key: tuple) -> str:
    return ", ".join(f"{str(dtype).removeprefix('torch.')}{list(shape)}" for shape, dtype in key)


register_backend(XlaBackend())

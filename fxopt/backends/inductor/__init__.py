"""inductor: hand the rewritten graph to TorchInductor (Triton on CUDA, C++/OpenMP on CPU).

    cm = fxopt.compile(model, x, pipeline="fold-bn,canonicalize,dce", backend="inductor")
    cm = fxopt.compile(model, x, pipeline="fold-bn,fake-quant", calibration=batches,
                       backend="inductor", mode="max-autotune")      # int8 matmuls on CUDA
    print(cm.report.inductor)

The graph is compiled with `torch.compile(graph, backend="inductor", mode=..., dynamic=...)`
and run once on the example inputs at lower time, so a compile error surfaces in
`fxopt.compile`, not at the first call.

Fake-quantized linears become real int8 matmuls (`int8_matmul`, default on CUDA):
`linear(FQ_act(x), FQ_weight(W), b)` with 8-bit quantizers (per-tensor activation,
symmetric per-channel or per-tensor weight) turns into

    q   = round(clamp(x / s_x + z_x, qmin, qmax)) - shift        int8 codes of x
    acc = torch._int_mm(q, Wq^T) - z'_x * colsum(Wq)              exact int32
    y   = acc * (s_x * s_w) + b                                   one fused epilogue

where `shift` moves an unsigned (affine) grid onto int8 and z'_x = z_x - shift, so
zero points cost one precomputed int32 vector. This is the fake-quant result up to
float rounding (the integer part is exact). A linear that does not fit the form or
`_int_mm`'s shape limits (CUDA: rows > 16, K and N multiples of 8) stays fake-quant;
the report lists it with the reason.

2:4 sparse linears (`sparse_2to4`, default on CUDA; off on CPU, where torch has no
semi-structured kernel): an `aten.linear` whose constant 2-D weight has at most 2 nonzeros
in every group of 4 along its input dim (what `prune-weights{pattern=2:4}` leaves), with
fp16 / bf16 inputs and weight on CUDA, reads `torch.sparse.to_sparse_semi_structured(W)`
instead of W. A weight torch cannot compress (shape limits) stays dense; the report says why.

Options: `InductorOptions` (`fxopt backends` lists them).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
import typing
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...quant import quantizers_in
from .. import BackendOptions, register_backend
from ...ir.inputs import resized_inputs
from ...ir.meta import INPUT_SHAPES, TensorInfo
from .int8_matmul import Int8Matmuls, int8_matmul_shape_note
from .package import check_package_path, write_package
from .sparse24 import SemiStructured24

__all__ = ["MODES", "InductorBackend", "InductorModule", "InductorReport", "SemiStructured24",
           "int8_matmul_shape_note"]

aten = torch.ops.aten
Mode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
MODES = typing.get_args(Mode)


@dataclass(frozen=True)
class InductorOptions(BackendOptions):
    """mode: torch.compile's mode: default | reduce-overhead | max-autotune |
        max-autotune-no-cudagraphs.
    dynamic: none: the dims the graph was traced with as dynamic (by default the batch) are
        compiled symbolic, so other batch sizes do not recompile; true | false: as
        torch.compile's own option.
    int8_matmul: run the linears of a calibrated fake-quant graph on torch._int_mm; none:
        on CUDA only.
    sparse_2to4: run linears whose weights are 2:4 sparse on semi-structured sparse
        kernels; none: on CUDA only.
    package_path: also write an AOTInductor package (a .pt2 file) there (see package.py);
        none: write nothing.
    """

    mode: Mode = "default"
    dynamic: bool | None = None
    int8_matmul: bool | None = None
    sparse_2to4: bool | None = None
    package_path: str | os.PathLike | None = None

    owner_name: ClassVar[str] = "backend 'inductor'"


@dataclass
class InductorReport:
    """What the inductor backend did: int8_matmuls (node, "MxK @ KxN") run on torch._int_mm;
    fake_quant (node, reason) linears with quantizers left in simulated (fake-quant) form;
    sparse_2to4 (node, shape and kind) linears on semi-structured sparse weights; dense_2to4
    (node, reason) linears with a 2:4 weight left dense."""

    device: str = "cpu"
    mode: str = "default"
    dynamic: bool | None = None
    package_path: str | None = None
    compile_seconds: float = 0.0
    int8_matmuls: list[tuple[str, str]] = field(default_factory=list)
    fake_quant: list[tuple[str, str]] = field(default_factory=list)
    sparse_2to4: list[tuple[str, str]] = field(default_factory=list)
    dense_2to4: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"device": self.device, "mode": self.mode, "dynamic": self.dynamic,
                "package_path": self.package_path,
                "compile_seconds": round(self.compile_seconds, 3),
                "int8_matmuls": [list(x) for x in self.int8_matmuls],
                "fake_quant": [list(x) for x in self.fake_quant],
                "sparse_2to4": [list(x) for x in self.sparse_2to4], "dense_2to4": [list(x) for x in self.dense_2to4]}

    def __str__(self) -> str:
        lines = [f"inductor ({self.device}, mode={self.mode}, dynamic={self.dynamic}): compiled in "
                 f"{self.compile_seconds:.1f} s; {len(self.int8_matmuls)} linears on int8 matmuls "
                 f"(torch._int_mm), {len(self.fake_quant)} left fake-quant"]
        lines += [f"  fake-quant  {name}: {reason}" for name, reason in self.fake_quant]
        lines += [f"  2:4 sparse  {name}: {shape}" for name, shape in self.sparse_2to4]
        lines += [f"  2:4 dense   {name}: {reason}" for name, reason in self.dense_2to4]
        if self.package_path:
            lines.append(f"  AOTInductor package: {self.package_path}")
        return "\n".join(lines)


class InductorModule(torch.nn.Module):
    """The lowered model: `graph_module` is the graph handed to inductor (with the int8
    rewrites), `inductor_report` what was done; calling it runs inductor's code."""

    def __init__(self, graph_module: fx.GraphModule, compiled, report: InductorReport):
        super().__init__()
        self.graph_module = graph_module
        self.__dict__["_compiled"] = compiled     # not a submodule: its weights are graph_module's
        self.inductor_report = report
        self.report_sections = {"inductor": report}   # compiled.report.inductor

    def forward(self, *args, **kwargs):
        return self._compiled(*args, **kwargs)


class InductorBackend:
    name = "inductor"

    Options = InductorOptions

    def lower(self, gm: fx.GraphModule, example_inputs: tuple, **options):
        return self._lower(gm, example_inputs, InductorOptions.from_kwargs(options))

    def _lower(self, gm: fx.GraphModule, example_inputs: tuple, opts: InductorOptions):
        mode, dynamic, package_path = opts.mode, opts.dynamic, opts.package_path
        if package_path is not None:
            package_path = check_package_path(package_path)
        device = _device_of(gm, example_inputs)
        report = InductorReport(device=device.type, mode=mode, dynamic=dynamic)
        graph = _shallow_copy(gm)   # rewrites go to a copy that shares gm's weights
        if opts.int8_matmul if opts.int8_matmul is not None else device.type == "cuda":
            Int8Matmuls(graph, device, report).run()
        if opts.sparse_2to4 if opts.sparse_2to4 is not None else device.type == "cuda":
            SemiStructured24(graph, device, report).run()
        compiled = torch.compile(graph, backend="inductor", mode=None if mode == "default" else mode,
                                 dynamic=dynamic)
        start = time.perf_counter()
        try:
            _warm_up(compiled, graph, _warm_up_inputs(graph, example_inputs, dynamic))
        except UnsupportedError as exc:   # inductor failed on the sparse weights: lower them dense
            if not report.sparse_2to4:
                raise
            dense = self._lower(gm, example_inputs, dataclasses.replace(opts, sparse_2to4=False))
            dense.inductor_report.dense_2to4 = [(n, f"inductor failed: {exc.message}") for n, _ in report.sparse_2to4]
            return dense
        report.compile_seconds = time.perf_counter() - start
        if package_path is not None:
            report.package_path = write_package(graph, example_inputs, package_path)
        return InductorModule(graph, compiled, report).eval()

    def available(self) -> str | None:
        return _missing()


@functools.lru_cache(maxsize=1)
def _missing() -> str | None:
    """Why inductor cannot run here (None: it can). Its CPU path compiles C++, so it needs a
    compiler; on CUDA, Triton writes the kernels."""
    try:
        from torch._inductor import cpp_builder
    except Exception as exc:  # noqa: BLE001 - any import failure means no inductor
        return f"torch._inductor does not import in this PyTorch build ({type(exc).__name__}: {exc})"
    try:
        cpp_builder.get_cpp_compiler()
        return None
    except Exception:  # noqa: BLE001 - inductor raises its own InvalidCxxCompiler
        if torch.cuda.is_available() and _has_triton():
            return None
        return ("needs a C++ compiler for inductor's CPU path (g++ or clang++ on PATH, or CXX=...), "
                "e.g. `apt-get install g++`")


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _device_of(gm: fx.GraphModule, example_inputs: tuple) -> torch.device:
    """Where the model runs: the first tensor input's device, else the first weight's."""
    for x in torch.utils._pytree.tree_leaves(example_inputs):
        if isinstance(x, torch.Tensor):
            return x.device
    return next((p.device for p in gm.parameters()), torch.device("cpu"))


def _shallow_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of gm's graph and gm's own modules and weights (not copied):
    the backend adds its int8 buffers and nodes here and leaves the user's graph alone."""
    graph = fx.Graph()
    graph.set_codegen(gm.graph._codegen)      # keeps the model's (pytree) input / output form
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    return copy


def _warm_up_inputs(graph: fx.GraphModule, example_inputs: tuple, dynamic) -> tuple:
    """The inputs of the first call. With `dynamic=None` the graph's dynamic dims are marked
    so (on inputs one larger along them: a size-1 dim cannot be marked), and inductor
    compiles them symbolic once instead of once per batch size."""
    if dynamic is not None:
        return tuple(example_inputs)
    inputs = resized_inputs(graph, tuple(example_inputs), {})
    if inputs is None:
        return tuple(example_inputs)
    for x, info in zip(inputs, graph.meta.get(INPUT_SHAPES, ())):
        if isinstance(x, torch.Tensor) and isinstance(info, TensorInfo):
            for dim in info.dynamic:
                torch._dynamo.mark_dynamic(x, dim)
    return inputs


def _warm_up(compiled, graph: fx.GraphModule, example_inputs: tuple) -> None:
    """Run the compiled graph once, so inductor compiles now. Quantizers still observing
    would record the example inputs: their state is put back afterwards."""
    observing = [m for m in quantizers_in(graph) if m.observing]
    saved = [[(b, b.clone()) for b in m.buffers()] for m in observing]   # observers keep state in buffers
    try:
        with torch.no_grad():
            compiled(*example_inputs)
    except Exception as exc:  # noqa: BLE001 - inductor's own errors are long; say what failed and what to do
        inner = getattr(exc, "inner_exception", None) or exc      # dynamo wraps inductor's error
        message = str(inner).strip().splitlines()
        raise UnsupportedError(f"backend 'inductor' could not compile the graph: {type(inner).__name__}: "
                               f"{message[0] if message else ''}",
                               hint="run with backend='eager' to check the graph itself; "
                                    "TORCHDYNAMO_VERBOSE=1 shows inductor's stack") from exc
    finally:
        with torch.no_grad():
            for buffer, value in (pair for pairs in saved for pair in pairs):
                buffer.copy_(value)


register_backend(InductorBackend())

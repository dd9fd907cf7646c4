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

Options: `mode` (MODES), `dynamic` (True / False / None, as torch.compile),
`int8_matmul` (None: on when the example inputs are on CUDA).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import UnsupportedError
from ..ir.graph import fetch_attr
from ..ir.meta import TENSOR
from ..quant import FakeQuantize, quantize
from . import register_backend

__all__ = ["MODES", "InductorBackend", "InductorModule", "InductorReport", "int8_matmul_shape_note"]

aten = torch.ops.aten
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_OPTIONS = ("mode", "dynamic", "int8_matmul")


@dataclass
class InductorReport:
    """What the inductor backend did: int8_matmuls (node, "MxK @ KxN") run on torch._int_mm;
    fake_quant (node, reason) linears with quantizers left in simulated (fake-quant) form."""

    device: str = "cpu"
    mode: str = "default"
    dynamic: bool | None = False
    compile_seconds: float = 0.0
    int8_matmuls: list[tuple[str, str]] = field(default_factory=list)
    fake_quant: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"device": self.device, "mode": self.mode, "dynamic": self.dynamic,
                "compile_seconds": round(self.compile_seconds, 3),
                "int8_matmuls": [list(x) for x in self.int8_matmuls],
                "fake_quant": [list(x) for x in self.fake_quant]}

    def __str__(self) -> str:
        lines = [f"inductor ({self.device}, mode={self.mode}, dynamic={self.dynamic}): compiled in "
                 f"{self.compile_seconds:.1f} s; {len(self.int8_matmuls)} linears on int8 matmuls "
                 f"(torch._int_mm), {len(self.fake_quant)} left fake-quant"]
        lines += [f"  fake-quant  {name}: {reason}" for name, reason in self.fake_quant]
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

    def forward(self, *args):
        return self._compiled(*args)


class InductorBackend:
    name = "inductor"

    def lower(self, gm: fx.GraphModule, example_inputs: tuple, mode: str = "default",
              dynamic: bool | None = False, int8_matmul: bool | None = None, **options):
        _check_options(mode, dynamic, int8_matmul, options)
        device = _device_of(gm, example_inputs)
        report = InductorReport(device=device.type, mode=mode, dynamic=dynamic)
        graph = _shallow_copy(gm)   # rewrites go to a copy that shares gm's weights
        if int8_matmul if int8_matmul is not None else device.type == "cuda":
            Int8Matmuls(graph, device, report).run()
        compiled = torch.compile(graph, backend="inductor", mode=None if mode == "default" else mode,
                                 dynamic=dynamic)
        start = time.perf_counter()
        _warm_up(compiled, graph, example_inputs)
        report.compile_seconds = time.perf_counter() - start
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


def _check_options(mode, dynamic, int8_matmul, options: dict) -> None:
    if options:
        raise UnsupportedError(f"backend 'inductor' got unknown options {sorted(options)}",
                               hint=f"its options are {', '.join(_OPTIONS)}, e.g. backend='inductor', "
                                    "mode='max-autotune'")
    if mode not in MODES:
        raise UnsupportedError(f"backend 'inductor': unknown mode {mode!r}",
                               hint=f"use one of {', '.join(MODES)}")
    for key, value in (("dynamic", dynamic), ("int8_matmul", int8_matmul)):
        if value is not None and not isinstance(value, bool):
            raise UnsupportedError(f"backend 'inductor': {key} must be True, False or None, got {value!r}")


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


def _warm_up(compiled, graph: fx.GraphModule, example_inputs: tuple) -> None:
    """Run the compiled graph once, so inductor compiles now. Quantizers still observing
    would record the example inputs: their state is put back afterwards."""
    observing = [m for m in graph.modules() if isinstance(m, FakeQuantize) and m.observing]
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


def int8_matmul_shape_note(rows: int, k: int, n: int, device: torch.device) -> str | None:
    """Why torch._int_mm cannot take an (rows x k) @ (k x n) product on `device` (None: it can).
    CUDA's kernel (cuBLASLt) wants more than 16 rows and k, n multiples of 8; the CPU one
    takes any shape."""
    if device.type != "cuda":
        return None
    if rows <= 16:
        return f"torch._int_mm on CUDA needs more than 16 rows, got {rows}"
    if k % 8 or n % 8:
        return f"torch._int_mm on CUDA needs K and N multiples of 8, got K={k}, N={n}"
    return None


@dataclass(frozen=True)
class _Match:
    """One fake-quantized linear: its nodes and quantizers."""

    node: fx.Node
    x: fx.Node
    act: FakeQuantize
    weight: torch.Tensor
    wq: FakeQuantize
    bias: fx.Node | None


class Int8Matmuls:
    """Rewrites every fitting fake-quantized aten.linear of `graph` in place (see module doc)."""

    def __init__(self, graph: fx.GraphModule, device: torch.device, report: InductorReport):
        self.gm, self.device, self.report = graph, device, report
        self.codes: dict[fx.Node, fx.Node] = {}    # activation quantizer node -> its int8 codes

    def run(self) -> None:
        for node in list(self.gm.graph.nodes):
            if node.op == "call_function" and node.target is aten.linear.default:
                match, reason = self._match(node)
                if match is not None:
                    self._rewrite(match)
                elif reason is not None:
                    self.report.fake_quant.append((node.name, reason))
        self.gm.graph.lint()
        self.gm.recompile()

    def _fq(self, node) -> FakeQuantize | None:
        if isinstance(node, fx.Node) and node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            return mod if isinstance(mod, FakeQuantize) else None
        return None

    def _match(self, node: fx.Node) -> tuple[_Match | None, str | None]:
        """(match, None), or (None, why not) for a quantized linear, or (None, None) for a float one."""
        x_node, w_node = node.args[0], node.args[1]
        act, wq = self._fq(x_node), self._fq(w_node)
        if act is None and wq is None:
            return None, None
        if act is None or wq is None or act.role != "activation" or wq.role != "weight":
            return None, "only one operand is fake-quantized"
        if act.observing:
            return None, "its activation quantizer is not frozen (calibrate and freeze first)"
        if act.bits != 8 or wq.bits != 8 or act.axis is not None:
            return None, "needs 8-bit quantizers and a per-tensor activation"
        if not wq.symmetric or wq.axis not in (None, 0):
            return None, "needs a symmetric weight quantizer, per tensor or per output channel"
        source = w_node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "get_attr"):
            return None, "its weight is not a constant"
        weight = fetch_attr(self.gm, source.target)
        info = x_node.meta.get(TENSOR)
        if weight.dim() != 2 or info is None or not info.shape:
            return None, "needs a 2-D weight and a known input shape"
        rows = info.numel // max(info.shape[-1], 1)
        note = int8_matmul_shape_note(rows, weight.shape[1], weight.shape[0], self.device)
        if note is not None:
            return None, note
        bias = node.args[2] if len(node.args) > 2 else None
        return _Match(node, x_node.args[0], act, weight.detach(), wq, bias), None

    def _buffer(self, base: str, value: torch.Tensor) -> fx.Node:
        name = f"int8_mm_{base}"
        i = 0
        while hasattr(self.gm, name):
            i += 1
            name = f"int8_mm_{base}_{i}"
        self.gm.register_buffer(name, value.to(self.device))
        return self.gm.graph.get_attr(name)

    def _codes(self, m: _Match, k: int) -> fx.Node:
        """The (rows x K) int8 codes of the linear's input, made once per activation quantizer
        (q, k and v projections share theirs), on the quantizer's grid shifted onto int8."""
        act_node = m.node.args[0]
        if act_node in self.codes:
            return self.codes[act_node]
        act, g = m.act, self.gm.graph
        s_x, z_x = float(act.scale.reshape(-1)[0]), int(act.zero_point.reshape(-1)[0])
        with g.inserting_before(m.node):
            t = g.call_function(aten.div.Tensor, (m.x, s_x))
            if z_x:
                t = g.call_function(aten.add.Tensor, (t, z_x))
            t = g.call_function(aten.round.default, (g.call_function(aten.clamp.default, (t, act.qmin, act.qmax)),))
            if _shift(act):
                t = g.call_function(aten.sub.Tensor, (t, _shift(act)))
            q = g.call_function(aten._to_copy.default, (t,), {"dtype": torch.int8})
            if len(act_node.meta[TENSOR].shape) != 2:
                q = g.call_function(aten.reshape.default, (q, [-1, k]))
        self.codes[act_node] = q
        return q

    def _rewrite(self, m: _Match) -> None:
        act, info = m.act, m.node.args[0].meta[TENSOR]
        s_x, zp = float(act.scale.reshape(-1)[0]), int(act.zero_point.reshape(-1)[0]) - _shift(act)
        codes = quantize(m.weight.float(), m.wq.scale, m.wq.zero_point, m.wq.spec)   # (N, K) int32
        n, k = codes.shape
        q = self._codes(m, k)
        g, name = self.gm.graph, m.node.name
        with g.inserting_before(m.node):
            w_t = self._buffer(f"{name}_weight_t", codes.to(torch.int8).t().contiguous())   # (K, N)
            acc = g.call_function(aten._int_mm.default, (q, w_t))
            if zp:   # sum_k (q - zp) w = q @ w - zp * colsum(w): exact in int32
                colsum = (zp * codes.sum(dim=1)).to(torch.int32)
                acc = g.call_function(aten.sub.Tensor, (acc, self._buffer(f"{name}_zp_colsum", colsum)))
            y = g.call_function(aten._to_copy.default, (acc,), {"dtype": torch.float32})
            scales = (s_x * m.wq.scale.float()).expand(n).contiguous()                # s_x * s_w[c]
            y = g.call_function(aten.mul.Tensor, (y, self._buffer(f"{name}_scale", scales)))
            if m.bias is not None:
                y = g.call_function(aten.add.Tensor, (y, m.bias))
            if len(info.shape) != 2:
                y = g.call_function(aten.reshape.default, (y, [-1, *info.shape[1:-1], n]))
            out = m.node.meta.get(TENSOR)
            if out is not None and out.dtype != torch.float32:
                y = g.call_function(aten._to_copy.default, (y,), {"dtype": out.dtype})
        y.meta[TENSOR] = m.node.meta.get(TENSOR)
        m.node.replace_all_uses_with(y)
        quantizers = list(m.node.args[:2])
        g.erase_node(m.node)
        for old in quantizers:                      # the quantizers, and the weight, if now unused
            _erase_if_unused(g, old)
        self.report.int8_matmuls.append((name, f"{info.numel // k}x{k} @ {k}x{n}"))


def _shift(act: FakeQuantize) -> int:
    """What moves the activation grid onto int8: 128 for an unsigned (affine) 8-bit grid."""
    return 128 if act.qmin >= 0 else 0


def _erase_if_unused(graph: fx.Graph, node: fx.Node) -> None:
    if node.users or node.op not in ("call_module", "get_attr"):
        return
    inputs = [a for a in node.all_input_nodes]
    graph.erase_node(node)
    for a in inputs:
        _erase_if_unused(graph, a)


register_backend(InductorBackend())

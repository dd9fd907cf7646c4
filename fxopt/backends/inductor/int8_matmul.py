"""Fake-quantized linears as real int8 matmuls (torch._int_mm); see the package docstring."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from ...ir.graph import fetch_attr, fresh_attr_name
from ...ir.meta import TENSOR
from ...quant import FakeQuantize, quantize, quantizer_of
from .graph_edits import _erase_if_unused

if TYPE_CHECKING:
    from . import InductorReport

aten = torch.ops.aten


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

    def _match(self, node: fx.Node) -> tuple[_Match | None, str | None]:
        """(match, None), or (None, why not) for a quantized linear, or (None, None) for a float one."""
        x_node, w_node = node.args[0], node.args[1]
        act, wq = quantizer_of(self.gm, x_node), quantizer_of(self.gm, w_node)
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
        name = fresh_attr_name(self.gm, f"int8_mm_{base}")
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

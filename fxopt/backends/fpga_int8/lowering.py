"""Lower a calibrated fake-quant GraphModule to an IntegerModel (integer-only, see model.py).

One walk over the graph in order. Each value becomes a tensor of int8 codes on a grid
(scale, zero point, range) or of int32 accumulators (per-channel scale):

- a producer (conv, linear, add, concat, avg-pool) writes int8 codes on the grid of the
  activation quantizer that reads its result: found by following single users through
  clamps (ReLU, ReLU6, hardtanh, clamp: fused into the output's clamp bounds when they
  come first) and value-preserving ops (max-pool, flatten, reshape, dropout, which
  commute with a monotone quantizer and so then run on codes);
- with no such quantizer (e.g. a conv before a global average pool, or the last linear)
  it keeps int32 accumulators, which only avg-pool, max-pool, reshapes and the model
  output read;
- an activation quantizer on codes of another grid becomes a requantize layer; on a
  model input it defines the input's quantization (the host-side float step).

Anything else, or an op reading a value that has no integer form, is an UnsupportedError
naming the node and its source line: the model never gets a silent float island.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import fetch_attr, node_location
from ...ir.meta import TENSOR
from ...quant import FakeQuantize
from .model import IntegerModel, Layer
from .ops_joins import LayerBuilder

aten = torch.ops.aten

CLAMPS = {aten.relu.default, aten.relu_.default, aten.relu6.default, aten.hardtanh.default,
          aten.hardtanh_.default, aten.clamp.default, aten.clamp_.default, torch.relu}
MOVES = {aten.max_pool2d.default, aten.flatten.using_ints, aten.reshape.default, aten.view.default,
         aten._unsafe_view.default, aten.dropout.default, aten.clone.default, aten.contiguous.default,
         aten.alias.default, aten.detach.default, torch.flatten}
CONVS = {aten.conv2d.default, aten.convolution.default}
ADDS = {aten.add.Tensor, aten.add_.Tensor, operator.add, operator.iadd, torch.add}
CATS = {aten.cat.default, torch.cat}
AVG_POOLS = {aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default, aten.mean.dim}
RESHAPES = {aten.flatten.using_ints, aten.reshape.default, aten.view.default, aten._unsafe_view.default,
            torch.flatten}
ALIASES = {aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
           aten.detach.default}


@dataclass(frozen=True)
class Grid:
    """An int8 grid: real = scale * (q - zero_point), q in [qmin, qmax]."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @classmethod
    def of(cls, fq: FakeQuantize, node: fx.Node) -> "Grid":
        if fq.bits > 8 or fq.axis is not None:
            raise UnsupportedError(
                f"fpga-int8: activation quantizer {fq.label or node.name} is {fq.bits}-bit "
                f"{'per-channel' if fq.axis is not None else 'per-tensor'}; the export holds per-tensor "
                "activations of at most 8 bits", where=node_location(node),
                hint="use fake-quant{act_bits=8} (the default)")
        offset = -128 if fq.qmax > 127 else 0           # unsigned 8-bit codes stored as int8
        return cls(float(fq.scale.reshape(-1)[0]), int(fq.zero_point.reshape(-1)[0]) + offset,
                   fq.qmin + offset, fq.qmax + offset)

    def code(self, real: float) -> int:
        return int(min(max(self.zero_point + round(real / self.scale), self.qmin), self.qmax))

    def tensor(self, shape, source: str) -> dict:
        return {"dtype": "int8", "shape": list(shape), "source": source, "scale": self.scale,
                "zero_point": self.zero_point, "qmin": self.qmin, "qmax": self.qmax}


@dataclass
class OutputForm:
    """Where a producer's result goes: codes on `grid` (None: int32) within real [lo, hi]."""

    grid: Grid | None
    lo: float
    hi: float
    last: fx.Node        # the last fused clamp (or the producer): whose value the tensor holds


def quantizer_of(gm: fx.GraphModule, node, role: str) -> FakeQuantize | None:
    """The FakeQuantize a call_module node runs, if it has this role ("weight" / "activation")."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, FakeQuantize) and mod.role == role:
            return mod
    return None


def clamp_range(node: fx.Node) -> tuple[float, float]:
    """The real interval a ReLU / ReLU6 / hardtanh / clamp node keeps."""
    if node.target in (aten.relu.default, aten.relu_.default, torch.relu):
        return 0.0, math.inf
    if node.target == aten.relu6.default:
        return 0.0, 6.0
    hardtanh = node.target in (aten.hardtanh.default, aten.hardtanh_.default)
    names, defaults = (("min_val", "max_val"), (-1.0, 1.0)) if hardtanh else (("min", "max"), (None, None))
    args = list(node.args[1:3])
    lo, hi = (args[i] if i < len(args) else node.kwargs.get(names[i], defaults[i]) for i in range(2))
    return (-math.inf if lo is None else float(lo)), (math.inf if hi is None else float(hi))


class Lowering:
    """`Lowering(gm, rounding, pow2_scales).run()` -> IntegerModel."""

    def __init__(self, gm: fx.GraphModule, rounding: str, pow2_scales: bool):
        self.gm = gm
        self.model = IntegerModel(rounding=rounding, pow2_scales=pow2_scales)
        self.values: dict[fx.Node, str] = {}       # node -> tensor name holding its value
        self.fused: set[fx.Node] = set()            # clamps folded into their producer
        self.build = LayerBuilder(self)

    # ---- queries --------------------------------------------------------------------------
    def act_fq(self, node) -> FakeQuantize | None:
        return quantizer_of(self.gm, node, "activation")

    def weight_fq(self, node) -> FakeQuantize | None:
        return quantizer_of(self.gm, node, "weight")

    def tensor(self, node: fx.Node, reader: fx.Node) -> tuple[str, dict]:
        """(name, tensor record) of a value an op reads; an error if it has no integer form."""
        if node not in self.values:
            raise UnsupportedError(
                f"fpga-int8: {reader.name} reads {node.name}, which has no integer form "
                "(a float value: nothing quantizes it)", where=node_location(reader),
                hint="every op of an integer-only model must read quantized values: quantize the "
                     "producer's result (fake-quant), or skip this part of the model")
        name = self.values[node]
        return name, self.model.tensors[name]

    def output_form(self, node: fx.Node) -> OutputForm:
        """Follow single users from a producer to the activation quantizer that reads it."""
        lo, hi, cur, last, fusing = -math.inf, math.inf, node, node, True
        while True:
            quantizers = [u for u in cur.users if self.act_fq(u) is not None]
            if quantizers:
                grids = {Grid.of(self.act_fq(q), q) for q in quantizers}
                if len(grids) == 1:
                    return OutputForm(grids.pop(), lo, hi, last)
                return OutputForm(None, lo, hi, last)
            if len(cur.users) != 1:
                return OutputForm(None, lo, hi, last)
            user = next(iter(cur.users))
            if user.op != "call_function" or not user.args or user.args[0] is not cur:
                return OutputForm(None, lo, hi, last)
            if user.target in CLAMPS and fusing:
                ulo, uhi = clamp_range(user)
                lo, hi, last = max(lo, ulo), min(hi, uhi), user
                self.fused.add(user)
            elif user.target in MOVES:
                fusing = False       # a clamp after a move runs on its own (its value differs)
            else:
                return OutputForm(None, lo, hi, last)
            cur = user

    def shape(self, node: fx.Node) -> list[int]:
        info = node.meta.get(TENSOR)
        if info is None or isinstance(info, (tuple, list)):
            raise UnsupportedError(f"fpga-int8: no single tensor shape recorded for {node.name}",
                                   where=node_location(node), hint="trace the model with fxopt.compile")
        return list(info.shape[1:])

    def constant(self, node) -> torch.Tensor | None:
        if node is None:
            return None
        if isinstance(node, fx.Node) and node.op == "get_attr":
            return fetch_attr(self.gm, node.target).detach()
        raise UnsupportedError(f"fpga-int8: {node} is not a constant parameter",
                               where=node_location(node) if isinstance(node, fx.Node) else None)

    # ---- building ---------------------------------------------------------------------------
    def emit(self, node: fx.Node, op: str, inputs: list[str], tensor: dict, fields: dict,
             weight: np.ndarray | None = None) -> str:
        name = node.name
        self.model.tensors[name] = tensor
        self.model.layers.append(Layer(name, op, inputs, name, fields, weight))
        self.values[node] = name
        return name

    def run(self) -> IntegerModel:
        for node in self.gm.graph.nodes:
            if node.op in ("get_attr", "placeholder") or self.weight_fq(node) is not None:
                continue
            if node.op == "output":
                self._outputs(node)
            elif node.op == "call_module" and node.target == "_guards_fn":
                continue
            elif node in self.fused or node.target in ALIASES:
                self.values[node] = self.tensor(node.args[0], node)[0]
            elif self.act_fq(node) is not None:
                self.build.quantizer(node)
            elif node.target in CONVS or node.target == aten.linear.default:
                self.build.conv_or_linear(node)
            elif node.target in ADDS:
                self.build.add(node)
            elif node.target in CATS:
                self.build.concat(node)
            elif node.target == aten.max_pool2d.default:
                self.build.max_pool(node)
            elif node.target in AVG_POOLS:
                self.build.avg_pool(node)
            elif node.target in RESHAPES:
                self.build.reshape(node)
            elif node.target in CLAMPS:
                self.build.clamp(node)
            else:
                raise UnsupportedError(
                    f"fpga-int8: {getattr(node.target, '__name__', node.target)} has no integer form in "
                    "this export", where=node_location(node),
                    hint="supported: conv2d (incl. grouped / depthwise), linear, add, cat, max / avg / "
                         "adaptive-avg pooling, mean over H, W, flatten / reshape, ReLU / ReLU6 / hardtanh "
                         "/ clamp; replace the op or keep it out of the exported model")
        return self.model

    def _outputs(self, node: fx.Node) -> None:
        outs = node.args[0]
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        for out in outs:
            if not isinstance(out, fx.Node):
                raise UnsupportedError("fpga-int8: the model returns a non-tensor value",
                                       where=node_location(node), hint="return tensors only")
            self.model.outputs.append(self.tensor(out, node)[0])

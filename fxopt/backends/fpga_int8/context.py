"""What the lowering's walk knows so far, and the questions every op handler asks it.

`LoweringContext` holds the fake-quant graph, the integer model built so far, which
tensor holds each node's value and which clamps were fused into their producer. Its
queries (the quantizer a node runs, a value's tensor record, a node's shape, a constant
parameter, where a producer's result goes) and `emit` (add a layer) are the whole
interface between the walk (lowering.py) and the op-family handlers (ops_*.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import fetch_attr, node_location
from ...ir.meta import TENSOR
from ...quant import FakeQuantize, quantizer_of
from ...quant.integer_modules import IntegerOp, integer_op_of
from .grid import Grid, OutputForm, clamp_range
from .model import IntegerModel, Layer
from .evaluate import constant_value
from .targets import CLAMPS, MOVES, SIZE_READS


class LoweringContext:
    """The graph being lowered, the IntegerModel being built, and the node -> tensor map."""

    def __init__(self, gm: fx.GraphModule, rounding: str, pow2_scales: bool):
        self.gm = gm
        self.model = IntegerModel(rounding=rounding, pow2_scales=pow2_scales)
        self.values: dict[fx.Node, str] = {}       # node -> tensor name holding its value
        self.fused: set[fx.Node] = set()            # clamps folded into their producer
        self.constants: dict[fx.Node, np.ndarray] = {}   # constant_of's values, evaluated once
        self.deferred: set[fx.Node] = set()         # adds that the add reading them absorbs
        self.varying = _input_dependent(gm)         # nodes whose value depends on an input's values

    # ---- queries --------------------------------------------------------------------------
    def act_fq(self, node) -> FakeQuantize | None:
        """The activation quantizer `node` runs, if any."""
        return quantizer_of(self.gm, node, "activation")

    def weight_fq(self, node) -> FakeQuantize | None:
        """The weight quantizer `node` runs, if any."""
        return quantizer_of(self.gm, node, "weight")

    def integer_op(self, node) -> IntegerOp | None:
        """The integer op (softmax, GELU, LayerNorm, table) `node` runs, if any."""
        return integer_op_of(self.gm, node)

    def reads_grid(self, user: fx.Node, value: fx.Node) -> bool:
        """Whether `user` is an integer op reading `value` as its first operand (on its input grid)."""
        return self.integer_op(user) is not None and bool(user.args) and user.args[0] is value

    def reader_grid(self, user: fx.Node) -> Grid:
        """The grid a quantizer or an integer op reads its operand on."""
        op = self.integer_op(user)
        return Grid.of(self.act_fq(user), user) if op is None else Grid.of_integer_op(op.in_grid())

    def is_constant(self, value) -> bool:
        """A number, or a parameter or value computed from parameters alone (no input's values)."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        return isinstance(value, fx.Node) and value.op in ("get_attr", "call_function") and value not in self.varying

    def constant_of(self, value) -> np.ndarray:
        """The real value of a constant as evaluate.constant_value gives it (a number as it is)."""
        if not isinstance(value, fx.Node):
            return np.asarray(float(value))
        if value not in self.constants:
            self.constants[value] = constant_value(self.gm, value)
        return self.constants[value]

    def tensor(self, node: fx.Node, reader: fx.Node) -> tuple[str, dict]:
        """(name, tensor record) of a value an op reads; an error if it has no integer form."""
        if self.is_constant(node) or node in self.deferred:
            raise UnsupportedError(
                f"fpga-int8: {reader.name} reads {getattr(node, 'name', node)}, a constant or a partial sum that "
                "only an add can take", where=node_location(reader), hint="add the value to a model value first")
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
            quantizers = [u for u in cur.users if self.act_fq(u) is not None or self.reads_grid(u, cur)]
            if quantizers:
                grids = {self.reader_grid(q) for q in quantizers}
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
        """The per-sample shape (no batch dimension) the trace recorded for `node`."""
        info = node.meta.get(TENSOR)
        if info is None or isinstance(info, (tuple, list)):
            raise UnsupportedError(f"fpga-int8: no single tensor shape recorded for {node.name}",
                                   where=node_location(node), hint="trace the model with fxopt.compile")
        return list(info.shape[1:])

    def constant(self, node) -> torch.Tensor | None:
        """The parameter a get_attr node reads (None for None); an error for anything else."""
        if node is None:
            return None
        if isinstance(node, fx.Node) and node.op == "get_attr":
            return fetch_attr(self.gm, node.target).detach()
        raise UnsupportedError(f"fpga-int8: {node} is not a constant parameter",
                               where=node_location(node) if isinstance(node, fx.Node) else None)

    # ---- building ---------------------------------------------------------------------------
    def emit(self, node: fx.Node, op: str, inputs: list[str], tensor: dict, fields: dict,
             weight: np.ndarray | None = None) -> str:
        """Add the layer computing `node` (named after it) and its output tensor; its name."""
        name = node.name
        self.model.tensors[name] = tensor
        self.model.layers.append(Layer(name, op, inputs, name, fields, weight))
        self.values[node] = name
        return name



def _input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose values depend on a model input's values (not only on its sizes)."""
    varying: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or (node.target not in SIZE_READS
                                        and any(a in varying for a in node.all_input_nodes)):
            varying.add(node)
    return varying

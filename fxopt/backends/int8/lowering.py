"""Rewrite a calibrated fake-quant graph into a graph of int8 kernels.

The walk visits the fake-quant graph once, in order, and builds a new graph. Each
value of the old graph may exist in the new one as float, as int8 codes on a
known grid, or both; each form is made on first demand, so a value becomes int8
exactly where an int8 op reads it and float exactly where a float op does:

- an activation FakeQuantize `q = FQ(x)` costs nothing when `x` already comes as
  codes on FQ's grid; otherwise its int8 form is a Quantize of x, and its float
  form the FakeQuantize itself (the fake-quant semantics, unchanged);
- conv2d / linear whose activation and weight operands are FakeQuantized become
  int8 kernels. Their output grid is the one of the activation quantizer that
  reads the result: found by following the only user through value-preserving
  ops (relu, max-pool, reshape, ... which commute with a monotone quantizer, so
  they then run on codes); a ReLU right after the op is fused into the kernel.
  With no such quantizer the result is produced in float32 by a oneDNN kernel;
- add / cat joins whose inputs are codes on one grid become int8 add / cat when
  a quantizer reads their result, else they add / concatenate dequantized values;
- every other op is copied as it is and reads float (a Dequantize is inserted
  where its input exists only as codes), and is listed in the report.

Rewritten this way the int8 model computes what the fake-quant model computes,
up to the kernels' rounding of int32 accumulations.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ...ir.graph import fetch_attr, fresh_name
from ...ir.meta import TENSOR
from ...ir.nodes import arg, target_name
from ...ir.registry import OpRegistry
from ...quant import FakeQuantize, quantizer_of
from . import kernels as K
from .report import Int8Report

aten = torch.ops.aten

# ops that run on codes unchanged in meaning (monotone or data movement); in-place -> functional
CODE_OPS = {
    aten.relu.default: aten.relu.default, aten.relu_.default: aten.relu.default,
    aten.hardtanh.default: aten.hardtanh.default, aten.hardtanh_.default: aten.hardtanh.default,
    aten.max_pool2d.default: aten.max_pool2d.default, aten.flatten.using_ints: aten.flatten.using_ints,
    aten.reshape.default: aten.reshape.default, aten.view.default: aten.reshape.default,
    aten._unsafe_view.default: aten.reshape.default, aten.permute.default: aten.permute.default,
    aten.transpose.int: aten.transpose.int, aten.contiguous.default: aten.contiguous.default,
    aten.clone.default: aten.clone.default, aten.squeeze.dim: aten.squeeze.dim,
    aten.unsqueeze.default: aten.unsqueeze.default, torch.flatten: torch.flatten,
    aten.dropout.default: None,   # identity in eval (train=False); None: skip the op
}
RELUS = {aten.relu.default, aten.relu_.default, torch.relu, torch.nn.functional.relu}
ADDS = {aten.add.Tensor, aten.add_.Tensor, operator.add, operator.iadd, torch.add}
CATS = {aten.cat.default, torch.cat}
CONVS = {aten.conv2d.default, aten.convolution.default}
MATMULS = {aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default,
           torch.matmul, operator.matmul}
# target -> Lowering method(self, node) -> bool: emitted an int8 form (False: copy as float)
LOWERINGS = OpRegistry("int8 lowering")


class Lowering:
    """One walk over a fake-quant GraphModule; `run()` returns (GraphModule, Int8Report)."""

    def __init__(self, gm: fx.GraphModule, engine: str):
        self.gm, self.engine = gm, engine
        self.graph = fx.Graph()
        self.graph.set_codegen(gm.graph._codegen)   # keeps the model's (pytree) input / output form
        self.root: dict = {}
        self.flo: dict[fx.Node, fx.Node] = {}                  # old node -> new float node
        self.codes: dict[fx.Node, tuple[fx.Node, K.Grid]] = {}  # old node -> (new node, grid)
        self.fused: set[fx.Node] = set()                       # old nodes folded into a kernel
        self.report = Int8Report(engine=engine)

    # ---- helpers ------------------------------------------------------------------
    def fq(self, node) -> FakeQuantize | None:
        return quantizer_of(self.gm, node)

    def act_fq(self, node):
        return quantizer_of(self.gm, node, "activation")

    def _module(self, base: str, module: torch.nn.Module) -> str:
        name = fresh_name(f"int8.{base}", self.root)
        self.root[name] = module
        return name

    def _call(self, base: str, module, args: tuple, like: fx.Node | None = None) -> fx.Node:
        node = self.graph.call_module(self._module(base, module), args)
        if like is not None:
            node.meta[TENSOR] = like.meta.get(TENSOR)
        return node

    def _copy(self, node: fx.Node) -> fx.Node:
        """`node` as it is, reading float inputs."""
        if node.op in ("call_module", "get_attr"):
            obj = self.gm.get_submodule(node.target) if node.op == "call_module" else fetch_attr(self.gm, node.target)
            self.root[node.target] = obj
        new = self.graph.node_copy(node, self.float_of)
        self.flo[node] = new
        return new

    # ---- the two forms of a value -----------------------------------------------------
    def float_of(self, node: fx.Node) -> fx.Node:
        """The new graph's float form of old `node` (made now if it does not exist yet)."""
        if node in self.flo:
            return self.flo[node]
        if node in self.codes:
            new, _ = self.codes[node]
            self.flo[node] = self._call("dequantize", K.Dequantize(), (new,), node)
            self.report.dequantize += 1
            return self.flo[node]
        mod = self.act_fq(node)
        source = node.args[0] if mod is not None else None
        if source in self.codes and K.act_unsupported(mod) is None and self.codes[source][1] == K.Grid.of(mod):
            return self.float_of_codes(node)  # already on the quantizer's grid: no second rounding
        return self._copy(node)   # weights, weight quantizers and activation quantizers: lazily

    def float_of_codes(self, node: fx.Node) -> fx.Node:
        self.codes_of(node)
        return self.float_of(node)

    def codes_of(self, node: fx.Node) -> tuple[fx.Node, K.Grid]:
        """The int8 form of an activation-quantizer node: codes on its grid."""
        if node in self.codes:
            return self.codes[node]
        grid = K.Grid.of(self.act_fq(node))
        source = node.args[0]
        if source in self.codes and self.codes[source][1] == grid:
            self.codes[node] = self.codes[source]
        else:
            self.report.quantize += 1
            q = self._call("quantize", K.Quantize(grid), (self.float_of(source),), node)
            self.codes[node] = (q, grid)
        return self.codes[node]

    def output_grid(self, node: fx.Node) -> tuple[K.Grid | None, bool]:
        """The grid `node`'s result is next quantized to, if all of it flows to one activation
        quantizer (directly or through code ops); and whether a ReLU follows it at once."""
        users = list(node.users)
        mods = [self.act_fq(u) for u in users]
        if users and all(m is not None and K.act_unsupported(m) is None for m in mods):
            grids = {K.Grid.of(m) for m in mods}
            return (grids.pop(), False) if len(grids) == 1 else (None, False)
        if len(users) == 1 and users[0].op == "call_function" and users[0].args[0] is node \
                and (users[0].target in CODE_OPS or users[0].target in RELUS) and not _is_training_dropout(users[0]):
            grid, _ = self.output_grid(users[0])
            return grid, grid is not None and users[0].target in RELUS
        return None, False

    # ---- rewriting ------------------------------------------------------------------
    def run(self) -> tuple[fx.GraphModule, Int8Report]:
        for node in self.gm.graph.nodes:
            if node in self.fused or node.op == "get_attr" or self.fq(node) is not None:
                continue   # made on demand
            if node.op == "output":
                self.graph.output(fx.node.map_arg(node.args[0], self.float_of))
            elif node.op != "call_function" or not self._lower(node):
                self._copy(node)
                self._note_float(node)
        self.graph.lint()
        return fx.GraphModule(self.root, self.graph, class_name="Int8GraphModule"), self.report

    def _lower(self, node: fx.Node) -> bool:
        """Emit an int8 form of `node`; False: it has none (the caller copies it as float)."""
        lower = LOWERINGS.lookup(node.target)
        return lower is not None and lower(self, node)

    def _operands(self, node: fx.Node) -> str | tuple:
        """(activation quantizer, weight quantizer, weight, bias) of a conv / linear, or why not."""
        x, w = node.args[0], node.args[1]
        bias = arg(node, 2, "bias")
        act, wfq = self.act_fq(x), self.fq(w)
        if act is None or wfq is None or wfq.role != "weight" or w.args[0].op != "get_attr":
            return "operands not fake-quantized (run fake-quant before lowering to int8)"
        why = K.act_unsupported(act) or K.weight_unsupported(wfq)
        if why:
            return why
        if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr"):
            return "bias is not a constant"
        bias_t = fetch_attr(self.gm, bias.target).detach().float() if bias is not None else None
        return act, wfq, fetch_attr(self.gm, w.args[0].target), bias_t

    @LOWERINGS.register(*CONVS, aten.linear.default)
    def _lower_dense(self, node: fx.Node) -> bool:
        conv = node.target in CONVS
        if conv and not _conv2d_args(node):
            self.report.add_float(node, "no int8 kernel for this convolution (only 2-D, not transposed)")
            return False
        operands = self._operands(node)
        if isinstance(operands, str):
            self.report.add_float(node, operands)
            return False
        act, wfq, weight, bias = operands
        x_codes, x_grid = self.codes_of(node.args[0])
        qweight = K.int8_weight(weight, wfq)
        out, relu = self.output_grid(node)
        with K.engine(self.engine):
            if out is None:
                module = (K.QConv2dToFloat(qweight, bias, _conv2d_args(node), x_grid, node.args[0].meta[TENSOR].shape)
                          if conv else K.QLinearToFloat(qweight, bias, x_grid))
            else:
                module = (K.QConv2d(qweight, bias, _conv2d_args(node), out, relu) if conv
                          else K.QLinear(qweight, bias, out, relu))
        new = self._call(node.name, module, (x_codes,), node)
        self._result(node, new, out, relu)
        self.report.int8_ops.append((node.name, type(module).__name__))
        return True

    def _result(self, node: fx.Node, new: fx.Node, out: K.Grid | None, relu: bool) -> None:
        if out is None:
            self.flo[node] = new
            return
        self.codes[node] = (new, out)
        if relu:   # the ReLU ran inside the kernel: its node is the kernel's result
            (user,) = node.users
            self.codes[user] = (new, out)
            self.fused.add(user)

    @LOWERINGS.register(*ADDS)
    def _lower_add(self, node: fx.Node) -> bool:
        args = node.args[:2]
        alpha = arg(node, 2, "alpha", 1)
        if alpha != 1 or not all(self.act_fq(a) is not None and K.act_unsupported(self.act_fq(a)) is None
                                 for a in args):
            return False
        out, relu = self.output_grid(node)
        if out is None:
            self.report.add_float(node, "join read only in float: adds dequantized values")
            return False
        a, b = (self.codes_of(x)[0] for x in args)
        new = self._call(node.name, K.QAdd(out, relu), (a, b), node)
        self._result(node, new, out, relu)
        self.report.int8_ops.append((node.name, "QAdd"))
        return True

    @LOWERINGS.register(*CATS)
    def _lower_cat(self, node: fx.Node) -> bool:
        values = node.args[0]
        dim = arg(node, 1, "dim", 0)
        if not all(self.act_fq(a) is not None and K.act_unsupported(self.act_fq(a)) is None for a in values):
            return False
        out, _ = self.output_grid(node)
        if out is None:
            self.report.add_float(node, "join read only in float: concatenates dequantized values")
            return False
        new = self._call(node.name, K.QCat(dim, out), tuple(self.codes_of(a)[0] for a in values), node)
        self._result(node, new, out, False)
        self.report.int8_ops.append((node.name, "QCat"))
        return True

    @LOWERINGS.register(*CODE_OPS)
    def _lower_code_op(self, node: fx.Node) -> bool:
        """A value-preserving op on an input that exists as codes runs on the codes."""
        source = node.args[0]
        if source not in self.codes or _is_training_dropout(node):
            return False
        src_new, grid = self.codes[source]
        target = CODE_OPS[node.target]
        if target is None:
            self.codes[node] = (src_new, grid)
            return True
        args = (src_new,) + tuple(fx.node.map_arg(node.args[1:], self.float_of))
        new = self.graph.call_function(target, args, fx.node.map_arg(node.kwargs, self.float_of))
        new.meta[TENSOR] = node.meta.get(TENSOR)
        self.codes[node] = (new, grid)
        return True

    def _note_float(self, node: fx.Node) -> None:
        """Record a compute op that runs in float (shape reads and the guard are not compute)."""
        if node.op not in ("call_function", "call_method") or node.meta.get(TENSOR) is None:
            return
        if any(name == node.name for name, _ in self.report.float_ops):
            return
        if node.target in MATMULS:
            reason = "no int8 kernel for matmul in this backend: runs in float on dequantized operands"
        elif node.target in CODE_OPS or node.target in RELUS:
            reason = "value-preserving op on a float input"
        else:
            reason = f"no int8 kernel for {target_name(node)}: runs in float"
        self.report.add_float(node, reason)


def _is_training_dropout(node: fx.Node) -> bool:
    return node.target == aten.dropout.default and bool(node.args[2] if len(node.args) > 2 else False)


def _conv2d_args(node: fx.Node) -> K.ConvArgs | None:
    """Stride, padding, dilation, groups of a 2-D, non-transposed conv node (None otherwise)."""
    weight_info = node.args[1].meta.get(TENSOR) if isinstance(node.args[1], fx.Node) else None
    if weight_info is None or len(weight_info.shape) != 4:
        return None
    args = list(node.args) + [None] * 9
    if node.target == aten.convolution.default:
        if args[6]:
            return None
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
    else:
        stride, padding, dilation, groups = args[3], args[4], args[5], args[6]
        if isinstance(padding, str):
            return None
    pair = lambda v, d: list(v) * (2 // len(v)) if isinstance(v, (list, tuple)) else [v if v is not None else d] * 2  # noqa: E731
    return K.ConvArgs(pair(stride or 1, 1), pair(padding or 0, 0), pair(dilation or 1, 1), int(groups or 1))

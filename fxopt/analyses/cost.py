"""Cost: parameters, MACs, other arithmetic and bytes moved, per node and in total.

MACs count the multiply-accumulates of contractions (conv, linear, matmul,
attention) — the figure papers publish. `flops` counts the other arithmetic,
one per output element per elementary op (norms 4, softmax 3, pooling the
window). Bytes are what an op reads (inputs, weights included) and writes;
views and shape ops move nothing. The rules are an OpRegistry keyed by op name
(`op_kind`); ops not in it count zero and are listed in `CostTable.unknown`, so
nothing is silently guessed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..ir.graph import fetch_attr
from ..ir.meta import TENSOR, TensorInfo, tensor_info
from ..ir.nodes import op_name
from ..ir.registry import OpRegistry
from ..pm.analysis import Analysis, AnalysisManager
from ..pm.instruments import Instrument
from ..quant import FakeQuantize
from .shapes import Shapes


@dataclass
class NodeCost:
    params: int = 0
    macs: int = 0
    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


@dataclass
class CostTable:
    """Per-node costs, totals and the ops the table does not know."""

    nodes: dict[str, NodeCost] = field(default_factory=dict)
    params: int = 0
    unknown: list[str] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return sum(c.macs for c in self.nodes.values())

    @property
    def flops(self) -> int:
        return sum(c.flops for c in self.nodes.values())

    @property
    def bytes_read(self) -> int:
        return sum(c.bytes_read for c in self.nodes.values())

    @property
    def bytes_written(self) -> int:
        return sum(c.bytes_written for c in self.nodes.values())

    def to_dict(self) -> dict:
        return {"params": self.params, "macs": self.macs, "flops": self.flops,
                "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "unknown": list(self.unknown)}


def _window(args, index: int, dims: int) -> int:
    """Product of a pooling kernel argument (int or list) over `dims` dims."""
    k = args[index] if len(args) > index else 1
    k = list(k) if isinstance(k, (list, tuple)) else [k] * dims
    return math.prod(k) if len(k) == dims else math.prod(k) ** (dims // max(len(k), 1))


RULES = OpRegistry("cost")   # op_kind name -> rule(node, ins, out) -> (macs, flops)


@RULES.register("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                "conv_transpose3d", "_convolution")
def _conv(node, ins, out):
    weight = ins[1]
    transposed = node.args[6] if op_name(node) == "convolution" and len(node.args) > 6 else False
    if "transpose" in op_name(node) or transposed:
        return ins[0].numel * math.prod(weight.shape[1:]), 0
    return out.numel * math.prod(weight.shape[1:]), 0


@RULES.register("linear")
def _linear(node, ins, out):
    return out.numel * ins[1].shape[-1], 0


@RULES.register("mm", "bmm", "matmul", "addmm", "baddbmm", "addbmm")
def _matmul(node, ins, out):
    a = ins[1] if op_name(node) in ("addmm", "baddbmm", "addbmm") else ins[0]
    return out.numel * (a.shape[-1] if a.shape else 1), 0


@RULES.register("scaled_dot_product_attention")
def _attention(node, ins, out):
    q, k, v = ins[:3]
    batch = math.prod(q.shape[:-2])
    length, source = q.shape[-2], k.shape[-2]
    return batch * length * source * (q.shape[-1] + v.shape[-1]), 3 * batch * length * source


@RULES.register("einsum")
def _einsum(node, ins, out):
    """A contraction of 2+ operands: one MAC per point of the loop nest over every index
    (per extra operand); one operand (a transpose or a sum) is one op per input element."""
    operands = [tensor_info(a) for a in node.args[1]] if len(node.args) > 1 else []
    if any(o is None for o in operands):
        return 0, 0
    if len(operands) < 2:
        return 0, sum(o.numel for o in operands)
    sizes: dict = {}
    specs = node.args[0].replace(" ", "").split("->")[0].split(",")
    for spec, info in zip(specs, operands):
        head, _, tail = spec.partition("...")
        ellipsis = len(info.shape) - len(head) - len(tail) if "..." in spec else 0
        keys = list(head) + [("...", ellipsis - i) for i in range(ellipsis)] + list(tail)
        for key, size in zip(keys, info.shape):  # broadcast dims (size 1) take the other size
            sizes[key] = max(sizes.get(key, 1), size)
    return math.prod(sizes.values()) * (len(operands) - 1), 0


def _per_output(weight: int):
    return lambda node, ins, out: (0, weight * out.numel)


def _per_input(node, ins, out):
    return 0, ins[0].numel


def _pool(dims: int):
    return lambda node, ins, out: (0, out.numel * _window(node.args, 1, dims))


_ELEMENTWISE = """abs add sub mul div neg relu relu6 gelu sigmoid tanh silu hardtanh hardswish
hardsigmoid leaky_relu elu selu mish softplus clamp clamp_min clamp_max exp log pow sqrt rsqrt
reciprocal where masked_fill erf sin cos maximum minimum prelu eq ne lt le gt ge logical_not
bitwise_not floor ceil round sign truediv floordiv iadd imul to _to_copy type_as float
log_sigmoid glu square and or xor bitwise_and bitwise_or bitwise_xor logical_and logical_or
logical_xor diff""".split()
_FREE = """view reshape flatten unflatten permute transpose t unsqueeze squeeze expand expand_as
slice select getitem split split_with_sizes chunk unbind dropout feature_dropout alpha_dropout
identity detach alias lift_fresh_copy sym_size size dim numel _assert_tensor_metadata
_assert_scalar sym_constrain_range_for_size contiguous _guards_fn unsafe_view as_strided
_unsafe_view narrow movedim squeeze_copy view_as swapaxes swapdims""".split()
_MOVES = "cat stack clone copy embedding gather index index_select pad constant_pad_nd roll repeat " \
         "arange zeros ones full zeros_like ones_like full_like new_zeros new_ones empty tril triu " \
         "masked_select scatter index_put fill zero".split()

RULES.register("batch_norm", "layer_norm", "group_norm", "instance_norm",
               "_native_batch_norm_legit_no_training", "native_layer_norm", "native_group_norm",
               "rms_norm", "native_batch_norm")(_per_output(4))
RULES.register("softmax", "log_softmax", "_softmax", "_log_softmax")(_per_output(3))
RULES.register(*_ELEMENTWISE)(_per_output(1))
RULES.register("mean", "sum", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
               "adaptive_max_pool2d", "amax", "amin", "var", "std", "cumsum", "max", "min", "argmax",
               "norm", "linalg_vector_norm")(_per_input)
RULES.register("max_pool1d", "avg_pool1d")(_pool(1))
RULES.register("max_pool2d", "avg_pool2d", "max_pool2d_with_indices")(_pool(2))
RULES.register("max_pool3d", "avg_pool3d")(_pool(3))
RULES.register("fake_quantize")(_per_output(4))   # scale, round, clamp, rescale per value

_MODULE_RULES = {  # call_module nodes (symbolic_trace mode leaves)
    torch.nn.Conv1d: "conv1d", torch.nn.Conv2d: "conv2d", torch.nn.Conv3d: "conv3d",
    torch.nn.ConvTranspose2d: "conv_transpose2d", torch.nn.Linear: "linear",
}


def _nested_cost(sub: fx.GraphModule, table: CostTable, name: str) -> NodeCost:
    """The summed cost of a GraphModule child (a pipeline stage), its unknown ops listed
    under `name/`."""
    inner = AnalysisManager(sub).get(Cost)
    table.unknown.extend(f"{name}/{u}" for u in inner.unknown)
    return NodeCost(params=inner.params, macs=inner.macs, flops=inner.flops,
                    bytes_read=inner.bytes_read, bytes_written=inner.bytes_written)


def _leaf_cost(module: torch.nn.Module, node: fx.Node, table: CostTable) -> NodeCost:
    """A leaf module's cost, counted by torch's FlopCounterMode while it runs on fake
    tensors of its input shapes (matmuls, convolutions, attention: 2 flops a MAC); a leaf
    that cannot run on fake tensors is listed as unknown."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    cost = NodeCost(params=sum(p.numel() for p in module.parameters()))
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(arg):
        info = tensor_info(arg) if isinstance(arg, fx.Node) else None
        if isinstance(arg, fx.Node) and info is None:
            raise ValueError(f"no recorded shape for {arg.name}")
        return torch.empty(info.shape, dtype=info.dtype, device=info.device) if info else arg

    counter = FlopCounterMode(display=False)
    try:
        with mode:
            args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), fake)
            state = {n: mode.from_tensor(t) for n, t in
                     list(module.named_parameters()) + list(module.named_buffers())}
            with counter, torch.no_grad():
                torch.func.functional_call(module, state, tuple(args), dict(kwargs))
    except Exception:  # noqa: BLE001 - value-dependent code: its cost is not known, and said so
        table.unknown.append(f"{node.name} (leaf module {type(module).__name__})")
        return cost
    cost.flops = counter.get_total_flops()
    cost.macs = cost.flops // 2
    cost.bytes_written = _out_bytes(node)
    return cost


def _module_kind(module: torch.nn.Module, node: fx.Node) -> str:
    """The table key of a call_module node: its layer type, or a module fxopt inserted."""
    if isinstance(module, FakeQuantize):
        return "fake_quantize"
    return _MODULE_RULES.get(type(module), "_guards_fn" if node.target == "_guards_fn" else "")


def op_kind(node: fx.Node) -> str:
    """The key this table knows the node by: in-place and dunder spellings folded."""
    name = op_name(node)
    if name.startswith("__") and name.endswith("__"):
        return name.strip("_")
    if name.endswith("_") and not name.startswith("_"):
        return name.rstrip("_")
    return name


class Cost(Analysis):
    """Per-node and total parameters, MACs, flops and bytes (see module doc)."""

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> CostTable:
        am.get(Shapes)
        table = CostTable()
        seen = set()
        for node in gm.graph.nodes:
            cost = NodeCost()
            if node.op == "get_attr":
                value = fetch_attr(gm, node.target)
                if isinstance(value, torch.nn.Parameter) and node.target not in seen:
                    seen.add(node.target)
                    table.params += value.numel()
            elif node.op in ("call_function", "call_method", "call_module"):
                cost = self._node_cost(gm, node, table)
                if node.op == "call_module" and node.target not in seen:  # a leaf's own weights
                    seen.add(node.target)
                    table.params += cost.params
            table.nodes[node.name] = cost
        return table

    def _node_cost(self, gm, node: fx.Node, table: CostTable) -> NodeCost:
        ins = [tensor_info(a) for a in _flat(node.args) if isinstance(a, fx.Node)]
        out = tensor_info(node)
        kind = op_kind(node)
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, fx.GraphModule):   # a stage of a split graph: its own ops' costs
                return _nested_cost(module, table, node.name)
            kind = _module_kind(module, node)
            if not kind:   # the user's module kept whole: count what it computes
                return _leaf_cost(module, node, table)
            if type(module) in _MODULE_RULES:
                ins = ins + [TensorInfo.of(module.weight)]
            cost = NodeCost(params=sum(p.numel() for p in module.parameters()))
        else:
            cost = NodeCost(params=sum(
                fetch_attr(gm, a.target).numel() for a in node.args
                if isinstance(a, fx.Node) and a.op == "get_attr"
                and isinstance(fetch_attr(gm, a.target), torch.nn.Parameter)))
        if kind in _FREE:
            return cost
        rule = RULES.lookup(kind)
        if rule is None and kind not in _MOVES:
            table.unknown.append(f"{node.name} ({kind or node.target})")
        if rule is not None and out is not None and all(i is not None for i in ins[:3]):
            cost.macs, cost.flops = rule(node, ins, out)
        cost.bytes_read = sum(i.nbytes for i in ins if i is not None)
        cost.bytes_written = _out_bytes(node)
        return cost


def _flat(args) -> list:
    """Arguments with list arguments spread out (cat's and einsum's tensors are in a list)."""
    return [b for a in args for b in (a if isinstance(a, (list, tuple)) else (a,))]


def _out_bytes(node: fx.Node) -> int:
    info = node.meta.get(TENSOR)
    infos = info if isinstance(info, tuple) else (info,)
    return sum(i.nbytes for i in infos if isinstance(i, TensorInfo))


class CostTracker(Instrument):
    """Records parameters and MACs before and after each pass into the report."""

    def before_pass(self, ctx, p, gm) -> None:
        self._before = ctx.am.get(Cost)

    def after_pass(self, ctx, p, gm, record) -> None:
        after = ctx.am.get(Cost)
        record.metrics.update(params_before=self._before.params, params_after=after.params,
                              macs_before=self._before.macs, macs_after=after.macs)

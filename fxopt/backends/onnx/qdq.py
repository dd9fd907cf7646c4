"""Emit an ONNX QDQ model from an fxopt graph: the builder, FakeQuantize -> QDQ, the driver.

Why a small emitter of our own rather than torch.onnx.export: the graphs are
ATen-level torch.fx GraphModules with FakeQuantize call_module nodes, and the
QDQ form must reproduce fxopt's grid bit for bit (scale, zero point, container
type, per-channel axis). Walking the graph ourselves keeps that mapping explicit
and makes every op we cannot express an error that names the node, instead of
a model that runs and silently computes something else.

Shapes are static: the graph is run once on the example inputs (fxopt compiles
for fixed shapes anyway), and view-like ops become Reshape to the recorded shape.

FakeQuantize -> ONNX (fxopt.quant.qparams is the grid; QuantizeLinear rounds half
to even, like torch.round, and saturates to the container type):
- weights (a constant input): the integer codes are stored as an initializer and
  only DequantizeLinear is emitted (the standard QDQ form for weights); 1-bit
  (binary) weights store sign in {-1, +1} with the per-channel mean |w| as scale.
- activations: QuantizeLinear -> DequantizeLinear; a grid narrower than its
  container (e.g. 6-bit in int8) gets a Clip to the grid's float range first, so
  the saturation matches exactly.
- containers: signed grids (symmetric) -> INT8, unsigned (affine) -> UINT8;
  weights of <= 4 bits use INT4/UINT4 from opset 21 (ONNX has them there; smaller
  files, same values) and INT8/UINT8 below it; 9..16-bit grids need INT16/UINT16
  (opset >= 21).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ...errors import FxoptError, UnsupportedError
from ...util.files import write_atomically
from ...ir.dynamic import specialise
from ...ir.graph import fetch_attr, fresh_name, light_copy, node_location
from ...ir.registry import OpRegistry
from ...ir.meta import INPUT_SHAPES, TENSOR, TensorInfo
from ...ir.nodes import target_name
from ...quant import FakeQuantize, quantize

MIN_OPSET = 13          # per-axis QuantizeLinear / DequantizeLinear


def _onnx():
    import onnx  # optional dependency: imported only when exporting
    return onnx


class OnnxBuilder:
    """Collects ONNX nodes and initializers while the fx graph is walked.

    `values` maps fx nodes to ONNX value names; `recorded` holds each node's
    concrete output from the run on the example inputs (shapes and dtypes).
    """

    def __init__(self, gm: fx.GraphModule, opset: int, recorded: dict):
        self.gm, self.opset, self.recorded = gm, opset, recorded
        self.nodes, self.initializers, self.values = [], [], {}
        self._names: set[str] = set()

    # ---- naming and constants -------------------------------------------------------
    def fresh(self, hint: str) -> str:
        name = fresh_name(hint, self._names)
        self._names.add(name)
        return name

    def const(self, value, hint: str, dtype=None) -> str:
        """An initializer from a tensor, array or Python scalar (0-d for a scalar)."""
        onnx = _onnx()
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        array = np.asarray(value, dtype=dtype)
        name = self.fresh(hint)
        self.initializers.append(onnx.numpy_helper.from_array(array, name))
        return name

    def packed_const(self, codes: np.ndarray, elem_type: int, hint: str) -> str:
        """An INT4 / UINT4 initializer (onnx.helper packs two values per byte)."""
        onnx = _onnx()
        name = self.fresh(hint)
        self.initializers.append(onnx.helper.make_tensor(name, elem_type, codes.shape,
                                                         codes.flatten().tolist()))
        return name

    def op(self, op_type: str, inputs: list, hint: str, **attrs) -> str:
        """Append one ONNX node with a single output; returns the output's name."""
        out = self.fresh(hint)
        self.nodes.append(_onnx().helper.make_node(op_type, list(inputs), [out],
                                                   name=self.fresh(f"{hint}/{op_type}"), **attrs))
        return out

    # ---- fx values --------------------------------------------------------------------
    def value(self, arg) -> str:
        """The ONNX name of an fx argument: get_attr constants become initializers on first use."""
        if arg not in self.values:
            if not isinstance(arg, fx.Node) or arg.op != "get_attr":
                raise UnsupportedError(f"ONNX export: argument {arg!r} is not a graph value")
            self.values[arg] = self.const(fetch_attr(self.gm, arg.target), arg.name)
        return self.values[arg]

    def meta(self, arg) -> torch.Tensor:
        """The recorded output of an fx node (a concrete tensor of the example run)."""
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return fetch_attr(self.gm, arg.target)
        return self.recorded[arg]

    def scalar_like(self, number, like, hint: str) -> str:
        """A 0-d constant with the dtype of the tensor `like` (for x + 1.0 and friends)."""
        return self.const(number, hint, dtype=_numpy_dtype(self.meta(like).dtype))


def _numpy_dtype(dtype: torch.dtype):
    return torch.empty((), dtype=dtype).numpy().dtype


# ---- FakeQuantize -> QDQ ------------------------------------------------------------------

def _container(fq: FakeQuantize, opset: int, weight: bool) -> tuple[int, int, int]:
    """(ONNX element type, its qmin, its qmax) that holds fq's integer grid."""
    onnx = _onnx()
    signed = fq.qmin < 0
    if weight and fq.bits <= 4 and opset >= 21:
        return (onnx.TensorProto.INT4, -8, 7) if signed else (onnx.TensorProto.UINT4, 0, 15)
    if fq.bits <= 8:
        return (onnx.TensorProto.INT8, -128, 127) if signed else (onnx.TensorProto.UINT8, 0, 255)
    if opset < 21:
        raise UnsupportedError(f"ONNX export: {fq.bits}-bit quantizer {fq.label!r} needs INT16/UINT16 "
                               f"QDQ, which ONNX has from opset 21 (asked for {opset})",
                               hint="export with opset=21 or higher")
    return (onnx.TensorProto.INT16, -32768, 32767) if signed else (onnx.TensorProto.UINT16, 0, 65535)


_NUMPY_OF = {"INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16, "UINT16": np.uint16}


def _qparams(b: OnnxBuilder, fq: FakeQuantize, elem_type: int, hint: str) -> tuple[str, str, dict]:
    """Scale and zero-point initializers (0-d per tensor, 1-D per channel) and the axis attribute."""
    onnx = _onnx()
    scale = fq.scale.detach().float().cpu().numpy().astype(np.float32)
    zp = fq.zero_point.detach().cpu().numpy().astype(np.int64)
    if fq.axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    type_name = onnx.TensorProto.DataType.Name(elem_type)
    if type_name in _NUMPY_OF:
        zp_name = b.const(zp.astype(_NUMPY_OF[type_name]), f"{hint}.zero_point")
    else:
        zp_name = b.packed_const(zp, elem_type, f"{hint}.zero_point")
    attrs = {} if fq.axis is None else {"axis": int(fq.axis)}
    return b.const(scale, f"{hint}.scale"), zp_name, attrs


def _check_frozen(fq: FakeQuantize, node: fx.Node) -> None:
    if fq.role == "activation" and fq.observing:
        raise FxoptError(f"ONNX export: activation quantizer {node.target!r} is still observing, so its "
                         "scale is not final (in eval mode it passes values through unquantized)",
                         where=node_location(node),
                         hint="calibrate and freeze first: fxopt.calibrate(cm, batches); fxopt.freeze(cm), "
                              "or compile with calibration=batches")


def emit_fake_quantize(b: OnnxBuilder, node: fx.Node, fq: FakeQuantize) -> str:
    """One FakeQuantize node as DequantizeLinear of stored codes (constant weights) or Q -> DQ."""
    _check_frozen(fq, node)
    if fq.group_size is not None:
        raise UnsupportedError(f"ONNX export: quantizer {node.target!r} has per-group scales "
                               f"(group_size={fq.group_size}), which this QDQ export does not write",
                               where=node_location(node), hint="fake-quant without group-size")
    (src,) = node.args
    hint = str(node.target)
    constant = isinstance(src, fx.Node) and src.op == "get_attr"
    elem_type, cmin, cmax = _container(fq, b.opset, weight=constant)
    scale, zp, attrs = _qparams(b, fq, elem_type, hint)
    if constant:
        weight = fetch_attr(b.gm, src.target).detach().float()
        codes = quantize(weight, fq.scale.detach().float(), fq.zero_point, fq.spec).numpy()
        type_name = _onnx().TensorProto.DataType.Name(elem_type)
        if type_name in _NUMPY_OF:
            stored = b.const(codes.astype(_NUMPY_OF[type_name]), f"{hint}.codes")
        else:
            stored = b.packed_const(codes, elem_type, f"{hint}.codes")
        return b.op("DequantizeLinear", [stored, scale, zp], node.name, **attrs)
    if fq.spec.binary:
        raise UnsupportedError("ONNX export: a 1-bit quantizer on a non-constant tensor has no QDQ form",
                               where=node_location(node))
    x = b.value(src)
    if fq.qmin > cmin or fq.qmax < cmax:      # a grid narrower than its container: saturate first
        x = _clip_to_grid(b, fq, x, b.recorded[node].dim())
    q = b.op("QuantizeLinear", [x, scale, zp], f"{node.name}.q", **attrs)
    return b.op("DequantizeLinear", [q, scale, zp], node.name, **attrs)


def _clip_to_grid(b: OnnxBuilder, fq: FakeQuantize, x: str, rank: int) -> str:
    """Max/Min to the float range of [qmin, qmax] (per channel when fq has an axis)."""
    scale, zp = fq.scale.detach().float(), fq.zero_point.float()
    lo, hi = (fq.qmin - zp) * scale, (fq.qmax - zp) * scale
    shape = [] if fq.axis is None else [-1] + [1] * (rank - 1 - fq.axis % rank)
    lo, hi = lo.reshape(shape), hi.reshape(shape)
    hint = str(fq.label or "fake_quant")
    x = b.op("Max", [x, b.const(lo, f"{hint}.lo")], f"{hint}.clip_lo")
    return b.op("Min", [x, b.const(hi, f"{hint}.hi")], f"{hint}.clip_hi")


# ---- the driver -------------------------------------------------------------------------

def record_values(gm: fx.GraphModule, example_inputs) -> dict:
    """Run the graph once and keep every node's output (for shapes and dtypes)."""
    recorded = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            recorded[n] = out
            return out

    with torch.no_grad():
        _Recorder(gm).run(*example_inputs)
    return recorded


def live_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes the outputs depend on, in graph order (drops e.g. unused guard calls)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    live, stack = {output}, [output]
    while stack:
        for dep in stack.pop().all_input_nodes:
            if dep not in live:
                live.add(dep)
                stack.append(dep)
    return [n for n in gm.graph.nodes if n in live]


def _value_info(name: str, tensor: torch.Tensor):
    onnx = _onnx()
    elem = onnx.helper.np_dtype_to_tensor_dtype(_numpy_dtype(tensor.dtype))
    return onnx.helper.make_tensor_value_info(name, elem, list(tensor.shape))


def _sizes_folded(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    """`gm`, or a copy sharing its weights with its symbolic sizes (the dynamic batch)
    fixed to those of `example_inputs`: ONNX export is static, at the example's shapes."""
    if not any(isinstance(i, TensorInfo) and i.dynamic for i in gm.meta.get(INPUT_SHAPES, ())):
        return gm
    folded = light_copy(gm)
    flat = torch.utils._pytree.tree_leaves(tuple(example_inputs), is_leaf=lambda a: a is None)
    for node, value in zip(folded.graph.find_nodes(op="placeholder"), flat):
        if isinstance(value, torch.Tensor):
            node.meta[TENSOR] = TensorInfo.of(value)
    specialise(folded)
    return folded


def build_model(gm: fx.GraphModule, example_inputs, opset: int, rules: OpRegistry):
    """The ONNX ModelProto of `gm` (static shapes of `example_inputs`)."""
    onnx = _onnx()
    gm = _sizes_folded(gm, example_inputs)
    b = OnnxBuilder(gm, opset, record_values(gm, example_inputs))
    inputs, outputs = [], []
    for node in live_nodes(gm):
        if node.op == "placeholder":
            b.values[node] = b.fresh(node.name)
            inputs.append(_value_info(b.values[node], b.recorded[node]))
        elif node.op == "get_attr":
            continue                                  # initializers are made on first use
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            if not isinstance(module, FakeQuantize):
                raise UnsupportedError(f"ONNX export: no ONNX form for module {type(module).__name__}",
                                       where=node_location(node))
            b.values[node] = emit_fake_quantize(b, node, module)
        elif node.op == "call_function":
            b.values[node] = _emit_call(b, node, rules)
        elif node.op == "output":
            for i, arg in enumerate(torch.utils._pytree.tree_leaves(node.args[0])):
                if not isinstance(arg, fx.Node) or not isinstance(b.recorded.get(arg), torch.Tensor):
                    raise UnsupportedError(f"ONNX export: output {i} ({arg!r}) is not a tensor",
                                           where=node_location(node))
                name = b.op("Identity", [b.value(arg)], f"output_{i}")
                outputs.append(_value_info(name, b.recorded[arg]))
        else:
            raise UnsupportedError(f"ONNX export: cannot emit {node.op} nodes", where=node_location(node))
    graph = onnx.helper.make_graph(b.nodes, "fxopt", inputs, outputs, b.initializers)
    opsets = [onnx.helper.make_opsetid("", opset)]
    return onnx.helper.make_model(graph, opset_imports=opsets, producer_name="fxopt",
                                  ir_version=onnx.helper.find_min_ir_version_for(opsets))


def _emit_call(b: OnnxBuilder, node: fx.Node, rules: OpRegistry) -> str:
    rule = rules.lookup(node.target)
    if rule is None:
        raise UnsupportedError(f"ONNX export: no ONNX form for op {target_name(node)}", where=node_location(node),
                               hint="the supported ops are listed in fxopt.backends.onnx.ops; rewrite "
                                    "the op in the model or extend the table")
    if not isinstance(b.recorded.get(node), torch.Tensor):
        raise UnsupportedError("ONNX export: ops with several outputs are not supported",
                               where=node_location(node))
    _check_inplace(node)
    return rule(b, node)


def _check_inplace(node: fx.Node) -> None:
    """ONNX values are immutable: an in-place op (relu_, add_) is exported as a new value,
    which is only right if nothing reads the mutated input after it."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable or not node.args or not isinstance(node.args[0], fx.Node):
        return
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    later = [u for u in node.args[0].users if u is not node and order[u] > order[node]]
    if later:
        raise UnsupportedError(f"ONNX export: in-place op mutates {node.args[0].name!r}, which "
                               f"{later[0].name!r} reads afterwards", where=node_location(node),
                               hint="use the out-of-place op in the model")


def save_atomically(model, path: str) -> str:
    """Check the model, write it under a temporary name next to `path`, then rename:
    a failure never leaves a half-written (or stale-but-new-looking) file at `path`."""
    onnx = _onnx()
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise FxoptError(f"ONNX export produced an invalid model: {e}",
                         hint="please report this graph; the exporter should have refused it") from e
    path = write_atomically(path, model.SerializeToString())
    return path

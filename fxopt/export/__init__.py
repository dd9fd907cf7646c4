"""Export an fxopt graph to other formats; today ONNX with QuantizeLinear / DequantizeLinear.

    cm = fxopt.compile(model, (x,), pipeline="fold-bn,fake-quant", calibration=batches)
    fxopt.export_onnx(cm, "model.onnx")

The same graph the fake-quant pass produced (and the int8 backend lowers) is
written as a standard QDQ model, so onnxruntime and other QDQ consumers compute
what fxopt's fake-quant model computes. The mapping and its limits are in
fxopt.export.onnx_qdq (quantizers) and fxopt.export.onnx_ops (the op table).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import UnsupportedError
from ..ir.meta import INPUT_SHAPES

__all__ = ["export_onnx"]

DEFAULT_OPSET = 21      # the first with INT4 / INT16 QDQ; per-channel QDQ needs >= 13


def export_onnx(compiled_or_gm, path, example_inputs=None, opset: int = DEFAULT_OPSET) -> str:
    """Write `compiled_or_gm` (a CompiledModel or an fxopt GraphModule) to `path` as ONNX.

    Frozen FakeQuantize modules become QDQ: weights as stored integer codes with
    DequantizeLinear, activations as QuantizeLinear -> DequantizeLinear. Shapes are
    those of `example_inputs` (default: random tensors of the traced input shapes).
    Raises UnsupportedError naming the node for an op with no exact ONNX form, and
    FxoptError for an activation quantizer that is not calibrated and frozen; in
    either case nothing is written at `path`. Returns `path`.
    """
    from .onnx_ops import RULES
    from .onnx_qdq import MIN_OPSET, build_model, save_atomically

    gm = getattr(compiled_or_gm, "graph_module", compiled_or_gm)
    if not isinstance(gm, fx.GraphModule):
        raise UnsupportedError(f"export_onnx takes a CompiledModel or a GraphModule, got "
                               f"{type(compiled_or_gm).__name__}",
                               hint="compile it first: fxopt.compile(model, example_inputs, ...)")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise UnsupportedError(f"export_onnx: opset must be an integer >= {MIN_OPSET} (per-channel "
                               f"QuantizeLinear), got {opset!r}")
    if example_inputs is None:
        example_inputs = _inputs_like(gm)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    flat = torch.utils._pytree.tree_leaves(tuple(example_inputs))
    return save_atomically(build_model(gm, flat, opset, RULES), path)


def _inputs_like(gm: fx.GraphModule) -> tuple:
    """Random inputs with the traced shapes and dtypes (integer inputs: zeros, valid indices)."""
    inputs = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise UnsupportedError(f"export_onnx: input {node.name!r} has no recorded shape",
                                   hint="pass example_inputs=...")
        shape = [int(s) for s in val.shape]
        inputs.append(torch.randn(shape, dtype=val.dtype) if val.dtype.is_floating_point else torch.zeros(shape, dtype=val.dtype))
    if not inputs and gm.meta.get(INPUT_SHAPES):
        raise UnsupportedError("export_onnx: cannot rebuild the example inputs", hint="pass example_inputs=...")
    return tuple(inputs)

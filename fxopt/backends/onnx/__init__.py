"""Export an fxopt graph to other formats; today ONNX with QuantizeLinear / DequantizeLinear.

    cm = fxopt.compile(model, (x,), pipeline="fold-bn,fake-quant", calibration=batches)
    fxopt.export_onnx(cm, "model.onnx")

The same graph the fake-quant pass produced (and the int8 backend lowers) is
written as a standard QDQ model, so onnxruntime and other QDQ consumers compute
what fxopt's fake-quant model computes. The mapping and its limits are in
fxopt.backends.onnx.qdq (quantizers) and fxopt.backends.onnx.ops (the op table).
"""
from __future__ import annotations

import torch

from ...errors import UnsupportedError
from ...ir.graph import graph_module_of
from ...ir.inputs import traced_inputs
from ...quant.integer_modules import has_integer_ops
from .ops import RULES
from .qdq import MIN_OPSET, build_model, save_atomically

__all__ = ["export_onnx"]

DEFAULT_OPSET = 21      # the first with INT4 / INT16 QDQ; per-channel QDQ needs >= 13


def export_onnx(compiled_or_gm, path, example_inputs=None, opset: int = DEFAULT_OPSET) -> str:
    """Write `compiled_or_gm` (a CompiledModel or an fxopt GraphModule) to `path` as ONNX.

    Frozen FakeQuantize modules become QDQ: weights as stored integer codes with
    DequantizeLinear, activations as QuantizeLinear -> DequantizeLinear. Shapes are
    those of `example_inputs` (default: zeros of the traced input shapes).
    Raises UnsupportedError naming the node for an op with no exact ONNX form, and
    FxoptError for an activation quantizer that is not calibrated and frozen; in
    either case nothing is written at `path`. Returns `path`.
    """
    gm = graph_module_of(compiled_or_gm, "export_onnx")
    if has_integer_ops(gm):
        raise UnsupportedError("export_onnx: the graph holds the integer ops of fake-quant{integer=true} (I-BERT's "
                               "softmax / GELU / LayerNorm), which standard QDQ ONNX has no op for",
                               hint="export it with backend='fpga-int8' (model.json and C++), or quantize "
                                    "without integer=true for ONNX")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise UnsupportedError(f"export_onnx: opset must be an integer >= {MIN_OPSET} (per-channel "
                               f"QuantizeLinear), got {opset!r}")
    if example_inputs is None:
        example_inputs = traced_inputs(gm)
        if len(example_inputs) != len(gm.graph.find_nodes(op="placeholder")):
            raise UnsupportedError("export_onnx: the graph has no recorded input shapes",
                                   hint="pass example_inputs=...")
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    flat = torch.utils._pytree.tree_leaves(tuple(example_inputs))
    return save_atomically(build_model(gm, flat, opset, RULES), path)

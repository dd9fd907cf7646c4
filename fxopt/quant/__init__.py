"""Quantization building blocks: integer grids, observers, the FakeQuantize module
and the report of what the fake-quant pass quantized and what it left in float."""
from .fake_quantize import FakeQuantize
from .observers import OBSERVERS, Observer, make_observer
from .qparams import EPS, QSpec, dequantize, fake_quantize, qparams_from_range, quantize
from .report import FloatOp, QuantizedOp, QuantReport

__all__ = ["EPS", "OBSERVERS", "FakeQuantize", "FloatOp", "Observer", "QSpec", "QuantReport",
           "QuantizedOp", "dequantize", "fake_quantize", "make_observer", "qparams_from_range",
           "quantize"]

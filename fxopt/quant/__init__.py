"""Quantization building blocks: integer grids, observers and the FakeQuantize module
(the fake-quant pass, its rules and its report live in fxopt.passes.fake_quant)."""
from .fake_quantize import FakeQuantize, quantizer_of, quantizers_in
from .observers import OBSERVERS, Observer, make_observer
from .qparams import EPS, QSpec, dequantize, fake_quantize, qparams_from_range, quantize

__all__ = ["EPS", "OBSERVERS", "FakeQuantize", "Observer", "QSpec", "dequantize", "fake_quantize",
           "make_observer", "qparams_from_range", "quantize", "quantizer_of", "quantizers_in"]

"""FakeQuantize: an observer plus quantize-dequantize, as one nn.Module in the graph.

The fake-quant pass puts one of these in front of every quantized operand. What a
backend reads from it (all plain attributes or buffers):

    role         "weight" or "activation"
    bits, symmetric, axis (None: per tensor), qmin, qmax     the integer grid
    group_size   None, or the run of a channel's values that share a scale (weights)
    scale        float32 1-D tensor (one element per tensor, one per channel of `axis`, or
                 channels x groups per group, channel-major)
    zero_point   int32, same shape (0 when symmetric)
    observing    False once frozen: scale and zero_point are final

Life cycle:
- weight quantizers are initialised from the weight by the pass and, while
  observing in train mode (QAT), re-derive scale / zero_point from the weight on
  every call, since it is training; they always output the quantized weight.
- activation quantizers, while observing, record ranges: in eval mode
  (calibration) they pass values through unchanged, so every observer sees the
  float values a post-training quantizer is calibrated on; in train mode (QAT
  before freezing) they quantize with the range seen so far.
- `freeze()` computes the final parameters once (the histogram and mse searches
  run here) and stops observing; from then on forward is quantize-dequantize only.
  Freezing an activation quantizer that saw no data is an error.

Gradients: straight-through (clipped at the grid's range). With `learnable=True`
the scale is an nn.Parameter trained with LSQ's gradient once the quantizer is frozen.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import FxoptError
from .observers import make_observer
from .qparams import QSpec, as_groups, as_rows, binary_scale, fake_quantize, qparams_from_range

__all__ = ["FakeQuantize", "quantizer_of", "quantizers_in"]


def _is_fake(x) -> bool:
    """True while shapes are propagated on fake tensors: then nothing is observed."""
    return isinstance(x, torch._subclasses.fake_tensor.FakeTensor)


class FakeQuantize(nn.Module):
    """Observer + straight-through quantize-dequantize of one tensor (see module docstring)."""

    def __init__(self, spec: QSpec, observer: str = "minmax", role: str = "activation",
                 channels: int = 1, learnable: bool = False):
        super().__init__()
        if role not in ("weight", "activation"):
            raise ValueError(f"role must be 'weight' or 'activation', got {role!r}")
        if spec.binary and role != "weight":
            raise ValueError("1-bit (binary) quantization is for weights only")
        self.spec, self.role, self.learnable = spec, role, learnable
        self.observer_kind = observer
        self.observer = make_observer(observer, spec, channels)
        scale = torch.ones(channels)
        if learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(channels, dtype=torch.int32))
        self.observing = True
        self.label = ""          # the quantizer's path in the graph module, for messages
        self.eval()

    # ---- what a backend reads -------------------------------------------------
    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def symmetric(self) -> bool:
        return self.spec.symmetric

    @property
    def axis(self) -> int | None:
        return self.spec.axis

    @property
    def group_size(self) -> int | None:
        return self.spec.group_size

    @property
    def qmin(self) -> int:
        return self.spec.qmin

    @property
    def qmax(self) -> int:
        return self.spec.qmax

    @property
    def calibrated(self) -> bool:
        """Whether the quantizer has parameters derived from data (weights: always)."""
        return self.role == "weight" or not self.observing or int(self.observer.count) > 0

    # ---- running ----------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing and not _is_fake(x):
            if self.role == "weight":
                if self.training:          # eval-mode weights are as the pass saw them
                    self.observe_weight(x)
            else:
                self._check_finite(x, "a calibration batch gave it")
                self.observer.update(as_rows(x, self.axis))
                if not self.training:
                    return x
                self._set_qparams(*self.observer.range())
        return fake_quantize(x, self.scale, self.zero_point, self.spec, self.learnable and not self.observing)

    @torch.no_grad()
    def observe_weight(self, weight: torch.Tensor) -> None:
        """Set scale / zero_point from a weight tensor (binary: mean |w| per channel)."""
        self._check_finite(weight, "the weight holds")
        rows = as_groups(weight.detach(), self.spec)
        if self.spec.binary:
            self.scale.copy_(binary_scale(rows))
            self.zero_point.zero_()
            return
        self._set_qparams(*self.observer.batch_range(rows))

    def _check_finite(self, x: torch.Tensor, source: str) -> None:
        """NaN or Inf would be frozen into the scale (and fail at the first call with a raw
        kernel error, or turn into finite codes): refuse it here, naming the quantizer."""
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            bad = "NaN" if bool(torch.isnan(x).any()) else "Inf"
            raise FxoptError(f"{self.role} quantizer {self.label or '(unnamed)'}: {source} {bad}, which has no "
                             "quantized range", where=self.label or None,
                             hint="remove non-finite values from the weights or the calibration batches "
                                  "(fxopt never quantizes them silently)")

    @torch.no_grad()
    def _set_qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        scale, zero_point = qparams_from_range(lo, hi, self.spec)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def freeze(self) -> None:
        """Stop observing; activation quantizers take their final range from the observer."""
        if not self.observing:
            return
        if self.role == "activation":
            if int(self.observer.count) == 0:
                raise FxoptError(f"activation quantizer {self.label or '(unnamed)'} saw no data, so it "
                                 "has no range to freeze",
                                 hint="run fxopt.calibrate(compiled, batches) first, or compile with "
                                      "calibration=batches")
            self._set_qparams(*self.observer.range())
        self.observing = False

    def unfreeze(self) -> None:
        """Observe again (e.g. recalibrate after training)."""
        self.observing = True

    # ---- state ------------------------------------------------------------------
    def get_extra_state(self):
        return {"observing": self.observing}

    def set_extra_state(self, state) -> None:
        self.observing = bool(state.get("observing", True))

    def extra_repr(self) -> str:
        axis = "per-tensor" if self.axis is None else f"axis={self.axis}"
        axis += "" if self.group_size is None else f", group_size={self.group_size}"
        kind = "binary" if self.spec.binary else ("symmetric" if self.symmetric else "asymmetric")
        return (f"{self.role}, bits={self.bits}, {kind}, {axis}, qmin={self.qmin}, qmax={self.qmax}, "
                f"observer={self.observer_kind}, observing={self.observing}"
                + (", learnable" if self.learnable else ""))


def quantizer_of(gm: fx.GraphModule, node, role: str | None = None) -> FakeQuantize | None:
    """The FakeQuantize a call_module node runs (only one of this `role`, "weight" or
    "activation", when one is given); None for any other node or value. How a pass or a
    backend asks whether an operand arrives fake-quantized."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, FakeQuantize) and (role is None or module.role == role):
            return module
    return None


def quantizers_in(module: torch.nn.Module) -> list[FakeQuantize]:
    """Every FakeQuantize inside `module` (a graph holds them as submodules), in module order."""
    return [m for m in module.modules() if isinstance(m, FakeQuantize)]

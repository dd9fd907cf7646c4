"""The integer ops of an integer-only transformer as graph modules: float while calibrating, integer once frozen.

fake-quant{integer=true} puts one of these where the traced graph had softmax (or attention),
GELU or LayerNorm. Each owns the quantizers of its input and output grids:

- while its quantizers observe (calibration), it runs the float op, so their observers see
  the float values a post-training quantizer is calibrated on;
- `freeze()` fixes the grids and builds the integer kernel (quant.integer_ops, the torch
  twin of the export's kernels); from then on the module runs that kernel on the codes of
  its input grid and returns the dequantized codes of its output grid.

So the fake-quant model that an fpga-int8 export is checked against runs the same integer
arithmetic as the export, and its accuracy is what the export will have. The grids, as
`in_grid()` / `out_grid()` (scale, zero point, qmin, qmax, with unsigned 8-bit codes moved
to int8 storage as the export holds them), are what the lowering reads.

- IntegerSoftmax: softmax(scale * scores) over the last axis, masked keys dropped; the
  logits grid is softmax_grid(amax) of the scaled scores seen, P on 1/256 (codes 0..255).
- IntegerGELU: int8 codes in and out (i-GELU).
- IntegerLayerNorm: 16-bit symmetric codes in (the residual stream), int8 out.
- IntegerLut: tanh, sigmoid or tanh-approximate GELU on int8 codes, as a 256-entry table.
The modules are not differentiable once frozen.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FxoptError
from .fake_quantize import FakeQuantize, _is_fake
from .integer_ops import LOGIT_LIMIT, IntGELU, IntLayerNorm, IntSoftmax, softmax_grid
from .intmath import SOFTMAX_BITS, lut
from .qparams import QSpec

__all__ = ["IntegerGELU", "IntegerLayerNorm", "IntegerLut", "IntegerOp", "IntegerSoftmax", "has_integer_ops",
           "integer_op_of", "stored_grid"]

RESIDUAL_BITS = 16       # LayerNorm inputs: the residual stream's outliers need more than 8 bits


def stored_grid(fq: FakeQuantize) -> tuple[float, int, int, int]:
    """(scale, zero point, qmin, qmax) of a frozen per-tensor quantizer, unsigned 8-bit codes
    moved by -128 into int8 storage (as the export stores them; fpga_int8's Grid.of too)."""
    offset = -128 if fq.bits <= 8 and fq.qmax > 127 else 0
    return (float(fq.scale.reshape(-1)[0]), int(fq.zero_point.reshape(-1)[0]) + offset,
            fq.qmin + offset, fq.qmax + offset)


class IntegerOp(nn.Module):
    """Float op while calibrating, the integer kernel (`self.kernel`) once frozen."""

    kind = ""

    def __init__(self, observer: str, in_spec: QSpec | None, out_spec: QSpec | None):
        super().__init__()
        self.input_fq = FakeQuantize(in_spec, observer, "activation") if in_spec is not None else None
        self.output_fq = FakeQuantize(out_spec, observer, "activation") if out_spec is not None else None
        self.kernel: nn.Module | None = None

    @property
    def frozen(self) -> bool:
        return self.kernel is not None

    def freeze(self) -> None:
        """Fix the grids from what the observers saw and build the integer kernel."""
        if self.kernel is not None:
            return
        for fq in (self.input_fq, self.output_fq):
            if fq is not None:
                fq.freeze()
        self.kernel = self.build()

    def in_grid(self) -> tuple[float, int, int, int]:
        return stored_grid(self.input_fq)

    def out_grid(self) -> tuple[float, int, int, int]:
        return stored_grid(self.output_fq)

    def build(self) -> nn.Module:
        raise NotImplementedError

    def _observe(self, x: torch.Tensor, fq: FakeQuantize | None) -> torch.Tensor:
        return x if fq is None else fq(x)


class IntegerSoftmax(IntegerOp):
    """softmax(scale * scores) over the last axis; `keep` (bool, broadcastable) drops keys."""

    kind = "softmax"

    def __init__(self, scale: float, observer: str = "minmax"):
        super().__init__(observer, None, None)          # its grids come from `amax` and SOFTMAX_BITS
        self.scale = float(scale)
        self.register_buffer("amax", torch.zeros(()))

    def forward(self, scores: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        logits = scores * self.scale
        if self.kernel is not None:
            return self.kernel(logits, keep)
        if not _is_fake(logits):        # shape propagation runs on fake tensors: nothing is observed
            self.amax = torch.maximum(self.amax, logits.detach().abs().amax().float())
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        return torch.nan_to_num(torch.softmax(logits, -1), nan=0.0)      # a fully masked row: zeros

    def logit_scale(self) -> float:
        """The grid of the scaled logits (what intmath.softmax_constants takes)."""
        return softmax_grid(float(self.amax))

    def in_grid(self) -> tuple[float, int, int, int]:
        """The grid of the scores before the attention scale: int32 codes within +-LOGIT_LIMIT."""
        return self.logit_scale() / self.scale, 0, -LOGIT_LIMIT, LOGIT_LIMIT

    def out_grid(self) -> tuple[float, int, int, int]:
        return 1.0 / (1 << SOFTMAX_BITS), -128, -128, 127

    def freeze(self) -> None:
        if self.kernel is None and float(self.amax) == 0.0:
            raise FxoptError("integer softmax saw no data (or only zero logits), so it has no logits grid",
                             hint="calibrate with real batches: compile(..., calibration=batches)")
        super().freeze()

    def build(self) -> nn.Module:
        return IntSoftmax(self.logit_scale())


class IntegerGELU(IntegerOp):
    """GELU (erf form) from int8 codes to int8 codes, by i-GELU."""

    kind = "gelu"

    def __init__(self, observer: str = "minmax", act_symmetric: bool = False):
        spec = QSpec(8, symmetric=act_symmetric)
        super().__init__(observer, spec, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)
        return self._observe(F.gelu(self._observe(x, self.input_fq)), self.output_fq)

    def build(self) -> nn.Module:
        (s_in, z_in, _, _), (s_out, z_out, _, _) = self.in_grid(), self.out_grid()
        return IntGELU(s_in, z_in, s_out, z_out)


class IntegerLayerNorm(IntegerOp):
    """LayerNorm over the last axis from 16-bit symmetric codes to int8 codes."""

    kind = "layernorm"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float, observer: str = "minmax",
                 act_symmetric: bool = False):
        super().__init__(observer, QSpec(RESIDUAL_BITS, symmetric=True), QSpec(8, symmetric=act_symmetric))
        self.register_buffer("weight", weight.detach().clone().float())
        self.register_buffer("bias", bias.detach().clone().float())
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)
        y = F.layer_norm(self._observe(x, self.input_fq), self.weight.shape, self.weight, self.bias, self.eps)
        return self._observe(y, self.output_fq)

    def build(self) -> nn.Module:
        (s_in, _, _, _), (s_out, z_out, _, _) = self.in_grid(), self.out_grid()
        return IntLayerNorm(s_in, self.weight.numel(), self.eps, self.weight, self.bias, s_out, z_out,
                            in_bits=RESIDUAL_BITS)


LUT_FUNCTIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid,
                 "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class IntegerLut(IntegerOp):
    """An element-wise function (tanh, sigmoid, tanh-approximate GELU) from int8 codes to int8
    codes through a 256-entry table: the exact rounding of the function on every code."""

    kind = "lut"

    def __init__(self, function: str, observer: str = "minmax", act_symmetric: bool = False):
        spec = QSpec(8, symmetric=act_symmetric)
        super().__init__(observer, spec, spec)
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)
        return self._observe(LUT_FUNCTIONS[self.function](self._observe(x, self.input_fq)), self.output_fq)

    def table(self) -> list[int]:
        """Entry c + 128: the output code of input code c."""
        (s_in, z_in, _, _), (s_out, z_out, _, _) = self.in_grid(), self.out_grid()
        fn = lambda v: LUT_FUNCTIONS[self.function](torch.from_numpy(v)).numpy()  # noqa: E731
        return lut(fn, s_in, z_in, s_out, z_out).tolist()

    def build(self) -> nn.Module:
        return _TableKernel(self.table(), self.in_grid(), self.out_grid())


class _TableKernel(nn.Module):
    def __init__(self, table: list[int], in_grid, out_grid):
        super().__init__()
        self.register_buffer("table", torch.tensor(table, dtype=torch.int64))
        self.grids = (in_grid[:2], out_grid[:2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (s_in, z_in), (s_out, z_out) = self.grids
        codes = (torch.round(x.double() / s_in) + z_in).clamp(-128, 127).to(torch.int64)
        return ((self.table.to(x.device)[codes + 128] - z_out).double() * s_out).to(x.dtype)


def has_integer_ops(module: torch.nn.Module) -> bool:
    """Whether a graph module holds integer ops (fake-quant{integer=true})."""
    return any(isinstance(m, IntegerOp) for m in module.modules())


def integer_op_of(gm: torch.nn.Module, node) -> IntegerOp | None:
    """The IntegerOp a call_module node runs; None for any other node."""
    if getattr(node, "op", None) == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, IntegerOp):
            return module
    return None

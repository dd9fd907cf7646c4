"""The int8 grid a value's codes lie on, and the fixed-point helpers every op family shares.

A `Grid` is what an activation quantizer fixes (scale, zero point, code range); an
`OutputForm` is where a producer's result goes (codes on a grid, or int32 accumulators)
within the real interval of the clamps fused into it. The helpers turn a real interval
into code or int32 bounds and measure how far codes reach from their zero point: the
numbers each layer's requantization and accumulator-width proof are built from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import node_location
from ...ir.nodes import arg
from ...quant import FakeQuantize
from ...quant.integer_modules import stored_grid

aten = torch.ops.aten
INT32_LIMIT = (1 << 31) - 1


@dataclass(frozen=True)
class Grid:
    """An int8 grid: real = scale * (q - zero_point), q in [qmin, qmax]."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @classmethod
    def of(cls, fq: FakeQuantize, node: fx.Node) -> "Grid":
        if fq.bits > 8 or fq.axis is not None:
            raise UnsupportedError(
                f"fpga-int8: activation quantizer {fq.label or node.name} is {fq.bits}-bit "
                f"{'per-channel' if fq.axis is not None else 'per-tensor'}; the export holds per-tensor "
                "activations of at most 8 bits", where=node_location(node),
                hint="use fake-quant{act_bits=8} (the default)")
        return cls(*stored_grid(fq))                    # unsigned 8-bit codes stored as int8

    @classmethod
    def of_tensor(cls, tensor: dict) -> "Grid":
        """The grid of an int8 tensor record of the model."""
        return cls(tensor["scale"], tensor["zero_point"], tensor["qmin"], tensor["qmax"])

    @classmethod
    def of_integer_op(cls, grid: tuple[float, int, int, int]) -> "Grid":
        """A grid an integer op (quant.integer_modules) reads or writes: (scale, zp, qmin, qmax)."""
        return cls(float(grid[0]), int(grid[1]), int(grid[2]), int(grid[3]))

    @property
    def wide(self) -> bool:
        """Codes beyond int8 (a 16-bit residual stream, int32 logits): held in int32, zero point 0."""
        return self.qmin < -128 or self.qmax > 127

    def code(self, real: float) -> int:
        return int(min(max(self.zero_point + round(real / self.scale), self.qmin), self.qmax))

    def tensor(self, shape, source: str) -> dict:
        if self.wide:
            return {"dtype": "int32", "shape": list(shape), "source": source, "scale": [self.scale],
                    "scale_shape": [1], "bound": max(-self.qmin, self.qmax)}
        return {"dtype": "int8", "shape": list(shape), "source": source, "scale": self.scale,
                "zero_point": self.zero_point, "qmin": self.qmin, "qmax": self.qmax}


@dataclass
class OutputForm:
    """Where a producer's result goes: codes on `grid` (None: int32) within real [lo, hi]."""

    grid: Grid | None
    lo: float
    hi: float
    last: fx.Node        # the last fused clamp (or the producer): whose value the tensor holds


def clamp_range(node: fx.Node) -> tuple[float, float]:
    """The real interval a ReLU / ReLU6 / hardtanh / clamp node keeps."""
    if node.target in (aten.relu.default, aten.relu_.default, torch.relu):
        return 0.0, math.inf
    if node.target == aten.relu6.default:
        return 0.0, 6.0
    hardtanh = node.target in (aten.hardtanh.default, aten.hardtanh_.default)
    names, defaults = (("min_val", "max_val"), (-1.0, 1.0)) if hardtanh else (("min", "max"), (None, None))
    lo, hi = (arg(node, i + 1, names[i], defaults[i]) for i in range(2))
    return (-math.inf if lo is None else float(lo)), (math.inf if hi is None else float(hi))


def code_bounds(grid: Grid, lo: float, hi: float) -> list[int]:
    """A real interval [lo, hi] as code bounds on `grid` (the grid's range if unbounded)."""
    return [grid.qmin if lo == -math.inf else grid.code(lo), grid.qmax if hi == math.inf else grid.code(hi)]


def int32_bounds(scales: np.ndarray, lo: float, hi: float) -> list[list[int]]:
    """Per-channel int32 bounds of a real interval at per-channel accumulator scales."""
    def bound(v, default):
        if math.isinf(v):
            return [default] * len(scales)
        return [int(np.clip(np.round(v / s), -INT32_LIMIT, INT32_LIMIT)) for s in scales]
    return [bound(lo, -INT32_LIMIT), bound(hi, INT32_LIMIT)]


def spread(tensor: dict) -> int:
    """max |q - zero_point| over an int8 tensor's grid: the largest centred code it can hold."""
    return max(tensor["zero_point"] - tensor["qmin"], tensor["qmax"] - tensor["zero_point"])


"""node.meta keys owned by fxopt, and the small record stored under them.

Keys are namespaced `fxopt.<owner>`; each is written by exactly one analysis
(or by the tracer, which runs that analysis once up front).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TENSOR = "fxopt.tensor"          # TensorInfo, or a tuple/list of them for tuple outputs; owner: Shapes
INPUT_SHAPES = "fxopt.input_shapes"  # on gm.meta: tuple of TensorInfo of the example inputs; owner: trace
PIPELINE_BEFORE = "fxopt.pipeline_before"  # gm.meta: pipeline text run before the current pass


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and device of one tensor value, without its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorInfo":
        return cls(tuple(int(s) for s in t.shape), t.dtype, t.device)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __str__(self) -> str:
        dims = "x".join(str(s) for s in self.shape) or "scalar"
        return f"{str(self.dtype).removeprefix('torch.')}[{dims}]"


def describe(value):
    """TensorInfo for a tensor, a tuple of them for a tuple/list, None otherwise."""
    if isinstance(value, torch.Tensor):
        return TensorInfo.of(value)
    if isinstance(value, (tuple, list)):
        return tuple(describe(v) for v in value)
    return None


def tensor_info(node) -> TensorInfo | None:
    """The TensorInfo of a node whose value is a single tensor, else None."""
    info = node.meta.get(TENSOR)
    return info if isinstance(info, TensorInfo) else None

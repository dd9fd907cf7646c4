"""node.meta keys owned by fxopt, and the small record stored under them.

Keys are namespaced `fxopt.<owner>`; each is written by exactly one analysis
(or by the tracer, which runs that analysis once up front).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

TENSOR = "fxopt.tensor"          # TensorInfo, or a tuple/list of them for tuple outputs; owner: Shapes
INPUT_SHAPES = "fxopt.input_shapes"  # on gm.meta: tuple of TensorInfo of the example inputs; owner: trace
INPUT_NAMES = "fxopt.input_names"    # on gm.meta: the name of each flat input (placeholder); owner: trace
# on gm.meta: per input, per dim, the name of its size symbol (None: static); inputs whose dims
# share a symbol must share the size; INPUT_RANGES: {symbol: (min, max or None)}; owner: trace
INPUT_SYMBOLS = "fxopt.input_symbols"
INPUT_RANGES = "fxopt.input_ranges"
CALIBRATION_SAMPLE = "fxopt.calibration_sample"  # gm.meta: the first calibration batches (not copied),
#   which a backend checks its kernels on; owner: api._run_batches
CALIBRATION_SAMPLE_SIZE = 4                      # how many of them are kept


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and device of one tensor value, without its data.

    `shape` holds the sizes at the example inputs (a symbolic size is stored as its
    example value, so cost and channel counts are plain ints); `dynamic` names the
    dims that may take other sizes at run time: on the graph's inputs it is the
    contract calls are checked against; on other values it is what shape propagation
    saw (some torch kernels specialise a size), so it is left out of equality.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    dynamic: tuple[int, ...] = field(default=(), compare=False)   # informational between passes

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorInfo":
        sizes = tuple(t.shape)
        dynamic = tuple(i for i, s in enumerate(sizes)
                        if isinstance(s, torch.SymInt) and not s.node.expr.is_number)
        return cls(tuple(example_size(s) for s in sizes), t.dtype, t.device, dynamic)

    def accepts(self, other: "TensorInfo") -> bool:
        """Whether a value shaped like `other` fits: equal dtype, rank and static sizes."""
        return (self.dtype == other.dtype and len(self.shape) == len(other.shape)
                and all(a == b for i, (a, b) in enumerate(zip(self.shape, other.shape))
                        if i not in self.dynamic))

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

    def pattern(self) -> str:
        """What a value must look like: the dtype and sizes, * for a dim that varies."""
        dims = "x".join(("*" if i in self.dynamic else str(s)) for i, s in enumerate(self.shape))
        return f"{str(self.dtype).removeprefix('torch.')}[{dims or 'scalar'}]"


def example_size(size) -> int:
    """An int size, or the example value (hint) of a symbolic one, without adding a guard."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        if hint is None:
            from torch.fx.experimental.symbolic_shapes import size_hint
            hint = size_hint(size)
        return int(hint)
    return int(size)


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

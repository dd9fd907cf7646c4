"""What the RTL generator decides before writing any Verilog: stream orders, folding, requant plans.

Stream order. Every tensor crosses a layer boundary as a stream of one element per beat.
An image tensor [C, H, W] streams pixel by pixel with the channels of a pixel together
(H, W, C order), so a convolution needs only a few rows of its input at a time (its line
buffer). Other tensors stream in row-major order. A reshape moves no data: its output keeps
its input's stream order, recorded as a permutation (`perm[s]` = the row-major index of the
element at stream position s), and a linear layer reading a flattened image takes the
permutation into its weight columns instead of reordering the data.

Folding. A conv / linear computes one output pixel (one vector for a linear) per group of
channels from a window of K = I/groups * kh * kw inputs. `Fold` spreads its MACs over Q
output lanes x L multipliers, so each output pixel costs at most `reuse_factor` MAC cycles
per group with about MACs / reuse_factor multipliers, as hls4ml's reuse factor does.

Requant plan. fixedpoint.requantize (and the C++ `requant`) branch on the multiplier and
the shift, which are constants per channel; `requant_plan` resolves the branch at
generation time into one datapath: ((acc * mult) << pre), then in "double" mode the
SRDHM high half, then a rounded right shift by `post` (half to even for "single", half
away from zero for "double"), or the constant 0. `datapath` is that datapath in Python
integers, checked against fixedpoint.requantize by the tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ....errors import UnsupportedError
from ....quant.fixedpoint import MAX_SHIFT, POW2_MULTIPLIER

MASK64 = (1 << 64) - 1
SUPPORTED = ("conv2d", "linear", "max_pool2d", "avg_pool2d", "add", "concat", "requantize", "clamp", "reshape",
             "lut", "gelu")


def refuse(layer: dict, why: str, hint: str) -> UnsupportedError:
    return UnsupportedError(f"fpga-int8 RTL: layer {layer['name']!r} ({layer['op']}): {why}",
                            where=f"layer {layer['name']!r}", hint=hint)


# ---- stream orders ------------------------------------------------------------------------------
def canonical_perm(shape) -> np.ndarray:
    """Row-major indices in stream order: (H, W, C) for an image [C, H, W], else row-major."""
    index = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    return index.transpose(1, 2, 0).reshape(-1) if len(shape) == 3 else index.reshape(-1)


def stream_perms(spec: dict) -> dict[str, np.ndarray]:
    """{tensor: perm} for every tensor; a layer whose inputs do not arrive in an order it can
    read is refused by name."""
    perms = {e["name"]: canonical_perm(e["shape"]) for e in spec["inputs"]}
    for layer in spec["layers"]:
        op, ins = layer["op"], [perms[name] for name in layer["inputs"]]
        if op not in SUPPORTED:
            raise refuse(layer, "has no RTL form", "export without rtl=True, or change the model")
        if op == "add" and not np.array_equal(ins[0], ins[1]):
            raise refuse(layer, "its two inputs stream in different orders",
                         "add tensors of the same layout (not a reshaped one to an image)")
        if op in ("reshape", "clamp", "requantize", "add", "lut", "gelu"):  # element-wise: the order passes
            perms[layer["output"]] = ins[0]
            continue
        in_shape = spec["tensors"][layer["inputs"][0]]["shape"]
        vector = op == "linear" and len(in_shape) == 1             # the weights take the input's order
        canonical_in = all(np.array_equal(p, canonical_perm(spec["tensors"][n]["shape"]))
                           for p, n in zip(ins, layer["inputs"]))
        rank_ok = len(in_shape) in (1, 2) if op == "linear" else len(in_shape) == 3
        if not vector and not (canonical_in and rank_ok):
            raise refuse(layer, f"reads a tensor of shape {in_shape} in an order it cannot stream",
                         "convolutions and pools read images [C, H, W]; a linear reads a vector or rows")
        perms[layer["output"]] = canonical_perm(spec["tensors"][layer["output"]]["shape"])
    return perms


# ---- folding ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fold:
    lanes: int        # Q output channels computed side by side
    width: int        # L multipliers per lane (window elements per cycle)
    depth: int        # D = ceil(K / L) MAC cycles per block of Q channels
    blocks: int       # ceil(outputs per group / Q)

    @property
    def multipliers(self) -> int:
        return self.lanes * self.width


def fold(window: int, outputs_per_group: int, reuse_factor: int) -> Fold:
    """The fewest Q x L multipliers for a window of K inputs and Og outputs per group such that
    one group takes at most reuse_factor MAC cycles (B blocks of D cycles), as hls4ml's
    ceil(K * Og / reuse_factor) does where the factor divides evenly; ties go to fewer cycles,
    then fewer lanes (each lane has a requant unit in parallel io)."""
    best = None
    for cycles in range(1, min(window, reuse_factor) + 1):
        width = math.ceil(window / cycles)
        depth = math.ceil(window / width)
        lanes = math.ceil(outputs_per_group / max(1, min(reuse_factor // depth, outputs_per_group)))
        blocks = math.ceil(outputs_per_group / lanes)
        key = (lanes * width, blocks * depth, lanes)
        if best is None or key < best[0]:
            best = (key, Fold(lanes, width, depth, blocks))
    return best[1]


def requant_chunk(outputs: int, reuse_factor: int) -> int:
    """Bits of the multiplier taken per cycle by a layer's requant unit: all 31 at once when
    the layer has no cycles to spare, fewer (a smaller multiplier) when its MACs take about
    reuse_factor cycles per pixel anyway."""
    spare = max(1, min(31, reuse_factor // max(outputs, 1)))
    return math.ceil(31 / spare)


# ---- requant plans ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequantPlan:
    mult: int       # multiplier of the 64-bit product (M0, or 1 for a shift alone)
    pre: int        # left shift of the product (0..63)
    post: int       # rounded right shift (0..62)
    zero: bool      # the result is 0 whatever the input


def requant_plan(m0: int, shift: int, rounding: str) -> RequantPlan:
    """The datapath settings that compute fixedpoint.requantize(acc, m0, shift, rounding)."""
    m0, shift = int(m0), int(shift)
    if m0 == POW2_MULTIPLIER:
        e = shift - 1
        if e >= 0:
            return RequantPlan(1, min(e, 64) % 64, 0, e >= 64)
        if rounding == "single":
            return RequantPlan(1, 0, min(-e, MAX_SHIFT), -e > MAX_SHIFT)
        return RequantPlan(1, 0, min(-e, MAX_SHIFT), False)
    if rounding == "single":
        total = 31 - shift
        return RequantPlan(m0, 0, max(min(total, MAX_SHIFT), 0), total > MAX_SHIFT)
    left = max(shift, 0)
    return RequantPlan(m0, left % 64, min(max(-shift, 0), MAX_SHIFT), left >= 64)


def _signed64(v: int) -> int:
    v &= MASK64
    return v - (1 << 64) if v >> 63 else v


def datapath(acc: int, plan: RequantPlan, rounding: str) -> int:
    """The RTL requant unit in Python integers (64-bit two's complement wherever the RTL is)."""
    if plan.zero:
        return 0
    x = _signed64((acc * plan.mult) << plan.pre)
    if rounding == "double" and plan.mult != 1:                  # SRDHM: high half, rounded half up
        num = _signed64(x + ((1 << 30) if x >= 0 else 1 - (1 << 30)))
        x = num >> 31 if num >= 0 else -((-num) >> 31)
    if plan.post == 0:
        return x
    q, guard = x >> plan.post, (x >> (plan.post - 1)) & 1
    sticky = (x & ((1 << (plan.post - 1)) - 1)) != 0
    up = guard and (sticky or q & 1) if rounding == "single" else guard and (x >= 0 or sticky)
    return q + int(up)

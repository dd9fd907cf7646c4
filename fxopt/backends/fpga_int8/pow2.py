"""pow2-scales: move every quantizer's scale up to the next power of two.

With every scale a power of two, each requantization ratio s_x * s_w / s_y is one
too, and the hardware rescales with a shift alone (no multiplier). Rounding a scale
up keeps the calibrated range on the grid but coarsens it by up to 2x: the model
that is exported (and checked against) is this adjusted fake-quant model, and
`pow2_cost` says what the change costs at the model's outputs. Integer ops (softmax, GELU,
LayerNorm, tables) rebuild their kernels on their adjusted grids; the softmax's logits grid is
its own and stays.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from ...quant import FakeQuantize
from ...quant.fixedpoint import pow2_ceil
from ...quant.integer_modules import IntegerOp


def with_pow2_scales(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of gm whose FakeQuantize scales are powers of two (zero points re-derived)."""
    adjusted = copy.deepcopy(gm)
    with torch.no_grad():
        for fq in adjusted.modules():
            if not isinstance(fq, FakeQuantize):
                continue
            old_scale, old_zero = fq.scale.detach().double(), fq.zero_point.double()
            new_scale = torch.from_numpy(pow2_ceil(old_scale.numpy()))
            if not fq.symmetric:        # keep the real value of qmin on the grid: lo = s * (qmin - z)
                lo = old_scale * (fq.qmin - old_zero)
                new_zero = (fq.qmin - torch.round(lo / new_scale)).clamp(fq.qmin, fq.qmax)
                fq.zero_point.copy_(new_zero.to(torch.int32))
            fq.scale.copy_(new_scale.to(fq.scale.dtype))
        for op in adjusted.modules():        # integer ops rebuild their kernels on the new grids
            if isinstance(op, IntegerOp) and op.frozen:
                op.kernel = op.build()
    return adjusted


def pow2_cost(original: fx.GraphModule, adjusted: fx.GraphModule, example_inputs: tuple) -> dict:
    """How far the pow2 model's outputs move from the original fake-quant model's."""
    with torch.no_grad():
        a = torch.cat([t.reshape(-1) for t in _flat(original(*example_inputs))]).double()
        b = torch.cat([t.reshape(-1) for t in _flat(adjusted(*example_inputs))]).double()
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    rel = float((a - b).norm() / a.norm().clamp_min(1e-12))
    return {"output_cosine": cosine, "output_relative_error": rel}


def _flat(out) -> list[torch.Tensor]:
    """The output tensors of a model (a tensor, tuple, dict or ModelOutput: any pytree)."""
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]

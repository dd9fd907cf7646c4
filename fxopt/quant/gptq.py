"""GPTQ: error-compensated rounding of a layer's weight (Frantar et al., 2022).

Round-to-nearest rounds every weight on its own. GPTQ rounds the input columns of
a weight W [out, in] one at a time and, after each, moves the rounding error onto
the columns not yet rounded, weighted by how the layer's inputs correlate, so the
layer's output W X (not W itself) stays as close as it can:

    H = X Xᵀ                      (inputs as columns; for a conv, unfolded patches)
    U = chol(H⁻¹)ᵀ                (upper Cholesky factor of the inverse)
    for column j:  q_j = round(w_j);  e = (w_j - q_j) / U[j, j];  W[:, j+1:] -= e U[j, j+1:]

Blocks of columns (128) are updated lazily: inside a block column by column, the
rest of the matrix once per block with one matmul, so a 1536-column layer takes
well under a second on a CPU.

H gets 1% of its mean diagonal added (dampening: the inverse of a rank-deficient
H is otherwise meaningless). An input that never fires (zero diagonal) gets 1 on
the diagonal and no coupling: its column is rounded to nearest and passes no error on.

The grid is the one the fake-quant weight quantizer holds (QSpec with axis 0, per
channel or per group of columns); the scales are fixed before the rounding (given, or
the min/max ones of the float weight), so the returned weight lies exactly on that grid.
"""
from __future__ import annotations

import torch

from .qparams import QSpec, as_groups, param_view, qparams_from_range

__all__ = ["DAMPENING", "gptq_quantize", "nearest_quantize", "reconstruction_error", "weight_scales"]

DAMPENING = 0.01
BLOCK = 128


def weight_scales(weight: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) per channel or per group of a 2-D weight: its min/max grid."""
    rows = as_groups(weight.detach().float(), spec)
    return qparams_from_range(rows.amin(dim=1), rows.amax(dim=1), spec)


def _round(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Nearest grid value of w (element-wise scale s and zero point z)."""
    if spec.symmetric:
        return torch.div(w, s).round_().clamp_(spec.qmin, spec.qmax).mul_(s)
    return (torch.clamp(torch.round(w / s) + z, spec.qmin, spec.qmax) - z) * s


def nearest_quantize(weight: torch.Tensor, spec: QSpec, scale=None, zero_point=None) -> torch.Tensor:
    """Round-to-nearest on the same grid as gptq_quantize (the baseline it is compared with)."""
    w = weight.detach().float()
    if scale is None:
        scale, zero_point = weight_scales(w, spec)
    return _round(w, param_view(scale, w, spec), param_view(zero_point, w, spec).float(), spec)


def _inverse_factor(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of the dampened H⁻¹ (float64); more dampening if H is not
    numerically positive definite."""
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    damp = DAMPENING * float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        damp *= 10
    raise ValueError("the input Hessian is not positive definite even with strong dampening")


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QSpec,
                  scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None):
    """(dequantized weight, scale, zero_point) of a 2-D weight [out, in] rounded by GPTQ
    under the input Hessian [in, in], on the grid of `spec` (axis 0, per channel or per
    group along the input dim). `scale` / `zero_point`: the grid's parameters (default:
    min/max of the weight). Columns are rounded in order of decreasing H diagonal (the
    inputs with the most energy first, while the most columns are left to absorb their
    error: GPTQ's "act order"); the grid stays the one given, so the order changes no scale."""
    if spec.binary or spec.axis != 0 or weight.dim() != 2:
        raise ValueError("GPTQ rounds a 2-D weight onto a >= 2-bit grid per output channel (axis 0)")
    w = weight.detach().float().clone()
    if scale is None:
        scale, zero_point = weight_scales(w, spec)
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    s_full = param_view(scale.float(), w, spec).expand_as(w)[:, order]
    z_full = param_view(zero_point, w, spec).float().expand_as(w)[:, order]
    rounded = _rounded(w[:, order], hessian[order][:, order], s_full, z_full, spec)
    out = torch.empty_like(w)
    out[:, order] = rounded
    return out.to(weight.dtype), scale, zero_point


def _rounded(w: torch.Tensor, hessian: torch.Tensor, s_full: torch.Tensor, z_full: torch.Tensor,
             spec: QSpec) -> torch.Tensor:
    """The GPTQ loop over the columns of w in their given order (element-wise grid s, z).
    It runs on the transpose, so each column is one contiguous row."""
    upper = _inverse_factor(hessian).to(w)
    wt, st, zt = w.t().contiguous(), s_full.t().contiguous(), z_full.t().contiguous()
    out = torch.empty_like(wt)
    cols = wt.shape[0]
    for start in range(0, cols, BLOCK):
        stop = min(start + BLOCK, cols)
        block, inv = wt[start:stop].clone(), upper[start:stop, start:stop]
        diagonal = torch.diagonal(inv).tolist()
        errors = torch.empty_like(block)
        for i in range(stop - start):
            j = start + i
            out[j] = _round(block[i], st[j], zt[j], spec)
            err = torch.sub(block[i], out[j]).div_(diagonal[i])
            block[i:].addr_(inv[i, i:], err, alpha=-1)
            errors[i] = err
        wt[stop:].addmm_(upper[start:stop, stop:].t(), errors, alpha=-1)
    return out.t()


def reconstruction_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X - W_q X|| / ||W X|| from H = X Xᵀ alone (Frobenius norms)."""
    w, d, h = weight.double(), (weight - quantized).double(), hessian.double()
    num = float(torch.einsum("oi,ij,oj->", d, h, d))
    den = float(torch.einsum("oi,ij,oj->", w, h, w))
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0

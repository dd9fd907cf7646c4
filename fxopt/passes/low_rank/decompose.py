"""Low-rank factorisations of linear and conv weights, optionally whitened by the Gram
matrix of the layer's calibration inputs.

Why whiten: a factorisation is judged by what it does to the layer's output, not to its
weight. With gram = X X^T = L L^T, ||(W - W') X||_F = ||(W - W') L||_F, so truncating an
SVD of W L minimises the output error, and the squared singular values of W L read as
output error energy. A plain SVD (no gram) treats every input direction as equally used.

All arithmetic is float64; the factors are rounded once, to float32, at the end (they are
run or quantized in float32 later, and rounding inside the algebra would be compounded).
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

__all__ = ["MatrixSVD", "factorize_matrix", "matrix_spectrum", "spatial_decomposition", "spatial_factors",
           "spatial_spectrum", "spatial_svd", "tucker2", "tucker2_spectra", "whitening"]

_WIDE = 2            # a matrix this many times wider than tall takes the Gram route
_MAX_DAMPING = 1e-1
_FIRST_RETRY = 1e-8  # where the retries start when the caller asked for no damping at all


# -- whitening ---------------------------------------------------------------------------------
def whitening(gram: Tensor, damping: float = 1e-4) -> Tensor:
    """Lower-triangular L with gram + damping*mean(diag(gram))*I = L @ L.T (Cholesky, float64).

    Why: ||(W - W') X||_F^2 = ||(W - W') L||_F^2, so an SVD of W @ L truncates for output
    error. The damping is relative to the mean diagonal so it means the same at any input
    scale; it keeps directions the calibration data never excited from blowing up L^-1.
    If Cholesky fails (a rank-deficient gram), retry with damping x10 up to 1e-1 of the
    mean diagonal; raise ValueError after that. An all-zero gram (inputs that were always
    zero) is damped against a unit scale, which makes the whitened SVD a plain one.
    """
    g = _float64(gram)
    if g.dim() != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
        raise ValueError(f"gram must be a non-empty square matrix, got shape {tuple(g.shape)}")
    if not bool(torch.isfinite(g).all()):
        raise ValueError("gram has non-finite entries (inf or nan): check the calibration inputs")
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    g = (g + g.T) / 2
    scale = float(g.diagonal().mean())
    scale = scale if scale > 0 else 1.0
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    tried = damping
    while True:
        factor, info = torch.linalg.cholesky_ex(g + (tried * scale) * eye)
        if int(info) == 0 and bool(torch.isfinite(factor).all()):
            return factor
        if tried >= _MAX_DAMPING:
            raise ValueError(f"gram ({g.shape[0]}x{g.shape[0]}) is not positive definite even with "
                             f"damping {tried:g} of its mean diagonal: pass more calibration data "
                             "or decompose without a gram")
        tried = min(max(tried * 10, _FIRST_RETRY), _MAX_DAMPING)


# -- matrices (linear layers) ------------------------------------------------------------------
class MatrixSVD:
    """The SVD of a weight matrix (out, in), whitened on the input side when a gram is given,
    computed once: its spectrum for the rank policies and balanced factors at any rank.

    Why one object: the policies read the spectrum and the rewrite then needs the vectors;
    for a large layer (a 4096 x 25088 classifier) one decomposition costs seconds. A
    clearly non-square matrix is decomposed through its small Gram matrix (a GEMM and a
    small symmetric eigenproblem instead of an SVD of the whole matrix). Factors are built
    as projections (U U^T W or W V V^T), so they are exact however small the singular
    values are; in float64 the squared condition number only blurs values below ~1e-8 of
    the largest, which no rank policy distinguishes.
    """

    def __init__(self, weight2d: Tensor, gram: Tensor | None = None, *, damping: float = 1e-4):
        w = _matrix(weight2d)
        self.factor = _whitening_for(gram, w.shape[1], damping)
        a = w if self.factor is None else w @ self.factor
        rows, cols = a.shape
        self.a, self.u, self.v = a, None, None
        if cols >= _WIDE * rows:
            squares, u = torch.linalg.eigh(a @ a.T)
            self.u = u.flip(1)
        elif rows >= _WIDE * cols:
            squares, v = torch.linalg.eigh(a.T @ a)
            self.v = v.flip(1)
        else:
            u, values, vh = torch.linalg.svd(a, full_matrices=False)
            self.u, self.v, squares = u, vh.T, (values ** 2).flip(0)
        self.values = squares.flip(0).clamp_min(0).sqrt()

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """(first (rank, in), second (out, rank)) float32, second @ first ~= the weight.
        S is split evenly (first = sqrt(S) V^T L^-1, second = U sqrt(S)), so both factors
        have similar ranges: they are quantized later, and a lopsided split would waste the
        bits of one of them."""
        rank = _check_rank(rank, self.a.shape, "weight")
        floor = max(float(self.values[0]), 1e-300) * 1e-12
        root = self.values[:rank].clamp_min(floor).sqrt()
        if self.u is not None and self.v is not None:
            first, second = root[:, None] * self.v[:, :rank].T, self.u[:, :rank] * root
        elif self.u is not None:
            u = self.u[:, :rank]
            first, second = (u.T @ self.a) / root[:, None], u * root
        else:
            v = self.v[:, :rank]
            first, second = root[:, None] * v.T, (self.a @ v) / root
        if self.factor is not None:
            first = _times_inverse(first, self.factor)
        return first.float(), second.float()


def matrix_spectrum(weight2d: Tensor, gram: Tensor | None = None, *, damping: float = 1e-4) -> Tensor:
    """Singular values (descending, float64) of weight2d (out, in), or of weight2d @ L when
    gram (in x in) is given: then sum(s[r:]**2) is exactly the output error energy
    ||(W - W_r) X||^2 of rank-r truncation (gram = X X^T summed over calibration rows;
    exactly for damping=0, otherwise for gram + damping*mean(diag)*I)."""
    return MatrixSVD(weight2d, gram, damping=damping).values


def factorize_matrix(weight2d: Tensor, rank: int, gram: Tensor | None = None, *,
                     damping: float = 1e-4) -> tuple[Tensor, Tensor]:
    """(first (rank, in), second (out, rank)) float32 with second @ first ~= weight2d: the
    plain SVD without gram, the whitened one with it (W L = U S V^T, W_r = U_r S_r V_r^T
    L^-1, by a triangular solve). rank must be 1..min(out, in). See MatrixSVD."""
    return MatrixSVD(weight2d, gram, damping=damping).factors(rank)


# -- Tucker-2 (convs: output and input channel modes) ------------------------------------------
def tucker2(weight4d: Tensor, ranks: tuple[int, int], gram: Tensor | None = None,
            iters: int = 5) -> tuple[Tensor, Tensor, Tensor]:
    """Tucker-2 of a conv weight (O, I, kh, kw) with ranks (r_out, r_in).

    Returns (first (r_in, I, 1, 1), core (r_out, r_in, kh, kw), last (O, r_out, 1, 1))
    float32 so that conv1x1(first) -> conv_khxkw(core, the original stride / padding /
    dilation) -> conv1x1(last) equals the rank-(r_out, r_in) approximation (a 1x1 conv
    without bias commutes with zero padding, so the padding can stay on the middle conv).

    Init by HOSVD (leading left singular vectors of the mode-0 and mode-1 unfoldings), then
    `iters` HOOI sweeps, each of which refits one mode's subspace with the other fixed (the
    HOSVD subspaces are only a good guess for the joint problem). With gram (I x I, the
    input-channel Gram matrix per pixel) everything runs on the whitened weight
    W'[o,j,y,x] = sum_i W[o,i,y,x] L[i,j] and the input factor is mapped back,
    first = U_in'^T L^-1, so both modes are fitted for output error rather than weight error.
    At full ranks (O, I) the result reproduces the weight within float32 rounding.
    """
    w = _conv_weight(weight4d)
    r_out, r_in = _tucker_ranks(ranks, w.shape)
    if operator.index(iters) < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    factor = _whitening_for(gram, w.shape[1], 1e-4)
    wt = _whiten_inputs(w, factor)
    u_out = _leading(_unfold(wt, 0), r_out)
    u_in = _leading(_unfold(wt, 1), r_in)
    for _ in range(iters):
        u_in = _leading(_unfold(torch.einsum("oa,ojyx->ajyx", u_out, wt), 1), r_in)
        u_out = _leading(_unfold(torch.einsum("ojyx,jb->obyx", wt, u_in), 0), r_out)
    core = torch.einsum("oa,ojyx,jb->abyx", u_out, wt, u_in)
    first = u_in.T if factor is None else _times_inverse(u_in.T, factor)
    return (first[:, :, None, None].float().contiguous(), core.float().contiguous(),
            u_out[:, :, None, None].float().contiguous())


def tucker2_spectra(weight4d: Tensor, gram: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Singular values (descending, float64) of the mode-0 (output) and mode-1 (input)
    unfoldings, both of the whitened weight W' when gram is given (the tensor tucker2
    truncates, so their tail energies are output error energies): what rank policies for
    Tucker-2 read."""
    w = _conv_weight(weight4d)
    wt = _whiten_inputs(w, _whitening_for(gram, w.shape[1], 1e-4))
    return _singular_values(_unfold(wt, 0)), _singular_values(_unfold(wt, 1))


# -- spatial separation (kh x kw -> kh x 1 then 1 x kw) ----------------------------------------
def spatial_decomposition(weight4d: Tensor, gram: Tensor | None = None) -> MatrixSVD:
    """The SVD behind the spatial separation of a kh x kw conv weight (O, I, kh, kw),
    kh > 1 and kw > 1: of M^T, M[(i, y), (o, x)] = W[o, i, y, x], whose inputs are the
    vertical patches (i, y); whitened by gram (I*kh x I*kh, their Gram) when given."""
    return MatrixSVD(_spatial_matrix(_conv_weight(weight4d)).T, gram)


def spatial_factors(svd: MatrixSVD, weight_shape, rank: int) -> tuple[Tensor, Tensor]:
    """(vertical (rank, I, kh, 1), horizontal (O, rank, 1, kw)) float32 from `svd`. The
    vertical conv takes stride (sh, 1), padding (ph, 0), dilation (dh, 1); the horizontal
    conv stride (1, sw), padding (0, pw), dilation (1, dw); the two in sequence equal the
    rank-r approximation. rank must be 1..min(I*kh, O*kw)."""
    out_channels, in_channels, kh, kw = weight_shape
    left, right = svd.factors(_check_rank(rank, svd.a.shape, "spatial matrix (O*kw, I*kh)"))
    vertical = left.reshape(rank, in_channels, kh, 1)
    horizontal = right.T.reshape(rank, out_channels, kw).permute(1, 0, 2).unsqueeze(2)
    return vertical.contiguous(), horizontal.contiguous()


def spatial_svd(weight4d: Tensor, rank: int, gram: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Spatial separation at rank `rank` (see spatial_decomposition and spatial_factors)."""
    return spatial_factors(spatial_decomposition(weight4d, gram), tuple(weight4d.shape), rank)


def spatial_spectrum(weight4d: Tensor, gram: Tensor | None = None) -> Tensor:
    """Singular values (descending, float64) of the spatial matrix, whitened when gram is
    given: the tail energy is then the output error energy of truncation."""
    return spatial_decomposition(weight4d, gram).values


# -- helpers -----------------------------------------------------------------------------------
def _float64(t) -> Tensor:
    return torch.as_tensor(t).detach().to(torch.float64)


def _matrix(weight2d) -> Tensor:
    w = _float64(weight2d)
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"expected a non-empty (out, in) weight matrix, got shape {tuple(w.shape)}")
    return w


def _conv_weight(weight4d) -> Tensor:
    w = _float64(weight4d)
    if w.dim() != 4 or w.numel() == 0:
        raise ValueError(f"expected a non-empty conv weight (O, I, kh, kw), got shape {tuple(w.shape)}")
    return w


def _spatial_matrix(w: Tensor) -> Tensor:
    out_channels, in_channels, kh, kw = w.shape
    if kh < 2 or kw < 2:
        raise ValueError(f"spatial separation needs a kernel of at least 2x2, got {kh}x{kw}")
    return w.permute(1, 2, 0, 3).reshape(in_channels * kh, out_channels * kw)


def _whitening_for(gram, size: int, damping: float) -> Tensor | None:
    """The whitening factor of gram (None without one), after checking it fits `size`."""
    if gram is None:
        return None
    if tuple(gram.shape) != (size, size):
        raise ValueError(f"gram must be {size}x{size} to match the weight, got shape {tuple(gram.shape)}")
    return whitening(gram, damping)


def _times_inverse(rows: Tensor, factor: Tensor) -> Tensor:
    """rows @ factor^-1 for lower-triangular factor, by a triangular solve (an explicit
    inverse of an ill-conditioned L loses digits the solve keeps)."""
    return torch.linalg.solve_triangular(factor.to(rows.device), rows, upper=False, left=False)


def _check_rank(rank, shape, what: str) -> int:
    limit = min(shape)
    try:
        value = operator.index(rank)
    except TypeError:
        value = None
    if value is None or isinstance(rank, bool) or not 1 <= value <= limit:
        raise ValueError(f"rank {rank} is out of range for the {what} of shape {tuple(shape)}: "
                         f"pass an integer from 1 to {limit}")
    return value


def _tucker_ranks(ranks, shape) -> tuple[int, int]:
    if len(ranks) != 2:
        raise ValueError(f"tucker2 ranks must be (r_out, r_in), got {ranks!r}")
    out_channels, in_channels = shape[:2]
    r_out = _check_rank(ranks[0], (out_channels,), f"output channels of the conv weight {tuple(shape)}")
    r_in = _check_rank(ranks[1], (in_channels,), f"input channels of the conv weight {tuple(shape)}")
    return r_out, r_in


def _whiten_inputs(w: Tensor, factor: Tensor | None) -> Tensor:
    return w if factor is None else torch.einsum("oiyx,ij->ojyx", w, factor)


def _unfold(t: Tensor, mode: int) -> Tensor:
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def _leading(m: Tensor, rank: int) -> Tensor:
    """The `rank` leading left singular vectors of m; when rank exceeds m's column count
    the rest is an orthonormal completion (so full ranks give a square orthogonal basis).
    A wide m (conv unfoldings: O x I*kh*kw) goes through the eigenvectors of m m^T, a
    small symmetric problem, instead of an SVD of the whole unfolding."""
    if m.shape[1] >= _WIDE * m.shape[0]:
        values, vectors = torch.linalg.eigh(m @ m.T)
        return vectors.flip(1)[:, :rank]
    u = torch.linalg.svd(m, full_matrices=m.shape[0] > m.shape[1])[0]
    return u[:, :rank]


def _singular_values(m: Tensor) -> Tensor:
    """Singular values of m, descending. For a clearly non-square m, the square roots of
    the eigenvalues of its small Gram matrix: one GEMM and a small symmetric eigenproblem
    instead of an SVD of the whole matrix (in float64 the squared condition number only
    blurs values below ~1e-8 of the largest, which no rank policy distinguishes)."""
    rows, cols = m.shape
    if max(rows, cols) < _WIDE * min(rows, cols):
        return torch.linalg.svdvals(m)
    small = m @ m.T if rows < cols else m.T @ m
    return torch.linalg.eigvalsh(small).clamp_min(0).sqrt().flip(0)

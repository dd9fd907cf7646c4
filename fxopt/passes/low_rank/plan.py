"""Per layer: which factorized form and which rank(s), under the pass's rank policy.

Every form of a layer gets a list of `Choice`s (ranks, MACs, estimated relative
output error). The error estimates come from spectra: the discarded share of the
squared singular values, of the whitened weight when calibration Gram matrices
exist (then it is the share of the layer's output energy lost, exactly for the
matrix form), of the weight itself otherwise. A Tucker-2 choice sums the discarded
shares of its two modes (an upper bound of the truncation's share).

Policies: `fixed` and `energy` give one choice per form (`energy` keeps at least that
share in every truncated spectrum); `vbmf` estimates each spectrum's rank by EVBMF
(from the same, possibly whitened, spectra).
Where a conv has two forms, the one with the smaller error at equal cost wins: the
other form is taken at its largest rank within the first one's MACs. `budget`
pools every form's choices per layer and `allot_budget` picks across layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import decompose as D
from .layers import Layer
from .ranks import Options, energy_rank, fixed_rank, vbmf_rank_of_values

BUDGET_STEPS = 96   # choices per form offered to the budget allotment


@dataclass(frozen=True)
class Choice:
    form: str                  # matrix | tucker2 | spatial
    ranks: tuple[int, ...]     # (r,) or (r_out, r_in)
    macs: int
    error: float               # estimated relative output (or weight) error energy

    @property
    def rank_text(self) -> str:
        return "x".join(str(r) for r in self.ranks)


@dataclass(frozen=True)
class Policy:
    name: str          # fixed | energy | vbmf | budget
    rank: float = 0.5
    energy: float = 0.9
    conv_form: str = "auto"


class Spectra:
    """The (whitened) spectra of one layer's forms, computed once; the matrix and spatial
    decompositions are kept for the rewrite (Tucker-2 is fitted per rank pair there)."""

    def __init__(self, layer: Layer, whiten: bool):
        self.layer = layer
        self.rows = layer.grams.get("rows") if whiten else None
        if layer.is_pointwise:
            self.matrix_svd = D.MatrixSVD(layer.matrix(), self.rows)
            self.matrix = self.matrix_svd.values
        else:
            self.modes = D.tucker2_spectra(layer.weight, self.rows)
            self.separable = min(layer.weight.shape[2:]) >= 2     # a k x 1 kernel has no spatial split
            if self.separable:
                self.spatial_svd = D.spatial_decomposition(layer.weight,
                                                           layer.grams.get("patches") if whiten else None)
                self.spatial = self.spatial_svd.values

    def forms(self, conv_form: str) -> list[str]:
        if self.layer.is_pointwise:
            return ["matrix"]
        if conv_form == "auto":
            return ["tucker2", "spatial"] if self.separable else ["tucker2"]
        return [conv_form]

    def choice(self, form: str, ranks: tuple[int, ...]) -> Choice:
        layer = self.layer
        if form == "matrix":
            return Choice(form, ranks, layer.matrix_macs(ranks[0]), _tail(self.matrix, ranks[0]))
        if form == "spatial":
            return Choice(form, ranks, layer.spatial_macs(ranks[0]), _tail(self.spatial, ranks[0]))
        r_out, r_in = ranks
        return Choice(form, ranks, layer.tucker2_macs(r_out, r_in),
                      _tail(self.modes[0], r_out) + _tail(self.modes[1], r_in))

    def full(self, form: str) -> tuple[int, ...]:
        if form == "matrix":
            return (len(self.matrix),)
        if form == "spatial":
            return (len(self.spatial),)
        return (len(self.modes[0]), len(self.modes[1]))


def _tail(values: torch.Tensor, rank: int) -> float:
    total = float((values ** 2).sum())
    return float((values[rank:] ** 2).sum()) / total if total > 0 else 0.0


# ---- one choice per layer: fixed / energy / vbmf ---------------------------------------

def choose(spectra: Spectra, policy: Policy) -> Choice:
    """The policy's choice for one layer (the better form at equal cost for a k x k conv).
    Raises ValueError (from the rank helpers) for a rank the layer cannot take."""
    forms = spectra.forms(policy.conv_form)
    first = spectra.choice(forms[0], _policy_ranks(spectra, forms[0], policy))
    if len(forms) == 1:
        return first
    other = _within(spectra, forms[1], first.macs)
    return other if other is not None and other.error < first.error else first


def _policy_ranks(spectra: Spectra, form: str, policy: Policy) -> tuple[int, ...]:
    full = spectra.full(form)
    if policy.name == "fixed":
        return tuple(fixed_rank(f, policy.rank) for f in full)
    if policy.name == "energy":
        values = [spectra.matrix] if form == "matrix" else [spectra.spatial] if form == "spatial" \
            else list(spectra.modes)
        return tuple(energy_rank(v, policy.energy) for v in values)
    return tuple(min(vbmf_rank_of_values(v, shape), f) for (v, shape), f in zip(_spectra_of(spectra, form), full))


def _spectra_of(spectra: Spectra, form: str) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """(singular values, matrix shape) of each spectrum a form truncates (whitened ones
    under activation-aware): what EVBMF reads."""
    if form == "matrix":
        return [(spectra.matrix, tuple(spectra.matrix_svd.a.shape))]
    if form == "spatial":
        return [(spectra.spatial, tuple(spectra.spatial_svd.a.shape))]
    o, i, kh, kw = spectra.layer.weight.shape
    return [(spectra.modes[0], (o, i * kh * kw)), (spectra.modes[1], (i, o * kh * kw))]


def _within(spectra: Spectra, form: str, macs: int) -> Choice | None:
    """The largest-rank choice of `form` costing at most `macs` (None if none does)."""
    best = None
    for choice in _ladder(spectra, form, steps=None):
        if choice.macs <= macs:
            best = choice
    return best


# ---- the budget policy ---------------------------------------------------------------------

def _ladder(spectra: Spectra, form: str, steps: int | None = BUDGET_STEPS) -> list[Choice]:
    """Choices of `form` from low to full rank: every rank (steps=None) or about `steps` of them.
    Tucker-2 ranks grow together, in proportion to the two mode sizes."""
    full = spectra.full(form)
    top = max(full)
    count = top if steps is None else min(top, steps)
    out = []
    for k in range(1, count + 1):
        frac = k / count
        ranks = tuple(max(1, math.ceil(frac * f)) for f in full)
        out.append(spectra.choice(form, ranks))
    return out


def budget_options(spectra: Spectra, conv_form: str) -> tuple[Options, list[Choice]]:
    """One layer's pooled choices for allot_budget: sorted by MACs, each cheaper than the
    next and kept only if it lowers the error (the lower envelope over the forms)."""
    pooled = sorted((c for form in spectra.forms(conv_form) for c in _ladder(spectra, form)),
                    key=lambda c: (c.macs, c.error))
    envelope: list[Choice] = []
    for c in pooled:
        if envelope and c.macs == envelope[-1].macs:
            continue
        if not envelope or c.error < envelope[-1].error:
            envelope.append(c)
    options = Options(tuple(float(c.macs) for c in envelope), tuple(c.error for c in envelope),
                      float(spectra.layer.dense_macs()))
    return options, envelope

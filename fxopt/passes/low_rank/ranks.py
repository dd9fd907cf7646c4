"""Rank policies for low-rank factorisation: a fixed rank or fraction, an energy
threshold on a spectrum, an estimate of the signal rank (EVBMF), and a MACs budget
allotted across layers by the error each layer's choices cost.

Spectra are read as error energies: with a whitened decomposition the tail energy
sum(s[r:]**2) is the output error energy of a rank-r truncation, so "keep 99% of the
energy" means "lose at most 1% of the output energy".
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Options", "allot_budget", "energy_rank", "fixed_rank", "kept_energy", "vbmf_rank"]


# -- fixed and energy ranks ---------------------------------------------------------------------
def fixed_rank(full: int, rank: float) -> int:
    """rank < 1: a fraction of full (ceil(rank * full), at least 1); rank >= 1: an absolute
    rank, which must be an integer value below full (an absolute rank at or above the full
    rank saves nothing and is almost always a mistaken option). ValueError otherwise, saying
    the layer's full rank and what to pass."""
    if full < 1:
        raise ValueError(f"full rank must be >= 1, got {full}")
    hint = (f"pass a fraction in (0, 1) or an integer rank from 1 to {full - 1}" if full > 1
            else "pass a fraction in (0, 1): this layer's full rank is 1")
    if not rank > 0:  # also catches nan
        raise ValueError(f"rank {rank} must be positive (this layer's full rank is {full}): {hint}")
    if rank < 1:
        # ceil of a product that should be an integer (0.3 * 10 = 3.0000000000000004) is its
        # value, not the next one
        return max(1, min(full, math.ceil(rank * full - 1e-9)))
    if not float(rank).is_integer():
        raise ValueError(f"rank {rank} is neither a fraction below 1 nor an integer "
                         f"(this layer's full rank is {full}): {hint}")
    if int(rank) >= full:
        raise ValueError(f"rank {int(rank)} is not below the full rank {full}: {hint}")
    return int(rank)


def energy_rank(values: Tensor, energy: float) -> int:
    """Smallest r with sum(values[:r]**2) / sum(values**2) >= energy (values descending).
    ValueError if energy is not in (0, 1]. All-zero values: 1 (nothing to keep, but a
    factorisation needs at least one component)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    fractions = _kept_fractions(values)
    if fractions is None:
        return 1
    return min(len(fractions), int((fractions < energy).sum()) + 1)


def kept_energy(values: Tensor, rank: int) -> float:
    """sum(values[:rank]**2) / sum(values**2); 1.0 for all-zero values. Computed from the
    same cumulative sums as energy_rank, so energy_rank's answer always passes this test."""
    fractions = _kept_fractions(values)
    if fractions is None:
        return 1.0
    if rank <= 0:
        return 0.0
    return float(fractions[min(rank, len(fractions)) - 1])


def _kept_fractions(values) -> Tensor | None:
    """Cumulative energy fractions (the last is exactly 1.0), None when there is no energy."""
    squares = torch.as_tensor(values).detach().to(torch.float64).flatten().cpu().pow(2)
    cumulative = squares.cumsum(0)
    if len(cumulative) == 0 or not float(cumulative[-1]) > 0:
        return None
    return cumulative / cumulative[-1]


# -- EVBMF ------------------------------------------------------------------------------------
_TAU_FACTOR = 2.5129  # tau_bar / sqrt(alpha): the root of the EVB threshold equation
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def vbmf_rank(matrix: Tensor) -> int:
    """Rank estimated by empirical variational Bayesian matrix factorisation (EVBMF, the
    global analytic solution of Nakajima et al. 2013, with the noise variance sigma^2
    estimated by minimising the free energy).

    In the orientation L <= M with singular values g_h: alpha = L/M,
    tau_bar = 2.5129 sqrt(alpha), x_bar = (1 + tau_bar)(1 + alpha/tau_bar); a component is
    kept iff g_h > sqrt(M sigma^2 x_bar). sigma^2 minimises
        sum_h psi(x_h),  x_h = g_h^2 / (M sigma^2),
        psi(x) = x - log x + [x > x_bar] (log(tau + 1) + alpha log(tau/alpha + 1) - tau),
        tau(x) = (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)) / 2
    over [lower, upper]: upper = sum g^2 / (L M), lower = max(g_{H+1}^2 / (M x_bar),
    mean(g_{>H}^2) / M) with H = ceil(L / (1 + alpha)) - 1 (at most that many components
    can be signal). The search is a grid over log sigma^2 refined by golden section (the
    free energy can have more than one local minimum). Returns at least 1.
    """
    m = torch.as_tensor(matrix).detach().to(torch.float64)
    if m.dim() != 2 or m.numel() == 0:
        raise ValueError(f"vbmf_rank needs a non-empty matrix, got shape {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()):
        raise ValueError("vbmf_rank: the matrix has non-finite entries")
    return vbmf_rank_of_values(torch.linalg.svdvals(m), tuple(m.shape))  # same for m and m.T


def vbmf_rank_of_values(values: Tensor, shape: tuple[int, int]) -> int:
    """vbmf_rank of a matrix of `shape` with singular values `values` (descending; all of
    them): the estimate needs nothing else, so a decomposition already made is reused."""
    short, long = sorted(shape)
    squares = torch.as_tensor(values).detach().to(torch.float64).cpu().pow(2)
    if not float(squares[0]) > 0:
        return 1
    alpha = short / long
    tau_bar = _TAU_FACTOR * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    lower, upper = _noise_bounds(squares, long, x_bar)

    def free_energy(log_sigma2: float) -> float:
        return _free_energy(squares, long * math.exp(log_sigma2), alpha, x_bar) + short * log_sigma2

    sigma2 = math.exp(_grid_golden_min(free_energy, math.log(lower), math.log(upper)))
    return max(1, int((squares > long * sigma2 * x_bar).sum()))


def _noise_bounds(squares: Tensor, long: int, x_bar: float) -> tuple[float, float]:
    """[lower, upper] bracketing the EVB noise variance (see vbmf_rank)."""
    short = len(squares)
    total = float(squares.sum())
    upper = total / (short * long)
    most = math.ceil(short / (1 + short / long)) - 1  # at most this many signal components
    lower = max(float(squares[most]) / (long * x_bar), float(squares[most:].mean()) / long)
    lower = max(lower, upper * 1e-14)  # an exactly low-rank matrix: noise variance ~ 0
    return min(lower, upper), upper


def _free_energy(squares: Tensor, scaled_sigma2: float, alpha: float, x_bar: float) -> float:
    """sum_h psi(x_h) without the terms that do not depend on sigma^2: -log x_h is
    log(M sigma^2) - log g_h^2, and dropping log g_h^2 keeps zero singular values finite.
    The caller adds L log sigma^2; scaled_sigma2 is M sigma^2."""
    x = squares / scaled_sigma2
    total = float(x.sum())
    signal = x[x > x_bar]
    if len(signal):
        shifted = signal - (1 + alpha)
        tau = 0.5 * (shifted + (shifted.pow(2) - 4 * alpha).clamp_min(0).sqrt())
        total += float((torch.log1p(tau) + alpha * torch.log1p(tau / alpha) - tau).sum())
    return total


def _grid_golden_min(f, lo: float, hi: float, points: int = 64, tol: float = 1e-10) -> float:
    """Minimiser of f on [lo, hi]: the best of a uniform grid, then golden-section search
    between its neighbours (bounded: it never evaluates outside [lo, hi])."""
    if hi - lo <= tol:
        return lo
    grid = [lo + (hi - lo) * k / (points - 1) for k in range(points)]
    values = [f(t) for t in grid]
    best = min(range(points), key=values.__getitem__)
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, points - 1)]
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol * max(1.0, abs(a) + abs(b)):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    found = (a + b) / 2
    return found if f(found) <= values[best] else grid[best]


# -- budget allotment ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """One layer's choices for the budget allotment (e.g. its candidate ranks).

    macs: MACs of each choice, strictly increasing. errors: relative output error energy
    of each choice (non-increasing as MACs grow). dense_macs: the layer as it is (error 0).
    """

    macs: tuple[float, ...]
    errors: tuple[float, ...]
    dense_macs: float

    def __post_init__(self):
        if len(self.macs) != len(self.errors):
            raise ValueError(f"Options: {len(self.macs)} macs but {len(self.errors)} errors")
        if any(b <= a for a, b in zip(self.macs, self.macs[1:])):
            raise ValueError(f"Options: macs must be strictly increasing, got {self.macs}")

    def allowed(self, min_saving: float) -> int:
        """How many choices (a prefix, since macs increase) save at least min_saving."""
        return bisect.bisect_right(self.macs, (1 - min_saving) * self.dense_macs)

    def at(self, choice: int | None) -> tuple[float, float]:
        """(macs, error) of a choice; None is the dense layer."""
        return (self.dense_macs, 0.0) if choice is None else (self.macs[choice], self.errors[choice])


def allot_budget(layers: list[Options], budget: float, min_saving: float) -> list[int | None]:
    """Per layer one choice index, or None (keep dense), with total MACs
    sum(chosen macs or dense_macs) <= budget * sum(dense_macs) and a small summed error.

    Greedy on marginal cost: start all dense; repeatedly take the move (one layer from its
    state to any cheaper allowed choice) with the smallest error increase per MAC saved,
    until within budget. The last move can overshoot, so then greedily move layers back up
    (to a dearer allowed choice, or dense) taking the largest error decrease per MAC added
    that still fits. A choice is allowed only if its macs <= (1 - min_saving) * dense_macs:
    a factorisation that saves little is not worth its extra layer. With fine-grained
    choices the total ends within 1% of the budget. ValueError if budget is not in (0, 1],
    or if even the cheapest allowed choices exceed it.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction of the dense MACs in (0, 1], got {budget}")
    if not 0 <= min_saving < 1:
        raise ValueError(f"min_saving must be in [0, 1), got {min_saving}")
    allowed = [layer.allowed(min_saving) for layer in layers]
    total = math.fsum(layer.dense_macs for layer in layers)
    limit = budget * total
    slack = 1e-12 * total  # sums of floats in another order may differ in the last bits
    cheapest = math.fsum(layer.macs[0] if n else layer.dense_macs for layer, n in zip(layers, allowed))
    if cheapest > limit + slack:
        raise ValueError(f"budget {budget:g} is below the smallest reachable fraction "
                         f"{cheapest / total:.4g} of the dense MACs (with min_saving={min_saving:g}): "
                         "raise the budget, lower min_saving, or offer cheaper choices")
    state: list[int | None] = [None] * len(layers)
    _move_down(layers, allowed, state, limit + slack)
    _move_up(layers, allowed, state, limit + slack)
    return state


def _cost(layers: list[Options], state: list[int | None]) -> float:
    return math.fsum(layer.at(choice)[0] for layer, choice in zip(layers, state))


def _best_down(layer: Options, allowed: int, choice: int | None):
    """(error increase per MAC saved, target) of this layer's best cheaper move, or None."""
    macs, error = layer.at(choice)
    best = None
    for target in range(allowed if choice is None else min(choice, allowed)):
        saved = macs - layer.macs[target]
        if saved > 0:
            key = ((layer.errors[target] - error) / saved, saved)  # ties: the smaller step
            if best is None or key < best[0]:
                best = (key, target)
    return best


def _move_down(layers: list[Options], allowed: list[int], state: list[int | None], limit: float):
    """Cheapest-error-per-MAC moves until the total fits; each layer's best move is cached
    and recomputed only when that layer moves."""
    best = [_best_down(layer, n, None) for layer, n in zip(layers, allowed)]
    cost = _cost(layers, state)
    while cost > limit:
        movable = [i for i, move in enumerate(best) if move is not None]
        if not movable:  # unreachable after the feasibility check, kept as a guard
            raise ValueError("allot_budget: no cheaper choice left and still over budget")
        i = min(movable, key=lambda j: best[j][0])
        state[i] = best[i][1]
        best[i] = _best_down(layers[i], allowed[i], state[i])
        cost = _cost(layers, state)


def _move_up(layers: list[Options], allowed: list[int], state: list[int | None], limit: float):
    """Spend what the last downward move overshot: the largest error decrease per MAC
    added that still fits, until nothing fits (moves that lower no error still may, to
    use the budget that was granted)."""
    while True:
        room = limit - _cost(layers, state)
        best = None
        for i, layer in enumerate(layers):
            if state[i] is None:
                continue
            macs, error = layer.at(state[i])
            reach = min(allowed[i], bisect.bisect_right(layer.macs, macs + room))
            targets = list(range(state[i] + 1, reach))
            if layer.dense_macs - macs <= room:
                targets.append(None)
            for target in targets:
                target_macs, target_error = layer.at(target)
                added, gained = target_macs - macs, error - target_error
                if added > 0 and gained >= 0:
                    key = (gained / added, -added)  # ties: the smaller step
                    if best is None or key > best[0]:
                        best = (key, i, target)
        if best is None:
            return
        state[best[1]] = best[2]

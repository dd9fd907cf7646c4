"""The math under low-rank factorisation: full-rank factorisations reproduce the layer
(as the conv sequences the pass builds), whitening lowers the output error and its
spectrum measures it, and the rank policies (fixed, energy, EVBMF, MACs budget) keep
their promises."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxopt.passes.low_rank.decompose import (factorize_matrix, matrix_spectrum, spatial_spectrum, spatial_svd,
                                             tucker2, tucker2_spectra, whitening)
from fxopt.passes.low_rank.ranks import Options, allot_budget, energy_rank, fixed_rank, kept_energy, vbmf_rank


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_gram(size: int, gen: torch.Generator) -> torch.Tensor:
    """A positive-definite gram of correlated data with a spread of variances."""
    mix = torch.randn(size, size, generator=gen, dtype=torch.float64)
    x = mix @ torch.randn(size, 4 * size + 8, generator=gen, dtype=torch.float64)
    return x @ x.T / x.shape[1] + 0.05 * torch.eye(size, dtype=torch.float64)


def _assert_close(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4):
    scale = float(expected.abs().max()) or 1.0
    assert float((got - expected).abs().max()) <= rel * scale


# -- full-rank reproduction ----------------------------------------------------------------------
@settings(max_examples=40)
@given(out=st.integers(1, 64), inp=st.integers(1, 64), whiten=st.booleans(), seed=st.integers(0, 2**16))
def test_factorize_matrix_at_full_rank_reproduces_the_layer(out, inp, whiten, seed):
    gen = _gen(seed)
    w = torch.randn(out, inp, generator=gen)
    x = torch.randn(inp, 16, generator=gen)
    gram = _random_gram(inp, gen) if whiten else None
    first, second = factorize_matrix(w, min(out, inp), gram)
    assert first.shape == (min(out, inp), inp) and second.shape == (out, min(out, inp))
    assert first.dtype == second.dtype == torch.float32
    _assert_close(second @ (first @ x), w @ x)


conv_geometry = dict(out=st.integers(1, 16), inp=st.integers(1, 8),
                     kernel=st.sampled_from([(3, 3), (3, 5), (5, 5)]), stride=st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2)]),
                     padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
                     dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
                     whiten=st.booleans(), seed=st.integers(0, 2**16))


@settings(max_examples=40)
@given(**conv_geometry)
def test_tucker2_at_full_ranks_reproduces_the_conv(out, inp, kernel, stride, padding, dilation, whiten, seed):
    gen = _gen(seed)
    w = torch.randn(out, inp, *kernel, generator=gen)
    x = torch.randn(2, inp, 13, 12, generator=gen)
    gram = _random_gram(inp, gen) if whiten else None
    first, core, last = tucker2(w, (out, inp), gram, iters=2)
    assert first.shape == (inp, inp, 1, 1) and core.shape == w.shape and last.shape == (out, out, 1, 1)
    expected = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
    got = F.conv2d(F.conv2d(F.conv2d(x, first), core, stride=stride, padding=padding, dilation=dilation), last)
    _assert_close(got, expected)


@settings(max_examples=40)
@given(**conv_geometry)
def test_spatial_svd_at_full_rank_reproduces_the_conv(out, inp, kernel, stride, padding, dilation, whiten, seed):
    gen = _gen(seed)
    kh, kw = kernel
    w = torch.randn(out, inp, kh, kw, generator=gen)
    x = torch.randn(2, inp, 13, 12, generator=gen)
    gram = _random_gram(inp * kh, gen) if whiten else None
    rank = min(inp * kh, out * kw)
    vertical, horizontal = spatial_svd(w, rank, gram)
    assert vertical.shape == (rank, inp, kh, 1) and horizontal.shape == (out, rank, 1, kw)
    expected = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
    mid = F.conv2d(x, vertical, stride=(stride[0], 1), padding=(padding[0], 0), dilation=(dilation[0], 1))
    got = F.conv2d(mid, horizontal, stride=(1, stride[1]), padding=(0, padding[1]), dilation=(1, dilation[1]))
    _assert_close(got, expected)


def test_truncated_tucker2_and_spatial_svd_match_their_spectra():
    """Without gram, the truncation error of the separable factorisation is exactly the
    spectrum's tail; Tucker-2's error is at most the sum of its two modes' tails (HOSVD
    bound, which HOOI only improves)."""
    gen = _gen(3)
    w = torch.randn(12, 6, 3, 3, generator=gen, dtype=torch.float64)
    vertical, horizontal = spatial_svd(w, 4)
    approx = torch.einsum("kiy,okx->oiyx", vertical[..., 0].double(), horizontal[:, :, 0].double())
    tail = float(spatial_spectrum(w)[4:].pow(2).sum())
    assert math.isclose(float((w - approx).pow(2).sum()), tail, rel_tol=1e-5)
    first, core, last = tucker2(w, (5, 3))
    approx = torch.einsum("oa,abyx,bi->oiyx", last[:, :, 0, 0].double(), core.double(), first[:, :, 0, 0].double())
    s_out, s_in = tucker2_spectra(w)
    bound = float(s_out[5:].pow(2).sum() + s_in[3:].pow(2).sum())
    assert float((w - approx).pow(2).sum()) <= bound * (1 + 1e-5)


# -- whitening --------------------------------------------------------------------------------------
def _skewed_data(inp: int, rows: int, gen: torch.Generator) -> torch.Tensor:
    """X = A @ randn with A ill-conditioned (variances spread over 6 decades)."""
    q = torch.linalg.qr(torch.randn(inp, inp, generator=gen, dtype=torch.float64))[0]
    a = q @ torch.diag(torch.logspace(0, -3, inp, dtype=torch.float64)) @ q.T
    return a @ torch.randn(inp, rows, generator=gen, dtype=torch.float64)


def _output_error(w, first, second, x) -> float:
    return float((w.double() - second.double() @ first.double()).matmul(x).pow(2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whitened_truncation_has_lower_output_error(seed):
    gen = _gen(seed)
    w = torch.randn(24, 32, generator=gen)
    x = _skewed_data(32, 2000, gen)
    gram = x @ x.T
    for rank in (2, 6, 12):
        plain = _output_error(w, *factorize_matrix(w, rank), x)
        whitened = _output_error(w, *factorize_matrix(w, rank, gram), x)
        assert whitened < plain


@pytest.mark.parametrize("rank", [1, 4, 10, 20])
def test_whitened_spectrum_tail_is_the_output_error_energy(rank):
    gen = _gen(rank)
    w = torch.randn(24, 32, generator=gen)
    x = _skewed_data(32, 2000, gen)
    gram = x @ x.T
    spectrum = matrix_spectrum(w, gram, damping=0.0)
    assert spectrum.dtype == torch.float64 and bool((spectrum[:-1] >= spectrum[1:]).all())
    measured = _output_error(w, *factorize_matrix(w, rank, gram, damping=0.0), x)
    assert math.isclose(float(spectrum[rank:].pow(2).sum()), measured, rel_tol=1e-6)


def test_whitening_factor_and_its_retries():
    gen = _gen(5)
    gram = _random_gram(6, gen)
    factor = whitening(gram, damping=0.0)
    assert torch.allclose(factor, factor.tril()) and torch.allclose(factor @ factor.T, gram)
    damped = whitening(gram)
    assert torch.allclose(damped @ damped.T, gram + 1e-4 * gram.diagonal().mean() * torch.eye(6))
    singular = torch.ones(4, 4, dtype=torch.float64)  # rank 1: needs the damping to factor
    assert torch.isfinite(whitening(singular, damping=0.0)).all()
    with pytest.raises(ValueError, match="not positive definite"):
        whitening(-torch.eye(3))
    with pytest.raises(ValueError, match="5x5"):
        factorize_matrix(torch.randn(3, 5), 2, torch.eye(4))


def test_rank_out_of_range_names_the_limit():
    with pytest.raises(ValueError, match=r"rank 6 .* 1 to 5"):
        factorize_matrix(torch.randn(5, 8), 6)
    with pytest.raises(ValueError, match=r"rank 0 .* 1 to 5"):
        factorize_matrix(torch.randn(5, 8), 0)
    with pytest.raises(ValueError, match=r"rank 5 .* 1 to 4"):
        tucker2(torch.randn(3, 4, 3, 3), (2, 5))
    with pytest.raises(ValueError, match="at least 2x2"):
        spatial_svd(torch.randn(3, 4, 1, 3), 1)


# -- energy and fixed ranks ---------------------------------------------------------------------
@settings(max_examples=100)
@given(values=st.lists(st.floats(0, 1e3), min_size=1, max_size=50), energy=st.floats(1e-6, 1.0))
def test_energy_rank_keeps_the_requested_energy(values, energy):
    spectrum = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    rank = energy_rank(spectrum, energy)
    assert 1 <= rank <= len(values)
    if float(spectrum.abs().sum()) == 0:
        assert rank == 1 and kept_energy(spectrum, rank) == 1.0
        return
    assert kept_energy(spectrum, rank) >= energy
    if rank > 1:
        assert kept_energy(spectrum, rank - 1) < energy


def test_energy_rank_examples_and_errors():
    spectrum = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(spectrum, 9 / 14) == 1
    assert energy_rank(spectrum, 0.9) == 2
    assert energy_rank(spectrum, 1.0) == 3
    assert kept_energy(spectrum, 2) == pytest.approx(13 / 14)
    assert energy_rank(torch.zeros(5), 0.5) == 1
    for energy in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="energy"):
            energy_rank(spectrum, energy)


def test_fixed_rank():
    assert fixed_rank(10, 0.3) == 3
    assert fixed_rank(10, 0.25) == 3
    assert fixed_rank(100, 0.001) == 1
    assert fixed_rank(10, 0.99) == 10
    assert fixed_rank(10, 4) == 4 and fixed_rank(10, 4.0) == 4
    with pytest.raises(ValueError, match="not below the full rank 10"):
        fixed_rank(10, 10)
    with pytest.raises(ValueError, match="not below the full rank 10"):
        fixed_rank(10, 12)
    for bad in (0, -0.5, 4.5, float("nan")):
        with pytest.raises(ValueError, match="full rank is 10"):
            fixed_rank(10, bad)


# -- EVBMF --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,rank,noise", [((64, 48), 5, 0.01), ((48, 64), 5, 0.01), ((64, 48), 5, 0.1),
                                              ((100, 80), 12, 0.05), ((30, 200), 3, 0.02), ((40, 40), 1, 0.01)])
@pytest.mark.parametrize("seed", [0, 1])
def test_vbmf_recovers_the_signal_rank(shape, rank, noise, seed):
    gen = _gen(seed)
    signal = torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, shape[1], generator=gen)
    matrix = signal + noise * torch.randn(*shape, generator=gen)
    assert vbmf_rank(matrix) == rank


def test_vbmf_of_pure_noise_and_zero_is_at_least_one():
    assert vbmf_rank(torch.zeros(8, 6)) == 1
    assert vbmf_rank(torch.randn(50, 40, generator=_gen(0))) == 1


# -- budget allotment ---------------------------------------------------------------------------
def _layer(dense: float, steps: int, decay: float, offset: float = 0.0) -> Options:
    """Choices at 2%..98% of the dense MACs; error exp(-decay * fraction), 0 at dense."""
    fractions = [0.02 + 0.96 * k / (steps - 1) for k in range(steps)]
    errors = [math.exp(-decay * f) - math.exp(-decay) + offset * (1 - f) for f in fractions]
    return Options(tuple(dense * f for f in fractions), tuple(errors), dense)


def _total(layers, picks) -> float:
    return sum(layer.dense_macs if p is None else layer.macs[p] for layer, p in zip(layers, picks))


@settings(max_examples=40)
@given(sizes=st.lists(st.floats(1.0, 2.0), min_size=15, max_size=40), decays=st.data(),
       budget=st.floats(0.2, 1.0), min_saving=st.floats(0.0, 0.1))
def test_allot_budget_fits_the_budget_closely(sizes, decays, budget, min_saving):
    layers = [_layer(size * 1e6, 80, decays.draw(st.floats(0.5, 20.0))) for size in sizes]
    dense = sum(layer.dense_macs for layer in layers)
    picks = allot_budget(layers, budget, min_saving)
    total = _total(layers, picks)
    assert total <= budget * dense * (1 + 1e-9)
    assert budget * dense - total <= 0.01 * dense
    for layer, pick in zip(layers, picks):
        assert pick is None or layer.macs[pick] <= (1 - min_saving) * layer.dense_macs


def test_allot_budget_raises_when_infeasible():
    layers = [_layer(1e6, 20, 3.0), _layer(2e6, 20, 3.0)]
    with pytest.raises(ValueError, match="smallest reachable fraction 0.02"):
        allot_budget(layers, 0.01, 0.0)
    narrow = Options((0.9e6, 0.95e6), (0.1, 0.05), 1e6)  # nothing saves 20%: stays dense
    with pytest.raises(ValueError, match="smallest reachable fraction"):
        allot_budget([narrow, _layer(1e6, 20, 3.0)], 0.5, 0.2)
    assert allot_budget([narrow, _layer(1e6, 20, 3.0)], 0.6, 0.2)[0] is None
    for budget in (0.0, 1.5):
        with pytest.raises(ValueError, match="budget"):
            allot_budget(layers, budget, 0.0)


def test_allot_budget_gives_more_to_layers_whose_error_falls_fastest():
    """Two layers of equal size: one loses much error per MAC it keeps (steep), one little
    (flat); the steep one should keep more MACs."""
    steep = _layer(1e6, 60, 1.0, offset=5.0)
    flat = _layer(1e6, 60, 1.0, offset=0.2)
    picks = allot_budget([steep, flat, steep, flat], 0.5, 0.0)
    kept = [_total([layer], [p]) for layer, p in zip([steep, flat, steep, flat], picks)]
    assert kept[0] > kept[1] and kept[2] > kept[3]
    assert allot_budget([steep, flat], 1.0, 0.0) == [None, None]

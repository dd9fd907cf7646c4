"""What a factorization costs in fidelity and gains in time, measured rather than estimated.

- Output error: the calibration batches run through the graph once more; each
  factorized layer's actual input goes through both the dense op and the factor
  chain, and the report gets sqrt(sum ||y' - y||^2 / sum ||y||^2) per layer. Without
  batches it gets the relative weight error of the reconstructed weight instead.
- Speed: `speedup` times the dense op and the chain on a random input of the
  layer's shape (median of a few runs after warm-up), for `min-speedup`: factor
  chains of small layers can be slower than one dense GEMM, and it happens.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from .layers import Layer, run_recorder

RUNS, WARMUP = 9, 2


def dense(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    bias = layer.bias.float() if layer.bias is not None else None
    if not layer.is_conv:
        return F.linear(x, layer.weight, bias)
    g = layer.geometry
    return F.conv2d(x, layer.weight, bias, g.stride, g.padding, g.dilation)


def apply_chain(layer: Layer, chain, x: torch.Tensor) -> torch.Tensor:
    """The factor ops on `x`; the bias is added by the last one, as in the rewritten graph."""
    for index, (weight, conv) in enumerate(chain):
        bias = layer.bias.float() if layer.bias is not None and index == len(chain) - 1 else None
        if layer.is_conv:
            x = F.conv2d(x, weight, bias, conv["stride"], conv["padding"], conv["dilation"])
        else:
            x = F.linear(x, weight, bias)
    return x


def measure_errors(gm, chains: dict, report, batches) -> None:
    """Fill `error` / `error_kind` of the report rows of the factorized layers."""
    rows = {r.node: r for r in report.layers}
    if not chains:
        return
    if not batches:
        for layer, (choice, chain) in chains.items():
            row = rows[layer.node.name]
            row.error, row.error_kind = _weight_error(layer, choice.form, chain), "weight"
        return
    sums = {layer: [0.0, 0.0] for layer in chains}

    def on_input(layer: Layer, x: torch.Tensor) -> None:
        if layer in chains:
            y = dense(layer, x).double()
            sums[layer][0] += float((apply_chain(layer, chains[layer][1], x).double() - y).pow(2).sum())
            sums[layer][1] += float(y.pow(2).sum())

    run_recorder(gm, list(chains), batches, on_input)
    for layer, (diff, ref) in sums.items():
        row = rows[layer.node.name]
        row.error, row.error_kind = (diff / ref) ** 0.5 if ref > 0 else 0.0, "output"


def _weight_error(layer: Layer, form: str, chain) -> float:
    """||W' - W|| / ||W|| with W' the weight the factor chain composes to."""
    w, f = layer.weight.double(), [wt.double() for wt, _ in chain]
    if not layer.is_conv:
        rebuilt = f[1] @ f[0]
    elif form == "matrix":
        rebuilt = (f[1][:, :, 0, 0] @ f[0][:, :, 0, 0])[:, :, None, None]
    elif form == "tucker2":
        rebuilt = torch.einsum("or,rsyx,si->oiyx", f[2][:, :, 0, 0], f[1], f[0][:, :, 0, 0])
    else:
        rebuilt = torch.einsum("riy,orx->oiyx", f[0][:, :, :, 0], f[1][:, :, 0, :])
    return float((rebuilt - w).norm() / w.norm().clamp_min(1e-30))


def speedup(layer: Layer, chain) -> float:
    """Median dense time / median chain time on a random input of the layer's shape."""
    x = torch.randn(layer.in_shape)
    with torch.no_grad():
        t_dense = _median_time(lambda: dense(layer, x))
        t_chain = _median_time(lambda: apply_chain(layer, chain, x))
    return t_dense / t_chain


def _median_time(fn) -> float:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

"""Observers: turn the values a quantizer sees into a range [lo, hi] per channel.

Every observer works on rows (one per channel, or a single row per tensor) and
keeps its state in buffers only, so saving, loading and the Verify instrument's
buffer restore all see the whole of it. Two entry points:

- `batch_range(rows)`: the range for this tensor alone (weights: one call is all
  there is to see);
- `update(rows)` then `range()`: accumulated over calibration batches (activations).

Kinds (the `observer=` option of fake-quant):
  minmax          running min and max: nothing is ever clipped.
  moving-average  min and max averaged over batches (EMA, constant 0.1): one
                  outlier batch moves the range only a little.
  percentile      the 0.01% / 99.99% quantiles of each batch, averaged: clips rare
                  outliers to spend the grid on the bulk of the values.
  mse             per batch, the shrink of the min/max range (1.0 .. 0.3) that gives
                  the smallest squared quantization error, averaged over batches.
  histogram       a 2048-bin histogram over all batches; at the end the shrink with
                  the smallest squared error estimated from it (a global choice,
                  unlike mse's per-batch one).
"""
from __future__ import annotations

import threading
import typing
from typing import Literal

import torch
import torch.nn as nn

from .qparams import QSpec, fake_quantize, qparams_from_range

ObserverKind = Literal["minmax", "moving-average", "percentile", "mse", "histogram"]
OBSERVERS = typing.get_args(ObserverKind)
_SHRINKS = torch.linspace(1.0, 0.3, 36)
_MAX_SAMPLES = 1 << 18   # per row: quantiles and error searches on a strided sample
_UPDATES = threading.RLock()   # one for all observers (a lock cannot live in a module that is deep-copied)


def make_observer(kind: str, spec: QSpec, channels: int = 1) -> "Observer":
    """An observer of kind `kind` (one of OBSERVERS) for `channels` rows."""
    classes = {"minmax": MinMaxObserver, "moving-average": MovingAverageObserver,
               "percentile": PercentileObserver, "mse": MSEObserver, "histogram": HistogramObserver}
    if kind not in classes:
        raise ValueError(f"unknown observer {kind!r}; choose one of {', '.join(OBSERVERS)}")
    return classes[kind](spec, channels)


def _sample(rows: torch.Tensor) -> torch.Tensor:
    """At most _MAX_SAMPLES evenly strided columns of each row (all when fewer)."""
    step = max(1, rows.shape[1] // _MAX_SAMPLES)
    return rows[:, ::step]


class Observer(nn.Module):
    """Running per-row range; subclasses change how a batch's range is found and combined."""

    def __init__(self, spec: QSpec, channels: int = 1):
        super().__init__()
        self.spec = spec
        self.register_buffer("lo", torch.zeros(channels))
        self.register_buffer("hi", torch.zeros(channels))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def batch_range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = rows.detach().float()
        return rows.amin(dim=1), rows.amax(dim=1)

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        lo, hi = self.batch_range(rows)
        with _UPDATES:   # read-modify-write of the state: calibrating from several threads loses nothing
            first = self.count == 0
            self.lo.copy_(torch.where(first, lo, self._combine(self.lo, lo, torch.minimum)))
            self.hi.copy_(torch.where(first, hi, self._combine(self.hi, hi, torch.maximum)))
            self.count += 1

    def _combine(self, old: torch.Tensor, new: torch.Tensor, extreme) -> torch.Tensor:
        return extreme(old, new)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo.clone(), self.hi.clone()

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, symmetric={self.spec.symmetric}, channels={self.lo.numel()}"


class MinMaxObserver(Observer):
    """Running min / max."""


class MovingAverageObserver(Observer):
    """min / max averaged over batches with an exponential moving average."""

    constant = 0.1

    def _combine(self, old, new, extreme):
        return old + self.constant * (new - old)


class _MeanOfBatches(Observer):
    """Combines per-batch ranges by their running mean (every batch weighs the same)."""

    def _combine(self, old, new, extreme):
        return old + (new - old) / (self.count.float() + 1)


class PercentileObserver(_MeanOfBatches):
    """The 0.01% and 99.99% quantiles of each batch, averaged over batches."""

    percentile = 99.99

    def batch_range(self, rows):
        rows = _sample(rows.detach().float())
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], device=rows.device)
        lo, hi = torch.quantile(rows, q, dim=1)
        return lo, hi


def _best_shrink(values: torch.Tensor, weights: torch.Tensor | None, lo, hi, spec: QSpec):
    """Per row, the range (lo, hi) * a in _SHRINKS with the least weighted squared
    fake-quantization error of `values` (rows; `weights` are counts, or None)."""
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    axis_spec = QSpec(spec.bits, spec.symmetric, 0)
    for a in _SHRINKS.tolist():
        scale, zp = qparams_from_range(lo * a, hi * a, spec)
        err = (fake_quantize(values, scale, zp, axis_spec) - values) ** 2
        err = (err * weights if weights is not None else err).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo * a, best_lo), torch.where(better, hi * a, best_hi)
    return best_lo, best_hi


class MSEObserver(_MeanOfBatches):
    """Per batch, the shrunk min/max range with the least squared error; averaged over batches."""

    def batch_range(self, rows):
        rows = _sample(rows.detach().float())
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        if self.spec.binary:
            return lo, hi
        return _best_shrink(rows, None, lo, hi, self.spec)


class HistogramObserver(Observer):
    """A per-row histogram over every batch seen; the range is chosen from it at the end."""

    bins = 2048

    def __init__(self, spec: QSpec, channels: int = 1):
        super().__init__(spec, channels)
        self.register_buffer("hist", torch.zeros(channels, self.bins))

    def batch_range(self, rows):
        rows = rows.detach().float()
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        hist = self._histogram(rows, lo, hi)
        return self._search(hist, lo, hi)

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float()
        b_lo, b_hi = rows.amin(dim=1), rows.amax(dim=1)
        with _UPDATES:
            first = self.count == 0
            lo = torch.where(first, b_lo, torch.minimum(self.lo, b_lo))
            hi = torch.where(first, b_hi, torch.maximum(self.hi, b_hi))
            old = self._rebin(lo, hi)                      # earlier counts moved onto the new bins
            self.hist.copy_(old + self._histogram(rows, lo, hi))
            self.lo.copy_(lo)
            self.hi.copy_(hi)
            self.count += 1

    def range(self):
        return self._search(self.hist, self.lo, self.hi)

    def _edges(self, lo, hi):
        width = ((hi - lo) / self.bins).clamp_min(1e-12)
        return lo, width

    def _histogram(self, rows, lo, hi):
        start, width = self._edges(lo, hi)
        idx = ((rows - start[:, None]) / width[:, None]).floor().clamp(0, self.bins - 1).long()
        hist = torch.zeros(rows.shape[0], self.bins, device=rows.device)
        return hist.scatter_add_(1, idx, torch.ones_like(rows))

    def _centers(self, lo, hi):
        start, width = self._edges(lo, hi)
        steps = torch.arange(self.bins, device=lo.device).float() + 0.5
        return start[:, None] + width[:, None] * steps[None, :]

    def _rebin(self, lo, hi):
        """The stored counts redistributed from the old bins onto bins over [lo, hi]."""
        centers = self._centers(self.lo, self.hi)
        start, width = self._edges(lo, hi)
        idx = ((centers - start[:, None]) / width[:, None]).floor().clamp(0, self.bins - 1).long()
        return torch.zeros_like(self.hist).scatter_add_(1, idx, self.hist)

    def _search(self, hist, lo, hi):
        if self.spec.binary:
            return lo, hi
        return _best_shrink(self._centers(lo, hi), hist, lo, hi, self.spec)

"""fxopt.compress: one call finds a pruned, quantized and distilled model that meets a target and
keeps the task within max_drop, on real data (scikit-learn's digits and the CNN of digits.py).

MAC and size targets are deterministic, so the tests use them; speed targets are measured by the
benchmarks (benchmarks/compress.py), as no test asserts a time.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fxopt
from digits import BATCH, accuracy, batches


@pytest.fixture(scope="module")
def compressed(digits, trained):
    """compress on the digits CNN to a third of its MACs, int8, a point of accuracy tolerated."""
    x_train, y_train, _, _ = digits
    model = copy.deepcopy(trained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cm = fxopt.compress(model, (x_train[:BATCH],), data=batches(x_train, y_train, 7), target={"macs": 0.35},
                        max_drop=0.01, backend="int8", steps=120)
    return model, before, cm


def test_compress_meets_the_target_and_keeps_the_accuracy(digits, trained, compressed):
    model, before, cm = compressed
    report = cm.report.compress
    best = report.best
    assert best.macs <= 0.35 * 1.02 and best.accepted
    assert best.size < 0.3                                   # int8 weights, a third of the channels
    assert best.stage == "recovered" and "distill" in best.pipeline and "fake-quant" in best.pipeline
    assert accuracy(cm, digits) >= accuracy(trained, digits) - 0.015   # held out from compress's own split
    assert report.score_name == "accuracy" and report.baseline_score - best.score <= 0.01
    assert cm.backend == "int8"
    for key, value in model.state_dict().items():            # the user's model is not touched
        assert torch.equal(value, before[key]), key


def test_compress_report_lists_candidates_and_plots_the_front(compressed, tmp_path):
    report = compressed[2].report.compress
    assert report.candidates and report.chosen is not None
    assert "compress: target macs 0.35" in str(report)
    assert report.pareto()
    report.plot(tmp_path / "front.png")
    assert (tmp_path / "front.png").stat().st_size > 1000


def test_compress_size_target_searches_the_strength(digits, trained):
    x_train, y_train, _, _ = digits
    cm = fxopt.compress(trained, (x_train[:BATCH],), data=batches(x_train, y_train, 3)[:8], target={"size": 0.15},
                        max_drop=1.0, backend="int8", steps=5)
    report = cm.report.compress
    assert report.best.size <= 0.15
    assert [c.stage for c in report.candidates].count("structure") >= 2   # probes before the recovery


@pytest.mark.parametrize("target, message", [({"speed": 2}, "target must be one of"),
                                             ({"macs": 1.5}, "out of range"),
                                             ({"speedup": 0.5}, "out of range")])
def test_compress_refuses_bad_targets(trained, target, message):
    with pytest.raises(fxopt.FxoptError, match=message):
        fxopt.compress(trained, (torch.randn(2, 1, 8, 8),), data=[torch.randn(2, 1, 8, 8)] * 3, target=target)


def test_compress_needs_held_out_data(trained):
    with pytest.raises(fxopt.FxoptError, match="at least 2 batches"):
        fxopt.compress(trained, (torch.randn(2, 1, 8, 8),), data=[torch.randn(2, 1, 8, 8)], target={"macs": 0.5})

"""distill: a pipeline that cuts a model trains it back against the model as it was.

On scikit-learn's digits (tests/digits.py) with the CNN the session trains once: pruning half
the channels costs accuracy, and `distill` with unlabelled batches wins it back (the KD
loss falls, the outputs come closer to the unpruned model's); after fake-quant it is
quantization-aware training through calibrated, frozen quantizers.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import fxopt
from digits import BATCH, accuracy, batches
from fxopt.passes.distill import Distill, DistillReport
from fxopt.pm import AnalysisManager
from fxopt.quant import quantizers_in

PRUNE = "prune-channels{ratio=0.5}"


def _unlabelled(digits, count: int = 8) -> list:
    x_train, y_train, _, _ = digits
    return [x for x, _ in batches(x_train, y_train, 0)[:count]]


def _mean(values) -> float:
    return sum(values) / len(values)


def _modes(module) -> list[bool]:
    return [m.training for m in module.modules()]


def test_distill_recovers_what_pruning_lost_without_labels(digits, trained):
    state = copy.deepcopy(trained.state_dict())
    example = (digits[0][:BATCH],)
    pruned = fxopt.compile(trained, example, pipeline=PRUNE)
    cm = fxopt.compile(trained, example, pipeline=f"{PRUNE},distill{{steps=60 lr=1e-2}}", data=_unlabelled(digits))

    report = cm.report.distill
    assert isinstance(report, DistillReport) and report.steps == len(report.loss) == 60
    assert report.alpha is None and report.losses == {"linear": "kl"} and report.quantizers == ""
    assert _mean(report.distill[-10:]) < 0.5 * _mean(report.distill[:10])
    assert report.fidelity_after < 0.5 * report.fidelity_before
    assert report.seconds > 0 and "the graph before prune-channels" in report.teacher
    before, after = accuracy(pruned, digits), accuracy(cm, digits)
    print(f"digits accuracy: pruned {before:.4f}, distilled {after:.4f}\n{report}")
    assert after > before + 0.02
    assert "fidelity" in str(report) and "linear: kl (T=4)" in str(report)
    # the user's model is untouched; the graph keeps its modes and trainable flags
    assert all(torch.equal(state[k], v) for k, v in trained.state_dict().items())
    assert _modes(cm.graph_module) == _modes(pruned.graph_module)
    assert [p.requires_grad for p in cm.graph_module.parameters()] == \
        [p.requires_grad for p in pruned.graph_module.parameters()]


def test_distill_after_fake_quant_is_qat_through_frozen_quantizers(digits, trained):
    data = _unlabelled(digits)
    cm = fxopt.compile(trained, (digits[0][:BATCH],), pipeline=f"{PRUNE},fake-quant,distill{{steps=40 lr=1e-2}}",
                       data=data, calibration=data[:2])
    report = cm.report.distill
    quantizers = quantizers_in(cm.graph_module)
    assert quantizers and not any(q.observing for q in quantizers)
    assert report.quantizers.startswith("calibrated on 2 calibration batches, then froze")
    assert report.fidelity_after < 0.5 * report.fidelity_before
    assert accuracy(cm, digits) > 0.9


def test_features_and_labels(digits, trained):
    """Matched features add their MSE; a pruned layer's output does not pair (named in the notes);
    a pattern that names nothing is warned about; labelled batches mix in the task loss."""
    x_train, y_train, _, _ = digits
    labelled = batches(x_train, y_train, 0)[:4]
    with pytest.warns(UserWarning, match="'nothing' matches no node"):
        cm = fxopt.compile(trained, (x_train[:BATCH],), data=labelled,
                           pipeline=f"{PRUNE},distill{{steps=4 features=[flatten,relu,nothing] feature-weight=2}}")
    report = cm.report.distill
    assert report.features == []   # every layer before the classifier lost channels
    notes = " ".join(cm.report.records[-1].notes)
    assert "feature relu: student shape" in notes and "left out" in notes
    assert report.alpha == 0.5 and all(math.isfinite(v) for v in report.task)

    cm = fxopt.compile(trained, (x_train[:BATCH],), data=labelled,
                       pipeline="fake-quant,distill{steps=4 lr=1e-4 features=[relu_1,2]}")
    report = cm.report.distill
    assert report.features == ["relu_1", "relu"] and "features (MSE x 1): relu_1, relu" in str(report)
    assert report.quantizers.startswith("calibrated on 4 data batches' inputs")


def test_errors_name_what_to_give():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(8, 4)
    with pytest.raises(fxopt.PassOptionError, match="no data") as info:
        fxopt.compile(model, (x,), pipeline="distill{steps=2}")
    assert "data=" in str(info.value)
    gm = fxopt.trace(model, (x,))
    with pytest.raises(fxopt.PassOptionError, match="no teacher") as info:
        Distill(steps=2).run(gm, AnalysisManager(gm, data=[x]))
    assert "pipeline" in str(info.value) and "fxopt.finetune" in str(info.value)


def test_mse_loss_on_features_output_and_pipeline_text():
    """A non-logits output trains by MSE; the options round-trip through pipeline text."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 6), nn.Tanh()).eval()
    data = [torch.randn(16, 4) for _ in range(4)]
    cm = fxopt.compile(model, (data[0],), pipeline="prune-channels{ratio=0.5},distill{steps=30 lr=1e-2}", data=data)
    report = cm.report.distill
    assert report.losses == {"tanh": "mse"}
    assert _mean(report.loss[-5:]) < _mean(report.loss[:5]) and report.fidelity_after < report.fidelity_before

    text = ("prune-channels{ratio=0.5},distill{steps=100 lr=0.01 temperature=2 alpha=0.3 loss=cosine "
            "features=[layer1.*,relu] feature-weight=0.5 progress=true seed=3},fake-quant")
    again = fxopt.format_pipeline(fxopt.parse_pipeline(text))
    assert fxopt.parse_pipeline(again) == fxopt.parse_pipeline(text)
    assert "distill{" in again and "seed=3" in again


def test_finetune_takes_a_distill_loss():
    """finetune's distill_loss replaces the T²·KL of logits (distill passes one per output); progress
    draws a bar."""
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.weight.add_(0.5)
    data = [torch.randn(8, 4) for _ in range(2)]
    mse = nn.functional.mse_loss
    with torch.no_grad():
        first = mse(student(data[0]), teacher(data[0])).item()
    fxopt.finetune(student, teacher, data, steps=20, lr=1e-2, distill_loss=mse, progress=True)
    assert student.finetune_history.distill[0] == pytest.approx(first)
    assert student.finetune_history.distill[-1] < first


def test_labelled_batches_need_one_output():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.a(x), self.b(x)

    x = torch.randn(8, 4)
    with pytest.raises(fxopt.PassOptionError, match="2 outputs"):
        fxopt.compile(Two().eval(), (x,), pipeline="distill{steps=2}", data=[(x, torch.zeros(8, dtype=torch.long))])
    cm = fxopt.compile(Two().eval(), (x,), pipeline="distill{steps=2}", data=[x])
    assert cm.report.distill.losses == {"linear": "kl", "linear_1": "kl"}
    assert not hasattr(cm.graph_module, "finetune_history")

"""finetune: pruning costs accuracy on real data, distillation from the unpruned model wins it back.

The data are scikit-learn's bundled digits (8x8 images, 10 classes), split once
with a fixed seed; the CNN is trained here with plain torch, so the numbers are
reproducible and nothing is downloaded.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import fxopt
from digits import BATCH, accuracy as _accuracy, batches as _batches

PIPELINE = "prune-channels{ratio=0.5}"


def _prune(model, digits):
    return fxopt.compile(model, (digits[0][:BATCH],), pipeline=PIPELINE)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_distillation_recovers_the_accuracy_pruning_lost(digits, trained):
    full = _accuracy(trained, digits)
    assert full >= 0.95
    cm = _prune(trained, digits)
    assert _count(cm.graph_module) < 0.5 * _count(trained)
    pruned = _accuracy(cm, digits)
    assert pruned < full  # half the channels gone: it does cost accuracy

    x_train, y_train, _, _ = digits
    out = fxopt.finetune(cm, data=_batches(x_train, y_train, 100), teacher=trained, steps=300, lr=1e-2)

    assert out is cm
    recovered = _accuracy(cm, digits)
    print(f"digits accuracy: unpruned {full:.4f}, pruned {pruned:.4f}, finetuned {recovered:.4f}")
    assert recovered >= full - 0.02
    assert recovered > pruned
    history = cm.finetune_history
    assert len(history.loss) == len(history.task) == len(history.distill) == len(history.lr) == 300
    assert history.epochs == math.ceil(300 / len(_batches(x_train, y_train, 0)))
    assert sum(history.loss[-20:]) < sum(history.loss[:20])
    assert history.lr[0] == pytest.approx(1e-2) and history.lr[-1] < 1e-4  # cosine decay
    # the mix: loss = alpha * distill + (1 - alpha) * task with the default alpha 0.5
    assert history.loss[0] == pytest.approx(0.5 * history.distill[0] + 0.5 * history.task[0], rel=1e-5)


def test_task_loss_alone_also_recovers(digits, trained):
    full = _accuracy(trained, digits)
    cm = _prune(trained, digits)
    pruned = _accuracy(cm, digits)
    x_train, y_train, _, _ = digits
    fxopt.finetune(cm, data=_batches(x_train, y_train, 100), steps=150, lr=1e-2)
    recovered = _accuracy(cm, digits)
    assert recovered >= full - 0.02 and recovered > pruned
    assert all(math.isnan(d) for d in cm.finetune_history.distill)


def test_pure_distillation_needs_no_targets(digits, trained):
    cm = _prune(trained, digits)
    pruned = _accuracy(cm, digits)
    inputs_only = [x for x, _ in _batches(digits[0], digits[1], 100)]
    fxopt.finetune(cm, data=inputs_only, teacher=trained, steps=60, lr=1e-2)
    assert _accuracy(cm, digits) > pruned
    assert all(math.isnan(t) for t in cm.finetune_history.task)


def test_teacher_and_modes_are_left_as_they_were(digits, trained):
    teacher = copy.deepcopy(trained).train()  # even a teacher left in train mode
    teacher[1].eval()
    flags = [m.training for m in teacher.modules()]
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    cm = _prune(trained, digits)
    student_flags = [m.training for m in cm.modules()]

    fxopt.finetune(cm, data=_batches(digits[0], digits[1], 1), teacher=teacher, steps=5)

    assert [m.training for m in teacher.modules()] == flags
    after = teacher.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)  # BN running stats too
    assert all(p.grad is None for p in teacher.parameters())
    assert [m.training for m in cm.modules()] == student_flags


def test_a_compiled_teacher_works_and_keeps_its_modes(digits, trained):
    teacher = fxopt.compile(trained, (digits[0][:BATCH],), pipeline="cleanup")
    flags = [m.training for m in teacher.modules()]
    cm = _prune(trained, digits)
    fxopt.finetune(cm, data=_batches(digits[0], digits[1], 1), teacher=teacher, steps=3)
    assert [m.training for m in teacher.modules()] == flags
    assert not any(math.isnan(d) for d in cm.finetune_history.distill)


def test_every_parameter_of_the_graph_is_trained(digits, trained):
    cm = _prune(trained, digits)
    gm = cm.graph_module
    params = {k: p.detach().clone() for k, p in gm.named_parameters()}
    buffers = {k: b.clone() for k, b in gm.named_buffers()}
    assert params and all(p.requires_grad for p in gm.parameters())

    fxopt.finetune(cm, data=_batches(digits[0], digits[1], 1), teacher=trained, steps=3)

    for name, p in gm.named_parameters():
        assert not torch.equal(p, params[name]), f"{name} was not trained"
        assert p.grad is None  # gradients cleared after the last step
    assert all(torch.equal(b, buffers[k]) for k, b in gm.named_buffers())


def test_frozen_parameters_stay_frozen_and_a_plain_module_trains(digits, trained):
    model = copy.deepcopy(trained)
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.clone()
    head = model[8].weight.clone()
    out = fxopt.finetune(model, data=_batches(digits[0], digits[1], 1), steps=3, lr=1e-2)
    assert out is model and not model.training
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[8].weight, head)
    assert len(model.finetune_history.loss) == 3


def _generator_of_one_batch(digits):
    yield digits[0][:BATCH], digits[1][:BATCH]


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(lr=-1e-3), "lr must be > 0"),
    (dict(alpha=1.5), r"alpha must be in \[0, 1\]"),
    (dict(temperature=0.0), "temperature must be > 0"),
])
def test_bad_options_are_rejected(digits, trained, kwargs, match):
    cm = _prune(trained, digits)
    with pytest.raises(fxopt.TrainingError, match=match):
        fxopt.finetune(cm, data=_batches(digits[0], digits[1], 1), **kwargs)


def test_bad_data_is_rejected(digits, trained):
    cm = _prune(trained, digits)
    x, y = digits[0][:BATCH], digits[1][:BATCH]
    with pytest.raises(fxopt.TrainingError, match="data gave no batches"):
        fxopt.finetune(cm, data=[], teacher=trained)
    with pytest.raises(fxopt.TrainingError, match="no target and there is no teacher"):
        fxopt.finetune(cm, data=[x])
    with pytest.raises(fxopt.TrainingError, match="one-shot iterator"):
        fxopt.finetune(cm, data=_generator_of_one_batch(digits), steps=2)
    with pytest.raises(fxopt.InputShapeError, match=r"finetune: a batch was given .* dim 3 is static \(8\) and got 7"):
        fxopt.finetune(cm, data=[(x[:10, :, :, :7], y[:10])])
    with pytest.raises(ValueError):  # TrainingError is a ValueError too
        fxopt.finetune(cm, data=[(x, y, y)])


def test_teacher_with_other_outputs_is_rejected_naming_both_shapes(digits, trained):
    cm = _prune(trained, digits)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    batch = digits[0][:BATCH], digits[1][:BATCH]
    with pytest.raises(fxopt.TrainingError) as info:
        fxopt.finetune(cm, data=[batch], teacher=teacher)
    assert "(64, 7)" in str(info.value) and "(64, 10)" in str(info.value)
    with pytest.raises(fxopt.TrainingError, match="teacher is the model being trained"):
        fxopt.finetune(cm, data=[batch], teacher=cm)

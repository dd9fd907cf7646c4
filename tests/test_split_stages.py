"""split-stages: balanced stages that chain (each stage's outputs are the next one's inputs),
run in sequence to the original outputs, cut at block boundaries, and honour their options."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.quant import FakeQuantize

torchvision = pytest.importorskip("torchvision")


def _stages(cm) -> list:
    gm = cm.graph_module if hasattr(cm, "graph_module") else cm
    names = sorted((n for n, _ in gm.named_children() if n.startswith("stage_")), key=lambda n: int(n[6:]))
    return [gm.get_submodule(n) for n in names]


def _chain(stages, inputs):
    """Run the stages as a pipeline schedule does: stage i's outputs are stage i+1's inputs."""
    values = inputs
    for stage in stages:
        out = stage(*values)
        values = out if isinstance(out, tuple) else (out,)
    return values[0] if len(values) == 1 else values


def _resnet18():
    model = torchvision.models.resnet18().eval()
    return model, (torch.randn(2, 3, 64, 64),)


@pytest.mark.parametrize("k", [2, 4])
def test_resnet18_stages_chain_to_the_original_outputs(k):
    model, x = _resnet18()
    cm = fxopt.compile(model, x, pipeline=f"split-stages{{num-stages={k}}}")
    stages = _stages(cm)
    assert len(stages) == k
    with torch.no_grad():
        ref = model(*x)
        torch.testing.assert_close(cm(*x), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
        torch.testing.assert_close(_chain(stages, x), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    report = cm.report.stages
    assert [s.index for s in report.stages] == list(range(k)) and len(report.cuts) == k - 1
    # every cut falls between residual blocks: one tensor crosses it
    assert all(s.sends_tensors == 1 for s in report.stages[:-1]) and report.stages[-1].sends == 0
    total = sum(p.numel() for p in model.parameters())
    assert sum(s.params for s in report.stages) == total
    assert sum(sum(p.numel() for p in s.parameters()) for s in stages) == total  # each weight in one stage


def test_balance_by_macs_and_by_params_differ_where_they_should():
    """VGG: convolutions hold the MACs, the classifier the parameters."""
    model, x = torchvision.models.vgg11().eval(), (torch.randn(1, 3, 32, 32),)
    by_macs = fxopt.compile(model, x, pipeline="split-stages{num-stages=2 cut-weight=0}").report.stages
    by_params = fxopt.compile(model, x, pipeline="split-stages{num-stages=2 balance=params cut-weight=0}").report.stages
    macs = [s.macs for s in by_macs.stages]
    params = [s.params for s in by_params.stages]
    assert max(macs) / sum(macs) < 0.6          # MAC-balanced
    assert max(params) / sum(params) < max(s.params for s in by_macs.stages) / sum(params)


def test_measured_balance_times_every_op():
    model, x = _resnet18()
    cm = fxopt.compile(model, x, pipeline="split-stages{num-stages=2 balance=measured}")
    report = cm.report.stages
    assert report.balance == "measured" and all(s.cost > 0 for s in report.stages)
    with torch.no_grad():
        torch.testing.assert_close(cm(*x), model(*x))


def test_max_stage_memory_is_honoured_or_a_clear_error():
    model, x = _resnet18()
    params = sum(p.numel() * 4 for p in model.parameters())
    cm = fxopt.compile(model, x, pipeline=f"split-stages{{num-stages=4 max-stage-memory={int(params * 0.45)}}}")
    assert all(s.param_bytes + s.activation_bytes <= params * 0.45 for s in cm.report.stages.stages)
    with pytest.raises(fxopt.FxoptError, match="cannot be met with 2 stages.*largest stage"):
        fxopt.compile(model, x, pipeline=f"split-stages{{num-stages=2 max-stage-memory={params // 10}}}")


def test_stages_sub_pipeline_quantizes_every_stage():
    model, x = _resnet18()
    batches = [(torch.randn(2, 3, 64, 64),) for _ in range(2)]
    cm = fxopt.compile(model, x, pipeline="split-stages{num-stages=2},stages(fold-bn,fake-quant)",
                       calibration=batches)
    for stage in _stages(cm):
        assert any(isinstance(m, FakeQuantize) for m in stage.modules())
    with torch.no_grad():
        out = cm(*x)
    assert torch.nn.functional.cosine_similarity(out, model(*x)).min() > 0.9


class _Encoder(nn.Module):
    """A BERT-like encoder: embeddings, 4 post-norm transformer layers with a padding mask, a pooler."""

    def __init__(self, vocab=100, dim=32, layers=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pool = nn.Linear(dim, dim)

    def forward(self, ids, mask):
        h = self.encoder(self.embed(ids) + self.position, src_key_padding_mask=mask == 0)
        return torch.tanh(self.pool(h[:, 0])), h


@pytest.mark.parametrize("k", [2, 4, 8])
def test_bert_like_encoder_stages_equal_the_original(k):
    model = _Encoder().eval()
    ids, mask = torch.randint(0, 100, (2, 16)), torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    cm = fxopt.compile(model, (ids, mask), pipeline=f"split-stages{{num-stages={k}}}")
    assert len(_stages(cm)) == k
    with torch.no_grad():
        ref = model(ids, mask)
        for got, want in zip(cm(ids, mask), ref):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for got, want in zip(_chain(_stages(cm), (ids, mask)), ref):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_the_user_model_is_untouched_and_splitting_twice_is_refused():
    model, x = _resnet18()
    before = copy.deepcopy(model.state_dict())
    cm = fxopt.compile(model, x, pipeline="split-stages{num-stages=2}")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(fxopt.FxoptError, match="already split"):
        fxopt.PassManager("split-stages{num-stages=2}").run(cm.graph_module)


@pytest.mark.parametrize("pipeline, message", [
    ("split-stages{num-stages=0}", r"option 'num-stages' takes an integer in \[1, inf\), got 0"),
    ("split-stages{num-stages=500}", "cannot make 500 stages"),
    ("split-stages{cut-weight=-1}", r"option 'cut-weight' takes a finite number in \[0, inf\), got -1"),
    ("split-stages{max-stage-memory=0}", r"option 'max-stage-memory' takes an integer in \[1, inf\), got 0"),
])
def test_bad_options_are_clear_errors(pipeline, message):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with pytest.raises(fxopt.FxoptError, match=message):
        fxopt.compile(model, (torch.randn(2, 8),), pipeline=pipeline)

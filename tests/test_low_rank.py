"""low-rank pass: factor chains of plain ops, rank policies honoured, errors measured, composes."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.analyses import Cost
from fxopt.passes.low_rank.ranks import kept_energy
from fxopt.passes.low_rank import decompose as D

aten = torch.ops.aten


class MLP(nn.Module):
    def __init__(self, dims=(64, 96, 48, 10)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 32, 3, stride=2, padding=1, dilation=1)
        self.c3 = nn.Conv2d(32, 48, 1)
        self.c4 = nn.Conv2d(48, 48, (3, 5), padding=(1, 2), dilation=(1, 2))
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        x = self.c4(x)
        return self.fc(x.mean((2, 3)))


def _correlated(n, dim, seed=0):
    """Inputs with a skewed covariance: a few directions carry most of the energy."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * torch.logspace(0, -2, dim)
    return torch.randn(n, dim, generator=g) @ mix.T


def _compile(model, x, pipeline, calibration=None):
    return fxopt.compile(model, (x,), pipeline=pipeline, calibration=calibration)


def _ops(cm, target):
    return [n for n in cm.graph_module.graph.nodes if n.target == target]


def test_linears_become_two_linears_and_macs_fall():
    model, x = MLP().eval(), torch.randn(16, 64)
    before = [p.clone() for p in model.parameters()]
    cm = _compile(model, x, "low-rank{rank-policy=fixed rank=0.25 min-saving=0}")
    report = cm.report.lowrank
    assert [r.rank for r in report.layers] == ["16", "12", "3"]    # ceil(0.25 * min(out, in))
    assert len(_ops(cm, aten.linear.default)) == 6
    assert all(r.error_kind == "weight" and 0 < r.error < 1 for r in report.layers)
    macs = fxopt.AnalysisManager(cm.graph_module).get(Cost).macs
    dense = fxopt.AnalysisManager(fxopt.trace(model, (x,))).get(Cost).macs
    assert macs < 0.5 * dense and report.macs()[1] < 0.5 * report.macs()[0]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # the model is untouched
    with torch.no_grad():
        assert cm(x).shape == (16, 10)


@pytest.mark.parametrize("form", ["tucker2", "spatial"])
def test_full_energy_reproduces_the_model(form):
    """energy=1 keeps every non-zero singular value: the chains reproduce the dense ops."""
    model, x = ConvNet().eval(), torch.randn(2, 8, 16, 16)
    cm = _compile(model, x, f"low-rank{{rank-policy=energy energy=1.0 min-saving=-100 conv-form={form}}}")
    report = cm.report.lowrank
    assert len(report.factorized) == 5
    assert {r.form for r in report.factorized} == {form, "matrix"}
    with torch.no_grad():
        ref, got = model(x), cm(x)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_energy_policy_keeps_at_least_the_energy_asked():
    model, x = MLP((64, 128, 128, 10)).eval(), torch.randn(16, 64)
    cm = _compile(model, x, "low-rank{rank-policy=energy energy=0.6 min-saving=-100}")
    for row, layer in zip(cm.report.lowrank.layers, model.layers):
        values = D.matrix_spectrum(layer.weight.detach())
        rank = int(row.rank)
        assert kept_energy(values, rank) >= 0.6 > kept_energy(values, rank - 1)


def test_vbmf_finds_the_rank_of_noisy_low_rank_weights():
    model, x = MLP((64, 96, 48, 10)).eval(), torch.randn(16, 64)
    with torch.no_grad():
        for layer, rank in zip(model.layers[:2], (6, 4)):
            out, inp = layer.weight.shape
            layer.weight.copy_(torch.randn(out, rank) @ torch.randn(rank, inp) / 8 + 0.01 * torch.randn(out, inp))
    cm = _compile(model, x, "low-rank{rank-policy=vbmf skip=[layers.2]}")
    assert [r.rank for r in cm.report.lowrank.layers[:2]] == ["6", "4"]
    with torch.no_grad():
        ref = model(x)
        assert (cm(x) - ref).norm() < 0.1 * ref.norm()     # only the noise was dropped


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_budget_is_met_within_one_percent(budget):
    model, x = ConvNet().eval(), torch.randn(2, 8, 16, 16)
    cm = _compile(model, x, f"low-rank{{rank-policy=budget budget={budget} min-saving=0}}")
    before, after = cm.report.lowrank.macs()
    assert budget - 0.01 <= after / before <= budget


def test_activation_aware_lowers_the_output_error():
    torch.manual_seed(0)
    model = MLP((64, 64, 64, 64)).eval()
    data = _correlated(512, 64)
    batches = [data[i:i + 64] for i in range(0, 512, 64)]
    errors = {}
    for method in ("svd", "activation-aware"):
        cm = _compile(model, batches[0], f"low-rank{{method={method} rank-policy=fixed rank=8 min-saving=0}}",
                      calibration=batches)
        rows = cm.report.lowrank.layers
        assert all(r.error_kind == "output" for r in rows)
        errors[method] = rows[0].error
    assert errors["activation-aware"] < 0.6 * errors["svd"], errors   # measured 0.44 vs 0.80


def test_min_saving_and_skip_keep_layers_dense_with_a_reason():
    model, x = MLP().eval(), torch.randn(16, 64)
    cm = _compile(model, x, "low-rank{rank-policy=fixed rank=0.9 skip=[layers.0]}")
    rows = {r.path: r for r in cm.report.lowrank.layers}
    assert rows["layers.0"].kept == "skipped: matches skip pattern 'layers.0'"
    assert "min-saving" in rows["layers.1"].kept          # rank 0.9: the chain costs more than dense
    assert not cm.report.lowrank.factorized
    assert "kept: skipped" in str(cm.report.lowrank)


def test_min_speedup_keeps_layers_that_would_run_slower():
    model, x = MLP().eval(), torch.randn(16, 64)
    cm = _compile(model, x, "low-rank{rank-policy=fixed rank=0.25 min-saving=0 min-speedup=1000}")
    rows = cm.report.lowrank.layers
    assert all(r.speedup is not None and r.kept.startswith("measured speedup") for r in rows)
    assert len(_ops(cm, aten.linear.default)) == 3


def test_low_rank_then_fake_quant_quantizes_both_factors():
    model, x = MLP().eval(), torch.randn(16, 64)
    cm = _compile(model, x, "low-rank{rank-policy=fixed rank=0.25 min-saving=0},fake-quant",
                  calibration=[torch.randn(16, 64)])
    quantized = cm.report.quant.quantized
    assert len(quantized) == 6
    weights = {p for q in quantized for p in q.quantizers if "lr_first" in p or "lr_last" in p}
    assert len(weights) == 6


def test_low_rank_factors_run_as_int8_kernels():
    model, x = ConvNet().eval(), torch.randn(4, 8, 16, 16)
    batches = [torch.randn(4, 8, 16, 16) for _ in range(3)]
    cm = fxopt.compile(model, (x,), pipeline="low-rank{rank-policy=budget budget=0.6 min-saving=0},fake-quant",
                       backend="int8", calibration=batches)
    kernels = [k for _, k in fxopt.backends.int8.int8_report(cm).int8_ops]
    assert kernels.count("QConv2d") >= 2 * len(cm.report.lowrank.factorized) - 2
    fake = fxopt.lower(cm, backend="eager")
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(fake(x), cm(x)).min() > 0.999


def test_prune_then_low_rank_factorizes_the_pruned_layers():
    model, x = MLP((64, 128, 128, 10)).eval(), torch.randn(16, 64)
    cm = _compile(model, x, "prune-channels{ratio=0.5},low-rank{rank-policy=fixed rank=0.25 min-saving=0}")
    shapes = [r.shape for r in cm.report.lowrank.layers]
    assert shapes == [(64, 64), (64, 64), (10, 64)]
    with torch.no_grad():
        assert cm(x).shape == (16, 10)


def test_resnet18_budget_runs_and_shrinks():
    torchvision = pytest.importorskip("torchvision")
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    cm = _compile(model, x, "fold-bn,low-rank{rank-policy=budget budget=0.5}")
    before, after = cm.report.lowrank.macs()
    assert 0.49 <= after / before <= 0.5
    forms = {r.form for r in cm.report.lowrank.factorized}
    assert forms & {"tucker2", "spatial"} and forms <= {"tucker2", "spatial", "matrix"}
    with torch.no_grad():
        assert torch.isfinite(cm(x)).all()


@pytest.mark.parametrize("pipeline, message", [
    ("low-rank{rank-policy=fixed rank=64}", "not below the full rank"),
    ("low-rank{rank-policy=energy energy=0}", "option 'energy' takes a finite number in (0, 1], got 0"),
    ("low-rank{rank-policy=energy energy=1.5}", "option 'energy' takes a finite number in (0, 1], got 1.5"),
    ("low-rank{rank-policy=budget budget=0}", "option 'budget' takes a finite number in (0, 1], got 0"),
    ("low-rank{method=activation-aware}", "needs calibration batches"),
    ("low-rank{rank-policy=lucky}", "takes fixed|energy|budget|vbmf"),
    ("low-rank{targets=[attention]}", "takes list[linear|conv], got ['attention']"),
])
def test_bad_options_are_clear_errors(pipeline, message):
    model, x = MLP().eval(), torch.randn(16, 64)
    with pytest.raises(fxopt.FxoptError, match=re.escape(message)):
        _compile(model, x, pipeline)


def test_skip_pattern_that_matches_nothing_warns():
    model, x = MLP().eval(), torch.randn(16, 64)
    with pytest.warns(UserWarning, match="matches no targeted layer"):
        _compile(model, x, "low-rank{skip=[encoder.*]}")


def test_k_by_1_kernels_have_no_spatial_form():
    """A k x 1 conv (CREPE's) has no spatial separation: auto factorizes it with Tucker-2."""
    model = nn.Sequential(nn.Conv2d(8, 32, (9, 1), padding=(4, 0)), nn.ReLU(), nn.Conv2d(32, 16, (9, 1))).eval()
    x = torch.randn(2, 8, 40, 1)
    cm = _compile(model, x, "low-rank{rank-policy=fixed rank=0.5 min-saving=0 conv-form=auto}")
    assert {r.form for r in cm.report.lowrank.factorized} == {"tucker2"}
    with torch.no_grad():
        assert cm(x).shape == model(x).shape

"""Sensitivity analysis, fxopt.explain and prune-channels{target-macs}: the table agrees with
real single-group pruning, leaves the graph as it was, is cached; the MAC target is met."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.analyses import Cost, divergence, output_kinds
from fxopt.analyses.channel_groups import ChannelGroups
from fxopt.ir.graph import light_copy
from fxopt.analyses.sensitivity import MAX_ROWS, SETTINGS, Sensitivity, SensitivityTable


@pytest.fixture(scope="module")
def mlp_digits():
    """A small MLP trained for 300 steps on digits (flattened), its train batches and the
    held-out rows."""
    from tests.digits import batches, trained_mlp

    model, x_test = trained_mlp()
    data = [x for x, _ in batches(x_test, torch.zeros(len(x_test)), 0)][:4]
    return model.eval(), data


def _traced(model, data):
    return fxopt.trace(model, (data[0],))


def test_prune_rows_equal_real_single_group_pruning(mlp_digits):
    """A prune row's divergence is what prune-channels removing that group alone gives,
    and the order of the groups is the same."""
    model, data = mlp_digits
    gm = _traced(model, data)
    am = fxopt.AnalysisManager(gm, data=data)
    table = am.get(Sensitivity)
    groups = {str(g.id): g for g in am.get(ChannelGroups).prunable()}
    assert table.units("prune") == list(groups)
    biases = {u: next(m.name for m in g.members if m.name.endswith("bias")) for u, g in groups.items()}
    x = torch.cat(data)[:MAX_ROWS]   # the rows the analysis measures on
    with torch.no_grad():
        reference = model(x)
    measured = {}
    for unit in groups:
        others = [b for u, b in biases.items() if u != unit]
        pruned = fxopt.compile(model, (data[0],), pipeline=[fxopt.passes.prune_channels.PruneChannels(
            ratio=0.5, ignore=tuple(others))])
        with torch.no_grad():
            measured[unit] = float(divergence(pruned(x), reference, output_kinds(gm)))
        assert table.curve("prune", unit)[0.5] == pytest.approx(measured[unit], rel=1e-3, abs=1e-6)
    by_table = sorted(groups, key=lambda u: table.curve("prune", u)[0.5])
    assert by_table == sorted(groups, key=measured.get)


def test_graph_unchanged_and_cached(mlp_digits, monkeypatch):
    model, data = mlp_digits
    gm = _traced(model, data)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    ids = {k: id(v) for k, v in gm.state_dict(keep_vars=True).items()}
    with torch.no_grad():
        expected = gm(data[0])
    runs = []
    original = Sensitivity.run
    monkeypatch.setattr(Sensitivity, "run", lambda self, g, a: runs.append(1) or original(self, g, a))
    am = fxopt.AnalysisManager(gm, data=data)
    table = am.get(Sensitivity)
    assert am.get(Sensitivity) is table and len(runs) == 1
    with torch.no_grad():
        assert torch.equal(gm(data[0]), expected)
    assert all(torch.equal(before[k], v) and id(v) == ids[k] for k, v in gm.state_dict(keep_vars=True).items())
    assert isinstance(table, SensitivityTable) and table.measure == "KL (logits)" and table.source == "data"
    for kind in ("prune", "quant", "lowrank"):
        unit = table.units(kind)[0]
        assert set(table.curve(kind, unit)) == set(SETTINGS[kind])
    lowest = table.curve("quant", "linear")   # fewer bits: further from the float model
    assert lowest[8] < lowest[2]
    assert "prune" in str(table) and "quant" in str(table)


def test_no_batches_is_refused(mlp_digits):
    model, data = mlp_digits
    with pytest.raises(fxopt.PassOptionError, match="data="):
        fxopt.AnalysisManager(_traced(model, data)).get(Sensitivity)


def test_calibration_used_when_no_data(mlp_digits):
    model, data = mlp_digits
    table = fxopt.AnalysisManager(_traced(model, data), calibration=data[:1]).get(Sensitivity)
    assert table.source == "calibration" and table.batches == 1


def test_prune_rows_equal_real_pruning_through_batchnorm_and_flatten():
    """The digits CNN (conv-BN-ReLU, a flatten into the classifier): zeroing a group's
    channels gives what removing them gives."""
    from tests.digits import cnn

    torch.manual_seed(0)
    model = cnn().eval()
    for bn in (model[1], model[4]):   # running statistics that are not the identity
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    data = [torch.rand(16, 1, 8, 8) for _ in range(2)]
    table = fxopt.AnalysisManager(_traced(model, data), data=data).get(Sensitivity)
    x = torch.cat(data)
    with torch.no_grad():
        reference = model(x)
    for unit, other in (("0", "3.bias"), ("1", "0.bias")):
        pruned = fxopt.compile(model, (data[0],), pipeline=[fxopt.passes.prune_channels.PruneChannels(
            ratio=0.75, ignore=(other,))])
        with torch.no_grad():
            real = float(divergence(pruned(x), reference, "logits"))
        assert table.curve("prune", unit)[0.75] == pytest.approx(real, rel=1e-3, abs=1e-7)


def test_explain_python_writes_the_plot(mlp_digits, tmp_path):
    model, data = mlp_digits
    table = fxopt.explain(model, (data[0],), data[:2], plot=tmp_path / "s.png")
    assert table.units("prune") and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_explain_cli_writes_table_and_plot(tmp_path, capsys):
    from fxopt.api.cli import main

    source = tmp_path / "net.py"
    source.write_text("import torch.nn as nn\n"
                      "def net():\n"
                      "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),\n"
                      "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))\n")
    out = tmp_path / "out"
    assert main(["explain", f"{source}:net", "--input-shape", "4x3x12x12", "--batches", "2", "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())      # the table wraps at the terminal's width
    assert "prune" in printed and "quant" in printed and "random batches" in printed
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    import json
    assert json.loads((out / "sensitivity.json").read_text())["rows"]


def _macs(gm) -> int:
    return fxopt.AnalysisManager(gm).get(Cost).macs


def _prune_to(model, data, target):
    from fxopt.passes.prune_channels import PruneChannels

    return fxopt.compile(model, (data[0],), pipeline=[PruneChannels(target_macs=target)], data=data)


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 24, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5)).eval()


@pytest.mark.parametrize("which", ["cnn", "digits"])
def test_target_macs_met_within_two_percent(mlp_digits, which):
    if which == "cnn":
        model, data = _small_cnn(), [torch.randn(8, 3, 12, 12) for _ in range(2)]
    else:
        model, data = mlp_digits
    before = _macs(_traced(model, data))
    compiled = _prune_to(model, data, 0.35)
    reached = _macs(compiled.graph_module) / before
    assert reached == pytest.approx(0.35, rel=0.02)
    notes = " ".join(compiled.report.records[0].notes)
    assert "target-macs=0.35" in notes and f"kept {reached:.3f}" in notes and "ratios: group" in notes


def test_target_macs_prunes_less_sensitive_groups_more(mlp_digits):
    """Ratios differ by group (a local ratio would cut all alike), the most removed from
    the group whose divergence per MAC saved is lowest; the outputs stay closer than with
    the one local ratio that keeps as many MACs."""
    from fxopt.passes.prune_channels import PruneChannels

    model, data = mlp_digits
    gm = _traced(model, data)
    am = fxopt.AnalysisManager(gm, data=data)
    table = am.get(Sensitivity)
    price = {u: table.curve("prune", u)[0.5] / table.saved("prune", u)[0.5] for u in table.units("prune")}
    compiled = _prune_to(model, data, 0.5)
    widths = {"0": 48, "1": 32, "2": 24}
    pruned = compiled.graph_module
    kept = {"0": pruned.get_parameter("0.weight").shape[0], "1": pruned.get_parameter("2.weight").shape[0],
            "2": pruned.get_parameter("4.weight").shape[0]}
    ratios = {u: 1 - kept[u] / widths[u] for u in widths}
    assert ratios[min(price, key=price.get)] > ratios[max(price, key=price.get)]
    x = torch.cat(data)[:MAX_ROWS]
    with torch.no_grad():
        reference = model(x)
        allocated = float(divergence(compiled(x), reference, "logits"))
    reached = _macs(pruned) / _macs(gm)
    uniform_graphs = []
    for ratio in (0.35, 0.4, 0.45):   # about where one ratio for all keeps half the MACs
        copy = light_copy(gm)
        fxopt.PassManager([PruneChannels(ratio=ratio)]).run(copy, example_inputs=(data[0],))
        uniform_graphs.append(copy)
    local = min(uniform_graphs, key=lambda g: abs(_macs(g) / _macs(gm) - reached))
    assert abs(_macs(local) / _macs(gm) - reached) < 0.03
    with torch.no_grad():
        uniform = float(divergence(local(x), reference, "logits"))
    assert allocated < uniform


def test_target_macs_refuses_a_ratio_and_says_when_unreachable(mlp_digits):
    from fxopt.passes.prune_channels import PruneChannels

    with pytest.raises(fxopt.PassOptionError, match="ratio=0.3"):
        PruneChannels(target_macs=0.3, ratio=0.3)
    fxopt.parse_pipeline("prune-channels{target-macs=0.35}")
    model, data = mlp_digits
    with pytest.warns(UserWarning, match="cannot be reached"):
        compiled = _prune_to(model, data, 0.01)
    assert "cannot be reached" in " ".join(compiled.report.records[0].notes)

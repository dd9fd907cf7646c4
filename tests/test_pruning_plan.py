"""Pruning plans: recorded by prune-channels, replayed on a fresh model, saved without pickle."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from nets import SmallNet
import fxopt
from fxopt.api.cli import main
from fxopt.passes.prune_channels.plan import PruningPlan

NETS_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nets.py")


def _small():
    torch.manual_seed(1)
    return SmallNet().eval(), torch.randn(2, 3, 8, 8)


def _prune(model, x, pipeline="prune-channels{ratio=0.5}"):
    cm = fxopt.compile(model, (x,), pipeline=pipeline, verify=True)
    plan = fxopt.pruning_plan(cm)
    assert plan is not None
    return cm, plan


def _outputs(module, x):
    with torch.no_grad():
        return module(x)


def _assert_plan_describes(plan: PruningPlan, original: nn.Module, pruned: torch.fx.GraphModule):
    """Slicing the original tensors by the plan's kept indices gives the pruned tensors."""
    before, after = original.state_dict(), pruned.state_dict()
    assert plan.params, "nothing was recorded"
    for fqn, dims in plan.params.items():
        assert plan.shapes[fqn] == tuple(before[fqn].shape), fqn
        value = before[fqn]
        for dim, kept in dims.items():
            assert kept == sorted(set(kept)) and len(kept) < value.shape[dim], (fqn, dim)
            value = value.index_select(dim, torch.tensor(kept))
        assert plan.pruned_shape(fqn) == tuple(after[fqn].shape), fqn
        assert torch.equal(value, after[fqn]), fqn
    for fqn in after:  # every tensor that shrank is in the plan
        if fqn not in plan.params:
            assert after[fqn].shape == before[fqn].shape, fqn


def test_plan_json_round_trip(tmp_path):
    model, x = _small()
    cm, plan = _prune(model, x)
    _assert_plan_describes(plan, model, cm.graph_module)
    assert plan.inputs == [{"shape": [2, 3, 8, 8], "dtype": "float32"}]
    again = PruningPlan.from_json(plan.to_json())
    assert again == plan
    path = tmp_path / "sub" / "plan.json"
    plan.save(path)
    assert PruningPlan.load(path) == plan
    assert sorted(p.name for p in path.parent.iterdir()) == ["plan.json"]  # no temp file left
    data = json.loads(path.read_text())
    assert data["format"] == "fxopt.pruning-plan" and data["version"] == 1
    assert data["params"]["c1.weight"]["shape"] == [8, 3, 3, 3]


def test_plan_rejects_other_versions_and_garbage():
    model, x = _small()
    _, plan = _prune(model, x)
    data = plan.to_dict()
    data["version"] = 99
    with pytest.raises(fxopt.FxoptError, match="version 99"):
        PruningPlan.from_dict(data)
    with pytest.raises(fxopt.FxoptError, match="not valid JSON"):
        PruningPlan.from_json("{")
    with pytest.raises(fxopt.FxoptError, match="not a pruning plan"):
        PruningPlan.from_json('{"groups": []}')


def test_unpruned_model_has_no_plan():
    model, x = _small()
    assert fxopt.pruning_plan(fxopt.compile(model, (x,), pipeline="dce")) is None


class Heads(nn.Module):
    """Hand-split attention heads: heads and head dims are two groups sharing q/k/v's dim 0."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.heads, self.q, self.k, self.v, self.o = heads, *(nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (m(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        return x + self.o(((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("name", ["smallnet", "resnet18", "heads"])
def test_apply_plan_reproduces_the_pruned_model(name):
    if name == "smallnet":
        model, x = _small()
    elif name == "heads":
        torch.manual_seed(3)
        model, x = Heads().eval(), torch.randn(2, 5, 16)
    else:
        torch.manual_seed(2)
        model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    cm, plan = _prune(model, x)
    _assert_plan_describes(plan, model, cm.graph_module)
    fresh = copy.deepcopy(model)
    untouched = {k: v.clone() for k, v in fresh.state_dict().items()}
    gm = fxopt.apply_plan(fresh, PruningPlan.from_json(plan.to_json()))
    assert torch.equal(_outputs(gm, x), _outputs(cm, x))
    pruned = cm.graph_module.state_dict()
    assert {k: v.shape for k, v in gm.state_dict().items()} == {k: v.shape for k, v in pruned.items()}
    assert all(torch.equal(v, untouched[k]) for k, v in fresh.state_dict().items())  # not mutated
    assert fxopt.pruning_plan(gm) == plan


def test_save_and_load_pruned_take_the_weights_from_the_file(tmp_path):
    model, x = _small()
    cm, plan = _prune(model, x)
    folder = tmp_path / "pruned"
    fxopt.save_pruned(cm, folder)
    assert sorted(os.listdir(folder)) == ["manifest.json", "model.safetensors", "plan.json"]  # no pickle
    torch.manual_seed(123)
    fresh = SmallNet().eval()  # other random weights
    assert not torch.equal(fresh.c1.weight, model.c1.weight)
    gm = fxopt.load_pruned(fresh, folder)
    assert torch.equal(_outputs(gm, x), _outputs(cm, x))
    assert fxopt.pruning_plan(gm) == plan
    fxopt.save_pruned(gm, tmp_path / "again")  # a loaded model saves again
    assert sorted(os.listdir(tmp_path / "again")) == ["manifest.json", "model.safetensors", "plan.json"]


def test_save_pruned_leaves_nothing_half_written(tmp_path, monkeypatch):
    import safetensors.torch

    model, x = _small()
    cm, _ = _prune(model, x)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        fxopt.save_pruned(cm, tmp_path / "pruned")
    assert os.listdir(tmp_path) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    monkeypatch.undo()
    with pytest.raises(fxopt.FxoptError, match="holds files fxopt did not write"):
        fxopt.save_pruned(cm, tmp_path / "mine")          # refused: nothing there is replaced
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_load_pruned_with_weights_of_another_pruning_is_a_clear_error(tmp_path):
    model, x = _small()
    fxopt.save_pruned(_prune(model, x, "prune-channels{ratio=0.5}")[0], tmp_path / "a")
    fxopt.save_pruned(_prune(model, x, "prune-channels{ratio=0.25}")[0], tmp_path / "b")
    os.replace(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(fxopt.FxoptError, match="a/model.safetensors' does not match manifest.json"):
        fxopt.load_pruned(SmallNet().eval(), tmp_path / "a")
    with pytest.raises(fxopt.FxoptError, match="b/model.safetensors' does not match manifest.json"):
        fxopt.load_pruned(SmallNet().eval(), tmp_path / "b")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())   # edited to match the swap
    manifest["files"]["model.safetensors"] = json.loads((tmp_path / "b" / "manifest.json").read_text())[
        "files"]["model.safetensors"]
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(fxopt.FxoptError, match="shape mismatch c1.weight"):
        fxopt.load_pruned(SmallNet().eval(), tmp_path / "a")


def test_a_plan_asking_for_a_huge_input_is_refused_before_allocating():
    model, x = _small()
    data = _prune(model, x)[1].to_dict()
    data["inputs"] = [{"shape": [1 << 20, 1 << 20, 1 << 10], "dtype": "float32"}]
    with pytest.raises(fxopt.FxoptError, match="plan asks for an input of shape"):
        PruningPlan.from_dict(data)


def _mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4)).eval()


def test_plan_from_another_model_is_a_clear_error():
    model, x = _small()
    _, plan = _prune(model, x)
    with pytest.raises(fxopt.FxoptError, match="which this model does not have") as info:
        fxopt.apply_plan(torchvision.models.resnet18().eval(), plan, (torch.randn(1, 3, 64, 64),))
    assert "act.weight" in str(info.value) and "b1.bias" in str(info.value)
    _, mlp_plan = _prune(_mlp(16), torch.randn(2, 8))
    with pytest.raises(fxopt.FxoptError, match=r"expects 0.bias of shape \(16,\), this model has \(12,\)"):
        fxopt.apply_plan(_mlp(12), mlp_plan)


def test_a_plan_that_disagrees_with_the_groups_names_the_tensor():
    model, x = _small()
    _, plan = _prune(model, x)
    tampered = PruningPlan.from_dict(plan.to_dict())
    kept = tampered.params["c1.bias"][0]
    tampered.params["c1.bias"][0] = [i for i in range(8) if i not in kept][: len(kept)]
    with pytest.raises(fxopt.FxoptError, match="disagrees") as info:
        fxopt.apply_plan(copy.deepcopy(model), tampered)
    assert "c1.bias" in str(info.value)
    blocked = PruningPlan.from_dict(plan.to_dict())
    blocked.params["fc2.bias"], blocked.shapes["fc2.bias"] = {0: [0, 1, 2]}, (5,)
    with pytest.raises(fxopt.FxoptError, match="fc2.bias dim 0.*model output"):
        fxopt.apply_plan(copy.deepcopy(model), blocked)


def test_two_prune_passes_compose_into_one_plan():
    model, x = _small()
    cm, plan = _prune(model, x, "prune-channels{ratio=0.3},prune-channels{ratio=0.3}")
    once, _ = _prune(model, x, "prune-channels{ratio=0.3}")
    assert cm.graph_module.state_dict()["c1.weight"].shape[0] < once.graph_module.state_dict()["c1.weight"].shape[0]
    _assert_plan_describes(plan, model, cm.graph_module)  # indices are the ORIGINAL ones
    gm = fxopt.apply_plan(copy.deepcopy(model), plan)
    assert torch.equal(_outputs(gm, x), _outputs(cm, x))


def test_compose_maps_positions_back_to_original_indices():
    first = PruningPlan({"w": {0: [0, 2, 4, 6]}}, {"w": (8, 3)}, [{"shape": [1], "dtype": "float32"}])
    second = PruningPlan({"w": {0: [1, 3], 1: [0, 2]}, "v": {0: [1]}}, {"w": (4, 3), "v": (2,)}, [])
    both = first.compose(second)
    assert both.params == {"w": {0: [2, 6], 1: [0, 2]}, "v": {0: [1]}}
    assert both.shapes == {"w": (8, 3), "v": (2,)} and both.pruned_shape("w") == (2, 2)
    assert both.inputs == first.inputs


class RollNet(nn.Module):
    """A channel roll: an op the channel analysis does not know blocks its channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.c(F.relu(self.b(torch.roll(h, 1, dims=1))))


def test_explain_pruning_lists_groups_and_why_not():
    table = fxopt.explain_pruning(RollNet().eval(), (torch.randn(1, 3, 4, 4),))
    assert isinstance(table, fxopt.analyses.channel_groups.ChannelGroupsResult)
    blocked = [g for g in table.groups if not g.prunable and "roll" in (g.reason or "")]
    assert blocked and any(m.name == "a.weight" for m in blocked[0].members)
    assert any(g.prunable and g.member("b.weight", 0) for g in table.groups)
    text = str(table)
    assert "prunable" in text and "kind" in text and "size" in text
    assert "why not: unknown op aten.roll" in text and "blocked ops (1):" in text
    assert "a.weight:0" in text and "b.weight:0" in text
    json.dumps(table.to_dict())


def test_cli_explain_prints_the_table_and_json(tmp_path, capsys):
    out_json = tmp_path / "groups.json"
    code = main(["run", f"{NETS_PY}:SmallNet", "--input-shape", "2x3x8x8", "--explain", "--json", str(out_json)])
    assert code == 0
    out = capsys.readouterr().out
    assert "5 channel groups, 4 prunable" in out
    assert "why not: model output" in out and "c1.weight:0" in out
    assert "pass" not in out.split("\n")[0]  # no compile report: --explain stops before compiling
    data = json.loads(out_json.read_text())
    assert len(data["groups"]) == 5 and data["groups"][4]["prunable"] is False


def test_a_plan_replays_the_passes_that_ran_before_the_pruning(tmp_path):
    torch.manual_seed(0)
    model, x = SmallNet().eval(), torch.randn(2, 3, 8, 8)
    cm = fxopt.compile(model, (x,), pipeline="fold-bn,dce,prune-channels{ratio=0.5}")
    plan = fxopt.pruning_plan(cm)
    assert plan.before == "fold-bn,dce"
    assert fxopt.PruningPlan.from_json(plan.to_json()).before == "fold-bn,dce"
    fxopt.save_pruned(cm, tmp_path)
    fresh = SmallNet().eval()
    loaded = fxopt.load_pruned(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), cm(x), rtol=0, atol=0)

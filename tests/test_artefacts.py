"""Artefacts on disk: nothing of the user's is lost, nothing half-written is read, and
nothing found in an artefact is run (fxopt.util.artefacts, and every writer and loader on it)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.backends.fpga_int8 import load, simulate, verify

PIPELINE = "fold-bn,fake-quant{outputs=true}"


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), torch.randn(16, 8)


def _fpga(model, x, export_dir):
    return fxopt.compile(model, (x,), pipeline=PIPELINE, backend="fpga-int8", calibration=[(x,)],
                         export_dir=export_dir, verify=False)


# -- nothing of the user's is replaced --------------------------------------------------------------
def test_fpga_export_refuses_a_folder_of_the_users_before_any_work(tmp_path, monkeypatch):
    model, x = _mlp()
    project = tmp_path / "proj"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    lowered = []
    monkeypatch.setattr("fxopt.backends.fpga_int8.Lowering.run", lambda self: lowered.append(1))
    with pytest.raises(fxopt.FxoptError, match="holds files fxopt did not write"):
        _fpga(model, x, project)
    assert not lowered                                   # refused before the lowering ran
    assert os.listdir(project) == ["notes.txt"] and (project / "notes.txt").read_text() == "mine"


def test_the_current_folder_is_refused(tmp_path, monkeypatch):
    model, x = _mlp()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(fxopt.FxoptError, match="current folder"):
        _fpga(model, x, ".")
    assert os.listdir(tmp_path) == []


def test_an_earlier_export_is_replaced_whole(tmp_path):
    model, x = _mlp()
    out = tmp_path / "export"
    _fpga(model, x, out)
    first = json.loads((out / "manifest.json").read_text())
    with torch.no_grad():
        model[0].weight.mul_(2)
    _fpga(model, x, out)
    assert json.loads((out / "manifest.json").read_text()) != first
    assert sorted(os.listdir(tmp_path)) == ["export"]    # no staging or old folder left beside it
    load(out)


def test_an_unwritable_destination_fails_before_the_work(tmp_path, monkeypatch):
    model, x = _mlp()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(fxopt.FxoptError, match="is a file"):
        _fpga(model, x, tmp_path / "a-file" / "export")
    monkeypatch.setattr(os, "access", lambda path, mode: False)   # a read-only place (root writes anywhere)
    with pytest.raises(fxopt.FxoptError, match="is not writable"):
        _fpga(model, x, tmp_path / "export")
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


# -- untrusted artefacts ------------------------------------------------------------------------------
def _rewrite_manifest(folder):
    """Make the manifest match the folder's files again (what a careful attacker does)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {name: fxopt.util.artefacts.describe_file(str(folder / name)) for name in manifest["files"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_verify_never_compiles_the_folders_cpp(tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    model, x = _mlp()
    out = tmp_path / "export"
    cm = _fpga(model, x, out)
    marker = tmp_path / "PWNED"
    cpp = (out / "model.cpp").read_text()
    (out / "model.cpp").write_text('#include <cstdlib>\nstatic int pwn = std::system("touch ' + str(marker)
                                   + '");\n' + cpp)
    with pytest.raises(fxopt.FxoptError, match="model.cpp' does not match manifest.json"):
        verify(out, x, cm)
    _rewrite_manifest(out)                               # a manifest made to match does not help
    report = verify(out, x, cm)
    assert report.ok and not marker.exists()


def test_weight_paths_outside_the_folder_are_refused(tmp_path):
    model, x = _mlp()
    out = tmp_path / "export"
    _fpga(model, x, out)
    np.save(tmp_path / "outside.npy", np.zeros((16, 8), np.int8))
    for path in ("../outside.npy", str(tmp_path / "outside.npy")):
        spec = json.loads((out / "model.json").read_text())
        spec["layers"][0]["weight"] = path
        (out / "model.json").write_text(json.dumps(spec))
        _rewrite_manifest(out)
        with pytest.raises(fxopt.FxoptError, match="not a file of the export"):
            load(out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["../outside.npy"] = fxopt.util.artefacts.describe_file(str(tmp_path / "outside.npy"))
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(fxopt.FxoptError, match="outside its folder"):
        load(out)


@pytest.mark.parametrize("edit, field", [
    (lambda spec, w: spec["layers"][0].update(weight_shape=[8, 16]), "weight_shape|has shape"),
    (lambda spec, w: w.update(int32=True), "not int8"),
    (lambda spec, w: spec["layers"][0].update(multiplier=[5] * 16), "multiplier"),
    (lambda spec, w: spec["layers"][0].update(shift=400), "shift"),
    (lambda spec, w: spec["inputs"][0].update(zero_point=300), "zero_point"),
    (lambda spec, w: spec["tensors"][spec["outputs"][0]].update(shape=[1 << 20, 1 << 20]), "elements"),
    (lambda spec, w: spec["layers"][0].update(op="system"), "not an op"),
])
def test_a_model_json_outside_the_contract_is_refused_naming_the_field(tmp_path, edit, field):
    model, x = _mlp()
    out = tmp_path / "export"
    _fpga(model, x, out)
    spec = json.loads((out / "model.json").read_text())
    flags = {}
    edit(spec, flags)
    (out / "model.json").write_text(json.dumps(spec))
    if flags.get("int32"):
        name = spec["layers"][0]["weight"]
        np.save(out / name, np.load(out / name).astype(np.int32))
    _rewrite_manifest(out)
    with pytest.raises(fxopt.FxoptError, match=field) as info:
        load(out)
    assert "model.json" in str(info.value)
    with pytest.raises(fxopt.FxoptError):
        simulate(out, x)


def test_simulate_refuses_inputs_of_another_shape(tmp_path):
    model, x = _mlp()
    out = tmp_path / "export"
    _fpga(model, x, out)
    with pytest.raises(fxopt.InputShapeError, match="per-sample shape"):
        simulate(out, torch.randn(4, 9))


# -- torn artefacts: killed at any point, the old or the new one loads ---------------------------------
_KILLED = textwrap.dedent("""
    import builtins, os, shutil, signal, sys, torch, torch.nn as nn
    sys.path.insert(0, {root!r})
    import fxopt
    from fxopt.util import artefacts
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    cm = fxopt.compile(model, (x,), pipeline="prune-channels{{ratio=0.5}}")
    owner, name = {owner}, {name!r}
    real, calls = getattr(owner, name), [0]
    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == {at}:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(owner, name, dying)
    {write}
""")

_WRITES = {
    "save": "fxopt.save(cm, {path!r})",
    "save_pruned": "fxopt.save_pruned(cm, {path!r})",
    "fpga": "fxopt.compile(model, (x,), pipeline='fold-bn,fake-quant{{outputs=true}}', backend='fpga-int8', "
            "calibration=[(x,)], export_dir={path!r})",
    "checkpoint": "fxopt.finetune(cm, data=[(x, torch.tensor([0, 1]))] * 2, steps=4, checkpoint={path!r}, "
                  "checkpoint_every=1)",
}
# (what, which call) a write is killed at: files being filled, flushed, the switch itself,
# and after it while the earlier artefact is removed
_POINTS = (("builtins", "open", 1), ("builtins", "open", 4), ("os", "fsync", 2), ("os", "rename", 1),
           ("artefacts", "_exchange", 1), ("shutil", "rmtree", 1))


def _pruned_mlp(path):
    return fxopt.load_pruned(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), path)


def _checkpoint(path):
    from fxopt.train.checkpoint import load_checkpoint

    return load_checkpoint(path)


_LOADERS = {"save": fxopt.load, "save_pruned": _pruned_mlp, "fpga": load, "checkpoint": _checkpoint}


def _write_first(kind: str, path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    cm = fxopt.compile(model, (x,), pipeline="prune-channels{ratio=0.5}")
    if kind == "fpga":
        _fpga(model, x, path)
    elif kind == "checkpoint":   # a fresh run: step 1 of 4 written, then it fails: a run to resume
        path.unlink(missing_ok=True)
        with pytest.raises(fxopt.FxoptError):
            fxopt.finetune(cm, data=[(x, torch.tensor([0, 1])), (torch.randn(2, 9), torch.tensor([0, 1]))],
                           steps=4, checkpoint=path, checkpoint_every=1)
    else:
        (fxopt.save if kind == "save" else fxopt.save_pruned)(cm, path)


@pytest.mark.parametrize("kind", sorted(_WRITES))
def test_a_write_killed_at_any_point_leaves_the_old_or_the_new_artefact(tmp_path, kind):
    """SIGKILL at files being filled, flushed, the switch and after it: the old or the new
    artefact loads (and checks), nothing half-written sits under the name, and the next write
    cleans up what the killed one left."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tmp_path / ("artefact.ckpt" if kind == "checkpoint" else "artefact")
    _write_first(kind, path)
    state = lambda: path.read_bytes() if kind == "checkpoint" else (path / "manifest.json").read_text()  # noqa: E731
    old, outcomes = state(), []
    points = _POINTS if kind != "checkpoint" else (("builtins", "open", 1), ("os", "fsync", 1), ("os", "replace", 1))
    for owner, name, at in points:
        script = _KILLED.format(root=root, owner=owner, name=name, at=at, write=_WRITES[kind].format(path=str(path)))
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert proc.returncode == -9, (owner, name, at, proc.returncode, proc.stderr[-2000:])  # it was killed
        _LOADERS[kind](path)                                  # whole: the old or the new one
        outcomes.append("old" if state() == old else "new")
        _write_first(kind, path)                              # the next write cleans up what was left
        assert os.listdir(tmp_path) == [path.name], (owner, name, at, os.listdir(tmp_path))
        old = state()
    assert "old" in outcomes, outcomes

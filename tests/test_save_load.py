"""fxopt.save / fxopt.load: any compiled model, loaded in a fresh process without the
model's class, at any batch; the folder is checked against its manifest."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fxopt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_loaded(folder: str, x_path: str) -> torch.Tensor:
    """Load `folder` in a new interpreter, run it on the tensor in `x_path`, return the output;
    the child also reports whether it imported torchvision (it must not need to)."""
    code = ("import sys, torch, fxopt\n"
            f"cm = fxopt.load({folder!r})\n"
            f"y = cm(torch.load({x_path!r}))\n"
            f"torch.save(y, {x_path!r} + '.out')\n"
            "print('torchvision' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
    return torch.load(x_path + ".out")


def test_resnet18_prune50_int8_saved_and_loaded_in_a_fresh_process(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    cm = fxopt.compile(model, (torch.randn(1, 3, 32, 32),), pipeline="prune50+int8", backend="int8",
                       calibration=[torch.randn(16, 3, 32, 32) for _ in range(4)])
    assert cm(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    folder = str(tmp_path / "saved")
    fxopt.save(cm, folder)
    assert sorted(os.listdir(folder)) == ["graph.json", "manifest.json", "weights.safetensors"]
    x5 = torch.randn(5, 3, 32, 32)
    torch.save(x5, tmp_path / "x5.pt")
    torch.testing.assert_close(_run_loaded(folder, str(tmp_path / "x5.pt")), cm(x5), atol=0, rtol=0)


@pytest.mark.parametrize("pipeline", ["lowrank30", "prune-weights{sparsity=0.5}",
                                      "mixed-precision{dtype=bf16}", "split-stages{num-stages=2}"])
def test_save_and_load_keep_what_each_pipeline_made(tmp_path, pipeline):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 4 * 4, 6)).eval()
    cm = fxopt.compile(model, (torch.randn(2, 3, 8, 8),), pipeline=pipeline)
    fxopt.save(cm, tmp_path / "m")
    loaded = fxopt.load(tmp_path / "m")
    x = torch.randn(2 if "split" in pipeline else 7, 3, 8, 8)   # split stages run one fixed shape
    torch.testing.assert_close(loaded(x), cm(x), atol=0, rtol=0)
    assert [i.dynamic for i in loaded.input_shapes] == [i.dynamic for i in cm.input_shapes]
    assert [r.text for r in loaded.report.records] == [r.text for r in cm.report.records]
    submodules = {type(m).__name__ for m in cm.graph_module.children()}
    assert {type(m).__name__ for m in loaded.graph_module.children()} <= submodules | {"Module"}


def test_a_tampered_or_foreign_folder_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    cm = fxopt.compile(model, (torch.randn(2, 4),))
    folder = tmp_path / "m"
    fxopt.save(cm, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(fxopt.FxoptError, match="does not match manifest.json"):
        fxopt.load(folder)
    manifest["files"]["../outside"] = manifest["files"].pop("graph.json")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(fxopt.FxoptError, match="outside its folder"):
        fxopt.load(folder)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(fxopt.FxoptError, match="did not write"):
        fxopt.save(cm, other)
    assert (other / "notes.txt").read_text() == "mine"


def test_a_pickle_in_the_weights_file_is_never_run(tmp_path):
    """The weights are read with safetensors only: a pickle put in their place (with a
    manifest updated to match) is refused, and its payload never runs."""
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    fxopt.save(fxopt.compile(model, (torch.randn(2, 4),)), tmp_path / "m")
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import hashlib
    import pickle

    weights = tmp_path / "m" / "weights.safetensors"
    weights.write_bytes(pickle.dumps(Payload()))
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    blob = weights.read_bytes()
    manifest["files"]["weights.safetensors"] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception):
        fxopt.load(tmp_path / "m")
    assert not marker.exists()


def test_a_graph_naming_an_unknown_function_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    fxopt.save(fxopt.compile(model, (torch.randn(2, 4),)), tmp_path / "m")
    graph = tmp_path / "m" / "graph.json"
    document = json.loads(graph.read_text())
    for node in document["modules"][""]["graph"]["nodes"]:
        if node["op"] == "call_function":
            node["target"] = "os.system"
    graph.write_text(json.dumps(document))
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    import hashlib

    blob = graph.read_bytes()
    manifest["files"]["graph.json"] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(fxopt.UnsupportedError, match="not a known torch op"):
        fxopt.load(tmp_path / "m")


def test_a_user_leaf_module_cannot_be_saved_and_says_why(tmp_path):
    class Block(nn.Module):
        def forward(self, x):
            return x * 2

    model = nn.Sequential(Block()).eval()
    cm = fxopt.compile(model, (torch.randn(2, 4),), leaf_modules=(Block,))
    with pytest.raises(fxopt.UnsupportedError, match="cannot save module '0' of class Block"):
        fxopt.save(cm, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_save_pruned_of_prune50_int8_loads_with_its_calibration(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    cm = fxopt.compile(model, (torch.randn(1, 3, 32, 32),), pipeline="prune50+int8",
                       calibration=[torch.randn(8, 3, 32, 32) for _ in range(2)])
    fxopt.save_pruned(cm, tmp_path)
    loaded = fxopt.load_pruned(torchvision.models.resnet18(num_classes=10).eval(), tmp_path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), cm(x), atol=0, rtol=0)


def test_a_loaded_model_still_checks_shared_sizes(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)
    model = transformers.BertModel(config).eval()
    ids, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    cm = fxopt.compile(model, (ids, mask))
    fxopt.save(cm, tmp_path / "bert")
    loaded = fxopt.load(tmp_path / "bert")
    ids3, mask3 = torch.randint(0, 100, (3, 8)), torch.ones(3, 8, dtype=torch.long)
    torch.testing.assert_close(loaded(ids3, mask3)["last_hidden_state"], model(ids3, mask3).last_hidden_state)
    with pytest.raises(fxopt.InputShapeError, match="needs these two sizes equal"):
        loaded(ids3, torch.ones(2, 8, dtype=torch.long))

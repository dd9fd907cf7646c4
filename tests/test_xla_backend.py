"""xla backend: FX -> StableHLO (torch-mlir) -> XLA (jax's CPU client).

- resnet18 (64x64) and a BERT-like encoder (padded attention mask, int64 ids) run
  through XLA to the outputs of the same pipeline with backend eager, within 1e-4
  of the output scale, after `fold-bn,canonicalize,dce` and after
  `prune-channels{ratio=0.5}` (which keeps BatchNorm's int64 num_batches_tracked);
- the artefact written with export_dir runs in a fresh Python process in which
  torch and fxopt cannot be imported, to the in-process outputs within 1e-5;
- bad options, bad export_dir and a missing install give clear errors.

The whole zoo through XLA is `python benchmarks/xla_zoo.py` (not a test: minutes).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_leaves

import fxopt
from fxopt.backends import get_backend

pytest.importorskip("jax")
pytest.importorskip("torch_mlir")
from test_zoo import _assert_same_outputs, _bert_config, _build_vision, _text_inputs  # noqa: E402

FOLD = "fold-bn,canonicalize,dce"
PRUNE = "prune-channels{ratio=0.5}"
CASES = [("resnet18", FOLD), ("resnet18", PRUNE), ("bert", FOLD), ("bert", PRUNE)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op torch thread, as in test_zoo (2 shared cores; XLA keeps its own pool)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(name: str):
    torch.manual_seed(0)
    if name == "resnet18":
        return _build_vision("resnet18"), (torch.randn(1, 3, 64, 64),)
    transformers = pytest.importorskip("transformers")
    return transformers.BertModel(_bert_config()).eval(), _text_inputs("bert")


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """(model, inputs, eager-compiled, xla-lowered with an artefact) per case, built once."""
    cache = {}

    def get(name: str, pipeline: str):
        if (name, pipeline) not in cache:
            model, inputs = _model(name)
            eager = fxopt.compile(model, inputs, pipeline=pipeline)
            folder = tmp_path_factory.mktemp(name) / "artefact"
            xla = fxopt.lower(eager, backend="xla", export_dir=folder)
            cache[name, pipeline] = model, inputs, eager, xla, folder
        return cache[name, pipeline]

    return get


@pytest.mark.parametrize("name, pipeline", CASES)
def test_xla_equals_eager(lowered, name, pipeline):
    model, inputs, eager, xla, _ = lowered(name, pipeline)
    with torch.no_grad():
        expected = eager(*inputs)
        if pipeline == FOLD:  # semantics-preserving: also equal to the user's model
            _assert_same_outputs(model(*inputs), expected)
    actual = xla(*inputs)
    _assert_same_outputs(expected, actual)
    report = xla.report.xla
    assert report.device == "cpu" and report.inputs == len(tree_leaves(inputs))
    assert report.x64 == (name == "bert" or pipeline == PRUNE)  # int64 ids / num_batches_tracked
    assert {"export", "stablehlo", "compile", "write"} <= set(report.seconds)


# The script run with torch and fxopt blocked: any import of them raises, and none
# may be loaded when it ends.
_BLOCKED_RUN = textwrap.dedent("""
    import runpy, sys

    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "fxopt"):
                raise ImportError(f"{name} is blocked: the artefact must run without it")
            return None

    sys.meta_path.insert(0, Blocked())
    sys.argv = sys.argv[1:]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "fxopt"))
    assert not loaded, loaded
    sys.exit(code)
""")


@pytest.mark.parametrize("name, pipeline", [("bert", FOLD), ("resnet18", PRUNE)])
def test_artefact_runs_in_a_fresh_process_without_fxopt(lowered, tmp_path, name, pipeline):
    _, inputs, _, xla, folder = lowered(name, pipeline)
    assert sorted(os.listdir(folder)) == sorted(["model.stablehlo.mlir", "weights.safetensors", "signature.json",
                                                 "run_stablehlo.py", "manifest.json"])
    assert not [f for f in os.listdir(folder.parent) if f.startswith(".")]  # no temp folder left
    signature = json.loads((folder / "signature.json").read_text())
    flat = tree_leaves(inputs)
    assert signature["arguments"][-len(flat):] == [i["name"] for i in signature["inputs"]]
    assert [i["shape"] for i in signature["inputs"]] == [list(t.shape) for t in flat]
    assert "dense_resource" not in (folder / "model.stablehlo.mlir").read_text()

    paths = []
    for i, t in enumerate(flat):
        paths.append(str(tmp_path / f"in{i}.npy"))
        np.save(paths[-1], t.numpy())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    run = subprocess.run([sys.executable, "-c", _BLOCKED_RUN, str(folder / "run_stablehlo.py"),
                          *paths, "-o", str(tmp_path / "out")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = tree_leaves(xla(*inputs))
    for i, e in enumerate(expected):
        got = torch.from_numpy(np.load(tmp_path / "out" / f"output{i}.npy"))
        _assert_same_outputs(e, got, tol=1e-5)


class _Structured(torch.nn.Module):
    """None among the inputs, a dict/tuple output, a plain tensor attribute, a constant
    made in forward, tied weights and an int64 buffer: all must become arguments."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.scale = torch.arange(4.0)
        self.register_buffer("steps", torch.tensor(7, dtype=torch.long))

    def forward(self, x, nothing, y):
        h = self.a(x) * self.scale + torch.tensor([1.0, 2.0, 3.0, 4.0])
        return {"h": h, "pair": (self.b(y), y.argmax(-1) + self.steps)}


def test_structure_constants_and_tied_weights():
    import jax

    model = _Structured().eval()
    inputs = (torch.randn(2, 4), None, torch.randn(3, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cm = fxopt.compile(model, inputs, pipeline=FOLD, backend="xla")
    out = cm(*inputs)
    with torch.no_grad():
        expected = model(*inputs)
    assert out.keys() == expected.keys() and out["pair"][1].dtype == torch.long
    _assert_same_outputs(expected, out, tol=1e-6)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not jax.config.jax_enable_x64  # x64 was scoped to the calls
    with pytest.raises(fxopt.InputShapeError, match="compiled for float32"):
        next(iter(cm._lowered._executables.values()))(torch.randn(5, 4), None, torch.randn(3, 4))
    wider = (torch.randn(5, 4), None, torch.randn(7, 4))          # both batches differ: one more program
    with torch.no_grad():
        _assert_same_outputs(model(*wider), cm(*wider), tol=1e-6)
    assert len(cm.report.xla.shapes_compiled) == 2


def test_ceil_mode_max_pool_is_rewritten_on_a_copy():
    """torch-mlir pads ceil mode's partial window on both sides (wrong outputs);
    the backend pads the end with -inf instead, in a copy of the graph."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.MaxPool2d(3, 2, ceil_mode=True),
                                torch.nn.MaxPool2d(2, 2, 1, ceil_mode=True)).eval()
    x = torch.randn(1, 2, 10, 10)  # 8x8 -> 4x4 (floor: 3x3) -> 3x3
    cm = fxopt.compile(model, (x,), pipeline=FOLD)
    lowered = fxopt.lower(cm, backend="xla")
    with torch.no_grad():
        _assert_same_outputs(model(x), lowered(x), tol=1e-6)
    pools = [n for n in cm.graph_module.graph.nodes if n.target == torch.ops.aten.max_pool2d.default]
    assert [n.args[-1] for n in pools] == [True, True]  # the compiled graph is untouched
    avg = torch.nn.Sequential(torch.nn.AvgPool2d(3, 2, ceil_mode=True)).eval()
    with pytest.raises(fxopt.FxoptError, match=r"ceil_mode=True(.|\n)*where: node 'avg_pool2d'"):
        fxopt.compile(avg, (torch.randn(1, 2, 8, 8),), pipeline=FOLD, backend="xla")


class _OpenSliceAssignment(torch.nn.Module):
    """`m[-3:] = v` traces to slice(-3, 2**63-1): torch-mlir's slice_scatter then
    allocates without bound (swin's shifted-window mask); the backend clamps it."""

    def forward(self, x):
        mask = x.new_zeros((x.shape[1], x.shape[2]))
        mask[-3:, -3:] = 2.0
        mask[:-7] = 1.0
        return x + mask[None, :, :, None]


def test_open_slices_are_clamped():
    model, x = _OpenSliceAssignment(), torch.randn(1, 14, 14, 8)
    cm = fxopt.compile(model, (x,), pipeline=FOLD, backend="xla")
    _assert_same_outputs(model(x), cm(x), tol=0)
    slices = [n for n in cm.graph_module.graph.nodes if n.target == torch.ops.aten.slice.Tensor]
    assert any(n.args[3] == 2**63 - 1 for n in slices)  # the compiled graph is untouched


def _tiny():
    return torch.nn.Sequential(torch.nn.Linear(4, 2)).eval(), (torch.randn(1, 4),)


def test_unknown_option_and_device_are_clear_errors():
    model, inputs = _tiny()
    with pytest.raises(fxopt.FxoptError, match="backend 'xla' has no option 'opt_level'(.|\n)*export_dir, device"):
        fxopt.compile(model, inputs, backend="xla", opt_level=3)
    with pytest.raises(fxopt.FxoptError, match="option 'device' takes one of cpu, tpu, got 'gpu'"):
        fxopt.compile(model, inputs, backend="xla", device="gpu")
    if not _has_tpu():
        with pytest.raises(fxopt.FxoptError, match="no tpu client"):
            fxopt.compile(model, inputs, backend="xla", device="tpu")


def _has_tpu() -> bool:
    from jax.extend.backend import get_backend as jax_backend

    try:
        jax_backend("tpu")
        return True
    except RuntimeError:
        return False


def test_export_dir_errors_and_replacement(tmp_path):
    model, inputs = _tiny()
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    with pytest.raises(fxopt.FxoptError, match="is a file") as info:
        fxopt.compile(model, inputs, backend="xla", export_dir=a_file)
    assert "what to do" in str(info.value) and a_file.read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(fxopt.FxoptError, match="holds files fxopt did not write"):
        fxopt.compile(model, inputs, backend="xla", export_dir=other)
    assert os.listdir(other) == ["notes.txt"]
    artefact = tmp_path / "artefact"
    fxopt.compile(model, inputs, backend="xla", export_dir=artefact)
    first = (artefact / "weights.safetensors").read_bytes()
    model[0].weight.data.add_(1.0)
    fxopt.compile(model, inputs, backend="xla", export_dir=artefact)  # an earlier artefact: replaced
    assert (artefact / "weights.safetensors").read_bytes() != first
    assert sorted(os.listdir(tmp_path)) == ["artefact", "other", "taken"]  # no temp folders left


@pytest.mark.parametrize("module", ["torch_mlir", "jax"])
def test_unavailable_names_the_extra(monkeypatch, module):
    for name in [m for m in list(sys.modules) if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import` of it now raises ImportError
    monkeypatch.setitem(sys.modules, module, None)
    assert "pip install fxopt[xla]" in fxopt.list_backends()["xla"].available()
    model, inputs = _tiny()
    with pytest.raises(fxopt.FxoptError, match=r"backend 'xla' is not available here.*fxopt\[xla\]"):
        fxopt.compile(model, inputs, backend="xla")


def test_backend_is_registered():
    assert get_backend("xla").name == "xla"

"""Tracing: the user's model is never touched, shape-dependent Python is specialised,
every tensor value carries its shape, the symbolic_trace mode (leaf_modules /
concrete_args) works, and shape propagation never allocates activations."""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.ir.meta import INPUT_SHAPES, TENSOR, TensorInfo
from nets import Gate, Gated


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.drop(x.mean((2, 3)))
        return self.fc(x)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, \
        {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("training", [True, False])
def test_user_model_is_never_mutated(training):
    model = ConvNet().train(training)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    params = {n: p for n, p in model.named_parameters()}
    state, modes = _snapshot(model)
    x = torch.randn(4, 3, 8, 8)

    gm = fxopt.trace(model, (x,))
    cm = fxopt.compile(model, (x,), pipeline="fold-bn,canonicalize,dce", verify=False)
    cm(x)                               # running the compiled copy (BN in training mode updates ITS stats)
    gm(x)

    new_state, new_modes = _snapshot(model)
    assert new_modes == modes
    assert state.keys() == new_state.keys()
    for key in state:
        assert torch.equal(state[key], new_state[key]), key
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    # the graph holds its own tensors, not the user's (copy-on-write clones of them)
    assert not {id(p) for p in model.parameters()} & {id(p) for p in cm.graph_module.parameters()}
    assert gm.meta["fxopt.training"] is training


def test_trace_copies_no_weights_and_a_write_on_either_side_stays_there():
    """The graph's weights share the model's memory copy-on-write: compiling copies no
    weight, finetuning the compiled model leaves the user's model as it was, and a model
    the user changes after compiling leaves the compiled one as it was compiled."""
    torch.manual_seed(0)
    model, x = ConvNet().eval(), torch.randn(4, 3, 8, 8)
    cm = fxopt.compile(model, (x,), pipeline="canonicalize,dce", verify=False)
    graph_weights = dict(cm.graph_module.named_parameters())
    assert graph_weights and all(torch._C._is_cow_tensor(p) for p in graph_weights.values())
    state, expected = _snapshot(model)[0], cm(x)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(2)]
    fxopt.finetune(cm, data=data, steps=3, lr=1e-2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())   # the model is untouched
    assert not torch.equal(cm.graph_module.get_parameter("fc.weight"), model.fc.weight)  # the graph trained
    trained = cm(x)
    assert not torch.allclose(trained, expected)
    with torch.no_grad():
        model.fc.weight.add_(1.0)             # the user goes on training their model
    torch.testing.assert_close(cm(x), trained, rtol=0, atol=0)


@pytest.mark.parametrize("leaf_modules", [(), (nn.BatchNorm2d,)])
def test_traced_graph_starts_from_the_users_state(leaf_modules):
    """Tracing (and shape propagation) runs the model on fake tensors: a training-mode
    BatchNorm's buffers in the graph are exactly the user's, not one step further."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    x = torch.randn(2, 3, 6, 6)
    model(x)                                             # num_batches_tracked = 1
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxopt.trace(model, (x,), leaf_modules=leaf_modules)
    am = fxopt.AnalysisManager(gm)
    am.get(fxopt.analyses.Shapes)                        # propagates again
    graph_state = dict(gm.named_buffers())
    for key in ("1.num_batches_tracked", "1.running_mean", "1.running_var"):
        assert torch.equal(graph_state[key], state[key]), key
    # and the graph then behaves like the model, step for step
    twin = copy.deepcopy(model)
    torch.testing.assert_close(gm(x), twin(x))
    torch.testing.assert_close(dict(gm.named_buffers())["1.running_mean"], twin[1].running_mean)


def test_trace_records_input_shapes_and_accepts_a_single_tensor():
    x = torch.randn(2, 3, 8, 8)
    model = ConvNet().eval()
    gm = fxopt.trace(model, x)
    assert gm.meta[INPUT_SHAPES] == (TensorInfo((2, 3, 8, 8), torch.float32, torch.device("cpu"), (0,)),)
    assert gm.meta[INPUT_SHAPES][0].dynamic == (0,)
    torch.testing.assert_close(gm(x), model(x))


def test_traced_graph_computes_what_the_model_computes():
    model = ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fxopt.trace(model, (x,))
    torch.testing.assert_close(gm(x), model(x))
    # torch.export's ATen op set, weights as get_attr named by their FQN
    targets = {n.target for n in gm.graph.nodes}
    assert torch.ops.aten.conv2d.default in targets and torch.ops.aten.linear.default in targets
    assert {"conv.weight", "bn.running_var", "fc.bias"} <= {n.target for n in gm.graph.nodes if n.op == "get_attr"}


class PadToMultipleOf4(nn.Module):
    def forward(self, x):
        if x.shape[-1] % 4:
            x = F.pad(x, (0, 4 - x.shape[-1] % 4))
        return x.reshape(x.shape[0], -1, 4).sum(-1)


def test_shape_dependent_control_flow_is_specialised():
    model = PadToMultipleOf4()
    x6 = torch.randn(2, 6)
    gm = fxopt.trace(model, (x6,))
    torch.testing.assert_close(gm(x6), model(x6))
    assert torch.ops.aten.pad.default in {n.target for n in gm.graph.nodes}
    # already a multiple of 4: the branch is not taken, so there is no pad in the graph
    gm8 = fxopt.trace(model, (torch.randn(2, 8),))
    assert torch.ops.aten.pad.default not in {n.target for n in gm8.graph.nodes}
    # the specialised graph knows its shapes
    out = next(iter(gm.graph.find_nodes(op="output")))
    assert out.meta[TENSOR][0].shape == (2, 2)
    # compile: the batch varies, the specialised dim is refused with a clear error
    cm = fxopt.compile(model, (x6,))
    x3 = torch.randn(3, 6)
    torch.testing.assert_close(cm(x3), model(x3))
    with pytest.raises(fxopt.InputShapeError, match=r"dim 1 is static \(6\) and got 7"):
        cm(torch.randn(3, 7))


class TupleOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        a, b, c = torch.split(self.fc(x), 2, dim=1)
        values, indices = torch.max(a, dim=1)
        return values, indices, torch.cat([b, c], 1).to(torch.float16)


def test_every_tensor_node_has_its_shape_incl_tuple_outputs():
    gm = fxopt.trace(TupleOutputs(), (torch.randn(5, 4),))
    checked = 0
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "output":
            continue
        if isinstance(val, torch.Tensor) or node.op in ("placeholder", "get_attr"):
            info = node.meta.get(TENSOR)
            assert isinstance(info, TensorInfo), node.name
            if isinstance(val, torch.Tensor):
                assert info.shape == tuple(val.shape) and info.dtype == val.dtype, node.name
            checked += 1
        elif isinstance(val, (tuple, list)):
            info = node.meta.get(TENSOR)
            assert isinstance(info, tuple) and len(info) == len(val), node.name
            assert all(isinstance(i, TensorInfo) for i in info)
            checked += 1
    assert checked >= 8
    split = next(n for n in gm.graph.nodes if "split" in str(n.target))
    assert [i.shape for i in split.meta[TENSOR]] == [(5, 2)] * 3
    max_node = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.max.dim)
    assert [(i.shape, i.dtype) for i in max_node.meta[TENSOR]] == [((5,), torch.float32), ((5,), torch.int64)]
    out = next(iter(gm.graph.find_nodes(op="output")))
    assert [str(i) for i in out.meta[TENSOR]] == ["float32[5]", "int64[5]", "float16[5x4]"]


def test_every_node_has_its_shape_in_symbolic_mode_too():
    class Leaf(nn.Module):
        def forward(self, x):
            return x

    model = ConvNet().eval()
    gm = fxopt.trace(model, (torch.randn(2, 3, 8, 8),), leaf_modules=(Leaf,))
    assert any(n.op == "call_module" for n in gm.graph.nodes)     # the module-level tracer ran
    for node in gm.graph.nodes:
        if node.op != "output":
            assert isinstance(node.meta.get(TENSOR), TensorInfo), node.name
    conv = next(n for n in gm.graph.nodes if n.target == "conv")
    assert conv.meta[TENSOR].shape == (2, 8, 8, 8)


@pytest.mark.parametrize("leaf", [Gate, "gate"])
def test_leaf_module_with_value_dependent_control_flow(leaf):
    model = Gated()
    x = torch.randn(3, 4)
    gm = fxopt.trace(model, (x,), leaf_modules=(leaf,))
    gate = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "gate"]
    assert len(gate) == 1
    assert gate[0].meta[TENSOR].shape == (3, 4)
    for sign in (1, -1):                         # both branches, at run time
        torch.testing.assert_close(gm(sign * x), model(sign * x))
    # compile keeps the leaf whole while canonicalising the rest, and stays exact
    cm = fxopt.compile(model, (x,), leaf_modules=(leaf,), verify=True)
    assert "gate" in {n.target for n in cm.graph_module.graph.nodes if n.op == "call_module"}
    assert torch.ops.aten.linear.default in {n.target for n in cm.graph_module.graph.nodes}
    for sign in (1, -1):
        torch.testing.assert_close(cm(sign * x), model(sign * x))


def test_concrete_args_specialise_and_the_graph_takes_only_the_inputs():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, scale=None):
            if scale is not None and scale > 1:   # branch on a Python value
                x = x * scale
            return self.fc(x)

    model = Scaled()
    x = torch.randn(2, 4)
    gm = fxopt.trace(model, (x,), concrete_args={"scale": 3.0})
    assert len(gm.graph.find_nodes(op="placeholder")) == 1
    torch.testing.assert_close(gm(x), model(x, 3.0))
    cm = fxopt.compile(model, (x,), concrete_args={"scale": 3.0}, verify=True)
    torch.testing.assert_close(cm(x), model(x, 3.0))


def test_multiple_inputs_and_nested_outputs():
    class Two(nn.Module):
        def forward(self, a, b):
            return {"sum": a + b, "pair": (a * b, a - b)}

    a, b = torch.randn(2, 3), torch.randn(2, 3)
    gm = fxopt.trace(Two(), (a, b))
    assert len(gm.meta[INPUT_SHAPES]) == 2
    out = gm(a, b)
    torch.testing.assert_close(out["sum"], a + b)
    torch.testing.assert_close(out["pair"][1], a - b)


_BIG = textwrap.dedent("""
    import resource, sys, torch, torch.nn as nn, torch.nn.functional as F
    sys.path.insert(0, {root!r})
    import fxopt

    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            x = F.interpolate(x, scale_factor=256)   # 1x1x16384x16384: 1 GiB
            return F.relu(self.bn(self.conv(x)))     # 1x8x16384x16384: 8 GiB, twice

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cm = fxopt.compile(Big().eval(), torch.randn(1, 1, 64, 64), pipeline="default", verify=False)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    out = next(iter(cm.graph_module.graph.find_nodes(op="output")))
    print(grown_mib, out.meta["fxopt.tensor"][0])
    print(cm.report.records[0].metrics["macs_before"])
""")


def test_shape_propagation_uses_fake_tensors_not_activations():
    """A model whose activations would take ~17 GiB traces and compiles in a few hundred MiB."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _BIG.format(root=root)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grown, shape = proc.stdout.split("\n")[0].split(" ", 1)
    assert shape == "float32[1x8x16384x16384]"
    assert float(grown) < 1024, f"peak memory grew by {grown} MiB"
    assert int(proc.stdout.split("\n")[1]) == 8 * 16384 * 16384 * 9


def test_trace_does_not_run_the_model_for_real():
    calls = []

    class Spy(nn.Module):
        def forward(self, x):
            calls.append(type(x).__name__)
            return x * 2

    fxopt.trace(Spy(), (torch.randn(2),))
    assert calls and "Tensor" not in calls           # only fake/functional tensors went through


def test_trace_result_is_a_graph_module_with_its_own_modules():
    model = ConvNet().eval()
    gm = fxopt.trace(model, (torch.randn(1, 3, 8, 8),))
    assert isinstance(gm, fx.GraphModule)
    gm.graph.lint()
    copy.deepcopy(gm)                                 # passes may copy graphs

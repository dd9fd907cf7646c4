"""The built-in passes (fold-bn, canonicalize, dce) and the analyses (Cost, GraphView)."""
from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.analyses import Cost, GraphView, Shapes

aten = torch.ops.aten


def _random_bn(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.3, 2.0)
        if bn.affine:
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-1, 1)
    return bn


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _compile(model, x, pipeline, **kw):
    """Compile with the Verify instrument on, check the outputs ourselves too."""
    model.eval()
    cm = fxopt.compile(model, (x,), pipeline=pipeline, verify=True, **kw)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)
    return cm


# ----------------------------------------------------------------------------- fold-bn

@pytest.mark.parametrize("name, conv, bn, x", [
    ("conv1d", nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), torch.randn(2, 3, 10)),
    ("conv2d", nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), torch.randn(2, 3, 9, 9)),
    ("conv2d-groups-no-bias", nn.Conv2d(4, 8, 3, groups=4, bias=False), nn.BatchNorm2d(8), torch.randn(2, 4, 6, 6)),
    ("conv3d-no-bias", nn.Conv3d(2, 4, 3, bias=False), nn.BatchNorm3d(4), torch.randn(1, 2, 5, 5, 5)),
    ("convT2d", nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), torch.randn(2, 4, 5, 5)),
    ("convT2d-groups", nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), torch.randn(2, 4, 5, 5)),
    ("convT2d-groups-no-bias", nn.ConvTranspose2d(6, 9, 3, groups=3, bias=False), nn.BatchNorm2d(9),
     torch.randn(2, 6, 4, 4)),
    ("convT1d-groups", nn.ConvTranspose1d(4, 6, 3, groups=2), nn.BatchNorm1d(6), torch.randn(2, 4, 7)),
    ("linear", nn.Linear(5, 7), nn.BatchNorm1d(7), torch.randn(4, 5)),
    ("linear-no-bias", nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7), torch.randn(4, 5)),
    ("bn-no-affine", nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6, affine=False), torch.randn(2, 3, 4, 4)),
])
def test_fold_bn(name, conv, bn, x):
    model = nn.Sequential(conv, _random_bn(bn))
    cm = _compile(model, x, "fold-bn,dce")
    targets = _targets(cm.graph_module)
    assert aten.batch_norm.default not in targets, name
    assert len([t for t in targets if "conv" in str(t) or "linear" in str(t)]) == 1
    assert cm.report.records[0].changed and "folded 1 BatchNorm" in cm.report.records[0].notes
    # the BN's tensors are gone from the compiled module
    names = {n for n, _ in cm.graph_module.named_parameters()} | {n for n, _ in cm.graph_module.named_buffers()}
    assert not any(n.startswith("1.") for n in names), names
    # a conv without bias got one
    assert sum(1 for n in names if n.endswith("bias")) == 1


def test_fold_bn_preserves_shapes_and_declares_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), _random_bn(nn.BatchNorm2d(4)), nn.ReLU()).eval()
    gm = fxopt.trace(model, (torch.randn(1, 3, 6, 6),))
    am = fxopt.AnalysisManager(gm)
    am.get(Shapes)
    report = fxopt.PassManager("fold-bn", [fxopt.instruments.Verify()]).run(gm, am)
    assert Shapes in report.records[0].preserves
    assert am.cached(Shapes)
    # the bias get_attr the pass created carries its shape
    conv = next(n for n in gm.graph.nodes if n.target is aten.conv2d.default)
    assert conv.args[2].meta["fxopt.tensor"].shape == (4,)


def test_fold_bn_eps_guard():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), _random_bn(nn.BatchNorm2d(3))).eval()
    x = torch.randn(1, 2, 3, 3)
    cm = fxopt.compile(model, (x,), pipeline="fold-bn{eps-guard=0.5}")
    assert not torch.allclose(cm(x), model(x), atol=1e-3)   # the guard is really added
    bn = model[1]
    ref = F.conv2d(x, model[0].weight, model[0].bias)
    ref = (ref - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps + 0.5) \
        * bn.weight[:, None, None] + bn.bias[:, None, None]
    torch.testing.assert_close(cm(x), ref, rtol=1e-4, atol=1e-5)


def test_fold_bn_leaves_a_bn_whose_input_has_other_users():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = _random_bn(nn.BatchNorm2d(4))

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    cm = _compile(Shared(), torch.randn(1, 3, 4, 4), "fold-bn")
    record = cm.report.records[0]
    assert not record.changed
    assert aten.batch_norm.default in _targets(cm.graph_module)
    assert any("kept batch_norm" in n and "conv2d has other users" in n for n in record.notes), record.notes


def test_fold_bn_leaves_training_mode_bn():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _random_bn(nn.BatchNorm2d(4))).train()
    x = torch.randn(2, 3, 4, 4)
    cm = fxopt.compile(model, (x,), pipeline="fold-bn")
    record = cm.report.records[0]
    assert not record.changed
    assert aten.batch_norm.default in _targets(cm.graph_module)
    assert any("training mode" in n for n in record.notes)


def test_fold_bn_leaves_a_bn_after_something_else():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), _random_bn(nn.BatchNorm2d(4)))
    cm = _compile(model, torch.randn(1, 3, 4, 4), "fold-bn")
    assert aten.batch_norm.default in _targets(cm.graph_module)
    assert any("is not a conv or linear" in n for n in cm.report.records[0].notes)


def test_fold_bn_linear_on_3d_input_is_left_alone():
    # BatchNorm1d over (N, C, L) normalises dim 1, which is not the linear's feature dim
    model = nn.Sequential(nn.Linear(5, 7), _random_bn(nn.BatchNorm1d(3)))
    cm = _compile(model, torch.randn(4, 3, 5), "fold-bn")
    assert aten.batch_norm.default in _targets(cm.graph_module)
    assert any("not linear's output features" in n for n in cm.report.records[0].notes)


def test_fold_bn_with_a_shared_weight_keeps_the_other_user_intact():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = _random_bn(nn.BatchNorm2d(3))

        def forward(self, x):
            a = self.bn(self.conv(x))
            b = F.conv2d(x, self.conv.weight, self.conv.bias)   # reads the same weight
            return a + b

    model = Tied()
    weight, bias = model.conv.weight.detach().clone(), model.conv.bias.detach().clone()
    cm = _compile(model, torch.randn(1, 3, 4, 4), "fold-bn,dce")
    record = cm.report.records[0]
    assert record.changed and "folded 1 BatchNorm" in record.notes, record.notes
    gm = cm.graph_module
    assert aten.batch_norm.default not in _targets(gm)
    # the folded conv reads new tensors; the other conv still reads the shared, unscaled ones
    convs = [n for n in gm.graph.nodes if n.target is aten.conv2d.default]
    reads = sorted(tuple(a.target for a in conv.args[1:3]) for conv in convs)
    assert reads == [("conv.weight", "conv.bias"), ("conv.weight_folded", "conv.bias_folded")], reads
    assert torch.equal(gm.conv.weight, weight) and torch.equal(gm.conv.bias, bias)
    assert torch.equal(model.conv.weight, weight) and torch.equal(model.conv.bias, bias)


def test_fold_bn_in_symbolic_mode_after_canonicalize():
    class Leaf(nn.Module):
        def forward(self, x):
            return x

    model = nn.Sequential(nn.Conv2d(3, 4, 3), _random_bn(nn.BatchNorm2d(4)), nn.ReLU())
    cm = _compile(model, torch.randn(1, 3, 6, 6), "canonicalize,fold-bn,dce", leaf_modules=(Leaf,))
    assert aten.batch_norm.default not in _targets(cm.graph_module)
    assert not any(n.op == "call_module" for n in cm.graph_module.graph.nodes)


# ----------------------------------------------------------------------------- canonicalize

def test_inplace_becomes_functional():
    class M(nn.Module):
        def forward(self, x):
            y = x * 2
            y.relu_()
            y.add_(1)
            return y

    cm = _compile(M(), torch.randn(3, 4), "canonicalize")
    targets = _targets(cm.graph_module)
    assert aten.relu.default in targets and aten.add.Tensor in targets
    assert aten.relu_.default not in targets and aten.add_.Tensor not in targets


def test_inplace_kept_when_the_mutated_tensor_is_read_later():
    class M(nn.Module):
        def forward(self, x):
            y = x * 2
            z = y + 1          # reads y before the mutation
            w = y.view(-1)     # a view of y, read after the mutation
            y.mul_(3)
            return z, w

    cm = _compile(M(), torch.randn(3, 4), "canonicalize")
    assert aten.mul_.Tensor in _targets(cm.graph_module)


def test_inplace_through_a_view_is_kept():
    class M(nn.Module):
        def forward(self, x):
            y = x * 2
            y[:, 0].mul_(10)      # mutates y through a view; y is read afterwards
            return y + 1

    cm = _compile(M(), torch.randn(3, 4), "canonicalize,dce")
    assert aten.mul_.Tensor in _targets(cm.graph_module)


def test_inplace_on_an_input_is_kept():
    class M(nn.Module):
        def forward(self, x):
            x.add_(1)
            return x * 2

    model = M()
    x = torch.randn(3)
    cm = fxopt.compile(model, (x.clone(),), pipeline="canonicalize")
    targets = _targets(cm.graph_module)
    assert aten.add_.Tensor in targets or aten.copy_.default in targets


def test_x_times_sigmoid_x_becomes_silu():
    class M(nn.Module):
        def forward(self, x, y):
            return x * torch.sigmoid(x), y * torch.sigmoid(x)   # the second is not silu

    x, y = torch.randn(2, 5), torch.randn(2, 5)
    model = M()
    cm = fxopt.compile(model, (x, y), pipeline="canonicalize,dce", verify=True)
    targets = _targets(cm.graph_module)
    assert targets.count(aten.silu.default) == 1
    assert aten.sigmoid.default in targets
    for got, want in zip(cm(x, y), model(x, y)):
        torch.testing.assert_close(got, want)


def test_view_becomes_flatten():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(48, 2)

        def forward(self, x):
            a = self.fc(x.view(x.size(0), -1))
            b = x.reshape(2, 3, 16)            # flattens the last two dims
            c = x.view(6, 16)                  # not a flatten(start, -1): stays a reshape
            return a, b, c

    model = M()
    x = torch.randn(2, 3, 4, 4)
    cm = fxopt.compile(model, (x,), pipeline="canonicalize", verify=True)
    gm = cm.graph_module
    flats = [n for n in gm.graph.nodes if n.target is aten.flatten.using_ints]
    assert sorted(n.args[1] for n in flats) == [1, 2]
    assert aten.view.default not in _targets(gm)
    assert _targets(gm).count(aten.reshape.default) == 1
    for got, want in zip(cm(x), model(x)):
        torch.testing.assert_close(got, want)


def test_eval_dropout_disappears():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3), nn.ReLU()).eval()
    cm = _compile(model, torch.randn(2, 4), "canonicalize")
    assert not any("dropout" in str(t) for t in _targets(cm.graph_module))


class Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = _random_bn(nn.BatchNorm2d(4))
        self.flat = nn.Flatten()
        self.drop = nn.Dropout()
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        a = F.relu(x)
        b = a.relu()
        c = self.act(b)
        d = torch.relu(c)
        e = self.bn(self.conv(d))
        return self.fc(self.drop(self.flat(e))), torch.flatten(e, 1), e.view(e.size(0), -1)


class _Unused(nn.Module):
    pass


def test_symbolic_mode_spellings_become_the_aten_op_set():
    model = Spellings().eval()
    x = torch.randn(2, 3, 4, 4)
    traced = fxopt.trace(model, (x,), leaf_modules=(_Unused,))      # leaf_modules forces symbolic_trace
    assert {n.op for n in traced.graph.nodes} >= {"call_module", "call_method"}
    cm = _compile(model, x, "canonicalize,dce", leaf_modules=(_Unused,))
    gm = cm.graph_module
    assert {n.op for n in gm.graph.nodes} <= {"placeholder", "get_attr", "call_function", "output"}
    targets = _targets(gm)
    assert targets.count(aten.relu.default) == 4                    # F.relu, x.relu(), nn.ReLU, torch.relu
    assert aten.conv2d.default in targets and aten.linear.default in targets
    assert aten.batch_norm.default in targets
    assert targets.count(aten.flatten.using_ints) == 3
    assert all(isinstance(t, torch._ops.OpOverload) for t in targets), targets
    # weights are get_attr nodes named by their FQN, as torch.export makes them
    assert {"conv.weight", "fc.bias", "bn.running_mean"} <= {n.target for n in gm.graph.nodes if n.op == "get_attr"}


def test_symbolic_and_export_mode_give_the_same_op_set():
    model = Spellings().eval()
    x = torch.randn(2, 3, 4, 4)
    sym = fxopt.compile(model, (x,), pipeline="canonicalize,fold-bn,dce", leaf_modules=(_Unused,))
    exp = fxopt.compile(model, (x,), pipeline="canonicalize,fold-bn,dce")
    assert sorted(map(str, _targets(sym.graph_module))) == sorted(map(str, _targets(exp.graph_module)))


def test_symbolic_mode_inplace_relu_keeps_its_meaning():
    """The module-level tracer does not track mutation: `F.relu(y, inplace=True)` leaves
    later readers of y naming y. canonicalize must not make it functional then."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            y = x * 2
            z = F.relu(y, inplace=True)
            u = x - 1
            v = self.act(u)
            w = x * 3
            w.relu_()
            only = F.relu(x + 7, inplace=True)          # nobody else reads x + 7
            return y + 1, z, u * 1, v, w, only

    model = M()
    x = torch.randn(3, 5)
    cm = fxopt.compile(model, (x,), pipeline="canonicalize", leaf_modules=(_Unused,), verify=True)
    for got, want in zip(cm(x), model(x)):
        torch.testing.assert_close(got, want)
    targets = _targets(cm.graph_module)
    assert targets.count(aten.relu_.default) == 3 and targets.count(aten.relu.default) == 1


def test_canonicalize_reports_unchanged_on_a_canonical_graph():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    gm = fxopt.trace(model, (torch.randn(2, 3),))
    report = fxopt.PassManager("canonicalize").run(gm)
    assert not report.records[0].changed
    assert report.records[0].preserves is None


def test_canonicalize_functionalize_option():
    class M(nn.Module):
        def forward(self, x):
            y = x * 2
            return y.relu_()

    off = fxopt.compile(M(), (torch.randn(3),), pipeline="canonicalize{functionalize=false}")
    on = fxopt.compile(M(), (torch.randn(3),), pipeline="canonicalize")
    assert aten.relu_.default in _targets(off.graph_module)
    assert aten.relu_.default not in _targets(on.graph_module)


# ----------------------------------------------------------------------------- dce

def test_dce_removes_dead_nodes_and_unused_weights():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.dead = nn.Linear(4, 4)
            self.register_buffer("dead_buffer", torch.ones(4))

        def forward(self, x):
            unused = torch.relu(self.dead(x) * self.dead_buffer)   # noqa: F841
            return self.used(x)

    model = M()
    x = torch.randn(2, 4)
    cm = _compile(model, x, "dce")
    gm = cm.graph_module
    assert _targets(gm).count(aten.linear.default) == 1
    assert aten.relu.default not in _targets(gm)
    names = {n for n, _ in gm.named_parameters()} | {n for n, _ in gm.named_buffers()}
    assert names == {"used.weight", "used.bias"}
    record = cm.report.records[0]
    assert record.changed and "removed" in record.notes[0] and "3 unused weights" in record.notes[0]
    assert record.metrics["params_before"] == 40 and record.metrics["params_after"] == 20
    # a second run has nothing to do
    again = fxopt.PassManager("dce").run(gm)
    assert not again.records[0].changed


def test_dce_keeps_side_effects():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(1))

        def forward(self, x):
            self.count.add_(1)          # a mutation nobody reads in the graph
            return x * 2

    gm = fxopt.trace(M(), (torch.randn(2),))
    before = [n.target for n in gm.graph.nodes]
    fxopt.PassManager("dce").run(gm)
    assert any("add_" in str(t) or "copy_" in str(t) for t in [n.target for n in gm.graph.nodes])
    assert len([n.target for n in gm.graph.nodes]) == len(before)


def test_dce_keeps_python_level_inplace_calls_in_symbolic_mode():
    """symbolic_trace records `F.relu(y, inplace=True)` etc. as plain calls whose result
    may be unused while the mutation is read through `y`: dce must keep them."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            a, b, c, d, e = x * 1, x * 2, x * 3, x * 4, x * 5
            F.relu(a, inplace=True)
            self.act(b)
            c.relu_()
            torch.relu_(d)
            F.hardtanh(e, -0.1, 0.1, True)
            dead = x * 6              # noqa: F841  (really dead)
            return a + b + c + d + e

    model = M()
    x = torch.randn(4, 3)
    gm = fxopt.trace(model, (x,), leaf_modules=(_Unused,))
    report = fxopt.PassManager("dce", [fxopt.instruments.Verify(check_outputs=True)]).run(gm, example_inputs=(x,))
    assert "removed 1 nodes" in report.records[0].notes[0]
    torch.testing.assert_close(gm(x), model(x))


# ----------------------------------------------------------------------------- cost and graph view

class CostModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, groups=4, bias=False)
        self.fc = nn.Linear(16, 5)

    def forward(self, x, a, b, q, k, v):
        y = self.grouped(self.conv(x))
        z = self.fc(a)
        w = a @ b
        s = F.scaled_dot_product_attention(q, k, v)
        u = torch.special.bessel_j0(a)
        return y, z, w, s, u


COST_INPUTS = (torch.randn(2, 3, 6, 6), torch.randn(4, 16), torch.randn(16, 7),
               torch.randn(2, 3, 10, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 4))


def test_cost_macs_by_hand():
    gm = fxopt.trace(CostModel(), COST_INPUTS)
    cost = fxopt.AnalysisManager(gm).get(Cost)
    by_target = {}
    for node in gm.graph.nodes:
        by_target.setdefault(str(node.target), []).append(cost.nodes[node.name].macs)
    conv_macs = sorted(by_target["aten.conv2d.default"])
    # conv: out 2x8x6x6, each output sums 3 in-channels x 3x3
    # grouped: out 2x8x4x4, each output sums 8/4 in-channels x 3x3
    assert conv_macs == sorted([2 * 8 * 6 * 6 * 3 * 9, 2 * 8 * 4 * 4 * 2 * 9])
    assert by_target["aten.linear.default"] == [4 * 5 * 16]
    assert by_target["aten.matmul.default"] == [4 * 7 * 16]
    # q @ k^T: 2*3 heads x 10 x 12 x 8; attn @ v: 2*3 x 10 x 12 x 4
    assert by_target["aten.scaled_dot_product_attention.default"] == [2 * 3 * 10 * 12 * (8 + 4)]
    assert cost.macs == 2 * 8 * 6 * 6 * 27 + 2 * 8 * 4 * 4 * 18 + 320 + 448 + 2 * 3 * 10 * 12 * 12
    assert cost.params == (8 * 3 * 9 + 8) + (8 * 2 * 9) + (16 * 5 + 5)


def test_cost_lists_unknown_ops():
    gm = fxopt.trace(CostModel(), COST_INPUTS)
    cost = fxopt.AnalysisManager(gm).get(Cost)
    assert len(cost.unknown) == 1 and "bessel_j0" in cost.unknown[0]
    assert cost.nodes[next(n.name for n in gm.graph.nodes if "bessel" in str(n.target))].macs == 0
    assert cost.to_dict()["unknown"] == cost.unknown


def test_cost_bytes_and_flops():
    gm = fxopt.trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), (torch.randn(2, 4),))
    cost = fxopt.AnalysisManager(gm).get(Cost)
    linear = next(n.name for n in gm.graph.nodes if n.target is aten.linear.default)
    relu = next(n.name for n in gm.graph.nodes if n.target is aten.relu.default)
    assert cost.nodes[linear].bytes_read == 4 * (2 * 4 + 3 * 4 + 3)
    assert cost.nodes[linear].bytes_written == 4 * 2 * 3
    assert cost.nodes[relu].flops == 6 and cost.nodes[relu].macs == 0
    assert cost.unknown == []


def test_cost_counts_leaf_module_parameters():
    class Leaf(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    model = nn.Sequential(Leaf(), nn.Linear(4, 2))
    gm = fxopt.trace(model, (torch.randn(3, 4),), leaf_modules=(Leaf,))
    cost = fxopt.AnalysisManager(gm).get(Cost)
    assert cost.params == 20 + 10


def test_graph_view_is_a_networkx_digraph_with_an_edge_per_use():
    class M(nn.Module):
        def forward(self, x, y):
            a = x + y
            b = a * x
            return a, b

    gm = fxopt.trace(M(), (torch.randn(3), torch.randn(3)))
    g = fxopt.AnalysisManager(gm).get(GraphView)
    assert isinstance(g, nx.DiGraph)
    assert set(g.nodes) == {n.name for n in gm.graph.nodes}
    add = next(n.name for n in gm.graph.nodes if n.target is aten.add.Tensor)
    mul = next(n.name for n in gm.graph.nodes if n.target is aten.mul.Tensor)
    expected = {("x", add), ("y", add), (add, mul), ("x", mul), (add, "output"), (mul, "output")}
    assert expected <= set(g.edges)
    extra = set(g.edges) - expected      # only the input guards may read the inputs too
    assert all(v == "_guards_fn" for _, v in extra), extra
    assert g.nodes[add]["op"] == "call_function" and "add" in g.nodes[add]["target"]
    assert nx.is_directed_acyclic_graph(g)
    assert nx.has_path(g, "y", "output")


def test_graph_view_is_invalidated_by_a_changing_pass():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(), nn.Linear(3, 3)).eval()
    gm = fxopt.trace(model, (torch.randn(2, 3),))
    am = fxopt.AnalysisManager(gm)
    before = am.get(GraphView)
    fxopt.PassManager("canonicalize").run(gm, am)
    after = am.get(GraphView)
    assert after is not before
    assert set(after.nodes) == {n.name for n in gm.graph.nodes}


def test_default_preset_folds_batchnorm_in_module_level_trace_mode():
    """`default` canonicalizes first, so BN modules kept by symbolic_trace get folded too."""
    class Leaf(nn.Module):
        def forward(self, x):
            return x * 2

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), Leaf()).eval()
    x = torch.randn(1, 3, 8, 8)
    cm = fxopt.compile(model, (x,), pipeline="default", leaf_modules=(Leaf,), verify=True)
    targets = {n.target for n in cm.graph_module.graph.nodes}
    assert torch.ops.aten.conv2d.default in targets
    assert torch.ops.aten.batch_norm.default not in targets
    modules = [cm.graph_module.get_submodule(n.target) for n in cm.graph_module.graph.nodes
               if n.op == "call_module"]
    assert [type(m) for m in modules] == [Leaf]
    torch.testing.assert_close(cm(x), model(x), atol=1e-5, rtol=1e-5)

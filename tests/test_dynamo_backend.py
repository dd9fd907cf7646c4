"""torch.compile(model, backend="fxopt"): found through the entry point, options pick the
pipeline and the fxopt backend, outputs equal eager, graph breaks give several graphs
that are each compiled, and bad options fail with a clear error.

The pipeline's effect is observed with a probe pass (not registered, so other tests
never see it) that records each graph it is run on.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn as nn

import fxopt
from torch._dynamo.utils import counters

aten = torch.ops.aten


@dataclass(frozen=True)
class Probe(fxopt.Pass):
    """Records the graphs it runs on (the test's window into the pipeline)."""

    name = "probe"
    seen: list

    def run(self, gm, am):
        self.seen.append(gm)
        return fxopt.PassResult.unchanged()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class ConvNet(nn.Module):
    def __init__(self, graph_break: str = ""):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)
        self.graph_break = graph_break
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.1, 0.1)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = self.bn(self.conv(x)).relu()
        if self.graph_break == "print":
            print("between the two graphs")
        elif self.graph_break == "item" and y.mean().item() > 10.0:   # value-dependent branch
            y = -y
        return self.fc(y.mean((2, 3)))


def _compare(model, x, **compile_kwargs):
    with torch.no_grad():
        expected = model(x)
        actual = torch.compile(model, backend="fxopt", **compile_kwargs)(x)
    torch.testing.assert_close(actual, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


def _ops(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def test_registered_through_the_entry_point():
    points = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert points.get("fxopt") == "fxopt.api.dynamo:fxopt_backend", "run `pip install -e .` to register it"
    assert "fxopt" in torch._dynamo.list_backends()


def test_default_options_equal_eager():
    _compare(ConvNet().eval(), torch.randn(2, 3, 16, 16))


def test_options_select_the_pipeline_with_weights_as_constants():
    seen = []
    model, x = ConvNet().eval(), torch.randn(2, 3, 16, 16)
    pipeline = fxopt.parse_pipeline("fold-bn,canonicalize,dce") + [Probe(seen)]
    _compare(model, x, options={"pipeline": pipeline})
    (gm,) = seen
    assert aten.conv2d.default in _ops(gm) and not any("batch_norm" in str(t) for t in _ops(gm))
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert "fc.weight" in targets, targets          # the model's parameters, under their paths


def test_inductor_backend_through_options():
    counters.clear()
    _compare(ConvNet().eval(), torch.randn(2, 3, 16, 16),
             options={"pipeline": "fold-bn,canonicalize,dce", "backend": "inductor"})
    assert sum(counters["inductor"].values()) > 0, "inductor did not compile (a nested torch.compile ran eagerly?)"


@pytest.mark.parametrize("kind", ["print", "item"])
def test_graph_breaks_compile_each_graph(kind):
    seen = []
    model, x = ConvNet(graph_break=kind).eval(), torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _compare(model, x, options={"pipeline": [Probe(seen)]})
    assert len(seen) == 2, [gm.code for gm in seen]
    assert aten.conv2d.default in _ops(seen[0]) and aten.linear.default in _ops(seen[1])


def test_symbolic_inputs_run_through_the_pipeline():
    """Under dynamic shapes the captured graph takes SymInt sizes too: fxopt still runs its
    pipeline on it (traced with those dims dynamic), once, for every batch size."""
    seen = []
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    compiled = torch.compile(model, backend="fxopt", dynamic=True, options={"pipeline": [Probe(seen)]})
    with torch.no_grad():
        for batch in (3, 5, 8):
            torch.testing.assert_close(compiled(torch.full((batch, 8), 0.5)), model(torch.full((batch, 8), 0.5)))
    assert len(seen) == 1
    placeholders = seen[0].graph.find_nodes(op="placeholder")
    assert [p.meta["fxopt.tensor"].dynamic for p in placeholders] == [(0,)]


@pytest.mark.parametrize("kwargs, words", [
    ({"options": {"backend": "nope"}}, ["unknown backend 'nope'", "known backends"]),
    ({"options": {"pipeline": "fold-bn,no-such-pass"}}, ["no-such-pass"]),
    ({"options": {"backend": "inductor", "mode": "fastest"}}, ["option 'mode' takes one of", "max-autotune"]),
    ({"options": {"frobnicate": 1}}, ["backend 'eager' takes no options", "frobnicate"]),
    ({"mode": "max-autotune"}, ["applies to fxopt's inductor backend"]),
])
def test_bad_options_fail_clearly(kwargs, words):
    compiled = torch.compile(nn.Linear(4, 4).eval(), backend="fxopt", **kwargs)
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(torch.randn(2, 4))
    chain = [info.value, info.value.__cause__, getattr(info.value, "inner_exception", None)]
    assert any(isinstance(e, fxopt.FxoptError) for e in chain), repr(info.value)
    assert all(w in str(info.value) for w in words), str(info.value)

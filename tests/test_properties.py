"""Property tests: semantics-preserving passes keep outputs on random nets, and
pipeline text round-trips for random pipelines.

The nets are small random DAGs over conv / conv-transpose (random groups, with and
without bias) / BatchNorm (random running stats and affine params) / relu (also
in place) / residual add / channel cat / x*sigmoid(x) / dead branches, ending in
flatten (three spellings) -> linear (-> BatchNorm1d).
"""
from __future__ import annotations

import copy
import typing
from typing import Literal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fxopt
import option_kinds
from fxopt.ir.graph import has_side_effects
from fxopt.pm.stages import Stages
from option_kinds import OptionKinds
from registered import while_testing

# ----------------------------------------------------------------------------- random nets


@st.composite
def net_specs(draw):
    c0 = draw(st.integers(1, 6))
    hw = draw(st.integers(3, 6))
    channels = [c0]           # channel count of every value; value 0 is the input
    layers = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["conv", "conv", "convT", "bn", "relu", "add", "cat", "silu", "dead"]))
        src = draw(st.integers(0, len(channels) - 1))
        cin = channels[src]
        layer = {"kind": kind, "src": src, "cin": cin}
        if kind in ("conv", "convT", "dead"):
            groups = draw(st.sampled_from([g for g in (1, 2, 3) if cin % g == 0]))
            layer.update(groups=groups, cout=groups * draw(st.integers(1, 3)),
                         k=draw(st.sampled_from([1, 3])), bias=draw(st.booleans()),
                         bn=draw(st.booleans()), affine=draw(st.booleans()),
                         act=draw(st.sampled_from([None, "relu", "relu_inplace"])))
            if kind != "dead":
                channels.append(layer["cout"])
        elif kind == "bn":
            layer["affine"] = draw(st.booleans())
            channels.append(cin)
        elif kind == "relu":
            layer["inplace"] = len(channels) > 1 and draw(st.booleans())
            if layer["inplace"]:         # never mutate the user's input (value 0)
                layer["src"] = src = draw(st.integers(1, len(channels) - 1))
                layer["cin"] = cin = channels[src]
            channels.append(cin)
            if layer["inplace"]:
                channels.append(cin)     # the mutated source, read again afterwards
        elif kind == "add":
            layer["other"] = draw(st.sampled_from([i for i, c in enumerate(channels) if c == cin]))
            channels.append(cin)
        elif kind == "cat":
            layer["other"] = draw(st.integers(0, len(channels) - 1))
            channels.append(cin + channels[layer["other"]])
        else:  # silu
            channels.append(cin)
        layers.append(layer)
    head = {"flatten": draw(st.sampled_from(["torch", "view", "module"])),
            "features": draw(st.integers(1, 5)), "bn": draw(st.booleans()),
            "extra_output": draw(st.booleans())}
    return {"c0": c0, "hw": hw, "layers": layers, "head": head, "channels": channels,
            "seed": draw(st.integers(0, 2**16))}


def _random_bn(bn: nn.modules.batchnorm._BatchNorm, gen: torch.Generator):
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
        bn.running_var.copy_(torch.rand(n, generator=gen) * 1.8 + 0.2)
        if bn.affine:
            bn.weight.copy_(torch.rand(n, generator=gen) * 3 - 1.5)
            bn.bias.copy_(torch.rand(n, generator=gen) * 2 - 1)
    bn.eps = float(torch.tensor([1e-5, 1e-3])[torch.randint(2, (1,), generator=gen)])
    return bn


class RandomNet(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        gen = torch.Generator().manual_seed(spec["seed"])
        torch.manual_seed(spec["seed"])
        self.spec = spec
        self.blocks = nn.ModuleList()
        for layer in spec["layers"]:
            block = nn.Module()
            if layer["kind"] in ("conv", "convT", "dead"):
                conv_cls = nn.ConvTranspose2d if layer["kind"] == "convT" else nn.Conv2d
                block.conv = conv_cls(layer["cin"], layer["cout"], layer["k"], padding=layer["k"] // 2,
                                      groups=layer["groups"], bias=layer["bias"])
                if layer["bn"]:
                    block.bn = _random_bn(nn.BatchNorm2d(layer["cout"], affine=layer["affine"]), gen)
            elif layer["kind"] == "bn":
                block.bn = _random_bn(nn.BatchNorm2d(layer["cin"], affine=layer["affine"]), gen)
            self.blocks.append(block)
        head = spec["head"]
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(spec["channels"][-1] * spec["hw"] ** 2, head["features"])
        self.fc_bn = _random_bn(nn.BatchNorm1d(head["features"]), gen) if head["bn"] else None

    def forward(self, x):
        values = [x]
        for layer, block in zip(self.spec["layers"], self.blocks):
            v = values[layer["src"]]
            kind = layer["kind"]
            if kind in ("conv", "convT", "dead"):
                y = block.conv(v)
                if layer["bn"]:
                    y = block.bn(y)
                if layer["act"] == "relu":
                    y = F.relu(y)
                elif layer["act"] == "relu_inplace":
                    y = F.relu(y, inplace=True)
                if kind == "dead":
                    continue          # computed, never used: dce's work
            elif kind == "bn":
                y = block.bn(v)
            elif kind == "relu":
                y = F.relu(v, inplace=layer["inplace"])
                if layer["inplace"]:     # reading v after the mutation must see relu(v)
                    values.append(y)
                    y = v * 0.5
            elif kind == "add":
                y = v + values[layer["other"]]
            elif kind == "cat":
                y = torch.cat([v, values[layer["other"]]], dim=1)
            else:
                y = v * torch.sigmoid(v)
            values.append(y)
        last = values[-1]
        flat = {"torch": lambda t: torch.flatten(t, 1), "view": lambda t: t.view(t.size(0), -1),
                "module": self.flatten}[self.spec["head"]["flatten"]](last)
        out = self.fc(flat)
        if self.fc_bn is not None:
            out = self.fc_bn(out)
        if self.spec["head"]["extra_output"]:
            return out, values[len(values) // 2]
        return out


class _NotInTheModel(nn.Module):
    """Naming it in leaf_modules switches fxopt.trace to the symbolic_trace tracer."""


def _inputs(spec):
    return (torch.randn(2, spec["c0"], spec["hw"], spec["hw"],
                        generator=torch.Generator().manual_seed(spec["seed"] + 1)),)


def _assert_close(expected, actual, rel=1e-4):
    flat_e = torch.utils._pytree.tree_leaves(expected)
    flat_a = torch.utils._pytree.tree_leaves(actual)
    assert len(flat_e) == len(flat_a)
    for e, a in zip(flat_e, flat_a):
        assert e.shape == a.shape
        scale = max(1.0, e.abs().max().item())
        diff = (e - a).abs().max().item()
        assert diff <= rel * scale, f"outputs differ by {diff:.3g} (scale {scale:.3g})"


def _reference(model, inputs):
    with torch.no_grad():
        return model(*(x.clone() for x in inputs))


PIPELINES = ["fold-bn", "canonicalize", "dce", "fold-bn,canonicalize,dce", "canonicalize,fold-bn,dce"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=net_specs(), symbolic=st.booleans())
def test_semantics_preserving_passes_keep_outputs(spec, symbolic):
    model = RandomNet(spec).eval()
    inputs = _inputs(spec)
    expected = _reference(model, inputs)
    leaf = (_NotInTheModel,) if symbolic else ()
    gm = fxopt.trace(model, inputs, leaf_modules=leaf)
    for pipeline in PIPELINES:
        g = copy.deepcopy(gm)
        fxopt.PassManager(pipeline).run(g)
        with torch.no_grad():
            got = g(*(x.clone() for x in inputs))
        try:
            _assert_close(expected, got)
        except AssertionError as exc:
            raise AssertionError(f"pipeline {pipeline!r} (symbolic={symbolic}): {exc}\n{g.code}") from exc
    # the model itself was not touched by any of it
    _assert_close(expected, _reference(model, inputs), rel=0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=net_specs())
def test_compile_with_verify_on_random_nets(spec):
    """The public path, with the Verify instrument checking every pass's outputs."""
    model = RandomNet(spec).eval()
    inputs = _inputs(spec)
    cm = fxopt.compile(model, inputs, pipeline="fold-bn,canonicalize,dce", verify=True)
    _assert_close(_reference(model, inputs), _reference(cm, inputs))
    nodes = list(cm.graph_module.graph.nodes)
    # every BatchNorm right after its conv / linear was folded; only standalone ones may stay
    standalone = sum(1 for lay in spec["layers"] if lay["kind"] == "bn")
    remaining = sum(1 for n in nodes if n.target is torch.ops.aten.batch_norm.default)
    assert remaining <= standalone, cm.report
    # dead branches are gone
    assert all(n.users or has_side_effects(n) or n.target == "_guards_fn" for n in nodes)


def test_random_net_generator_covers_what_it_claims():
    """A guard on the generator itself: every kind of layer shows up."""
    seen = set()

    @settings(max_examples=60, deadline=None, database=None, derandomize=True)   # the same 60 every run
    @given(spec=net_specs())
    def collect(spec):
        seen.update(layer["kind"] for layer in spec["layers"])
        seen.update(f"flatten-{spec['head']['flatten']}" for _ in [0])

    collect()
    assert {"conv", "convT", "bn", "relu", "add", "cat", "silu", "dead"} <= seen
    assert {"flatten-torch", "flatten-view", "flatten-module"} <= seen


# ----------------------------------------------------------------------------- pipeline text

_registered = while_testing({option_kinds.NAME: OptionKinds})


# strings: anything printable (including spaces, punctuation, quotes of one kind,
# words like `none` / `true` / `3`), since quoting must make them round-trip
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.sampled_from("\t\n"),
                max_size=12).filter(lambda s: not ('"' in s and "'" in s))
_tricky_text = st.sampled_from(["none", "true", "false", "3", "-1.5", "inf", "a b", "a,b", "x{y}",
                                "[1]", "k=v", "'", '"', "", " lead", "trail ", "l1"])
_floats = st.floats(allow_nan=False, width=64)


def _strategy_for(tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (tuple, list):
        inner = _strategy_for(args[0])
        return None if inner is None else st.lists(inner, max_size=4).map(tuple)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        parts = [st.none() if a is type(None) else _strategy_for(a) for a in args]
        return None if any(p is None for p in parts) else st.one_of(parts)
    return {int: st.integers(-10**6, 10**6), float: _floats, bool: st.booleans(),
            str: _text | _tricky_text}.get(tp)


@st.composite
def passes(draw, depth=0):
    registry = {n: c for n, c in fxopt.list_passes().items() if n != "stages"}
    name = draw(st.sampled_from(sorted(registry)))
    if depth < 2 and draw(st.integers(0, 5)) == 0:
        return Stages(tuple(draw(st.lists(passes(depth=depth + 1), max_size=3))))
    cls = registry[name]
    values = {}
    for spec in cls.options():
        strategy = _strategy_for(spec.type)
        if strategy is not None and draw(st.booleans()):
            values[spec.field] = draw(strategy)
    try:
        return cls(**values)
    except (ValueError, TypeError, fxopt.FxoptError):
        assume(False)  # a pass may validate its options (e.g. ratio in [0, 1))


@settings(max_examples=150, deadline=None)
@given(pipeline=st.lists(passes(), max_size=5))
def test_parse_format_round_trip(pipeline):
    text = fxopt.format_pipeline(pipeline)
    assert fxopt.parse_pipeline(text) == pipeline, text
    assert fxopt.format_pipeline(fxopt.parse_pipeline(text)) == text


@settings(max_examples=100, deadline=None)
@given(p=st.builds(OptionKinds, num_stages=st.integers(), ratio=_floats, strict=st.booleans(),
                   label=_text | _tricky_text, maybe=st.none() | _text | _tricky_text,
                   layers=st.lists(_text | _tricky_text, max_size=3).map(tuple),
                   sizes=st.lists(st.integers(), max_size=3).map(tuple),
                   scales=st.lists(_floats, max_size=3).map(tuple),
                   norm=st.sampled_from(["l1", "l2", "none"]),
                   either=st.integers() | _text | _tricky_text,
                   limit=st.none() | st.integers()))
def test_every_option_kind_round_trips(p):
    text = fxopt.format_pipeline([p])
    assert fxopt.parse_pipeline(text) == [p], text


@pytest.mark.parametrize("value", ["none", "true", "3", "a b", "x,y", "'q'", 'say "hi"', "", "\nx"])
def test_strings_that_need_quotes_round_trip(value):
    p = OptionKinds(label=value, maybe=value, layers=(value, "b"), either=value)
    text = fxopt.format_pipeline([p])
    assert fxopt.parse_pipeline(text) == [p], text


def test_a_string_with_both_quotes_cannot_be_written_and_says_so():
    with pytest.raises(fxopt.PassOptionError, match="both kinds of quote"):
        fxopt.format_pipeline([OptionKinds(label="it's \"x\"")])

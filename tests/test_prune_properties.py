"""Property tests of prune-channels on random nets (residual adds, channel cats, grouped
and transposed convs, BatchNorms, flatten -> linear heads): whatever the options, the
pruned net runs, keeps its output shape and does not grow; at ratio 0 with all-ones
importance it is the identity."""
from __future__ import annotations

from unittest import mock

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxopt
from fxopt.analyses import ChannelGroups, Cost
from fxopt.passes.prune_channels.importance import Importance, channels_to_keep
from test_properties import RandomNet, _assert_close, _inputs, _reference, net_specs


def _macs(gm) -> float:
    return fxopt.AnalysisManager(gm).get(Cost).macs


def _params(module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=net_specs(), ratio=st.floats(0.05, 0.9), importance=st.sampled_from(["l1", "l2", "random", "bn-scale"]),
       scope=st.sampled_from(["local", "global"]), round_to=st.sampled_from([1, 2]))
def test_pruned_random_nets_run_and_shrink(spec, ratio, importance, scope, round_to):
    model = RandomNet(spec).eval()
    inputs = _inputs(spec)
    expected = _reference(model, inputs)
    pipeline = f"prune-channels{{ratio={ratio} importance={importance} scope={scope} round-to={round_to}}}"
    cm = fxopt.compile(model, inputs, pipeline=pipeline, verify=True)
    got = _reference(cm, inputs)
    leaves = list(zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)))
    assert leaves and all(e.shape == g.shape and torch.isfinite(g).all() for e, g in leaves)
    assert _params(cm.graph_module) <= _params(model)
    before = _macs(fxopt.trace(model, inputs))
    assert _macs(cm.graph_module) <= before
    record = cm.report.records[0]
    groups = fxopt.AnalysisManager(fxopt.trace(model, inputs)).get(ChannelGroups)
    shrinkable = [g for g in groups.prunable() if channels_to_keep(g.size, ratio, round_to, 1) < g.size]
    if record.changed:
        assert _params(cm.graph_module) < _params(model)
    else:  # nothing pruned must have a reason: no group could lose a channel, or a note says why
        assert not shrinkable or scope == "global" or record.notes, (groups, record.notes)
    _assert_close(expected, _reference(model, inputs), rel=0)  # the user's model is untouched


def _ones(self, group):
    return torch.ones(group.size, dtype=torch.float64)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=net_specs(), scope=st.sampled_from(["local", "global"]))
def test_all_ones_importance_at_ratio_zero_is_the_identity(spec, scope):
    model = RandomNet(spec).eval()
    inputs = _inputs(spec)
    with mock.patch.object(Importance, "scores", _ones):
        cm = fxopt.compile(model, inputs, pipeline=f"prune-channels{{ratio=0.0 scope={scope}}}")
    assert not cm.report.records[0].changed
    assert _params(cm.graph_module) == _params(model)
    _assert_close(_reference(model, inputs), _reference(cm, inputs), rel=1e-5)

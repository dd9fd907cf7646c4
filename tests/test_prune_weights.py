"""prune-weights: exact sparsity per layer and globally (property tests on random MLP / conv
nets), 2:4 on every group, outputs equal to the dense model with masked weights, honest
storage sizes, recorded masks that survive finetuning, clear option errors, the user's
model untouched; and the 2:4 path of the inductor backend (CUDA only)."""
from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxopt
from fxopt.passes.prune_weights import PruneWeights, apply_masks, mask_gradients, masks_of

# ----------------------------------------------------------------------------- random nets


@st.composite
def net_specs(draw):
    """Convs (random groups, kernel 1 or 3, widths often multiples of 4), flatten, linears."""
    c0, hw = draw(st.integers(1, 8)), draw(st.integers(2, 5))
    convs, c = [], c0
    for _ in range(draw(st.integers(0, 2))):
        cout = draw(st.sampled_from([2, 3, 4, 8, 12]))
        groups = draw(st.sampled_from([g for g in (1, 2, 4) if c % g == 0 and cout % g == 0]))
        convs.append((c, cout, draw(st.sampled_from([1, 3])), groups))
        c = cout
    features = [c * hw * hw] + draw(st.lists(st.sampled_from([3, 4, 8, 12, 16]), min_size=1, max_size=3))
    return {"c0": c0, "hw": hw, "convs": convs, "features": features, "seed": draw(st.integers(0, 2**16))}


def build(spec) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(spec["seed"])
    layers = []
    for cin, cout, k, groups in spec["convs"]:
        layers += [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups), nn.ReLU()]
    layers.append(nn.Flatten())
    f = spec["features"]
    for i, (a, b) in enumerate(zip(f, f[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(f) - 2 else [])
    return nn.Sequential(*layers).eval(), torch.randn(2, spec["c0"], spec["hw"], spec["hw"])


def weights(model) -> dict[str, torch.Tensor]:
    """The targeted weights (every conv / linear weight) by FQN."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() >= 2}


_sparsities = st.floats(0.0, 1.0) | st.sampled_from([0.0, 0.5, 0.8, 0.9, 1.0])


def _prune(model, x, **options):
    state = copy.deepcopy(model.state_dict())
    cm = fxopt.compile(model, (x,), pipeline=[PruneWeights(**options)], verify=True)
    for k, v in model.state_dict().items():       # the user's model is never written
        assert torch.equal(v, state[k]), k
    return cm


def _check_outputs_are_masked_dense(model, x, cm):
    """The pruned graph computes what the dense model computes with its weights masked."""
    masked = copy.deepcopy(model)
    masks = masks_of(cm)
    with torch.no_grad():
        for name, p in masked.named_parameters():
            if name in masks:
                p.mul_(masks[name])
            assert torch.equal(p, cm.graph_module.get_parameter(name)), name
        expected = masked(x)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-6)


def _pruned_smallest(original: torch.Tensor, mask: torch.Tensor) -> bool:
    """Every pruned |w| is at most every kept |w|."""
    a = original.abs()
    return bool((~mask).sum() == 0 or mask.sum() == 0 or a[~mask].max() <= a[mask].min())


# ----------------------------------------------------------------------------- exactness


@settings(max_examples=20, deadline=None)
@given(spec=net_specs(), sparsity=_sparsities)
def test_layer_scope_prunes_exactly_round_sparsity_numel_in_every_weight(spec, sparsity):
    model, x = build(spec)
    cm = _prune(model, x, sparsity=sparsity)
    masks, report = masks_of(cm), cm.report.sparsity
    originals = weights(model)
    if any(round(sparsity * w.numel()) for w in originals.values()):
        assert set(masks) == set(originals)
    for name, w in originals.items():
        zeros = round(sparsity * w.numel())
        if name not in masks:
            assert zeros == 0
            continue
        mask = masks[name]
        assert mask.dtype == torch.bool and int((~mask).sum()) == zeros
        assert _pruned_smallest(w, mask)
        row = next(r for r in report.layers if r.weight == name)
        assert row.pruned == zeros and row.nnz == int(torch.count_nonzero(w * mask))
    if masks:
        _check_outputs_are_masked_dense(model, x, cm)


@settings(max_examples=15, deadline=None)
@given(spec=net_specs(), sparsity=_sparsities)
def test_global_scope_prunes_exactly_round_sparsity_total_smallest_anywhere(spec, sparsity):
    model, x = build(spec)
    cm = _prune(model, x, sparsity=sparsity, scope="global")
    originals = weights(model)
    total = sum(w.numel() for w in originals.values())
    masks = masks_of(cm)
    if round(sparsity * total) == 0:
        assert not masks and not cm.report.records[0].changed
        return
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    assert cm.report.sparsity.pruned == round(sparsity * total)
    flat_w = torch.cat([originals[n].flatten() for n in masks])
    flat_m = torch.cat([masks[n].flatten() for n in masks])
    assert _pruned_smallest(flat_w, flat_m)
    _check_outputs_are_masked_dense(model, x, cm)


@settings(max_examples=15, deadline=None)
@given(spec=net_specs())
def test_two_four_keeps_two_of_every_group_of_four_along_the_input_dim(spec):
    model, x = build(spec)
    cm = _prune(model, x, pattern="2:4")
    masks, report = masks_of(cm), cm.report.sparsity
    skipped = dict(report.skipped)
    for name, w in weights(model).items():
        if w.shape[1] % 4:
            assert name not in masks and "multiple of 4" in skipped[name]
            continue
        groups = masks[name].movedim(1, -1).reshape(-1, 4)
        assert (groups.sum(-1) == 2).all()                      # exactly 2 kept in every group
        pruned = cm.graph_module.get_parameter(name).movedim(1, -1).reshape(-1, 4)
        assert ((pruned != 0).sum(-1) <= 2).all()
        kept, dropped = w.abs().movedim(1, -1).reshape(-1, 4), ~groups
        assert (torch.where(dropped, kept, -1).amax(-1) <= torch.where(groups, kept, math.inf).amin(-1)).all()
    assert all(r.sparsity == 0.5 and r.semi_structured_bytes is not None for r in report.layers)
    if masks:
        _check_outputs_are_masked_dense(model, x, cm)


def test_two_four_of_a_transposed_conv_groups_its_input_channels():
    model, x = nn.Sequential(nn.ConvTranspose2d(8, 3, 3)).eval(), torch.randn(1, 8, 4, 4)
    cm = _prune(model, x, pattern="2:4")
    mask = masks_of(cm)["0.weight"]            # (Cin=8, Cout=3, 3, 3): groups along dim 0
    assert (mask.movedim(0, -1).reshape(-1, 4).sum(-1) == 2).all()
    _check_outputs_are_masked_dense(model, x, cm)


def test_ties_are_broken_by_position():
    model, x = nn.Sequential(nn.Linear(8, 4, bias=False)).eval(), torch.randn(2, 8)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    mask = masks_of(_prune(model, x, sparsity=0.25))["0.weight"].flatten()
    assert not mask[:8].any() and mask[8:].all()
    mask = masks_of(_prune(model, x, pattern="2:4"))["0.weight"].reshape(-1, 4)
    assert mask.tolist() == [[False, False, True, True]] * 8


def test_zero_and_full_sparsity():
    model, x = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval(), torch.randn(2, 6)
    cm = _prune(model, x, sparsity=0.0)
    assert not cm.report.records[0].changed and not masks_of(cm)
    cm = _prune(model, x, sparsity=1.0)
    assert all(not cm.graph_module.get_parameter(f"{i}.weight").any() for i in (0, 2))
    _check_outputs_are_masked_dense(model, x, cm)


def test_a_second_prune_keeps_what_the_first_pruned():
    model, x = nn.Sequential(nn.Linear(16, 16)).eval(), torch.randn(2, 16)
    cm = fxopt.compile(model, (x,), pipeline="prune-weights{sparsity=0.5},prune-weights{sparsity=0.75}")
    mask = masks_of(cm)["0.weight"]
    assert int((~mask).sum()) == 192 and not (cm.graph_module.get_parameter("0.weight") * ~mask).any()


def test_tied_weights_are_pruned_once_and_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model, x = Tied().eval(), torch.randn(3, 8)
    cm = _prune(model, x, sparsity=0.5)
    report = cm.report.sparsity
    assert len(report.layers) == 1 and report.pruned == 32
    with torch.no_grad():
        masked = copy.deepcopy(model)
        masked.a.weight.mul_(next(iter(masks_of(cm).values())))
        torch.testing.assert_close(cm(x), masked(x))


# ----------------------------------------------------------------------------- options


def test_targets_and_skip_choose_the_weights():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(1, 3, 4, 4)
    cm = _prune(model, x, sparsity=0.5, targets=("linear",))
    assert set(masks_of(cm)) == {"2.weight", "4.weight"}
    cm = _prune(model, x, sparsity=0.5, skip=("4",))
    assert set(masks_of(cm)) == {"0.weight", "2.weight"}
    assert ("4.weight", "skipped: matches skip pattern '4'") in cm.report.sparsity.skipped
    with pytest.warns(UserWarning, match="skip pattern 'fc' matches no targeted weight"):
        _prune(model, x, skip=("fc",))


@pytest.mark.parametrize("options, match", [
    ({"sparsity": 1.5}, "option 'sparsity' takes a finite number in \\[0, 1\\], got 1.5"),
    ({"sparsity": -0.1}, "option 'sparsity' takes a finite number in \\[0, 1\\], got -0.1"),
    ({"sparsity": float("nan")}, "option 'sparsity' takes a finite number"),
    ({"sparsity": True}, "option 'sparsity' takes a number, got True"),
    ({"sparsity": "half"}, "option 'sparsity' takes a number, got 'half'"),
    ({"scope": "local"}, "option 'scope' takes one of layer, global, got 'local'"),
    ({"pattern": "4:8"}, "option 'pattern' takes one of unstructured, 2:4, got '4:8'"),
    ({"targets": ("matmul",)}, "option 'targets' takes one of linear, conv, got 'matmul'"),
    ({"targets": ()}, "targets is empty"),
    ({"pattern": "2:4", "sparsity": 0.8}, "pattern=2:4 zeroes exactly half"),
    ({"pattern": "2:4", "scope": "global"}, "scope=global"),
])
def test_bad_options_say_what_and_what_to_do(options, match):
    with pytest.raises(fxopt.PassOptionError, match=match) as info:
        PruneWeights(**options)
    assert "what to do:" in str(info.value)


@pytest.mark.parametrize("text, match", [
    ("prune-weights{sparsity=lots}", "option 'sparsity' of pass 'prune-weights' takes float"),
    ("prune-weights{scope=local}", "takes layer\\|global"),
    ("prune-weights{sparsty=0.5}", "did you mean 'sparsity'"),
    ("prune-weights{sparsity=2}", "option 'sparsity' takes a finite number in \\[0, 1\\]"),
])
def test_bad_pipeline_text_names_the_column_and_the_fix(text, match):
    with pytest.raises(fxopt.PassOptionError, match=match) as info:
        fxopt.parse_pipeline(text)
    assert "what to do" in str(info.value) or "where" in str(info.value)


def test_pipeline_text_round_trips():
    text = "prune-weights{pattern=2:4 targets=[linear] skip=[fc]}"
    (p,) = fxopt.parse_pipeline(text)
    assert p == PruneWeights(pattern="2:4", targets=("linear",), skip=("fc",))
    assert fxopt.parse_pipeline(fxopt.format_pipeline([p])) == [p]
    assert "prune-weights" in fxopt.list_passes()


# ----------------------------------------------------------------------------- report and masks


def test_report_sizes_match_torch_csr_and_a_packed_bitmask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 16, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(1, 4, 6, 6)
    for options in ({"sparsity": 0.9}, {"sparsity": 0.3, "scope": "global"}, {"pattern": "2:4"}):
        cm = _prune(model, x, **options)
        report = cm.report.sparsity
        for row in report.layers:
            w = cm.graph_module.get_parameter(row.weight)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")                   # "sparse CSR support is in beta"
                csr = w.reshape(w.shape[0], -1).to_sparse_csr()
            parts = (csr.crow_indices(), csr.col_indices(), csr.values())
            assert row.csr_bytes == sum(t.numel() * t.element_size() for t in parts)
            assert row.nnz == csr.values().numel() == int(torch.count_nonzero(w))
            assert row.dense_bytes == w.numel() * w.element_size()
            bits = np.packbits((w != 0).flatten().numpy())          # one bit per entry
            assert row.bitmask_bytes == bits.nbytes + row.nnz * w.element_size()
            assert row.sizes[row.smallest] == min(row.sizes.values())
            if "pattern" in options:
                assert row.semi_structured_bytes == w.numel() // 2 * 4 + w.numel() // 8
        data = json.loads(json.dumps(cm.report.to_dict()))["sections"]["sparsity"]
        assert data["pruned"] == report.pruned and len(data["layers"]) == len(report.layers)
        assert data["smallest_bytes"] < data["dense_bytes"]
        text = str(report)
        assert "storage only" in text and "latency is unchanged" in text and "faster" not in text


def test_masks_are_recorded_and_survive_finetuning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).train()
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    cm = fxopt.compile(model, (x,), pipeline="prune-weights{sparsity=0.6},dce")
    gm, masks = cm.graph_module, masks_of(cm)
    assert set(masks) == {"0.weight", "2.weight"} and cm.report.sparsity.masks.keys() == masks.keys()
    assert all(gm.get_buffer(f"{n}_mask").dtype == torch.bool for n in masks)
    assert all(f"{n}_mask" in gm.state_dict() for n in masks)

    handles = mask_gradients(cm)
    fxopt.finetune(cm, data=[(x, y)], steps=5, lr=1e-2)
    for h in handles:
        h.remove()
    for name, mask in masks.items():
        w = gm.get_parameter(name)
        assert not w[~mask].any() and w[mask].all()
    fxopt.finetune(cm, data=[(x, y)], steps=3, lr=1e-2)   # no hooks: the zeros move ...
    assert any(gm.get_parameter(n)[~m].any() for n, m in masks.items())
    assert apply_masks(cm) == 2                            # ... and apply_masks puts them back
    assert all(not gm.get_parameter(n)[~m].any() for n, m in masks.items())


def test_apply_masks_says_what_is_wrong():
    model, x = nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(1, 4)
    cm = fxopt.compile(model, (x,), pipeline="dce")
    with pytest.raises(fxopt.FxoptError, match="not pruned by prune-weights"):
        apply_masks(cm)
    cm = fxopt.compile(model, (x,), pipeline="prune-weights")
    with pytest.raises(fxopt.FxoptError, match="has shape"):
        apply_masks(cm, {"0.weight": torch.ones(2, 2, dtype=torch.bool)})


# ----------------------------------------------------------------------------- inductor's 2:4 path


def _two_four_graph(dtype=torch.float32):
    model = nn.Sequential(nn.Linear(64, 30), nn.ReLU(), nn.Linear(30, 8)).eval().to(dtype)
    x = torch.randn(16, 64, dtype=dtype)
    return fxopt.compile(model, (x,), pipeline="prune-weights{pattern=2:4}"), x


def test_inductor_leaves_2to4_dense_off_cuda_and_says_why():
    from fxopt.backends.inductor import InductorBackend, InductorReport, SemiStructured24

    cm, x = _two_four_graph(torch.float16)
    report = InductorReport()
    SemiStructured24(copy.deepcopy(cm.graph_module), torch.device("cpu"), report).run()
    assert not report.sparse_2to4
    assert [n for n, _ in report.dense_2to4] == ["linear"]         # linear_1: 30 inputs, no 2:4 pattern
    assert "CUDA" in report.dense_2to4[0][1]
    with pytest.raises(fxopt.UnsupportedError, match="option 'sparse_2to4' takes true or false, got 'yes'"):
        InductorBackend().lower(cm.graph_module, (x,), sparse_2to4="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inductor_runs_2to4_linears_on_semi_structured_weights_on_cuda():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128)).half().cuda().eval()
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # torch's "prototype" warning
        cm = fxopt.compile(model, (x,), pipeline="prune-weights{pattern=2:4}", backend="inductor")
    report = cm.report.inductor
    assert [n for n, _ in report.sparse_2to4] == ["linear", "linear_1"], report.dense_2to4
    lowered = cm._lowered.graph_module
    assert sum(isinstance(b, torch.sparse.SparseSemiStructuredTensor) for b in lowered.buffers()) == 2
    with torch.no_grad():
        expected = cm.graph_module(x)                   # the masked dense weights, eager
        torch.testing.assert_close(cm(x), expected, rtol=2e-2, atol=2e-2)
    dense = fxopt.compile(model, (x,), pipeline="dce", backend="inductor")   # no 2:4 pattern: untouched
    assert not dense.report.inductor.sparse_2to4

"""GPTQ rounding and per-group weight scales: the algorithm beats round-to-nearest on
the layer's output, fake-quant{rounding=gptq} installs exactly its integers, and the
backends either reproduce them (int8, per channel) or refuse per-group scales."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.backends.int8 import int8_report
from fxopt.quant import FakeQuantize, QSpec, dequantize, quantize, quantizer_of
from fxopt.quant.gptq import gptq_quantize, nearest_quantize, reconstruction_error


def _correlated(n: int, dim: int, seed: int) -> torch.Tensor:
    """Inputs whose features are strongly correlated (few latent factors, mixed the same way
    for every seed, plus noise): samples `seed` of one distribution."""
    mix = torch.randn(dim // 4, dim, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim // 4, generator=g) @ mix + 0.1 * torch.randn(n, dim, generator=g)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.double().T @ x.double()


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group_size", [None, 32])
def test_gptq_beats_nearest_on_held_out_inputs(bits, group_size):
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    calibration, held_out = _hessian(_correlated(2048, 128, 2)), _hessian(_correlated(1024, 128, 3))
    spec = QSpec(bits, True, 0, group_size)
    rounded, scale, zero_point = gptq_quantize(weight, calibration, spec)
    nearest = nearest_quantize(weight, spec)
    gptq_err, nearest_err = (reconstruction_error(weight, w, held_out) for w in (rounded, nearest))
    assert gptq_err < 0.8 * nearest_err, (gptq_err, nearest_err)
    assert scale.numel() == 48 * (1 if group_size is None else 4)
    codes = quantize(rounded, scale, zero_point, spec)   # exactly on the grid
    assert torch.equal(dequantize(codes, scale, zero_point, spec), rounded)


def test_dead_inputs_and_a_singular_hessian_are_handled():
    x = _correlated(64, 32, 4)
    x[:, 5] = 0                                   # an input that never fires
    weight = torch.randn(8, 32)
    rounded, _, _ = gptq_quantize(weight, _hessian(x[:8]), QSpec(4, True, 0))   # rank 8 < 32
    assert torch.isfinite(rounded).all()
    spec = QSpec(4, True, 0)
    assert rounded[:, 5].equal(nearest_quantize(weight, spec)[:, 5])   # no error flows into it


def test_group_scales_for_nearest_rounding():
    w = torch.randn(4, 3, 3, 3)                   # 27 values per channel: groups of 8, 8, 8, 3
    spec = QSpec(4, True, 0, 8)
    fq = FakeQuantize(spec, "minmax", "weight", 4 * 4)
    fq.observe_weight(w)
    rows = w.reshape(4, 27)
    for channel in range(4):
        for group, cols in enumerate((slice(0, 8), slice(8, 16), slice(16, 24), slice(24, 27))):
            amax = rows[channel, cols].abs().max()
            assert fq.scale[channel * 4 + group].item() == pytest.approx(amax.item() / 7)
    per_group = (fq(w) - w).abs().mean()
    per_channel = FakeQuantize(QSpec(4, True, 0), "minmax", "weight", 4)
    per_channel.observe_weight(w)
    assert per_group <= (per_channel(w) - w).abs().mean()


class _Net(nn.Module):
    """A conv and two linears on correlated features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 6 * 6, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def _net_data(n: int, seed: int) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, 1, 6, 6, generator=g).repeat(1, 1, 4, 1, 1)[:, :4]   # channels repeat
    return [((base[i:i + 8, 0] + 0.1 * torch.randn(8, 4, 6, 6, generator=g)),) for i in range(0, n, 8)]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return _Net().eval()


def test_fake_quant_installs_the_gptq_integers(net):
    data = _net_data(64, 5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cm = fxopt.compile(net, data[0], pipeline="fake-quant{weight-bits=4 rounding=gptq}", calibration=data[:6])
    rows = {r.module: r for r in cm.report.gptq.rows}
    assert set(rows) == {"conv", "fc1", "fc2"} and not cm.report.gptq.nearest
    assert all(r.gptq < r.nearest for r in rows.values()), cm.report.gptq
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())   # the user's model
    gm = cm.graph_module
    weights = [n for n in gm.graph.nodes if quantizer_of(gm, n, "weight") is not None]
    assert len(weights) == 3
    for node in weights:
        fq, stored = gm.get_submodule(node.target), fxopt.ir.graph.fetch_attr(gm, node.args[0].target)
        assert node.args[0].target.endswith("_gptq") and not fq.observing
        assert torch.equal(fq(stored), stored)   # the stored weight is the grid value itself
    assert "conv.weight" not in dict(gm.named_parameters())   # the traced weight is no longer read


def test_gptq_needs_calibration_or_data(net):
    data = _net_data(16, 6)
    with pytest.raises(fxopt.PassOptionError, match="calibration"):
        fxopt.compile(net, data[0], pipeline="fake-quant{rounding=gptq}")
    cm = fxopt.compile(net, data[0], pipeline="fake-quant{rounding=gptq}", data=[(x, None) for (x,) in data])
    assert cm.report.gptq.batches == len(data)
    with pytest.raises(fxopt.PassOptionError, match="per-channel"):
        fxopt.compile(net, data[0], pipeline="fake-quant{weight-granularity=per-tensor group-size=8}",
                      calibration=data)


def test_group_size_with_gptq_and_the_int8_backend(net):
    data = _net_data(48, 7)
    cm = fxopt.compile(net, data[0], pipeline="fake-quant{weight-bits=4 rounding=gptq group-size=16}",
                       backend="int8", calibration=data[:4])
    assert {q.granularity for q in cm.report.quant.quantized} == {"per-group-16"}
    assert all(r.gptq < r.nearest for r in cm.report.gptq.rows)
    assert "per-group" in int8_report(cm).reason_for("linear")   # refused, not mis-lowered
    per_channel = fxopt.compile(net, data[0], pipeline="fake-quant{weight-bits=4 rounding=gptq}",
                                backend="int8", calibration=data[:4])
    fake = fxopt.lower(per_channel, backend="eager")
    assert [n for n, _ in int8_report(per_channel).int8_ops] == ["conv2d", "linear", "linear_1"]
    with torch.no_grad():
        got, want = per_channel(*data[5]), fake(*data[5])
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0)


@pytest.mark.slow   # ~20 s on one core: MiniLM's load and trace, 8 batches through it, 37 layers
def test_gptq_beats_nearest_on_every_minilm_layer():
    """Real weights: Hessians from 192 corpus sentences, errors on the activations of 64
    other corpus sentences; every linear of all-MiniLM-L6-v2 (pooler included) gains."""
    import minilm
    from benchmarks.corpus import corpus
    from fxopt.passes.fake_quant.gptq import GptqRounding
    from fxopt.pm.analysis import AnalysisManager

    model, tokenizer = minilm.load()
    texts = corpus()
    calibration = minilm.batches(tokenizer, texts[0::2][:192], 32)
    held_out = minilm.batches(tokenizer, texts[1::2][:64], 32)
    gm = fxopt.compile(model, held_out[0], pipeline="").graph_module
    linears = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    measured = GptqRounding(gm, AnalysisManager(gm, calibration), linears)
    test = GptqRounding(gm, AnalysisManager(gm, held_out), linears).hessians
    assert len(measured.layers) == len(linears) == 37
    spec = QSpec(4, True, 0)
    for layer in measured.layers:
        weight = layer.weight.float()
        rounded, _, _ = gptq_quantize(weight, measured.hessians[layer.node], spec)
        gptq_err = reconstruction_error(weight, rounded, test[layer.node])
        nearest_err = reconstruction_error(weight, nearest_quantize(weight, spec), test[layer.node])
        assert gptq_err < nearest_err, (layer.path, gptq_err, nearest_err)


def test_group_scales_and_gptq_weights_survive_save_and_load(net, tmp_path):
    data = _net_data(32, 8)
    cm = fxopt.compile(net, data[0], pipeline="fake-quant{weight-bits=3 rounding=gptq group-size=16}",
                       calibration=data[:2])
    fxopt.save(cm, tmp_path / "m")
    loaded = fxopt.load(tmp_path / "m")
    assert {fq.group_size for fq in fxopt.quant.quantizers_in(loaded.graph_module) if fq.role == "weight"} == {16}
    with torch.no_grad():
        torch.testing.assert_close(loaded(*data[3]), cm(*data[3]), rtol=0, atol=0)

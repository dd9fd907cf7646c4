"""int8 backend: real int8 kernels that agree with the fake-quant model they come from.

Random-weight vision models first get BatchNorm statistics from random inputs and
damped residual branches (`benchmarks.models.with_realistic_statistics` says why:
as torchvision initialises it, mobilenet_v2's logits vanish, and with statistics
alone it is so chaotic that 8-bit rounding noise takes its logits to cosine 0.92
of fp32, where one-code rounding flips between two correct int8 kernels decide top-1).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from benchmarks.models import with_realistic_statistics
from digits import BATCH, accuracy as _accuracy
from fxopt.backends.int8 import INT8_MODULES, int8_report

PIPELINE = "fold-bn,fake-quant"


def _outputs(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(*b).reshape(len(b[0]), -1) for b in batches])


def _agreement(reference, candidate, batches) -> tuple[float, float]:
    ref, got = _outputs(reference, batches), _outputs(candidate, batches)
    return ((ref.argmax(1) == got.argmax(1)).float().mean().item(),
            F.cosine_similarity(ref, got).mean().item())


def _both(model, example, calibration):
    """(fake-quant model, int8 model) from one compile: the int8 one lowers the same graph."""
    cm = fxopt.compile(model, example, pipeline=PIPELINE, backend="int8", calibration=calibration)
    return fxopt.lower(cm, backend="eager"), cm


def _int8_kernels(cm) -> list:
    return [m for m in cm._lowered.modules() if isinstance(m, INT8_MODULES)]


def _vision(name: str, batches: int, size: int = 64, batch: int = 8):
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, name)(weights=None)
    model = with_realistic_statistics(model, [torch.randn(batch, 3, size, size) for _ in range(3)])
    data = [(torch.randn(batch, 3, size, size),) for _ in range(batches)]
    return model, data


def test_realistic_statistics_make_mobilenet_quantization_tolerant():
    """The model the agreement tests use: 8-bit fake-quant stays close to fp32, as on a trained net."""
    model, data = _vision("mobilenet_v2", batches=8)
    fake, _ = _both(model, data[0], data[:4])
    _, cosine = _agreement(model, fake, data[4:])
    assert cosine >= 0.999, cosine    # torchvision's init with BN statistics only: 0.92


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_vision_int8_agrees_with_fake_quant(name):
    model, data = _vision(name, batches=12)          # 4 calibration batches, 64 inputs checked
    fake, cm = _both(model, data[0], data[:4])
    top1, cosine = _agreement(fake, cm, data[4:])
    assert top1 >= 0.99 and cosine >= 0.999, (top1, cosine)
    report = int8_report(cm)
    assert cm.report.int8 is report and "fake-quant" in [r.name for r in cm.report.records]
    assert report.engine in torch.backends.quantized.supported_engines
    assert len(report.int8_ops) >= 20 and "adaptive_avg_pool2d" in {n for n, _ in report.float_ops}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_vision_int8_agrees_on_256_inputs(name):
    size = 64 if name == "resnet50" else 96            # resnet50's bottlenecks, at a size CI affords
    model, data = _vision(name, batches=36, size=size)  # 4 calibration batches, 256 inputs checked
    fake, cm = _both(model, data[0], data[:4])
    top1, cosine = _agreement(fake, cm, data[4:])
    assert top1 >= 0.99 and cosine >= 0.999, (top1, cosine)


def test_int8_values_flow_between_int8_kernels():
    model, data = _vision("resnet18", batches=3)
    _, cm = _both(model, data[0], data[:2])
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.setdefault(mod, (args[0].dtype, out.dtype)) and None)
             for m in _int8_kernels(cm)]
    cm(*data[2])
    for h in hooks:
        h.remove()
    assert len(seen) >= 20
    # every kernel reads int8 codes; all but the classifier also write them
    assert all(dtype_in == torch.quint8 for dtype_in, _ in seen.values())
    assert sum(out == torch.quint8 for _, out in seen.values()) >= len(seen) - 1
    ops = {n.target for n in cm._lowered.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.conv2d.default not in ops  # no float convolution left
    assert int8_report(cm).quantize == 2  # the input, and the classifier input after the float avg-pool


def test_lower_after_calibrate_and_freeze_matches_compile():
    model, data = _vision("resnet18", batches=4)
    cm = fxopt.compile(model, data[0], pipeline=PIPELINE)
    fxopt.calibrate(cm, data[:2])
    with pytest.raises(fxopt.UnsupportedError, match="not frozen"):
        fxopt.lower(cm, backend="int8")
    fxopt.freeze(cm)
    lowered = fxopt.lower(cm, backend="int8")
    direct = fxopt.compile(model, data[0], pipeline=PIPELINE, backend="int8", calibration=data[:2])
    with torch.no_grad():
        torch.testing.assert_close(lowered(*data[3]), direct(*data[3]))
    assert _int8_kernels(lowered)


def test_lowering_without_fake_quant_says_what_to_do():
    model, data = _vision("resnet18", batches=1)
    with pytest.raises(fxopt.UnsupportedError, match="add fake-quant to the pipeline and calibrate"):
        fxopt.compile(model, data[0], pipeline="fold-bn", backend="int8")


class _Mixed(nn.Module):
    """A conv1d (no int8 kernel wired) and an activation matmul between int8-able layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(self.conv(x).transpose(1, 2))
        return (h @ h.transpose(1, 2)).flatten(1)


def test_ops_without_int8_kernel_stay_float_and_are_reported():
    model = _Mixed().eval()
    data = [(torch.randn(2, 4, 8),) for _ in range(3)]
    fake, cm = _both(model, data[0], data[:2])
    report = int8_report(cm)
    assert "no int8 kernel for conv1d" in report.reason_for("conv1d")
    assert "matmul" in report.reason_for("matmul")
    assert [n for n, _ in report.int8_ops] == ["linear"]
    assert "float" in str(report)
    torch.testing.assert_close(_outputs(cm, data[2:]), _outputs(fake, data[2:]), atol=1e-3, rtol=1e-3)


def test_bert_like_encoder_int8_agrees():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, ids):
            return self.bert(input_ids=ids).last_hidden_state.mean(1)

    data = [(torch.randint(0, 200, (8, 16)),) for _ in range(12)]
    fake, cm = _both(Encoder().eval(), data[0], data[:4])
    top1, cosine = _agreement(fake, cm, data[4:])
    assert top1 >= 0.99 and cosine >= 0.999, (top1, cosine)
    kernels = int8_report(cm).kernels()
    assert sum(kernels.values()) >= 12   # every linear of both layers (q, k, v, out, ffn x2) runs in int8


def test_digits_cnn_int8_loses_at_most_half_a_point(trained, digits):
    x_train = digits[0]
    calibration = [x_train[i:i + BATCH] for i in range(0, 8 * BATCH, BATCH)]
    cm = fxopt.compile(trained, (x_train[:BATCH],), pipeline=PIPELINE, backend="int8", calibration=calibration)
    fp32, int8 = _accuracy(trained, digits), _accuracy(cm, digits)
    assert fp32 > 0.9 and int8 >= fp32 - 0.005, (fp32, int8)
    assert len(int8_report(cm).int8_ops) == 3



def test_a_float_output_kernel_that_disagrees_is_refused(monkeypatch):
    """A conv whose int32 result goes straight to float (a sigmoid reads it) is checked against
    the fake-quant conv too: a kernel that returns wrong values is refused, naming the layer."""
    from fxopt.backends.int8.kernels import QConv2dToFloat

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sigmoid()).eval()
    x = torch.randn(4, 3, 12, 12)
    cm = fxopt.compile(model, (x,), pipeline="fake-quant", backend="int8", calibration=[x])
    assert "QConv2dToFloat" in str(int8_report(cm)) and "checked: 1 int8 ops agree" in str(int8_report(cm))
    right = QConv2dToFloat.forward
    monkeypatch.setattr(QConv2dToFloat, "forward", lambda self, qx: right(self, qx) * 1.5)
    with pytest.raises(fxopt.FxoptError, match="disagree with the fake-quant model at conv2d"):
        fxopt.compile(model, (x,), pipeline="fake-quant", backend="int8", calibration=[x])

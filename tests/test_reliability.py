"""Reliability: no code run from where the user happens to stand, passes that say why
they did nothing, and clear errors for inputs that used to give raw ones."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import torch
import torch.nn as nn

import fxopt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_never_imports_a_benchmarks_folder_of_the_working_directory(tmp_path):
    marker = tmp_path / "PWNED"
    fake = tmp_path / "benchmarks"
    fake.mkdir()
    for name in ("__init__.py", "harness.py"):
        (fake / name).write_text(f"open({str(marker)!r}, 'w').close()\n")
    (fake / "__main__.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef main(argv): return 0\n")
    proc = subprocess.run([sys.executable, "-c", "import sys; from fxopt.api.cli import main; "
                                                 "sys.exit(main(['bench', '--help']))"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert not marker.exists()
    assert proc.returncode == 0 and "--suite" in proc.stdout, proc.stderr[-2000:]


# -- options are checked from their declarations, from text and Python alike ---------------------------
@pytest.mark.parametrize("text, message", [
    ("fold-bn{eps-guard=-1}", "option 'eps-guard' takes a finite number in [0, inf), got -1.0"),
    ("fold-bn{eps-guard=nan}", "got nan"),
    ("split-stages{cut-weight=inf}", "got inf"),
    ("prune-weights{sparsity=1.5}", "in [0, 1]"),
    ("prune-channels{ratio=0.5 ratio=0.9}", "given option 'ratio' twice"),
])
def test_option_values_outside_their_declared_range_are_refused_with_the_column(text, message):
    with pytest.raises(fxopt.PassOptionError, match=re.escape(message)) as info:
        fxopt.PassManager(text)
    assert "column" in str(info.value)


def test_python_construction_is_checked_like_text():
    from fxopt.passes.fold_bn import FoldBatchNorm
    from fxopt.passes.prune_channels import PruneChannels

    with pytest.raises(fxopt.PassOptionError, match="eps-guard"):
        FoldBatchNorm(eps_guard=float("nan"))
    with pytest.raises(fxopt.PassOptionError, match="grouped"):
        PruneChannels(grouped="zzz")
    with pytest.raises(fxopt.PassOptionError, match="seed"):
        PruneChannels(seed=-1)
    built = PruneChannels(ratio=0.25, grouped="channels")       # what was built prints back to text
    assert fxopt.PassManager(fxopt.pm.format_pipeline([built])).passes == [built]


@pytest.mark.parametrize("option", [{"lr": float("inf")}, {"temperature": float("inf")}, {"alpha": float("nan")}])
def test_finetune_refuses_non_finite_settings_before_training(option):
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    cm = fxopt.compile(model, (torch.randn(2, 4),))
    before = cm.graph_module.get_parameter("0.weight").detach().clone()
    with pytest.raises(fxopt.FxoptError, match=next(iter(option))):
        fxopt.finetune(cm, teacher=model, data=[torch.randn(2, 4)], steps=2, **option)
    assert torch.equal(cm.graph_module.get_parameter("0.weight"), before)


def test_a_pass_that_changes_nothing_says_why():
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    cm = fxopt.compile(model, (torch.randn(2, 4),), pipeline="fold-bn,dce,prune-channels{ratio=0.5}")
    for record in cm.report.records:
        assert not record.changed and record.notes and record.notes[0], record
    assert "no prunable group" in cm.report.records[2].notes[0]
    assert "model output" in cm.report.records[2].notes[0]
    cm = fxopt.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval(), (torch.randn(2, 4),),
                       pipeline="prune-channels{ratio=0.5 min-channels=8}")
    assert "keeps all its channels (min-channels=8" in cm.report.records[0].notes[0]


# -- NaN / Inf never frozen into a scale --------------------------------------------------------------
def test_nan_in_calibration_data_is_refused_naming_the_quantizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    bad = torch.randn(2, 4)
    bad[0, 1] = float("nan")
    with pytest.raises(fxopt.FxoptError, match="activation quantizer .*calibration batch gave it NaN"):
        fxopt.compile(model, (torch.randn(2, 4),), pipeline="fake-quant", calibration=[torch.randn(2, 4), bad])


def test_inf_in_a_weight_is_refused_naming_the_quantizer():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(fxopt.FxoptError, match="weight quantizer .*weight holds Inf"):
        fxopt.compile(model, (torch.randn(2, 4),), pipeline="fake-quant", calibration=[torch.randn(2, 4)])


@pytest.mark.parametrize("observer", ["minmax", "moving-average", "histogram"])
def test_calibrating_from_threads_loses_no_update(observer):
    """4 threads calibrating one model end with the observers of one thread doing it all
    (minmax and histogram do not depend on the order; a moving average's count must)."""
    import threading

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    batches = [torch.randn(64, 16) * (1 + i % 5) for i in range(40)]

    def calibrated(threads: int):
        cm = fxopt.compile(model, (batches[0],), pipeline=f"fake-quant{{observer={observer}}}")
        chunks = [batches[i::threads] for i in range(threads)]
        workers = [threading.Thread(target=fxopt.calibrate, args=(cm, chunk)) for chunk in chunks]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        quantizers = {n: m for n, m in cm.graph_module.named_modules() if getattr(m, "role", "") == "activation"}
        return {n: m.observer.count.item() for n, m in quantizers.items()}, \
            {n: (m.observer.lo.clone(), m.observer.hi.clone()) for n, m in quantizers.items()}

    one_counts, one_ranges = calibrated(1)
    many_counts, many_ranges = calibrated(4)
    assert many_counts == one_counts and set(one_counts.values()) == {40}
    if observer == "minmax":
        for name, (lo, hi) in one_ranges.items():
            assert torch.equal(many_ranges[name][0], lo) and torch.equal(many_ranges[name][1], hi)


# -- clear errors, before the work -------------------------------------------------------------------
def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval(), torch.randn(2, 4)


@pytest.mark.parametrize("call, message", [
    (lambda m, x, cm: fxopt.compile(m, (x,), pipeline=123), "pipeline must be pipeline text"),
    (lambda m, x, cm: fxopt.compile(m, (x,), pipeline="fake-quant", calibration=5), "takes a list of batches"),
    (lambda m, x, cm: fxopt.compile(m, (x,), pipeline="fake-quant", calibration=[torch.randn(2, 5)]),
     "dim 1 is static"),
    (lambda m, x, cm: fxopt.calibrate("abc", [x]), "calibrate takes a CompiledModel"),
    (lambda m, x, cm: fxopt.freeze(None), "freeze takes a CompiledModel"),
    (lambda m, x, cm: fxopt.lower(m), "lower takes what fxopt.compile returned"),
    (lambda m, x, cm: fxopt.finetune(cm, data=[(x, torch.tensor([0, 7]))], steps=1), "holds class 7"),
    (lambda m, x, cm: fxopt.finetune(cm, data=[(x, torch.tensor([0.5, 1.0]))], steps=1), "targets are float32"),
    (lambda m, x, cm: fxopt.finetune(cm, data=[(x, torch.tensor([0, 1]))], steps=1, lr="abc"), "lr must be"),
    (lambda m, x, cm: fxopt.compile(m.to("meta"), (x.to("meta"),), pipeline="fake-quant"), "meta device"),
])
def test_bad_calls_are_clear_errors(call, message):
    model, x = _small()
    cm = fxopt.compile(model, (x,))
    with pytest.raises(fxopt.FxoptError, match=message) as info:
        call(model, x, cm)
    assert "what to do" in str(info.value)


NETS = os.path.join(ROOT, "tests", "nets.py")


@pytest.mark.parametrize("argv, message", [
    (["run", f"{NETS}:SmallNet", "--input-shape=-1x3x8x8"], "sizes must be positive"),
    (["run", f"{NETS}:SmallNet", "--input-shape", "1x3x8x8", "--calibration-batches", "-3"], "is >= 0"),
    (["run", f"{NETS}:SmallNet", "--input-shape", "1x3x8x8", "--print-ir-after", "nosuchpass"],
     "no pass is called that"),
    (["pipeline-run", f"{NETS}:SmallNet", "--input-shape", "2x3x8x8", "--num-stages", "0"], "at least 1"),
])
def test_bad_command_lines_are_clear_errors_before_the_work(argv, message, capsys):
    from fxopt.api.cli import main

    assert main(argv) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_unwritable_json_path_fails_before_the_run(tmp_path, capsys):
    from fxopt.api.cli import main

    (tmp_path / "a-file").write_text("x")
    assert main(["run", f"{NETS}:SmallNet", "--input-shape", "1x3x8x8",
                 "--json", str(tmp_path / "a-file" / "out.json")]) != 0
    captured = capsys.readouterr()
    assert "is a file" in captured.err and "pass" not in captured.out   # no report: nothing ran


# -- the int8 backend never silently disagrees with its fake-quant graph ---------------------------------
def _depthwise():
    """A depthwise net as trained ones are after BN folding: per-channel scales over 4 decades."""
    torch.manual_seed(0)
    channels = 32
    model = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                          nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.BatchNorm2d(channels),
                          nn.ReLU(), nn.Conv2d(channels, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()
    with torch.no_grad():
        model[3].weight.copy_(torch.rand_like(model[3].weight) * 0.5 + 0.5)
        model[4].weight.copy_(torch.logspace(-2, 2, channels))
    return model, [torch.rand(8, 3, 32, 32) * 4 for _ in range(4)]


def _int8(model, batches, **options):
    return fxopt.compile(model, (batches[0],), pipeline="fold-bn,fake-quant", backend="int8",
                         calibration=batches, **options)


def test_int8_kernels_are_checked_layer_by_layer_against_fake_quant():
    from fxopt.backends.int8 import int8_report
    from fxopt.backends.int8.agreement import layer_agreement

    model, batches = _depthwise()
    cm = _int8(model, batches)
    report = int8_report(cm)
    assert report.checked.startswith("checked: 4 int8 ops agree") and not report.engine_notes
    checks = layer_agreement(cm.graph_module, cm._lowered, batches)   # conv2d_3 has a float output
    assert [c.layer for c in checks] == ["conv2d", "conv2d_1", "conv2d_2", "conv2d_3"]
    assert all(c.agrees for c in checks)
    assert max(c.max_lsb for c in checks) <= 2          # a rounding, nothing more


def test_an_engine_whose_kernels_disagree_is_passed_over_or_refused(monkeypatch):
    from fxopt.backends import int8
    from fxopt.backends.int8.agreement import LayerAgreement
    from fxopt.backends.int8.kernels import candidate_engines

    if len(candidate_engines()) < 2:
        pytest.skip("one quantized engine here")
    real, calls = int8.layer_agreement, []

    def first_engine_saturates(gm, lowered, batches):
        calls.append(1)
        checks = real(gm, lowered, batches)
        return [LayerAgreement(checks[1].layer, 187.0, 0.42)] if len(calls) == 1 else checks

    monkeypatch.setattr(int8, "layer_agreement", first_engine_saturates)
    model, batches = _depthwise()
    report = int8.int8_report(_int8(model, batches))
    first, second = candidate_engines()[:2]
    assert report.engine == second
    assert report.engine_notes == [f"engine {first} passed over: conv2d_1: 42.0% of codes more than 8 LSB from "
                                   "the fake-quant model (up to 187)"]
    calls.clear()
    with pytest.raises(fxopt.FxoptError, match=f"disagree with the fake-quant model at conv2d_1 \\(engine {first}\\)"
                       ) as info:
        _int8(model, batches, engine=first)                    # the user's choice is not overridden
    assert f"try engine={second!r}" in str(info.value)
    monkeypatch.setattr(int8, "layer_agreement",
                        lambda gm, lowered, batches: [LayerAgreement("conv2d_1", 187.0, 0.42)])
    with pytest.raises(fxopt.FxoptError, match="at conv2d_1"):
        _int8(model, batches)                                  # no engine agrees: refused, by layer


def test_backward_hooks_stay_on_the_users_model_and_out_of_the_graph():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    model[0].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    gm = fxopt.trace(model, (torch.randn(2, 4),))
    assert [str(n.target) for n in gm.graph.nodes if n.op == "call_function"] == [
        "aten.linear.default", "aten.relu.default", "aten.linear.default"]     # no view_as left behind
    assert len(model[0]._backward_hooks) == 1                                   # the user's hook is kept


def test_the_users_forward_hooks_do_not_run_while_tracing_and_are_named():
    calls = []
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    model[0].register_forward_hook(lambda module, args, out: calls.append(type(out).__name__))
    with pytest.warns(UserWarning, match=r"1 forward hook\(s\) of the model \(0\) are not part of the compiled graph"):
        cm = fxopt.compile(model, (torch.randn(2, 4),))
    assert calls == [] and len(model[0]._forward_hooks) == 1       # not run on fake tensors; still the user's
    spectral = nn.utils.spectral_norm(nn.Linear(4, 4)).eval()      # torch's own hook computes the weight: kept
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(fxopt.compile(spectral, (x,))(x), spectral(x))
        torch.testing.assert_close(cm(x), model(x))


def test_a_backend_option_out_of_range_is_refused_before_the_export(tmp_path):
    model, x = _small()
    with pytest.raises(fxopt.BackendOptionError, match="option 'reuse_factor' takes an integer in \\[1, inf\\), got 0"):
        fxopt.compile(model, (x,), pipeline="fold-bn,fake-quant{outputs=true}", backend="fpga-int8",
                      calibration=[x], export_dir=tmp_path / "export", reuse_factor=0)
    assert not (tmp_path / "export").exists()

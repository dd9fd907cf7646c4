"""`fxopt bench` / `python -m benchmarks` ad-hoc mode: rows, files, plots and errors (no time asserted)."""
import builtins
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import adhoc, plots
from benchmarks.__main__ import main
from fxopt.api import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

METRICS = {"label", "pipeline", "backend", "params", "macs", "model_bytes", "latency", "peak_memory_bytes",
           "compile_s", "fidelity", "headline", "speedup", "size_ratio", "layers"}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One ad-hoc run on the digits task (its CNN trains once, then comes from the cache)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("rich")
    out = tmp_path_factory.mktemp("bench")
    code = main(["--model", "digits", "--pipeline", "prune50", "--pipeline", "int8", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "digits-adhoc.json").read_text())


def test_adhoc_digits_rows_have_every_metric(digits_run):
    _, result = digits_run
    assert result["mode"] == "adhoc" and result["model"] == "digits"
    assert result["task"]["headline"] == "accuracy" and result["task"]["real_weights"]
    for key in ("torch", "cpu_model", "torch_threads", "date"):
        assert result["environment"][key], key
    cfg = result["config"]
    assert cfg["threads"] == 2 and cfg["batch"] == 64 and cfg["latency_runs"] >= 10
    baseline, pruned, int8 = result["rows"]
    assert [r["label"] for r in result["rows"]] == ["baseline", "prune50", "int8"]
    assert (pruned["backend"], int8["backend"]) == ("eager", "int8")   # int8 chosen for fake-quant
    for row in result["rows"]:
        assert "error" not in row, row.get("error")
        assert METRICS <= set(row), METRICS - set(row)
        assert row["latency"]["repeats"] >= 10 and row["latency"]["median_s"] > 0
        assert 0 <= row["fidelity"]["accuracy"] <= 1 and row["headline"] == row["fidelity"]["accuracy"]
        assert row["peak_memory_bytes"] is None or row["peak_memory_bytes"] > 0
        assert row["layers"] and row["params"] > 0 and row["macs"] > 0
    assert baseline["speedup"] == 1.0 and baseline["size_ratio"] == 1.0 and baseline["compile_s"] is None
    assert baseline["fidelity"]["accuracy"] > 0.9
    assert pruned["macs"] < baseline["macs"] and pruned["params"] < baseline["params"]
    assert int8["model_bytes"] < baseline["model_bytes"] / 3       # int8 weights: 1 byte each
    assert pruned["compile_s"] > 0 and int8["compile_s"] > 0


def test_adhoc_digits_writes_markdown_and_plots_and_renders_them_again(digits_run, capsys):
    out, result = digits_run
    pngs = [out / "digits-latency-vs-fidelity.png", out / "digits-layer-cost.png"]
    for png in pngs:
        assert png.read_bytes().startswith(b"\x89PNG"), png
    md = (out / "digits-adhoc.md").read_text()
    assert "| row | backend | params | MACs | model bytes |" in md and "| prune50 | eager |" in md
    assert result["environment"]["torch"] in md
    for path in pngs + [out / "digits-adhoc.md"]:
        path.unlink()
    assert main(["--model", "digits", "--render", "--out", str(out)]) == 0
    assert (out / "digits-adhoc.md").read_text() == md
    assert all(p.stat().st_size > 0 for p in pngs)
    assert "baseline" in capsys.readouterr().out       # the table on stdout


def test_fxopt_bench_delegates_to_the_harness(capsys):
    assert cli.main(["bench", "--model", "nope", "--pipeline", "prune50"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and "digits" in err and "torchvision:NAME" in err


def test_fxopt_bench_from_another_folder_finds_the_checkout(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}     # fxopt from this checkout, installed or not
    done = subprocess.run([sys.executable, "-c", "import sys; from fxopt.api.cli import main; sys.exit(main())",
                           "bench", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--pipeline" in done.stdout and "--suite" in done.stdout


def test_fxopt_bench_without_a_checkout_says_where_to_run(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "benchmarks", None)          # as when benchmarks/ is not importable
    monkeypatch.setitem(sys.modules, "benchmarks.__main__", None)
    assert cli.main(["bench", "--suite", "passes"]) == 2
    assert "install fxopt from a checkout" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--model", "digits", "--pipeline", "prune-chanels"], "did you mean 'prune-channels'"),
    (["--model", "digits", "--pipeline", "fold-bn,prune-channels{ratio=2}"], "option 'ratio' takes a finite number in [0, 1)"),
    (["--model", "digits", "--pipeline", "prune50", "--backend", "nope"], "unknown backend 'nope'"),
    (["--model", "torchvision:resnet1", "--pipeline", "prune50"], "unknown torchvision model 'resnet1'"),
    (["--model", "digit", "--pipeline", "prune50"], "did you mean 'digits'"),
])
def test_bad_model_pipeline_or_backend_is_one_clear_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_wrong_flag_mix_is_a_usage_error(capsys):
    for argv in (["--pipeline", "int8"], ["--model", "digits"], ["--model", "digits", "--suite", "passes",
                                                                  "--pipeline", "int8"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "--model" in capsys.readouterr().err


def test_a_missing_package_says_not_installed(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.split(".")[0] == "torchvision":
            raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    assert main(["--model", "torchvision:resnet18", "--pipeline", "prune50"]) == 2
    assert "needs torchvision, which is not installed" in capsys.readouterr().err


def test_a_task_whose_package_is_missing_says_not_installed(monkeypatch, capsys):
    from benchmarks import tasks

    def missing(self):
        raise ModuleNotFoundError("No module named 'torchcrepe'", name="torchcrepe")

    monkeypatch.setattr(tasks.CrepeTask, "_load", missing)
    assert main(["--model", "crepe", "--pipeline", "int8"]) == 2
    assert "crepe needs torchcrepe, which is not installed" in capsys.readouterr().err


class _TinyTask:
    """A Task look-alike small enough to measure in a second."""

    name, headline = "tiny", "cosine"

    def __init__(self):
        torch.manual_seed(0)
        self._model, self._x = torch.nn.Linear(8, 16).eval(), (torch.randn(2, 8),)

    def model(self):
        return self._model

    def example_inputs(self):
        return self._x

    def calibration(self):
        return [self._x]

    def fidelity(self, run):
        with torch.no_grad():
            return adhoc.agreement([self._model(*self._x)], [run(*self._x)])


def test_a_pipeline_that_fails_is_a_row_with_its_error():
    specs = adhoc.plan(["dce", "int8"], "int8")            # dce leaves nothing for the int8 backend
    assert [s["calibrate"] for s in specs] == [False, True]
    rows = adhoc.measure_rows(_TinyTask(), specs, 10, log=lambda _: None)
    baseline, failed, int8 = rows
    assert "no fake quantizers" in failed["error"] and "latency" not in failed
    assert baseline["speedup"] == 1.0 and int8["fidelity"]["cosine"] > 0.9 and int8["latency"]["repeats"] == 10
    result = {"model": "tiny", "rows": rows, "task": {"headline": "cosine"}, "config": {"batch": 2, "threads": 2}}
    _, cells = plots.adhoc_table(result)
    assert cells[1][-2] == "failed"


def test_suite_plots_where_the_json_has_latency_and_fidelity(tmp_path):
    pytest.importorskip("matplotlib")
    lat = {"median_s": 0.02, "min_s": 0.018, "max_s": 0.03}
    quant = {"models": [{"name": "resnet18", "fp32": {"latency": lat},
                         "tools": {t: {"latency": lat, "agreement": {"cosine": 0.99, "top1": 0.9}}
                                   for t in ("fxopt", "torch.ao")}},
                        {"name": "broken", "error": "boom"}]}
    [png] = plots.plot_suite("quant", quant, tmp_path)
    assert png.name == "quant-latency-vs-fidelity.png" and png.read_bytes().startswith(b"\x89PNG")
    lowrank = {"models": [{"name": "vgg16", "kind": "vision",
                           "rows": [{"label": "dense", "latency": lat, "fidelity": {"random": {"cosine": 1.0}}}]}]}
    assert plots.plot_suite("lowrank", lowrank, tmp_path)[0].stat().st_size > 0
    assert plots.plot_suite("passes", {"models": []}, tmp_path) == []

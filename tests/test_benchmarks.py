"""The benchmark harness: a quick run of the `passes` suite and its helpers (no timing asserted)."""
import json

import pytest

from benchmarks import harness, models
from benchmarks.__main__ import main
from benchmarks.suites import passes


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


def test_measure_times_after_warmup_with_fresh_setup():
    made = []
    m = harness.measure(lambda state: state * 2, repeats=3, warmup=2, setup=lambda: made.append(1) or len(made))
    assert len(made) == 5 and m.repeats == 3 and m.warmup == 2
    assert m.last == 10
    assert m.min <= m.median <= m.max and m.spread >= 0
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

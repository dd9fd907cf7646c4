"""The `backends` benchmark suite: a quick run on the tiny BERT-like encoder (no timing asserted)."""
import json

import pytest

import fxopt
from benchmarks.__main__ import main
from benchmarks.suites import backends


def test_quick_backends_suite_on_tiny_bert(tmp_path):
    pytest.importorskip("transformers")
    missing = {b: fxopt.list_backends()[b].available() for b in backends.BACKENDS}
    if any(missing.values()):
        pytest.skip(f"backends not usable here: {missing}")
    assert main(["--suite", "backends", "--quick", "--models", "bert-tiny", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backends.json", "backends.md"]

    result = json.loads((tmp_path / "backends.json").read_text())
    assert result["suite"] == "backends" and result["config"]["quick"] is True
    assert result["config"]["pipeline"] == "fold-bn,canonicalize,dce"
    assert result["environment"]["load_avg_1m_start"] is not None
    assert set(result["config"]["process_warmup_s"]) == set(backends.BACKENDS)
    [record] = result["models"]
    assert record["name"] == "bert-tiny" and record["input"] == [[2, 16], [2, 16]]
    assert record["module"]["latency"]["repeats"] == 3
    assert [row["backend"] for row in record["rows"]] == ["eager", "inductor", "xla"]
    for row in record["rows"]:
        assert "error" not in row, row.get("error")
        assert row["ok"] and row["rel_diff"] < 1e-4, row
        assert row["rel_diff_graph"] is None if row["backend"] == "eager" else row["rel_diff_graph"] < 1e-4
        for key in ("compile", "compile_split", "latency", "latency_ratio", "latency_ratio_min", "compile_ratio"):
            assert row[key] is not None, key
        assert row["compile"]["median_s"] == pytest.approx(sum(row["compile_split"].values()))
        assert row["latency"]["repeats"] == 3
    eager, inductor, xla = record["rows"]
    assert eager["latency_ratio"] == eager["compile_ratio"] == 1.0
    assert inductor["backend_seconds"].keys() == {"compile"}
    assert {"export", "stablehlo", "compile"} <= xla["backend_seconds"].keys()

    md = (tmp_path / "backends.md").read_text()
    assert "## bert-tiny" in md and "| inductor |" in md and "| xla |" in md
    (tmp_path / "backends.md").unlink()
    assert main(["--suite", "backends", "--render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "backends.md").read_text() == md

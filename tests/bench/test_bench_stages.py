"""The `stages` benchmark suite: a quick run (tiny transformer, 1 process vs 2- and 4-process
pipelines under torchrun) writes its rows, and every pipeline's output equals one process's
(no timing asserted)."""
import json

from benchmarks.__main__ import main
from benchmarks.suites import stages


def test_quick_stages_suite(tmp_path):
    assert main(["--suite", "stages", "--quick", "--repeats", "2", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.json", "stages.md"]

    result = json.loads((tmp_path / "stages.json").read_text())
    cfg = result["config"]
    assert result["suite"] == "stages" and cfg["quick"] is True and cfg["steps"] == 2
    assert cfg["cores"] >= 1 and cfg["backend"] == "gloo" and cfg["processes"] == [2, 4]
    [record] = result["models"]
    assert "error" not in record, record.get("error")
    assert record["name"] == "transformer-tiny" and record["input"] == [8, 16, 64]
    assert record["microbatches"] == 4
    runs = record["runs"]
    assert [[r["processes"], r["threads"]] for r in runs] == [list(c) for c in cfg["configurations"]]
    assert [r["processes"] for r in runs][-2:] == [2, 4] and runs[0]["threads"] == cfg["cores"]
    for r in runs:
        assert "error" not in r, r.get("error")
        assert r["outputs_match"] is True, r
        assert r["steps"] == 2 and len(r["step_s"]) == 2 and r["batch"] == 8
        assert r["samples_per_s"] > 0 and r["ratio"] > 0 and len(r["busy_s"]) == r["processes"]
        assert r["total_threads"] == r["processes"] * r["threads"]
    reference = runs[0]
    assert reference["ratio"] == 1.0 and reference["max_abs_diff"] is None
    assert reference["max_abs_diff_vs_eager"] <= 1e-5
    for r in runs[1:]:
        assert r["max_abs_diff"] is not None and r["max_abs_diff"] <= stages.TOLERANCE
    for r in runs:
        if r["processes"] == 1:
            assert r["stages"] is None and r["sends_bytes_per_cut"] is None
            continue
        assert r["microbatches"] == 4 and len(r["stages"]["stages"]) == r["processes"]
        # one (2 x 16 x 64) float32 activation crosses every cut, per microbatch of 2
        assert r["sends_bytes_per_cut"] == [2 * 16 * 64 * 4] * (r["processes"] - 1)
        assert len(r["stage_macs"]) == r["processes"] and all(m > 0 for m in r["stage_macs"])
    two, four = runs[-2], runs[-1]
    assert sum(two["stage_macs"]) == sum(four["stage_macs"])

    md = (tmp_path / "stages.md").read_text()
    assert "## transformer-tiny" in md and "samples/s" in md and "MISMATCH" not in md
    (tmp_path / "stages.md").unlink()
    assert main(["--suite", "stages", "--render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "stages.md").read_text() == md

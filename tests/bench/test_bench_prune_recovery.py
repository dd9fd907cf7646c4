"""Suite prune-recovery end to end on a tiny CNN (untrained: no epoch; a few recovery steps): every
method prunes, matches fxopt-sensitivity's MACs, recovers and is scored; the files render."""
import json

import pytest
import torch.nn as nn

from benchmarks import digits32, plots
from benchmarks.suites import prune_recovery


def tiny_cnn(name: str) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def test_tiny_prune_recovery_run(tmp_path, monkeypatch):
    pytest.importorskip("torch_pruning")
    monkeypatch.setenv("FXOPT_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digits32, "model", tiny_cnn)
    setting = prune_recovery.Setting(targets=(0.5,), steps=3, sensitivity_batches=1, epochs=0, test_rows=64,
                                     tries=3)
    result = prune_recovery.run(models=["resnet18"], out_dir=tmp_path, log=lambda _: None, setting=setting)

    [record] = result["models"]
    assert record["trained_here"] and 0 <= record["unpruned"]["accuracy"] <= 1
    rows = {r["method"]: r for r in record["rows"]}
    assert list(rows) == list(prune_recovery.METHODS)
    for method, row in rows.items():
        assert "error" not in row, (method, row.get("error"))
        assert row["macs"] < record["unpruned"]["macs"] and row["recover_s"] > 0
        assert 0 <= row["after"]["agreement"] <= 1 and row["after"]["kl"] >= 0
    share = rows["fxopt-sensitivity"]["macs_share"]
    assert share == pytest.approx(0.5, rel=0.1)
    assert rows["tp-local"]["macs_share"] == pytest.approx(share, rel=0.1)   # bisection on a tiny model is coarse

    md = (tmp_path / "prune-recovery.md").read_text()
    assert "| fxopt-sensitivity |" in md and "## Findings" in md
    assert json.loads((tmp_path / "prune-recovery.json").read_text())["config"]["steps"] == 3
    [png] = plots.plot_suite("prune-recovery", result, tmp_path)
    assert png.name == "prune-recovery-accuracy-vs-macs.png" and png.stat().st_size > 0

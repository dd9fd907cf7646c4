"""Suite `equalize`: W8A8 fake-quant fidelity on depthwise nets before and after
cross-layer equalization (`equalize`) and bias correction (`bias-correct`).

Per model (torchvision, weights=None, eval; batch 8 at 96x96, 2 torch threads) and per
gamma spread sigma: every BatchNorm weight is drawn log-normal, exp(N(0, sigma)), so the
per-channel scales of the folded weights span decades as in trained nets (sigma 0.5: ~1.3
decades of gammas at +-3 sigma, sigma 1: ~2.6); then `with_realistic_statistics` gives
the BatchNorm statistics of random inputs and damps the residual branches (see
benchmarks.models). Each pipeline is compiled with calibration batches and compared with
the fp32 model on fresh batches: mean cosine of the logits and top-1 agreement.
The equalize row also gives the per-channel weight range spread (max/min per layer,
geometric mean over the equalized layers) before -> after, from report.equalize.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

import fxopt

from ..harness import bench_each, choose_models, environment, markdown_table, render_results, save_results
from ..models import with_realistic_statistics

NAME = "equalize"
BATCH = 8
THREADS = 2
SIZE = 96
QUICK_SIZE = 64
SPREADS = (0.5, 1.0)
PIPELINES = ("fold-bn,fake-quant", "fold-bn,fake-quant,bias-correct", "fold-bn,equalize,fake-quant",
             "fold-bn,equalize,fake-quant,bias-correct")
DEFAULT_MODELS = ("mobilenet_v2", "mnasnet0_5")
QUICK_MODELS = ("mobilenet_v2",)
MODELS = DEFAULT_MODELS


def build(name: str, spread: float, size: int, calib_n: int, check_n: int):
    """The model with log-normal BatchNorm gammas and realistic statistics; calibration and check batches."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.exp(torch.randn(m.num_features) * spread)
    model = with_realistic_statistics(model, [torch.randn(BATCH, 3, size, size) for _ in range(4)])
    calib = [torch.randn(BATCH, 3, size, size) for _ in range(calib_n)]
    check = [torch.randn(BATCH, 3, size, size) for _ in range(check_n)]
    return model, calib, check


def bench_variant(name: str, spread: float, quick: bool, log) -> dict:
    size = QUICK_SIZE if quick else SIZE
    model, calib, check = build(name, spread, size, 2 if quick else 4, 2 if quick else 4)
    with torch.no_grad():
        ref = torch.cat([model(x) for x in check])
    rows = []
    for pipeline in PIPELINES:
        start = time.perf_counter()
        cm = fxopt.compile(model, (calib[0],), pipeline=pipeline, calibration=calib, verify=False)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            got = torch.cat([cm(x) for x in check])
        row = {"pipeline": pipeline, "compile_s": seconds,
               "cosine": float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean()),
               "top1": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}
        eq = cm.report.sections.get("equalize")
        if eq is not None:
            row.update(pairs=len(eq.pairs), rounds=eq.rounds, spread_before=eq.typical(0),
                       spread_after=eq.typical(1), worst_before=eq.worst(0), worst_after=eq.worst(1))
        log(f"  {name} sigma={spread} {pipeline}: cosine {row['cosine']:.5f}, top-1 {row['top1']:.3f}")
        rows.append(row)
    return {"model": name, "spread": spread, "samples": len(ref), "rows": rows}


def bench_model(name: str, quick: bool, log) -> dict:
    return {"model": name, "variants": [bench_variant(name, s, quick, log) for s in SPREADS]}


def to_markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"# Suite `{NAME}`", "",
             f"W8A8 fake-quant (per-channel weights, min/max observers) against fp32 on {c['size']}x{c['size']} "
             f"random inputs, batch {c['batch']}; BatchNorm gammas exp(N(0, sigma)). "
             "Spread: per-channel weight range max/min per layer, geometric mean over the equalized layers.", ""]
    rows = []
    for record in result["models"]:
        for v in record.get("variants", []):
            for r in v["rows"]:
                spread = (f"{r['spread_before']:.3g} -> {r['spread_after']:.3g}" if "spread_before" in r else "")
                rows.append([v["model"], v["spread"], r["pipeline"], f"{r['cosine']:.5f}", f"{r['top1']:.3f}",
                             spread, f"{r['compile_s']:.1f} s"])
    lines.append(markdown_table(["model", "sigma", "pipeline", "cosine vs fp32", "top-1 vs fp32", "spread",
                                 "compile"], rows, "llllrlr"))
    return "\n".join(lines) + "\n"


def render(out_dir=None):
    return render_results(NAME, to_markdown, out_dir)


def run(models=None, repeats: int | None = None, quick: bool = False, out_dir=None, log=print) -> dict:
    """Run the suite; writes equalize.json and equalize.md into `out_dir` (default results/)."""
    start = time.perf_counter()
    names = choose_models(models, quick, DEFAULT_MODELS, QUICK_MODELS, MODELS)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        records = bench_each(names, lambda name: bench_model(name, quick, log), log)
    finally:
        torch.set_num_threads(threads)
    result = {"suite": NAME, "environment": environment(),
              "config": {"models": list(names), "pipelines": list(PIPELINES), "spreads": list(SPREADS),
                         "batch": BATCH, "threads": THREADS, "size": QUICK_SIZE if quick else SIZE, "quick": quick},
              "models": records, "wall_s": time.perf_counter() - start}
    return save_results(NAME, result, to_markdown, out_dir)

"""Suite `quant`: fxopt's int8 backend next to torch.ao's FX graph mode, same models, one run.

Per model (torchvision, weights=None, eval; batch 8 at 224x224, 2 torch threads):

  convert   prepare + calibrate + convert, each tool on the same calibration batches.
            fxopt: `fxopt.compile(model, x, pipeline="fold-bn,fake-quant",
            backend="int8", calibration=batches)` (trace, passes, calibration, freeze,
            lowering; verification off). torch.ao: `prepare_fx(copy,
            get_default_qconfig_mapping("x86"), x)`, the batches, `convert_fx` (the
            deep copy, which prepare_fx needs as it mutates, is made untimed).
  latency   fp32 eager, fxopt int8 and torch.ao int8 at batch 8, interleaved
            (round-robin, order rotating each round), median of the runs.
  agreement each int8 model against fp32 on fresh random batches: top-1 agreement
            and mean cosine of the logits.

Random weights as torchvision initialises them make vanishing activations and a
chaotic mobilenet_v2, so every model first gets BatchNorm statistics from random
inputs and damped residual branches (`benchmarks.models.with_realistic_statistics`
says why). Both tools quantize that same model.
Both use the x86 quantized engine (torch.ao's default here, and the one fxopt
picks). fxopt observes with min/max; torch.ao's x86 mapping uses histogram
observers for activations: the agreement columns show what each choice gives.
"""
from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import dataclass

import torch

import fxopt

from ..harness import (bench_each, choose_models, environment, fmt_seconds, interleaved, markdown_table,
                       render_results, save_results)
from ..models import with_realistic_statistics

NAME = "quant"
PIPELINE = "fold-bn,fake-quant"
BATCH = 8
THREADS = 2
SIZE = 224
QUICK_SIZE = 64
DEFAULT_MODELS = ("resnet50", "mobilenet_v2")
QUICK_MODELS = ("resnet18",)
MODELS = DEFAULT_MODELS + QUICK_MODELS
TOOLS = ("fxopt", "torch.ao")


@dataclass(frozen=True)
class Plan:
    """How many calibration / agreement batches, convert repeats and latency runs."""

    calib: int
    check: int
    repeats: int
    latency_runs: int
    latency_warmup: int


def plan(repeats: int | None, quick: bool) -> Plan:
    if quick:
        return Plan(2, 2, repeats or 1, 3, 1)
    return Plan(8, 4, repeats or 2, 15, 2)


def build(name: str, quick: bool, p: Plan):
    """Model `name` made numerically realistic (`with_realistic_statistics`); calibration and check batches."""
    import torchvision

    size = QUICK_SIZE if quick else SIZE
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    model = with_realistic_statistics(model, [torch.randn(BATCH, 3, size, size) for _ in range(4)])
    calib = [torch.randn(BATCH, 3, size, size) for _ in range(p.calib)]
    check = [torch.randn(BATCH, 3, size, size) for _ in range(p.check)]
    return model, calib, check


def fxopt_convert(model, calib):
    return fxopt.compile(model, (calib[0],), pipeline=PIPELINE, backend="int8", calibration=calib,
                         instruments=(), verify=False)


def torch_ao_convert(model, calib):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():   # torch.ao's own deprecation notes about its observers
        warnings.simplefilter("ignore", UserWarning)
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (calib[0],))
    with torch.no_grad():
        for x in calib:
            prepared(x)
    return convert_fx(prepared)


def agreement(reference, candidate, batches) -> dict:
    """Top-1 agreement and mean cosine of `candidate`'s logits against `reference`'s."""
    with torch.no_grad():
        ref = torch.cat([reference(x) for x in batches])
        got = torch.cat([candidate(x) for x in batches])
    return {"top1": (ref.argmax(1) == got.argmax(1)).float().mean().item(),
            "cosine": torch.nn.functional.cosine_similarity(ref, got).mean().item(),
            "samples": len(ref)}


def bench_model(name: str, p: Plan, quick: bool, log) -> dict:
    model, calib, check = build(name, quick, p)
    converters = {"fxopt": fxopt_convert, "torch.ao": torch_ao_convert}
    stages = {tool: ((lambda state, f=fn: f(state, calib)), (lambda: copy.deepcopy(model)))
              for tool, fn in converters.items()}
    times = interleaved(stages, p.repeats, 0)
    converted = {tool: fn(copy.deepcopy(model), calib) for tool, fn in converters.items()}
    record = {"name": name, "input": list(calib[0].shape), "tools": {}}
    x = check[0]
    runs = {"fp32": model, **converted}
    with torch.no_grad():
        latency = interleaved({k: ((lambda _, m=m: m(x)), None) for k, m in runs.items()},
                              p.latency_runs, p.latency_warmup)
    record["fp32"] = {"latency": latency["fp32"].to_dict()}
    for tool in TOOLS:
        record["tools"][tool] = {
            "convert": times[tool].to_dict(), "latency": latency[tool].to_dict(),
            "speedup": latency["fp32"].median / latency[tool].median,
            "agreement": agreement(model, converted[tool], check)}
        log(f"  {tool}: convert {fmt_seconds(times[tool].median)}, latency "
            f"{fmt_seconds(latency[tool].median)} ({record['tools'][tool]['speedup']:.2f}x fp32)")
    report = fxopt.backends.int8.int8_report(converted["fxopt"])
    record["fxopt_int8"] = {"int8_ops": len(report.int8_ops), "float_ops": report.float_ops,
                            "kernels": report.kernels(), "engine": report.engine}
    record["between_tools"] = agreement(converted["torch.ao"], converted["fxopt"], check)
    fx, ao = record["tools"]["fxopt"], record["tools"]["torch.ao"]
    record["latency_ratio"] = ao["latency"]["median_s"] / fx["latency"]["median_s"]   # >1: fxopt faster
    record["convert_ratio"] = ao["convert"]["median_s"] / fx["convert"]["median_s"]
    return record


def _row(r: dict) -> list:
    fx, ao = r["tools"]["fxopt"], r["tools"]["torch.ao"]
    return [r["name"], fmt_seconds(r["fp32"]["latency"]["median_s"]),
            fmt_seconds(fx["latency"]["median_s"]), fmt_seconds(ao["latency"]["median_s"]),
            f"{fx['speedup']:.2f}x", f"{ao['speedup']:.2f}x", f"**{r['latency_ratio']:.2f}**",
            fmt_seconds(fx["convert"]["median_s"]), fmt_seconds(ao["convert"]["median_s"]),
            f"{r['convert_ratio']:.2f}"]


def _agree_row(r: dict) -> list:
    fx, ao = r["tools"]["fxopt"]["agreement"], r["tools"]["torch.ao"]["agreement"]
    b = r["between_tools"]
    return [r["name"], fx["samples"], f"{fx['top1']:.1%}", f"{fx['cosine']:.4f}", f"{ao['top1']:.1%}",
            f"{ao['cosine']:.4f}", f"{b['top1']:.1%}", f"{b['cosine']:.4f}"]


def to_markdown(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    ok = [r for r in result["models"] if "error" not in r]
    lines = [f"# Suite `{NAME}`: fxopt int8 vs torch.ao FX (prepare_fx / convert_fx, x86)", "",
             f"{env['date']} · torch {env['torch']} · Python {env['python']} · fxopt {env['fxopt']} · "
             f"{env['cpu_model']} ({env['cpu_count']} CPUs) · {cfg['threads']} threads · batch {cfg['batch']} · "
             f"{cfg['latency_runs']} interleaved latency runs (+{cfg['latency_warmup']} warm-up), median · "
             f"{cfg['calib_batches']} calibration batches · wall {result['wall_s']:.0f} s", "",
             "## Latency and conversion time", "",
             "ratio = torch.ao int8 latency / fxopt int8 latency (above 1: fxopt is faster); "
             "convert = prepare + calibrate + convert.", "",
             markdown_table(["model", "fp32", "fxopt int8", "torch.ao int8", "fxopt vs fp32", "torch.ao vs fp32",
                             "ratio ao/fxopt", "fxopt convert", "torch.ao convert", "ratio ao/fxopt"],
                            [_row(r) for r in ok], "lrrrrrrrrr"), "",
             "## Agreement (random inputs)", "",
             markdown_table(["model", "samples", "fxopt top-1 vs fp32", "fxopt cosine", "torch.ao top-1 vs fp32",
                             "torch.ao cosine", "fxopt vs torch.ao top-1", "cosine"],
                            [_agree_row(r) for r in ok], "lrrrrrrr"), "",
             "## What fxopt left in float", ""]
    for r in ok:
        info = r["fxopt_int8"]
        kernels = ", ".join(f"{k} x{n}" for k, n in sorted(info["kernels"].items()))
        floats = "; ".join(f"{n} ({why})" for n, why in info["float_ops"]) or "nothing"
        lines.append(f"- {r['name']}: {info['int8_ops']} int8 ops ({kernels}); float: {floats}")
    lines += [f"- {r['name']}: not measured: `{r['error']}`" for r in result["models"] if "error" in r]
    return "\n".join(lines)


def render(out_dir=None):
    return render_results(NAME, to_markdown, out_dir)


def run(models=None, repeats: int | None = None, quick: bool = False, out_dir=None, log=print) -> dict:
    """Run the suite; writes quant.json and quant.md into `out_dir` (default results/)."""
    start = time.perf_counter()
    names = choose_models(models, quick, DEFAULT_MODELS, QUICK_MODELS, MODELS)
    p = plan(repeats, quick)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    threads, engine = torch.get_num_threads(), torch.backends.quantized.engine
    torch.set_num_threads(THREADS)
    torch.backends.quantized.engine = fxopt.backends.int8.pick_engine()
    try:
        records = bench_each(names, lambda name: bench_model(name, p, quick, log), log)
        env = {**environment(), "load_avg_1m_start": load_start,
               "quantized_engine": torch.backends.quantized.engine}
    finally:
        torch.set_num_threads(threads)
        torch.backends.quantized.engine = engine
    result = {"suite": NAME, "environment": env,
              "config": {"models": list(names), "pipeline": PIPELINE, "batch": BATCH, "threads": THREADS,
                         "size": QUICK_SIZE if quick else SIZE, "calib_batches": p.calib,
                         "check_batches": p.check, "repeats": p.repeats, "latency_runs": p.latency_runs,
                         "latency_warmup": p.latency_warmup, "quick": quick},
              "models": records, "wall_s": time.perf_counter() - start}
    return save_results(NAME, result, to_markdown, out_dir)

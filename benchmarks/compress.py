"""`fxopt compress TASK`: fxopt.compress on a real task, beside fp32 and the plain presets.

    fxopt compress crepe --target speedup=5 --max-drop 0.01 --compare prune50+int8 --compare int8

The task (benchmarks.tasks: crepe, minilm, digits) gives the model with its real weights, the
training batches compress recovers with (`task.train_data()`) and the metric it must keep:
the task's headline (rpa, cosine, accuracy) on a validation set (`task.validation()`: tones of
another seed, corpus sentences after the training ones, the last training batches of digits),
so the held-out test set the table reports is never seen by the search.
After compress returns, the fp32 module, every --compare preset and the compressed model are
measured side by side as the ad-hoc mode measures them (benchmarks/adhoc.py: interleaved
latency, model bytes, fidelity), and written to <out>/<task>-compress.json / .md, with the
candidates' Pareto plot <task>-compress-front.png.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

import fxopt

from . import adhoc
from .harness import RESULTS_DIR, environment, markdown_table, write_json, write_text
from .tasks import get_task

__all__ = ["run"]


def run(name: str, target: dict, max_drop: float = 0.01, compare=(), out_dir=None, **options) -> dict:
    """Compress task `name` to `target`, measure it beside fp32 and `compare` presets, write the files.
    `options` go to fxopt.compress (backend, steps, time_budget)."""
    task = get_task(name)
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    threads = torch.get_num_threads()
    torch.set_num_threads(adhoc.THREADS)
    try:
        print(task.describe(), flush=True)
        start = time.perf_counter()
        cm = fxopt.compress(task.model(), task.example_inputs(), data=task.train_data(),
                            metric=_named(task.validation(), task.headline), target=target, max_drop=max_drop, progress=True, **options)
        seconds = time.perf_counter() - start
        report = cm.report.compress
        print(report, flush=True)
        rows = adhoc.measure_rows(task, adhoc.plan(list(compare), None), adhoc.RUNS, print,
                                  built={"compressed": (cm, seconds, report.best.pipeline)})
        env = environment()
    finally:
        torch.set_num_threads(threads)
    result = {"mode": "compress", "task": name, "headline": task.headline, "description": task.describe(),
              "target": target, "max_drop": max_drop, "options": options, "compress_s": seconds,
              "environment": env, "rows": rows, "compress": report.to_dict()}
    out.mkdir(parents=True, exist_ok=True)
    report.plot(out / f"{name}-compress-front.png")
    write_json(out / f"{name}-compress.json", result)
    write_text(out / f"{name}-compress.md", markdown(result))
    return result


def _named(metric, name: str):
    def named(model) -> float:
        return metric(model)

    named.__name__ = f"{name} (validation)"
    return named


def markdown(result: dict) -> str:
    """The side-by-side table and the candidates compress tried."""
    head = result["headline"]
    rows = [[r["label"], r.get("backend", ""), f"{r.get('speedup', float('nan')):.2f}x",
             f"{r.get('size_ratio') or float('nan'):.2f}x", f"{r.get('headline', float('nan')):.4f}",
             f"{r['compile_s']:.0f} s" if r.get("compile_s") else "-"] for r in result["rows"] if "error" not in r]
    table = markdown_table(["row", "backend", "speedup", "size ratio (fp32 / row)", head, "compile / compress"], rows)
    c = result["compress"]
    cands = [[i, x["stage"], f"{x['speedup']:.2f}x", f"{x['size']:.3f}", f"{x['macs']:.3f}", f"{x['score']:.4f}",
              ("**returned**" if i == c["chosen"] else ("accepted" if x["accepted"] else "")), f"`{x['pipeline']}`"]
             for i, x in enumerate(c["candidates"])]
    return "\n\n".join([
        f"# compress: `{result['task']}`, target {result['target']}, max drop {result['max_drop']}",
        result["description"],
        table,
        f"Compression took {result['compress_s']:.0f} s ({result['environment'].get('cpu_model', '')}, {result['environment'].get('cpu_count', '')} CPUs).",
        "Candidates (speed-up measured on the backend against fp32, interleaved; size and MACs as shares of fp32):",
        markdown_table(["#", "stage", "speedup", "size", "MACs", head, "", "pipeline"], cands),
        *(f"Note: {n}" for n in c["notes"]),
        f"Method: `fxopt compress {result['task']} --target {_target(result['target'])} --max-drop "
        f"{result['max_drop']}`; see benchmarks/compress.py.",
    ]) + "\n"


def _target(target: dict) -> str:
    return ",".join(f"{k}={v:g}" for k, v in target.items())

"""Suite `compress`: fxopt.compress on the three real tasks, against the issue's goals.

Per task, `benchmarks.compress.run` (what `fxopt compress TASK` runs): compress with the
task's training batches (`task.train_data()`, never the held-out set) and its headline
fidelity on the held-out set as the metric, then the fp32 module, the plain presets and the
compressed model measured side by side (interleaved latency on 2 threads, model bytes,
every fidelity figure). Written per task as <task>-compress.json / .md / -front.png, and here
as one table with each goal and whether it was met.

  digits  target speedup 3, max drop 0.005 of accuracy (0.5 points).
  crepe   target speedup 5, max drop 0.01 of raw pitch accuracy (goal: rpa >= 0.97).
  minilm  target speedup 5, max drop 0.03 of mean cosine to fp32 (goal: cosine >= 0.97 and
          pair-ranking Spearman >= 0.97).
"""
from __future__ import annotations

import time

import fxopt

from ..harness import choose_models, environment, markdown_table, render_results, save_results

NAME = "compress"
# task: (target, max_drop, steps, compare presets, goals {fidelity key: lowest value}, goal speed-up)
PLANS = {
    "digits": ({"speedup": 3.0}, 0.005, 300, ("int8", "prune50+int8"), {}, 3.0),
    "crepe": ({"speedup": 5.0}, 0.01, 150, ("int8", "prune25+int8", "prune50+int8"), {"rpa": 0.97}, 5.0),
    "minilm": ({"speedup": 5.0}, 0.03, 200, ("int8",), {"cosine": 0.97, "ranking": 0.97}, 5.0),
}
DEFAULT = ("digits", "crepe", "minilm")


def run(models=None, repeats=None, quick=False, out_dir=None, log=print) -> dict:
    from .. import compress

    start = time.perf_counter()
    names = choose_models(models, quick, DEFAULT, ("digits",), PLANS)
    rows = []
    for name in names:
        target, max_drop, steps, compare, goals, speed = PLANS[name]
        log(f"-- {name}: target {target}, max drop {max_drop}")
        try:
            result = compress.run(name, target, max_drop, compare, out_dir, steps=steps, time_budget=540)
        except fxopt.FxoptError as exc:   # no candidate kept the score: a result, stated
            log(f"   {name}: {str(exc).splitlines()[0]}")
            rows.append({"task": name, "error": str(exc), "target": target, "max_drop": max_drop})
            continue
        rows.append(_summary(name, result, goals, speed))
    out = {"suite": NAME, "environment": environment(), "rows": rows, "wall_s": time.perf_counter() - start}
    return save_results(NAME, out, to_markdown, out_dir)


def _summary(name: str, result: dict, goals: dict, speed: float) -> dict:
    by_label = {r["label"]: r for r in result["rows"]}
    base, mine = by_label["baseline"], by_label["compressed"]
    fidelity = mine.get("fidelity", {})
    met = {key: fidelity.get(key, float("nan")) >= low for key, low in goals.items()}
    met["speedup"] = mine.get("speedup", 0.0) >= speed
    if name == "digits":
        met["accuracy"] = base["headline"] - mine["headline"] <= 0.005
    return {"task": name, "pipeline": mine.get("pipeline"), "speedup": mine.get("speedup"),
            "size_ratio": mine.get("size_ratio"), "fidelity": fidelity, "fp32": base.get("fidelity", {}),
            "compress_s": result["compress_s"], "goals": {k: v for k, v in goals.items()},
            "goal_speedup": speed, "met": met, "candidates": len(result["compress"]["candidates"]),
            "presets": {r["label"]: {"speedup": r.get("speedup"), "fidelity": r.get("fidelity")}
                        for r in result["rows"] if r["label"] not in ("baseline", "compressed")}}


def to_markdown(result: dict) -> str:
    rows, failed = [], []
    for r in result["rows"]:
        if "error" in r:
            failed.append(f"**{r['task']}** (target {r['target']}, max drop {r['max_drop']}): no model found.\n\n"
                          f"```\n{r['error']}\n```")
            continue
        fid = ", ".join(f"{k} {v:.4g}" for k, v in r["fidelity"].items())
        fp32 = ", ".join(f"{k} {v:.4g}" for k, v in r["fp32"].items())
        met = ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in r["met"].items())
        rows.append([r["task"], f"{r['speedup']:.2f}x", f"{r['size_ratio']:.2f}x", fid, fp32,
                     f"{r['compress_s']:.0f} s", r["candidates"], met, f"`{r['pipeline']}`"])
    table = markdown_table(["task", "speedup", "smaller", "fidelity", "fp32", "compress time", "candidates",
                            "goals", "pipeline"], rows)
    env = result["environment"]
    return "\n\n".join([
        "# Suite `compress`: fxopt.compress on real tasks",
        f"{env.get('date', '')} · torch {env.get('torch', '')} · {env.get('cpu_model', '')} "
        f"({env.get('cpu_count', '')} CPUs) · wall {result['wall_s']:.0f} s",
        table,
        *failed,
        "Speed-up and size against the fp32 nn.Module, measured side by side in the same run (see each "
        "`<task>-compress.md` for every row, the presets beside it and every candidate compress tried).",
        "Method: `python -m benchmarks --suite compress`; one task: `fxopt compress TASK --target speedup=S`.",
    ]) + "\n"


def render(out_dir=None):
    return render_results(NAME, to_markdown, out_dir)

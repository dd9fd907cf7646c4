"""What a result JSON looks like to a reader: matplotlib figures, and the ad-hoc mode's table.

Everything here reads only a result dict (as written to JSON), never a model, so
`python -m benchmarks ... --render` rebuilds the same Markdown and figures from the JSON
alone, e.g. after a change of layout, without measuring again.

- `plot_adhoc(result, out, name)`: `<name>-latency-vs-fidelity.png` (one point per row:
  median latency with a min-max bar against the task's headline metric, so what a pipeline
  costs in fidelity and buys in speed is one glance) and `<name>-layer-cost.png` (MACs of
  the TOP_LAYERS costliest layers, baseline next to each compressed graph: where the MACs
  went).
- `plot_suite(name, result, out)`: latency vs fidelity per pipeline for the suites whose
  JSON holds both (quant, lowrank, fpga); [] for the others (passes, prune, prune-zoo and
  backends measure no fidelity).
- `adhoc_table(result)` / `adhoc_markdown(result)`: the ad-hoc before/after table.

matplotlib runs on its Agg backend (no display needed) through Figure objects, never
pyplot's global state; a figure is written to a temporary name and renamed, as the
harness writes JSON, so a killed run leaves no half-written PNG.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

from fxopt.util.files import write_atomically

from .harness import fmt_seconds, markdown_table

TOP_LAYERS = 12
LATENCY = "latency, ms (median; bar: min-max)"


# ---- figures --------------------------------------------------------------------------------

def _figure(panels: int = 1, size=(6.4, 4.4)):
    """A Figure with `panels` axes, up to 3 a row, unused cells hidden (Agg backend: no display)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _save(fig, path: Path) -> Path:
    """Render to memory, then write via a temporary name and a rename (never half a PNG)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return Path(write_atomically(path, buf.getvalue()))


def latency_vs_fidelity(panels: dict, path: Path, ylabel: str, title: str, xlabel: str = LATENCY) -> Path:
    """One panel per key of `panels`: points {label, median_s, min_s, max_s, fidelity}, latency
    on a log axis (rows differ by factors) with the min-max spread as a bar."""
    fig, axes = _figure(max(1, len(panels)))
    for ax, (panel, points) in zip(axes, panels.items()):
        for i, p in enumerate(points):
            err = [[max(p["median_s"] - p["min_s"], 0) * 1e3], [max(p["max_s"] - p["median_s"], 0) * 1e3]]
            ax.errorbar(p["median_s"] * 1e3, p["fidelity"], xerr=err, fmt="o", capsize=3, color=f"C{i % 10}",
                        label=_clip(p["label"]))
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(_clip(panel), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(_clip(title, 90), fontsize=11)
    return _save(fig, path)


def layer_cost(result: dict, path: Path, top: int = TOP_LAYERS) -> Path:
    """Grouped horizontal bars: MACs of the `top` costliest layers (by the largest of any row),
    baseline first; a layer a pipeline removed or renamed shows no bar for that row."""
    rows = [r for r in result["rows"] if "error" not in r and r.get("layers")]
    peak: dict = {}
    for r in rows:
        for name, cost in r["layers"].items():
            peak[name] = max(peak.get(name, 0), cost["macs"])
    names = sorted(peak, key=peak.get, reverse=True)[:top][::-1]
    fig, (ax,) = _figure(1, (9.0, max(3.0, 0.45 * len(names) * max(1, len(rows)) ** 0.5 + 1.5)))
    height = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        ys = [y + ((len(rows) - 1) / 2 - i) * height for y in range(len(names))]   # baseline on top
        ax.barh(ys, [r["layers"].get(n, {}).get("macs", 0) / 1e6 for n in names], height=height,
                label=_clip(r["label"]), color=f"C{i % 10}")
    ax.set_yticks(range(len(names)), _short(names), fontsize=7)
    ax.set_xlabel("MACs per forward (millions, whole batch)")
    ax.set_title(f"{_clip(result['model'])}: top {len(names)} layers by MACs", fontsize=11)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def _clip(text: str, width: int = 60) -> str:
    """Titles stay on the figure: a long --model spec (transformers overrides) is cut."""
    return text if len(text) <= width else text[:width - 1] + "…"


def _short(names: list[str], width: int = 44) -> list[str]:
    """Layer paths without the prefix they all share (encoder.layer.), cut from the left."""
    parts = [n.split(".") for n in names]
    common = len(os.path.commonprefix(parts)) if len(parts) > 1 else 0
    out = [".".join(p[min(common, len(p) - 1):]) for p in parts]
    return [n if len(n) <= width else "…" + n[1 - width:] for n in out]


def _point(label: str, latency: dict, fidelity) -> dict:
    """One marker from a Measurement dict; a lone median (fpga's throughput) gets no spread bar."""
    return {"label": label, "median_s": latency["median_s"], "min_s": latency.get("min_s", latency["median_s"]),
            "max_s": latency.get("max_s", latency["median_s"]), "fidelity": fidelity}


def plot_adhoc(result: dict, out: Path, name: str) -> list[Path]:
    """The ad-hoc mode's two figures, into `out`."""
    headline = result["task"]["headline"]
    points = [_point(r["label"], r["latency"], r["headline"]) for r in result["rows"]
              if "error" not in r and r.get("headline") is not None and "latency" in r]
    return [latency_vs_fidelity({result["model"]: points}, Path(out) / f"{name}-latency-vs-fidelity.png",
                                headline, f"latency vs {headline}, batch {result['config']['batch']}, "
                                          f"{result['config']['threads']} threads"),
            layer_cost(result, Path(out) / f"{name}-layer-cost.png")]


# ---- suites ---------------------------------------------------------------------------------

def _quant(result: dict) -> tuple[dict, str, str]:
    """Per model: fp32, fxopt int8 and torch.ao int8; cosine, as top-1 on random inputs is noisy."""
    panels = {}
    for m in (m for m in result["models"] if "error" not in m):
        panels[m["name"]] = [_point("fp32", m["fp32"]["latency"], 1.0)] + [
            _point(f"{tool} int8", t["latency"], t["agreement"]["cosine"]) for tool, t in m["tools"].items()]
    return panels, "cosine of logits vs fp32", LATENCY


def _lowrank(result: dict) -> tuple[dict, str, str]:
    """Per model: every low-rank row; held-out sentences for MiniLM, random images for vision."""
    panels = {}
    for m in (m for m in result["models"] if "error" not in m):
        key = "held_out" if m.get("kind") == "text" else "random"
        panels[m["name"]] = [_point(r["label"], r["latency"], r["fidelity"][key]["cosine"]) for r in m["rows"]]
    return panels, "cosine vs dense (held-out / random inputs)", LATENCY


def _fpga(result: dict) -> tuple[dict, str, str]:
    """Per model: every variant; latency is the simulator's seconds per sample (no spread kept)."""
    panels: dict = {}
    for r in (r for r in result["models"] if "error" not in r):
        per_sample = 1.0 / r["sim_samples_per_s"]
        panels.setdefault(r["model"], []).append(_point(r["variant"], {"median_s": per_sample}, r["acc_int8"]))
    return panels, "int8 accuracy (simulated)", "simulated ms per sample"


def _prune_sparsity(result: dict) -> tuple[dict, str, str]:
    """The prune suite's prune-weights rows (digits CNN, MiniLM): fidelity against latency."""
    panels = {}
    for m in (m for m in result["models"] if m.get("kind") == "sparsity"):
        panels[m["name"]] = [_point(r["label"], r["latency"], r["fidelity"]) for r in m["rows"]]
    return panels, "fidelity (test accuracy / embedding cosine)", LATENCY


SUITE_POINTS = {"quant": _quant, "lowrank": _lowrank, "fpga": _fpga, "prune": _prune_sparsity}


def bars(panels: dict, path: Path, xlabel: str, title: str) -> Path:
    """One panel per key: horizontal bars {label: value} on a linear axis from 0 (a bar's
    length is its value), e.g. latency per variant."""
    fig, axes = _figure(max(1, len(panels)))
    for ax, (panel, values) in zip(axes, panels.items()):
        labels = list(values)[::-1]
        ax.barh(range(len(labels)), [values[k] for k in labels], color=[f"C{i % 10}" for i in range(len(labels))])
        ax.set_yticks(range(len(labels)), [_clip(k, 28) for k in labels], fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_title(_clip(panel), fontsize=10)
        ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.suptitle(_clip(title, 90), fontsize=11)
    return _save(fig, path)


def _backends_bars(result: dict) -> tuple[dict, str]:
    panels = {}
    for m in (m for m in result["models"] if "error" not in m):
        rows = m["rows"] + m.get("variants", [])
        panels[m["name"]] = {r["backend"]: r["latency"]["median_s"] * 1e3 for r in rows if r.get("latency")}
    return panels, "CPU latency, ms (median)"


def _prune_bars(result: dict) -> tuple[dict, str]:
    panels = {}
    timed = (m for m in result["models"] if "error" not in m and "unpruned" in m)   # not the memory-only rows
    for m in timed:
        values = {"unpruned": m["unpruned"]["latency"]["median_s"] * 1e3}
        values.update({tool: t["latency"]["median_s"] * 1e3 for tool, t in m["tools"].items() if t.get("ok")})
        panels[m["name"]] = values
    return panels, "CPU latency, ms (median): unpruned vs each tool at ratio 0.5"


def _passes_bars(result: dict) -> tuple[dict, str]:
    panels = {}
    for m in result["models"]:
        if "error" not in m:
            panels[f"{m['name']} ({m['nodes']} nodes)"] = {k: v["median_s"] * 1e3 for k, v in m["stages"].items()}
    return panels, "seconds per stage, ms (median)"


def _prune_zoo_bars(result: dict) -> tuple[dict, str]:
    values = {m["model"]: m["macs_before"] / m["macs_after"] for m in result["models"]
              if m.get("macs_after")}
    return {"MACs before / after prune-channels": values}, "MACs ratio (before / after)"


def _stages_bars(result: dict) -> tuple[dict, str]:
    panels = {}
    for m in (m for m in result["models"] if "error" not in m):
        panels[m["name"]] = {f"{r['processes']} proc x {r['threads']} thr": r["samples_per_s"]
                             for r in m["runs"] if r.get("samples_per_s")}
    return panels, "throughput, samples / s"


def series(panels: dict, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """One panel per key: one line per series {label: [(x, y), ...]} (sorted by x), e.g. the
    accuracy each method keeps against the MACs it keeps."""
    fig, axes = _figure(max(1, len(panels)))
    for ax, (panel, lines) in zip(axes, panels.items()):
        for i, (label, points) in enumerate(lines.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, "o-", color=f"C{i % 10}", label=_clip(label, 28))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(_clip(panel), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(_clip(title, 90), fontsize=11)
    return _save(fig, path)


def _prune_recovery_series(result: dict) -> dict:
    """Test accuracy after recovery against the MACs kept, one line per method, one panel per model."""
    panels = {}
    for m in (m for m in result["models"] if "error" not in m):
        lines = panels.setdefault(f"{m['name']} (unpruned {100 * m['unpruned']['accuracy']:.1f}%)", {})
        for r in (r for r in m["rows"] if "error" not in r):
            lines.setdefault(r["method"], []).append((r["macs_share"], 100 * r["after"]["accuracy"]))
    return panels


SUITE_BARS = {"stages": _stages_bars, "backends": _backends_bars, "prune": _prune_bars, "passes": _passes_bars,
              "prune-zoo": _prune_zoo_bars}


def plot_suite(name: str, result: dict, out) -> list[Path]:
    """A suite's plots: `<name>-latency-vs-fidelity.png` where its JSON has latency and fidelity,
    `<name>-bars.png` (latency or cost per variant) where it has a bar view."""
    written = []
    if name in SUITE_POINTS:
        panels, ylabel, xlabel = SUITE_POINTS[name](result)
        panels = {k: v for k, v in panels.items() if v}
        if panels:
            written.append(latency_vs_fidelity(panels, Path(out) / f"{name}-latency-vs-fidelity.png", ylabel,
                                               f"suite {name}: latency vs fidelity", xlabel))
    if name in SUITE_BARS:
        panels, xlabel = SUITE_BARS[name](result)
        panels = {k: v for k, v in panels.items() if v}
        if panels:
            written.append(bars(panels, Path(out) / f"{name}-bars.png", xlabel, f"suite {name}"))
    if name == "prune-recovery" and _prune_recovery_series(result):
        written.append(series(_prune_recovery_series(result), Path(out) / f"{name}-accuracy-vs-macs.png",
                              "MACs kept (share of the unpruned model's)", "test accuracy after recovery, %",
                              f"suite {name}: accuracy after the same recovery, at equal MACs"))
    return written


# ---- the ad-hoc table -----------------------------------------------------------------------

def _si(n, binary: bool = False) -> str:
    """1.23M (counts) or 1.23 MiB (binary=True: bytes); n/a for None."""
    base, units = (1024, (" KiB", " MiB", " GiB")) if binary else (1000, ("k", "M", "G"))
    if n is None:
        return "n/a"
    for power in (3, 2, 1):
        if n >= base ** power:
            return f"{n / base ** power:.3g}{units[power - 1]}"
    return f"{n} B" if binary else str(n)


def adhoc_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the before/after table (the Markdown and the terminal share them)."""
    headline = result["task"]["headline"]
    heads = ["row", "backend", "params", "MACs", "model bytes", "size ratio", "latency (spread)", "speedup",
             "peak memory", "compile", headline, "other fidelity"]
    cells = []
    for r in result["rows"]:
        if "error" in r:
            cells.append([r["label"], r["backend"], *["-"] * 8, "failed", r["error"][:80]])
            continue
        lat = r["latency"]
        other = ", ".join(f"{k} {v:.4g}" for k, v in r["fidelity"].items() if k != headline)
        cells.append([r["label"], r["backend"], _si(r["params"]), _si(r["macs"]), _si(r["model_bytes"], True),
                      f"{r['size_ratio']:.2f}x" if r.get("size_ratio") else "n/a",
                      f"{fmt_seconds(lat['median_s'])} ({lat['spread']:.0%})", f"{r['speedup']:.2f}x",
                      _si(r["peak_memory_bytes"], True), fmt_seconds(r["compile_s"]) if r["compile_s"] else "-",
                      f"{r['headline']:.4f}" if r["headline"] is not None else "n/a", other or "-"])
    return heads, cells


def adhoc_markdown(result: dict) -> str:
    """The ad-hoc Markdown: machine and config first, as numbers mean nothing without them."""
    env, cfg = result["environment"], result["config"]
    heads, cells = adhoc_table(result)
    lines = [f"# Ad-hoc benchmark: `{result['model']}`", "",
             f"{env['date']} · torch {env['torch']} · Python {env['python']} · fxopt {env['fxopt']} · "
             f"{env['cpu_model']} ({env['cpu_count']} CPUs, load average {env.get('load_avg_1m') or 0:.1f}) · "
             f"{cfg['threads']} threads · batch {cfg['batch']} · "
             f"inputs {cfg['inputs']} · {cfg['latency_runs']} interleaved latency runs (+{cfg['latency_warmup']} "
             f"warm-up), median · wall {result['wall_s']:.0f} s", "", result["task"]["description"] + ".", "",
             markdown_table(heads, cells, "llrrrrrrrrrl"), "", "Pipelines:", ""]
    lines += [f"- `{r['label']}`: `{r['pipeline']}`" for r in result["rows"] if r.get("pipeline")]
    lines += ["", "Params, MACs: fxopt's Cost on the compiled graph, whole batch. Model bytes: the graph's "
              "constants, weights lowered to int8 kernels at 1 byte each. Speedup, size ratio: baseline / row. "
              f"Peak memory: {cfg['peak_memory_method']}. Spread = (max - min) / median.", "",
              f"Method: `python -m benchmarks --model {result['model']} "
              + " ".join(f"--pipeline '{p}'" for p in cfg["pipelines"])
              + (f" --backend {cfg['backend']}" if cfg["backend"] else "") + "`; see benchmarks/adhoc.py."]
    return "\n".join(lines)

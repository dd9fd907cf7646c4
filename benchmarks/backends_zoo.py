"""Every torchvision classification model through a pipeline and a backend (inductor or xla),
against eager. A script, not a test: an inductor compile takes 10-100 s per model on 2 cores.

    python -m benchmarks.backends_zoo --backend inductor|xla [--models resnet18,mobilenet_v2]
        [--pipeline fold-bn,canonicalize,dce] [--limit-seconds 1800] [--out FILE.json]

Per model (benchmarks.zoo's builds: random weights and BatchNorm statistics, the smallest
input each family takes): compile with the pipeline and backend eager, lower that same
graph with the backend, and record `status` (pass: within 1e-4 of the rewritten graph run
eagerly, relative to the output's scale; fail; error, with the message), `rel_diff`,
`lower_s` (seconds of fxopt.lower: export, backend compile and first run) and `run_ms`
(the fastest of three calls after the first). For `fold-bn,canonicalize,dce` the graph
computes what the model computes (the zoo tests check it within 1e-4), so this is the
comparison with eager; for prune-channels it is the pruned model's own outputs. The
JSON is rewritten after every model; no model starts once --limit-seconds have passed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: import from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import fxopt  # noqa: E402
from benchmarks.harness import RESULTS_DIR, environment, write_json  # noqa: E402
from benchmarks.zoo import build_vision, image_size, relative_difference, vision_models  # noqa: E402

TOL = 1e-4


def run_one(name: str, pipeline: str, backend: str) -> dict:
    torch.manual_seed(0)
    model, size = build_vision(name), image_size(name)
    inputs = (torch.randn(1, 3, size, size),)
    eager = fxopt.compile(model, inputs, pipeline=pipeline)
    with torch.no_grad():
        expected = eager(*inputs)
        start = time.perf_counter()
        lowered = fxopt.lower(eager, backend=backend)
        actual = lowered(*inputs)
        lower_s = time.perf_counter() - start
        run_ms = []
        for _ in range(3):  # after the first call: the steady state
            start = time.perf_counter()
            lowered(*inputs)
            run_ms.append((time.perf_counter() - start) * 1e3)
    diff = relative_difference(expected, actual)
    return {"model": name, "input": f"1x3x{size}x{size}", "status": "pass" if diff <= TOL else "fail",
            "rel_diff": diff, "lower_s": round(lower_s, 3), "run_ms": round(min(run_ms), 2)}


def kept_rows(out: Path, backend: str, pipeline: str) -> list:
    """Rows of an earlier run of the same backend and pipeline that finished (not skipped for time)."""
    if not out.exists():
        return []
    old = json.loads(out.read_text())
    if (old["backend"], old["pipeline"]) != (backend, pipeline):
        raise SystemExit(f"{out} holds {old['backend']} / {old['pipeline']}, not {backend} / {pipeline}: "
                         "pick another --out or drop --resume")
    return [r for r in old["models"] if r["status"] != "skipped"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, choices=("inductor", "xla"))
    parser.add_argument("--models", type=lambda s: [m for m in s.split(",") if m],
                        help="comma-separated torchvision names (default: every classification model)")
    parser.add_argument("--pipeline", default="fold-bn,canonicalize,dce")
    parser.add_argument("--limit-seconds", type=float, default=float("inf"),
                        help="start no model after this many seconds")
    parser.add_argument("--out", type=Path, help="JSON file (default: results/<backend>-zoo.json)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows --out already holds for this backend and pipeline; run only the others")
    args = parser.parse_args(argv)
    out = args.out or RESULTS_DIR / f"{args.backend}-zoo.json"
    missing = fxopt.list_backends()[args.backend].available()
    if missing:
        parser.error(f"backend {args.backend}: {missing}")
    names, rows, start, env = args.models or vision_models(), [], time.perf_counter(), environment()
    if args.resume:
        rows = kept_rows(out, args.backend, args.pipeline)
        done = {r["model"] for r in rows}
        names = [n for n in names if n not in done]

    def save() -> dict:  # after every model: an interrupted run keeps what it measured
        counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "error", "skipped")}
        write_json(out, {"backend": args.backend, "pipeline": args.pipeline, "tolerance": TOL, "counts": counts,
                         "wall_s": round(time.perf_counter() - start, 1), "models": rows, "environment": env})
        return counts

    for name in names:
        if time.perf_counter() - start > args.limit_seconds:
            rows.append({"model": name, "status": "skipped", "reason": "--limit-seconds ran out"})
            continue
        try:
            row = run_one(name, args.pipeline, args.backend)
        except Exception as exc:  # noqa: BLE001 - a failing model is a result, not the end of the run
            row = {"model": name, "status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]}
        rows.append(row)
        print(f"{name:28s} {row['status']:5s} rel diff {row.get('rel_diff', float('nan')):.2e}  "
              f"lower {row.get('lower_s', float('nan')):6.1f} s" +
              (f"\n    {row['error'].splitlines()[0]}" if "error" in row else ""), flush=True)
        save()
    counts = save()
    print(f"{counts} -> {out}")
    return 0 if counts["fail"] == counts["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Suite `prune-recovery`: fxopt's sensitivity-allocated pruning next to uniform pruning and
Torch-Pruning, at equal MACs, each recovered by the same distillation.

Task: scikit-learn's digits upscaled to 32x32x3 (benchmarks/digits32.py), torchvision
resnet18 and mobilenet_v2 (weights=None, 10 classes) trained on the training split and
cached. Per model and per MACs target (TARGETS: shares of the MACs kept), four rows:

  fxopt-sensitivity  `prune-channels{target-macs=T}` on the BN-folded graph (`fxopt.compile(model,
                     x, pipeline="canonicalize,fold-bn,dce")`): per-group ratios allocated from the
                     Sensitivity measured on `sensitivity_batches` training batches. What
                     `fxopt.compile(model, x, pipeline="canonicalize,fold-bn,dce,prune-channels{
                     target-macs=T}", data=...)` does, except that the table is measured once per
                     model (its prune curves only, the kind target-macs reads; through compile
                     every kind is measured, 4 min on resnet18 here) and given to
                     fxopt.api.compiler.build for each target; its time is in the row's.
  fxopt-uniform      `fxopt.compile(model, x, pipeline="canonicalize,fold-bn,dce,prune-channels{
                     ratio=r}")` (every group loses r).
  tp-local           Torch-Pruning's MetaPruner, MagnitudeImportance(p=1), the classifier in
                     ignored_layers, every layer at `pruning_ratio=r`.
  tp-global          the same with global_pruning=True (one threshold over all groups).

fxopt-sensitivity's measured MACs share is the target of the other three: their r is
searched (`matched`: at most `tries` prunings) until their MACs are within MATCH (2%) of
it, the closest r tried being kept (and flagged in the findings when still outside).
MACs and parameters are counted by one counter, fxopt's Cost, on BN-folded graphs: Torch-Pruning prunes the model with its BatchNorms (its
importance sees them), then its pruned nn.Module goes through `fxopt.compile(pruned, x,
pipeline="canonicalize,fold-bn,dce")`, so every row is a BN-folded CompiledModel, counted
and recovered the same way. The unpruned model's folded graph is the 100% of MACs.

Recovery, the same for every row: `torch.manual_seed(SEED)`, then `fxopt.finetune(row,
teacher=model, data=<the labelled training batches, cut to recovery_batch rows>,
steps=steps, lr=lr)` (Adam, cosine decay, 0.5 cross-entropy + 0.5 KD at T=4: finetune's
defaults). The default 60 steps of 32 rows (under 2 epochs) keep the suite within ~30 min
on 2 shared cores; a longer recovery narrows the gaps between rows.

Scored on the 450 test images, before and after recovery: accuracy, KL(unpruned || row)
(fxopt.analyses.fidelity.divergence, per image) and top-1 agreement with the unpruned
model; also `search_s`, the whole search (for fxopt-sensitivity: measuring the sensitivity
and pruning), `prune_s`, the chosen configuration's one pruning, and the recovery time. Torch runs with THREADS threads.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch

import fxopt
from fxopt.analyses import Cost
from fxopt.analyses.fidelity import divergence
from fxopt.analyses.sensitivity import SETTINGS, Sensitivity, measure
from fxopt.api.compiler import Recipe, build

from .. import digits32
from ..harness import bench_each, choose_models, closing_lines, environment, markdown_table, package_versions, \
    render_results, save_results

NAME = "prune-recovery"
MODELS = ("resnet18", "mobilenet_v2")
QUICK_MODELS = ("resnet18",)
METHODS = ("fxopt-sensitivity", "fxopt-uniform", "tp-local", "tp-global")
CLEANUP = "canonicalize,fold-bn,dce"
MATCH = 0.02          # MACs within 2% of fxopt-sensitivity's
TRIES = 12           # prunings per matched row, at most
MAX_RATIO = 0.99
SEED = 0
THREADS = 2
CHANCE = 0.1          # ten classes


@dataclass(frozen=True)
class Setting:
    """What one run measures: MACs targets, recovery steps and learning rate, the batches the
    sensitivity is measured on, and (for the tests) a cap on the training epochs."""

    targets: tuple = (0.5, 0.3)
    steps: int = 60
    lr: float = 1e-3
    recovery_batch: int = 32
    sensitivity_batches: int = 2
    epochs: int | None = None
    test_rows: int | None = None
    tries: int = TRIES


QUICK = Setting(targets=(0.5,), steps=20)


# ---- pruning ----------------------------------------------------------------------------------

def macs_params(cm) -> tuple[int, int]:
    cost = fxopt.AnalysisManager(cm.graph_module).get(Cost)
    return cost.macs, cost.params


def sensitivity(folded, data) -> tuple:
    """(table, seconds): the prune curves of the BN-folded graph on `data`: measured once per model, shared by
    its targets (only the prune kind: the other kinds' rows are not what target-macs reads)."""
    am = fxopt.AnalysisManager(folded, None, list(data))
    return _timed(measure, folded, am, {"prune": SETTINGS["prune"]})


def fxopt_sensitivity(folded, x, data, table, target: float):
    """prune-channels{target-macs} on a copy of the folded graph, the measured table given."""
    recipe = Recipe(f"prune-channels{{target-macs={target}}}", data=data)
    return build(copy.deepcopy(folded), ((x,), {}), recipe, analyses={Sensitivity: table})


def fxopt_uniform(model, x, ratio: float):
    return fxopt.compile(model, (x,), pipeline=f"{CLEANUP},prune-channels{{ratio={ratio:.6f}}}")


def torch_pruning(model, x, ratio: float, global_pruning: bool):
    """Torch-Pruning on a deep copy (it mutates its model), then BN folded by fxopt's cleanup."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    classifier = [m for m in pruned.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(pruned, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, global_pruning=global_pruning, ignored_layers=[classifier])
    pruner.step()
    return fxopt.compile(pruned.eval(), (x,), pipeline=CLEANUP)


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def matched(prune, share_of, target: float, tries: int = TRIES) -> dict:
    """Search the ratio r of `prune(r)` until `share_of(result)` is within MATCH of `target`
    (more r, fewer MACs): at most `tries` prunings, each r interpolated in the bracket on the
    square root of the share (about linear in r: a conv between two pruned groups keeps
    (1-r)^2 of its MACs), halving the bracket when that stalls. Returns the closest result
    tried, its r, its time and the whole search's time."""
    (low, low_root), (high, high_root) = (0.0, 1.0), (MAX_RATIO, None)
    best, search, r = None, 0.0, 1 - target ** 0.5
    for _ in range(tries):
        cm, took = _timed(prune, r)
        search += took
        share = share_of(cm)
        if best is None or abs(share - target) < abs(best["share"] - target):
            best = {"cm": cm, "ratio": r, "share": share, "prune_s": took}
        if abs(share - target) <= MATCH * target:
            break
        if share > target:
            low, low_root = r, share ** 0.5
        else:
            high, high_root = r, share ** 0.5
        r = _next_ratio(low, low_root, high, high_root, target ** 0.5)
    return {**best, "search_s": search}


def _next_ratio(low, low_root, high, high_root, goal) -> float:
    """Linear interpolation of sqrt(share) in the bracket, or its middle when the far end is
    unmeasured or the interpolation hugs an end."""
    middle = (low + high) / 2
    if high_root is None or low_root == high_root:
        return middle
    r = low + (low_root - goal) / (low_root - high_root) * (high - low)
    edge = (high - low) / 20
    return r if low + edge < r < high - edge else middle


# ---- scoring and recovery ----------------------------------------------------------------------

def score(run, x_test, y_test, reference) -> dict:
    """Accuracy, KL(unpruned || run) and top-1 agreement with the unpruned model on the test set."""
    out = digits32.logits(run, x_test)
    return {"accuracy": (out.argmax(1) == y_test).double().mean().item(),
            "kl": divergence(out, reference, "logits").item(),
            "agreement": (out.argmax(1) == reference.argmax(1)).double().mean().item()}


def recover(cm, teacher, batches, setting: Setting) -> float:
    """The shared recipe: seeded fxopt.finetune with the teacher; returns its time."""
    torch.manual_seed(SEED)
    _, took = _timed(lambda: fxopt.finetune(cm, teacher=teacher, data=batches, steps=setting.steps, lr=setting.lr))
    return took


def _prunings(model, x) -> dict:
    """{method: prune(r)} for the rows matched to fxopt-sensitivity's MACs by their ratio r."""
    return {"fxopt-uniform": lambda r: fxopt_uniform(model, x, r),
            "tp-local": lambda r: torch_pruning(model, x, r, False),
            "tp-global": lambda r: torch_pruning(model, x, r, True)}


@dataclass(frozen=True)
class _Scene:
    """What every row of one model shares: the teacher, the example input, the sensitivity
    batches, the recovery batches, the test set (x, y, the teacher's logits), the 100% of MACs."""

    model: torch.nn.Module
    x: torch.Tensor
    measured_on: list
    recovery: list
    test: tuple
    base_macs: int

    def share(self, cm) -> float:
        return macs_params(cm)[0] / self.base_macs


def bench_model(name: str, setting: Setting, log=print) -> dict:
    """Train (or load) `name`, then every method at every target, pruned, scored, recovered, scored."""
    data = digits32.load()
    x_train, y_train, x_test, y_test = data
    if setting.test_rows:
        x_test, y_test = x_test[:setting.test_rows], y_test[:setting.test_rows]
    model, fresh = digits32.trained(name, data, setting.epochs)
    batches = digits32.batches(x_train, y_train, SEED + 1)
    recovery = [(bx[i:i + setting.recovery_batch], by[i:i + setting.recovery_batch])
                for bx, by in batches for i in range(0, len(bx), setting.recovery_batch)]
    base = fxopt.compile(model, (x_train[:1],), pipeline=CLEANUP)
    base_macs, base_params = macs_params(base)
    scene = _Scene(model, x_train[:1], batches[:setting.sensitivity_batches], recovery,
                   (x_test, y_test, digits32.logits(model, x_test)), base_macs)
    table = sensitivity(base.graph_module, scene.measured_on)
    unpruned = {"macs": base_macs, "params": base_params, **score(model, *scene.test)}
    log(f"  unpruned: accuracy {unpruned['accuracy']:.4f}, {base_macs / 1e6:.1f}M MACs "
        f"({'trained' if fresh else 'cached'}); sensitivity measured in {table[1]:.0f} s")
    rows = []
    for target in setting.targets:
        results = _pruned(scene, base.graph_module, table, target, setting.tries)
        rows += [_row(method, target, results[method], scene, setting, log) for method in METHODS]
    return {"name": name, "trained_here": fresh, "sensitivity_s": table[1],
            "epochs": setting.epochs if setting.epochs is not None else digits32.EPOCHS.get(name),
            "unpruned": unpruned, "rows": rows}


def _pruned(scene: _Scene, folded, table: tuple, target: float, tries: int) -> dict:
    """{method: {cm, share, ratio, prune_s, search_s} or {error}}: fxopt-sensitivity at `target`,
    the others matched to the MACs it reached."""
    first, took = _timed(fxopt_sensitivity, folded, scene.x, scene.measured_on, table[0], target)
    results = {"fxopt-sensitivity": {"cm": first, "share": scene.share(first), "prune_s": took,
                                     "search_s": took + table[1]}}
    for method, prune in _prunings(scene.model, scene.x).items():
        try:
            results[method] = matched(prune, scene.share, results["fxopt-sensitivity"]["share"], tries)
        except Exception as exc:  # noqa: BLE001 - a tool's failure is a result
            results[method] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return results


def _row(method: str, target: float, result: dict, scene: _Scene, setting: Setting, log) -> dict:
    row = {"method": method, "target": target}
    if "error" in result:
        log(f"  {target:g} {method}: FAILED {result['error'][:200]}")
        return {**row, "error": result["error"]}
    cm = result["cm"]
    macs, params = macs_params(cm)
    before = score(cm, *scene.test)
    recover_s = recover(cm, scene.model, scene.recovery, setting)
    after = score(cm, *scene.test)
    row.update({"ratio": result.get("ratio"), "macs": macs, "params": params, "macs_share": macs / scene.base_macs,
                "before": before, "after": after, "prune_s": result["prune_s"], "search_s": result["search_s"],
                "recover_s": recover_s})
    log(f"  {target:g} {method}: MACs {row['macs_share']:.3f}, accuracy {before['accuracy']:.4f} -> "
        f"{after['accuracy']:.4f}, KL {before['kl']:.3f} -> {after['kl']:.4f} ({recover_s:.0f} s recovery)")
    return row


# ---- results -----------------------------------------------------------------------------------

def run(models=None, repeats: int | None = None, quick: bool = False, out_dir=None, log=print,
        setting: Setting | None = None) -> dict:
    """Run the suite; writes prune-recovery.json and .md into `out_dir` (default results/).
    `repeats` is unused: every row is one pruning and one recovery."""
    start = time.perf_counter()
    names = choose_models(models, quick, MODELS, QUICK_MODELS, MODELS)
    setting = setting or (QUICK if quick else Setting())
    config = {"models": list(names), **asdict(setting), "methods": list(METHODS), "match": MATCH,
              "cleanup": CLEANUP, "seed": SEED, "threads": THREADS, "quick": quick,
              "image": [3, digits32.SIZE, digits32.SIZE], "batch": digits32.BATCH}
    result = {"suite": NAME, "environment": {**environment(), **package_versions("torchvision", "torch_pruning")},
              "config": config, "models": []}

    def one(name: str) -> dict:     # the files are written after every model: a long run keeps its results
        record = bench_model(name, setting, log)
        save_results(NAME, {**result, "models": result["models"] + [record],
                            "wall_s": time.perf_counter() - start}, to_markdown, out_dir)
        result["models"].append(record)
        return record

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        result["models"] = bench_each(names, one, log)
    finally:
        torch.set_num_threads(threads)
    return save_results(NAME, {**result, "wall_s": time.perf_counter() - start}, to_markdown, out_dir)


def render(out_dir=None):
    """Rewrite the .md from the .json already in `out_dir`."""
    return render_results(NAME, to_markdown, out_dir)


def _pct(v) -> str:
    return f"{100 * v:.1f}%"


def _cells(r: dict) -> list:
    if "error" in r:
        return [r["method"], "failed"] + [""] * 9
    b, a = r["before"], r["after"]
    ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
    return [r["method"], ratio, f"{r['macs_share']:.3f}", f"{r['params'] / 1e6:.3g}M", _pct(b["accuracy"]),
            _pct(a["accuracy"]), f"{b['kl']:.3f}", f"{a['kl']:.4f}", _pct(a["agreement"]),
            f"{r['search_s']:.1f} s", f"{r['recover_s']:.0f} s"]


def findings(result: dict) -> list[str]:
    """Per model and target: who kept the most fidelity after recovery (KL, then accuracy)."""
    measured = [r for m in result["models"] if "error" not in m for r in m["rows"] if "error" not in r]
    notes = ["- Before recovery every row is at chance accuracy (it predicts one class): none of the methods "
             "keeps a usable model without training; KL before recovery still ranks them."] \
        if measured and all(r["before"]["accuracy"] < 2 * CHANCE for r in measured) else []
    for m in (m for m in result["models"] if "error" not in m):
        for target in result["config"]["targets"]:
            rows = [r for r in m["rows"] if r["target"] == target and "error" not in r]
            if not rows:
                continue
            best = min(rows, key=lambda r: r["after"]["kl"])
            fx = next((r for r in rows if r["method"] == "fxopt-sensitivity"), None)
            off = [r["method"] for r in rows if abs(r["macs_share"] / fx["macs_share"] - 1) > MATCH] if fx else []
            line = (f"- {m['name']} at {target:g} of the MACs: lowest KL after recovery: {best['method']} "
                    f"({best['after']['kl']:.4f}, accuracy {_pct(best['after']['accuracy'])})")
            if fx and best is not fx:
                line += (f"; fxopt-sensitivity {fx['after']['kl']:.4f}, accuracy {_pct(fx['after']['accuracy'])}")
            if off:
                line += f"; MACs not matched within {MATCH:.0%}: {', '.join(off)}"
            if best["after"]["accuracy"] < 2 * CHANCE:
                line += " (no row recovered from chance level in these steps: not a ranking)"
            notes.append(line + ".")
    return notes


def to_markdown(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    out = [f"# Suite `{NAME}`: pruning at equal MACs, then the same recovery", "",
           f"{env['date']}, torch {env['torch']}, torchvision {env.get('torchvision')}, torch_pruning "
           f"{env.get('torch_pruning')}, {env['cpu_model']}, {cfg['threads']} threads; {result['wall_s']:.0f} s.", "",
           f"Digits upscaled to {cfg['image'][1]}x{cfg['image'][2]}x3; rows matched to fxopt-sensitivity's MACs "
           f"within {cfg['match']:.0%} (ratio searched); all rows BN-folded (`{cfg['cleanup']}`); recovery: "
           f"`fxopt.finetune(row, teacher=model, steps={cfg['steps']}, lr={cfg['lr']:g})` on the labelled training "
           f"batches, seed {cfg['seed']}. KL = KL(unpruned || row) per test image; agreement = top-1 agreement "
           f"with the unpruned model, after recovery.", ""]
    heads = ["method", "ratio", "MACs kept", "params", "acc before", "acc after", "KL before", "KL after",
             "agree after", "prune (search)", "recovery"]
    for m in (m for m in result["models"] if "error" not in m):
        u = m["unpruned"]
        out += [f"## {m['name']}", "", f"Unpruned: accuracy {_pct(u['accuracy'])}, {u['macs'] / 1e6:.1f}M MACs, "
                f"{u['params'] / 1e6:.2f}M params ({m['epochs']} epochs).", ""]
        for target in cfg["targets"]:
            rows = [_cells(r) for r in m["rows"] if r["target"] == target]
            if not rows:        # a model run at fewer targets than the others
                continue
            out += [f"### {target:g} of the MACs", "", markdown_table(heads, rows, "llrrrrrrrrr"), ""]
    closing = closing_lines(NAME, findings(result), result["models"])
    closing[-1] = closing[-1].replace(f"suites/{NAME}.py", "suites/prune_recovery.py")
    return "\n".join(out + closing)

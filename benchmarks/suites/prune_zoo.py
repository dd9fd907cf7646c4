"""Suite `prune-zoo`: how much of every model prune-channels can prune.

For every torchvision classification model (224x224, or the size it needs) and a
BERT-base-like and GPT-2-like model built from `transformers` configs (random
weights, sequence 128): the channel groups found (prunable / all, heads groups),
the ops that blocked groups, and params and MACs before and after
`prune-channels{ratio=0.5}`. Everything runs on fake tensors except the final
check that the pruned graph runs on a real input of the original shape, so the
suite measures coverage, not speed (see the `prune` suite for that).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

import fxopt
from fxopt.analyses import ChannelGroups, Cost

from ..harness import environment, markdown_table, render_results, save_results

NAME = "prune-zoo"
QUICK_MODELS = ("resnet18", "mobilenet_v3_small")
_SIZES = {"inception_v3": 299}
_TEXT = ("bert-base", "gpt2")


def _vision(name: str):
    import torchvision

    model = torchvision.models.get_model(name, weights=None).eval()
    size = _SIZES.get(name, 224)
    return model, (torch.randn(1, 3, size, size),)


def _text(name: str):
    import transformers

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (1, 128))
    if name == "bert-base":
        return transformers.BertModel(transformers.BertConfig()).eval(), (ids,)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(use_cache=False)).eval(), (ids,)


def all_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models)) + list(_TEXT)


def measure_model(name: str) -> dict:
    """Groups, and params/MACs before and after pruning half, of one model."""
    model, inputs = _text(name) if name in _TEXT else _vision(name)
    start = time.perf_counter()
    gm = fxopt.trace(model, inputs)
    am = fxopt.AnalysisManager(gm)
    before, groups = am.get(Cost), am.get(ChannelGroups)
    report = fxopt.PassManager("prune-channels{ratio=0.5}").run(gm, am, example_inputs=inputs)
    after = fxopt.AnalysisManager(gm).get(Cost)
    with torch.no_grad():
        expected, got = model(*inputs), gm(*inputs)
    same_shapes = [e.shape for e in torch.utils._pytree.tree_leaves(expected)] == \
        [g.shape for g in torch.utils._pytree.tree_leaves(got)]
    prunable = groups.prunable()
    return {"model": name, "groups": len(groups.groups), "prunable": len(prunable),
            "heads_groups": sum(g.kind == "heads" for g in prunable),
            "blocked_ops": len(groups.blocked_ops), "params_before": before.params,
            "params_after": after.params, "macs_before": before.macs, "macs_after": after.macs,
            "runs_with_same_output_shapes": same_shapes, "seconds": time.perf_counter() - start,
            "notes": list(report.records[0].notes)[:3]}


def to_markdown(result: dict) -> str:
    rows = []
    for r in result["models"]:
        if "error" in r:
            rows.append([r["model"], "-", "-", "-", "-", "-", "error: " + r["error"][:80]])
            continue
        rows.append([r["model"], f"{r['prunable']}/{r['groups']}", r["heads_groups"],
                     f"{r['macs_before'] / 1e9:.3f}", f"{r['macs_after'] / 1e9:.3f}",
                     f"{r['macs_before'] / max(r['macs_after'], 1):.2f}x",
                     "yes" if r["runs_with_same_output_shapes"] else "NO"])
    ok = [r for r in result["models"] if "error" not in r]
    runs = sum(r["runs_with_same_output_shapes"] and r["macs_after"] < r["macs_before"] for r in ok)
    return "\n".join([
        "# prune-zoo: prune-channels{ratio=0.5} on every model", "",
        f"{runs} of {len(result['models'])} models prune (fewer MACs) and run with the original "
        f"output shapes. Vision models at 224x224 (inception_v3 299), batch 1; BERT-base and GPT-2 "
        f"(default configs, random weights) at sequence 128. Groups: prunable/all; heads: groups "
        f"of whole attention heads. Reproduce: `python -m benchmarks --suite prune-zoo`.", "",
        markdown_table(["model", "groups", "heads", "GMACs before", "GMACs after", "MACs ratio", "runs"],
                       rows, align="lrrrrrl"), ""])


def render(out_dir=None) -> Path:
    """Rewrite the .md from the .json already in `out_dir`."""
    return render_results(NAME, to_markdown, out_dir)


def run(models=None, repeats: int | None = None, quick: bool = False, out_dir=None, log=print) -> dict:
    """Run the suite; writes prune-zoo.json and .md into `out_dir` (default results/)."""
    del repeats  # nothing is timed
    start = time.perf_counter()
    names = list(models) if models else (list(QUICK_MODELS) if quick else all_models())
    records = []
    for name in names:
        log(f"{name} ...")
        try:
            records.append(measure_model(name))
        except Exception as exc:  # noqa: BLE001 - one model's failure is a result, not a crash
            records.append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
    result = {"suite": NAME, "environment": environment(), "config": {"models": names, "quick": quick},
              "models": records, "wall_s": time.perf_counter() - start}
    return save_results(NAME, result, to_markdown, out_dir)

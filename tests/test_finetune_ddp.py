"""fxopt.finetune data-parallel: 2 processes under torchrun (CPU, gloo) make the updates 1 process
makes for the same global batches; gradient accumulation; checkpoints that a killed run resumes
from, losing nothing and repeating no step.

The equivalence rule (help(fxopt.finetune)): a step takes world × accumulate batches, so
2 processes with accumulate=1 and 1 process with accumulate=2 train alike.

This file is also the torchrun worker: `python -m torch.distributed.run --nproc-per-node 2
tests/test_finetune_ddp.py --out run.json [--accumulate A] [--checkpoint F --every N] [--sleep S]`
builds the teacher, the pruned student and the data from a fixed seed, calls fxopt.finetune and
writes every rank's history and final weights as JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # run as a script by torchrun
    sys.path.insert(0, ROOT)

import fxopt  # noqa: E402
from fxopt.runtime.launch import free_port  # noqa: E402

STEPS, EVERY, BATCH, BATCHES = 12, 3, 8, 10


# ---- the run every process builds from the seed ----------------------------------------------
def build(seed: int = 0):
    """(teacher, student compiled with half its channels pruned, 10 batches of (x, y))."""
    torch.manual_seed(seed)
    teacher = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    xs = torch.randn(BATCHES, BATCH, 3, 8, 8, generator=g)
    with torch.no_grad():
        data = [(x, teacher(x).argmax(1)) for x in xs]
    student = fxopt.compile(teacher, (xs[0],), pipeline="prune-channels{ratio=0.5}", instruments=())
    return teacher, student, data


class Slow:
    """The data, each batch after `seconds` (time for a test to kill the run mid-way)."""

    def __init__(self, data, seconds: float):
        self.data, self.seconds = data, seconds

    def __iter__(self):
        for batch in self.data:
            time.sleep(self.seconds)
            yield batch


def result(model) -> dict:
    return {"history": dataclasses.asdict(model.finetune_history),
            "weights": {k: v.detach().flatten().tolist() for k, v in model.graph_module.state_dict().items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--checkpoint")
    p.add_argument("--every", type=int, default=EVERY)
    p.add_argument("--sleep", type=float, default=0.0)
    args = p.parse_args(argv)
    teacher, student, data = build()
    fxopt.finetune(student, teacher=teacher, data=Slow(data, args.sleep) if args.sleep else data, steps=STEPS,
                   lr=1e-2, accumulate=args.accumulate, checkpoint=args.checkpoint, checkpoint_every=args.every)
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{args.out}.rank{rank}", "w") as fh:
        json.dump({"world": int(os.environ.get("WORLD_SIZE", "1")),
                   "group_left": not torch.distributed.is_initialized(), **result(student)}, fh)
    return 0


# ---- launching ---------------------------------------------------------------------------------
def _command(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), os.path.abspath(__file__), *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}


def _torchrun(nproc: int, out, *args: str) -> list[dict]:
    done = subprocess.run(_command(nproc, "--out", str(out), *args), capture_output=True, text=True,
                          timeout=120, env=_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [json.loads(open(f"{out}.rank{r}").read()) for r in range(nproc)]


def _in_process(**kwargs) -> dict:
    """One process, no torchrun (pytest's own), one thread like the workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher, student, data = build()
        fxopt.finetune(student, teacher=teacher, data=data, steps=STEPS, lr=1e-2, **kwargs)
    finally:
        torch.set_num_threads(threads)
    return result(student)


def _max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(max((abs(x - y) for x, y in zip(a[k], b[k])), default=0.0) for k in a)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The uninterrupted 2-process run, checkpointing every 3 steps: [rank 0, rank 1]."""
    folder = tmp_path_factory.mktemp("ddp")
    return _torchrun(2, folder / "run.json", "--checkpoint", str(folder / "ckpt.pt"))


# ---- the tests -----------------------------------------------------------------------------------
def test_two_processes_train_like_one_with_the_same_global_batches(two_processes):
    one = _in_process(accumulate=2)                    # 1 × 2 batches per step = 2 processes × 1
    rank0, rank1 = two_processes
    assert rank0["world"] == 2
    assert rank0["group_left"] and rank1["group_left"]   # the group finetune made, it destroyed
    assert rank0["history"] == rank1["history"] and rank0["weights"] == rank1["weights"]
    h2, h1 = rank0["history"], one["history"]
    print(f"\nfinal loss: 1 process {h1['loss'][-1]!r}, 2 processes {h2['loss'][-1]!r}; max |loss difference| "
          f"{max(abs(a - b) for a, b in zip(h1['loss'], h2['loss'])):.3g}, max |weight difference| "
          f"{_max_weight_diff(rank0['weights'], one['weights']):.3g}")
    assert len(h2["loss"]) == STEPS and h2["epochs"] == h1["epochs"] == 3   # 24 batches of 10
    assert h2["lr"] == h1["lr"]
    for key in ("loss", "task", "distill"):
        assert h2[key] == pytest.approx(h1[key], rel=1e-4, abs=1e-6), key
    assert _max_weight_diff(rank0["weights"], one["weights"]) < 1e-4
    assert sum(h2["loss"][-3:]) < sum(h2["loss"][:3])  # and it does learn


def test_one_process_without_accumulation_differs(two_processes):
    """The rule is not vacuous: half the batches per step is another run."""
    one = _in_process()
    assert one["history"]["loss"][1:] != pytest.approx(two_processes[0]["history"]["loss"][1:], rel=1e-3)


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers in /proc")
def test_a_killed_run_resumes_from_its_last_checkpoint_losing_nothing(two_processes, tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    out = tmp_path / "killed.json"
    killed = subprocess.Popen(_command(2, "--out", str(out), "--checkpoint", str(checkpoint), "--sleep", "0.1"),
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for pid in _process_tree(killed.pid):       # torchrun and its workers (in sessions of their own)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.wait(timeout=30)
    assert checkpoint.exists(), "no checkpoint was written"
    at = torch.load(checkpoint, weights_only=True)["step"]
    assert EVERY <= at < STEPS and at % EVERY == 0
    assert not os.path.exists(f"{out}.rank0")       # killed before the end

    resumed = _torchrun(2, out, "--checkpoint", str(checkpoint))
    print(f"\nkilled after the checkpoint of step {at} of {STEPS}; the restarted run resumed from step "
          f"{resumed[0]['history']['resumed']}")
    reference = two_processes[0]
    for rank in resumed:
        assert rank["history"]["resumed"] == at
        history = {**rank["history"], "resumed": 0}
        assert history == reference["history"]       # every step once, with the same losses
        assert rank["weights"] == reference["weights"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".fxopt-tmp")] == []


# ---- in one process: accumulation, checkpoints, their errors ---------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _mlp_batches(count: int, rows: int = 4) -> list:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(rows, 6, generator=g), torch.randint(0, 3, (rows,), generator=g)) for _ in range(count)]


def test_accumulating_two_batches_equals_one_batch_of_both():
    halves = _mlp_batches(8)
    whole = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(halves[::2], halves[1::2])]
    accumulated = fxopt.finetune(_mlp(), data=halves, steps=6, lr=1e-2, accumulate=2)
    single = fxopt.finetune(_mlp(), data=whole, steps=6, lr=1e-2)
    assert accumulated.finetune_history.loss == pytest.approx(single.finetune_history.loss, rel=1e-5)
    assert accumulated.finetune_history.epochs == single.finetune_history.epochs == 2
    for a, b in zip(accumulated.parameters(), single.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _Interrupted(Exception):
    pass


class _StopsAfter:
    """The data, raising once `limit` batches have been read in all (a crash mid-run)."""

    def __init__(self, data, limit: int):
        self.data, self.limit, self.read = data, limit, 0

    def __iter__(self):
        for batch in self.data:
            if self.read == self.limit:
                raise _Interrupted
            self.read += 1
            yield batch


def _shuffled_run(steps: int, data_wrapper=lambda d: d, **kwargs):
    """An MLP with dropout on a shuffling DataLoader: both draw from the global RNG."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(5))
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
    torch.manual_seed(7)
    return fxopt.finetune(model, data=data_wrapper(loader), steps=steps, lr=1e-2, **kwargs)


def _plain(history, **changes) -> dict:
    """The history as a dict, NaN as None (NaN != NaN), with `changes` applied."""
    items = {**dataclasses.asdict(history), **changes}.items()
    return {k: [None if x != x else x for x in v] if isinstance(v, list) else v for k, v in items}


def test_a_crashed_run_resumes_with_the_same_data_order_and_random_numbers(tmp_path):
    checkpoint = tmp_path / "run.pt"
    reference = _shuffled_run(13)                                    # 5 batches an epoch
    with pytest.raises(_Interrupted):                                # dies in step 12, mid-epoch
        _shuffled_run(13, lambda d: _StopsAfter(d, 11), checkpoint=checkpoint, checkpoint_every=4, accumulate=1)
    assert torch.load(checkpoint, weights_only=True)["step"] == 8
    resumed = _shuffled_run(13, checkpoint=checkpoint, checkpoint_every=4)
    assert resumed.finetune_history.resumed == 8
    assert _plain(resumed.finetune_history, resumed=0) == _plain(reference.finetune_history)
    for a, b in zip(resumed.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.load(checkpoint, weights_only=True)["step"] == 13   # the last step is saved too

    again = _shuffled_run(13, checkpoint=checkpoint)                # finished: nothing left to run
    assert again.finetune_history.resumed == 13
    assert again.finetune_history.loss == reference.finetune_history.loss
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), reference.parameters()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]  # no temp file left behind


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    checkpoint = tmp_path / "run.pt"
    fxopt.finetune(_mlp(), data=_mlp_batches(2), steps=2, checkpoint=checkpoint)
    with pytest.raises(fxopt.TrainingError, match="steps 2 there, 3 here") as info:
        fxopt.finetune(_mlp(), data=_mlp_batches(2), steps=3, checkpoint=checkpoint)
    assert "delete it" in str(info.value)
    with pytest.raises(fxopt.TrainingError, match="batches_per_step 1 there, 2 here"):
        fxopt.finetune(_mlp(), data=_mlp_batches(2), steps=2, accumulate=2, checkpoint=checkpoint)
    with pytest.raises(fxopt.TrainingError, match="does not fit this model"):
        fxopt.finetune(nn.Linear(6, 3), data=_mlp_batches(2), steps=2, checkpoint=checkpoint)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(fxopt.TrainingError, match="cannot read the checkpoint"):
        fxopt.finetune(_mlp(), data=_mlp_batches(2), steps=2, checkpoint=tmp_path / "junk.pt")


@pytest.mark.parametrize("kwargs, match", [
    (dict(accumulate=0), "accumulate must be an integer >= 1"),
    (dict(checkpoint_every=0), "checkpoint_every must be an integer >= 1"),
    (dict(checkpoint=3), "checkpoint must be a file path"),
])
def test_bad_run_options_are_rejected(kwargs, match):
    with pytest.raises(fxopt.TrainingError, match=match):
        fxopt.finetune(_mlp(), data=_mlp_batches(2), **kwargs)


def test_world_size_without_torchrun_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(fxopt.TrainingError, match="WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT"):
        fxopt.finetune(_mlp(), data=_mlp_batches(2), steps=1)


if __name__ == "__main__":
    sys.exit(main())

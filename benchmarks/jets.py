"""A jet-tagging-style task with a known answer: 16 features, 5 classes, made here.

The network is the one of hls4ml's reference benchmark (Duarte et al., JINST 13 P07027,
2018): 16 -> 64 -> 32 -> 32 -> 5 with ReLU. Its data there are simulated LHC jets; here each
class is a Gaussian with its own mean and covariance in 16 dimensions (seeded), overlapping
enough that the best possible accuracy is well below 1, as for real jets, so a quantized
model that loses accuracy shows it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURES, CLASSES = 16, 5


def load(train: int = 20000, test: int = 2000, seed: int = 0) -> tuple:
    """(x_train, y_train, x_test, y_test), features standardised on the training set."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(CLASSES, FEATURES, generator=g) * 0.3
    mixing = torch.randn(CLASSES, FEATURES, FEATURES, generator=g) / FEATURES ** 0.5 + torch.eye(FEATURES)

    def draw(n):
        y = torch.randint(0, CLASSES, (n,), generator=g)
        z = torch.randn(n, FEATURES, generator=g)
        return means[y] + torch.einsum("nij,nj->ni", mixing[y], z), y

    x_train, y_train = draw(train)
    x_test, y_test = draw(test)
    mu, sigma = x_train.mean(0), x_train.std(0)
    return (x_train - mu) / sigma, y_train, (x_test - mu) / sigma, y_test


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def train(data: tuple, epochs: int = 8) -> nn.Module:
    """The MLP after `epochs` of Adam (lr 3e-3, batches of 256), in eval mode."""
    x, y = data[0], data[1]
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x), 256):
            batch = order[i:i + 256]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(model, data: tuple) -> float:
    with torch.no_grad():
        return (model(data[2]).argmax(1) == data[3]).float().mean().item()

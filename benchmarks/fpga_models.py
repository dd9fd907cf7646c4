"""Models for the fpga-int8 tests and benchmark besides the digits CNN (benchmarks.digits)."""
from __future__ import annotations

import torch
import torch.nn as nn


class ResidualMLP(nn.Module):
    """Linear in -> ReLU -> `blocks` x [h = relu(h + fc2(relu(fc1(h))))] -> Linear out.

    Untrained, for random [N, features] inputs: residual adds of linear layers, the
    join an integer export must rescale to a common grid before adding.
    """

    def __init__(self, features: int = 32, hidden: int = 64, blocks: int = 2, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.fc1 = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(blocks))
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        for fc1, fc2 in zip(self.fc1, self.fc2):
            h = torch.relu(h + fc2(torch.relu(fc1(h))))
        return self.out(h)

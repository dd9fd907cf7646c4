"""Small nets shared by the channel-grouping and pruning tests."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallNet(nn.Module):
    """BN, depthwise conv, residual, cat, chunk + gating, grouped conv, PReLU, flatten -> linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(8, 6, 1)
        self.c4 = nn.Conv2d(14, 8, 1)
        self.g = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.act = nn.PReLU(8)
        self.fc1, self.fc2 = nn.Linear(32, 10), nn.Linear(10, 5)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        r = self.c2(F.relu(self.dw(h))) + h
        y = F.relu(self.c4(torch.cat([r, F.relu(self.c3(r))], 1)))
        u, v = y.chunk(2, dim=1)
        z = F.adaptive_avg_pool2d(self.act(self.g(u * torch.sigmoid(v))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(z, 1))))


class HandAttention(nn.Module):
    """Heads split by view/transpose with hard-coded head counts: the view literals must be rewritten."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 32), nn.Linear(32, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (m(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        h = x + self.o(((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))
        return h + self.down(F.gelu(self.up(h)))


class Gate(nn.Module):
    """Value-dependent control flow: only a leaf can hold it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.gate = Gate()
        self.post = nn.Linear(4, 2)

    def forward(self, x):
        return self.post(F.relu(self.gate(self.pre(x))))

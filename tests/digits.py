"""The digits data and CNN for the tests: `benchmarks.digits` (shared with the benchmarks)."""
from benchmarks.digits import BATCH, accuracy, batches, cnn, load, train  # noqa: F401


def trained_mlp():
    """(an MLP 64-48-32-24-10 trained for 300 Adam steps on the flattened digits, the flattened
    test rows): a small real classifier whose layers differ in sensitivity, for the tests of
    what measures it (sensitivity, allocation)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    x_train, y_train, x_test, _ = load()
    x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                          nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = 0
    while steps < 300:
        for x, y in batches(x_train, y_train, steps):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    return model.eval(), x_test

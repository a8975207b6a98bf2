import pytest
import torch
from torch import nn

from cmd_optim import datasets


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled digits: (x_train, y_train, x_test, y_test), pixels scaled to [0, 1]."""
    return datasets.digits(seed=0)


def mlp(seed=0, hidden=256):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train(model, optimizer, data, steps, batch=64, seed=0, start=0, scheduler=None, on_step=None):
    """Minibatch cross-entropy training; batches depend only on (seed, step), so runs can resume."""
    x, y = data[0], data[1]
    for step in range(start, steps):
        idx = torch.randint(0, len(x), (batch,), generator=torch.Generator().manual_seed(seed * 100_003 + step))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step(step + 1)
    return model


@torch.no_grad()
def accuracy(model, data):
    return (model(data[2]).argmax(1) == data[3]).float().mean().item()

"""Record a real training run and decompose it with CMD.

Trains a small MLP on scikit-learn's bundled digits with SGD, takes a snapshot of every weight
each few steps, fits CMD to the trajectory and reports how well ten modes describe it. Then it
keeps training and follows the run with online CMD updates, without storing more snapshots.

    python examples/decompose_digits.py [--steps 400] [--modes 10]
"""
import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from cmd_optim import decompose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--snapshot-every", type=int, default=10)
    parser.add_argument("--modes", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    params = list(model.parameters())
    flat = lambda: parameters_to_vector(params).detach()  # noqa: E731

    snapshots, decomposition = [flat()], None
    half = args.steps // 2
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(x), (64,))
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.snapshot_every:
            continue
        if step <= half:
            snapshots.append(flat())
        else:  # online CMD: refit a, b with each new snapshot, keeping O(N) statistics only
            decomposition.update(flat())
        if step == half:
            trajectory = torch.stack(snapshots)
            sizes = [p.numel() for p in params]
            decomposition = decompose(trajectory, modes=args.modes, samples=1000, layer_sizes=sizes)
            print(f"{decomposition}")
            print(f"  mode sizes: {decomposition.mode_sizes.tolist()}")
            print(f"  explained variance of the first {len(snapshots)} snapshots: "
                  f"{decomposition.explained_variance(trajectory):.4f}")
            print(f"  worst relative reconstruction error: {decomposition.relative_error(trajectory).max():.2e}")

    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean()
        vector_to_parameters(decomposition.evaluate(decomposition.profiles[:, -1]), params)
        cmd_accuracy = (model(x).argmax(1) == y).float().mean()
    print(f"after {decomposition.num_snapshots} snapshots: SGD weights accuracy {accuracy:.3f}, "
          f"CMD-modelled weights accuracy {cmd_accuracy:.3f} (training set)")


if __name__ == "__main__":
    main()

"""Federated averaging where, after a warm-up, clients send only CMD mode-coefficient updates.

    python -m examples.federated [--rounds 40] [--warmup-rounds 10] [--clients 10] [--local-steps 10]

Data: scikit-learn's bundled digits, split evenly over the clients. Plain FedAvg: every round each client
trains its copy of the global model for a few SGD steps and uploads its weight change (4 bytes per
parameter); the server averages the changes. FedAvg + CMD: the same for the warm-up rounds, while the
server keeps one snapshot of the global model per round; then the server decomposes them and sends the
clients the map (a slope and a mode per parameter, once); from then on a client trains only the M mode
coefficients (and the parameters kept free, here the output layer) and uploads their change: M + (free)
numbers. Prints accuracy against bytes uploaded.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from benchmarks import datasets
from cmd_optim import decompose
from cmd_optim.core import ModeMap


def model_for(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def flat(model: nn.Module) -> torch.Tensor:
    return parameters_to_vector(model.parameters()).detach()


def local_batches(shard, steps: int, batch: int, seed: int):
    x, y = shard
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch,), generator=gen)
        yield x[index], y[index]


def client_full(global_model, shard, args, seed) -> torch.Tensor:
    """Local SGD on every parameter; returns the weight change (N,)."""
    model = copy.deepcopy(global_model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    for x, y in local_batches(shard, args.local_steps, args.batch, seed):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return flat(model) - flat(global_model)


def client_modes(global_model, shard, mode_map: ModeMap, args, seed) -> tuple[torch.Tensor, torch.Tensor]:
    """Local SGD on the mode coefficients (the projected gradient) and on the free output layer.

    Returns (change of the coefficients (M,), change of the free parameters)."""
    model = copy.deepcopy(global_model)
    tracked, free = list(model[:4].parameters()), list(model[4].parameters())
    psi = torch.zeros(mode_map.num_coefficients)
    for x, y in local_batches(shard, args.local_steps, args.batch, seed):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        step = -args.lr * mode_map.project([p.grad for p in tracked])
        mode_map.lift_(tracked, step)
        psi += step
        with torch.no_grad():
            for p in free:
                p -= args.lr * p.grad
    free_change = torch.cat([(p - q).detach().reshape(-1) for p, q in zip(free, global_model[4].parameters())])
    return psi, free_change


@torch.no_grad()
def accuracy(model, data) -> float:
    return (model(data[2]).argmax(1) == data[3]).float().mean().item()


def federated(args, use_cmd: bool) -> dict:
    """One simulation; returns accuracy and the bytes the clients uploaded (and the server's map)."""
    data = datasets.digits(seed=args.seed)
    shards = [(data[0][k::args.clients], data[1][k::args.clients]) for k in range(args.clients)]
    model = model_for(args.seed)
    num_params = sum(p.numel() for p in model.parameters())
    snapshots, uploaded, mode_map, rows = [flat(model)], 0, None, []
    for round_index in range(args.rounds):
        seeds = [args.seed * 1_000_003 + round_index * 101 + k for k in range(args.clients)]
        if use_cmd and round_index >= args.warmup_rounds:
            if mode_map is None:
                tracked = list(model[:4].parameters())
                n = sum(p.numel() for p in tracked)
                d = decompose(torch.stack([s[:n] for s in snapshots]), modes=args.modes, samples=1000, seed=args.seed)
                mode_map = ModeMap.from_decomposition(d, tracked, [0] * len(tracked), 1)
            updates = [client_modes(model, shard, mode_map, args, seed) for shard, seed in zip(shards, seeds)]
            uploaded += sum(4 * (psi.numel() + free.numel()) for psi, free in updates)
            change = torch.stack([psi for psi, _ in updates]).mean(0)  # (M,)
            free_mean = torch.stack([free for _, free in updates]).mean(0)
            with torch.no_grad():
                mode_map.lift_(list(model[:4].parameters()), change)  # members move by slope x their mode's change
                offset = 0
                for p in model[4].parameters():
                    p += free_mean[offset:offset + p.numel()].view_as(p)
                    offset += p.numel()
        else:
            changes = [client_full(model, shard, args, seed) for shard, seed in zip(shards, seeds)]
            uploaded += sum(4 * change.numel() for change in changes)
            with torch.no_grad():
                vector_to_parameters(flat(model) + torch.stack(changes).mean(0), model.parameters())
            snapshots.append(flat(model))
        rows.append((round_index + 1, uploaded))
    map_bytes = 5 * sum(p.numel() for p in model[:4].parameters()) if mode_map is not None else 0
    return dict(method="FedAvg + CMD" if use_cmd else "FedAvg", accuracy=accuracy(model, data), uploaded=uploaded,
                map_bytes=map_bytes, num_params=num_params, modes=mode_map.num_modes if mode_map else None)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup-rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--modes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = [federated(args, use_cmd=False), federated(args, use_cmd=True)]
    print(f"digits, {args.clients} clients, {args.rounds} rounds of {args.local_steps} local SGD steps; "
          f"CMD after {args.warmup_rounds} rounds")
    print(f"{'method':<14}{'test acc':>9}{'uploaded (KiB)':>16}{'server map (KiB)':>18}")
    for r in results:
        print(f"{r['method']:<14}{r['accuracy']:>9.3f}{r['uploaded'] / 1024:>16,.0f}{r['map_bytes'] / 1024:>18,.0f}")
    return results


if __name__ == "__main__":
    main()

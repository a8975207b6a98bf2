"""Federated averaging where, after a warm-up, clients send only CMD mode-coefficient updates, or (embedded CMD)
only the parameters not embedded yet.

    python -m examples.federated [--rounds 40] [--warmup-rounds 10] [--clients 10] [--local-steps 10]

Data: scikit-learn's bundled digits, split evenly over the clients. Plain FedAvg: every round each client
trains its copy of the global model for a few SGD steps and uploads its weight change (4 bytes per
parameter); the server averages the changes. FedAvg + CMD: the same for the warm-up rounds, while the
server keeps one snapshot of the global model per round; then the server decomposes them and sends the
clients the map (a slope and a mode per parameter, once); from then on a client trains only the M mode
coefficients (and the parameters kept free, here the output layer) and uploads their change: M + (free)
numbers. FedAvg + embedded CMD (the paper's federated variant): after the warm-up the server decomposes the
same snapshots and, every round, embeds the 10% of the live parameters whose fitted line moved least
(:class:`cmd_optim.optim.embedding.GradualEmbedding`; it sends the clients the newly embedded parameters' lines);
a client trains every live parameter, its embedded ones following ``a * reference + b``, and uploads the change
of the live ones (and the free layer): 4 bytes per live parameter, falling every round. Prints the bytes one
client uploads in each round, and accuracy against the bytes uploaded.
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
from cmd_optim.optim.embedding import GradualEmbedding, gather


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
def follow(tracked, embedding: GradualEmbedding) -> None:
    """Put the embedded elements of ``tracked`` (a client's copies of the server's tracked tensors) on their line
    through the copies' references."""
    flat = torch.cat([p.reshape(-1) for p in tracked])
    target = embedding.tied_offset + embedding.tied_slope * flat[embedding.references][embedding.modes.long()]
    flat = torch.where(embedding.embedded, target.to(flat.dtype), flat)
    for p, piece in zip(tracked, flat.split([p.numel() for p in tracked])):
        p.copy_(piece.view_as(p))


def client_embedded(global_model, shard, embedding: GradualEmbedding, args, seed) -> torch.Tensor:
    """Local SGD on every parameter, the embedded ones put back on their line after each step; returns the change
    of the live tracked elements and of the free output layer (what the client uploads)."""
    model = copy.deepcopy(global_model)
    tracked = list(model[:4].parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    for x, y in local_batches(shard, args.local_steps, args.batch, seed):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        follow(tracked, embedding)
    live = [gather(p.detach() - q.detach(), pos) for p, q, pos in
            zip(tracked, global_model[:4].parameters(), embedding.positions)]
    return torch.cat([*live, *((p - q).detach().reshape(-1) for p, q in zip(model[4].parameters(),
                                                                             global_model[4].parameters()))])


@torch.no_grad()
def apply_embedded(model, embedding: GradualEmbedding, change: torch.Tensor) -> None:
    """The server adds the clients' mean change of the live elements and the free layer, then puts the embedded
    elements on their line."""
    offset = 0
    for p, pos in zip(model[:4].parameters(), embedding.positions):
        count = p.numel() if pos is None else pos.numel()
        flat = p.reshape(-1).clone()
        if pos is None:
            flat += change[offset:offset + count]
        else:
            flat[pos] += change[offset:offset + count]
        p.copy_(flat.view_as(p))
        offset += count
    for p in model[4].parameters():
        p += change[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    follow(list(model[:4].parameters()), embedding)


@torch.no_grad()
def accuracy(model, data) -> float:
    return (model(data[2]).argmax(1) == data[3]).float().mean().item()


def federated(args, use_cmd: bool | str) -> dict:
    """One simulation (``use_cmd``: False, True for the mode coefficients, "embedded" for embedded CMD); returns
    accuracy, the bytes the clients uploaded, per round the bytes one client uploaded, and the server's map."""
    data = datasets.digits(seed=args.seed)
    shards = [(data[0][k::args.clients], data[1][k::args.clients]) for k in range(args.clients)]
    model = model_for(args.seed)
    num_params = sum(p.numel() for p in model.parameters())
    snapshots, uploaded, mode_map, embedding, rows, per_client = [flat(model)], 0, None, None, [], []
    for round_index in range(args.rounds):
        seeds = [args.seed * 1_000_003 + round_index * 101 + k for k in range(args.clients)]
        before = uploaded
        if use_cmd == "embedded" and round_index >= args.warmup_rounds:
            tracked = list(model[:4].parameters())
            if embedding is None:
                n = sum(p.numel() for p in tracked)
                d = decompose(torch.stack([s[:n] for s in snapshots]), modes=args.modes, samples=1000, seed=args.seed)
                embedding = GradualEmbedding(d, tracked, every=1, fraction=args.embed_fraction)
            changes = [client_embedded(model, shard, embedding, args, seed) for shard, seed in zip(shards, seeds)]
            uploaded += sum(4 * change.numel() for change in changes)
            apply_embedded(model, embedding, torch.stack(changes).mean(0))
            embedding.observe(tracked)  # the round's snapshot; a round embeds the next share
        elif use_cmd and round_index >= args.warmup_rounds:
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
        per_client.append((uploaded - before) // args.clients)
    map_bytes = 5 * sum(p.numel() for p in model[:4].parameters()) if mode_map is not None else 0
    if embedding is not None:  # each embedded parameter's line (slope, offset) and mode, sent once to the clients
        map_bytes = embedding.num_embedded * (2 * embedding.tied_slope.element_size() + embedding.modes.element_size())
    method = {False: "FedAvg", True: "FedAvg + CMD", "embedded": "FedAvg + embedded CMD"}[use_cmd]
    return dict(method=method, accuracy=accuracy(model, data), uploaded=uploaded, per_client=per_client,
                map_bytes=map_bytes, num_params=num_params, modes=mode_map.num_modes if mode_map else None,
                embedded=embedding.num_embedded if embedding is not None else 0)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup-rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--modes", type=int, default=10)
    parser.add_argument("--embed-fraction", type=float, default=0.1,
                        help="embedded CMD: share of the live parameters each round embeds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = [federated(args, use_cmd=False), federated(args, use_cmd=True), federated(args, use_cmd="embedded")]
    print(f"digits, {args.clients} clients, {args.rounds} rounds of {args.local_steps} local SGD steps; "
          f"CMD after {args.warmup_rounds} rounds")
    print("bytes one client uploads per round:")
    print(f"{'round':>5}" + "".join(f"{r['method']:>24}" for r in results))
    for index in range(args.rounds):
        print(f"{index + 1:>5}" + "".join(f"{r['per_client'][index]:>24,}" for r in results))
    print(f"{'method':<22}{'test acc':>9}{'uploaded (KiB)':>16}{'server map (KiB)':>18}")
    for r in results:
        print(f"{r['method']:<22}{r['accuracy']:>9.3f}{r['uploaded'] / 1024:>16,.0f}{r['map_bytes'] / 1024:>18,.0f}")
    return results


if __name__ == "__main__":
    main()

"""Reduced-phase CMDOptimizer.step() against the base optimizers' own step, and state per parameter.

    python -m benchmarks.step_cost [--params 4000000] [--repeats 20] [--no-write]

Gradients are filled once with random values and only ``step()`` is timed; all optimizers run in
one process, interleaved round by round, and the medians are compared. Writes the "step" section
of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from cmd_optim import CMDOptimizer
from cmd_optim.optimizer import _tensor_bytes

from .report import machine, write_section


def _model(params: int) -> nn.Module:
    width = int((params / 2) ** 0.5)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.Linear(width, width))


def _fill_grads(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def _reduced(model: nn.Module, base, **kwargs) -> CMDOptimizer:
    optimizer = CMDOptimizer(model, base=base, modes=10, warmup_steps=2, snapshot_every=1, **kwargs)
    for seed in range(2):
        _fill_grads(model, seed)
        optimizer.step()
    assert optimizer.phase == "reduced"
    return optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=4_000_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    contenders = {
        "SGD momentum": lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9),
        "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
        "CMD(SGD momentum), reduced": lambda m: _reduced(m, torch.optim.SGD, lr=1e-3, momentum=0.9),
        "CMD(AdamW), reduced": lambda m: _reduced(m, torch.optim.AdamW, lr=1e-3),
    }
    runs = {}
    for name, build in contenders.items():
        model = _model(args.params)
        optimizer = build(model)
        _fill_grads(model, 7)
        optimizer.step()  # first step allocates state
        runs[name] = (model, optimizer, [])
    num_params = sum(p.numel() for p in runs["AdamW"][0].parameters())
    for _ in range(args.repeats):
        for name, (model, optimizer, times) in runs.items():
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)

    adamw = statistics.median(runs["AdamW"][2])
    rows = []
    for name, (model, optimizer, times) in runs.items():
        seconds = statistics.median(times)
        state = optimizer.state_bytes if isinstance(optimizer, CMDOptimizer) else _tensor_bytes(optimizer.state_dict()["state"])
        rows.append(f"| {name} | {seconds * 1e3:.1f} | {seconds / adamw:.2f} | {state / num_params:.2f} |")
        print(rows[-1], flush=True)
    command = f"python -m benchmarks.step_cost --params {args.params} --repeats {args.repeats}"
    body = f"""## CMDOptimizer.step() in the reduced phase

One `step()` on a two-layer model of {num_params:,} parameters (float32, gradients given), M = 10 modes.
Median of {args.repeats} rounds, the optimizers interleaved in one process. "State" is the optimizer state
that `step()` uses, per parameter (CMD: the projection, 4-byte slope + 1-byte mode, plus the mode
optimizer's state; the Decomposition kept for inspection is not counted).

Machine: {machine()}.
Command: `{command}`

| optimizer | step (ms) | time / AdamW step | state (bytes per parameter) |
|---|---|---|---|
{chr(10).join(rows)}
"""
    print(body)
    if not args.no_write:
        write_section("step", body)


if __name__ == "__main__":
    main()

"""Reduced-phase CMDOptimizer.step() against the base optimizers' own step, and state per parameter.

    python -m benchmarks.step_cost [--repeats 40] [--device cpu|cuda] [--no-write]

Four models: the digits MLP of the tests (84K parameters in 6 tensors), two-layer MLPs of 1M and 4M
parameters, and the parameter shapes of all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters in 103
tensors, the embedding table the largest). Gradients are filled once with random values and only
``step()`` is timed; for each model all optimizers run in one process, in a shuffled order every round
(so that none always finds the caches warm from the one before), and the medians are compared. On a
GPU each step is timed between two synchronisations. Writes the "step" section of docs/benchmarks.md
("step-cuda" for a GPU).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch import nn

from cmd_optim import CMDOptimizer
from cmd_optim.optim import optimizer_state_bytes

from .report import machine, write_section


def mlp_shapes(params: int = 4_000_000) -> list[tuple[int, ...]]:
    width = int((params / 2) ** 0.5)
    return [(width, width), (width,)] * 2


def digits_shapes(hidden: int = 256) -> list[tuple[int, ...]]:
    """The tests' digits MLP, 64-256-256-10."""
    return [(hidden, 64), (hidden,), (hidden, hidden), (hidden,), (10, hidden), (10,)]


def minilm_shapes(hidden: int = 384, layers: int = 6, intermediate: int = 1536, vocab: int = 30522) -> list[tuple[int, ...]]:
    """Parameter shapes of a BERT encoder (defaults: all-MiniLM-L6-v2)."""
    shapes = [(vocab, hidden), (512, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4 + [(hidden,), (hidden,)]
        shapes += [(intermediate, hidden), (intermediate,), (hidden, intermediate), (hidden,), (hidden,), (hidden,)]
    return shapes + [(hidden, hidden), (hidden,)]


def _parameters(shapes, device="cpu") -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device)) for shape in shapes]


def _fill_grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


def _reduced(params, base, **kwargs) -> CMDOptimizer:
    optimizer = CMDOptimizer(params, base=base, modes=10, switch_after=2, snapshot_every=1, **kwargs)
    for seed in range(2):
        _fill_grads(params, seed)
        optimizer.step()
    assert optimizer.phase == "reduced"
    return optimizer


CONTENDERS = {
    "SGD momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "CMD(SGD momentum), reduced": lambda ps: _reduced(ps, torch.optim.SGD, lr=1e-3, momentum=0.9),
    "CMD(AdamW), reduced": lambda ps: _reduced(ps, torch.optim.AdamW, lr=1e-3),
}


def measure(shapes, repeats: int, device="cpu") -> tuple[int, list[tuple[str, float, float, float]]]:
    """(parameter count, rows of (optimizer, median step seconds, time / AdamW, state bytes per parameter))."""
    device = torch.device(device)
    runs = {}
    for name, build in CONTENDERS.items():
        params = _parameters(shapes, device)
        optimizer = build(params)
        _fill_grads(params, 7)
        optimizer.step()  # the first step allocates the state
        runs[name] = optimizer
    num_params = sum(torch.Size(s).numel() for s in shapes)
    medians = shuffled_medians({name: optimizer.step for name, optimizer in runs.items()}, repeats, device)
    return num_params, [(name, medians[name], medians[name] / medians["AdamW"], optimizer_state_bytes(optimizer) / num_params)
                        for name, optimizer in runs.items()]


def shuffled_medians(functions: dict, repeats: int, device="cpu") -> dict[str, float]:
    """Median seconds of each function over ``repeats`` rounds, called in a shuffled (seeded) order
    every round, so that none always finds the caches as the same other one left them."""
    device = torch.device(device)
    times = {name: [] for name in functions}
    order = list(functions)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            times[name].append(_timed(functions[name], device))
    return {name: statistics.median(values) for name, values in times.items()}


def _timed(function, device: torch.device) -> float:
    """Seconds ``function()`` takes, including the GPU work it queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


MODELS = {
    "digits MLP": digits_shapes,
    "two-layer MLP, 1M": lambda: mlp_shapes(1_000_000),
    "two-layer MLP, 4M": mlp_shapes,
    "all-MiniLM-L6-v2 shapes": minilm_shapes,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    tables = []
    for title, shapes in MODELS.items():
        num_params, rows = measure(shapes(), args.repeats, args.device)
        lines = [f"| {name} | {s * 1e3:.3f} | {ratio:.2f} | {state:.2f} |" for name, s, ratio, state in rows]
        tables.append(f"""### {title}: {num_params:,} parameters in {len(shapes())} tensors

| optimizer | step (ms) | time / AdamW step | state (bytes per parameter) |
|---|---|---|---|
{chr(10).join(lines)}
""")
        print(tables[-1], flush=True)
    device = torch.device(args.device)
    command = f"python -m benchmarks.step_cost --repeats {args.repeats}" + (
        f" --device {args.device}" if device.type != "cpu" else "")
    body = f"""## CMDOptimizer.step() in the reduced phase{" (GPU)" if device.type == "cuda" else ""}

One `step()` (float32, gradients given, M = 10 modes) on {args.device}, median of {args.repeats} rounds,
the optimizers in a shuffled order every round, in one process. "AdamW" is `torch.optim.AdamW` with
its defaults (on the CPU, the per-tensor loop; on a GPU, the multi-tensor path); "AdamW (foreach)"
the multi-tensor path. "State" is the optimizer state that `step()` uses, per parameter (CMD: the
projection, 4-byte slope + 1-byte mode, plus the mode optimizer's state; the Decomposition kept for
inspection is not counted).

Machine: {machine()}.
Command: `{command}`

{chr(10).join(tables)}"""
    if not args.no_write:
        write_section("step" if device.type == "cpu" else f"step-{device.type}", body)


if __name__ == "__main__":
    main()

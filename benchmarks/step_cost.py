"""CMDOptimizer.step() in the warm-up and after the switch against the base optimizers' own step.

    python -m benchmarks.step_cost [--repeats 40] [--device cpu|cuda] [--no-write]

Four models: the digits MLP of the tests (84K parameters in 6 tensors), two-layer MLPs of 1M and 4M
parameters, and the parameter shapes of all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters in 103
tensors, the embedding table the largest; its word and position embeddings get gradients in the rows a
batch of 32 sentences of 16 tokens uses, as in a fine-tune). Gradients are filled once with random values
and only ``step()`` is timed; for each model all optimizers run in one process, in a shuffled order every
round (so that none always finds the caches warm from the one before), and the medians are compared. A
warm-up row times 10 steps (one of them a snapshot step for the mode reduction) and reports a tenth. On
a GPU each step is timed between two synchronisations. Writes the "step" section of docs/benchmarks.md
("step-cuda" for a GPU), naming the kernel backend that served the CMD rows.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch import nn

from cmd_optim import CMDOptimizer
from cmd_optim.core import kernels
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


#: Rows of an embedding table a batch reaches (32 sentences of 16 tokens), for tables of at least 512 rows.
USED_ROWS = 512


def _fill_grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)
        if p.ndim == 2 and p.shape[0] >= 16 * USED_ROWS:  # a vocabulary: most rows get no gradient
            p.grad[USED_ROWS:] = 0
        elif p.ndim == 2 and p.shape == (512, 384):  # a position table: 16 positions used
            p.grad[16:] = 0


def _reduced(params, base, reduction=None, **kwargs) -> CMDOptimizer:
    """A CMDOptimizer past its switch (two warm-up steps); the mode reduction with 10 modes, a snapshot a step."""
    if reduction == "modes":
        kwargs.update(modes=10, snapshot_every=1)
    optimizer = CMDOptimizer(params, base=base, reduction=reduction, switch_after=2, **kwargs)
    for seed in range(2):
        _fill_grads(params, seed)
        optimizer.step()
    assert optimizer.phase == "reduced"
    return optimizer


class _Warmup:
    """A CMDOptimizer in its warm-up for ``steps`` steps; ``step()`` takes 10 steps (one snapshot step with the
    mode reduction)."""

    def __init__(self, params, steps, base, **kwargs):
        self.optimizer = CMDOptimizer(params, base=base, switch_after=steps, **kwargs)
        self.state = self.optimizer.state

    def step(self):
        for _ in range(10):
            self.optimizer.step()


SGD = dict(lr=1e-3, momentum=0.9)
ADAMW = dict(lr=1e-3)

CONTENDERS = {
    "SGD momentum": lambda ps, steps: torch.optim.SGD(ps, **SGD),
    "AdamW": lambda ps, steps: torch.optim.AdamW(ps, **ADAMW),
    "AdamW (foreach)": lambda ps, steps: torch.optim.AdamW(ps, foreach=True, **ADAMW),
    "CMD(SGD momentum), warm-up": lambda ps, steps: _Warmup(ps, steps, torch.optim.SGD, **SGD),
    "CMD(AdamW), warm-up": lambda ps, steps: _Warmup(ps, steps, torch.optim.AdamW, **ADAMW),
    "CMD(SGD momentum), warm-up, modes": lambda ps, steps: _Warmup(ps, steps, torch.optim.SGD, reduction="modes", **SGD),
    "CMD(AdamW), warm-up, modes": lambda ps, steps: _Warmup(ps, steps, torch.optim.AdamW, reduction="modes", **ADAMW),
    "CMD(SGD momentum), reduced": lambda ps, steps: _reduced(ps, torch.optim.SGD, **SGD),
    "CMD(AdamW), reduced": lambda ps, steps: _reduced(ps, torch.optim.AdamW, **ADAMW),
    "CMD(SGD momentum), reduced, modes": lambda ps, steps: _reduced(ps, torch.optim.SGD, reduction="modes", **SGD),
    "CMD(AdamW), reduced, modes": lambda ps, steps: _reduced(ps, torch.optim.AdamW, reduction="modes", **ADAMW),
}

#: The base optimizer each row is compared with (besides AdamW).
BASE_OF = {name: ("SGD momentum" if "SGD" in name else "AdamW") for name in CONTENDERS}


def _seconds_per_step(name: str, seconds: float) -> float:
    return seconds / 10 if "warm-up" in name else seconds


def measure(shapes, repeats: int, device="cpu", names=None) -> tuple[int, list[tuple[str, float, float, float, float]]]:
    """(parameter count, rows of (optimizer, median step seconds, time / AdamW, time / its base optimizer's
    step, state bytes per parameter)), of every contender or of ``names`` (the bases are always run)."""
    device = torch.device(device)
    chosen = CONTENDERS if names is None else {name: CONTENDERS[name] for name in
                                               dict.fromkeys(["SGD momentum", "AdamW", *names])}
    runs = {}
    for name, build in chosen.items():
        params = _parameters(shapes, device)
        optimizer = build(params, steps=10 * repeats + 20)  # a warm-up that lasts all rounds
        _fill_grads(params, 7)
        optimizer.step()  # the first step allocates the state
        runs[name] = optimizer
    num_params = sum(torch.Size(s).numel() for s in shapes)
    medians = shuffled_medians({name: optimizer.step for name, optimizer in runs.items()}, repeats, device)
    medians = {name: _seconds_per_step(name, seconds) for name, seconds in medians.items()}
    return num_params, [(name, medians[name], medians[name] / medians["AdamW"], medians[name] / medians[BASE_OF[name]],
                         optimizer_state_bytes(getattr(optimizer, "optimizer", optimizer)) / num_params)
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
    backend = kernels.backend(torch.device(args.device))
    for title, shapes in MODELS.items():
        num_params, rows = measure(shapes(), args.repeats, args.device)
        lines = [f"| {name} | {s * 1e3:.3f} | {ratio:.2f} | {own:.2f} | {state:.2f} |"
                 for name, s, ratio, own, state in rows]
        tables.append(f"""### {title}: {num_params:,} parameters in {len(shapes())} tensors (kernels: {backend})

| optimizer | step (ms) | time / AdamW step | time / its base's step | state (bytes per parameter) |
|---|---|---|---|---|
{chr(10).join(lines)}
""")
        print(tables[-1], flush=True)
    device = torch.device(args.device)
    command = f"python -m benchmarks.step_cost --repeats {args.repeats}" + (
        f" --device {args.device}" if device.type != "cpu" else "")
    body = f"""## CMDOptimizer.step() in the warm-up and after the switch{" (GPU)" if device.type == "cuda" else ""}

One `step()` (float32, gradients given) on {args.device}, median of {args.repeats} rounds, the optimizers
in a shuffled order every round, in one process. "AdamW" is `torch.optim.AdamW` with its defaults (on the
CPU, the per-tensor loop; on a GPU, the multi-tensor path); "AdamW (foreach)" the multi-tensor path.
CMD rows without a suffix use the default reduction (low-rank: each matrix's state in a one-sided
subspace at a quarter of the base's state, refreshed every 100 steps; the reduced rows here time the steps
after the switch, mostly between refreshes), ", modes" the paper's mode reduction (M = 10). Warm-up rows:
the mean step over 10 (a snapshot every 10 steps with the mode reduction; none with the default).
"State" is the optimizer state that `step()` uses, per parameter (warm-up: the base's state plus the
snapshots so far; modes: the 4-byte slope + 1-byte mode map plus the mode optimizer's state; low-rank: the
bases and the base's state on the cores and on what trains in full). The kernel backend serves the mode
map's passes (`cmd_optim.core.kernels.backend()`). Only `step()` is timed: the forward and backward, the
same for every row here, are not (a whole-step comparison with the peers is not yet in this benchmark).

Machine: {machine()}.
Command: `{command}`

{chr(10).join(tables)}"""
    if not args.no_write:
        write_section("step" if device.type == "cpu" else f"step-{device.type}", body)


if __name__ == "__main__":
    main()

"""How far each method moves the weights after the switch: a lead that is the step's length, not the method.

    python -m benchmarks.step_length [--task minilm_vader] [--schedule linear] [--seeds 3] [--steps 8] [--quick]
                                     [--no-write]

For the first ``--steps`` steps after a harness task's switch (at the base rate full training chose on the
schedule), each step's ``||W_after - W_before|| / ||W_before||`` over the task's matrices whose shorter side is
above 16 (the ones the default projects), per method: full training (the base optimizer continued with its
warm-up state), the default, and GaLore and APOLLO at x1 and x4 (rank matched to the default's state, as in the
harness). Every method continues from the same switch on the same batches; the table gives each method's mean
step length as a multiple of the default's, per seed and on average. Writes the "step-length" section of
docs/benchmarks.md; ``--quick``: the harness's smoke configuration of the task (40 steps, the switch at 20).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import base_rates, harness, peers
from . import harness_tasks as tasks
from .report import machine, write_section

#: the peers measured beside full training and the default: (family, rate factor)
PEER_ROWS = {"galore": ("galore", 1), "galore_lr4": ("galore", 4), "apollo": ("apollo", 1),
             "apollo_lr4": ("apollo", 4)}


def step_lengths(task: tasks.Task, model: torch.nn.Module, optimizer, seed: int, steps: int) -> list[float]:
    """The relative length of each of the ``steps`` steps after the switch (the harness's batches and rates)."""
    data = tasks.load(task.data)
    matrices = harness.projectable(model)
    lengths = []
    for step in range(task.switch, task.switch + steps):
        before = [p.detach().clone() for p in matrices]
        tasks.train(model, optimizer, data, seed, step, step + 1, task.batch, task.lr_factor)
        moved = sum(float((p.detach() - b).square().sum()) for p, b in zip(matrices, before))
        lengths.append((moved / sum(float(b.square().sum()) for b in before)) ** 0.5)
    return lengths


def measure(task: tasks.Task, seed: int, steps: int, folder: Path) -> dict[str, list[float]]:
    """Each method's step lengths on one seed."""
    from cmd_optim import CMDOptimizer

    data = tasks.load(task.data)
    model = tasks.build(task, seed)
    full = task.optimizer_class(model.parameters(), **task.base_kwargs)
    tasks.train(model, full, data, seed, 0, task.switch, task.batch, task.lr_factor)
    checkpoint = folder / f"{seed}.pt"
    torch.save(model.state_dict(), checkpoint)
    rows = {"full": step_lengths(task, model, full, seed, steps)}
    model = tasks.build(task, seed)
    cmd = CMDOptimizer(model, base=task.optimizer_class, switch_after=task.switch, seed=seed, **task.base_kwargs)
    tasks.train(model, cmd, data, seed, 0, task.switch, task.batch, task.lr_factor)
    target = cmd.state_bytes
    rows["default"] = step_lengths(task, model, cmd, seed, steps)
    for name, (family, scale) in PEER_ROWS.items():
        if family == "apollo" and task.base != "AdamW":
            continue
        model = tasks.build(task, seed)
        model.load_state_dict(torch.load(checkpoint))
        rank, _ = harness._galore_rank(task, seed, model, target, checkpoint.with_suffix(".rank.json"))
        kwargs = {**task.base_kwargs, "lr": task.base_kwargs["lr"] * scale}
        params = list(model.parameters())
        optimizer = (peers.galore(params, rank, task.base, kwargs) if family == "galore"
                     else peers.apollo(params, rank, kwargs))
        rows[name] = step_lengths(task, model, optimizer, seed, steps)
    return rows


def table(per_seed: list[dict[str, list[float]]]) -> str:
    """Each method's mean step length over the default's, per seed and averaged, and the default's own."""
    lines = ["| method | mean step / the default's | per seed | first step / the default's |", "|---|---|---|---|"]
    for name in per_seed[0]:
        ratios = [statistics.fmean(seed[name]) / statistics.fmean(seed["default"]) for seed in per_seed]
        first = statistics.fmean(seed[name][0] / seed["default"][0] for seed in per_seed)
        lines.append(f"| {name} | {statistics.fmean(ratios):.2f} | {', '.join(f'{r:.2f}' for r in ratios)} | "
                     f"{first:.2f} |")
    default = statistics.fmean(statistics.fmean(seed["default"]) for seed in per_seed)
    return "\n".join(lines) + f"\n\nThe default's mean step: {default:.2e} of the matrices' norm."


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(tasks.TASKS), default="minilm_vader")
    parser.add_argument("--schedule", choices=["constant", "linear"], default="linear")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    task = harness.task_of(args.task, args.quick, base_rates.load_rates(args.schedule), args.schedule)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        per_seed = [measure(task, seed, args.steps, Path(folder)) for seed in range(args.seeds)]
    body = f"""## How far each method steps after the switch ({args.task}, {args.schedule} schedule)

The relative length ``||W_after - W_before|| / ||W_before||`` of each of the first {args.steps} steps after the
switch over the matrices the default projects, {task.base} {task.base_kwargs}, as a multiple of the default's
(benchmarks/step_length.py). A peer that leads by stepping further is leading on its rate, not its method.

Machine: {machine()}. Command: `python -m benchmarks.step_length --task {args.task} --schedule {args.schedule} \
--seeds {args.seeds} --steps {args.steps}` ({time.perf_counter() - start:.0f} s).

{table(per_seed)}
"""
    print(body)
    if not args.no_write:
        write_section("step-length", body)
    return body


if __name__ == "__main__":
    main()

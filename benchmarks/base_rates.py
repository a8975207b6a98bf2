"""Each harness task's base learning rate chosen by full training alone, no reduced method involved.

    python -m benchmarks.base_rates [--tasks ...] [--seeds 2] [--jobs 2] [--schedule linear]

For every task (the harness's and the held-out ones) the base optimizer trains in full from step 0 to T at the
task's written rate times each of ``SCALES``; the rate with the lowest mean validation loss over the seeds is
the task's *tuned* rate (a rate whose run diverged on any seed is never chosen). ``python -m benchmarks.harness
--tuned-rates`` then runs every method at those rates. Writes benchmarks/results/base_rates.json and the
"base-rates" section of docs/benchmarks.md. With ``--schedule linear`` every run decays its rate linearly to 0
at the last step (the rate chosen is the peak), into benchmarks/results/base_rates_linear.json and the
"base-rates-linear" section. A run of some tasks keeps the file's earlier records of the others.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from . import harness_tasks as tasks
from .report import machine, write_section

RESULTS = Path(__file__).resolve().parent / "results" / "base_rates.json"


def results_of(schedule: str = "constant") -> Path:
    """Where the rates chosen on ``schedule`` go (the constant rate's: :data:`RESULTS`)."""
    return RESULTS if schedule == "constant" else RESULTS.with_name(f"base_rates_{schedule}.json")
SCALES = (0.3, 1.0, 3.0, 10.0, 30.0)


def full_run(name: str, scale: float, seed: int, schedule: str = "constant") -> dict:
    """The base optimizer trained in full for the whole run at the task's rate times ``scale`` (its peak, on
    ``schedule``)."""
    task = dataclasses.replace(tasks.TASKS[name], schedule=schedule)
    lr = task.base_kwargs["lr"] * scale
    model, data = tasks.build(task, seed), tasks.load(task.data)
    optimizer = task.optimizer_class(model.parameters(), **{**task.base_kwargs, "lr": lr})
    diverged = tasks.train(model, optimizer, data, seed, 0, task.steps, task.batch, task.lr_factor)
    result = tasks.evaluate(model, data) if diverged is None else dict(val_loss=None, val_acc=None)
    return dict(task=name, scale=scale, lr=lr, seed=seed, schedule=schedule, diverged_at=diverged, **result)


def choose(records: list[dict]) -> dict[str, float]:
    """Per task, the rate of the lowest mean validation loss among the rates that never diverged."""
    chosen = {}
    for name in dict.fromkeys(r["task"] for r in records):
        means = {}
        for scale in SCALES:
            rows = [r for r in records if r["task"] == name and r["scale"] == scale]
            if rows and all(r["val_loss"] is not None for r in rows):
                means[rows[0]["lr"]] = statistics.mean(r["val_loss"] for r in rows)
        if means:
            chosen[name] = min(means, key=means.get)
    return chosen


def tuned(name: str, rates: dict[str, float]) -> tasks.Task:
    """The task at its tuned rate (its written rate where ``rates`` has none)."""
    task = tasks.TASKS[name]
    if name not in rates:
        return task
    return dataclasses.replace(task, base_kwargs={**task.base_kwargs, "lr": rates[name]})


def load_rates(schedule: str = "constant") -> dict[str, float]:
    """The tuned rate of each task chosen on ``schedule``."""
    path = results_of(schedule)
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run `python -m benchmarks.base_rates"
                         f"{'' if schedule == 'constant' else ' --schedule ' + schedule}` first")
    return json.loads(path.read_text())["chosen"]


def section(payload: dict) -> str:
    records, meta, chosen = payload["records"], payload["meta"], payload["chosen"]
    header = " | ".join(f"x{s:g}" for s in SCALES)
    lines = [f"| task | base | written lr | {header} | chosen lr |", "|---|---|---|" + "---|" * len(SCALES) + "---|"]
    for name in dict.fromkeys(r["task"] for r in records):
        task = tasks.TASKS[name]
        cells = []
        for scale in SCALES:
            rows = [r for r in records if r["task"] == name and r["scale"] == scale]
            losses = [r["val_loss"] for r in rows]
            cells.append("diverged" if any(v is None for v in losses) else
                         f"{statistics.mean(losses):.4f}" if losses else "-")
        lines.append(f"| {name} | {task.base} | {task.base_kwargs['lr']:g} | {' | '.join(cells)} | "
                     f"{chosen.get(name, float('nan')):g} |")
    schedule = meta.get("schedule", "constant")
    title, which = ("", "") if schedule == "constant" else (
        f", {schedule} decay", f" --schedule {schedule}` and `python -m benchmarks.paired --schedule {schedule}")
    return f"""## Base rates chosen by full training{title}

Validation loss of the base optimizer trained in full for the whole run (mean over {meta['seeds']} seeds) at the
task's written rate times each factor{"" if schedule == "constant" else f" (the peak of a {schedule} decay to 0 at the last step)"}; the
lowest is the task's tuned rate, which `python -m benchmarks.harness --tuned-rates{which}` use for every method
(warm-up included). No reduced method takes part in the choice.

Machine: {meta['machine']} (one thread per worker). Command: `{meta['command']}` ({meta['total_s']:.0f} s).

{chr(10).join(lines)}
"""


def main(argv: list[str] | None = None) -> dict:
    from .harness import DEFAULT_TASKS, HELD_OUT_TASKS, _worker_init

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(tasks.TASKS), default=DEFAULT_TASKS + HELD_OUT_TASKS)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--schedule", choices=tasks.SCHEDULES, default="constant",
                        help=f"the learning-rate schedule of the runs (results: {results_of('linear').name})")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    units = [(name, scale, seed, args.schedule) for name in args.tasks for scale in SCALES
             for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        records = list(pool.map(full_run, *zip(*units)))
    for r in records:
        print(f"{r['task']:15} x{r['scale']:<4g} seed {r['seed']}: {r['val_loss']}", flush=True)
    command = "python -m benchmarks.base_rates" + (
        f" --tasks {' '.join(args.tasks)}" if args.tasks != DEFAULT_TASKS + HELD_OUT_TASKS else "") + (
        f" --schedule {args.schedule}" if args.schedule != "constant" else "") + f" --seeds {args.seeds}"
    meta = dict(machine=machine(), command=command, seeds=args.seeds, schedule=args.schedule,
                total_s=time.perf_counter() - start)
    if results_of(args.schedule).exists() and not args.no_write:  # keep the tasks an earlier run chose for
        earlier = json.loads(results_of(args.schedule).read_text())
        kept = [r for r in earlier["records"] if r["task"] not in args.tasks]
        if kept:
            records = kept + records
            meta.update(command=f"{earlier['meta']['command']}; then {command}",
                        total_s=earlier["meta"]["total_s"] + meta["total_s"])
    payload = dict(meta=meta, records=records, chosen=choose(records))
    print(section(payload))
    if not args.no_write:
        results_of(args.schedule).write_text(json.dumps(payload, indent=1))
        write_section("base-rates" + ("" if args.schedule == "constant" else f"-{args.schedule}"), section(payload))
    return payload


if __name__ == "__main__":
    main()

"""Paired seeds: is the default behind a peer, or within seed noise of it?

    python -m benchmarks.paired [--seeds 10] [--tasks ...] [--schedule linear] [--report] [--no-write]

Every row of the task harness continues from the same base run's state at the switch, on the same batches,
so its seeds pair: per task and seed, the default's final validation loss minus that of each peer family at
its better rate (the one with the lower mean over the seeds, as the harness summary picks it). The section
gives, per task and family, the mean of that difference, its 95% t-interval over the seeds, and on how many
seeds the default is ahead; a family is "ahead of CMD" only where the whole interval lies above 0 and
"behind CMD" only where it lies below. Runs the harness at the tuned base rates (``--tuned-rates``) on the
small tasks, where ten seeds cost minutes; writes benchmarks/results/harness_paired.json and the "paired"
section of docs/benchmarks.md. ``--report`` rewrites the section from the JSON. ``--schedule linear``: every
row's rate decays linearly to 0 at the last step (the Hugging Face Trainer's default), from the peak rates full
training chose on that schedule (``python -m benchmarks.base_rates --schedule linear``), into
benchmarks/results/harness_paired_linear.json and the "paired-linear" section.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from scipy import stats

from . import harness
from .report import machine, write_json, write_section

RESULTS = Path(__file__).resolve().parent / "results" / "harness_paired.json"
TASKS = ["digits_mlp", "digits_mlp_late", "digits_bn_cnn", "mnist1d_gru", "mnist1d_gru_late", "mnist1d_rescnn"]
#: what the default is compared with: each peer family's two rates, and the base trained in full at x0.25, x1
#: and x4 from the switch
FAMILIES = {**harness.FRONTIER, "full training": ("full", "full_lr025", "full_lr4")}
#: the default's rows: at the user's rate; and given the rates the peers take (x0.25: the step GaLore's scale
#: 0.25 takes at its x1; x4: GaLore's and APOLLO's second rate, which their unprojected parameters take in full)
CMD_ROWS = {"default at the base rate": ("default",),
            "default, best of x0.25, x1 and x4": ("default", "default_lr025", "default_lr4")}
METHODS = [*dict.fromkeys(row for rows in (*FAMILIES.values(), *CMD_ROWS.values()) for row in rows)]


def differences(records: list[dict], task: str, rows: tuple[str, ...],
                mine_rows: tuple[str, ...] = ("default",)) -> tuple[str, str, list[float]] | None:
    """The row of ``mine_rows`` and the peer row of ``rows`` with the lower mean loss on ``task`` each, and the
    first's loss minus the second's per seed they share (None if either side did not run on that task). A row
    with a seed that diverged or did not run (no finite loss) is out, as in the harness summary."""
    def losses(method) -> dict[int, float] | None:
        mine = [r for r in records if r["task"] == task and r["method"] == method]
        finite = {r["seed"]: r["val_loss"] for r in mine if r.get("val_loss") is not None
                  and math.isfinite(r["val_loss"])}
        return finite if mine and len(finite) == len(mine) else None

    def better(candidates) -> str | None:
        ran = {row: found for row in candidates if (found := losses(row))}
        return min(ran, key=lambda row: statistics.mean(ran[row].values())) if ran else None

    mine, best = better(mine_rows), better(rows)
    if mine is None or best is None:
        return None
    ours, theirs = losses(mine), losses(best)
    return mine, best, [ours[s] - theirs[s] for s in sorted(set(ours) & set(theirs))]


def interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the ``level`` t-interval of ``values`` (at least two)."""
    mean = statistics.mean(values)
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
    return "peer ahead" if low > 0 else "CMD ahead" if high < 0 else "within noise"


def table(records: list[dict], tasks: list[str]) -> str:
    """The section's table, then one line per verdict naming its (task, family) pairs."""
    blocks = []
    for title, mine_rows in CMD_ROWS.items():
        lines, verdicts = [], {}
        for task in tasks:
            for family, rows in FAMILIES.items():
                found = differences(records, task, rows, mine_rows)
                if found is None or len(found[2]) < 2:
                    continue
                mine, row, diffs = found
                mean, low, high = interval(diffs)
                verdicts.setdefault(verdict(low, high), []).append(f"{task} ({family})")
                lines.append(f"| {task} | {mine} | {family} ({row}) | {len(diffs)} | {mean:+.4f} [{low:+.4f}, "
                             f"{high:+.4f}] | {sum(d < 0 for d in diffs)}/{len(diffs)} | {verdict(low, high)} |")
        if not lines:
            continue
        head = [f"**{title}.**", "", "| task | CMD row | compared with (better rate) | seeds | CMD's loss - theirs: mean "
                "[95% interval] | seeds CMD ahead | verdict |", "|---|---|---|---|---|---|---|"]
        counts = [f"- {name}: {len(pairs)} ({', '.join(pairs)})" for name, pairs in sorted(verdicts.items())]
        blocks.append("\n".join([*head, *lines, "", *counts]))
    return "\n\n".join(blocks)


def results_of(schedule: str = "constant") -> Path:
    """The JSON of a run on ``schedule`` (the constant rate's: :data:`RESULTS`)."""
    return RESULTS if schedule == "constant" else RESULTS.with_name(f"harness_paired_{schedule}.json")


def report(payload: dict, doc_write: bool = True) -> str:
    meta, records = payload["meta"], payload["records"]
    tasks = list(dict.fromkeys(r["task"] for r in records))
    seeds = len({r["seed"] for r in records})
    schedule = meta.get("schedule", "constant")
    title, rates = ("", "Base rates tuned\nby full training (section \"Task harness at tuned base rates\")") if schedule == "constant" else (
        f", {schedule} decay", f"Every row's rate decays {schedule}ly to 0 at the last step (the Hugging Face\n"
        f"Trainer's default), from the peak rates full training chose on that schedule (section \"Base rates chosen\n"
        f"by full training, {schedule} decay\")")
    body = f"""## Paired seeds{title}: behind, or within noise?

Each harness row continues from the same state at the switch on the same batches, so seeds pair: the table
gives, per task, the default's final validation loss minus the better rate of each peer family, seed by seed
(negative: CMD lower). A family is "ahead" only where the whole 95% t-interval is on its side. {rates};
peers at equal optimizer memory (GaLore, APOLLO) and equal trainable numbers (LoRA), as there.

Machine: {meta["machine"]}; commit {meta["commit"]}. Command: `{meta.get("command", f"python -m benchmarks.paired --seeds {seeds}")}`
({meta["total_s"]:.0f} s).

{table(records, tasks)}
"""
    if doc_write:
        write_section("paired" + ("" if schedule == "constant" else f"-{schedule}"), body)
    return body


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=TASKS)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--schedule", choices=harness.tasks.SCHEDULES, default="constant")
    parser.add_argument("--json", type=Path, help=f"default {RESULTS.name}, or {results_of('linear').name}")
    parser.add_argument("--report", action="store_true", help="only rewrite the doc section from the JSON")
    parser.add_argument("--no-write", action="store_true", help="print the table; write no JSON or doc")
    args = parser.parse_args(argv)
    args.json = args.json or results_of(args.schedule)
    if args.report:
        payload = json.loads(args.json.read_text())
    else:
        rates = harness.base_rates.load_rates(args.schedule)
        schedule = "" if args.schedule == "constant" else f" --schedule {args.schedule}"
        meta = dict(machine=machine(), commit=harness._commit(), rates=rates, schedule=args.schedule,
                    command=f"python -m benchmarks.paired --seeds {args.seeds} --tasks {' '.join(args.tasks)}{schedule}")
        start = time.perf_counter()
        records = harness.measure(args.tasks, METHODS, args.seeds, args.jobs, False, rates=rates,
                                  schedule=args.schedule)
        harness.add_recovery(records)
        payload = dict(meta={**meta, "total_s": time.perf_counter() - start}, records=records)
        if not args.no_write:
            write_json(args.json, payload)
    print(report(payload, doc_write=not args.no_write))
    return payload


if __name__ == "__main__":
    main()

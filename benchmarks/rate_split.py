"""Which parameters a longer step helps: a peer's lead at lr x4, split between the projected matrices and the rest.

    python -m benchmarks.rate_split [--task minilm_vader] [--schedule linear] [--seeds 6] [--report] [--no-write]

GaLore and APOLLO at lr x4 take four times the rate on every parameter: on the matrices they project and on
what they train in full (biases, norms, a new classifier head). Where such a row leads the default, this runs
the default at x4 on the projectable matrices only (``default_proj4``), on the rest only (``default_free4``)
and on both (``default_lr4``), beside the peers, all continued from the same switch on the same batches (the
task harness's rows, at the base rate full training chose on the schedule), and gives each row's final
validation loss minus the peer's at x4, seed by seed, with a 95% t-interval. Writes
benchmarks/results/rate_split.json and the "rate-split" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from . import base_rates, harness, paired
from . import harness_tasks as tasks
from .report import add_output_arguments, machine, write_json, write_section

RESULTS = Path(__file__).resolve().parent / "results" / "rate_split.json"
ROWS = ["full", "default", "default_proj4", "default_free4", "default_lr4", "apollo", "apollo_lr4"]
#: the rows every other is compared with, seed by seed
AGAINST = ["apollo_lr4", "full"]


def compare(records: list[dict], task: str, row: str, other: str) -> tuple[float, float, float, list[float]] | None:
    """``row``'s final loss minus ``other``'s, seed by seed: mean, 95% interval and the differences (None
    without two shared seeds)."""
    found = paired.differences(records, task, (other,), (row,)) if other != row else None
    if found is None or len(found[2]) < 2:
        return None
    return (*paired.interval(found[2]), found[2])


def table(records: list[dict], task: str) -> str:
    """Per row: the seeds' mean loss, and its paired difference with each row of :data:`AGAINST`."""
    head = " | ".join(f"loss - {row}'s: mean [95% interval], seeds lower, verdict" for row in AGAINST)
    lines = [f"| row | seeds | val loss (mean) | {head} |", "|---|---|---|" + "---|" * len(AGAINST)]
    for row in ROWS:
        losses = [r["val_loss"] for r in records if r["task"] == task and r["method"] == row
                  and r.get("val_loss") is not None]
        if not losses:
            continue
        cells = []
        for other in AGAINST:
            found = compare(records, task, row, other)
            if found is None:
                cells.append("-")
                continue
            mean, low, high, diffs = found
            verdict = f"{other} ahead" if low > 0 else f"{row} ahead" if high < 0 else "within noise"
            cells.append(f"{mean:+.4f} [{low:+.4f}, {high:+.4f}], {sum(d < 0 for d in diffs)}/{len(diffs)}, {verdict}")
        lines.append(f"| {row} | {len(losses)} | {statistics.fmean(losses):.4f} | {' | '.join(cells)} |")
    return "\n".join(lines)


def reading(records: list[dict], task: str) -> str:
    """Where each CMD row and APOLLO x1 stand against ``apollo_lr4`` (behind, level or ahead), in words."""
    words = []
    for row in ROWS[1:-1]:
        if (found := compare(records, task, row, "apollo_lr4")) is not None:
            mean, low, high, _ = found
            words.append(f"`{row}` {'behind' if low > 0 else 'ahead' if high < 0 else 'level'} ({mean:+.4f})")
    return "Against `apollo_lr4`: " + ", ".join(words) + "." if words else ""


def report(payload: dict, write: bool = True) -> str:
    meta, records = payload["meta"], payload["records"]
    task = tasks.TASKS[meta["task"]]
    body = f"""## Which parameters a longer step helps ({meta["task"]}, {meta["schedule"]} schedule)

A peer at lr x4 takes four times the rate on every parameter. Here the default takes x4 from the switch on the
projectable matrices only (`default_proj4`: the matrices whose shorter side is above 16, which it projects), on
the other parameters only (`default_free4`: biases, norms, the new head) and on both (`default_lr4`), beside
APOLLO at x1 and x4 and the base in full, all from the same switch on the same batches, at the base rate full
training chose on the schedule ({task.base}, the task harness's rows; benchmarks/rate_split.py). Each row's
final validation loss minus that of `apollo_lr4` and of `full`, seed by seed ("seeds lower": seeds on which
the row's loss is the lower).

Machine: {meta["machine"]}; commit {meta["commit"]}. Command: `{meta["command"]}` ({meta["total_s"]:.0f} s).

{table(records, meta["task"])}

{reading(records, meta["task"])}
"""
    print(body)
    if write:
        write_section("rate-split", body)
    return body


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(tasks.TASKS), default="minilm_vader")
    parser.add_argument("--schedule", choices=tasks.SCHEDULES, default="linear")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the harness's smoke configuration of the task")
    add_output_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    if args.report:
        payload = json.loads(args.json.read_text())
        report(payload)
        return payload
    command = (f"python -m benchmarks.rate_split --task {args.task} --schedule {args.schedule} --seeds {args.seeds}"
               + (" --quick" if args.quick else ""))
    start = time.perf_counter()
    records = harness.measure([args.task], ROWS, args.seeds, args.jobs, args.quick,
                              rates=base_rates.load_rates(args.schedule), schedule=args.schedule)
    payload = dict(meta=dict(machine=machine(), commit=harness._commit(), command=command, task=args.task,
                             schedule=args.schedule, total_s=time.perf_counter() - start), records=records)
    if not args.no_write:
        write_json(args.json, payload)
    report(payload, write=not args.no_write)
    return payload


if __name__ == "__main__":
    main()

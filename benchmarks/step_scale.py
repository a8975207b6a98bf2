"""How far the reduced phase steps: longer steps against the base's own, seed-paired.

    python -m benchmarks.step_scale [--seeds 10] [--lm-seeds 3] [--report] [--no-write]

The harness rows ``lowrank_scale1`` (``LowRank(step_scale=1)``: the base's step), ``lowrank_scale2`` and
``lowrank_scale4`` (2 and 4 times it, uncapped) and ``default`` (up to 4 times it, capped at the schedule's peak
rate) (benchmarks/harness.py), at the base rates full training chose, on both learning-rate schedules (constant,
and linear decay to 0 at the last step): the six small tasks of benchmarks/paired.py at ``--seeds``, the two
language models at ``--lm-seeds``. Every row continues from the same switch on the same batches, so the seeds
pair: per schedule and task, each row's final validation loss minus the base step's, its mean and 95%
t-interval. This is the research behind the default's step: a longer step is a default candidate only if it is
behind the base's step nowhere. Writes benchmarks/results/step_scale.json and the "step-scale" section of
docs/benchmarks.md; ``--report`` rewrites the section from the JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from . import harness, paired
from .report import add_output_arguments, machine, write_json, write_section

RESULTS = Path(__file__).resolve().parent / "results" / "step_scale.json"
BASELINE = "lowrank_scale1"
#: each row compared with the base's step, and its heading
ROWS = {"lowrank_scale2": "step_scale=2 uncapped", "lowrank_scale4": "step_scale=4 uncapped",
        "default": "the default (step_scale=4, capped at the peak)"}
LANGUAGE_MODELS = ["char_lm", "gpt2_finetune"]
SCHEDULES = ("constant", "linear")


def differences(records: list[dict], schedule: str, task: str, row: str) -> list[float]:
    """``row``'s loss minus the base step's, per seed both finished (a seed that diverged: +inf)."""
    def losses(method):
        return {r["seed"]: (r["val_loss"] if r.get("val_loss") is not None else float("inf")) for r in records
                if r["schedule"] == schedule and r["task"] == task and r["method"] == method}

    mine, base = losses(row), losses(BASELINE)
    return [mine[s] - base[s] for s in sorted(set(mine) & set(base))]


def table(records: list[dict]) -> str:
    lines = ["| schedule | task | seeds | step_scale=1's loss | " + " | ".join(
        f"{title} - step_scale=1: mean [95% interval], seeds ahead" for title in ROWS.values()) + " |",
        "|---|---|---|---|" + "---|" * len(ROWS)]
    behind = {row: [] for row in ROWS}
    for schedule in SCHEDULES:
        for task in dict.fromkeys(r["task"] for r in records if r["schedule"] == schedule):
            base = [r["val_loss"] for r in records if r["schedule"] == schedule and r["task"] == task
                    and r["method"] == BASELINE and r.get("val_loss") is not None]
            cells = []
            for row in ROWS:
                diffs = differences(records, schedule, task, row)
                if not all(map(math.isfinite, diffs)):
                    cells.append(f"diverged on {sum(not math.isfinite(d) for d in diffs)} of {len(diffs)} seeds")
                    behind[row].append(f"{task} ({schedule})")
                    continue
                if len(diffs) < 2:
                    cells.append("-")
                    continue
                mean, low, high = paired.interval(diffs)
                if low > 0:
                    behind[row].append(f"{task} ({schedule})")
                cells.append(f"{mean:+.4f} [{low:+.4f}, {high:+.4f}], {sum(d < 0 for d in diffs)}/{len(diffs)}")
            lines.append(f"| {schedule} | {task} | {len(base)} | {statistics.mean(base):.4f} | {' | '.join(cells)} |")
    lines.append("")
    for row, title in ROWS.items():
        lines.append(f"- {title} behind step_scale=1 (interval above 0) on {len(behind[row])}: "
                     f"{', '.join(behind[row]) or 'none'}")
    return "\n".join(lines)


def report(payload: dict, doc_write: bool = True) -> str:
    meta = payload["meta"]
    body = f"""## How far the reduced phase steps: step_scale 2 and 4 against 1

`LowRank(step_scale=s, peak_cap=False)` moves every projected matrix s times the step the base took on its
core and its residual (the parameters trained in full and weight decay keep the base's rate); the default,
`LowRank(step_scale=4, peak_cap=True)`, moves it `min(4, initial_lr / lr)` times (at least 1), so its rate never
exceeds the schedule's peak: at a constant rate it is the base's step. Each row continues from the same
switch on the same batches, at the base rates full training chose for each schedule, so the seeds pair:
the row's final validation loss minus step_scale=1's (negative: the longer step is better).

Machine: {meta["machine"]}; commit {meta["commit"]}. Command: `{meta["command"]}` ({meta["total_s"]:.0f} s).

{table(payload["records"])}
"""
    if doc_write:
        write_section("step-scale", body)
    return body


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds of the six small tasks")
    parser.add_argument("--lm-seeds", type=int, default=3, help="seeds of the two language models")
    parser.add_argument("--jobs", type=int, default=2)
    add_output_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    if args.report:
        payload = json.loads(args.json.read_text())
    else:
        start, records = time.perf_counter(), []
        methods = [BASELINE, *ROWS]
        for schedule in SCHEDULES:
            rates = harness.base_rates.load_rates(schedule)
            for names, seeds in ((paired.TASKS, args.seeds), (LANGUAGE_MODELS, args.lm_seeds)):
                found = harness.measure(names, methods, seeds, args.jobs, False, rates=rates, schedule=schedule)
                records += [dict(r, schedule=schedule) for r in found if r["method"] in methods]
        meta = dict(machine=machine(), commit=harness._commit(), total_s=time.perf_counter() - start,
                    command=f"python -m benchmarks.step_scale --seeds {args.seeds} --lm-seeds {args.lm_seeds}")
        payload = dict(meta=meta, records=records)
        if not args.no_write:
            write_json(args.json, payload)
    print(report(payload, doc_write=not args.no_write))
    return payload


if __name__ == "__main__":
    main()

"""CMD under FSDP2 (``fully_shard``) on gloo CPU processes, beside plain FSDP2: test accuracy, optimizer state
and bytes sent per rank, whole-step time, and the weights against one process on the same global batches.

    python -m benchmarks.fsdp [--world 2] [--steps 600] [--no-write]

The digits MLP of benchmarks/quality.py at hidden width 512 (64-512-512-10, 301,066 parameters), ``fully_shard``
on each Linear and then on the root; every row trains from the same init on the same global batches of 64 (each
rank its share), with quality's digits settings (SGD 0.05 momentum 0.9, AdamW 1e-3), CMD switching at half the
steps. Bytes: what this rank hands to each collective (an all-gather's input is its shard, a reduce-scatter's the
whole unsharded gradient, an all-reduce's or broadcast's the tensor), counted on every step by a
``TorchDispatchMode`` that sees the c10d and functional collectives: those issued in forward and backward are
FSDP2's own, those in ``optimizer.step()`` CMD's extra. Time: the median of ``TIMED_STEPS`` more whole steps
after the run (forward, backward with FSDP2's collectives, step), uncounted, the rows taking turns.
Writes benchmarks/results/fsdp.json and the "fsdp" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from cmd_optim import CMDOptimizer, LowRank
from cmd_optim.optim import optimizer_state_bytes

from . import quality
from .processes import leave_process_group
from .report import machine, write_section

RESULTS = Path(__file__).resolve().parent / "results" / "fsdp.json"
TIMED_STEPS = 40
WIDTH = 512


@dataclasses.dataclass(frozen=True)
class Row:
    """A table row: ``base`` ("SGD" or "AdamW", quality's digits settings) under FSDP2, alone (``cmd`` None)
    or wrapped in CMDOptimizer with the keywords ``cmd`` (empty: the default reduction)."""
    name: str
    base: str
    cmd: dict | None = None


ROWS = (
    Row("FSDP2 + AdamW", "AdamW"),
    Row("FSDP2 + SGD", "SGD"),
    Row("CMD(AdamW), default (low-rank)", "AdamW", {}),
    Row("CMD(SGD), default (low-rank)", "SGD", {}),
    Row("CMD(SGD), modes=10", "SGD", {"reduction": "modes", "modes": 10}),
    # Reductions whose FSDP2 support is being built: each runs if CMDOptimizer accepts the sharded model, else its
    # refusal is reported in the row's place.
    Row("CMD(SGD), gradual", "SGD", {"reduction": "gradual"}),
)

#: the argument holding what this rank hands to each collective (c10d's in-place ops and the functional ones)
_SENT = {"_allgather_base_": 1, "_reduce_scatter_base_": 1, "allgather_": 1, "allreduce_": 0, "broadcast_": 0,
         "all_gather_into_tensor": 0, "reduce_scatter_tensor": 0, "all_reduce": 0, "broadcast": 0}
_NOT_SENT = {"wait_tensor", "barrier", "_wrap_tensor_autograd"}


class Collectives(TorchDispatchMode):
    """While active, adds the bytes this rank hands to each collective to ``sent[part, op name]``; the caller
    sets ``part``. An unknown collective raises (nothing goes uncounted)."""

    def __init__(self):
        super().__init__()
        self.part = "fsdp"
        self.sent = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs it as plain ops and collectives, which come back here
        name = func._overloadpacket.__name__
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional") and name not in _NOT_SENT:
            if name not in _SENT:
                raise RuntimeError(f"benchmarks.fsdp does not count the collective {func}")
            sent = args[_SENT[name]]
            self.sent[self.part, name] += sum(t.numel() * t.element_size()
                                              for t in (sent if isinstance(sent, (list, tuple)) else [sent]))
        return func(*args, **(kwargs or {}))


def _task(steps: int) -> quality.Task:
    task = dataclasses.replace(quality.TASKS["digits"], name=f"digits MLP 64-{WIDTH}-{WIDTH}-10",
                               model=functools.partial(quality._mlp, WIDTH), steps=steps, warmup=steps // 2)
    task.data = task.load()
    return task


def _optimizer(model: nn.Module, row: Row, task: quality.Task, refresh_every: int | None):
    """The row's optimizer; ``refresh_every`` (None: CMD's default) for the low-rank rows."""
    cls, settings = task.optimizer(row.base)
    if row.cmd is None:
        return cls(model.parameters(), **settings)
    extra = dict(row.cmd)
    if extra:  # the mode and gradual reductions fit snapshots of the warm-up: 30 of them
        extra["snapshot_every"] = max(task.warmup // 30, 1)
    elif refresh_every is not None:
        extra["reduction"] = LowRank(refresh_every=refresh_every)
    return CMDOptimizer(model, base=cls, switch_after=task.warmup, seed=0, **extra, **settings)


def _shard(model: nn.Module) -> nn.Module:
    """``fully_shard`` on each Linear, then on the root ("per block", no mesh given)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


class _Sharded:
    """One row on this rank: its run (model and batches), optimizer, and the bytes of each step (``steps``:
    label, FSDP2's bytes, CMD's bytes) and of each collective (``sent``: (label, part, op) -> bytes)."""

    def __init__(self, row: Row, task: quality.Task, refresh_every: int | None, rank: int, world: int):
        self.row, self.run = row, quality.Run(task, seed=0)
        _shard(self.run.model)
        self.optimizer = _optimizer(self.run.model, row, task, refresh_every)
        share = task.batch // world
        self.mine = slice(rank * share, (rank + 1) * share)
        self.steps, self.sent, self.seconds, self.at_switch = [], collections.Counter(), [], None

    def _label(self, before: str, refresh: bool) -> str:
        """warmup, switch (the step that switched), refresh (a low-rank refresh), reduced; plain rows: warmup
        for the first ``warmup`` steps (as CMD's, its switch step the last), reduced after."""
        if self.row.cmd is None:
            return "warmup" if len(self.steps) < self.run.task.warmup else "reduced"
        if before == "warmup":
            return "switch" if self.optimizer.phase == "reduced" else "warmup"
        return "refresh" if refresh else "reduced"

    def step(self, index: int, counted: bool) -> None:
        """Train on this rank's share of global batch ``index``: its bytes recorded (``counted``) or timed."""
        x, y = self.run.batch(index)
        x, y = x[self.mine], y[self.mine]
        cmd = isinstance(self.optimizer, CMDOptimizer)
        before = self.optimizer.phase if cmd else ""
        refresh = cmd and bool(getattr(self.optimizer.reduced_phase, "refresh_due", False))
        if not counted:
            dist.barrier()
            start = time.perf_counter()
            self._step(x, y)
            self.seconds.append(time.perf_counter() - start)
            return
        with Collectives() as counter:
            self._step(x, y, counter)
        label = self._label(before, refresh)
        self.steps.append((label, counter.sent.total() - _part(counter.sent, "cmd"), _part(counter.sent, "cmd")))
        for (part, op), sent in counter.sent.items():
            self.sent[label, part, op] += sent
        if len(self.steps) == self.run.task.warmup:  # CMD's switch step
            self.at_switch = _snapshot(self.run.model, self.optimizer)

    def _step(self, x, y, counter: Collectives | None = None) -> None:
        nn.functional.cross_entropy(self.run.model(x), y).backward()
        if counter is not None:
            counter.part = "cmd"
        self.optimizer.step()
        self.optimizer.zero_grad()


def _part(sent: collections.Counter, part: str) -> int:
    return sum(v for (p, _), v in sent.items() if p == part)


def _snapshot(model: nn.Module, optimizer) -> dict:
    """The whole weights (a DTensor's all-gathered) and the bytes of optimizer state this process holds."""
    params = [p.full_tensor() if isinstance(p, DTensor) else p.clone() for p in model.parameters()]
    return {"params": [p.detach() for p in params], "state_bytes": optimizer_state_bytes(optimizer)}


def _one_process(row: Row, task: quality.Task, refresh_every: int | None) -> dict:
    """The row trained by one process on the whole global batches: test accuracy, and its weights and state
    bytes at the switch step and at the end."""
    run = quality.Run(task, seed=0)
    optimizer = _optimizer(run.model, row, task, refresh_every)
    for index in range(task.steps):
        x, y = run.batch(index)
        nn.functional.cross_entropy(run.model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if index + 1 == task.warmup:
            at_switch = _snapshot(run.model, optimizer)
    return {"accuracy": run.accuracy(), "at_switch": at_switch, **_snapshot(run.model, optimizer)}


def _worker(rank, world, folder, rows, steps, refresh_every, timed):
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    task = _task(steps)
    trainers, refused = [], {}
    for row in rows:
        try:
            trainers.append(_Sharded(row, task, refresh_every, rank, world))
        except (TypeError, ValueError, NotImplementedError) as error:  # a reduction not built for FSDP2 yet
            refused[row.name] = str(error)
    for index in range(steps + timed):  # the rows take turns, each step in another order
        shift = index % len(trainers)
        for trainer in trainers[shift:] + trainers[:shift]:
            trainer.step(index, counted=index < steps)
        if index == steps - 1:
            results = {t.row.name: _results(t) for t in trainers}
    for trainer in trainers:
        results[trainer.row.name]["seconds"] = trainer.seconds
    torch.save({"results": results, "refused": refused}, os.path.join(folder, f"rank{rank}.pt"))
    leave_process_group()


def _results(trainer: _Sharded) -> dict:
    """What a row measured over the run (every rank calls it: the weights are all-gathered)."""
    optimizer = trainer.optimizer
    return {"accuracy": trainer.run.accuracy(), "steps": trainer.steps,
            "sent": {"/".join(key): v for key, v in trainer.sent.items()},
            "switch_report": getattr(optimizer, "switch_report", None), "at_switch": trainer.at_switch,
            **_snapshot(trainer.run.model, optimizer)}


def summary(record: dict) -> dict:
    """Per step after the switch (this rank's bytes): FSDP2's median, CMD's most common value and the steps
    that differ from it (refreshes, rounds), the switch step's; state and time."""
    after = [(label, fsdp, cmd) for label, fsdp, cmd in record["steps"] if label in ("reduced", "refresh")]
    usual = statistics.mode(cmd for _, _, cmd in after)
    other = [(label, cmd) for label, _, cmd in after if cmd != usual]
    switch = [fsdp + cmd for label, fsdp, cmd in record["steps"] if label == "switch"]
    return {"fsdp_bytes": statistics.median(fsdp for _, fsdp, _ in after), "cmd_bytes": usual,
            "fsdp_bytes_range": [min(f for _, f, _ in after), max(f for _, f, _ in after)],
            "other_steps": len(other), "other_step_labels": sorted({label for label, _ in other}),
            "other_bytes_range": [min(c for _, c in other), max(c for _, c in other)] if other else None,
            "switch_step_bytes": switch[0] if switch else None,
            "step_seconds": statistics.median(record["seconds"])}


def _difference(sharded: dict, reference: dict) -> float:
    """The largest absolute difference of the weights of two snapshots (taken out of both)."""
    return max(float((p - q).abs().max()) for p, q in zip(sharded.pop("params"), reference.pop("params")))


def measure(world: int = 2, steps: int = 600, rows=ROWS, refresh_every: int | None = None,
            timed: int = TIMED_STEPS) -> dict:
    """Run ``rows`` on ``world`` gloo processes; per row: each rank's record and the summary (rank 0's)."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(world, folder, list(rows), steps, refresh_every, timed), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    out = {"world": world, "steps": steps, "timed": timed, "refused": ranks[0]["refused"], "rows": {}}
    task = _task(steps)
    for row in rows:
        if row.name not in ranks[0]["results"]:
            continue
        record = ranks[0]["results"][row.name]
        record["state_bytes_per_rank"] = [r["results"][row.name]["state_bytes"] for r in ranks]
        record["state_bytes_per_rank_at_switch"] = [r["results"][row.name]["at_switch"]["state_bytes"] for r in ranks]
        reference = _one_process(row, task, refresh_every)  # here: CMDOptimizer in a process group is a replica
        record["weight_difference"] = _difference(record, reference)
        record["weight_difference_at_switch"] = _difference(record.pop("at_switch"), reference["at_switch"])
        reference["state_bytes_at_switch"] = reference.pop("at_switch")["state_bytes"]
        out["rows"][row.name] = {**record, **summary(record), "one_process": reference, "base": row.base,
                                 "plain": row.cmd is None}
    for row in rows:
        if row.name in out["rows"]:
            plain = next(r.name for r in rows if r.cmd is None and r.base == row.base)
            out["rows"][row.name]["time_ratio"] = (out["rows"][row.name]["step_seconds"]
                                                   / out["rows"][plain]["step_seconds"])
    return out


def _bytes_range(low: int, high: int) -> str:
    return f"{low:,}" if low == high else f"{low:,} to {high:,}"


def section(result: dict, seconds: float) -> str:
    """The "fsdp" section of docs/benchmarks.md from :func:`measure`'s result and the run's seconds."""
    lines, costs = [], []
    plain = {r["base"]: r for r in result["rows"].values() if r["plain"]}
    for name, r in result["rows"].items():
        ranks = zip(r["state_bytes_per_rank_at_switch"], r["state_bytes_per_rank"])
        state = " / ".join(f"{a:,} -> {b:,}" for a, b in ranks)
        one = r["one_process"]
        other = (f"{_bytes_range(*r['other_bytes_range'])} at {r['other_steps']} "
                 f"{'refresh' if r['other_step_labels'] == ['refresh'] else 'other'} steps" if r["other_steps"] else "none")
        switch = f"{r['switch_step_bytes'] - r['fsdp_bytes']:,.0f}" if r["switch_step_bytes"] else "-"
        lines.append(f"| {name} | {r['accuracy']:.4f} ({one['accuracy']:.4f}) | {state} | "
                     f"{one['state_bytes_at_switch']:,} -> {one['state_bytes']:,} | {r['fsdp_bytes']:,.0f} | "
                     f"{r['cmd_bytes']:,} | {other} | {switch} | {r['time_ratio']:.2f} | "
                     f"{r['weight_difference_at_switch']:.1e} / {r['weight_difference']:.1e} |")
        base = plain[r["base"]]
        if not r["plain"] and r["time_ratio"] > 1:
            costs.append(f"- {name}: the whole step takes {r['time_ratio']:.2f}x plain FSDP2 + {r['base']}'s.")
        if not r["plain"] and max(r["state_bytes_per_rank"]) > max(base["state_bytes_per_rank"]):
            costs.append(f"- {name} holds more state per rank than plain FSDP2 + {r['base']}: "
                         f"{max(r['state_bytes_per_rank']):,} bytes against {max(base['state_bytes_per_rank']):,}.")
    refused = "".join(f"\n- {name}: not run, refused under FSDP2: {why}" for name, why in result["refused"].items())
    steps, world = result["steps"], result["world"]
    params = sum(p.numel() for p in quality._mlp(WIDTH).parameters())
    return f"""## CMD under FSDP2: state, bytes per rank and step time beside plain FSDP2

{_task(steps).name} ({params:,} parameters) on scikit-learn digits, `fully_shard` on each Linear and then on
the root, {world} gloo processes on the CPU (one thread each), global batch 64 split between them, {steps} steps,
CMD switching after {steps // 2}; every row from the same init on the same global batches. SGD 0.05 with momentum
0.9, AdamW 1e-3. Test accuracy: the sharded run's (one process's in brackets). State: `optimizer_state_bytes` on
each rank (a DTensor counts its local shard; CMD's bases, mode maps and online fit included) right after the
switch step and at the end, beside one process's. Bytes: what rank 0 hands to each collective per step after
the switch, counted on every step by a `TorchDispatchMode` over the c10d and functional collectives (an
all-gather's input is the rank's shard, a reduce-scatter's the whole unsharded gradient, an all-reduce's and a
broadcast's the tensor): FSDP2's own (all-gather and reduce-scatter, issued in forward and backward) and CMD's
extra (issued in `optimizer.step()`); "other steps" are those whose extra differs from the usual one (the
low-rank refreshes: an all-gather of each projected matrix's gradient and a broadcast of its basis; embedded
CMD's rounds: the radix selection's counts), "switch step" CMD's extra in the step that switched. Time: median
of {result['timed']} more whole steps after the run (forward, backward, step), the rows taking turns, against
plain FSDP2 with the same base; the machine has 2 cores shared with other jobs, so the times are noisy.
Weight difference: the largest against one process trained on the same global batches, at the switch and at
the end (plain FSDP2 + SGD drifts from one process too: its rounding differs, and SGD with momentum amplifies
it over the steps; the integration tests check agreement to 1e-4 over 45-50 steps).

Machine: {machine()}. Run time {seconds / 60:.1f} min.
Command: `python -m benchmarks.fsdp --world {world} --steps {steps}`

| row | test accuracy | state per rank, switch -> end (bytes, rank 0 / rank 1) | one process, switch -> end | FSDP2's bytes per step | CMD's extra bytes per step | CMD's extra at other steps | CMD's extra at the switch step | step time vs plain FSDP2 | weight difference, switch / end |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}
{refused}
Where CMD costs more than plain FSDP2 here: every step sends CMD's extra on top of FSDP2's own collectives,
which still run in full (the saving is optimizer state, not communication); and, measured in this run:
{chr(10).join(costs)}

No PowerSGD row: torch's PowerSGD is a DDP communication hook (it compresses DDP's gradient buckets), and
FSDP2's `fully_shard` takes no communication hook, so there is no PowerSGD to run beside it; PowerSGD at equal
bytes is in the section "Data-parallel accuracy against bytes sent".
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    result = measure(args.world, args.steps)
    seconds = time.perf_counter() - start
    body = section(result, seconds)
    print(body)
    if not args.no_write:
        RESULTS.write_text(json.dumps({**result, "seconds": seconds, "machine": machine()}, indent=1))
        write_section("fsdp", body)


if __name__ == "__main__":
    main()

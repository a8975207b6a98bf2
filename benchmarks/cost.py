"""Cost suite: what CMD costs per step and in memory against the base optimizers, from 1M to 100M parameters.

    python -m benchmarks.cost [--sizes 1000000 10000000 100000000] [--repeats 10] [--device cpu|cuda] [--no-write]

For each size (a two-layer MLP of that many parameters): the reduced-phase ``step()`` over the base
optimizers' own (SGD with momentum, AdamW), gradients given, with the paper's mode reduction; a whole training step (forward,
backward, step on a batch of 64) of CMD(AdamW) over AdamW; ``decompose()`` against the NumPy reference
(20 snapshots, up to 10M parameters: the NumPy version needs ~270 bytes per parameter). Then the memory
the optimizers hold, measured on the optimizer objects at 10M parameters. All ratios come from
interleaved rounds (in a shuffled order) in one process. Writes the "cost" section of docs/benchmarks.md
("cost-cuda" on a GPU) and a PNG plot.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from cmd_optim import CMDOptimizer
from cmd_optim.optim import optimizer_state_bytes

from . import decompose as decompose_benchmark
from .report import machine, save_figure, write_section
from .step_cost import measure, mlp_shapes, shuffled_medians

#: The step-cost rows this suite reads: the paper's mode reduction on each base.
MODE_ROWS = ("CMD(SGD momentum), reduced, modes", "CMD(AdamW), reduced, modes")


def _mlp(params: int) -> nn.Module:
    width = mlp_shapes(params)[0][0]
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


def training_step_ratio(params: int, repeats: int, device="cpu") -> float:
    """Median (forward + backward + step) time of CMD(AdamW) in the reduced phase over AdamW's."""
    device = torch.device(device)
    steps = []
    for reduced in (False, True):
        model = _mlp(params).to(device)
        width = model[0].in_features
        x, y = torch.randn(64, width, device=device), torch.randn(64, width, device=device)
        if reduced:
            optimizer = CMDOptimizer(model, base=torch.optim.AdamW, modes=10, reduction="modes", switch_after=2,
                                     snapshot_every=1, lr=1e-4)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer, x=x, y=y):
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        for _ in range(3):  # reaches the reduced phase; allocates state
            step()
        steps.append(step)
    medians = shuffled_medians(dict(zip(("AdamW", "CMD(AdamW)"), steps)), repeats, device)
    return medians["CMD(AdamW)"] / medians["AdamW"]


def memory_rows(params: int) -> list[str]:
    """Optimizer memory at ``params`` parameters, bytes per parameter, from the optimizer objects."""
    rows = []
    model = _mlp(params)
    width = model[0].in_features
    x = torch.randn(8, width)

    def step(optimizer):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    adamw = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step(adamw)
    n = sum(p.numel() for p in model.parameters())
    rows.append(("AdamW", optimizer_state_bytes(adamw) / n))
    del adamw
    for dtype in (torch.float32, torch.float16):
        cmd = CMDOptimizer(model, base=torch.optim.SGD, reduction="modes", switch_after=300, snapshot_every=10,
                           snapshot_dtype=dtype,
                           lr=1e-5, momentum=0.9)
        step(cmd)
        rows.append((f"CMD(SGD momentum) warm-up, 31 snapshots in {str(dtype).split('.')[1]}", cmd.state_bytes / n))
        del cmd
    cmd = CMDOptimizer(model, base=torch.optim.AdamW, reduction="modes", switch_after=2, snapshot_every=1, lr=1e-5)
    for _ in range(3):
        step(cmd)
    rows.append(("CMD(AdamW) reduced phase", cmd.state_bytes / n))
    return [f"| {name} | {per_param:.2f} | {per_param * n / 2**20:,.0f} |" for name, per_param in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--memory-size", type=int, default=10_000_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    step_rows, plot_points = [], []
    for size in args.sizes:
        num_params, rows = measure(mlp_shapes(size), args.repeats, args.device, names=MODE_ROWS)
        by_name = {name: (seconds, over_adamw, over_base) for name, seconds, over_adamw, over_base, _ in rows}
        over_sgd = by_name[MODE_ROWS[0]][2]
        over_adamw = by_name[MODE_ROWS[1]][1]
        whole = training_step_ratio(size, args.repeats, args.device)
        numpy_ratio = ""
        if size <= 10_000_000:
            results = decompose_benchmark.compare(size, 20, 3)
            ours = results.get(f"torch-{torch.device(args.device).type}", results["torch-cpu"])
            numpy_ratio = f"{results['numpy']['seconds'] / ours['seconds']:.2f}x"
        step_rows.append(f"| {num_params:,} | {by_name['AdamW'][0] * 1e3:.1f} | {over_sgd:.2f} | {over_adamw:.2f} | "
                         f"{whole:.2f} | {numpy_ratio or 'not run'} |")
        plot_points.append((num_params, over_sgd, over_adamw, whole))
        print(step_rows[-1], flush=True)
    memory = memory_rows(args.memory_size)
    device = torch.device(args.device).type
    suffix = "" if device == "cpu" else f"-{device}"
    images = [] if args.no_write else _plot(plot_points, f"cost_ratios{suffix.replace('-', '_')}.png")
    sizes = " ".join(str(s) for s in args.sizes)
    body = f"""## Cost: step time and memory from 1M to 100M parameters{" (GPU)" if suffix else ""}

Two-layer MLPs (float32) on {args.device}. Step ratios: median of {args.repeats} rounds in a shuffled
order, gradients given; "whole step" is forward + backward + step on a batch of 64, CMD(AdamW) reduced
over AdamW. decompose(): 20 snapshots, M = 10, K = 1000, speed-up of cmd-optim over the NumPy
reference (each in its own process).

Machine: {machine()}.
Command: `python -m benchmarks.cost --sizes {sizes} --repeats {args.repeats}{f" --device {args.device}" if suffix else ""}`

| parameters | AdamW step (ms) | CMD(SGD) step / SGD step | CMD(AdamW) step / AdamW step | whole training step, CMD / AdamW | decompose() speed-up over NumPy |
|---|---|---|---|---|---|
{chr(10).join(step_rows)}

Optimizer memory at {args.memory_size:,} parameters (held by the optimizer: state, snapshots; the
model's own weights and gradients are not counted):

| optimizer | bytes per parameter | MiB |
|---|---|---|
{chr(10).join(memory)}

{chr(10).join(f"![{name}](img/{name})" for name in images)}
"""
    print(body)
    if not args.no_write:
        write_section(f"cost{suffix}", body)


def _plot(points, name: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [p[0] for p in points]
    for index, label in enumerate(("CMD(SGD) step / SGD step", "CMD(AdamW) step / AdamW step",
                                   "whole training step, CMD(AdamW) / AdamW"), start=1):
        ax.plot(sizes, [p[index] for p in points], marker="o", label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(xscale="log", xlabel="parameters", ylabel="time ratio (lower is cheaper)", title="Reduced-phase cost")
    ax.legend(fontsize=8)
    return [save_figure(fig, name)]


if __name__ == "__main__":
    main()

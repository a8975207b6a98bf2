"""CMDOptimizer.step() in the warm-up and after the switch against the base optimizers' own step, and the whole
training step of CMD's default reduction beside AdamW, GaLore and LoRA.

    python -m benchmarks.step_cost [--repeats 20] [--models digits mlp1m mlp4m minilm gpt2] [--threads N]
                                   [--device cpu|cuda] [--no-write]

Five models: the digits MLP of the tests (84K parameters in 6 tensors), two-layer MLPs of 1M and 4M
parameters, the parameter shapes of all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters in 103 tensors, the
embedding table the largest; its word and position embeddings get gradients in the rows a batch of 32
sentences of 16 tokens uses, as in a fine-tune) and the task harness's GPT-2 (``GPT2Config``, 4 layers,
width 256, 3.2M parameters).

Optimizer step (:func:`measure`): gradients are filled once with random values and only ``step()`` is timed;
for each model all optimizers run in one process, in a shuffled order every round (so that none always finds
the caches warm from the one before), and the medians are compared. A warm-up row times 10 steps (one of
them a snapshot step for the mode reduction) and reports a tenth.

Whole step (:func:`measure_whole`): zero_grad, forward, backward and step of the model itself on one fixed
batch, for AdamW in full, CMD(AdamW) with the default reduction after its switch, GaLore at the rank whose
state bytes come closest to the default's and LoRA at the rank whose adapter count comes closest to the
default's trainable numbers (benchmarks/peers.py, as the harness matches them), in the same shuffled rounds;
``optimizer.step()`` is timed inside them too.

On a GPU each step is timed between two synchronisations. Writes the "step" section of docs/benchmarks.md
("step-cuda" for a GPU), naming the backend (torch version, device, threads, the kernels of the CMD rows).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cmd_optim import CMDOptimizer
from cmd_optim.core import kernels
from cmd_optim.optim import optimizer_state_bytes

from . import harness_tasks as tasks
from . import peers
from .report import machine, write_section


def mlp_shapes(params: int = 4_000_000) -> list[tuple[int, ...]]:
    width = int((params / 2) ** 0.5)
    return [(width, width), (width,)] * 2


def digits_shapes(hidden: int = 256) -> list[tuple[int, ...]]:
    """The tests' digits MLP, 64-256-256-10."""
    return [(hidden, 64), (hidden,), (hidden, hidden), (hidden,), (10, hidden), (10,)]


def minilm_shapes(hidden: int = 384, layers: int = 6, intermediate: int = 1536, vocab: int = 30522) -> list[tuple[int, ...]]:
    """Parameter shapes of a BERT encoder (defaults: all-MiniLM-L6-v2)."""
    shapes = [(vocab, hidden), (512, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4 + [(hidden,), (hidden,)]
        shapes += [(intermediate, hidden), (intermediate,), (hidden, intermediate), (hidden,), (hidden,), (hidden,)]
    return shapes + [(hidden, hidden), (hidden,)]


def _parameters(shapes, device="cpu") -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device)) for shape in shapes]


#: Rows of an embedding table a batch reaches (32 sentences of 16 tokens), for tables of at least 512 rows.
USED_ROWS = 512


def _fill_grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)
        if p.ndim == 2 and p.shape[0] >= 16 * USED_ROWS:  # a vocabulary: most rows get no gradient
            p.grad[USED_ROWS:] = 0
        elif p.ndim == 2 and p.shape == (512, 384):  # a position table: 16 positions used
            p.grad[16:] = 0


def _reduced(params, base, reduction=None, **kwargs) -> CMDOptimizer:
    """A CMDOptimizer past its switch (two warm-up steps); the mode reduction with 10 modes, a snapshot a step."""
    if reduction == "modes":
        kwargs.update(modes=10, snapshot_every=1)
    optimizer = CMDOptimizer(params, base=base, reduction=reduction, switch_after=2, **kwargs)
    for seed in range(2):
        _fill_grads(params, seed)
        optimizer.step()
    assert optimizer.phase == "reduced"
    return optimizer


class _Warmup:
    """A CMDOptimizer in its warm-up for ``steps`` steps; ``step()`` takes 10 steps (one snapshot step with the
    mode reduction)."""

    def __init__(self, params, steps, base, **kwargs):
        self.optimizer = CMDOptimizer(params, base=base, switch_after=steps, **kwargs)
        self.state = self.optimizer.state

    def step(self):
        for _ in range(10):
            self.optimizer.step()


SGD = dict(lr=1e-3, momentum=0.9)
ADAMW = dict(lr=1e-3)

CONTENDERS = {
    "SGD momentum": lambda ps, steps: torch.optim.SGD(ps, **SGD),
    "AdamW": lambda ps, steps: torch.optim.AdamW(ps, **ADAMW),
    "AdamW (foreach)": lambda ps, steps: torch.optim.AdamW(ps, foreach=True, **ADAMW),
    "CMD(SGD momentum), warm-up": lambda ps, steps: _Warmup(ps, steps, torch.optim.SGD, **SGD),
    "CMD(AdamW), warm-up": lambda ps, steps: _Warmup(ps, steps, torch.optim.AdamW, **ADAMW),
    "CMD(SGD momentum), warm-up, modes": lambda ps, steps: _Warmup(ps, steps, torch.optim.SGD, reduction="modes", **SGD),
    "CMD(AdamW), warm-up, modes": lambda ps, steps: _Warmup(ps, steps, torch.optim.AdamW, reduction="modes", **ADAMW),
    "CMD(SGD momentum), reduced": lambda ps, steps: _reduced(ps, torch.optim.SGD, **SGD),
    "CMD(AdamW), reduced": lambda ps, steps: _reduced(ps, torch.optim.AdamW, **ADAMW),
    "CMD(SGD momentum), reduced, modes": lambda ps, steps: _reduced(ps, torch.optim.SGD, reduction="modes", **SGD),
    "CMD(AdamW), reduced, modes": lambda ps, steps: _reduced(ps, torch.optim.AdamW, reduction="modes", **ADAMW),
}

#: The base optimizer each row is compared with (besides AdamW).
BASE_OF = {name: ("SGD momentum" if "SGD" in name else "AdamW") for name in CONTENDERS}


def _seconds_per_step(name: str, seconds: float) -> float:
    return seconds / 10 if "warm-up" in name else seconds


def measure(shapes, repeats: int, device="cpu", names=None) -> tuple[int, list[tuple[str, float, float, float, float]]]:
    """(parameter count, rows of (optimizer, median step seconds, time / AdamW, time / its base optimizer's
    step, state bytes per parameter)), of every contender or of ``names`` (the bases are always run)."""
    device = torch.device(device)
    chosen = CONTENDERS if names is None else {name: CONTENDERS[name] for name in
                                               dict.fromkeys(["SGD momentum", "AdamW", *names])}
    runs = {}
    for name, build in chosen.items():
        params = _parameters(shapes, device)
        optimizer = build(params, steps=10 * repeats + 20)  # a warm-up that lasts all rounds
        _fill_grads(params, 7)
        optimizer.step()  # the first step allocates the state
        runs[name] = optimizer
    num_params = sum(torch.Size(s).numel() for s in shapes)
    medians = shuffled_medians({name: optimizer.step for name, optimizer in runs.items()}, repeats, device)
    medians = {name: _seconds_per_step(name, seconds) for name, seconds in medians.items()}
    return num_params, [(name, medians[name], medians[name] / medians["AdamW"], medians[name] / medians[BASE_OF[name]],
                         optimizer_state_bytes(getattr(optimizer, "optimizer", optimizer)) / num_params)
                        for name, optimizer in runs.items()]


def shuffled_medians(functions: dict, repeats: int, device="cpu") -> dict[str, float]:
    """Median seconds of each function over ``repeats`` rounds, called in a shuffled (seeded) order
    every round, so that none always finds the caches as the same other one left them."""
    device = torch.device(device)
    times = {name: [] for name in functions}
    order = list(functions)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            times[name].append(_timed(functions[name], device))
    return {name: statistics.median(values) for name, values in times.items()}


def _timed(function, device: torch.device) -> float:
    """Seconds ``function()`` takes, including the GPU work it queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ whole step
@dataclass(frozen=True)
class Workload:
    """A model and one fixed batch for the whole-step rows: ``model()`` builds it (under seed 0), ``batch()``
    gives (x, y) for ``harness_tasks.loss_of``; ``lora_save``: the modules LoRA trains in full."""
    model: Callable[[], nn.Module]
    batch: Callable[[], tuple]
    lora_save: tuple[str, ...] = ()


def two_layer_mlp(params: int = 4_000_000) -> nn.Sequential:
    """Linear-ReLU-Linear of ``mlp_shapes(params)``."""
    width = mlp_shapes(params)[0][0]
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


def _random_batch(size: int, width: int, classes: int):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(size, width, generator=gen), torch.randint(0, classes, (size,), generator=gen)


def _mlp_workload(params: int) -> Workload:
    """The two-layer MLP on a batch of 64 random inputs, as many classes as its width."""
    width = mlp_shapes(params)[0][0]
    return Workload(lambda: two_layer_mlp(params), lambda: _random_batch(64, width, width))


def _task_workload(name: str, batch: Callable[[], tuple] | None = None, model=None) -> Workload:
    """The harness task ``name``'s model (not pretrained), its LoRA modules and its batch size (first batch
    of seed 0) unless ``batch`` or ``model`` is given."""
    task = tasks.TASKS[name]
    return Workload(model or task.model,
                    batch or (lambda: tasks.batch_at(tasks.load(task.data), 0, 0, task.batch)), task.lora_save)


def _sentences(count: int = 32, length: int = 16, vocab: int = 30522):
    """``count`` sentences of ``length`` random token ids (at most ``USED_ROWS`` embedding rows), two labels."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (count, length), generator=gen)
    x = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    return x, torch.randint(0, 2, (count,), generator=gen)


def gpt2_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of the harness's GPT-2 (``harness_tasks.gpt2``: 4 layers, width 256, bytes)."""
    return [tuple(p.shape) for p in tasks.gpt2().parameters()]


@dataclass(frozen=True)
class Model:
    title: str
    shapes: Callable[[], list[tuple[int, ...]]]
    workload: Callable[[], Workload]


MODELS = {
    "digits": Model("digits MLP", digits_shapes,
                    lambda: _task_workload("digits_mlp", model=lambda: tasks.MLP(256))),
    "mlp1m": Model("two-layer MLP, 1M", lambda: mlp_shapes(1_000_000), lambda: _mlp_workload(1_000_000)),
    "mlp4m": Model("two-layer MLP, 4M", mlp_shapes, lambda: _mlp_workload(4_000_000)),
    "minilm": Model("all-MiniLM-L6-v2 shapes", minilm_shapes, lambda: _task_workload("minilm_vader", _sentences)),
    "gpt2": Model("GPT-2 (GPT2Config, 4 layers, d 256)", gpt2_shapes, lambda: _task_workload("gpt2_finetune")),
}

#: The whole-step rows: the base in full, CMD's default reduction after its switch, the peers matched to it.
WHOLE_METHODS = ("AdamW", "CMD(AdamW), reduced", "GaLore(AdamW)", "LoRA(AdamW)")


@dataclass
class WholeRow:
    """One method's whole step: medians (seconds) of the whole step and of its ``optimizer.step()``, their ratios
    to AdamW's, the state ``step()`` keeps and the numbers it trains (per model parameter and in all)."""
    method: str
    whole_s: float
    step_s: float
    whole_ratio: float
    step_ratio: float
    state_bytes: int
    trainable: int
    rank: int | None = None


def _build_whole(workload: Workload, device: torch.device):
    """(method -> (model, optimizer, rank)), the model's parameter count: AdamW in full; CMD(AdamW) with the
    default reduction two steps past its switch; GaLore at the rank whose state bytes come closest to CMD's;
    LoRA at the rank whose adapter count comes closest to CMD's trainable numbers. Same weights for all."""
    x, y = workload.batch()
    x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
    y = y.to(device)

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return workload.model().to(device)

    built = {}
    model = fresh()
    built["AdamW"] = model, torch.optim.AdamW(model.parameters(), **ADAMW), None
    model = fresh()
    cmd = CMDOptimizer(model, base=torch.optim.AdamW, switch_after=2, **ADAMW)
    for _ in range(4):  # two warm-up steps, the switch, two reduced steps
        _train_step(model, cmd, x, y)
    assert cmd.phase == "reduced"
    built["CMD(AdamW), reduced"] = model, cmd, None
    model = fresh()
    rank, _ = peers.galore_rank(model, tasks.loss_of(model, x, y), cmd.state_bytes, "AdamW", ADAMW)
    built["GaLore(AdamW)"] = model, peers.galore(list(model.parameters()), rank, "AdamW", ADAMW), rank
    model = fresh()
    rank = peers.rank_like(model, workload.lora_save, cmd.trainable_dims)
    model = peers.lora(model, rank, workload.lora_save)
    built["LoRA(AdamW)"] = model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW), rank
    return built, x, y


def _train_step(model, optimizer, x, y, step_times: list | None = None, device: torch.device | None = None) -> None:
    """zero_grad, forward, backward, step; the step's seconds (on ``device``) appended to ``step_times``."""
    optimizer.zero_grad()
    tasks.loss_of(model, x, y).backward()
    if step_times is None:
        optimizer.step()
    else:
        step_times.append(_timed(optimizer.step, device or torch.device("cpu")))


def _state_and_trainable(optimizer) -> tuple[int, int]:
    if isinstance(optimizer, CMDOptimizer):
        return optimizer.state_bytes, optimizer.trainable_dims
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return peers.state_bytes(optimizer), sum(p.numel() for p in params)


def measure_whole(workload: Workload, repeats: int, device="cpu") -> tuple[int, list[WholeRow]]:
    """(the model's parameter count, a :class:`WholeRow` per ``WHOLE_METHODS``): each method's whole step
    (zero_grad, forward, backward, step on the workload's batch), timed in the same shuffled rounds in this
    process after three untimed steps (CMD: in its reduced phase; GaLore, LoRA: from construction)."""
    device = torch.device(device)
    built, x, y = _build_whole(workload, device)
    step_times = {name: [] for name in built}
    functions = {name: (lambda m=model, o=optimizer, t=step_times[name]: _train_step(m, o, x, y, t, device))
                 for name, (model, optimizer, _) in built.items()}
    for function in functions.values():  # state allocated, GaLore's first projection, caches warm
        for _ in range(3):
            function()
    for times in step_times.values():
        times.clear()
    whole = shuffled_medians(functions, repeats, device)
    step = {name: statistics.median(times) for name, times in step_times.items()}
    num_params = sum(p.numel() for p in built["AdamW"][0].parameters())
    rows = []
    for name, (_, optimizer, rank) in built.items():
        state, trainable = _state_and_trainable(optimizer)
        rows.append(WholeRow(name, whole[name], step[name], whole[name] / whole["AdamW"], step[name] / step["AdamW"],
                             state, trainable, rank))
    return num_params, rows


def backend(device: torch.device) -> str:
    """torch version, device and thread count; the kernel backend CMD's passes run on."""
    return (f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
            f"kernels: {kernels.backend(device)}")


def whole_table(rows: list[WholeRow], num_params: int) -> str:
    lines = []
    for r in rows:
        lines.append(f"| {r.method} | {r.rank or ''} | {r.trainable:,} | {r.state_bytes / num_params:.2f} | "
                     f"{r.step_s * 1e3:.3f} | {r.step_ratio:.2f} | {r.whole_s * 1e3:.3f} | {r.whole_ratio:.2f} |")
    return ("| method | rank | trainable numbers | state (bytes per parameter) | optimizer step (ms) | "
            "step / AdamW step | whole step (ms) | whole step / AdamW whole step |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark; returns {model key: (step-table rows of :func:`measure`, (parameter count,
    whole-step rows of :func:`measure_whole`))}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's own choice)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    header = backend(device)
    tables, summary, results = [], [], {}
    for key in args.models:
        model = MODELS[key]
        shapes = model.shapes()
        start = time.perf_counter()
        num_params, rows = measure(shapes, args.repeats, args.device)
        middle = time.perf_counter()
        whole_params, whole = measure_whole(model.workload(), args.repeats, args.device)
        print(f"{key}: optimizer steps {middle - start:.0f} s, whole steps {time.perf_counter() - middle:.0f} s",
              file=sys.stderr, flush=True)
        results[key] = rows, (whole_params, whole)
        lines = [f"| {name} | {s * 1e3:.3f} | {ratio:.2f} | {own:.2f} | {state:.2f} |"
                 for name, s, ratio, own, state in rows]
        by_method = {r.method: r for r in whole}
        summary.append(f"| {model.title} | {whole_params:,} | " + " | ".join(
            f"{by_method[m].step_ratio:.2f} / {by_method[m].whole_ratio:.2f}" for m in WHOLE_METHODS[1:])
            + f" | {by_method['AdamW'].whole_s * 1e3:.1f} |")
        tables.append(f"""### {model.title}: {num_params:,} parameters in {len(shapes)} tensors ({header})

Optimizer step, gradients given:

| optimizer | step (ms) | time / AdamW step | time / its base's step | state (bytes per parameter) |
|---|---|---|---|---|
{chr(10).join(lines)}

Whole step (zero_grad, forward, backward, step) on the model, {whole_params:,} parameters:

{whole_table(whole, whole_params)}
""")
        print(tables[-1], flush=True)
    command = f"python -m benchmarks.step_cost --repeats {args.repeats}" + (
        f" --device {args.device}" if device.type != "cpu" else "") + (
        f" --models {' '.join(args.models)}" if args.models != list(MODELS) else "") + (
        f" --threads {args.threads}" if args.threads else "")
    gpu = (f"Measured on {torch.cuda.get_device_name(device)}." if device.type == "cuda" else
           "No GPU figures here: this machine has none, and the GPU figures on this page are the bytes-moved "
           "roofline in the section \"GPU: a bytes-moved roofline\", estimates, not measurements.")
    body = f"""## CMDOptimizer.step() in the warm-up and after the switch, and the whole step beside GaLore and LoRA{
        " (GPU)" if device.type == "cuda" else ""}

Command: `{command}`

Backend: {header}. Machine: {machine()}. {gpu}

Each model's reduced-phase cost against AdamW in full, as *optimizer step / AdamW's optimizer step* and
*whole step / AdamW's whole step* (zero_grad, forward, backward and step on one batch), all four methods
timed in the same shuffled rounds, medians of {args.repeats}: CMD with the default reduction after its
switch; GaLore (`GaLoreAdamW`, every matrix projected, gap 200) at the rank whose optimizer state comes
closest to the default's; LoRA (PEFT, every linear layer) at the rank whose adapter count comes closest to
the numbers the default trains (benchmarks/peers.py, as the task harness matches them).

| model | parameters | CMD default, step / whole | GaLore, step / whole | LoRA, step / whole | AdamW whole step (ms) |
|---|---|---|---|---|---|
{chr(10).join(summary)}

**Optimizer step, gradients given** (first table of each model): one `step()` (float32) on {args.device},
median of {args.repeats} rounds, the optimizers in a shuffled order every round, in one process. "AdamW"
is `torch.optim.AdamW` with its defaults (on the CPU, the per-tensor loop; on a GPU, the multi-tensor
path); "AdamW (foreach)" the multi-tensor path. CMD rows without a suffix use the default reduction
(low-rank: each matrix's state in a one-sided subspace at a quarter of the base's state, refreshed every
100 steps; the reduced rows here time the steps after the switch, mostly between refreshes), ", modes"
the paper's mode reduction (M = 10). Warm-up rows: the mean step over 10 (a snapshot every 10 steps with
the mode reduction; none with the default). "State" is the optimizer state that `step()` uses, per
parameter (warm-up: the base's state plus the snapshots so far; modes: the 4-byte slope + 1-byte mode map
plus the mode optimizer's state; low-rank: the bases and the base's state on the cores and on what trains
in full). The kernel backend serves the mode map's passes (`cmd_optim.core.kernels.backend()`). The
MiniLM shapes' word and position tables get gradients only in the rows a batch of 32 sentences of 16
tokens reaches, as in a fine-tune.

**Whole step** (second table): real models, AdamW lr 1e-3, one fixed batch: the digits MLP (64-256-256-10,
`harness_tasks.MLP`) on 64 digits; the two-layer MLPs on 64 random inputs (cross-entropy over as many
classes as their width); all-MiniLM-L6-v2 (the harness's `minilm()`: the pretrained encoder, a new
two-way head) on 32 sentences of 16 random token ids; the harness's GPT-2 (`harness_tasks.gpt2`, not
pretrained) on 8 windows of 64 bytes of the Python docs. Every method on its own copy of the same weights;
three untimed steps first (CMD: two warm-up steps and the switch before those, so every timed step is in
its reduced phase; GaLore and LoRA from construction, so GaLore's first projection is untimed). Neither
CMD's basis refresh (every 100 steps) nor GaLore's (every 200) falls in the timed steps. "Optimizer step"
here is `optimizer.step()` timed inside the same whole steps. LoRA's and GaLore's state and trainable
numbers are their optimizer's (LoRA: the adapters and the modules it trains in full; GaLore: every
parameter, its projectors' matrices in the state); "rank": the matched rank. State per parameter is over
the model's parameters.

{chr(10).join(tables)}"""
    if not args.no_write:
        write_section("step" if device.type == "cpu" else f"step-{device.type}", body)
    return results


if __name__ == "__main__":
    main()

"""The main job: plain training against CMD training on scikit-learn's bundled digits, with the model at the
switch beside them.

    python -m benchmarks.demo [--base sgd|adamw] [--steps 1500] [--switch-after 300] [--modes 10]

Rows: the base optimizer stopped at the switch, trained in full, CMDOptimizer with its default reduction,
and with the paper's mode reduction (``--modes`` modes).

Needs the ``data`` extra (scikit-learn): ``pip install -e ".[data]"``. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from cmd_optim import CMDOptimizer
from cmd_optim.optim import optimizer_state_bytes

from .report import comparison_table

BASES = {"sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)), "adamw": (torch.optim.AdamW, dict(lr=1e-3))}

EXPLANATION = """\
How to read it. "{base} at the switch" is what the warm-up alone gives ({switch} steps of {base}, then stop);
"{base}" trains all {steps} steps; "CMD({base})" trains like {base} up to the switch, then, with the default
reduction, each weight matrix inside a small refreshed subspace ({dims} trainable numbers, biases included);
"CMD({base}), modes" is the paper's setting: only {modes} mode coefficients after the switch. Recovery = how
much of full training's gain after the switch a method makes (1 = all of it, 0 = none): default {recovery},
modes {modes_recovery}. One seed on 540 test digits: one digit is 0.002 of accuracy, so a recovery here is
noisy (docs/benchmarks.md has several seeds and the test loss). "Optimizer state" is what step() keeps after
the switch; "time" includes the warm-up. CMD saves optimizer state, not time: its reduced step costs
more than the base's at every size measured so far (docs/benchmarks.md, section "step").
"""


def _run(name, make_optimizer, data, steps, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = make_optimizer(model)
    x, y, x_test, y_test = data
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    dims = optimizer.trainable_dims if isinstance(optimizer, CMDOptimizer) else sum(p.numel() for p in model.parameters())
    return dict(method=name, accuracy=accuracy, dims=dims, seconds=seconds, state_bytes=optimizer_state_bytes(optimizer))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=sorted(BASES), default="sgd")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--switch-after", type=int, default=300)
    parser.add_argument("--modes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        from . import datasets

        data = datasets.digits(args.seed)
    except ImportError as error:
        raise SystemExit(f"the demo trains on scikit-learn's digits: {error}") from None
    base, kwargs = BASES[args.base]
    name = base.__name__
    rows = [
        _run(f"{name} at the switch", lambda m: base(m.parameters(), **kwargs), data, args.switch_after, args.seed),
        _run(name, lambda m: base(m.parameters(), **kwargs), data, args.steps, args.seed),
        _run(f"CMD({name})", lambda m: CMDOptimizer(m, base=base, switch_after=args.switch_after, **kwargs),
             data, args.steps, args.seed),
        _run(f"CMD({name}), modes", lambda m: CMDOptimizer(m, base=base, modes=args.modes, reduction="modes",
                                                           switch_after=args.switch_after, **kwargs),
             data, args.steps, args.seed),
    ]
    print(f"digits MLP 64-256-256-10, {args.steps} steps, batch 64, CMD switch after {args.switch_after} steps")
    print(comparison_table(rows))
    gain = rows[1]["accuracy"] - rows[0]["accuracy"]

    def recovery(row):
        return f"{(row['accuracy'] - rows[0]['accuracy']) / gain:.2f}" if gain > 0 else "undefined (no gain)"

    print("\n" + EXPLANATION.format(base=name, switch=args.switch_after, steps=args.steps, dims=rows[2]["dims"],
                                    modes=args.modes, recovery=recovery(rows[2]), modes_recovery=recovery(rows[3])))
    return rows


if __name__ == "__main__":
    main()

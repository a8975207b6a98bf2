"""``cmd-optim demo``: plain training against CMD training on scikit-learn's bundled digits."""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from . import datasets
from .optimizer import CMDOptimizer, optimizer_state_bytes

BASES = {"sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)), "adamw": (torch.optim.AdamW, dict(lr=1e-3))}


def _progress(total: int, label: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: fall back to nothing
        return None
    return tqdm(total=total, desc=label, leave=False)


def _run(name, make_optimizer, data, steps, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = make_optimizer(model)
    x, y, x_test, y_test = data
    generator = torch.Generator().manual_seed(seed)
    bar = _progress(steps, name)
    start = time.perf_counter()
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    dims = optimizer.trainable_dims if isinstance(optimizer, CMDOptimizer) else sum(p.numel() for p in model.parameters())
    return dict(method=name, accuracy=accuracy, dims=dims, seconds=seconds, state_bytes=optimizer_state_bytes(optimizer))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="cmd-optim demo", description=__doc__)
    parser.add_argument("--base", choices=sorted(BASES), default="sgd")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--modes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    base, kwargs = BASES[args.base]
    data = datasets.digits(args.seed)
    rows = [
        _run(f"{base.__name__}", lambda m: base(m.parameters(), **kwargs), data, args.steps, args.seed),
        _run(f"CMD({base.__name__})", lambda m: CMDOptimizer(m, base=base, modes=args.modes,
                                                              warmup_steps=args.warmup_steps, **kwargs),
             data, args.steps, args.seed),
    ]
    print(f"digits MLP 64-256-256-10, {args.steps} steps, batch 64, CMD warm-up {args.warmup_steps} steps, "
          f"{args.modes} modes")
    print(comparison_table(rows))


def comparison_table(rows: list[dict]) -> str:
    """Rows with ``method, accuracy, dims, seconds, state_bytes`` as an aligned text table."""
    lines = [f"{'method':<14} {'test acc':>8} {'trainable numbers':>18} {'time (s)':>9} {'optimizer state':>16}"]
    for r in rows:
        state = r["state_bytes"] / 1024
        unit = "KiB" if state < 10 * 1024 else "MiB"
        lines.append(f"{r['method']:<14} {r['accuracy']:>8.3f} {r['dims']:>18,} {r['seconds']:>9.2f} "
                     f"{state if unit == 'KiB' else state / 1024:>12.1f} {unit}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

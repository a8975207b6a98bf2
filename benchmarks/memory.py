"""Peak memory of CMD's warm-up and switch, and what the reduced phase keeps, in bytes per parameter.

    python -m benchmarks.memory [--params 25000000] [--snapshots 31] [--big 1000000000] [--no-write]

A model of large Linear layers (no biases), SGD with momentum, one backward per step. Each configuration
runs in a child process of its own; its peak resident memory (``ru_maxrss``) is compared with the resident
memory after the model, its gradients and the momentum exist (the baseline: what plain SGD needs too).
"Switch" is the peak through the warm-up and the switch, over the baseline; "reduced" what the optimizer
holds afterwards (its ``state_bytes``), per parameter. ``--big`` runs one switch of that many parameters
with the snapshots on disk in float16 (a few snapshots: the file takes N x 2 bytes each), timed.
Writes the "memory" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from cmd_optim import CMDOptimizer

from .report import machine, write_section

CONFIGS = {
    "snapshots in memory, float32": dict(snapshot_dtype=torch.float32),
    "snapshots in memory, float16": dict(snapshot_dtype=torch.float16),
    "snapshots on disk, float16": dict(snapshot_dtype=torch.float16, disk=True),
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _model(params: int) -> nn.Sequential:
    """Three square Linear layers (four above 100M parameters) holding about ``params`` parameters."""
    layers = 3 if params <= 100_000_000 else 4
    width = int((params / layers) ** 0.5)
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])


def worker(config: str, params: int, snapshots: int) -> dict:
    """One configuration; SGD with momentum up to 100M parameters, plain SGD above (to fit 24 GiB)."""
    torch.set_num_threads(2)
    momentum = 0.9 if params <= 100_000_000 else 0.0
    model = _model(params)
    n = sum(p.numel() for p in model.parameters())
    settings = dict(CONFIGS[config])
    scratch = tempfile.TemporaryDirectory(prefix="cmd-memory-") if settings.pop("disk", False) else None
    folder = scratch.name if scratch is not None else None
    x = torch.randn(8, model[0].in_features)
    target = torch.randn(8, model[-1].out_features)

    def loss():
        return nn.functional.mse_loss(model(x), target)

    loss().backward()  # a rate that moves the weights by about 1% per step at any width (float16 resolves it)
    lr = 0.01 * float(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm()
                      / torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())
    model.zero_grad()
    optimizer = CMDOptimizer(model, base=torch.optim.SGD, modes=10, reduction="modes", switch_after=snapshots - 1,
                             snapshot_every=1,
                             snapshot_dir=folder, lr=lr, momentum=momentum, **settings)

    def step():
        optimizer.zero_grad(set_to_none=False)
        loss().backward()
        optimizer.step()

    reference = torch.optim.SGD(model.parameters(), lr=0.0, momentum=momentum)  # the baseline's momentum, then freed
    loss().backward()
    reference.step()
    baseline = _rss()
    del reference
    start = time.perf_counter()
    for _ in range(snapshots - 1):  # the last one is the switch
        step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert optimizer.phase == "reduced"
    step()
    if scratch is not None:
        scratch.cleanup()
    return {"config": config + ("" if momentum else ", SGD without momentum"), "params": n, "snapshots": snapshots, "switch_bytes_per_param": (peak - baseline) / n,
            "reduced_bytes_per_param": optimizer.state_bytes / n, "seconds": seconds,
            "peak_gib": peak / 2**30, "baseline_gib": baseline / 2**30}


def _child(config: str, params: int, snapshots: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.memory", "--worker", config, "--params", str(params),
               "--snapshots", str(snapshots)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--snapshots", type=int, default=31)
    parser.add_argument("--big", type=int, help="also one switch of this many parameters, snapshots on disk (float16)")
    parser.add_argument("--big-snapshots", type=int, default=6)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.params, args.snapshots)))
        return []
    rows = [_child(config, args.params, args.snapshots) for config in CONFIGS]
    if args.big:
        rows.append(_child("snapshots on disk, float16", args.big, args.big_snapshots))
    for row in rows:
        print(row, flush=True)
    table = "\n".join(
        f"| {r['params']:,} | {r['snapshots']} | {r['config']} | {r['switch_bytes_per_param']:.1f} | "
        f"{r['reduced_bytes_per_param']:.2f} | {r['peak_gib']:.2f} | {r['seconds']:.0f} |" for r in rows)
    command = f"python -m benchmarks.memory --params {args.params} --snapshots {args.snapshots}" + (
        f" --big {args.big} --big-snapshots {args.big_snapshots}" if args.big else "")
    body = f"""## Memory: warm-up and switch, and what the reduced phase keeps

A model of three square Linear layers (four, and SGD without momentum, in the 1B row), mean-squared error to
a random target, SGD with momentum at a rate that moves the weights by about 1% per step, a snapshot every
step up to the switch, 10 modes, the mode reduction. "Switch" is the peak resident memory through the warm-up and the switch above the
resident memory once the model, its gradients and the momentum exist (what plain SGD needs as well), per
parameter; "reduced" is the optimizer's state afterwards per parameter (`state_bytes`: the map, 5 bytes,
plus the mode optimizer's few numbers). Time: the warm-up steps and the switch together. Each row is a
process of its own. Target of the scale issue: at most 32 bytes per parameter at the switch with 31
snapshots, at most 5 (plus O(M)) in the reduced phase.

Machine: {machine()}.
Command: `{command}`

| parameters | snapshots | where the snapshots are | switch (B/param above SGD's) | reduced (B/param) | peak (GiB) | time (s) |
|---|---|---|---|---|---|---|
{table}
"""
    print(body)
    if not args.no_write:
        write_section("memory", body)
    return rows


if __name__ == "__main__":
    main()

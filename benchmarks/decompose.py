"""decompose() against the straightforward NumPy version: time and extra peak memory; and the switch's fit
with its diagnostics (relative error, explained variance) in the same pass against two passes more.

    python -m benchmarks.decompose [--params 2000000] [--snapshots 20] [--repeats 3] [--no-write]

Each implementation runs in its own child process (so that peak memory is its own), one after the
other in the same invocation; the figures are medians over ``--repeats`` runs and the ratio is taken
between them. Writes the "decompose" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from .report import machine, write_section

MODES, SAMPLES = 10, 1000
IMPLEMENTATIONS = ("numpy", "torch-cpu", "torch-cpu, fit + 2 diagnostic passes", "torch-cpu, fit measured in one pass",
                   "torch-cuda")


def planted_trajectory(snapshots: int, params: int, device: str = "cpu") -> torch.Tensor:
    """(T, N) float32: 10 hidden profiles, random affine images, small noise; built in place, column block by block."""
    gen = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 1, snapshots)
    profiles = torch.stack([torch.sin((k + 1) * 3.0 * t + k) for k in range(MODES)])
    trajectory = torch.empty(snapshots, params)
    width = 1 << 16
    for start in range(0, params, width):
        cols = slice(start, min(start + width, params))
        n = cols.stop - cols.start
        mode = torch.randint(0, MODES, (n,), generator=gen)
        block = torch.randn(n, generator=gen) * profiles[mode].T + torch.randn(n, generator=gen)
        trajectory[:, cols] = block + 1e-3 * torch.randn(snapshots, n, generator=gen)
    return trajectory.to(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _worker(impl: str, params: int, snapshots: int, repeats: int) -> dict:
    from cmd_optim import decompose

    from .numpy_reference import decompose_numpy

    device = "cuda" if impl == "torch-cuda" else "cpu"
    def runner(trajectory):
        if impl == "numpy":
            array = trajectory.numpy()
            return lambda: decompose_numpy(array, MODES, SAMPLES, seed=0)
        if impl.endswith("diagnostic passes"):  # what the switch did before: the fit, then two more passes
            def three_passes():
                d = decompose(trajectory, modes=MODES, samples=SAMPLES, seed=0)
                return d.relative_error(trajectory), d.explained_variance(trajectory)
            return three_passes
        return lambda: decompose(trajectory, modes=MODES, samples=SAMPLES, seed=0, measure=impl.endswith("one pass"))

    runner(planted_trajectory(snapshots, 20 * SAMPLES, device))()  # load libraries and thread pools first
    trajectory = planted_trajectory(snapshots, params, device)
    run = runner(trajectory)
    before = _rss_bytes()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"impl": impl, "seconds": statistics.median(times), "extra_bytes": max(extra, 0),
            "trajectory_bytes": trajectory.numel() * 4, "snapshot_bytes": params * 4}


def compare(params: int, snapshots: int, repeats: int) -> dict[str, dict]:
    """Each implementation in its own process, one after the other: ``{implementation: worker result}``."""
    results = {}
    for impl in [i for i in IMPLEMENTATIONS if i != "torch-cuda" or torch.cuda.is_available()]:
        cmd = [sys.executable, "-m", "benchmarks.decompose", "--worker", impl, "--params", str(params),
               "--snapshots", str(snapshots), "--repeats", str(repeats)]
        results[impl] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(results[impl], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=2_000_000)
    parser.add_argument("--snapshots", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.params, args.snapshots, args.repeats)))
        return

    results = compare(args.params, args.snapshots, args.repeats)
    reference = results["numpy"]["seconds"]
    snapshot_mb = results["numpy"]["snapshot_bytes"] / 2**20
    rows = [
        f"| {impl} | {r['seconds']:.3f} | {reference / r['seconds']:.2f}x | {r['extra_bytes'] / 2**20:.0f} "
        f"| {r['extra_bytes'] / r['snapshot_bytes']:.1f} |"
        for impl, r in results.items()
    ]
    command = f"python -m benchmarks.decompose --params {args.params} --snapshots {args.snapshots} --repeats {args.repeats}"
    body = f"""## decompose(): time and memory against a straightforward NumPy version

Trajectory of {args.params:,} parameters x {args.snapshots} snapshots (float32, {results['numpy']['trajectory_bytes'] / 2**20:.0f} MiB;
one snapshot is {snapshot_mb:.1f} MiB), K = {SAMPLES} sampled columns, M = {MODES} modes. Median of {args.repeats} runs;
each implementation in its own process, one after the other in one invocation. Extra memory is the
peak resident (CPU) or allocated (CUDA) memory above what the trajectory already took, after a
small warm-up call has loaded the libraries; it includes the results (a, b, assignment: 16 bytes per parameter
for NumPy, 24 for torch with the online-update statistics).

Machine: {machine()}.
Command: `{command}`

| implementation | seconds | speed-up over NumPy | extra memory (MiB) | extra memory / one snapshot |
|---|---|---|---|---|
{chr(10).join(rows)}
"""
    if "torch-cuda" not in results:
        body += "\nNo GPU was available for this run; the torch-cuda row appears when one is.\n"
    print(body)
    if not args.no_write:
        write_section("decompose", body)


if __name__ == "__main__":
    main()

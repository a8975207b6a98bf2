"""What a fused CPU kernel would give the reduced-phase step: a probe for a packaging decision.

    python -m benchmarks.fused_kernel [--repeats 40] [--no-write]

Needs a C++ compiler with OpenMP and the ``ninja`` package (``pip install ninja``); it is not part of
the package. Two OpenMP kernels, each one pass over the parameters: ``sum_i u_i g_i`` per histogram bin
(per-thread partial sums) and ``w_i += u_i * table[bin_i]``, run on the blocks of a reduced-phase
CMDOptimizer, against AdamW's step and CMDOptimizer.step() (stock PyTorch kernels), in a shuffled
order every round. The kernels alone leave out the optimizer's fixed per-step work (the mode
optimizer, the checks). Writes the "fused" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse

import torch

from .report import machine, write_section
from .step_cost import _fill_grads, _parameters, _reduced, mlp_shapes, shuffled_medians

SOURCE = r"""
#include <torch/extension.h>
#include <omp.h>
#include <algorithm>
#include <vector>

torch::Tensor mode_sums(torch::Tensor u, torch::Tensor g, torch::Tensor bins, int64_t nbins) {
  const int64_t n = u.numel();
  const float* up = u.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const uint8_t* bp = bins.data_ptr<uint8_t>();
  const int threads = omp_get_max_threads();
  std::vector<double> partial(threads * 256, 0.0);
  #pragma omp parallel
  {
    float local[256] = {0};
    double* mine = partial.data() + omp_get_thread_num() * 256;
    #pragma omp for schedule(static)
    for (int64_t start = 0; start < n; start += 4096) {
      const int64_t end = std::min(n, start + 4096);
      for (int64_t i = start; i < end; ++i) local[bp[i]] += up[i] * gp[i];
      for (int64_t k = 0; k < nbins; ++k) { mine[k] += local[k]; local[k] = 0; }
    }
  }
  auto out = torch::zeros({nbins}, torch::kFloat64);
  double* op = out.data_ptr<double>();
  for (int t = 0; t < threads; ++t)
    for (int64_t k = 0; k < nbins; ++k) op[k] += partial[t * 256 + k];
  return out;
}

void apply(torch::Tensor w, torch::Tensor u, torch::Tensor bins, torch::Tensor table) {
  const int64_t n = w.numel();
  float* wp = w.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  const uint8_t* bp = bins.data_ptr<uint8_t>();
  const float* tp = table.data_ptr<float>();
  #pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) wp[i] += up[i] * tp[bp[i]];
}
"""


def _kernels():
    from torch.utils.cpp_extension import load_inline

    return load_inline("cmd_optim_fused_probe", cpp_sources=SOURCE, functions=["mode_sums", "apply"],
                       extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])


def measure(params: int, repeats: int, kernels) -> dict[str, float]:
    """Median time over AdamW's step for AdamW, CMDOptimizer.step() and the two fused kernels."""
    shapes = mlp_shapes(params)
    adamw_params = _parameters(shapes)
    adamw = torch.optim.AdamW(adamw_params, lr=1e-3)
    _fill_grads(adamw_params, 7)
    adamw.step()
    cmd_params = _parameters(shapes)
    cmd = _reduced(cmd_params, torch.optim.SGD, lr=1e-3, momentum=0.9)
    _fill_grads(cmd_params, 7)
    cmd.step()
    packed = cmd._phase.map._packed  # a probe of the package's internal layout
    table = torch.zeros(packed.num_modes * packed.lanes)

    @torch.no_grad()
    def fused():
        for block in packed.blocks:  # the MLP's tensors each fill a block of their own
            grad = cmd_params[block.members[0]].grad.view(-1)
            kernels.mode_sums(block.slopes, grad, block.bins, len(table))
        for block in packed.blocks:
            kernels.apply(cmd_params[block.members[0]].view(-1), block.slopes, block.bins, table)

    medians = shuffled_medians({"AdamW": adamw.step, "CMDOptimizer.step()": cmd.step, "fused kernels": fused}, repeats)
    return {name: seconds / medians["AdamW"] for name, seconds in medians.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    kernels = _kernels()
    rows = []
    for size in args.sizes:
        ratios = measure(size, args.repeats, kernels)
        rows.append(f"| {size:,} | {ratios['CMDOptimizer.step()']:.2f} | {ratios['fused kernels']:.2f} |")
        print(rows[-1], flush=True)
    sizes = " ".join(str(s) for s in args.sizes)
    body = f"""## Probe: a fused CPU kernel for the reduced-phase step

Not part of the package (it needs a C++ compiler and `ninja` at run time). Two OpenMP kernels, one
pass each (per-bin sums of u·g with per-thread partials; w += u·table[bin]), on the blocks of a
reduced-phase CMDOptimizer, against AdamW's step and CMDOptimizer.step() with stock PyTorch kernels,
median of {args.repeats} rounds in a shuffled order. The kernels alone leave out the optimizer's fixed
per-step work (about 0.1-0.2 ms here).

Machine: {machine()}.
Command: `python -m benchmarks.fused_kernel --sizes {sizes} --repeats {args.repeats}`

| parameters (two-layer MLP) | CMDOptimizer.step() / AdamW step | fused kernels / AdamW step |
|---|---|---|
{chr(10).join(rows)}
"""
    print(body)
    if not args.no_write:
        write_section("fused", body)


if __name__ == "__main__":
    main()

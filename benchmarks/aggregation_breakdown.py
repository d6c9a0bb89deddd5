"""Where the FedAlign-MoE aggregation spends its time: its array building blocks, one by one.

Command (2-core CPU: about a minute)::

    python benchmarks/aggregation_breakdown.py [--clients 100] [--experts 64]

Times the jitted building blocks of fedalign/algorithms/fedalign.py and
fedalign/aggregation/moe_blocks.py on random arrays of the sizes that one MoE layer with
D = F = 64 gives (x: (C, E, P), P = 3 * D * F, the concatenated expert deltas, and its 3
leaves): the per-expert weighted sum ``expert_sum`` (a fused multiply-reduce) next to the same
sum as a highest-precision einsum, the per-client sum ``client_sum`` (FedAvg's), the
concatenation of the expert leaves (which the aggregator no longer does), the O(N) and pairwise
cosines accumulated leaf by leaf, and the pairwise gate ``pairwise_gate`` (all at once and
chunked).
Median of --reps calls after a warm-up. Results: markdown table and
benchmarks/results/aggregation_breakdown.json.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import block, machine, markdown_table, median, time_calls, write_json  # noqa: E402
from fedalign.aggregation.moe_blocks import client_sum, expert_sum  # noqa: E402
from fedalign.algorithms.fedalign import (  # noqa: E402
    consensus_expert_cosine,
    cosine_last,
    pairwise_expert_cosine,
    pairwise_gate,
)

D = F = 64


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--clients", type=int, default=100)
  p.add_argument("--experts", type=int, default=64)
  p.add_argument("--chunk", type=int, default=16)
  p.add_argument("--reps", type=int, default=5)
  args = p.parse_args()
  c, e, pdim = args.clients, args.experts, 3 * D * F
  k = jax.random.split(jax.random.key(0), 6)
  x = block(jax.random.normal(k[0], (c, e, pdim)))
  parts = block([x[..., i * D * F : (i + 1) * D * F] + 0.0 for i in range(3)])
  w = jax.random.uniform(k[1], (c, e))
  mu = jax.random.normal(k[2], (c, e, D))
  kernels = jax.random.normal(k[3], (c, D, e))
  biases = jax.random.normal(k[4], (c, e))
  cases = {
      "expert_sum(w, x): sum_c w[c, e] x[c, e] (fused multiply-reduce)": (expert_sum, (w, x)),
      "same sum as an einsum 'ce,ce...->e...' (HIGHEST)": (
          lambda w, x: jnp.einsum("ce,cep->ep", w, x, precision=jax.lax.Precision.HIGHEST),
          (w, x),
      ),
      "client_sum(w, x): FedAvg's weighted sum over clients": (client_sum, (w[:, 0], x)),
      "concatenate the 3 expert leaves into x": (lambda ps: jnp.concatenate(ps, -1), (parts,)),
      "cosine_last(x, x_bar): cosine of concatenated leaves": (
          lambda x, y: cosine_last(x, y[None]),
          (x, x[0]),
      ),
      "consensus_expert_cosine(3 leaves, w): O(N) cosine, leaf by leaf": (
          lambda ps, w: consensus_expert_cosine(ps, w),
          (parts, w),
      ),
      "pairwise_expert_cosine(3 leaves): (C, C, E) cosine": (pairwise_expert_cosine, (parts,)),
      "pairwise_gate: all at once, (C, C, E, E) logits": (
          lambda m, kk, b: pairwise_gate(m, kk, b),
          (mu, kernels, biases),
      ),
      f"pairwise_gate: chunks of {args.chunk} clients": (
          lambda m, kk, b: pairwise_gate(m, kk, b, args.chunk),
          (mu, kernels, biases),
      ),
  }
  info = machine()
  rows = []
  for name, (fn, fargs) in cases.items():
    f = jax.jit(fn)
    first, times = time_calls(lambda: block(f(*fargs)), args.reps)
    rows.append({"op": name, "median_s": median(times), "times_s": times, "first_s": first})
    print(f"{name}: {1e3 * median(times):.1f} ms", flush=True)
  command = "python " + " ".join([str(pathlib.Path(sys.argv[0]))] + sys.argv[1:])
  header = (
      f"Command: `{command}`  \nMachine: {info['cpu']} ({info['arch']}, {info['cores']} "
      f"cores, no GPU, shared: load average {info['loadavg_at_start'][0]} at start), "
      f"JAX {info['jax']}.  \nSizes: C = {c} clients, E = {e} experts, x (C, E, P) with "
      f"P = 3 * {D} * {F} = {pdim} ({x.nbytes / 1e9:.2f} GB), mu (C, E, {D}). Median of "
      f"{args.reps} calls after a warm-up."
  )
  text = (
      "### FedAlign-MoE aggregation building blocks\n\n"
      + header
      + "\n\n"
      + markdown_table(["operation", "median (ms)"], [[r["op"], 1e3 * r["median_s"]] for r in rows])
  )
  print("\n" + text)
  path = write_json(
      "aggregation_breakdown.json",
      {
          "command": command,
          "machine": info,
          "clients": c,
          "experts": e,
          "P": pdim,
          "rows": rows,
          "markdown": text,
      },
  )
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()

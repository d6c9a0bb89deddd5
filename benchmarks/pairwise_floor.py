"""How fast can the pairwise variant be on this machine? Its parts against their FLOP floor.

Issue #12 asks for the pairwise FedAlign-MoE aggregation at 100 clients x 64 experts to take
<= 10x FedAvg's time on the same inputs. The pairwise variant is FLOP-bound: per expert, a
(C, P) x (P, C) Gram matrix of the clients' updates (2 C^2 P E FLOPs, P = 3 D F) and the gate
logits of every client's centroid under every client's router (2 C^2 E^2 D), against
FedAvg's one pass over the deltas (memory-bound). This script times, on the inputs of
``benchmarks/aggregation_time.py`` (``make_problem``: D = F = 64, 3 expert leaves), called in
turn so that the machine's load spreads over all of them:

* ``fedavg`` and ``pairwise`` (the whole aggregations, ``fedavg_aggregator()`` and
  ``fedalign_aggregator(FedAlignConfig())``);
* ``gram: library`` (:func:`fedalign.algorithms.fedalign.pairwise_expert_cosine`: per expert,
  each leaf's (C, P_leaf) rows copied out of the (C, E, ...) deltas, one matmul per leaf);
* ``gram: contiguous operands`` (the same matmuls, one per expert, on operands laid out
  expert-major outside the timed call: the matmul alone, no copies);
* ``gram: upper blocks, 2 / 4`` (the symmetric Gram as the client blocks on and above the
  diagonal, 75% / 62.5% of the FLOPs, on the contiguous operands);
* ``gram: (A X) . X`` (sum_j A_ij <x_i, x_j> for a (C, C) weight matrix A, the only way the
  pairwise score uses the Gram matrix, as a (C, C) x (C, P) matmul whose rows are dotted with
  X: the same FLOPs in another shape, on the contiguous operands);
* ``gate`` (:func:`fedalign.algorithms.fedalign.pairwise_gate`, all clients at once);
* a big square matmul (``--dot``), the machine's matmul rate.

The table gives each one's time, FLOP/s and fraction of the big matmul's rate, and its time
over FedAvg's. The floor lines divide the FLOPs by the big matmul's rate: the time the
pairwise variant would take if every FLOP ran at that rate and nothing else cost anything.

Command (2-core CPU: about 1.5 minutes)::

    python benchmarks/pairwise_floor.py --tag s17

Writes ``benchmarks/results/pairwise_floor_<tag>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from _common import block, machine, markdown_table, median, write_json  # noqa: E402
from aggregation_time import D, F, big_dot, make_problem  # noqa: E402
from fedalign.algorithms.fedalign import (  # noqa: E402
    FedAlignConfig,
    fedalign_aggregator,
    pairwise_expert_cosine,
    pairwise_gate,
)
from fedalign.algorithms.fedavg import fedavg_aggregator  # noqa: E402

HIGHEST = jax.lax.Precision.HIGHEST
GB = 1e9


def upper_block_gram(nb: int):
  """Per expert, the Gram matrix from its nb (nb + 1) / 2 client blocks on and above the
  diagonal ((E, C, P) operands), the lower blocks filled by symmetry."""

  def gram(xs: jax.Array) -> jax.Array:
    c = xs.shape[1]
    edges = [round(b * c / nb) for b in range(nb + 1)]

    def one(r):
      full = jnp.zeros((c, c), r.dtype)
      for a in range(nb):
        strip = jnp.dot(r[edges[a] : edges[a + 1]], r[edges[a] :].T, precision=HIGHEST)
        full = full.at[edges[a] : edges[a + 1], edges[a] :].set(strip)
      return jnp.triu(full) + jnp.triu(full, 1).T

    return jax.lax.map(one, xs)

  return gram


def weighted_gram_rows(xs: jax.Array, a: jax.Array) -> jax.Array:
  """sum_j a[e, i, j] <x[e, i], x[e, j]> per expert, (E, C): (A X) row-dotted with X."""
  return jax.lax.map(lambda t: jnp.sum(jnp.dot(t[0], t[1], precision=HIGHEST) * t[1], 1), (a, xs))


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--clients", type=int, default=100)
  p.add_argument("--experts", type=int, default=64)
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--dot", type=int, default=2048, help="side of the big square matmul")
  p.add_argument("--tag", default="", help="results file pairwise_floor_<tag>.json")
  args = p.parse_args(argv)
  c, e = args.clients, args.experts
  t_start = time.time()
  info = machine()

  params, deltas, stats, weights = make_problem(c, e)
  leaves = [deltas["moe"]["experts"][k] for k in sorted(deltas["moe"]["experts"])]
  p_expert = sum(int(np.prod(x.shape[2:])) for x in leaves)
  # expert-major (E, C, P) operands, laid out once outside the timed calls
  xs = block(jnp.concatenate([jnp.swapaxes(x.reshape(c, e, -1), 0, 1) for x in leaves], 2))
  a = block(jax.random.uniform(jax.random.key(3), (e, c, c)))
  mu = block(stats["moe"]["centroid_sum"] / jnp.maximum(stats["moe"]["select_count"], 1)[..., None])
  kernels = block(params["moe"]["router"]["kernel"][None] + deltas["moe"]["router"]["kernel"])
  biases = jnp.zeros((c, e), jnp.float32)

  def compiled(fn, *operands):
    f = jax.jit(fn).lower(*operands).compile()
    block(f(*operands))
    return lambda: block(f(*operands))

  def aggregation(agg):
    state = agg.init(params)
    return compiled(agg.aggregate, state, params, deltas, stats, weights)

  gram_flops = 2.0 * c * c * p_expert * e
  gate_flops = 2.0 * c * c * e * e * D
  cases = {
      "fedavg": (aggregation(fedavg_aggregator()), None),
      "pairwise (whole aggregation)": (
          aggregation(fedalign_aggregator(FedAlignConfig())),
          gram_flops + gate_flops,
      ),
      "gram: library (copies + matmuls)": (compiled(pairwise_expert_cosine, leaves), gram_flops),
      "gram: contiguous operands": (
          compiled(lambda x: jax.lax.map(lambda r: jnp.dot(r, r.T, precision=HIGHEST), x), xs),
          gram_flops,
      ),
      "gram: upper blocks, 2": (compiled(upper_block_gram(2), xs), gram_flops * 0.75),
      "gram: upper blocks, 4": (compiled(upper_block_gram(4), xs), gram_flops * 0.625),
      "gram: (A X) . X": (compiled(weighted_gram_rows, xs, a), gram_flops),
      "gate": (compiled(pairwise_gate, mu, kernels, biases), gate_flops),
  }
  # the formulations compute the same numbers (max relative difference to the plain Gram)
  gram = jax.jit(jax.vmap(lambda r: jnp.dot(r, r.T, precision=HIGHEST)))(xs)
  norms = jnp.sqrt(jnp.diagonal(gram, axis1=1, axis2=2))
  rel = lambda x, y: float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
  agreement = {
      "gram: library (cosines)": rel(
          jnp.transpose(jax.jit(pairwise_expert_cosine)(leaves), (2, 0, 1)),
          gram / (norms[:, :, None] * norms[:, None, :]),
      ),
      "gram: upper blocks, 2": rel(jax.jit(upper_block_gram(2))(xs), gram),
      "gram: upper blocks, 4": rel(jax.jit(upper_block_gram(4))(xs), gram),
      "gram: (A X) . X": rel(jax.jit(weighted_gram_rows)(xs, a), jnp.sum(a * gram, -1)),
  }
  dot_fn, dot_flops = big_dot(args.dot)
  times = {name: [] for name in cases}
  dot_times = []
  for _ in range(args.reps):
    for name, (fn, _) in cases.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    dot_fn()
    dot_times.append(time.perf_counter() - t0)

  dot_gflops = dot_flops / median(dot_times) / GB
  fedavg_s = median(times["fedavg"])
  rows = []
  for name, (_, flops) in cases.items():
    s = median(times[name])
    row = {"case": name, "median_s": s, "times_s": times[name], "vs_fedavg": s / fedavg_s}
    if flops is not None:
      row.update(gflop=flops / GB, gflops=flops / s / GB, vs_big_dot=flops / s / GB / dot_gflops)
    rows.append(row)
  floor_s = (gram_flops + gate_flops) / (dot_gflops * GB)
  floor_sym_s = (gram_flops / 2 + gate_flops) / (dot_gflops * GB)
  table = markdown_table(
      ["case", "median (ms)", "GFLOP/s (of the big matmul)", "x FedAvg"],
      [
          [
              r["case"],
              f"{1e3 * r['median_s']:.1f}",
              f"{r['gflops']:.0f} ({r['vs_big_dot']:.2f})" if "gflops" in r else "-",
              f"{r['vs_fedavg']:.2f}",
          ]
          for r in rows
      ],
  )
  command = "python benchmarks/pairwise_floor.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
  md = "\n".join(
      [
          f"#### The pairwise variant's parts and FLOP floor: {c} clients x {e} experts",
          "",
          f"Command: `{command}`  ",
          f"Machine: {info['cpu']} ({info['cores']} cores), JAX {info['jax']}, load average "
          f"{info['loadavg_at_start'][0]} at start; big matmul ({args.dot}^2, float32) "
          f"{dot_gflops:.0f} GFLOP/s; median of {args.reps} calls, called in turn.  ",
          f"FLOPs: Gram {gram_flops / GB:.2f} G (2 C^2 P E, P = {p_expert}), gate "
          f"{gate_flops / GB:.2f} G (2 C^2 E^2 D).",
          "",
          table,
          "",
          f"Floor at the big matmul's rate: {1e3 * floor_s:.1f} ms = "
          f"{floor_s / fedavg_s:.1f}x FedAvg (full Gram), {1e3 * floor_sym_s:.1f} ms = "
          f"{floor_sym_s / fedavg_s:.1f}x (half the Gram, as if symmetry were free).",
          f"The formulations agree with the plain Gram matrix to a relative "
          f"{max(agreement.values()):.1e}.",
      ]
  )
  print(md)
  write_json(
      f"pairwise_floor{'_' + args.tag if args.tag else ''}.json",
      {
          "command": command,
          "machine": info,
          "clients": c,
          "experts": e,
          "D": D,
          "F": F,
          "reps": args.reps,
          "big_dot_gflops": dot_gflops,
          "big_dot_times_s": dot_times,
          "gram_gflop": gram_flops / GB,
          "gate_gflop": gate_flops / GB,
          "floor_vs_fedavg": floor_s / fedavg_s,
          "floor_half_gram_vs_fedavg": floor_sym_s / fedavg_s,
          "rows": rows,
          "max_rel_diff_to_gram": agreement,
          "loadavg_at_end": os.getloadavg()[0],
          "total_script_s": time.time() - t_start,
          "markdown": md,
      },
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())

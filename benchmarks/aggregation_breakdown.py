"""Where the FedAlign-MoE aggregation spends its time: its array building blocks, one by one.

Command (2-core CPU: about a minute)::

    python benchmarks/aggregation_breakdown.py [--clients 100] [--experts 64]
    python benchmarks/aggregation_breakdown.py --clients 1000 --only x_bar --tag 1000

Times the jitted building blocks of fedalign/algorithms/fedalign.py and
fedalign/aggregation/moe_blocks.py on random arrays of the sizes that one MoE layer with
D = F = 64 gives (3 expert leaves x (C, E, 64, 64); every 7th client does not take part and
sends NaN), next to the formulations they replaced:

* the per-expert weighted sum sum_c w[c, e] x[c, e]: ``expert_sum`` (a scan over clients of
  fused multiply-adds) vs a reduction over the client axis (the former ``expert_sum``) vs an
  einsum with the expert axis as batch axis (XLA transposes x);
* FedAvg's sum: ``client_sum(w, x, part)`` on the deltas as sent vs the einsum on the
  zeroed deltas (``where(part, x, 0)``, a copy of x);
* per-client, per-expert reductions: squared norms as a batched dot; dot products with the
  consensus as a reduction with initial value -0.0 vs ``jnp.sum``, each alone and in a program
  that has another 0.0 constant (every real program does: see ``_expert_dots``), and inside a
  scan over clients (tried);
* the O(N) cosine (``consensus_expert_cosine``, three passes; tried: once in cache-sized
  blocks), the pairwise cosines
  (``pairwise_expert_cosine``: per expert, Gram matmuls) and the pairwise gate (per expert,
  all clients at once and in chunks).

Median of --reps calls after a warm-up, the cases called in turn. ``--only`` keeps the cases
whose name contains that text (``'a|b'``: either). Results: markdown table and
benchmarks/results/aggregation_breakdown[_TAG].json.
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

from _common import accelerator, block, machine, markdown_table, median, write_json  # noqa: E402
from fedalign.aggregation.moe_blocks import client_sum, expert_sum  # noqa: E402
from fedalign.algorithms.fedalign import (  # noqa: E402
    consensus_expert_cosine,
    pairwise_expert_cosine,
    pairwise_gate,
)

D = F = 64
H = jax.lax.Precision.HIGHEST


def _neg0_dots(xs, xbs):
  return sum(
      jax.lax.reduce(x * b[None], jnp.float32(-0.0), lambda u, v: u + v, (2, 3))
      for x, b in zip(xs, xbs)
  )


def _sum_dots(xs, xbs):
  return sum(jnp.sum(x * b[None], axis=(2, 3)) for x, b in zip(xs, xbs))


def _scan_dots(xs, xbs):
  """The dot products from -0.0 inside a scan over clients (tried in the fifteenth session, not
  adopted): what fusing them into the final weighted sum's scan would cost. Inside the loop
  body XLA:CPU runs the per-client reduction about 3x slower than the same reduction over all
  clients at the top level (section 2 of benchmarks/README.md)."""

  def body(carry, xc):
    return carry, sum(
        jax.lax.reduce(x * b, jnp.float32(-0.0), lambda u, v: u + v, (1, 2))
        for x, b in zip(xc, xbs)
    )

  return jax.lax.scan(body, 0.0, xs)[1]


def _variadic_consensus_cosine(xs, w, part):
  """consensus_expert_cosine with the squared norms inside the dot products' reduction (one
  variadic reduce from -0.0 per leaf): one read of the deltas fewer on paper; tried in the
  twelfth session and slower (section 2 of benchmarks/README.md)."""
  x_bars = expert_sum(w, xs, part)
  zero = jnp.float32(-0.0)
  pairs = [
      jax.lax.reduce(
          (x * b[None], x * x), (zero, zero), lambda u, v: (u[0] + v[0], u[1] + v[1]), (2, 3)
      )
      for x, b in zip(xs, x_bars)
  ]
  dot = jnp.where(part[:, None], sum(d for d, _ in pairs), 0.0)
  sq = jnp.where(part[:, None], sum(q for _, q in pairs), 0.0)
  sq_bar = sum(jnp.sum(jnp.square(b), axis=(1, 2)) for b in x_bars)
  return dot / jnp.maximum(jnp.sqrt(sq) * jnp.sqrt(sq_bar)[None], 1e-30)


def _one_read_consensus_cosine(xs, w, part, block_bytes=4 << 20):
  """consensus_expert_cosine reading the deltas once (tried in the fourteenth session, not
  adopted): a fori_loop over (C, l) blocks (all clients, l parameters of one expert, about
  ``block_bytes``) takes each block's slice of the consensus, then every client's share of
  the dot product and squared norm while the block is in cache. Its speed depends on the
  block staying in the shared L3 (section 2 of benchmarks/README.md): 1.4x faster than the
  three passes in one run, 1.8x slower in another an hour later."""
  num_clients, num_experts = w.shape
  dot = jnp.zeros((num_clients, num_experts), jnp.float32)
  sq = jnp.zeros((num_clients, num_experts), jnp.float32)
  sq_bar = jnp.zeros((num_experts,), jnp.float32)
  for x in xs:
    size = x.shape[2] * x.shape[3]
    rows = x.reshape(num_clients, num_experts, size)
    length = max(
        d for d in range(1, size + 1) if size % d == 0 and num_clients * d * 4 <= block_bytes
    )
    per = size // length

    def body(i, carry, rows=rows, length=length, per=per):
      dot, sq, sq_bar = carry
      e, s = i // per, i % per
      blk = jax.lax.dynamic_slice(rows, (0, e, s * length), (num_clients, 1, length))
      blk = jnp.where(part[:, None], blk.reshape(num_clients, length), 0.0)
      x_bar = jnp.dot(w[:, e], blk, precision=H)
      dot = dot.at[:, e].add(jnp.dot(blk, x_bar, precision=H))
      sq = sq.at[:, e].add(jnp.sum(blk * blk, axis=1))
      return dot, sq, sq_bar.at[e].add(jnp.sum(x_bar * x_bar))

    dot, sq, sq_bar = jax.lax.fori_loop(0, num_experts * per, body, (dot, sq, sq_bar), unroll=2)
  dot = jnp.where(part[:, None], dot, 0.0)
  sq = jnp.where(part[:, None], sq, 0.0)
  return dot / jnp.maximum(jnp.sqrt(sq) * jnp.sqrt(sq_bar)[None], 1e-30)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--clients", type=int, default=100)
  p.add_argument("--experts", type=int, default=64)
  p.add_argument("--chunk", type=int, default=16)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument(
      "--only", default="", help="keep the cases whose name contains this ('a|b': either)"
  )
  p.add_argument("--tag", default="", help="results file aggregation_breakdown_TAG.json")
  args = p.parse_args()
  c, e = args.clients, args.experts
  k = jax.random.split(jax.random.key(0), 8)
  part = jnp.arange(c) % 7 != 3
  xs = [
      jnp.where(part[:, None, None, None], jax.random.normal(k[i], (c, e, D, F)), jnp.nan)
      for i in range(3)
  ]
  xs = block(xs)
  zeroed = block([jnp.nan_to_num(x) for x in xs])  # the former inputs: prepare's zeroed rows
  w = jnp.where(part[:, None], jax.random.uniform(k[3], (c, e)), 0.0)
  xbs = block([x[0] for x in xs])
  mu = jax.random.normal(k[4], (c, e, D))
  kernels = 0.1 * jax.random.normal(k[5], (c, D, e))
  biases = jax.random.normal(k[6], (c, e))
  zero_use = lambda: jnp.zeros(3)  # another 0.0 constant in the program
  sum_over_clients = lambda w, xs: [jnp.sum(w[:, :, None, None] * x, axis=0) for x in xs]
  cases = {
      "expert_sum(w, 3 leaves, part): scan over clients": (
          lambda w, xs, p: expert_sum(w, xs, p),
          (w, xs, part),
      ),
      "former expert_sum: sum(w * x, axis=0), per leaf (on zeroed x)": (
          sum_over_clients,
          (w, zeroed),
      ),
      "einsum 'ce,cedf->edf' (HIGHEST), per leaf (on zeroed x)": (
          lambda w, xs: [jnp.einsum("ce,cedf->edf", w, x, precision=H) for x in xs],
          (w, zeroed),
      ),
      "client_sum(w, x, part) (FedAvg), 3 leaves, finite x: the einsum": (
          lambda w, xs, p: [client_sum(w, x, p) for x in xs],
          (w[:, 0], zeroed, part),
      ),
      "client_sum(w, x, part), 3 leaves, NaN rows: the einsum, then the scan": (
          lambda w, xs, p: [client_sum(w, x, p) for x in xs],
          (w[:, 0], xs, part),
      ),
      "former client_sum: einsum on where(part, x, 0), 3 leaves": (
          lambda w, xs, p: [client_sum(w, jnp.where(p[:, None, None, None], x, 0.0)) for x in xs],
          (w[:, 0], xs, part),
      ),
      "squared norms |x[c, e]|^2: batched dot 'cep,cep->ce', 3 leaves": (
          lambda xs: sum(
              jnp.einsum("cep,cep->ce", *(2 * [x.reshape(c, e, -1)]), precision=H) for x in xs
          ),
          (xs,),
      ),
      "<x[c, e], x_bar[e]>: reduce from -0.0, alone": (_neg0_dots, (xs, xbs)),
      "<x[c, e], x_bar[e]>: reduce from -0.0, program with another 0.0": (
          lambda xs, xbs: (_neg0_dots(xs, xbs), zero_use()),
          (xs, xbs),
      ),
      "<x[c, e], x_bar[e]>: reduce from -0.0 inside a scan over clients (tried)": (
          _scan_dots,
          (xs, xbs),
      ),
      "<x[c, e], x_bar[e]>: jnp.sum, alone": (_sum_dots, (xs, xbs)),
      "<x[c, e], x_bar[e]>: jnp.sum, program with another 0.0": (
          lambda xs, xbs: (_sum_dots(xs, xbs), zero_use()),
          (xs, xbs),
      ),
      "consensus_expert_cosine(3 leaves, w, part): O(N), 3 passes": (
          consensus_expert_cosine,
          (xs, w, part),
      ),
      "same, one read in (C, l) blocks of 4 MiB (tried): O(N)": (
          _one_read_consensus_cosine,
          (xs, w, part),
      ),
      "same, norms inside the dots' reduction (variadic reduce, tried): O(N), 2 passes": (
          _variadic_consensus_cosine,
          (xs, w, part),
      ),
      "pairwise_expert_cosine(3 leaves): per expert Gram matmuls": (
          pairwise_expert_cosine,
          (zeroed,),
      ),
      "pairwise_gate: per expert, all clients at once": (pairwise_gate, (mu, kernels, biases)),
      f"pairwise_gate: per expert, chunks of {args.chunk} clients": (
          lambda m, kk, b: pairwise_gate(m, kk, b, args.chunk),
          (mu, kernels, biases),
      ),
  }
  keep = args.only.split("|")
  cases = {k: v for k, v in cases.items() if any(o in k for o in keep)}
  info = machine()
  compiled = {}
  for name, (fn, fargs) in cases.items():
    t0 = time.perf_counter()
    f = jax.jit(fn).lower(*fargs).compile()
    block(f(*fargs))
    temp = f.memory_analysis().temp_size_in_bytes / 1e9
    compiled[name] = (f, fargs, time.perf_counter() - t0, temp)
  times = {name: [] for name in cases}
  for _ in range(args.reps):
    for name, (f, fargs, _, _) in compiled.items():
      t0 = time.perf_counter()
      block(f(*fargs))
      times[name].append(time.perf_counter() - t0)
  rows = []
  for name, (_, _, first, temp) in compiled.items():
    rows.append(
        {"op": name, "median_s": median(times[name]), "times_s": times[name], "temp_gb": temp}
    )
    print(f"{name}: {1e3 * median(times[name]):.1f} ms, temp {temp:.3f} GB", flush=True)
  command = "python " + " ".join([str(pathlib.Path(sys.argv[0]))] + sys.argv[1:])
  gb = 3 * xs[0].nbytes / 1e9
  header = (
      f"Command: `{command}`  \nMachine: {info['cpu']} ({info['arch']}, {info['cores']} "
      f"cores, {accelerator(info)}, shared: load average {info['loadavg_at_start'][0]} at start), "
      f"JAX {info['jax']}.  \nSizes: C = {c} clients, E = {e} experts, 3 expert leaves "
      f"(C, E, {D}, {F}) ({gb:.2f} GB), mu (C, E, {D}). The cases called in turn, median of "
      f"{args.reps} calls after a warm-up; temp = XLA's temporary buffers."
  )
  text = (
      "#### FedAlign-MoE aggregation building blocks\n\n"
      + header
      + "\n\n"
      + markdown_table(
          ["operation", "median (ms)", "temp (GB)"],
          [[r["op"], 1e3 * r["median_s"], r["temp_gb"]] for r in rows],
      )
  )
  print("\n" + text)
  path = write_json(
      f"aggregation_breakdown{'_' + args.tag if args.tag else ''}.json",
      {
          "command": command,
          "machine": info,
          "clients": c,
          "experts": e,
          "deltas_gb": gb,
          "rows": rows,
          "markdown": text,
      },
  )
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()

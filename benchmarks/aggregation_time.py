"""Aggregation time: FedAlign-MoE (pairwise and O(N)) against FedAvg, 10 to 1000 clients.

Command (2-core CPU: about 4 minutes with the defaults)::

    python benchmarks/aggregation_time.py
    python benchmarks/aggregation_time.py --clients 10 100 --experts 8   # quicker

Params: one MoE layer, router kernel (D, E) and experts wi_0, wi_1 (E, D, F), wo (E, F, D),
D = F = 64 (every leaf trained). Deltas: N(0, 0.01^2) plus a shared per-expert direction, so
that client updates are correlated. Routing statistics: ``fedalign.models.routing
.routing_stats`` of 256 random tokens per client (softmax of random logits with a per-client
expert bias, top-2), so p, c, m, mu are consistent. Client weights n_i random in [50, 500].

Variants: ``fedavg`` (``fedavg_aggregator()``), ``fedalign O(N)``
(``FedAlignConfig(pairwise=False)``), ``fedalign pairwise`` (``FedAlignConfig()``: pairwise,
'gate' similarity) and ``fedalign pairwise chunked`` (``pairwise_chunk_size=--chunk``: the
gate's logits in chunks of clients).

Each variant is lowered and compiled ahead of time (``jax.jit(aggregate).lower(...).compile()``,
timed as "compile"); XLA's memory analysis of the compiled program gives its temporary
buffers, reported against the bytes of the stacked deltas (the arguments). A variant whose
temporaries exceed 90% of the memory available at that moment is reported as "does not fit"
without running it. Then the variants of one size are called in turn (call by call, so that
the load of the shared machine spreads over all of them), ``--reps`` rounds; once ``--budget``
seconds are spent, only the variants whose call takes under ``--cheap`` seconds go on. The
table gives medians and ratios to FedAvg.
A big matmul (``--dot`` square, float32) is timed in the same rounds: the pairwise variant's
FLOP/s (its Gram matrices and gate logits) is given against it.

Also recorded (JSON ``precision``): whether ``Precision.HIGHEST`` changes XLA's compiled CPU
program or the result of the einsums the aggregation uses (on CPU a float32 dot is exact
float32 either way).
Results: printed markdown tables and benchmarks/results/aggregation_time.json.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import (  # noqa: E402
    accelerator,
    block,
    machine,
    markdown_table,
    mem_available_bytes,
    median,
    write_json,
)
from fedalign.algorithms.fedalign import (  # noqa: E402
    FedAlignConfig,
    fedalign_aggregator,
    gram_row_edges,
)
from fedalign.algorithms.fedavg import fedavg_aggregator  # noqa: E402
from fedalign.models.routing import routing_stats  # noqa: E402

D = F = 64
LEAVES = 3  # wi_0, wi_1, wo: D * F parameters each per expert
TOKENS = 256
TOP_K = 2
GB = 1e9
HIGHEST = jax.lax.Precision.HIGHEST


def make_problem(num_clients: int, num_experts: int, seed: int = 0):
  """Global params, client-stacked deltas, routing stats and weights of one MoE layer."""
  key = jax.random.key(seed)
  kp, kd, ks, kw = jax.random.split(key, 4)
  shapes = {"wi_0": (num_experts, D, F), "wi_1": (num_experts, D, F), "wo": (num_experts, F, D)}
  pk = jax.random.split(kp, 4)
  params = {
      "moe": {
          "router": {"kernel": 0.1 * jax.random.normal(pk[0], (D, num_experts))},
          "experts": {
              k: 0.05 * jax.random.normal(pk[i + 1], s)
              for i, (k, s) in enumerate(sorted(shapes.items()))
          },
      }
  }

  @jax.jit
  def leaf_delta(k, shape_like):
    a, b = jax.random.split(k)
    shared = jax.random.normal(a, shape_like.shape)
    return 0.01 * (shared[None] + jax.random.normal(b, (num_clients,) + shape_like.shape))

  dk = jax.random.split(kd, 4)
  deltas = {
      "moe": {
          "router": {"kernel": leaf_delta(dk[0], params["moe"]["router"]["kernel"])},
          "experts": {
              k: leaf_delta(dk[i + 1], params["moe"]["experts"][k])
              for i, k in enumerate(sorted(shapes))
          },
      }
  }

  @jax.jit
  def client_stats(keys):
    def one(k):
      a, b, c = jax.random.split(k, 3)
      logits = 2.0 * jax.random.normal(a, (TOKENS, num_experts)) + 1.5 * jax.random.normal(
          b, (num_experts,)
      )
      probs = jax.nn.softmax(logits, axis=-1)
      top = jax.lax.top_k(probs, TOP_K)[1]
      x = jax.random.normal(c, (TOKENS, D))
      return routing_stats(probs, top, x)

    return jax.vmap(one)(keys)

  stats = {"moe": client_stats(jax.random.split(ks, num_clients))}
  weights = jax.random.randint(kw, (num_clients,), 50, 501).astype(jnp.float32)
  return block((params, deltas, stats, weights))


def pairwise_flops(num_clients: int, num_experts: int) -> tuple[float, float]:
  """(executed, nominal) FLOPs of the pairwise variant's two O(C^2) parts.

  Gram matrices: per expert and leaf, 2 P n_a n_b for the client blocks a <= b that are
  multiplied (nominal: the full 2 C^2 P). Gate logits: per expert, (C, D) x (D, C E), 2 C^2 E D.
  """
  p_expert = LEAVES * D * F
  edges = gram_row_edges(num_clients)
  sizes = np.diff(edges)
  upper = sum(sizes[a] * sizes[b] for a in range(len(sizes)) for b in range(a, len(sizes)))
  gate = 2.0 * num_clients**2 * num_experts**2 * D
  executed = 2.0 * upper * p_expert * num_experts + gate
  nominal = 2.0 * num_clients**2 * p_expert * num_experts + gate
  return executed, nominal


def variants(chunk: int, num_clients: int) -> list[tuple[str, Any]]:
  out = [
      ("fedavg", fedavg_aggregator()),
      ("fedalign O(N)", fedalign_aggregator(FedAlignConfig(pairwise=False))),
      ("fedalign pairwise", fedalign_aggregator(FedAlignConfig())),
  ]
  if num_clients > chunk:
    out.append(
        (
            f"fedalign pairwise chunked ({chunk})",
            fedalign_aggregator(FedAlignConfig(pairwise_chunk_size=chunk)),
        )
    )
  return out


def compile_variant(agg, problem) -> tuple[dict[str, Any], Any]:
  """(row with compile time, memory analysis and status, callable or None)."""
  params, deltas, stats, weights = problem
  state = agg.init(params)
  row: dict[str, Any] = {}
  try:
    t0 = time.perf_counter()
    compiled = jax.jit(agg.aggregate).lower(state, params, deltas, stats, weights).compile()
    row["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is not None:
      row["temp_gb"] = mem.temp_size_in_bytes / GB
      row["argument_gb"] = mem.argument_size_in_bytes / GB
      row["output_gb"] = mem.output_size_in_bytes / GB
      need = mem.temp_size_in_bytes + mem.output_size_in_bytes
      avail = mem_available_bytes()
      if avail is not None and need > 0.9 * avail:
        row["status"] = (
            f"does not fit: needs {need / GB:.1f} GB of temporaries, "
            f"{avail / GB:.1f} GB available"
        )
        return row, None
    row["status"] = "ok"
    return row, lambda: block(compiled(state, params, deltas, stats, weights))
  except Exception as e:  # noqa: BLE001 - e.g. RESOURCE_EXHAUSTED: record and go on
    row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row, None


def big_dot(n: int):
  """A jitted (n, n) x (n, n) float32 matmul at HIGHEST precision and its FLOPs."""
  k1, k2 = jax.random.split(jax.random.key(1))
  a = block(jax.random.normal(k1, (n, n)))
  b = block(jax.random.normal(k2, (n, n)))
  f = jax.jit(lambda a, b: jnp.dot(a, b, precision=HIGHEST)).lower(a, b).compile()
  block(f(a, b))
  return (lambda: block(f(a, b))), 2.0 * n**3


def precision_check() -> dict[str, Any]:
  """Does Precision.HIGHEST change the compiled CPU program or the result? (per einsum)."""
  k = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(k[0], (50, 8, 64, 64))
  w = jax.random.uniform(k[1], (50,))
  r = jax.random.normal(k[2], (50, 4096))
  cases = {
      "client sum c,c...->...": (
          lambda p: lambda w, x: jnp.einsum("c,c...->...", w, x, precision=p),
          (w, x),
      ),
      "squared norms cep,cep->ce": (
          lambda p: lambda x: jnp.einsum("cep,cep->ce", *(2 * [x.reshape(50, 8, -1)]), precision=p),
          (x,),
      ),
      "Gram ip,jp->ij": (lambda p: lambda r: jnp.einsum("ip,jp->ij", r, r, precision=p), (r,)),
  }
  out = {}
  for name, (make, args) in cases.items():
    texts, results = [], []
    for p in (None, HIGHEST):
      compiled = jax.jit(make(p)).lower(*args).compile()
      text = compiled.as_text()
      text = re.sub(r"metadata=\{[^}]*\}|, operand_precision=\{[^}]*\}|HloModule \S+", "", text)
      text = re.sub(r"FileNames.*?StackFrames\n(\d+ \{[^\n]*\n)*", "", text, flags=re.S)
      texts.append(text)
      results.append(np.asarray(compiled(*args)))
    out[name] = {
        "same_program_but_the_precision_attribute": texts[0] == texts[1],
        "bitwise_equal_results": bool(np.array_equal(results[0], results[1])),
    }
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
  p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
  p.add_argument("--chunk", type=int, default=16, help="pairwise_chunk_size of the chunked row")
  p.add_argument("--reps", type=int, default=5, help="at most this many rounds of calls")
  p.add_argument(
      "--budget",
      type=float,
      default=30.0,
      help="stop the rounds of one size after this many seconds (at least one call each)",
  )
  p.add_argument(
      "--cheap",
      type=float,
      default=2.0,
      help="variants whose call takes less (s) are called --reps times whatever the budget",
  )
  p.add_argument("--dot", type=int, default=2048, help="size of the reference square matmul")
  p.add_argument(
      "--max-total",
      type=float,
      default=420.0,
      help="skip the remaining configurations after this many seconds",
  )
  p.add_argument("--tag", default="", help="results/aggregation_time_<tag>.json instead")
  args = p.parse_args()

  info = machine()
  print(f"machine: {info}", flush=True)
  t_start = time.perf_counter()
  precision = precision_check()
  print(f"precision: {precision}", flush=True)
  dot_fn, dot_flops = big_dot(args.dot)
  rows, dots = [], []
  for e in args.experts:
    for c in args.clients:
      deltas_gb = c * (LEAVES * e * D * F + D * e) * 4 / GB
      base = {"experts": e, "clients": c, "deltas_gb": deltas_gb}
      if time.perf_counter() - t_start > args.max_total:
        for name, _ in variants(args.chunk, c):
          rows.append(dict(base, variant=name, status="skipped: total time budget spent"))
        continue
      problem = make_problem(c, e)
      size_rows, calls = [], []
      for name, agg in variants(args.chunk, c):
        row, fn = compile_variant(agg, problem)
        row.update(base, variant=name, times_s=[])
        if "temp_gb" in row:
          row["temp_vs_deltas"] = row["temp_gb"] / deltas_gb
        size_rows.append(row)
        if fn is not None:
          calls.append((row, fn))
      dot_row = {"experts": e, "clients": c, "times_s": []}
      calls.append((dot_row, dot_fn))
      start = time.perf_counter()
      for r in range(args.reps):
        spent = r > 0 and time.perf_counter() - start > args.budget
        for row, fn in calls:
          if spent and row["times_s"][-1] > args.cheap:
            continue  # budget spent: only the cheap calls go on to --reps
          t0 = time.perf_counter()
          fn()
          row["times_s"].append(time.perf_counter() - t0)
      dot_s = median(dot_row["times_s"])
      dot_row.update(
          median_s=dot_s, gflops=dot_flops / dot_s / GB, loadavg_after=os.getloadavg()[0]
      )
      dots.append(dot_row)
      fedavg = size_rows[0].get("times_s")
      for row in size_rows:
        if row["times_s"]:
          row.update(median_s=median(row["times_s"]), reps=len(row["times_s"]))
          if fedavg:
            row["vs_fedavg"] = row["median_s"] / median(fedavg)
          if "pairwise" in row["variant"]:
            executed, nominal = pairwise_flops(c, e)
            row.update(
                gflop=executed / GB,
                gflop_nominal=nominal / GB,
                gflops=executed / row["median_s"] / GB,
                vs_big_dot=executed / row["median_s"] / GB / dot_row["gflops"],
            )
        rows.append(row)
        print(
            f"[{time.perf_counter() - t_start:.0f}s] E={e} C={c} {row['variant']}: "
            f"{row.get('median_s', float('nan')) * 1e3:.1f} ms ({row['status']}, "
            f"temp {row.get('temp_gb', float('nan')):.3f} GB, "
            f"{row.get('temp_vs_deltas', float('nan')):.2f}x deltas)",
            flush=True,
        )
      print(f"    big dot: {dot_row['gflops']:.1f} GFLOP/s", flush=True)
      del problem
  total = time.perf_counter() - t_start

  command = "python " + " ".join([str(pathlib.Path(sys.argv[0]))] + sys.argv[1:])
  header = (
      f"Command: `{command}`  \nMachine: {info['cpu']} ({info['arch']}, {info['cores']} "
      f"cores, {accelerator(info)}, shared: load average {info['loadavg_at_start'][0]} at start), "
      f"JAX {info['jax']} ({info['backend']}).  \nParams: one MoE layer, D = F = {D}, "
      f"router (D, E) + experts wi_0, wi_1, wo; random deltas; stats from routing_stats "
      f"of {TOKENS} random tokens per client, top-{TOP_K}.  \nThe variants of one size "
      f"called in turn, {args.reps} rounds (past {args.budget:.0f} s, only the calls under "
      f"{args.cheap:.0f} s go on: see 'calls'); median per variant; 'x fedavg' = median / FedAvg median at the same size; "
      f"temp = XLA's temporary buffers of the compiled program, also as a multiple of the "
      f"stacked deltas. Pairwise FLOP/s: executed FLOPs of its Gram matrices and gate logits "
      f"/ median, against a {args.dot}^3 float32 matmul timed in the same rounds. Total "
      f"script time {total:.0f} s."
  )

  def cell(r, key, scale=1.0):
    return r[key] * scale if key in r else "-"

  table = markdown_table(
      [
          "experts",
          "clients",
          "deltas (GB)",
          "variant",
          "median (ms)",
          "x fedavg",
          "calls",
          "compile (s)",
          "temp (GB)",
          "temp / deltas",
          "GFLOP/s (x big dot)",
          "status",
      ],
      [
          [
              r["experts"],
              r["clients"],
              r["deltas_gb"],
              r["variant"],
              cell(r, "median_s", 1e3),
              cell(r, "vs_fedavg"),
              r.get("reps", "-"),
              cell(r, "compile_s"),
              cell(r, "temp_gb"),
              cell(r, "temp_vs_deltas"),
              f"{r['gflops']:.1f} ({r['vs_big_dot']:.2f})" if "gflops" in r else "-",
              r["status"],
          ]
          for r in rows
      ],
  )
  dot_table = markdown_table(
      [
          "experts",
          "clients",
          f"big dot {args.dot}^3 (ms)",
          "GFLOP/s",
          "calls",
          "load average after the size",
      ],
      [
          [
              d["experts"],
              d["clients"],
              d["median_s"] * 1e3,
              d["gflops"],
              len(d["times_s"]),
              d["loadavg_after"],
          ]
          for d in dots
      ],
  )
  prec = markdown_table(
      ["einsum", "same compiled program with HIGHEST", "bitwise equal results"],
      [
          [k, v["same_program_but_the_precision_attribute"], v["bitwise_equal_results"]]
          for k, v in precision.items()
      ],
  )
  text = (
      "#### Aggregation time: FedAlign-MoE vs FedAvg\n\n"
      + header
      + "\n\n"
      + table
      + "\n\n#### Reference matmul, timed in the same rounds\n\n"
      + dot_table
      + f"\n\n#### Precision.HIGHEST on {info['backend']} (compiled program compared without the precision "
      "attribute and metadata)\n\n" + prec
  )
  print("\n" + text)
  path = write_json(
      f"aggregation_time_{args.tag}.json" if args.tag else "aggregation_time.json",
      {
          "command": command,
          "machine": info,
          "D": D,
          "F": F,
          "tokens_per_client": TOKENS,
          "top_k": TOP_K,
          "chunk": args.chunk,
          "big_dot_n": args.dot,
          "total_script_s": total,
          "precision": precision,
          "big_dot": dots,
          "rows": rows,
          "markdown": text,
      },
  )
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()

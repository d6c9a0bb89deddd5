"""Aggregation time: FedAlign-MoE (pairwise and O(N)) against FedAvg, 10 to 1000 clients.

Command (2-core CPU: about 5 minutes with the defaults; needs ~17 GB free memory for the
1000-client x 64-expert pairwise row, which is skipped otherwise)::

    python benchmarks/aggregation_time.py
    python benchmarks/aggregation_time.py --clients 10 100 --experts 8   # quicker

Params: one MoE layer, router kernel (D, E) and experts wi_0, wi_1 (E, D, F), wo (E, F, D),
D = F = 64 (every leaf trained). Deltas: N(0, 0.01^2) plus a shared per-expert direction, so
that client updates are correlated. Routing statistics: ``fedalign.models.routing
.routing_stats`` of 256 random tokens per client (softmax of random logits with a per-client
expert bias, top-2), so p, c, m, mu are consistent. Client weights n_i random in [50, 500].

Variants: ``fedavg`` (``fedavg_aggregator()``), ``fedalign O(N)``
(``FedAlignConfig(pairwise=False)``), ``fedalign pairwise`` (``FedAlignConfig()``: pairwise,
'gate' similarity, gamma built from (C, C, E, E) logits at once) and ``fedalign pairwise
chunked`` (``pairwise_chunk_size=--chunk``; the gamma logits in chunks of clients under
lax.map).

Each variant is lowered and compiled ahead of time (``jax.jit(aggregate).lower(...).compile()``,
timed as "compile"); XLA's memory analysis of the compiled program gives its temporary
buffers. A variant whose arguments + temporaries exceed 90% of the memory available at that
moment is reported as "does not fit" without running it. Then the compiled program is called
until ``--reps`` calls or ``--budget`` seconds (at least one call); the table gives the median.
Results: printed markdown table and benchmarks/results/aggregation_time.json.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import (
    block,
    machine,
    markdown_table,
    mem_available_bytes,
    median,  # noqa: E402
    write_json,
)
from fedalign.algorithms.fedalign import FedAlignConfig, fedalign_aggregator  # noqa: E402
from fedalign.algorithms.fedavg import fedavg_aggregator  # noqa: E402
from fedalign.models.routing import routing_stats  # noqa: E402

D = F = 64
TOKENS = 256
TOP_K = 2
GB = 1e9


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


def run_variant(agg, problem, reps: int, budget_s: float) -> dict[str, Any]:
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
        return row
    times = []
    start = time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < budget_s):
      t0 = time.perf_counter()
      block(compiled(state, params, deltas, stats, weights))
      times.append(time.perf_counter() - t0)
    row.update(status="ok", times_s=times, median_s=median(times), reps=len(times))
  except Exception as e:  # noqa: BLE001 - e.g. RESOURCE_EXHAUSTED: record and go on
    row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return row


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
  p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
  p.add_argument("--chunk", type=int, default=16, help="pairwise_chunk_size of the chunked row")
  p.add_argument("--reps", type=int, default=5, help="at most this many timed calls")
  p.add_argument(
      "--budget",
      type=float,
      default=15.0,
      help="stop timing a variant after this many seconds (at least one call)",
  )
  p.add_argument(
      "--max-total",
      type=float,
      default=450.0,
      help="skip the remaining configurations after this many seconds",
  )
  args = p.parse_args()

  info = machine()
  print(f"machine: {info}", flush=True)
  t_start = time.perf_counter()
  rows = []
  for e in args.experts:
    for c in args.clients:
      deltas_gb = c * (3 * e * D * F + D * e) * 4 / GB
      if time.perf_counter() - t_start > args.max_total:
        for name, _ in variants(args.chunk, c):
          rows.append(
              {
                  "experts": e,
                  "clients": c,
                  "variant": name,
                  "deltas_gb": deltas_gb,
                  "status": f"skipped: total time budget ({args.max_total:.0f} s) spent",
              }
          )
        continue
      problem = make_problem(c, e)
      base = None
      for name, agg in variants(args.chunk, c):
        row = {"experts": e, "clients": c, "variant": name, "deltas_gb": deltas_gb}
        row.update(run_variant(agg, problem, args.reps, args.budget))
        if name == "fedavg" and row["status"] == "ok":
          base = row["median_s"]
        if row["status"] == "ok" and base:
          row["vs_fedavg"] = row["median_s"] / base
        rows.append(row)
        print(
            f"[{time.perf_counter() - t_start:.0f}s] E={e} C={c} {name}: "
            f"{row.get('median_s', float('nan')) * 1e3:.1f} ms ({row['status']}, "
            f"temp {row.get('temp_gb', float('nan')):.2f} GB)",
            flush=True,
        )
      del problem
  total = time.perf_counter() - t_start

  command = "python " + " ".join([str(pathlib.Path(sys.argv[0]))] + sys.argv[1:])
  header = (
      f"Command: `{command}`  \nMachine: {info['cpu']} ({info['arch']}, {info['cores']} "
      f"cores, no GPU, shared: load average {info['loadavg_at_start'][0]} at start), "
      f"JAX {info['jax']} ({info['backend']}).  \nParams: one MoE layer, D = F = {D}, "
      f"router (D, E) + experts wi_0, wi_1, wo; random deltas; stats from routing_stats "
      f"of {TOKENS} random tokens per client, top-{TOP_K}.  \nMedian of up to "
      f"{args.reps} calls of the AOT-compiled aggregate (fewer when one call exceeds "
      f"{args.budget:.0f} s: see 'calls'); 'x fedavg' = median / FedAvg median at the same "
      f"size; temp = XLA's temporary buffers of the compiled program. Total script time "
      f"{total:.0f} s."
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
              r["status"],
          ]
          for r in rows
      ],
  )
  text = "### Aggregation time: FedAlign-MoE vs FedAvg\n\n" + header + "\n\n" + table
  print("\n" + text)
  path = write_json(
      "aggregation_time.json",
      {
          "command": command,
          "machine": info,
          "D": D,
          "F": F,
          "tokens_per_client": TOKENS,
          "top_k": TOP_K,
          "chunk": args.chunk,
          "total_script_s": total,
          "rows": rows,
          "markdown": text,
      },
  )
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()

"""Where one aggregation's time goes: a ``jax.profiler`` trace of the compiled aggregate, by op.

Builds the synthetic MoE layer of ``benchmarks/aggregation_time.py`` (D = F = 64, 3 expert
leaves, a router, routing statistics; ``make_problem``) at ``--clients`` x ``--experts``,
compiles one variant's ``aggregate`` (``fedavg``, ``o_n`` = FedAlign-MoE O(N), ``pairwise``),
calls it once, then traces ``--reps`` calls. Every XLA thunk event is mapped to the JAX op that
produced it (the compiled HLO's ``op_name`` metadata, as in ``profile_round.py``; instructions
without metadata, e.g. some dots inside loops, keep their HLO name) and the times are summed per
op. Thunk times are summed over XLA:CPU's threads, so they can exceed the wall time (given
next to them).

Command (2-core CPU, 1000 x 64: about a minute)::

    python benchmarks/profile_aggregation.py --clients 1000 --experts 64 --variant o_n --tag o_n_1000x64

Writes ``benchmarks/results/profile_aggregation_<tag>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from _common import machine, markdown_table, median, write_json  # noqa: E402
from aggregation_time import make_problem  # noqa: E402
from fedalign.algorithms.fedalign import FedAlignConfig, fedalign_aggregator  # noqa: E402
from fedalign.algorithms.fedavg import fedavg_aggregator  # noqa: E402
from profile_round import hlo_op_names  # noqa: E402

VARIANTS = {
    "fedavg": fedavg_aggregator,
    "o_n": lambda: fedalign_aggregator(FedAlignConfig(pairwise=False)),
    "pairwise": lambda: fedalign_aggregator(FedAlignConfig()),
}


def op_label(hlo_op: str, names: dict[str, str]) -> str:
  """The JAX op path without the jit(aggregate) prefix, or the HLO name without its number.

  >>> op_label("fusion.3", {"fusion.3": "jit(aggregate)/while/body/add"}), op_label("dot.11", {})
  ('while/body/add', 'dot (no op_name)')
  """
  name = names.get(hlo_op)
  if name is None:
    return re.sub(r"\.\d+$", "", hlo_op) + " (no op_name)"
  return re.sub(r"^jit\(aggregate\)/", "", name)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--clients", type=int, default=1000)
  ap.add_argument("--experts", type=int, default=64)
  ap.add_argument("--variant", choices=sorted(VARIANTS), default="o_n")
  ap.add_argument("--reps", type=int, default=3, help="traced calls")
  ap.add_argument("--top", type=int, default=15, help="ops in the table")
  ap.add_argument("--tag", default=None, help="results/profile_aggregation_<tag>.json")
  args = ap.parse_args()
  tag = args.tag or f"{args.variant}_{args.clients}x{args.experts}"

  info = machine()
  params, deltas, stats, weights = make_problem(args.clients, args.experts)
  agg = VARIANTS[args.variant]()
  state = agg.init(params)
  compiled = jax.jit(agg.aggregate).lower(state, params, deltas, stats, weights).compile()
  names = hlo_op_names(compiled.as_text())
  jax.block_until_ready(compiled(state, params, deltas, stats, weights))
  trace_dir = tempfile.mkdtemp(prefix="fedalign_profile_agg_")
  walls = []
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.reps):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(state, params, deltas, stats, weights))
      walls.append(time.perf_counter() - t0)
  path = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)[0]
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events

  ms: dict[str, float] = collections.defaultdict(float)
  calls: collections.Counter = collections.Counter()
  for e in events:
    a = e.get("args") or {}
    if e.get("ph") != "X" or "hlo_op" not in a:
      continue
    label = op_label(a["hlo_op"], names)
    ms[label] += float(e.get("dur", 0.0)) / 1e3 / args.reps
    calls[label] += 1
  total = sum(ms.values())
  ranked = sorted(ms, key=lambda k: -ms[k])
  rows = [
      [k.replace("|", "\\|"), f"{ms[k]:.2f}", f"{100 * ms[k] / total:.1f}%", calls[k] // args.reps]
      for k in ranked[: args.top]
  ]
  wall = median(walls)
  md = (
      f"#### Profile of one aggregation: {args.variant}, {args.clients} clients x "
      f"{args.experts} experts\n\n"
      f"Command: `python benchmarks/profile_aggregation.py --clients {args.clients} "
      f"--experts {args.experts} --variant {args.variant} --tag {tag}`  \n"
      f"Machine: {info.get('cpu')} ({info.get('cores')} cores), JAX {info.get('jax')}, "
      f"load average {info['loadavg_at_start'][0]} at start.  \n"
      f"Wall time {wall * 1e3:.1f} ms (median of {args.reps} traced calls); summed thunk time "
      f"{total:.1f} ms; the {args.top} largest ops:\n\n"
      + markdown_table(["op", "ms per call", "share", "thunks per call"], rows)
  )
  print(md)
  write_json(
      f"profile_aggregation_{tag}.json",
      {
          "machine": info,
          "args": vars(args),
          "wall_ms": wall * 1e3,
          "thunk_ms_total": total,
          "ops": [{"op": k, "ms": ms[k], "thunks_per_call": calls[k] // args.reps} for k in ranked],
          "markdown": md,
      },
  )


if __name__ == "__main__":
  main()

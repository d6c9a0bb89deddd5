"""Lanes vs padding: useful client-steps per computed one, and the round's time on this CPU.

Command (2-core CPU: the ratios take seconds, the timing ~10-20 minutes with the defaults)::

    python benchmarks/lanes.py                       # ratios for seeds 0-4, timing on seed 0
    python benchmarks/lanes.py --no-time             # ratios only
    python benchmarks/lanes.py --reps 1 --max-train-examples 3000   # a quicker timing

Setting: configs/default.py (10 clients, Dirichlet alpha = 0.1 partition of the embedded AG
News rows, batch 32, every client in every round) with one local epoch instead of fixed
local steps (``train.local_steps=0, train.local_epochs=1``): client i takes ceil(n_i / 32)
steps, so the clients' step counts are as skewed as their data.

Ratios (numpy only): a vmapped group computes (clients in it) x (its longest client) steps,
a lane round (lanes) x (its longest lane); 'useful' counts the real steps.

* ``padded``: all 10 clients in one vmapped group, padded to the longest (``chunk_size=0``).
* ``chunks of 2``: clients sorted by size, vmapped 2 at a time (the default ``chunk_size=2``).
* ``lanes = L (exact)``: LPT onto exactly L lanes (:func:`fedalign.federated.round.
  lane_schedule`).
* ``train.lanes = L``: what a run does (:func:`~fedalign.federated.round.choose_lanes` with
  ``lanes_min_useful`` 0.9): at most L lanes, the fewest slots with >= 0.9 useful.

'slots' = the round's sequential length in client-steps (a group or lane runs its steps one
after another; chunks run one after another): the round's time on a device wide enough to
run every lane (or every client of a group) at the cost of one.

Timing: one FedAvg round of the default model on seed 0's data, for ``padded``,
``chunks of 2`` and lanes (``train.lanes`` = 2 and 10), compiled ahead of time, then
``--reps`` calls of each, the variants interleaved call by call (the cores are shared).
Results: printed markdown tables and benchmarks/results/lanes.json.
"""

from __future__ import annotations

import argparse
import math
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

from _common import block, machine, markdown_table, median, write_json  # noqa: E402
from fedalign.config_files import load_config  # noqa: E402
from fedalign.data import partition as part  # noqa: E402
from fedalign.data.agnews import load_embedded_agnews  # noqa: E402
from fedalign.federated.round import (  # noqa: E402
    choose_lanes,
    lane_batches,
    lane_schedule,
    make_round_fn,
)

LANES = (1, 2, 5, 10)


def bench_config(seed: int = 0, max_train_examples: int = 0):
  """configs/default.py, FedAvg, one local epoch (no fixed local steps), all at once."""
  cfg = load_config(REPO / "configs" / "default.py", "base")
  cfg.seed = seed
  cfg.method = "fedavg"
  cfg.train.local_steps = 0
  cfg.train.local_epochs = 1
  cfg.train.chunk_size = 0
  cfg.data.max_train_examples = max_train_examples
  return cfg


def client_steps(cfg) -> np.ndarray:
  """Steps per client in a round: the partition of fedalign.data.federated.FederatedData
  (embedded AG News, all rows, no validation hold-out), 1 epoch of batches."""
  train, _ = load_embedded_agnews()
  d = cfg.data
  assert not d.max_train_examples and not d.validation_examples and d.dataset == "agnews_embedded"
  clients = part.dirichlet_partition(
      np.asarray(train.label), d.num_clients, d.alpha, cfg.seed, min_size=d.min_client_size
  )
  sizes = np.array([len(c) for c in clients])
  return cfg.train.local_epochs * -(-sizes // cfg.train.batch_size)


def chunk_groups(steps: np.ndarray, size: int) -> list[np.ndarray]:
  """Run.round_inputs' order for chunks: by decreasing size (stable), cut into chunks."""
  order = np.argsort(-steps, kind="stable")
  return [order[i : i + size] for i in range(0, len(order), size)]


def ratio_rows(steps: np.ndarray) -> list[dict[str, Any]]:
  """useful / computed client-steps and slots of every variant for one round's steps."""
  total, c = int(steps.sum()), len(steps)
  rows = [
      {
          "variant": "padded (all 10 vmapped)",
          "lanes": c,
          "slots": int(steps.max()),
          "computed": c * int(steps.max()),
      }
  ]
  groups = chunk_groups(steps, 2)
  rows.append(
      {
          "variant": "chunks of 2 (size-sorted)",
          "lanes": 2,
          "slots": int(sum(steps[g].max() for g in groups)),
          "computed": int(sum(len(g) * steps[g].max() for g in groups)),
      }
  )
  for n in LANES:
    s = lane_schedule(steps, n)
    rows.append(
        {
            "variant": f"lanes = {n} (exact)",
            "lanes": n,
            "slots": s.num_slots,
            "computed": s.computed,
        }
    )
  for n in LANES:
    used = choose_lanes(steps, n, min_useful=0.9)
    s = lane_schedule(steps, used)
    rows.append(
        {
            "variant": f"train.lanes = {n}",
            "lanes": used,
            "slots": s.num_slots,
            "computed": s.computed,
        }
    )
  for r in rows:
    r["useful"] = total
    r["useful_fraction"] = total / r["computed"]
  return rows


# ------------------------------------------------------------------------------------ timing
def timing(args, cfg) -> dict[str, Any]:
  from fedalign.federated.run import build_run

  t0 = time.perf_counter()
  run = build_run(cfg, args.workdir)
  build_s = time.perf_counter() - t0
  batches, weights, ids_in, ids = run.round_inputs(0)  # chunk_size=0: unsorted, no padding
  assert np.array_equal(ids_in, ids) and len(ids) == cfg.train.clients_per_round
  steps = batches["step_mask"].sum(1)
  if not args.max_train_examples:
    assert steps.tolist() == client_steps(cfg)[ids].tolist()
  state = run.initial_state
  make = lambda **kw: jax.jit(make_round_fn(run.client_update, run.algorithm, run.mask, **kw))
  weights, ids = jnp.asarray(weights), jnp.asarray(ids)
  cases: dict[str, dict[str, Any]] = {}
  cases["padded (all 10 vmapped)"] = dict(
      fn=make(seed=cfg.seed),
      args=(state, batches, weights, ids, 0),
      computed=len(ids) * steps.max(),
  )
  order = np.argsort(-steps, kind="stable")
  sorted_batches = {k: v[order] for k, v in batches.items()}
  cases["chunks of 2 (size-sorted)"] = dict(
      fn=make(seed=cfg.seed, chunk_size=2),
      args=(state, sorted_batches, weights[order], ids[order], 0),
      computed=sum(2 * steps[order][i : i + 2].max() for i in range(0, len(order), 2)),
  )
  lane_fn = make(seed=cfg.seed, lanes=True)
  for n in args.exact_lanes:  # exactly n lanes (n = 10: the padded round's vmap width)
    sched = lane_schedule(steps, n)
    cases[f"lanes = {n} (exact)"] = dict(
        fn=lane_fn,
        args=(state, lane_batches(batches, sched), weights, ids, 0),
        computed=sched.computed,
    )
  for n in args.time_lanes:
    sched = lane_schedule(steps, choose_lanes(steps, n))
    cases[f"train.lanes = {n} ({sched.num_lanes} lanes)"] = dict(
        fn=lane_fn,
        args=(state, lane_batches(batches, sched), weights, ids, 0),
        computed=sched.computed,
        schedule=sched,
    )
  for name, c in cases.items():
    t0 = time.perf_counter()
    c["compiled"] = c["fn"].lower(*c["args"]).compile()
    c["compile_s"] = time.perf_counter() - t0
    c["times_s"] = []
    print(f"compiled {name}: {c['compile_s']:.1f} s", flush=True)
  for rep in range(args.reps):
    for name, c in cases.items():
      t0 = time.perf_counter()
      out = block(c["compiled"](*c["args"]))
      c["times_s"].append(time.perf_counter() - t0)
      c["params"] = out[0]["params"]
      print(f"rep {rep} {name}: {c['times_s'][-1]:.1f} s", flush=True)
  ref = cases["padded (all 10 vmapped)"]
  update = max(
      float(jnp.max(jnp.abs(a - b)))
      for a, b in zip(jax.tree.leaves(ref["params"]), jax.tree.leaves(state["params"]))
  )
  rows = []
  for name, c in cases.items():
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(c["params"]), jax.tree.leaves(ref["params"]))
    )
    med = median(c["times_s"])
    rows.append(
        {
            "variant": name,
            "computed": int(c["computed"]),
            "useful": int(steps.sum()),
            "compile_s": c["compile_s"],
            "times_s": c["times_s"],
            "median_s": med,
            "min_s": min(c["times_s"]),
            "ms_per_computed_step": 1e3 * med / int(c["computed"]),
            "max_abs_param_diff_vs_padded": diff,
        }
    )
  for r in rows:
    r["padded_over_variant"] = rows[0]["median_s"] / r["median_s"]
    r["min_padded_over_variant"] = rows[0]["min_s"] / r["min_s"]
  return {
      "build_run_s": build_s,
      "steps": steps.tolist(),
      "rows": rows,
      "max_abs_param_update_padded": update,
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  p.add_argument("--reps", type=int, default=2, help="timed calls of each variant")
  p.add_argument("--time-lanes", type=int, nargs="*", default=[2, 10])
  p.add_argument(
      "--exact-lanes", type=int, nargs="*", default=[], help="also time exactly these lanes"
  )
  p.add_argument("--no-time", action="store_true")
  p.add_argument("--max-train-examples", type=int, default=0, help="timing only: fewer rows")
  p.add_argument("--workdir", default="/tmp/fedalign_bench_lanes", help="tokenizer cache")
  p.add_argument("--tag", default="", help="results/lanes_<tag>.json instead")
  args = p.parse_args()
  t_start = time.perf_counter()
  info = machine()
  out: dict[str, Any] = {"machine": info, "seeds": {}, "args": vars(args)}

  for seed in args.seeds:
    steps = client_steps(bench_config(seed))
    out["seeds"][seed] = {"steps": steps.tolist(), "rows": ratio_rows(steps)}
  seed0 = args.seeds[0]
  s0 = out["seeds"][seed0]
  print(f"\n#### Useful / computed client-steps, seed {seed0} (configs/default.py's partition)\n")
  print(
      f"Steps per client (1 epoch, batch 32): {s0['steps']} (sum {sum(s0['steps'])}, "
      f"longest {max(s0['steps'])}).\n"
  )
  print(
      markdown_table(
          ["variant", "lanes run", "slots", "computed client-steps", "useful / computed"],
          [
              [r["variant"], r["lanes"], r["slots"], r["computed"], r["useful_fraction"]]
              for r in s0["rows"]
          ],
      )
  )
  print(f"\n#### Useful / computed client-steps over seeds {args.seeds}\n")
  names = [r["variant"] for r in s0["rows"]]
  print(
      markdown_table(
          ["variant"] + [f"seed {s}" for s in args.seeds] + ["min", "max"],
          [
              [name]
              + [out["seeds"][s]["rows"][i]["useful_fraction"] for s in args.seeds]
              + [
                  min(out["seeds"][s]["rows"][i]["useful_fraction"] for s in args.seeds),
                  max(out["seeds"][s]["rows"][i]["useful_fraction"] for s in args.seeds),
              ]
              for i, name in enumerate(names)
          ],
          digits=2,
      )
  )

  if not args.no_time:
    cfg = bench_config(seed0, args.max_train_examples)
    res = timing(args, cfg)
    out["timing"] = res
    sizes = (
        f"decoder MoE, hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers, "
        f"{cfg.model.num_experts} experts top-{cfg.model.top_k}, vocab {cfg.data.vocab_size}, "
        f"seq {cfg.data.seq_len}, batch {cfg.train.batch_size}, AdamW"
    )
    print(
        f"\n#### One FedAvg round (1 local epoch, seed {seed0}): padded vs chunks vs lanes\n\n"
        f"Command: `python benchmarks/lanes.py{' ' if sys.argv[1:] else ''}"
        f"{' '.join(sys.argv[1:])}`  \n"
        f"Machine: {info['cpu']} ({info['arch']}, {info['cores']} cores, shared: load average "
        f"{info['loadavg_at_start'][0]} at start), JAX {info['jax']} ({info['backend']}).  \n"
        f"Model: {sizes}; steps per client {res['steps']}.  \n"
        f"Median of {args.reps} calls per variant, interleaved call by call, after an "
        f"ahead-of-time compile. The padded round changes the params by up to "
        f"{res['max_abs_param_update_padded']:.2g} (max abs).\n"
    )
    print(
        markdown_table(
            [
                "variant",
                "computed client-steps",
                "median round (s)",
                "padded / variant",
                "min: padded / variant",
                "ms per computed step",
                "compile (s)",
                "max abs param diff vs padded",
            ],
            [
                [
                    r["variant"],
                    r["computed"],
                    r["median_s"],
                    r["padded_over_variant"],
                    r["min_padded_over_variant"],
                    r["ms_per_computed_step"],
                    r["compile_s"],
                    f"{r['max_abs_param_diff_vs_padded']:.1e}",
                ]
                for r in res["rows"]
            ],
        )
    )
  out["total_s"] = time.perf_counter() - t_start
  path = write_json(f"lanes_{args.tag}.json" if args.tag else "lanes.json", out)
  print(f"\nTotal {out['total_s']:.0f} s; raw numbers: {path}")


if __name__ == "__main__":
  main()

"""Round time: the one-jit vmapped round against a Python loop of per-client jitted updates.

Command (2-core CPU: about 5-6 minutes with the defaults)::

    python benchmarks/round_time.py                      # all parts, default sizes
    python benchmarks/round_time.py --clients 4 10 --steps 1 --reps 2 --no-mesh   # quicker
    # tiny per-client work (dispatch-bound regime), written to results/round_time_tiny.json:
    python benchmarks/round_time.py --tag tiny --batch 1 --seq 16 --vocab 256 --reps 5 \
        --no-mesh --no-fedalign --chunk-size 0
    # the round as configs/default.py runs it on CPU (vmapped chunks of 2) at every count,
    # both regimes:
    python benchmarks/round_time.py --tag chunked --no-mesh --no-fedalign --chunk-clients 4 10 32
    python benchmarks/round_time.py --tag tiny_chunked --batch 1 --seq 16 --vocab 256 --reps 7 \
        --no-mesh --no-fedalign --chunk-clients 4 10 32

What is timed (random token batches, every client the same amount of work):

* ``vmapped``: ``jax.jit(make_round_fn(...))``, every client of the round in one vmap, then
  the exclusion of non-finite updates and the aggregation, all in one XLA program.
* ``loop`` (the fedjax-default style): ``for client in clients: out = jit(client_update)(...)``
  one jitted call per client (the same compiled program for every client), then one jitted
  aggregation call that stacks the client outputs, excludes non-finite ones and aggregates.
* ``aggregate alone``: ``jax.jit(aggregator.aggregate)`` on the stacked deltas and routing
  statistics of the round, for FedAvg and FedAlign-MoE (defaults: pairwise, 'gate').
* ``chunked``: the vmapped round with ``chunk_size`` clients per vmapped chunk (lax.map over
  the chunks, still one XLA program), at the client counts of ``--chunk-clients``; its table
  also gives loop / chunked.
* ``mesh`` (a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8): the
  vmapped round with the client axis sharded over a 'clients' mesh of 8 fake CPU devices
  against the same round on one device. Fake devices share the same 2 cores: this shows that
  the sharded program runs and agrees, not a speed-up.

Each configuration is called once to warm up (trace + compile + run), then ``--reps`` times;
the tables give medians. "compile" = first call - median call (an estimate of trace + compile).
Results: printed markdown tables and benchmarks/results/round_time[_<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import accelerator, block, machine, markdown_table, median, time_calls, write_json  # noqa: E402
from fedalign.config_files import load_config  # noqa: E402
from fedalign.aggregation.moe_blocks import client_ok  # noqa: E402
from fedalign.federated.round import CLIENT_AXIS, init_server_state, make_round_fn  # noqa: E402
from fedalign.federated.run import build_training  # noqa: E402
from fedalign.models import init_params, partition  # noqa: E402
from fedalign.models.from_config import model_config_from  # noqa: E402

SEED = 0


def default_config(
    method: str = "fedavg",
    steps: int = 2,
    batch: int | None = None,
    seq: int | None = None,
    vocab: int | None = None,
):
  """configs/default.py with a method, a fixed number of local steps and optional sizes."""
  cfg = load_config(REPO / "configs" / "default.py", "base")
  cfg.method = method
  cfg.train.local_steps = steps
  if batch:
    cfg.train.batch_size = batch
  if seq:
    cfg.data.seq_len = seq
  if vocab:
    cfg.data.vocab_size = vocab
  return cfg


class Setup:
  """Model, algorithm and pure client update of one method on the default config's model."""

  def __init__(self, cfg):
    self.cfg = cfg
    self.mcfg = model_config_from(cfg, cfg.data.vocab_size)
    self.params = init_params(self.mcfg, jax.random.key(SEED), seq_len=cfg.data.seq_len)
    # The training side exactly as fedalign.federated.run.build_run builds it.
    training = build_training(cfg, self.mcfg, self.params, num_clients=1000)
    self.mask, self.algorithm = training.mask, training.algorithm
    assert self.algorithm.init_client_state is None, "the loop baseline is for stateless methods"
    self.client_update = training.client_update
    self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

  def state(self, num_clients: int) -> dict:
    return init_server_state(self.params, self.algorithm, self.mask, num_clients)

  def vmapped_round(self, chunk_size: int | None = None, mesh=None):
    return jax.jit(
        make_round_fn(
            self.client_update,
            self.algorithm,
            self.mask,
            seed=SEED,
            chunk_size=chunk_size,
            mesh=mesh,
        )
    )

  def loop_round(self):
    """The fedjax-default style: one jitted call per client, then one jitted aggregation."""
    cu, algorithm, mask = self.client_update, self.algorithm, self.mask

    def one_client(global_trainable, frozen, batches, broadcast, cid, round_idx):
      # the same per-client key as round.client_rngs
      rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(SEED), round_idx), cid)
      return cu(global_trainable, frozen, batches, broadcast, jnp.zeros((), jnp.float32), rng)

    def aggregate(server_state, outs, weights):
      deltas, stats, metrics, _ = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
      ok = client_ok(deltas, stats, metrics["train_loss"])
      weights = jnp.where(ok, weights, 0.0)  # the aggregator ignores weight-0 clients' inputs
      new_params, agg_state, _ = algorithm.aggregator.aggregate(
          server_state["agg"], server_state["params"], deltas, stats, weights
      )
      new_state = dict(server_state, params=new_params, agg=agg_state)
      loss = jnp.sum(metrics["train_loss"] * weights) / jnp.maximum(jnp.sum(weights), 1e-12)
      return new_state, {"train_loss": loss}

    client_jit, agg_jit = jax.jit(one_client), jax.jit(aggregate)

    def round_fn(server_state, client_batches, weights, client_ids, round_idx):
      trainable, frozen = partition(server_state["params"], mask)
      broadcast = algorithm.broadcast(server_state["agg"])
      r = np.int32(round_idx)
      outs = [
          client_jit(trainable, frozen, b, broadcast, np.int32(cid), r)
          for b, cid in zip(client_batches, client_ids)
      ]
      round_fn.last_outs = outs
      return agg_jit(server_state, outs, weights)

    return round_fn


def sizes_of(args) -> tuple:
  return args.steps, args.batch, args.seq, args.vocab


def random_batches(cfg, num_clients: int, seed: int = 1) -> dict[str, np.ndarray]:
  """(C, steps, B, T) random tokens, every token valid and scored, every step real."""
  rng = np.random.default_rng(seed)
  s, b, t = cfg.train.local_steps, cfg.train.batch_size, cfg.data.seq_len
  shape = (num_clients, s, b, t)
  return {
      "tokens": rng.integers(0, cfg.data.vocab_size, shape).astype(np.int32),
      "mask": np.ones(shape, bool),
      "target_mask": np.ones(shape, bool),
      "step_mask": np.ones((num_clients, s), np.float32),
  }


def round_inputs(cfg, num_clients: int):
  batches = random_batches(cfg, num_clients)
  weights = np.full((num_clients,), float(cfg.train.local_steps * cfg.train.batch_size), np.float32)
  ids = np.arange(num_clients, dtype=np.int32)
  return batches, weights, ids


def max_diff(a, b) -> float:
  return float(max(jnp.max(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def vmapped_case(setup: Setup, num_clients: int, chunk_size: int | None = None, mesh=None):
  """A zero-argument call of the one-jit vmapped round (blocks; returns the new params)."""
  fn = setup.vmapped_round(chunk_size, mesh)
  state = setup.state(num_clients)
  batches, weights, ids = round_inputs(setup.cfg, num_clients)
  return lambda: block(fn(state, batches, weights, ids, np.int32(0)))[0]["params"]


class LoopCase:
  """A zero-argument call of the per-client loop round; keeps the last clients' outputs."""

  def __init__(self, setup: Setup, num_clients: int):
    self.fn = setup.loop_round()
    self.state = setup.state(num_clients)
    batches, weights, self.ids = round_inputs(setup.cfg, num_clients)
    self.weights = jnp.asarray(weights)
    self.client_batches = [{k: v[i] for k, v in batches.items()} for i in range(num_clients)]

  def __call__(self):
    return block(self.fn(self.state, self.client_batches, self.weights, self.ids, 0))[0]["params"]

  def stacked_outputs(self):
    deltas, stats, _, _ = jax.tree.map(lambda *xs: jnp.stack(xs), *self.fn.last_outs)
    return deltas, stats, self.weights


def measure(cases: dict[str, Any], reps: int) -> dict[str, dict[str, Any]]:
  """Warm-up call of every case, then ``reps`` rounds of one call of each, interleaved.

  Interleaving spreads the load of other processes on the shared cores over all cases.
  """
  res = {}
  for name, fn in cases.items():
    t0 = time.perf_counter()
    params = fn()
    res[name] = {"first_s": time.perf_counter() - t0, "times_s": [], "params": params}
  for _ in range(reps):
    for name, fn in cases.items():
      t0 = time.perf_counter()
      fn()
      res[name]["times_s"].append(time.perf_counter() - t0)
  for r in res.values():
    r["median_s"] = median(r["times_s"])
    r["min_s"] = min(r["times_s"])
    r["compile_s"] = r["first_s"] - r["median_s"]
  return res


def time_aggregate(setup: Setup, deltas, stats, weights, reps: int) -> dict[str, Any]:
  agg = jax.jit(setup.algorithm.aggregator.aggregate)
  state = setup.state(int(weights.shape[0]))

  def call():
    block(agg(state["agg"], state["params"], deltas, stats, weights))

  first, times = time_calls(call, reps)
  return {"first_s": first, "times_s": times, "median_s": median(times)}


# ------------------------------------------------------------------------------------ mesh
def mesh_worker(args) -> None:
  """Runs inside the 8-fake-device subprocess; prints one JSON line."""
  from jax.sharding import Mesh

  cfg = default_config("fedavg", *sizes_of(args))
  setup = Setup(cfg)
  n = args.mesh_clients
  mesh = Mesh(np.array(jax.devices()), (CLIENT_AXIS,))
  res = measure(
      {"plain": vmapped_case(setup, n), "mesh": vmapped_case(setup, n, mesh=mesh)}, args.mesh_reps
  )
  out = {
      "devices": len(jax.devices()),
      "clients": n,
      "reps": args.mesh_reps,
      "max_abs_param_diff": max_diff(res["plain"]["params"], res["mesh"]["params"]),
  }
  for name, r in res.items():
    out.update({f"{name}_{k}": v for k, v in r.items() if k != "params"})
  print("MESH_RESULT " + json.dumps(out), flush=True)


def run_mesh_subprocess(args) -> dict[str, Any]:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  cmd = [
      sys.executable,
      __file__,
      "--mesh-worker",
      "--steps",
      str(args.steps),
      "--mesh-reps",
      str(args.mesh_reps),
      "--mesh-clients",
      str(args.mesh_clients),
  ]
  for flag in ("batch", "seq", "vocab"):
    if getattr(args, flag):
      cmd += [f"--{flag}", str(getattr(args, flag))]
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.mesh_timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timeout after {args.mesh_timeout} s"}
  for line in proc.stdout.splitlines():
    if line.startswith("MESH_RESULT "):
      return json.loads(line[len("MESH_RESULT ") :])
  return {"error": f"exit code {proc.returncode}: {proc.stderr[-2000:]}"}


# ------------------------------------------------------------------------------------ main
def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--clients", type=int, nargs="+", default=[4, 10, 32])
  p.add_argument("--steps", type=int, default=2, help="local steps per client")
  p.add_argument("--reps", type=int, default=3, help="timed calls after the warm-up")
  p.add_argument(
      "--chunk-clients",
      type=int,
      nargs="*",
      default=[10],
      help="client counts at which the chunked round is also timed (0 or none: never)",
  )
  p.add_argument("--chunk-size", type=int, default=2)
  p.add_argument("--mesh-clients", type=int, default=8)
  p.add_argument("--mesh-reps", type=int, default=2)
  p.add_argument("--mesh-timeout", type=int, default=240)
  p.add_argument(
      "--fedalign-round-clients",
      type=int,
      nargs="*",
      default=[10],
      help="clients counts at which the whole FedAlign-MoE round is also timed",
  )
  p.add_argument("--no-mesh", action="store_true")
  p.add_argument("--no-fedalign", action="store_true")
  p.add_argument("--batch", type=int, default=None, help="override train.batch_size")
  p.add_argument("--seq", type=int, default=None, help="override data.seq_len")
  p.add_argument("--vocab", type=int, default=None, help="override data.vocab_size")
  p.add_argument("--tag", default="", help="results/round_time_<tag>.json instead")
  p.add_argument("--mesh-worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.mesh_worker:
    mesh_worker(args)
    return

  t_start = time.perf_counter()
  cfg = default_config("fedavg", *sizes_of(args))
  fedavg = Setup(cfg)
  fedalign = None if args.no_fedalign else Setup(default_config("fedalign", *sizes_of(args)))
  sizes = {
      "hidden": cfg.model.hidden_size,
      "layers": cfg.model.num_layers,
      "experts": cfg.model.num_experts,
      "top_k": cfg.model.top_k,
      "moe_intermediate": cfg.model.moe_intermediate_size,
      "vocab": cfg.data.vocab_size,
      "seq": cfg.data.seq_len,
      "batch": cfg.train.batch_size,
      "local_steps": args.steps,
      "client_optimizer": "adamw + clip 1.0",
      "params": fedavg.num_params,
  }
  info = machine()
  print(
      f"machine: {info}\nsizes: {sizes}\nreps: {args.reps} timed calls after 1 warm-up", flush=True
  )

  rows, agg_rows, chunk_rows = [], [], []
  for n in args.clients:
    cases = {"vmapped": vmapped_case(fedavg, n), "loop": LoopCase(fedavg, n)}
    if args.chunk_size and n in args.chunk_clients and n % args.chunk_size == 0:
      cases["chunked"] = vmapped_case(fedavg, n, chunk_size=args.chunk_size)
    if fedalign is not None and n in args.fedalign_round_clients:
      cases["fedalign"] = vmapped_case(fedalign, n)
    res = measure(cases, args.reps)
    v, lp = res["vmapped"], res["loop"]
    rows.append(
        {
            "clients": n,
            "vmapped_s": v["median_s"],
            "loop_s": lp["median_s"],
            "loop_over_vmapped": lp["median_s"] / v["median_s"],
            "vmapped_min_s": v["min_s"],
            "loop_min_s": lp["min_s"],
            "loop_over_vmapped_min": lp["min_s"] / v["min_s"],
            "vmapped_compile_s": v["compile_s"],
            "loop_compile_s": lp["compile_s"],
            "vmapped_times_s": v["times_s"],
            "loop_times_s": lp["times_s"],
            "max_abs_param_diff": max_diff(v["params"], lp["params"]),
        }
    )
    print(
        f"[{time.perf_counter() - t_start:.0f}s] C={n}: "
        + ", ".join(f"{k} {r['median_s']:.3f}s" for k, r in res.items()),
        flush=True,
    )
    if "chunked" in res:
      ch = res["chunked"]
      chunk_rows.append(
          {
              "clients": n,
              "chunk_size": args.chunk_size,
              "vmapped_s": v["median_s"],
              "chunked_s": ch["median_s"],
              "loop_s": lp["median_s"],
              "chunked_over_vmapped": ch["median_s"] / v["median_s"],
              "loop_over_chunked": lp["median_s"] / ch["median_s"],
              "loop_over_chunked_min": lp["min_s"] / ch["min_s"],
              "vmapped_compile_s": v["compile_s"],
              "chunked_compile_s": ch["compile_s"],
              "chunked_times_s": ch["times_s"],
              "max_abs_param_diff": max_diff(v["params"], ch["params"]),
          }
      )
    deltas, stats, weights = cases["loop"].stacked_outputs()
    agg_reps = max(args.reps, 5)
    a_avg = time_aggregate(fedavg, deltas, stats, weights, agg_reps)
    agg_rows.append(
        {
            "method": "fedavg",
            "clients": n,
            "aggregate_s": a_avg["median_s"],
            "round_method": "fedavg",
            "round_s": v["median_s"],
            "share": a_avg["median_s"] / v["median_s"],
            "aggregate_times_s": a_avg["times_s"],
        }
    )
    if fedalign is not None:
      a_fa = time_aggregate(fedalign, deltas, stats, weights, agg_reps)
      r_fa = res.get("fedalign", v)
      agg_rows.append(
          {
              "method": "fedalign (pairwise, gate)",
              "clients": n,
              "aggregate_s": a_fa["median_s"],
              "round_method": "fedalign" if "fedalign" in res else "fedavg",
              "round_s": r_fa["median_s"],
              "share": a_fa["median_s"] / r_fa["median_s"],
              "aggregate_times_s": a_fa["times_s"],
              "round_times_s": r_fa["times_s"],
              "round_compile_s": r_fa["compile_s"],
          }
      )
    del cases, res

  mesh = None if args.no_mesh else run_mesh_subprocess(args)
  total = time.perf_counter() - t_start

  reduced = bool(args.batch or args.seq or args.vocab)
  command = "python " + " ".join([str(pathlib.Path(sys.argv[0]))] + sys.argv[1:])
  header = (
      f"Command: `{command}`  \nMachine: {info['cpu']} ({info['arch']}, "
      f"{info['cores']} cores, {accelerator(info)}, shared: load average {info['loadavg_at_start'][0]} "
      f"at start), JAX {info['jax']} ({info['backend']}).  \n"
      f"Model ({'reduced sizes' if reduced else 'default config'}): "
      f"decoder MoE, hidden {sizes['hidden']}, "
      f"{sizes['layers']} layers, {sizes['experts']} experts top-{sizes['top_k']}, "
      f"moe_intermediate {sizes['moe_intermediate']}, vocab {sizes['vocab']}, "
      f"seq {sizes['seq']}, batch {sizes['batch']}, {sizes['params']:,} params, all "
      f"trainable; {args.steps} local steps (AdamW) per client; random tokens.  \n"
      f"Medians of {args.reps} timed calls after 1 warm-up call, the configurations of "
      f"one client count interleaved call by call; 'min:' = ratio of the fastest calls; "
      f"compile = first call - median. Total script time {total:.0f} s."
  )
  t1 = markdown_table(
      [
          "clients",
          "vmapped round (s)",
          "loop round (s)",
          "loop / vmapped",
          "min: loop / vmapped",
          "vmapped per client (ms)",
          "compile vmapped (s)",
          "compile loop (s)",
          "max abs param diff",
      ],
      [
          [
              r["clients"],
              r["vmapped_s"],
              r["loop_s"],
              r["loop_over_vmapped"],
              r["loop_over_vmapped_min"],
              1e3 * r["vmapped_s"] / r["clients"],
              r["vmapped_compile_s"],
              r["loop_compile_s"],
              f"{r['max_abs_param_diff']:.1e}",
          ]
          for r in rows
      ],
  )
  tables = [
      "### FedAvg round: one-jit vmapped round vs per-client jitted loop\n\n" + header + "\n\n" + t1
  ]
  if chunk_rows:
    tables.append(
        f"### Chunked vmapped round (chunk_size={args.chunk_size}: vmapped chunks, lax.map over "
        "them, one XLA program; FedAvg; timed interleaved with the rows above)\n\n"
        + markdown_table(
            [
                "clients",
                "vmapped, all at once (s)",
                "chunked (s)",
                "loop (s)",
                "chunked / all at once",
                "loop / chunked",
                "min: loop / chunked",
                "compile all at once (s)",
                "compile chunked (s)",
                "max abs param diff (chunked vs all at once)",
            ],
            [
                [
                    r["clients"],
                    r["vmapped_s"],
                    r["chunked_s"],
                    r["loop_s"],
                    r["chunked_over_vmapped"],
                    r["loop_over_chunked"],
                    r["loop_over_chunked_min"],
                    r["vmapped_compile_s"],
                    r["chunked_compile_s"],
                    f"{r['max_abs_param_diff']:.1e}",
                ]
                for r in chunk_rows
            ],
        )
    )
  tables.append(
      "### Aggregation's share of the round (jitted aggregate alone, on the round's stacked "
      "deltas and stats, vs the whole vmapped round; the FedAlign-MoE round itself is timed at "
      f"{args.fedalign_round_clients} clients, elsewhere the FedAvg round of the same size "
      "is the denominator)\n\n"
      + markdown_table(
          ["aggregator", "clients", "aggregate alone (ms)", "round", "round (s)", "share"],
          [
              [
                  r["method"],
                  r["clients"],
                  1e3 * r["aggregate_s"],
                  r["round_method"],
                  r["round_s"],
                  f"{100 * r['share']:.2f}%",
              ]
              for r in agg_rows
          ],
      )
  )
  if mesh is not None:
    if "error" in mesh:
      tables.append(f"### Mesh of 8 fake CPU devices\n\nnot measured: {mesh['error']}")
    else:
      tables.append(
          "### Mesh of 8 fake CPU devices (subprocess, XLA_FLAGS="
          "--xla_force_host_platform_device_count=8; the fake devices share the same 2 cores: "
          "correctness, not speed-up)\n\n"
          + markdown_table(
              [
                  "clients",
                  f"1 device (s, median of {mesh['reps']})",
                  "'clients' mesh, 8 devices (s)",
                  "mesh / 1 device",
                  "compile 1 device (s)",
                  "compile mesh (s)",
                  "max abs param diff",
              ],
              [
                  [
                      mesh["clients"],
                      mesh["plain_median_s"],
                      mesh["mesh_median_s"],
                      mesh["mesh_median_s"] / mesh["plain_median_s"],
                      mesh["plain_compile_s"],
                      mesh["mesh_compile_s"],
                      f"{mesh['max_abs_param_diff']:.1e}",
                  ]
              ],
          )
      )
  text = "\n\n".join(tables)
  print("\n" + text)
  path = write_json(
      f"round_time{'_' + args.tag if args.tag else ''}.json",
      {
          "command": command,
          "machine": info,
          "sizes": sizes,
          "reps": args.reps,
          "total_script_s": total,
          "rounds": rows,
          "aggregation_share": agg_rows,
          "chunked": chunk_rows,
          "mesh": mesh,
          "markdown": text,
      },
  )
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()

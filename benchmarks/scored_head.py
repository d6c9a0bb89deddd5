"""The LM head on the scored positions only vs the full head: one client's local training step.

Command (2-core CPU: about 2-3 minutes with the defaults)::

    python benchmarks/scored_head.py                    # vocab 1,024 (default) and 32,768
    python benchmarks/scored_head.py --vocabs 1024 --reps 5

What is timed: one jitted call of the pure client update built by
:func:`fedalign.federated.run.build_training` (configs/default.py: FedAvg, AdamW, batch 32,
48 tokens; the model of the default config at each vocabulary size) for one client and
``--steps`` local steps (forward + backward + AdamW), with

* ``full head``: ``build_training(..., scored_tokens=None)``: the LM head on every position,
  (B, T, V) logits, the loss reads the target positions;
* ``gathered head``: ``build_training(..., scored_tokens=K)``, what
  :func:`~fedalign.federated.run.build_run` builds: the final hidden states at the K target
  positions of each row gathered before the head (:class:`~fedalign.federated.task.CausalLMTask`).

Batches: random tokens, each row a random length in [seq/2, seq] (right padding) ending with
``--targets`` label-word tokens (the default data: 1 target token a row, K = 1). Both variants
get the same batches and give the same update (max abs difference reported). The two
variants are called alternately (interleaved call by call: the shared cores' load spreads over
both); the table gives medians, the ratio of medians and the ratio of the fastest calls.
XLA's own accounting of each compiled program is reported too: FLOPs (cost analysis) and the
temporary buffer size (memory analysis), which do not depend on the machine's load.

Results: a printed markdown table and benchmarks/results/scored_head[_<tag>].json.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import block, fmt, machine, markdown_table, median, write_json  # noqa: E402
from fedalign.config_files import load_config  # noqa: E402
from fedalign.federated.round import init_server_state  # noqa: E402
from fedalign.federated.run import build_training  # noqa: E402
from fedalign.metrics.evaluation import max_scored_tokens  # noqa: E402
from fedalign.models import init_params, partition  # noqa: E402
from fedalign.models.from_config import model_config_from  # noqa: E402

SEED = 0


def client_batches(cfg, vocab: int, steps: int, targets: int, seed: int = 0) -> dict:
  """(steps, B, T) label-word rows: random length, the last ``targets`` tokens scored."""
  rng = np.random.default_rng(seed)
  b, t = cfg.train.batch_size, cfg.data.seq_len
  tokens = rng.integers(1, vocab, (steps, b, t)).astype(np.int32)
  lengths = rng.integers(t // 2, t + 1, (steps, b))
  pos = np.arange(t)
  mask = pos < lengths[..., None]
  target = mask & (pos >= (lengths - targets)[..., None])
  tokens = np.where(mask, tokens, 0)
  return {
      "tokens": tokens,
      "mask": mask,
      "target_mask": target,
      "step_mask": np.ones(steps, np.float32),
  }


def compiled_info(fn, *args) -> dict:
  """XLA's FLOPs and temporary memory of the compiled program, and its compile seconds."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  out = {"compile_s": time.perf_counter() - t0}
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out["flops"] = float(cost.get("flops", float("nan"))) if cost else float("nan")
  mem = compiled.memory_analysis()
  out["temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", -1)) if mem is not None else -1
  return out


def bench_vocab(vocab: int, args) -> dict:
  cfg = load_config(REPO / "configs" / "default.py", "base")
  cfg.train.local_steps = args.steps
  cfg.data.vocab_size = vocab
  mcfg = model_config_from(cfg, vocab)
  params = init_params(mcfg, jax.random.key(SEED), seq_len=cfg.data.seq_len)
  batches = client_batches(cfg, vocab, args.steps, args.targets)
  k = max_scored_tokens(batches["target_mask"], batches["mask"])
  fns, infos = {}, {}
  for name, scored in (("full", None), ("gathered", k)):
    tr = build_training(cfg, mcfg, params, num_clients=cfg.data.num_clients, scored_tokens=scored)
    trainable, frozen = partition(params, tr.mask)
    state = init_server_state(params, tr.algorithm, tr.mask, cfg.data.num_clients)
    broadcast = tr.algorithm.broadcast(state["agg"])
    rng = jax.random.key(SEED)
    cu = jax.jit(tr.client_update)
    call_args = (trainable, frozen, batches, broadcast, jnp.zeros((), jnp.float32), rng)
    infos[name] = compiled_info(cu, *call_args)
    fns[name] = lambda cu=cu, a=call_args: block(cu(*a))
  outs = {name: fn() for name, fn in fns.items()}  # warm-up
  diff = max(
      float(jnp.max(jnp.abs(a - b)))
      for a, b in zip(jax.tree.leaves(outs["full"][0]), jax.tree.leaves(outs["gathered"][0]))
  )
  times = {name: [] for name in fns}
  for _ in range(args.reps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return {
      "vocab": vocab,
      "num_params": num_params,
      "scored_tokens": k,
      "times_s": times,
      "median_s": {n: median(ts) for n, ts in times.items()},
      "min_s": {n: min(ts) for n, ts in times.items()},
      "compiled": infos,
      "max_abs_delta_diff": diff,
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--vocabs", type=int, nargs="+", default=[1024, 32768])
  p.add_argument("--steps", type=int, default=1, help="local steps per timed call")
  p.add_argument("--targets", type=int, default=1, help="target tokens per row")
  p.add_argument("--reps", type=int, default=7, help="timed calls per variant after a warm-up")
  p.add_argument("--tag", default="", help="results/scored_head_<tag>.json instead")
  args = p.parse_args()
  t_start = time.perf_counter()
  info = machine()
  rows = [bench_vocab(v, args) for v in args.vocabs]
  table = []
  for r in rows:
    m, mn, c = r["median_s"], r["min_s"], r["compiled"]
    table.append(
        [
            f"{r['vocab']:,}",
            f"{r['num_params']:,}",
            r["scored_tokens"],
            fmt(1e3 * m["full"] / args.steps),
            fmt(1e3 * m["gathered"] / args.steps),
            fmt(m["gathered"] / m["full"], 3),
            fmt(mn["gathered"] / mn["full"], 3),
            fmt(c["full"]["flops"] / 1e9, 3),
            fmt(c["gathered"]["flops"] / 1e9, 3),
            fmt(c["full"]["temp_bytes"] / 2**20, 3),
            fmt(c["gathered"]["temp_bytes"] / 2**20, 3),
            f"{r['max_abs_delta_diff']:.1e}",
        ]
    )
  total = time.perf_counter() - t_start
  cfg = load_config(REPO / "configs" / "default.py", "base")
  header = (
      f"Command: `python benchmarks/scored_head.py {' '.join(sys.argv[1:])}`".rstrip() + "  \n"
      f"Machine: {info.get('cpu', '?')}, load average {info['loadavg_at_start'][0]} at start, "
      f"JAX {jax.__version__} ({jax.default_backend()}).  \n"
      f"Model: configs/default.py (hidden {cfg.model.hidden_size}, {cfg.model.num_layers} "
      f"layers, {cfg.model.num_experts} experts top-{cfg.model.top_k}), batch "
      f"{cfg.train.batch_size} x {cfg.data.seq_len} tokens, {args.targets} target token(s) a "
      f"row; one client, {args.steps} local AdamW step(s) a call. Medians of {args.reps} calls "
      f"per variant, interleaved; total script time {total:.0f} s."
  )
  cols = [
      "vocab",
      "params",
      "K",
      "full head (ms/step)",
      "gathered (ms/step)",
      "gathered / full",
      "min: gathered / full",
      "XLA GFLOP full",
      "XLA GFLOP gathered",
      "temp MiB full",
      "temp MiB gathered",
      "max abs delta diff",
  ]
  print(header + "\n\n" + markdown_table(cols, table))
  path = write_json(
      f"scored_head{'_' + args.tag if args.tag else ''}.json",
      {"machine": info, "args": vars(args), "rows": rows, "total_s": total},
  )
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()

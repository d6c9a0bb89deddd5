"""Useful FLOP/s of local training against a large ``jnp.dot`` measured in the same process.

Model FLOPs of one local step (forward + backward, PaLM-style accounting): ``6 x active
parameters x tokens`` plus attention ``12 x layers x heads x head_dim x seq`` per token, where
*active* counts the routed experts at ``top_k / num_experts`` of their size, the router, the
shared expert, attention and norms, and not the embedding lookup. The LM head is counted two
ways: at every position (the usual MFU convention: what a full-sequence LM step computes) and
only at the scored positions (what label-word training needs; the gathered head computes only
these). Tokens are all B x T positions of the step (padding included, as a fixed-shape step
computes them).

Measured: (1) one client's local training, ``jit(client_update)`` on the largest client of
round 0 (every step real), (2) the whole vmapped round (``build_run``'s ``round_fn``: every
sampled client, padding steps included in the computed work but not in the useful FLOPs),
(3) a 2048^3 float32 ``jnp.dot`` (the machine's reachable matmul FLOP/s in this process),
interleaved call by call, medians. Writes ``benchmarks/results/mfu_<tag>.json``.

Command (from the repository root; ~1-2 min on 2 cores)::

    python benchmarks/mfu.py [--config=configs/default.py:base] [--reps=5] [--tag=default] \\
        [--set model.moe_impl=dense ...] [--dtype bfloat16 --dot_dtype bfloat16 --dot_size 8192 \\
        --peak_tflops 989]

On an accelerator, ``--peak_tflops`` (the chip's dense peak in the model's dtype, from its data
sheet) adds the usual MFU columns next to the ratio to the measured dot.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from _common import (  # noqa: E402
    accelerator,
    load_config_with_overrides,
    machine,
    markdown_table,
    median,
    write_json,
)


def step_flops(mcfg: Any, params: Any, batch: int, seq: int, scored: float) -> dict[str, float]:
  """Model FLOPs of one forward + backward step of a decoder MoE LM (see the module doc).

  ``scored``: scored positions per step (for the head counted at scored positions only).
  """
  import jax
  import numpy as np

  body = head = 0.0
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in flat:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    n = float(np.prod(leaf.shape))
    if "embed" in name.split("/")[0] and not mcfg.tie_word_embeddings:
      continue
    if name.startswith("lm_head") or (mcfg.tie_word_embeddings and name.startswith("embed")):
      head += n
    elif "/experts/" in f"/{name}/":
      body += n * mcfg.top_k / mcfg.num_experts
    else:
      body += n
  tokens = batch * seq
  attn = 12.0 * mcfg.num_layers * mcfg.num_heads * mcfg.resolved_head_dim * seq * tokens
  return {
      "active_params_body": body,
      "head_params": head,
      "tokens": float(tokens),
      "every_position": 6.0 * (body + head) * tokens + attn,
      "scored_positions": 6.0 * body * tokens + 6.0 * head * scored + attn,
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/default.py:base")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--tag", default="default")
  ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
  ap.add_argument(
      "--dtype", default=None, help="model.dtype (parameters and compute), e.g. bfloat16"
  )
  ap.add_argument("--dot_size", type=int, default=2048, help="n of the reference n^3 dot")
  ap.add_argument("--dot_dtype", default="float32", help="dtype of the reference dot")
  ap.add_argument(
      "--peak_tflops",
      type=float,
      default=None,
      help="the chip's peak dense TFLOP/s in the model's dtype (e.g. 989 for an H100/H200 "
      "in bf16): adds columns against it (MFU in the usual sense)",
  )
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from fedalign.federated.run import build_run
  from fedalign.models.lora import partition

  cfg = load_config_with_overrides(args.config, args.set)
  if args.dtype is not None:
    with cfg.unlocked():
      cfg.model.dtype = args.dtype
  run = build_run(cfg, tempfile.mkdtemp(prefix="fedalign_mfu_"))
  batches, weights, ids_in, _ = run.round_inputs(0)
  steps = batches["step_mask"].sum(axis=1)
  big = int(np.argmax(steps))
  n_steps = int(steps[big])
  one = {k: v[big, :n_steps] for k, v in batches.items()}
  state = run.initial_state
  trainable, frozen = partition(state["params"], run.mask)
  broadcast = run.algorithm.broadcast(state["agg"])
  cstate = jnp.zeros((), jnp.float32)
  if run.algorithm.init_client_state is not None:
    cstate = jax.tree.map(lambda x: x[ids_in[big]], state["client_states"])
  client = jax.jit(run.client_update)
  client_args = (trainable, frozen, one, broadcast, cstate, jax.random.key(0))
  round_args = (state, batches, jnp.asarray(weights), jnp.asarray(ids_in), 0)
  a = jnp.ones((args.dot_size, args.dot_size), args.dot_dtype)
  dot = jax.jit(lambda x, y: x @ y)

  calls = {
      "client": lambda: jax.block_until_ready(client(*client_args)),
      "round": lambda: jax.block_until_ready(run.round_fn(*round_args)),
      "dot": lambda: jax.block_until_ready(dot(a, a)),
  }
  for f in calls.values():
    f()
  times = {k: [] for k in calls}
  for _ in range(args.reps):
    for k, f in calls.items():
      t0 = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t0)
  med = {k: median(v) for k, v in times.items()}

  b, t = one["tokens"].shape[1:3]
  if "target_mask" in one:
    scored_per_step = float(one["target_mask"].sum()) / n_steps
  else:
    scored_per_step = float(b * t)
  per_step = step_flops(run.model_config, state["params"], b, t, scored_per_step)
  dot_flops = 2.0 * args.dot_size**3 / med["dot"]
  peak = None if args.peak_tflops is None else args.peak_tflops * 1e12
  total_steps = float(steps.sum())
  rows = []
  for what, key in (("every position", "every_position"), ("scored positions", "scored_positions")):
    client_fs = per_step[key] * n_steps / med["client"]
    round_fs = per_step[key] * total_steps / med["round"]
    rows.append(
        [
            f"LM head at {what}",
            f"{per_step[key] / 1e9:.3f}",
            f"{client_fs / 1e9:.2f}",
            f"{100 * client_fs / dot_flops:.1f}%",
            f"{round_fs / 1e9:.2f}",
            f"{100 * round_fs / dot_flops:.1f}%",
        ]
        + (
            []
            if peak is None
            else [f"{100 * client_fs / peak:.1f}%", f"{100 * round_fs / peak:.1f}%"]
        )
    )
  m = run.model_config
  header = (
      f"Command: `python {' '.join(sys.argv)}`  \n"
      f"Model: hidden {m.hidden_size}, {m.num_layers} layers, {m.num_experts} experts top-"
      f"{m.top_k} of {m.moe_intermediate_size}, vocab {m.vocab_size}, moe_impl "
      f"{m.moe_impl!r}; step = {b} x {t} tokens; active body params "
      f"{per_step['active_params_body']:,.0f}, head {per_step['head_params']:,.0f}.  \n"
      f"{args.dot_size}^3 {args.dot_dtype} jnp.dot: {dot_flops / 1e9:.1f} GFLOP/s "
      f"({med['dot'] * 1e3:.1f} ms); model dtype {m.dtype}; "
      f"{accelerator(machine())}"
      + ("" if peak is None else f", peak {args.peak_tflops:g} TFLOP/s as given")
      + "; one "
      f"client, {n_steps} steps: {med['client']:.3f} s; round ({len(steps)} clients, "
      f"{int(total_steps)} real of {batches['step_mask'].size} computed client-steps): "
      f"{med['round']:.3f} s. Medians of {args.reps}, interleaved; loadavg "
      f"{os.getloadavg()[0]:.2f}."
  )
  md = markdown_table(
      [
          "useful FLOPs",
          "GFLOP per step",
          "client GFLOP/s",
          "client / dot",
          "round GFLOP/s",
          "round / dot",
      ]
      + ([] if peak is None else ["client / peak", "round / peak"]),
      rows,
  )
  print(header + "\n\n" + md)
  write_json(
      f"mfu_{args.tag}.json",
      {
          "machine": machine(),
          "command": " ".join(["python", *sys.argv]),
          "times_s": times,
          "median_s": med,
          "dot_flops": dot_flops,
          "peak_flops": peak,
          "step_flops": per_step,
          "client_steps": n_steps,
          "round_real_steps": total_steps,
          "markdown": header + "\n\n" + md,
      },
  )


if __name__ == "__main__":
  main()

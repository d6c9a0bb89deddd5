"""Expert compute of the decoder's MoE block: dense vs block-sparse (dropless) vs capacity vs
ragged, forward + backward, and one client step of the default config's model.

Variants (``MoEConfig.moe_impl`` / ``capacity_factor`` / ``moe_block_size``):

* ``dense``: every expert on every token (E / k times the useful expert FLOPs; exact);
* ``sparse B``: block-sparse dropless dispatch with blocks of B rows (the default);
* ``capacity 1.25``: capacity dispatch into (E, C, D) buffers, C = 1.25 T k / E (drops);
* ``ragged``: ``jax.lax.ragged_dot`` grouped matmul (one model only: not vmappable over
  clients, so not in the client-step table's vmapped column).

Part 1 times ``jit(grad)`` of one MoE block (Mixtral-style, no shared expert, all parameters
and the input differentiated) on T = 1,536 tokens (the default config's 32 x 48 batch) for
hidden 64/128/256 (moe_intermediate = hidden) with 8 and 16 experts, top-2. Part 2 times one
local AdamW step (loss + load balance, clipping) of the default config's model
(configs/default.py), one client and a vmapped chunk of 2 clients (``train.chunk_size=2``),
on random tokens. Every variant of a table row is warmed up once (compile), then the
variants are called interleaved (rotating order) ``--reps`` times; medians, and ratios as the
median of the per-repetition ratios to dense (the load of a shared machine hits every
variant alike). "rows" = rows of matmul work per expert projection / useful rows (T k).

Command (about 4 minutes on the shared 2-core CPU; ``--quick``: hidden 64 and 128, 8
experts, fewer repetitions, about 1.5 minutes)::

    python benchmarks/moe_impl.py [--quick] [--reps 5] [--block_sizes 32,64,128]

Writes ``benchmarks/results/moe_impl.json`` and prints markdown tables (copied into
benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from _common import machine, markdown_table, median, write_json  # noqa: E402
from fedalign.config_files import load_config  # noqa: E402
from fedalign.federated.client import client_optimizer  # noqa: E402
from fedalign.federated.task import CausalLMTask  # noqa: E402
from fedalign.models import build_module, family_config, init_params  # noqa: E402
from fedalign.models.from_config import model_config_from  # noqa: E402
from fedalign.models.moe import MoEBlock, expert_capacity, sparse_blocks  # noqa: E402

TOKENS = (32, 48)  # the default config's batch x seq_len


def variants(block_sizes: list[int], ragged: bool = True) -> dict[str, dict[str, Any]]:
  out = {"dense": dict(moe_impl="dense")}
  for b in block_sizes:
    out[f"sparse {b}"] = dict(moe_impl="sparse", moe_block_size=b)
  out["capacity 1.25"] = dict(moe_impl="sparse", capacity_factor=1.25)
  if ragged:
    out["ragged"] = dict(moe_impl="ragged")
  return out


def work_rows(fields: dict[str, Any], tokens: int, experts: int, top_k: int) -> float:
  """Rows of matmul work per expert projection / useful rows (tokens x k)."""
  useful = tokens * top_k
  if fields["moe_impl"] == "dense":
    return tokens * experts / useful
  if fields.get("capacity_factor"):
    return experts * expert_capacity(tokens, experts, top_k, fields["capacity_factor"]) / useful
  if fields["moe_impl"] == "sparse":
    b, nb = sparse_blocks(useful, experts, fields["moe_block_size"])
    return nb * b / useful
  return 1.0


def interleave(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, Any]:
  """Warm-up call of each, then ``reps`` rounds of calls in rotating order."""
  names = list(fns)
  first = {}
  for n in names:
    t0 = time.perf_counter()
    jax.block_until_ready(fns[n]())
    first[n] = time.perf_counter() - t0
  times: dict[str, list[float]] = {n: [] for n in names}
  for i in range(reps):
    for n in names[i % len(names) :] + names[: i % len(names)]:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[n]())
      times[n].append(time.perf_counter() - t0)
  return {"first_s": first, "times_s": times}


def ratios(times: dict[str, list[float]], ref: str = "dense") -> dict[str, float]:
  return {n: median([a / b for a, b in zip(t, times[ref])]) for n, t in times.items()}


def block_fn(fields: dict[str, Any], hidden: int, experts: int) -> Callable[[], Any]:
  cfg = family_config(
      "mixtral",
      vocab_size=32,
      hidden_size=hidden,
      num_heads=1,
      num_kv_heads=1,
      num_experts=experts,
      top_k=2,
      moe_intermediate_size=hidden,
      **fields,
  )
  x = jax.random.normal(jax.random.key(1), TOKENS + (hidden,))
  mask = jnp.ones(TOKENS, bool)
  params = jax.jit(MoEBlock(cfg).init)(jax.random.key(0), x, mask)["params"]

  def loss(p, x):
    out, _, losses = MoEBlock(cfg).apply({"params": p}, x, mask)
    return jnp.mean(out**2) + 0.01 * losses["load_balance_loss"]

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return lambda: grad(params, x)


def step_fns(
    fields: dict[str, Any], config: Any, chunk: int
) -> tuple[Callable[[], Any], Callable[[], Any] | None]:
  """(one client's AdamW step, a vmapped chunk of ``chunk`` clients' steps) of the default
  config's model with the given expert compute."""
  c = config.copy_and_resolve_references()
  c.model.moe_impl = fields["moe_impl"]
  c.model.moe_block_size = fields.get("moe_block_size", c.model.moe_block_size)
  c.model.capacity_factor = fields.get("capacity_factor", 0.0)
  cfg = model_config_from(c, c.data.vocab_size)
  task = CausalLMTask(build_module(cfg))
  opt = client_optimizer(c)
  rng = np.random.default_rng(0)
  b, t = c.train.batch_size, c.data.seq_len
  lengths = rng.integers(t // 2, t + 1, size=(chunk, b))  # right-padded rows
  mask = np.arange(t)[None, None, :] < lengths[..., None]
  batch = {
      "tokens": jnp.asarray(rng.integers(0, c.data.vocab_size, (chunk, b, t)), jnp.int32),
      "mask": jnp.asarray(mask),
      "target_mask": jnp.asarray(mask),
  }
  params = init_params(cfg, jax.random.key(0), seq_len=t)
  opt_state = opt.init(params)

  def step(p, s, batch):
    def loss(p):
      task_loss, aux = task.loss(p, batch, jax.random.key(0))
      return task_loss + c.train.load_balance_coef * aux["load_balance_loss"]

    g = jax.grad(loss)(p)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s

  one = jax.jit(step)
  first = jax.tree.map(lambda a: a[0], batch)
  single = lambda: one(params, opt_state, first)
  if fields["moe_impl"] == "ragged":
    return single, None  # ragged_dot's gradient cannot be vmapped (jax 0.10)
  stack = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * chunk), tree)
  many = jax.jit(jax.vmap(step))
  params_c, state_c = stack(params), stack(opt_state)
  return single, lambda: many(params_c, state_c, batch)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="hidden 64,128; 8 experts; 3 reps")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--hidden", default="64,128,256")
  ap.add_argument("--experts", default="8,16")
  ap.add_argument("--block_sizes", default="32,64,128")
  ap.add_argument("--step_block_sizes", default="", help="client step (default: the config's)")
  ap.add_argument("--no_step", action="store_true", help="skip the client-step table")
  args = ap.parse_args()
  if args.quick:
    args.hidden, args.experts, args.reps = "64,128", "8", 3
  hidden = [int(h) for h in args.hidden.split(",")]
  experts = [int(e) for e in args.experts.split(",")]
  blocks = [int(b) for b in args.block_sizes.split(",")]
  t_start = time.time()
  tokens = TOKENS[0] * TOKENS[1]

  block_rows, block_raw = [], []
  for e in experts:
    for h in hidden:
      vs = variants(blocks)
      res = interleave({n: block_fn(f, h, e) for n, f in vs.items()}, args.reps)
      r = ratios(res["times_s"])
      block_raw.append({"hidden": h, "experts": e, **res, "ratio_to_dense": r})
      for n, f in vs.items():
        block_rows.append(
            [
                h,
                e,
                n,
                f"{work_rows(f, tokens, e, 2):.2f}",
                f"{1e3 * median(res['times_s'][n]):.1f}",
                f"{r[n]:.2f}",
                f"{1 / r[n]:.2f}",
            ]
        )
      print(f"hidden {h}, {e} experts: " + ", ".join(f"{n} {r[n]:.2f}" for n in vs), flush=True)
  block_md = markdown_table(
      ["hidden", "experts", "variant", "rows", "median ms", "time / dense", "speed-up"],
      block_rows,
  )
  print(block_md)

  step_md, step_raw = "", {}
  if not args.no_step:
    config = load_config(REPO / "configs" / "default.py", "base")
    chunk = max(1, int(config.train.chunk_size))
    step_blocks = [int(b) for b in args.step_block_sizes.split(",") if b]
    vs = variants(step_blocks or [int(config.model.moe_block_size)])
    fns = {}
    for n, f in vs.items():
      single, many = step_fns(f, config, chunk)
      fns[f"{n} | 1 client"] = single
      if many is not None:
        fns[f"{n} | vmap {chunk}"] = many
    res = interleave(fns, args.reps)
    singles = {n: t for n, t in res["times_s"].items() if n.endswith("1 client")}
    chunks = {n: t for n, t in res["times_s"].items() if not n.endswith("1 client")}
    r1 = ratios(singles, "dense | 1 client")
    rc = ratios(chunks, f"dense | vmap {chunk}")
    rows = []
    for n, f in vs.items():
      s1, sc = f"{n} | 1 client", f"{n} | vmap {chunk}"
      rows.append(
          [
              n,
              f"{work_rows(f, tokens, config.model.num_experts, config.model.top_k):.2f}",
              f"{1e3 * median(res['times_s'][s1]):.0f}",
              f"{r1[s1]:.2f}",
              f"{1e3 * median(res['times_s'][sc]) / chunk:.0f}" if sc in chunks else "n/a",
              f"{rc[sc]:.2f}" if sc in chunks else "n/a",
              f"{res['first_s'][s1] - median(res['times_s'][s1]):.1f}",
          ]
      )
    step_md = markdown_table(
        [
            "variant",
            "rows",
            "1 client: ms / step",
            "time / dense",
            f"vmap {chunk}: ms / client step",
            "time / dense",
            "compile s (1 client)",
        ],
        rows,
    )
    step_raw = {**res, "ratio_1_client": r1, "ratio_vmap": rc, "chunk": chunk}
    print(step_md)

  wall = time.time() - t_start
  print(f"total {wall:.0f} s")
  write_json(
      "moe_impl.json",
      {
          "machine": machine(),
          "command": " ".join(["python", *sys.argv]),
          "tokens": tokens,
          "reps": args.reps,
          "block": block_raw,
          "block_markdown": block_md,
          "step": step_raw,
          "step_markdown": step_md,
          "wall_s": wall,
      },
  )


if __name__ == "__main__":
  main()

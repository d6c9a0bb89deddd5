"""Where one federated round's time goes: a ``jax.profiler`` trace summed by model part.

Builds the round exactly as a run does (:func:`fedalign.federated.run.build_run` on the
config), runs it once (compile), then traces ``--reps`` calls with
``jax.profiler.trace(create_perfetto_trace=True)``. Every XLA thunk event of the round's
module (``args.hlo_op``: the compiled HLO instruction, e.g. ``fusion.12``) is mapped to the
JAX source op that produced it (the instruction's ``metadata={op_name=...}`` in the compiled
HLO text, e.g. ``jit(round_fn)/.../layers_0/attn/q_proj/dot_general``) and its time is added
to a category: attention, routed experts, router, shared expert, LM head, embedding, norms,
the local optimizer, the aggregation, and forward vs backward (``transpose(jvp(...))`` ops).

Thunk times are summed over XLA:CPU's threads, so the shares are of the summed op time, not of
the wall time (which is reported next to it). Writes ``benchmarks/results/profile_<tag>.json``
and prints markdown tables (copied into benchmarks/README.md).

Command (from the repository root; ~1-2 min on 2 cores)::

    python benchmarks/profile_round.py [--config=configs/default.py:base] [--reps=2] [--tag=default] \\
        [--set model.moe_impl=dense ...]
"""

from __future__ import annotations

import argparse
import collections
import copy
import glob
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from _common import load_config_with_overrides, machine, markdown_table, write_json  # noqa: E402

# (category, substrings of the op_name path that select it), first match wins; the order puts
# the narrow module paths before the wide ones.
CATEGORIES = (
    ("aggregation", ("aggregate", "/agg", "moe_blocks", "client_ok")),
    ("optimizer", ("adam", "scale_by", "clip", "optax", "apply_updates", "chain")),
    ("router", ("/router",)),
    ("shared expert", ("/shared_expert",)),
    ("routed experts", ("/experts",)),
    ("expert dispatch/combine", ("/mlp/",)),
    ("attention", ("/attn/",)),
    ("LM head", ("lm_head", "final_norm", "cross_entropy", "log_softmax", "logsumexp")),
    ("embedding", ("/embed",)),
    ("norms/residual", ("_norm",)),
)

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"")


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the JAX op_name of its metadata (for every computation).

  >>> hlo_op_names('  %fusion.3 = f32[2] fusion(%p), metadata={op_name="jit(f)/dot"}')
  {'fusion.3': 'jit(f)/dot'}
  """
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m:
      out[m.group(1)] = m.group(2)
  return out


def categorize(op_name: str) -> tuple[str, str]:
  """(category, 'forward' | 'backward') of a JAX op_name.

  >>> categorize('jit(round_fn)/transpose(jvp(MoEDecoderLM))/layers_0/attn/q_proj/dot_general')
  ('attention', 'backward')
  """
  direction = "backward" if "transpose(" in op_name else "forward"
  for cat, keys in CATEGORIES:
    if any(k in op_name for k in keys):
      return cat, direction
  return "other", direction


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/default.py:base")
  ap.add_argument("--reps", type=int, default=2, help="traced round calls")
  ap.add_argument("--tag", default="default")
  ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp

  from fedalign.federated.run import build_run

  cfg = load_config_with_overrides(args.config, args.set)
  work = pathlib.Path(tempfile.mkdtemp(prefix="fedalign_profile_"))
  run = build_run(cfg, work)
  batches, weights, ids_in, _ = run.round_inputs(0)
  inputs = (run.initial_state, batches, jnp.asarray(weights), jnp.asarray(ids_in), 0)
  t0 = time.perf_counter()
  compiled = run.round_fn.lower(*inputs).compile()
  compile_s = time.perf_counter() - t0
  names = hlo_op_names(compiled.as_text())
  jax.block_until_ready(compiled(*inputs))
  trace_dir = work / "trace"
  walls = []
  with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
    for _ in range(args.reps):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*inputs))
      walls.append(time.perf_counter() - t0)
  path = glob.glob(str(trace_dir / "**" / "perfetto_trace.json.gz"), recursive=True)[0]
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events

  by_cat: dict[tuple[str, str], float] = collections.defaultdict(float)
  by_op: dict[str, float] = collections.defaultdict(float)
  unmapped = 0.0
  for e in events:
    a = e.get("args") or {}
    if e.get("ph") != "X" or "hlo_op" not in a or "round_fn" not in a.get("hlo_module", ""):
      continue
    dur = float(e.get("dur", 0.0)) / 1e6 / args.reps
    op_name = names.get(a["hlo_op"])
    if op_name is None:
      unmapped += dur
      by_cat[("unmapped", "-")] += dur
      continue
    by_cat[categorize(op_name)] += dur
    by_op[re.sub(r"jit\(round_fn\)/", "", op_name)] += dur
  total = sum(by_cat.values())
  cats = sorted(
      {c for c, _ in by_cat}, key=lambda c: -sum(v for k, v in by_cat.items() if k[0] == c)
  )
  rows = []
  for c in cats:
    fwd, bwd = by_cat.get((c, "forward"), 0.0), by_cat.get((c, "backward"), 0.0)
    other = by_cat.get((c, "-"), 0.0)
    s = fwd + bwd + other
    rows.append(
        [c, f"{s * 1e3:.1f}", f"{100 * s / total:.1f}%", f"{fwd * 1e3:.1f}", f"{bwd * 1e3:.1f}"]
    )
  wall = sorted(walls)[len(walls) // 2]
  header = (
      f"Command: `python {' '.join(sys.argv)}`  \n"
      f"Round wall time {wall:.3f} s (median of {args.reps} traced calls), summed thunk time "
      f"{total:.3f} s, compile {compile_s:.1f} s; {int(weights.size)} clients x "
      f"{batches['step_mask'].shape[1]} steps; loadavg {os.getloadavg()[0]:.2f}."
  )
  md = markdown_table(["part", "ms per round", "share", "forward ms", "backward ms"], rows)
  top = sorted(by_op.items(), key=lambda kv: -kv[1])[:15]
  md_top = markdown_table(
      ["op (JAX op_name)", "ms per round"], [[f"`{k[:110]}`", f"{v * 1e3:.1f}"] for k, v in top]
  )
  print(header + "\n\n" + md + "\n\nTop ops:\n\n" + md_top)
  write_json(
      f"profile_{args.tag}.json",
      {
          "machine": machine(),
          "command": " ".join(["python", *sys.argv]),
          "config": args.config,
          "overrides": args.set,
          "wall_s": walls,
          "compile_s": compile_s,
          "summed_thunk_s": total,
          "by_category_s": {f"{c}|{d}": v for (c, d), v in by_cat.items()},
          "top_ops_s": dict(top),
          "markdown": header + "\n\n" + md + "\n\n" + md_top,
          "config_values": copy.deepcopy(cfg).to_dict(),
      },
  )


if __name__ == "__main__":
  main()

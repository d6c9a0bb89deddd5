"""Memory and FLOPs of one DeepSeek-MoE-16B LoRA training step, from XLA's own accounting.

Compiles (does not run) ``jax.grad`` of the LM loss w.r.t. the LoRA partition for 2- and
3-layer models with DeepSeek-MoE-16B's real widths (hidden 2048, 64 routed experts of 1408,
top-6, 2 shared experts, vocab 102,400; the configs' dropless block-sparse experts, or
``--capacity_factor`` > 0 for capacity dispatch) and reads
``compiled.memory_analysis().temp_size_in_bytes`` and ``cost_analysis()`` (flops, bytes); the
3-layer minus 2-layer difference is one MoE layer, scaled to the model's 27. On CPU the
backend computes in float32, so memory figures are upper bounds for bfloat16 on an accelerator.
What ``configs/paper/{mmlu,hellaswag}_deepseek_moe16b_lora.py`` quote.

``--experts K`` compiles the same step on K fake CPU devices in the 2-D mesh layout of
``train.mesh_shape='clients:1,experts:K'`` (:func:`fedalign.federated.mesh.state_shardings`:
the routed experts' weights and LoRA adapters sharded over the K devices, everything else
replicated; one client's batch on the K devices of its experts group) with the run's expert
parallelism (``MoEConfig.expert_shards`` = K: each device computes the rows routed to its own
experts; ``--no_expert_parallel``: the weight-sharding-only layout, where the routed blocks'
weights are all-reduced over the devices) and reports XLA's per-device figures: the weights
and adapters a device holds (``argument_size_in_bytes``), its temporaries and its FLOPs and
bytes accessed; ``--dtype bfloat16`` gives the configs' parameter dtype.

Command (about a minute per shape on 2 CPU cores; needs ~4 GB RAM)::

    python benchmarks/paper_memory.py --batch 2 --seq 512     # MMLU config
    python benchmarks/paper_memory.py --batch 8 --seq 192     # HellaSwag config
    python benchmarks/paper_memory.py --batch 2 --seq 512 --capacity_factor 1.25  # capacity
    python benchmarks/paper_memory.py --batch 2 --seq 512 --experts 16 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _fake_devices() -> None:
  """``--experts K``: K fake CPU devices, requested before JAX starts."""
  argv = sys.argv[1:]
  for i, a in enumerate(argv):
    k = a.split("=", 1)[1] if a.startswith("--experts=") else None
    if a == "--experts" and i + 1 < len(argv):
      k = argv[i + 1]
    if k is not None and k.isdigit() and int(k) > 1:
      os.environ["XLA_FLAGS"] = (
          os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={k}"
      )
      os.environ.setdefault("JAX_PLATFORMS", "cpu")


_fake_devices()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from fedalign.federated.mesh import MESH_AXES, state_shardings  # noqa: E402
from fedalign.models import build_module, family_config  # noqa: E402
from fedalign.models.lora import combine, partition, trainable_mask  # noqa: E402

MOE_LAYERS = 27


def step_cost(
    num_layers: int,
    batch: int,
    seq: int,
    capacity_factor: float = 0.0,
    block_size: int = 128,
    experts: int = 1,
    dtype: str = "float32",
    expert_parallel: bool = True,
) -> tuple[float, float, float, float]:
  """(temp GB, training GFLOP per token, GB accessed, argument GB) of one compiled LoRA
  gradient step; with ``experts`` > 1 per device of a ``('clients', 'experts')`` = (1, K)
  mesh."""
  cfg = family_config(
      "deepseek_moe",
      vocab_size=102400,
      hidden_size=2048,
      intermediate_size=10944,
      num_layers=num_layers,
      num_heads=16,
      num_kv_heads=16,
      num_experts=64,
      top_k=6,
      moe_intermediate_size=1408,
      shared_expert_intermediate_size=2816,
      lora_rank=8,
      lora_alpha=16.0,
      capacity_factor=capacity_factor or None,
      moe_block_size=block_size,
      expert_shards=experts if expert_parallel and experts > 1 and not capacity_factor else 1,
      max_position_embeddings=4096,
      dtype=dtype,
      param_dtype=dtype,
  )
  module = build_module(cfg)
  tok = jnp.zeros((batch, seq), jnp.int32)
  mask = jnp.ones((batch, seq), bool)
  params = jax.eval_shape(lambda: module.init(jax.random.key(0), tok, mask)["params"])
  trainable, frozen = partition(params, trainable_mask(params, "lora"))

  def loss(tr, fr):
    logits, _ = module.apply({"params": combine(tr, fr)}, tok, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tok[:, 1:]).mean()

  jit_kw = {}
  if experts > 1:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:experts]).reshape(1, experts), MESH_AXES)
    shardings = state_shardings({"params": params}, mesh)["params"]
    tr_sh, fr_sh = partition(shardings, trainable_mask(params, "lora"))
    jit_kw = {"in_shardings": (tr_sh, fr_sh), "out_shardings": tr_sh}
  compiled = jax.jit(jax.grad(loss), **jit_kw).lower(trainable, frozen).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  mem = compiled.memory_analysis()
  return (
      mem.temp_size_in_bytes / 1e9,
      cost.get("flops", 0.0) / (batch * seq) / 1e9,
      cost.get("bytes accessed", 0.0) / 1e9,
      mem.argument_size_in_bytes / 1e9,
  )


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--capacity_factor", type=float, default=0.0, help="0: dropless (sparse)")
  ap.add_argument("--block_size", type=int, default=128, help="model.moe_block_size")
  ap.add_argument(
      "--experts", type=int, default=1, help="K > 1: per device of a (1, K) 2-D mesh layout"
  )
  ap.add_argument("--dtype", default="float32", help="parameter (and compute) dtype")
  ap.add_argument(
      "--no_expert_parallel",
      action="store_true",
      help="--experts K: weight sharding only (expert_shards=1), not the run's layout",
  )
  a = ap.parse_args()
  kw = dict(
      capacity_factor=a.capacity_factor,
      block_size=a.block_size,
      experts=a.experts,
      dtype=a.dtype,
      expert_parallel=not a.no_expert_parallel,
  )
  (m2, f2, b2, w2), (m3, f3, b3, w3) = (step_cost(n, a.batch, a.seq, **kw) for n in (2, 3))
  dispatch = (
      f"capacity factor {a.capacity_factor:g}"
      if a.capacity_factor
      else f"dropless, blocks of {a.block_size}"
  )
  print(
      f"batch {a.batch} x {a.seq} ({dispatch}): per MoE layer {m3 - m2:.2f} GB temp, "
      f"{f3 - f2:.3f} GFLOP/token, {b3 - b2:.1f} GB accessed; {MOE_LAYERS} MoE layers "
      f"~{MOE_LAYERS * (m3 - m2):.1f} GB; whole model ~{f2 + (MOE_LAYERS - 1) * (f3 - f2):.1f} "
      f"GFLOP per training token, ~{b2 + (MOE_LAYERS - 1) * (b3 - b2):.0f} GB accessed per "
      f"step (2-layer model: {m2:.2f} GB temp)"
  )
  per = ""
  if a.experts > 1:
    ep = "weight sharding only" if a.no_expert_parallel else "expert parallel"
    per = f"per device of a ('clients', 'experts') = (1, {a.experts}) mesh ({ep})"
  print(
      f"{a.dtype} arguments (weights + adapters) {per or 'on the device'}: "
      f"{w3 - w2:.3f} GB per MoE layer, whole model ~{w2 + (MOE_LAYERS - 1) * (w3 - w2):.2f} GB; "
      f"temp whole model ~{m2 + (MOE_LAYERS - 1) * (m3 - m2):.1f} GB"
  )


if __name__ == "__main__":
  main()

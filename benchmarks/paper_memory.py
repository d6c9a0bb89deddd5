"""Memory and FLOPs of one DeepSeek-MoE-16B LoRA training step, from XLA's own accounting.

Compiles (does not run) ``jax.grad`` of the LM loss w.r.t. the LoRA partition for 2- and
3-layer models with DeepSeek-MoE-16B's real widths (hidden 2048, 64 routed experts of 1408,
top-6, 2 shared experts, vocab 102,400; the configs' dropless block-sparse experts, or
``--capacity_factor`` > 0 for capacity dispatch) and reads
``compiled.memory_analysis().temp_size_in_bytes`` and ``cost_analysis()`` (flops, bytes); the
3-layer minus 2-layer difference is one MoE layer, scaled to the model's 27. On CPU the
backend computes in float32, so memory figures are upper bounds for bfloat16 on an accelerator.
What ``configs/paper/{mmlu,hellaswag}_deepseek_moe16b_lora.py`` quote.

Command (about a minute per shape on 2 CPU cores; needs ~4 GB RAM)::

    python benchmarks/paper_memory.py --batch 2 --seq 512     # MMLU config
    python benchmarks/paper_memory.py --batch 8 --seq 192     # HellaSwag config
    python benchmarks/paper_memory.py --batch 2 --seq 512 --capacity_factor 1.25  # capacity
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from fedalign.models import build_module, family_config  # noqa: E402
from fedalign.models.lora import combine, partition, trainable_mask  # noqa: E402

MOE_LAYERS = 27


def step_cost(
    num_layers: int, batch: int, seq: int, capacity_factor: float = 0.0, block_size: int = 128
) -> tuple[float, float, float]:
  """(temp GB, training GFLOP per token, GB accessed) of one compiled LoRA gradient step."""
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
      max_position_embeddings=4096,
  )
  module = build_module(cfg)
  tok = jnp.zeros((batch, seq), jnp.int32)
  mask = jnp.ones((batch, seq), bool)
  params = jax.eval_shape(lambda: module.init(jax.random.key(0), tok, mask)["params"])
  trainable, frozen = partition(params, trainable_mask(params, "lora"))

  def loss(tr, fr):
    logits, _ = module.apply({"params": combine(tr, fr)}, tok, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tok[:, 1:]).mean()

  compiled = jax.jit(jax.grad(loss)).lower(trainable, frozen).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return (
      compiled.memory_analysis().temp_size_in_bytes / 1e9,
      cost.get("flops", 0.0) / (batch * seq) / 1e9,
      cost.get("bytes accessed", 0.0) / 1e9,
  )


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--capacity_factor", type=float, default=0.0, help="0: dropless (sparse)")
  ap.add_argument("--block_size", type=int, default=128, help="model.moe_block_size")
  a = ap.parse_args()
  kw = dict(capacity_factor=a.capacity_factor, block_size=a.block_size)
  (m2, f2, b2), (m3, f3, b3) = (step_cost(n, a.batch, a.seq, **kw) for n in (2, 3))
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


if __name__ == "__main__":
  main()

"""Configuration of the decoder-only MoE language models (one implementation, five families).

:class:`MoEConfig` is a frozen dataclass: hashable, so it can be a static argument of jit.
:func:`family_config` gives the defaults that distinguish Mixtral, OLMoE, Qwen2-MoE,
Qwen3-MoE and DeepSeek-MoE (v1), and :meth:`MoEConfig.validate` rejects out-of-range fields
with an error naming the field and the accepted values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_moe")
QK_NORMS = ("none", "full", "head")
MOE_IMPLS = ("sparse", "dense", "ragged")
DTYPES = ("float32", "bfloat16", "float16")
LORA_TARGETS = ("attention", "experts", "shared_expert", "dense_mlp")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Hyper-parameters of :class:`fedalign.models.decoder.MoEDecoderLM`.

  Example:
    >>> cfg = MoEConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
    ...                 num_kv_heads=2, num_experts=4, top_k=2).validate()
    >>> cfg.moe_layer_ids
    (0, 1)
  """

  family: str = "mixtral"
  vocab_size: int = 512
  hidden_size: int = 64
  intermediate_size: int = 128  # dense MLP width (dense layers)
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None  # default hidden_size // num_heads
  # Routed experts.
  num_experts: int = 8
  top_k: int = 2
  moe_intermediate_size: int = 64
  norm_topk_prob: bool = True  # renormalise the top-k weights (Mixtral)
  routed_scaling_factor: float = 1.0  # DeepSeek multiplies the top-k weights by this
  router_bias: bool = False
  capacity_factor: float | None = None  # None = dropless; > 0: capacity dispatch ('sparse')
  # Expert compute: 'sparse' (top-k rows only: block-sparse and dropless when capacity_factor
  # is None, capacity dispatch when > 0) | 'dense' (every expert on every token: the exact
  # reference) | 'ragged' (jax.lax.ragged_dot; one model only: no vmap of its gradient).
  moe_impl: str = "sparse"
  moe_block_size: int = 64  # rows per block of the dropless 'sparse' path (moe.sparse_blocks)
  # Expert parallelism of the dropless 'sparse' path: the experts split into this many
  # contiguous shards, each computing only the rows routed to its own experts with its own
  # weights (moe.sharded_sparse_layout); the same function for any value. Set by the run from
  # the mesh's 'experts' axis (train.mesh_shape), so that expert weights never leave their
  # device; 1 = one layout over all experts.
  expert_shards: int = 1
  # Shared experts (Qwen2-MoE: gated; DeepSeek-MoE: ungated).
  shared_expert_intermediate_size: int = 0  # 0 = no shared expert
  shared_expert_gate: bool = False
  # Which layers are MoE: layer i (0-based) is MoE iff i >= first_k_dense and
  # (i + 1) % moe_every == 0 and i not in dense_layers.
  first_k_dense: int = 0
  moe_every: int = 1
  dense_layers: tuple[int, ...] = ()
  # Attention.
  qk_norm: str = "none"  # 'full' (OLMoE), 'head' (Qwen3-MoE)
  qkv_bias: bool = False  # Qwen2-MoE
  clip_qkv: float | None = None  # OLMoE option
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 4096
  # Auxiliary losses (coefficients used by the training loss).
  router_aux_loss_coef: float = 0.01
  router_z_loss_coef: float = 0.0
  # LoRA.
  lora_rank: int = 0  # 0 = no adapters
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("attention", "experts")
  # Numerics.
  dtype: str = "float32"  # compute dtype (router always float32)
  param_dtype: str = "float32"
  initializer_range: float = 0.02

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  @property
  def moe_layer_ids(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

  def is_moe_layer(self, i: int) -> bool:
    return (
        self.num_experts > 0
        and i >= self.first_k_dense
        and (i + 1) % self.moe_every == 0
        and i not in self.dense_layers
    )

  def replace(self, **kwargs: Any) -> "MoEConfig":
    return dataclasses.replace(self, **kwargs).validate()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def validate(self) -> "MoEConfig":
    """Checks every field; returns self so that it chains."""

    def bad(field: str, expected: str):
      raise ValueError(
          f"MoEConfig.{field}={getattr(self, field)!r} is invalid: expected {expected}."
      )

    if self.family not in FAMILIES + ("custom",):
      bad("family", f"one of {FAMILIES + ('custom',)}")
    for name in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "intermediate_size",
    ):
      if int(getattr(self, name)) < 1:
        bad(name, "a positive integer")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      bad("num_heads", f"a divisor of hidden_size={self.hidden_size} (or set head_dim)")
    if self.num_heads % self.num_kv_heads:
      bad("num_kv_heads", f"a divisor of num_heads={self.num_heads}")
    if self.resolved_head_dim % 2:
      bad("head_dim", "an even number (RoPE rotates pairs)")
    if self.num_experts < 0:
      bad("num_experts", "an integer >= 0")
    if self.num_experts > 0:
      if not 1 <= self.top_k <= self.num_experts:
        bad("top_k", f"an integer in [1, num_experts={self.num_experts}]")
      if self.moe_intermediate_size < 1:
        bad("moe_intermediate_size", "a positive integer")
    if self.capacity_factor is not None and self.capacity_factor <= 0:
      bad("capacity_factor", "None (dropless) or a positive float")
    if self.moe_impl not in MOE_IMPLS:
      bad("moe_impl", f"one of {MOE_IMPLS}")
    if self.capacity_factor is not None and self.moe_impl != "sparse":
      bad(
          "capacity_factor",
          f"None with moe_impl={self.moe_impl!r} (dropless); capacity dispatch is "
          "moe_impl='sparse' with capacity_factor > 0",
      )
    if int(self.moe_block_size) < 1:
      bad("moe_block_size", "a positive integer (rows per block of moe_impl='sparse')")
    if int(self.expert_shards) < 1 or (self.num_experts and self.num_experts % self.expert_shards):
      bad("expert_shards", f"a positive divisor of num_experts={self.num_experts}")
    if self.expert_shards > 1 and (self.moe_impl != "sparse" or self.capacity_factor is not None):
      bad("expert_shards", "1 unless moe_impl='sparse' with capacity_factor=None (dropless)")
    if self.moe_every < 1:
      bad("moe_every", "an integer >= 1")
    if not 0 <= self.first_k_dense <= self.num_layers:
      bad("first_k_dense", f"an integer in [0, num_layers={self.num_layers}]")
    if self.shared_expert_intermediate_size < 0:
      bad("shared_expert_intermediate_size", "an integer >= 0 (0 = no shared expert)")
    if self.shared_expert_gate and self.shared_expert_intermediate_size == 0:
      bad("shared_expert_gate", "False when shared_expert_intermediate_size == 0")
    if self.qk_norm not in QK_NORMS:
      bad("qk_norm", f"one of {QK_NORMS}")
    if self.lora_rank < 0:
      bad("lora_rank", "an integer >= 0 (0 = no adapters)")
    unknown = set(self.lora_targets) - set(LORA_TARGETS)
    if unknown:
      bad("lora_targets", f"a subset of {LORA_TARGETS} (unknown: {sorted(unknown)})")
    if self.dtype not in DTYPES:
      bad("dtype", f"one of {DTYPES}")
    if self.param_dtype not in DTYPES:
      bad("param_dtype", f"one of {DTYPES}")
    if self.rms_norm_eps <= 0:
      bad("rms_norm_eps", "a positive float")
    return self


_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": dict(norm_topk_prob=True, qk_norm="none", shared_expert_intermediate_size=0),
    "olmoe": dict(norm_topk_prob=False, qk_norm="full", rms_norm_eps=1e-5),
    "qwen2_moe": dict(
        norm_topk_prob=False,
        qkv_bias=True,
        shared_expert_gate=True,
        shared_expert_intermediate_size=128,
    ),
    "qwen3_moe": dict(norm_topk_prob=True, qk_norm="head"),
    "deepseek_moe": dict(
        norm_topk_prob=False,
        first_k_dense=1,
        shared_expert_intermediate_size=128,
        shared_expert_gate=False,
    ),
}


def family_config(family: str, **overrides: Any) -> MoEConfig:
  """A validated config with the defaults of one model family, plus overrides.

  >>> family_config('qwen2_moe', num_experts=4, top_k=2).shared_expert_gate
  True
  """
  if family not in _FAMILY_DEFAULTS:
    raise ValueError(f"family={family!r} is unknown: expected one of {FAMILIES}.")
  fields = dict(_FAMILY_DEFAULTS[family])
  fields.update(overrides)
  return MoEConfig(family=family, **fields).validate()

"""Switch Transformer encoder-decoder (T5 + top-1 MoE feed-forward layers) in Flax linen.

Semantics follow ``transformers``' ``SwitchTransformersForConditionalGeneration`` (checked
against transformers 5.x to 1e-4 in tests/test_switch.py):

* T5 blocks: pre-norm T5 layer norm (RMS, no bias, no mean subtraction), attention without the
  1/sqrt(d) scaling, bucketed relative position bias owned by the first layer of each stack and
  reused by every later layer (encoder: bidirectional buckets; decoder: causal buckets; the
  cross-attention has no position bias);
* layer ``i`` of a stack is a sparse (MoE) layer iff ``step == 1 or i % step == 1`` for
  ``step = encoder_sparse_step`` / ``decoder_sparse_step`` (0 = no MoE layer), the rule HF uses;
* top-1 router in float32 (linear D -> E, no bias by default), multiplicative uniform jitter
  ``x * U(1 - eps, 1 + eps)`` on the router input in training, argmax expert, the expert output
  multiplied by the top-1 probability;
* expert capacity per *batch row* (HF's group): ``expert_capacity`` tokens per expert and row,
  filled in sequence order; tokens beyond capacity are dropped, i.e. the MoE layer outputs 0 for
  them and they pass through the residual connection. ``capacity_factor`` instead gives
  ``ceil(capacity_factor * T / E)`` per row; both None = dropless;
* tied embeddings: the decoder output is scaled by ``d_model ** -0.5`` before the (shared)
  LM head, as in Mesh TensorFlow / HF.

Parameter tree (``D = d_model, E = num_experts, F = d_ff, H * K = num_heads * d_kv``)::

    shared/embedding (V, D)
    encoder/block_{i}/self_attn/{q,k,v}/kernel (D, H*K), o/kernel (H*K, D)
    encoder/block_0/self_attn/relative_attention_bias (buckets, H)   (decoder/block_0 too)
    encoder/block_{i}/{self_attn_norm,mlp_norm}/scale (D,)
    encoder/block_{i}/mlp: dense {wi/kernel (D, F), wo/kernel (F, D)} or
                           MoE   {router/kernel (D, E), experts/{wi (E, D, F), wo (E, F, D)}}
    encoder/final_norm/scale
    decoder/block_{i}/...  (+ cross_attn/{q,k,v,o}, cross_attn_norm), decoder/final_norm
    lm_head/kernel (D, V)  (only when tie_word_embeddings=False)

so every aggregator sees the same MoE block layout as the decoder LMs ('router' + 'experts',
expert axis first). The forward returns ``(logits, aux)`` with ``aux['routing']`` keyed by the
block path (e.g. ``'encoder/block_1/mlp'``), and ``aux['load_balance_loss']`` /
``aux['router_z_loss']`` averaged over all MoE blocks of both stacks.

Randomness in training (``deterministic=False``): dropout *and* router jitter both draw from
the ``'dropout'`` rng stream, so ``apply(..., rngs={'dropout': key})`` is enough.

Example:
  >>> import jax, jax.numpy as jnp
  >>> cfg = switch_tiny()
  >>> model = SwitchTransformer(cfg)
  >>> ids = jnp.ones((2, 6), jnp.int32)
  >>> params = jax.jit(model.init)(jax.random.key(0), ids)['params']
  >>> dec = shift_right(jnp.ones((2, 3), jnp.int32), cfg.decoder_start_token_id)
  >>> logits, aux = jax.jit(model.apply)({'params': params}, ids, None, dec)
  >>> logits.shape, sorted(aux['routing'])
  ((2, 3, 128), ['decoder/block_1/mlp', 'encoder/block_1/mlp'])
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedalign.models.config import DTYPES
from fedalign.models.layers import LoRADense, RMSNorm, attention_mask, dtype_of
from fedalign.models.moe import Experts, Router, capacity_dispatch, expert_capacity
from fedalign.models.routing import routing_stats

Array = jax.Array
PyTree = Any
_NEG = -1e30

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}
SWITCH_LORA_TARGETS = ("attention", "experts", "dense_mlp")
MOE_IMPLS = ("dense", "ragged")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SwitchConfig:
  """Hyper-parameters of :class:`SwitchTransformer` (names follow HF SwitchTransformersConfig).

  Example:
    >>> cfg = SwitchConfig(vocab_size=64, d_model=16, d_kv=4, num_heads=2, d_ff=32,
    ...                    num_layers=4, num_experts=4, encoder_sparse_step=2).validate()
    >>> cfg.encoder_sparse_layers, cfg.decoder_sparse_layers
    ((1, 3), (1, 3))
  """

  vocab_size: int = 32128
  d_model: int = 768
  d_kv: int | None = 64  # None = d_model // num_heads
  d_ff: int = 2048
  num_heads: int = 12
  num_layers: int = 12  # encoder layers
  num_decoder_layers: int | None = None  # None = num_layers
  # Mixture of experts.
  num_experts: int = 8
  encoder_sparse_step: int = 2  # layer i sparse iff step == 1 or i % step == 1; 0 = none
  decoder_sparse_step: int = 2
  expert_capacity: int | None = 64  # tokens per expert and batch row (HF semantics)
  capacity_factor: float | None = None  # alternative: ceil(cf * T / E) per row
  router_bias: bool = False
  router_jitter_noise: float = 0.01
  router_ignore_padding_tokens: bool = False  # True: padded tokens take no expert capacity
  moe_impl: str = "dense"  # dropless only: 'dense' (all experts) | 'ragged'
  # T5 attention.
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  # Misc.
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = "relu"
  tie_word_embeddings: bool = True
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  router_aux_loss_coef: float = 0.001
  router_z_loss_coef: float = 0.001
  initializer_factor: float = 1.0
  # LoRA.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("attention", "experts")
  # Numerics.
  dtype: str = "float32"  # compute dtype (router always float32)
  param_dtype: str = "float32"

  # Aliases shared with MoEConfig, so generic code can read them.
  @property
  def hidden_size(self) -> int:
    return self.d_model

  @property
  def top_k(self) -> int:
    return 1

  @property
  def resolved_d_kv(self) -> int:
    return self.d_kv if self.d_kv is not None else self.d_model // self.num_heads

  @property
  def resolved_num_decoder_layers(self) -> int:
    return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

  @staticmethod
  def sparse_layers(num_layers: int, step: int) -> tuple[int, ...]:
    """Indices of the MoE layers of a stack (HF's rule; step 0 = none)."""
    if step <= 0:
      return ()
    return tuple(i for i in range(num_layers) if step == 1 or i % step == 1)

  @property
  def encoder_sparse_layers(self) -> tuple[int, ...]:
    return self.sparse_layers(self.num_layers, self.encoder_sparse_step)

  @property
  def decoder_sparse_layers(self) -> tuple[int, ...]:
    return self.sparse_layers(self.resolved_num_decoder_layers, self.decoder_sparse_step)

  @property
  def moe_block_paths(self) -> tuple[str, ...]:
    """The keys of ``aux['routing']``, encoder first."""
    return tuple(f"encoder/block_{i}/mlp" for i in self.encoder_sparse_layers) + tuple(
        f"decoder/block_{i}/mlp" for i in self.decoder_sparse_layers
    )

  def row_capacity(self, seq_len: int) -> int | None:
    """Expert capacity per batch row for sequences of ``seq_len`` tokens (None = dropless)."""
    if self.capacity_factor is not None:
      cap = expert_capacity(seq_len, self.num_experts, 1, self.capacity_factor)
    elif self.expert_capacity is not None:
      cap = self.expert_capacity
    else:
      return None
    return min(cap, seq_len)

  def replace(self, **kwargs: Any) -> "SwitchConfig":
    return dataclasses.replace(self, **kwargs).validate()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def validate(self) -> "SwitchConfig":
    """Checks every field (errors name the field); returns self so that it chains."""

    def bad(field: str, expected: str):
      raise ValueError(
          f"SwitchConfig.{field}={getattr(self, field)!r} is invalid: expected {expected}."
      )

    for name in ("vocab_size", "d_model", "d_ff", "num_heads", "num_layers"):
      if int(getattr(self, name)) < 1:
        bad(name, "a positive integer")
    if self.num_decoder_layers is not None and self.num_decoder_layers < 1:
      bad("num_decoder_layers", "None (= num_layers) or a positive integer")
    if self.d_kv is None and self.d_model % self.num_heads:
      bad("num_heads", f"a divisor of d_model={self.d_model} (or set d_kv)")
    if self.d_kv is not None and self.d_kv < 1:
      bad("d_kv", "None (= d_model // num_heads) or a positive integer")
    if self.num_experts < 1:
      bad("num_experts", "an integer >= 1")
    if not 0 <= self.encoder_sparse_step <= self.num_layers:
      bad(
          "encoder_sparse_step",
          f"an integer in [0, num_layers={self.num_layers}] " "(0 = no MoE layer)",
      )
    if not 0 <= self.decoder_sparse_step <= self.resolved_num_decoder_layers:
      bad(
          "decoder_sparse_step",
          "an integer in [0, num_decoder_layers="
          f"{self.resolved_num_decoder_layers}] (0 = no MoE layer)",
      )
    if self.expert_capacity is not None and self.expert_capacity < 1:
      bad("expert_capacity", "None or a positive integer (tokens per expert and batch row)")
    if self.capacity_factor is not None and self.capacity_factor <= 0:
      bad("capacity_factor", "None or a positive float")
    if self.capacity_factor is not None and self.expert_capacity is not None:
      bad("capacity_factor", "None when expert_capacity is set (set one of the two)")
    if self.moe_impl not in MOE_IMPLS:
      bad("moe_impl", f"one of {MOE_IMPLS}")
    if not 0.0 <= self.router_jitter_noise < 1.0:
      bad("router_jitter_noise", "a float in [0, 1)")
    if self.relative_attention_num_buckets < 4:
      bad("relative_attention_num_buckets", "an integer >= 4")
    if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
      bad(
          "relative_attention_max_distance",
          f"an integer > relative_attention_num_buckets // 2 = "
          f"{self.relative_attention_num_buckets // 2}",
      )
    if not 0.0 <= self.dropout_rate < 1.0:
      bad("dropout_rate", "a float in [0, 1)")
    if self.layer_norm_epsilon <= 0:
      bad("layer_norm_epsilon", "a positive float")
    if self.dense_act_fn not in ACTIVATIONS:
      bad("dense_act_fn", f"one of {tuple(ACTIVATIONS)}")
    for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
      if not 0 <= getattr(self, name) < self.vocab_size:
        bad(name, f"a token id in [0, vocab_size={self.vocab_size})")
    if self.lora_rank < 0:
      bad("lora_rank", "an integer >= 0 (0 = no adapters)")
    unknown = set(self.lora_targets) - set(SWITCH_LORA_TARGETS)
    if unknown:
      bad("lora_targets", f"a subset of {SWITCH_LORA_TARGETS} (unknown: {sorted(unknown)})")
    if self.dtype not in DTYPES:
      bad("dtype", f"one of {DTYPES}")
    if self.param_dtype not in DTYPES:
      bad("param_dtype", f"one of {DTYPES}")
    return self


def switch_tiny(**overrides: Any) -> SwitchConfig:
  """A tiny Switch config for tests (2+2 layers, layer 1 of each stack is MoE, 4 experts).

  >>> switch_tiny().moe_block_paths
  ('encoder/block_1/mlp', 'decoder/block_1/mlp')
  """
  fields = dict(
      vocab_size=128,
      d_model=32,
      d_kv=8,
      d_ff=64,
      num_heads=4,
      num_layers=2,
      num_decoder_layers=2,
      num_experts=4,
      encoder_sparse_step=2,
      decoder_sparse_step=2,
      expert_capacity=16,
      relative_attention_num_buckets=8,
      relative_attention_max_distance=20,
      dropout_rate=0.0,
  )
  fields.update(overrides)
  return SwitchConfig(**fields).validate()


def switch_base_16(**overrides: Any) -> SwitchConfig:
  """google/switch-base-16: T5-base (12+12 layers, d_model 768, 12 heads) with 16 experts in
  every other feed-forward layer (6 + 6 MoE layers), expert capacity 64 per row.

  >>> len(switch_base_16().moe_block_paths)
  12
  """
  fields = dict(
      vocab_size=32128,
      d_model=768,
      d_kv=64,
      d_ff=3072,
      num_heads=12,
      num_layers=12,
      num_decoder_layers=12,
      num_experts=16,
      encoder_sparse_step=2,
      decoder_sparse_step=2,
      expert_capacity=64,
      router_bias=False,
      router_jitter_noise=0.01,
      relative_attention_num_buckets=32,
      relative_attention_max_distance=128,
      dropout_rate=0.1,
      layer_norm_epsilon=1e-6,
      dense_act_fn="relu",
      tie_word_embeddings=True,
      pad_token_id=0,
      eos_token_id=1,
      decoder_start_token_id=0,
      router_aux_loss_coef=0.001,
      router_z_loss_coef=0.001,
  )
  fields.update(overrides)
  return SwitchConfig(**fields).validate()


# --------------------------------------------------------------------------------------------
# T5 relative position buckets
# --------------------------------------------------------------------------------------------
def relative_position_bucket(
    relative_position: np.ndarray,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> np.ndarray:
  """T5's bucketing of ``memory_position - query_position`` (numpy, float32 like HF).

  Half of the buckets are exact small distances, the other half logarithmic up to
  ``max_distance``; sequence lengths are static, so the buckets are compile-time constants.

  >>> relative_position_bucket(np.array([-3, 0, 3]), True, 8, 20).tolist()
  [2, 0, 6]
  """
  rp = np.asarray(relative_position, np.int64)
  buckets = np.zeros_like(rp)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (rp > 0).astype(np.int64) * num_buckets
    rp = np.abs(rp)
  else:
    rp = -np.minimum(rp, 0)
  max_exact = num_buckets // 2
  is_small = rp < max_exact
  safe = np.maximum(rp, 1).astype(np.float32)
  large = (
      np.log(safe / np.float32(max_exact))
      / np.float32(math.log(max_distance / max_exact))
      * np.float32(num_buckets - max_exact)
  ).astype(np.float32)
  large = max_exact + large.astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return buckets + np.where(is_small, rp, large)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
def _dropout(rate: float, x: Array, deterministic: bool) -> Array:
  if rate <= 0.0 or deterministic:
    return x
  return nn.Dropout(rate)(x, deterministic=False)


class SwitchAttention(nn.Module):
  """T5 multi-head attention (no 1/sqrt(d) scaling) with an optional relative position bias."""

  config: SwitchConfig
  has_relative_bias: bool = False
  bidirectional: bool = True

  @nn.compact
  def __call__(
      self,
      x: Array,
      kv: Array,
      mask: Array,
      position_bias: Array | None,
      deterministic: bool = True,
  ) -> tuple[Array, Array | None]:
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    h, dk, d, f = cfg.num_heads, cfg.resolved_d_kv, cfg.d_model, cfg.initializer_factor
    r = cfg.lora_rank if "attention" in cfg.lora_targets else 0
    kw = dict(lora_rank=r, lora_alpha=cfg.lora_alpha, dtype=dtype, param_dtype=pdtype)
    q = LoRADense(h * dk, init_std=f * (d * dk) ** -0.5, name="q", **kw)(x)
    k = LoRADense(h * dk, init_std=f * d**-0.5, name="k", **kw)(kv)
    v = LoRADense(h * dk, init_std=f * d**-0.5, name="v", **kw)(kv)
    b, t, s = x.shape[0], x.shape[1], kv.shape[1]
    q, k, v = q.reshape(b, t, h, dk), k.reshape(b, s, h, dk), v.reshape(b, s, h, dk)
    logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32)
    if self.has_relative_bias:
      table = self.param(
          "relative_attention_bias",
          nn.initializers.normal(f * d**-0.5),
          (cfg.relative_attention_num_buckets, h),
          pdtype,
      )
      rel = np.arange(s)[None, :] - np.arange(t)[:, None]
      bucket = relative_position_bucket(
          rel,
          self.bidirectional,
          cfg.relative_attention_num_buckets,
          cfg.relative_attention_max_distance,
      )
      position_bias = jnp.transpose(table.astype(jnp.float32)[bucket], (2, 0, 1))[None]
    if position_bias is not None:
      logits = logits + position_bias
    logits = jnp.where(mask, logits, _NEG)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = _dropout(cfg.dropout_rate, weights, deterministic).astype(v.dtype)
    out = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(b, t, h * dk)
    out = LoRADense(d, init_std=f * (h * dk) ** -0.5, name="o", **kw)(out)
    return out, position_bias


class DenseActDense(nn.Module):
  """T5 feed-forward: wo(dropout(act(wi x)))."""

  config: SwitchConfig

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    r = cfg.lora_rank if "dense_mlp" in cfg.lora_targets else 0
    kw = dict(
        lora_rank=r,
        lora_alpha=cfg.lora_alpha,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
    )
    f = cfg.initializer_factor
    hid = LoRADense(cfg.d_ff, init_std=f * cfg.d_model**-0.5, name="wi", **kw)(x)
    hid = _dropout(cfg.dropout_rate, ACTIVATIONS[cfg.dense_act_fn](hid), deterministic)
    return LoRADense(cfg.d_model, init_std=f * cfg.d_ff**-0.5, name="wo", **kw)(hid)


class SwitchExperts(Experts):
  """E non-gated experts ``wo(dropout(act(x wi)))``: wi (E, D, F), wo (E, F, D) (+ LoRA).

  Reuses :class:`fedalign.models.moe.Experts`' stacked-LoRA projection, so LoRA leaves follow
  the same convention (``wi_lora_a`` (E, D, r), ``wi_lora_b`` (E, r, F), ...).
  """

  activation: str = "relu"
  dropout_rate: float = 0.0

  def weight_shapes(self, d_model: int) -> dict[str, tuple[int, int, int]]:
    e, f = self.num_experts, self.intermediate_size
    return {"wi": (e, d_model, f), "wo": (e, f, d_model)}

  @nn.compact
  def __call__(
      self,
      x: Array,
      mode: str = "grouped",
      group_sizes: Array | None = None,
      deterministic: bool = True,
  ) -> Array:
    """Modes: 'grouped' (E, C, D) -> (E, C, D); 'dense' (T, D) -> (T, E, D);
    'ragged' tokens sorted by expert (N, D) + group_sizes (E,) -> (N, D)."""
    w = self.setup_params(x.shape[-1])
    x = x.astype(self.dtype)
    act = ACTIVATIONS[self.activation]
    if mode == "ragged":
      proj = lambda name, inp: self._ragged_proj(w, name, inp, group_sizes)
      hid = _dropout(self.dropout_rate, act(proj("wi", x)), deterministic)
      return proj("wo", hid)
    if mode == "grouped":
      spec_in, spec_out = "ecd,edf->ecf", "ecf,efd->ecd"
    elif mode == "dense":
      spec_in, spec_out = "td,edf->tef", "tef,efd->ted"
    else:
      raise ValueError(f"SwitchExperts mode={mode!r}: expected 'dense', 'grouped' or 'ragged'.")
    hid = _dropout(self.dropout_rate, act(self._proj(w, "wi", x, spec_in)), deterministic)
    return self._proj(w, "wo", hid, spec_out)


class SwitchSparseMLP(nn.Module):
  """Top-1 Switch MoE layer with per-row expert capacity. Returns (out, stats, losses).

  Also sows ``intermediates/expert_index`` (B, T): the expert that processed each token, -1 for
  a token dropped by the capacity limit.
  """

  config: SwitchConfig

  @nn.compact
  def __call__(
      self, x: Array, mask: Array | None = None, deterministic: bool = True
  ) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    b, t, d = x.shape
    e = cfg.num_experts
    valid = jnp.ones((b, t), jnp.float32) if mask is None else mask.astype(jnp.float32)
    router_in = x.astype(jnp.float32)
    if not deterministic and cfg.router_jitter_noise > 0:
      eps = cfg.router_jitter_noise
      router_in = router_in * jax.random.uniform(
          self.make_rng("dropout"), router_in.shape, jnp.float32, 1.0 - eps, 1.0 + eps
      )
    logits, probs, top_w, top_idx = Router(
        e, 1, cfg.router_bias, norm_topk_prob=False, init_std=cfg.initializer_factor, name="router"
    )(
        router_in
    )  # (B, T, E), (B, T, 1)
    lora_r = cfg.lora_rank if "experts" in cfg.lora_targets else 0
    experts = SwitchExperts(
        e,
        cfg.d_ff,
        lora_r,
        cfg.lora_alpha,
        dtype,
        pdtype,
        cfg.initializer_factor * cfg.d_model**-0.5,
        activation=cfg.dense_act_fn,
        dropout_rate=cfg.dropout_rate,
        name="experts",
    )
    cap = cfg.row_capacity(t)
    if cap is not None:
      room = valid if cfg.router_ignore_padding_tokens else jnp.ones_like(valid)
      dispatch, combine = jax.vmap(capacity_dispatch, in_axes=(0, 0, 0, None, None))(
          top_idx, top_w, room, e, cap
      )  # (B, T, E, C)
      expert_in = jnp.einsum("btec,btd->ebcd", dispatch.astype(dtype), x.astype(dtype))
      expert_out = experts(
          expert_in.reshape(e, b * cap, d), mode="grouped", deterministic=deterministic
      ).reshape(e, b, cap, d)
      out = jnp.einsum("btec,ebcd->btd", combine.astype(expert_out.dtype), expert_out)
      kept = jnp.sum(dispatch, axis=(-2, -1)) > 0
    else:
      tokens = x.reshape(b * t, d)
      if cfg.moe_impl == "ragged":
        flat_idx = top_idx.reshape(-1)
        order = jnp.argsort(flat_idx, stable=True)
        group_sizes = jnp.bincount(flat_idx, length=e).astype(jnp.int32)
        y_sorted = experts(
            tokens[order], mode="ragged", group_sizes=group_sizes, deterministic=deterministic
        )
        w_sorted = top_w.reshape(-1)[order].astype(y_sorted.dtype)
        out = jnp.zeros((b * t, d), y_sorted.dtype).at[order].add(y_sorted * w_sorted[:, None])
      else:
        comb = jax.nn.one_hot(top_idx.reshape(-1), e, dtype=jnp.float32) * top_w.reshape(-1, 1)
        expert_out = experts(tokens, mode="dense", deterministic=deterministic)  # (T, E, D)
        out = jnp.einsum("te,ted->td", comb.astype(expert_out.dtype), expert_out)
      out = out.reshape(b, t, d)
      kept = jnp.ones((b, t), bool)
    self.sow("intermediates", "expert_index", jnp.where(kept, top_idx[..., 0], -1))

    stats = routing_stats(probs, top_idx, x, valid)
    n = jnp.maximum(stats["token_count"], 1.0)
    lb = e * jnp.sum((stats["select_count"] / n) * (stats["prob_sum"] / n))
    z = jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * valid) / n
    router_input = {"x": router_in.reshape(b * t, d), "mask": valid.reshape(b * t)}
    losses = {"load_balance_loss": lb, "router_z_loss": z, "router_input": router_input}
    return out.astype(x.dtype), stats, losses


class SwitchBlock(nn.Module):
  """One T5 block: self-attention, (decoder) cross-attention, dense or sparse feed-forward."""

  config: SwitchConfig
  layer_id: int
  is_decoder: bool
  is_sparse: bool

  @nn.compact
  def __call__(
      self,
      x,
      self_mask,
      position_bias,
      token_mask,
      enc_hidden=None,
      cross_mask=None,
      deterministic: bool = True,
  ):
    cfg = self.config
    pdtype = dtype_of(cfg.param_dtype)
    eps, rate = cfg.layer_norm_epsilon, cfg.dropout_rate
    h = RMSNorm(eps, pdtype, name="self_attn_norm")(x)
    y, position_bias = SwitchAttention(
        cfg, self.layer_id == 0, not self.is_decoder, name="self_attn"
    )(h, h, self_mask, position_bias, deterministic)
    x = x + _dropout(rate, y, deterministic)
    if self.is_decoder:
      h = RMSNorm(eps, pdtype, name="cross_attn_norm")(x)
      y, _ = SwitchAttention(cfg, False, name="cross_attn")(
          h, enc_hidden, cross_mask, None, deterministic
      )
      x = x + _dropout(rate, y, deterministic)
    h = RMSNorm(eps, pdtype, name="mlp_norm")(x)
    stats = losses = None
    if self.is_sparse:
      y, stats, losses = SwitchSparseMLP(cfg, name="mlp")(h, token_mask, deterministic)
    else:
      y = DenseActDense(cfg, name="mlp")(h, deterministic)
    x = x + _dropout(rate, y, deterministic)
    return x, position_bias, stats, losses


class SwitchStack(nn.Module):
  """Encoder (``is_decoder=False``) or decoder stack on embedded inputs.

  Returns (hidden (B, T, D), routing {'block_i/mlp': stats}, losses {'block_i/mlp': {...}}).
  """

  config: SwitchConfig
  is_decoder: bool

  @nn.compact
  def __call__(
      self,
      x: Array,
      token_mask: Array | None,
      enc_hidden: Array | None = None,
      enc_mask: Array | None = None,
      deterministic: bool = True,
  ):
    cfg = self.config
    b, t, _ = x.shape
    if self.is_decoder:
      num_layers, sparse = cfg.resolved_num_decoder_layers, cfg.decoder_sparse_layers
      self_mask = attention_mask(token_mask, t, causal=True)
      cross_mask = (
          jnp.ones((1, 1, 1, enc_hidden.shape[1]), bool)
          if enc_mask is None
          else enc_mask.astype(bool)[:, None, None, :]
      )
    else:
      num_layers, sparse = cfg.num_layers, cfg.encoder_sparse_layers
      self_mask = attention_mask(token_mask, t, causal=False)
      cross_mask = None
    x = _dropout(cfg.dropout_rate, x, deterministic)
    position_bias = None
    routing, losses = {}, {}
    for i in range(num_layers):
      x, position_bias, stats, block_losses = SwitchBlock(
          cfg, i, self.is_decoder, i in sparse, name=f"block_{i}"
      )(x, self_mask, position_bias, token_mask, enc_hidden, cross_mask, deterministic)
      if stats is not None:
        routing[f"block_{i}/mlp"] = stats
        losses[f"block_{i}/mlp"] = block_losses
    x = RMSNorm(cfg.layer_norm_epsilon, dtype_of(cfg.param_dtype), name="final_norm")(x)
    x = _dropout(cfg.dropout_rate, x, deterministic)
    return x, routing, losses


def _aux(routing: dict, losses: dict) -> dict[str, Any]:
  zero = jnp.zeros((), jnp.float32)
  lb = [v["load_balance_loss"] for v in losses.values()]
  z = [v["router_z_loss"] for v in losses.values()]
  return {
      "routing": routing,
      "router_inputs": {k: v["router_input"] for k, v in losses.items()},
      "load_balance_loss": jnp.mean(jnp.stack(lb)) if lb else zero,
      "router_z_loss": jnp.mean(jnp.stack(z)) if z else zero,
  }


class SwitchTransformer(nn.Module):
  """Switch Transformer encoder-decoder LM.

  ``__call__(input_ids, attention_mask=None, decoder_input_ids=None,
  decoder_attention_mask=None, deterministic=True) -> (logits (B, T_dec, V) float32, aux)``.
  ``decoder_input_ids=None`` decodes one step from ``decoder_start_token_id`` (B, 1); build
  teacher-forcing inputs with :func:`shift_right`. Methods ``encode`` and ``decode`` split the
  two halves (``module.apply(vars, ..., method='encode')``).
  """

  config: SwitchConfig

  def setup(self):
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    self.shared = nn.Embed(
        cfg.vocab_size,
        cfg.d_model,
        dtype=dtype,
        param_dtype=pdtype,
        embedding_init=nn.initializers.normal(cfg.initializer_factor),
    )
    self.encoder = SwitchStack(cfg, is_decoder=False)
    self.decoder = SwitchStack(cfg, is_decoder=True)
    if not cfg.tie_word_embeddings:
      self.lm_head = LoRADense(
          cfg.vocab_size, dtype=dtype, param_dtype=pdtype, init_std=cfg.initializer_factor
      )

  def _losses(self, losses: dict, prefix: str) -> dict:
    return {f"{prefix}/{k}": v for k, v in losses.items()}

  def encode(
      self, input_ids: Array, attention_mask: Array | None = None, deterministic: bool = True
  ) -> tuple[Array, dict[str, Any]]:
    """Encoder hidden states (B, T, D) and the encoder's aux (routing keyed 'encoder/...')."""
    mask = None if attention_mask is None else attention_mask.astype(bool)
    hidden, routing, losses = self.encoder(
        self.shared(input_ids), mask, deterministic=deterministic
    )
    return hidden, _aux(
        {f"encoder/{k}": v for k, v in routing.items()}, self._losses(losses, "encoder")
    )

  def decode(
      self,
      decoder_input_ids: Array,
      encoder_hidden: Array,
      attention_mask: Array | None = None,
      decoder_attention_mask: Array | None = None,
      deterministic: bool = True,
  ) -> tuple[Array, dict[str, Any]]:
    """Logits (B, T_dec, V) given encoder states; aux routing keyed 'decoder/...'."""
    cfg = self.config
    dec_mask = None if decoder_attention_mask is None else decoder_attention_mask.astype(bool)
    enc_mask = None if attention_mask is None else attention_mask.astype(bool)
    hidden, routing, losses = self.decoder(
        self.shared(decoder_input_ids), dec_mask, encoder_hidden, enc_mask, deterministic
    )
    if cfg.tie_word_embeddings:
      logits = self.shared.attend(hidden * (cfg.d_model**-0.5))
    else:
      logits = self.lm_head(hidden)
    return logits.astype(jnp.float32), _aux(
        {f"decoder/{k}": v for k, v in routing.items()}, self._losses(losses, "decoder")
    )

  def __call__(
      self,
      input_ids: Array,
      attention_mask: Array | None = None,
      decoder_input_ids: Array | None = None,
      decoder_attention_mask: Array | None = None,
      deterministic: bool = True,
  ) -> tuple[Array, dict[str, Any]]:
    cfg = self.config
    if decoder_input_ids is None:
      decoder_input_ids = jnp.full((input_ids.shape[0], 1), cfg.decoder_start_token_id, jnp.int32)
    enc, enc_aux = self.encode(input_ids, attention_mask, deterministic)
    logits, dec_aux = self.decode(
        decoder_input_ids, enc, attention_mask, decoder_attention_mask, deterministic
    )
    n_enc, n_dec = len(cfg.encoder_sparse_layers), len(cfg.decoder_sparse_layers)
    total = max(n_enc + n_dec, 1)
    aux = {
        "routing": {**enc_aux["routing"], **dec_aux["routing"]},
        "router_inputs": {**enc_aux["router_inputs"], **dec_aux["router_inputs"]},
    }
    for name in ("load_balance_loss", "router_z_loss"):
      aux[name] = (n_enc * enc_aux[name] + n_dec * dec_aux[name]) / total
    return logits, aux


# --------------------------------------------------------------------------------------------
# Text-to-text helpers (pure, jittable with `config` static)
# --------------------------------------------------------------------------------------------
def shift_right(labels: Array, decoder_start_token_id: int, pad_token_id: int = 0) -> Array:
  """Teacher-forcing decoder inputs: [start, labels[:-1]], with -100 replaced by the pad id.

  >>> shift_right(jnp.array([[5, 6, -100]]), 0).tolist()
  [[0, 5, 6]]
  """
  labels = jnp.asarray(labels)
  start = jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype)
  shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
  return jnp.where(shifted == -100, pad_token_id, shifted)


def pack_targets(
    sequences: Sequence[Sequence[int]], pad_id: int = 0, eos_id: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Pads token sequences (never truncates) into (ids (K, L) int32, mask (K, L) bool).

  With ``eos_id`` each sequence gets an end-of-sequence token, as T5 targets do.

  >>> ids, mask = pack_targets([[7], [8, 9]], eos_id=1)
  >>> ids.tolist(), mask.sum(-1).tolist()
  ([[7, 1, 0], [8, 9, 1]], [2, 3])
  """
  seqs = [list(s) + ([eos_id] if eos_id is not None else []) for s in sequences]
  if not seqs or min(len(s) for s in seqs) == 0:
    raise ValueError("pack_targets: every target sequence needs at least one token.")
  length = max(len(s) for s in seqs)
  ids = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    ids[i, : len(s)] = s
    mask[i, : len(s)] = True
  return ids, mask


def target_logprobs(logits: Array, target_ids: Array, target_mask: Array) -> Array:
  """Per-token log p(target) (B, L) in float32, 0 where the mask is off."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  tok = jnp.take_along_axis(logp, target_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.where(target_mask.astype(bool), tok, 0.0)


def score_targets(
    params: PyTree,
    config: SwitchConfig,
    enc_ids: Array,
    enc_mask: Array | None,
    target_ids: Array,
    target_mask: Array,
) -> Array:
  """Summed log-likelihood (B,) of each target sequence given its encoder input.

  ``jax.jit(score_targets, static_argnums=1)``. Targets are teacher-forced
  (``shift_right``); padded target positions do not count.

  >>> cfg = switch_tiny(); ids = jnp.ones((2, 5), jnp.int32)
  >>> params = jax.jit(SwitchTransformer(cfg).init)(jax.random.key(0), ids)['params']
  >>> score = jax.jit(score_targets, static_argnums=1)
  >>> score(params, cfg, ids, None, ids[:, :2], jnp.ones((2, 2), bool)).shape
  (2,)
  """
  tgt = jnp.where(target_mask.astype(bool), target_ids, config.pad_token_id).astype(jnp.int32)
  dec_in = shift_right(tgt, config.decoder_start_token_id, config.pad_token_id)
  logits, _ = SwitchTransformer(config).apply({"params": params}, enc_ids, enc_mask, dec_in)
  return jnp.sum(target_logprobs(logits, tgt, target_mask), axis=-1)


def score_choices(
    params: PyTree,
    config: SwitchConfig,
    enc_ids: Array,
    enc_mask: Array | None,
    choice_ids: Array,
    choice_mask: Array,
    normalize: bool | Array = False,
) -> Array:
  """Log-likelihood (B, K) of K candidate targets per example; encodes each input once.

  ``choice_ids``/``choice_mask``: (B, K, L) per-example options (multiple choice) or (K, L)
  options shared by all examples (label words for classification). ``normalize=True`` divides
  by the number of target tokens (length-normalised log-likelihood); it may be traced.
  ``jax.jit(score_choices, static_argnums=1)``.
  """
  b = enc_ids.shape[0]
  if choice_ids.ndim == 2:
    choice_ids = jnp.broadcast_to(choice_ids[None], (b,) + choice_ids.shape)
    choice_mask = jnp.broadcast_to(choice_mask[None], (b,) + choice_mask.shape)
  k, length = choice_ids.shape[1], choice_ids.shape[2]
  module = SwitchTransformer(config)
  enc, _ = module.apply({"params": params}, enc_ids, enc_mask, method="encode")
  enc = jnp.repeat(enc, k, axis=0)
  rep_mask = None if enc_mask is None else jnp.repeat(enc_mask, k, axis=0)
  mask = choice_mask.reshape(b * k, length).astype(bool)
  tgt = jnp.where(mask, choice_ids.reshape(b * k, length), config.pad_token_id).astype(jnp.int32)
  dec_in = shift_right(tgt, config.decoder_start_token_id, config.pad_token_id)
  logits, _ = module.apply({"params": params}, dec_in, enc, rep_mask, method="decode")
  total = jnp.sum(target_logprobs(logits, tgt, mask), axis=-1)
  total = jnp.where(normalize, total / jnp.maximum(jnp.sum(mask, axis=-1), 1), total)
  return total.reshape(b, k)


def classify(
    params: PyTree,
    config: SwitchConfig,
    enc_ids: Array,
    enc_mask: Array | None,
    label_ids: Array,
    label_mask: Array,
    normalize: bool | Array = False,
) -> tuple[Array, Array]:
  """Rank classification: scores (B, K) of every label word sequence and argmax (B,).

  Label words that tokenize to several tokens are scored as whole sequences (build the
  (K, L) arrays with :func:`pack_targets`, which never truncates).
  ``jax.jit(classify, static_argnums=1)``.
  """
  scores = score_choices(params, config, enc_ids, enc_mask, label_ids, label_mask, normalize)
  return scores, jnp.argmax(scores, axis=-1)

"""Decoder-only MoE language model covering Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-MoE.

The model is a Flax linen module, so its parameters are a plain nested dict and
``model.apply({'params': params}, input_ids, attention_mask)`` is a pure function: the
federated engine vmaps it over clients. The forward returns ``(logits, aux)`` where ``aux``
holds the routing statistics of every MoE block (keyed by the block's parameter path, e.g.
``'layers_1/mlp'``) and the mean load-balancing and router z-losses.

``logit_positions`` (B, K) int: the LM head (hidden -> vocabulary) runs only on the final
(normed) hidden states at those positions and the logits are (B, K, V); everything before the
head and ``aux`` are unchanged. Label-word training and evaluation read a few positions per
sequence, so this skips most of the head's FLOPs and its (B, T, V) activations
(:class:`fedalign.federated.task.CausalLMTask`, :mod:`fedalign.metrics.evaluation`).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from fedalign.models import MoEConfig, MoEDecoderLM
  >>> cfg = MoEConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
  ...                 num_kv_heads=1, num_experts=4, top_k=2, moe_intermediate_size=8)
  >>> model = MoEDecoderLM(cfg)
  >>> ids = jnp.ones((2, 5), jnp.int32)
  >>> params = jax.jit(model.init)(jax.random.key(0), ids)['params']
  >>> logits, aux = jax.jit(model.apply)({'params': params}, ids)
  >>> logits.shape, sorted(aux['routing'])
  ((2, 5, 64), ['layers_0/mlp', 'layers_1/mlp'])
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedalign.models.config import MoEConfig
from fedalign.models.layers import (
    LoRADense,
    RMSNorm,
    apply_rope,
    attention_mask,
    dot_product_attention,
    dtype_of,
    rope_cos_sin,
)
from fedalign.models.moe import MLP, MoEBlock

Array = jax.Array


class Attention(nn.Module):
  """Grouped-query causal self-attention with RoPE and optional q/k RMSNorm."""

  config: MoEConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, cos: Array, sin: Array) -> Array:
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    hd, h, hkv = cfg.resolved_head_dim, cfg.num_heads, cfg.num_kv_heads
    r = cfg.lora_rank if "attention" in cfg.lora_targets else 0
    kw = dict(
        lora_rank=r,
        lora_alpha=cfg.lora_alpha,
        dtype=dtype,
        param_dtype=pdtype,
        init_std=cfg.initializer_range,
    )
    q = LoRADense(h * hd, use_bias=cfg.qkv_bias, name="q_proj", **kw)(x)
    k = LoRADense(hkv * hd, use_bias=cfg.qkv_bias, name="k_proj", **kw)(x)
    v = LoRADense(hkv * hd, use_bias=cfg.qkv_bias, name="v_proj", **kw)(x)
    if cfg.qk_norm == "full":
      q = RMSNorm(cfg.rms_norm_eps, pdtype, name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, pdtype, name="k_norm")(k)
    if cfg.clip_qkv is not None:
      q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
    b, t, _ = x.shape
    q, k, v = q.reshape(b, t, h, hd), k.reshape(b, t, hkv, hd), v.reshape(b, t, hkv, hd)
    if cfg.qk_norm == "head":
      q = RMSNorm(cfg.rms_norm_eps, pdtype, name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, pdtype, name="k_norm")(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = dot_product_attention(q, k, v, mask, hd**-0.5)
    return LoRADense(cfg.hidden_size, name="o_proj", **kw)(out)


class DecoderLayer(nn.Module):
  """Pre-norm transformer layer: attention then a MoE block or a dense MLP."""

  config: MoEConfig
  layer_id: int

  @nn.compact
  def __call__(self, x: Array, token_mask: Array, attn_mask: Array, cos: Array, sin: Array):
    cfg = self.config
    pdtype = dtype_of(cfg.param_dtype)
    h = RMSNorm(cfg.rms_norm_eps, pdtype, name="input_norm")(x)
    x = x + Attention(cfg, name="attn")(h, attn_mask, cos, sin)
    h = RMSNorm(cfg.rms_norm_eps, pdtype, name="post_attn_norm")(x)
    if cfg.is_moe_layer(self.layer_id):
      y, stats, losses = MoEBlock(cfg, name="mlp")(h, token_mask)
    else:
      r = cfg.lora_rank if "dense_mlp" in cfg.lora_targets else 0
      y = MLP(
          cfg.intermediate_size,
          r,
          cfg.lora_alpha,
          dtype_of(cfg.dtype),
          pdtype,
          cfg.initializer_range,
          name="mlp",
      )(h)
      stats, losses = None, None
    return x + y, stats, losses


class MoEDecoderLM(nn.Module):
  """Causal MoE language model. ``__call__(input_ids, attention_mask) -> (logits, aux)``.

  ``positions`` (T,) are the RoPE positions (default ``arange(T)``); ``logit_positions``
  (B, K) int selects the sequence positions whose logits are computed (-> (B, K, V)); None:
  every position (B, T, V).
  """

  config: MoEConfig

  @nn.compact
  def __call__(
      self,
      input_ids: Array,
      attention_mask: Array | None = None,
      positions: Array | None = None,
      logit_positions: Array | None = None,
  ) -> tuple[Array, dict[str, Any]]:
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    b, t = input_ids.shape
    token_mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    embed = nn.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        dtype=dtype,
        param_dtype=pdtype,
        embedding_init=nn.initializers.normal(cfg.initializer_range),
        name="embed",
    )
    x = embed(input_ids)
    if positions is None:
      positions = jnp.arange(t)
    cos, sin = rope_cos_sin(positions, cfg.resolved_head_dim, cfg.rope_theta)
    attn_mask = attention_mask_fn(token_mask if attention_mask is not None else None, t)
    routing, router_inputs, lb, z = {}, {}, [], []
    for i in range(cfg.num_layers):
      x, stats, losses = DecoderLayer(cfg, i, name=f"layers_{i}")(
          x, token_mask, attn_mask, cos, sin
      )
      if stats is not None:
        routing[f"layers_{i}/mlp"] = stats
        router_inputs[f"layers_{i}/mlp"] = losses["router_input"]
        lb.append(losses["load_balance_loss"])
        z.append(losses["router_z_loss"])
    x = RMSNorm(cfg.rms_norm_eps, pdtype, name="final_norm")(x)
    if logit_positions is not None:  # only the scored positions go through the LM head
      idx = jnp.asarray(logit_positions, jnp.int32)
      x = jnp.take_along_axis(x, idx[..., None], axis=1, mode="clip")
    if cfg.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = LoRADense(
          cfg.vocab_size,
          dtype=dtype,
          param_dtype=pdtype,
          init_std=cfg.initializer_range,
          name="lm_head",
      )(x)
    zero = jnp.zeros((), jnp.float32)
    aux = {
        "routing": routing,
        "router_inputs": router_inputs,
        "load_balance_loss": jnp.mean(jnp.stack(lb)) if lb else zero,
        "router_z_loss": jnp.mean(jnp.stack(z)) if z else zero,
    }
    return logits.astype(jnp.float32), aux


attention_mask_fn = attention_mask

"""Building blocks shared by the MoE models: RMSNorm, LoRA-capable dense, RoPE, attention."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
_NEG = -1e30


def dtype_of(name: str) -> Any:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) * scale, computed in float32 (as Llama-family HF models)."""

  eps: float = 1e-6
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(dtype) * x32.astype(dtype)


class LoRADense(nn.Module):
  """Dense layer (kernel (in, out), optional bias) with an optional low-rank adapter.

  y = x W + b + (alpha / r) * (x A) B with A (in, r) random and B (r, out) zero-initialised,
  so that a fresh adapter leaves the output unchanged.
  """

  features: int
  use_bias: bool = False
  lora_rank: int = 0
  lora_alpha: float = 16.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d_in = x.shape[-1]
    kernel = self.param(
        "kernel", nn.initializers.normal(self.init_std), (d_in, self.features), self.param_dtype
    )
    x = x.astype(self.dtype)
    y = x @ kernel.astype(self.dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(
          self.dtype
      )
    if self.lora_rank > 0:
      a = self.param(
          "lora_a",
          nn.initializers.normal(1.0 / d_in**0.5),
          (d_in, self.lora_rank),
          self.param_dtype,
      )
      b = self.param(
          "lora_b", nn.initializers.zeros, (self.lora_rank, self.features), self.param_dtype
      )
      y = y + (self.lora_alpha / self.lora_rank) * (
          (x @ a.astype(self.dtype)) @ b.astype(self.dtype)
      )
    return y


def rope_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """Rotary embedding tables (HF 'default' rope): (..., T, head_dim) cos and sin."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x: (B, T, H, hd); cos/sin: (T, hd) or (B, T, hd). Rotate-half convention."""
  if cos.ndim == 2:
    cos, sin = cos[None], sin[None]
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def attention_mask(padding_mask: Array | None, seq_len: int, causal: bool = True) -> Array:
  """(B or 1, 1, T, T) boolean mask: causal and key-padding."""
  mask = jnp.ones((1, 1, seq_len, seq_len), bool)
  if causal:
    mask = jnp.tril(mask)
  if padding_mask is not None:
    mask = mask & padding_mask.astype(bool)[:, None, None, :]
  return mask


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
  """Grouped-query attention. q (B,T,H,hd), k/v (B,S,Hkv,hd), mask (B|1,1,T,S) -> (B,T,H*hd).

  Heads are moved in front of the positions once, and the G = H / Hkv query heads that share
  a key/value head are stacked as G * T query rows of one (G * T, hd) x (hd, S) product per
  key/value head: fewer, larger batched matmuls than one per query head, and no transposes
  inside them (XLA:CPU, the shipped default's round: attention 171 -> 137 ms,
  benchmarks/README.md section 8).

  >>> q = k = v = jnp.ones((1, 3, 2, 4))
  >>> dot_product_attention(q, k, v, attention_mask(None, 3), 0.5).shape
  (1, 3, 8)
  """
  b, t, h, hd = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  q = q.reshape(b, t, hkv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, hd)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, Hkv, S, hd)
  logits = jnp.einsum("bkqd,bksd->bkqs", q, k).astype(jnp.float32) * scale
  rows = jnp.broadcast_to(mask[:, :, None], (mask.shape[0], 1, g, t, s))
  logits = jnp.where(rows.reshape(mask.shape[0], 1, g * t, s), logits, _NEG)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkqs,bksd->bkqd", weights, v).reshape(b, hkv, g, t, hd)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * hd)

"""Routing statistics of MoE layers (fedalign-moe.md section 3.1).

Every MoE block returns additive *sufficient statistics* so that accumulation over tokens,
batches and local steps is an exact sum; :func:`finalize_stats` turns them into the spec's
routing distribution p, selection counts c, margins m and region centroids mu.

Names (per block; a leading client axis may be present):

============== ======= =====================================================================
name           shape   definition
============== ======= =====================================================================
token_count    ()      number of valid (unpadded) tokens
prob_sum       (E,)    sum over valid tokens of g_e(x) (full softmax of router logits, f32)
select_count   (E,)    number of valid tokens with e in K(x)
margin_sum     (E,)    sum over tokens with e in K(x) of g_e(x) - g_(k+1)(x)
gate_sum       (E,)    sum over tokens with e in K(x) of g_e(x)
centroid_sum   (E, D)  sum over tokens with e in K(x) of g_e(x) * x (x = block input)
============== ======= =====================================================================
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

STAT_NAMES = ("token_count", "prob_sum", "select_count", "margin_sum", "gate_sum", "centroid_sum")


def safe_div(num: jax.Array, den: jax.Array, fallback: Any = 0.0) -> jax.Array:
  """num / den where den > 0, else ``fallback`` (broadcast); never NaN, finite gradients.

  >>> safe_div(jnp.array([1.0, 1.0]), jnp.array([2.0, 0.0]), fallback=-1.0).tolist()
  [0.5, -1.0]
  """
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), fallback)


def routing_stats(
    probs: jax.Array, top_idx: jax.Array, x: jax.Array, mask: jax.Array | None = None
) -> dict[str, jax.Array]:
  """Sufficient routing statistics of one MoE block for a batch of tokens.

  Args:
    probs: (..., E) float32 router probabilities g(x) (softmax over all experts).
    top_idx: (..., k) int indices of the selected experts K(x).
    x: (..., D) the block's input hidden states.
    mask: (...) bool/0-1 mask of valid tokens (None = all valid).

  Returns:
    A dict with the names of :data:`STAT_NAMES`.

  >>> p = jnp.array([[0.7, 0.2, 0.1]]); idx = jnp.array([[0]]); x = jnp.ones((1, 2))
  >>> s = routing_stats(p, idx, x)
  >>> s['margin_sum'].tolist()  # 0.7 - 0.2 for the selected expert
  [0.5, 0.0, 0.0]
  """
  num_experts = probs.shape[-1]
  probs = probs.astype(jnp.float32).reshape(-1, num_experts)
  top_idx = top_idx.reshape(-1, top_idx.shape[-1])
  x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
  if mask is None:
    valid = jnp.ones((probs.shape[0],), jnp.float32)
  else:
    valid = mask.reshape(-1).astype(jnp.float32)
  selected = jnp.sum(jax.nn.one_hot(top_idx, num_experts, dtype=jnp.float32), axis=-2)
  selected = jnp.minimum(selected, 1.0)  # (T, E)
  k = top_idx.shape[-1]
  if k < num_experts:
    best_other = jnp.max(jnp.where(selected > 0, -jnp.inf, probs), axis=-1, keepdims=True)
  else:
    best_other = jnp.zeros((probs.shape[0], 1), jnp.float32)
  sel = selected * valid[:, None]
  gated = sel * probs
  return {
      "token_count": jnp.sum(valid),
      "prob_sum": jnp.sum(probs * valid[:, None], axis=0),
      "select_count": jnp.sum(sel, axis=0),
      "margin_sum": jnp.sum(jnp.where(sel > 0, sel * (probs - best_other), 0.0), axis=0),
      "gate_sum": jnp.sum(gated, axis=0),
      "centroid_sum": gated.T @ x,
  }


def finalize_stats(stats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Turns sufficient statistics into p (E), c (E), m (E) and mu (E, D).

  Works with any leading axes (e.g. clients). Divisions by zero give 0, never NaN; p is
  uniform when no token was seen.

  >>> s = routing_stats(jnp.array([[0.7, 0.2, 0.1]]), jnp.array([[0]]), jnp.ones((1, 2)))
  >>> finalize_stats(s)['m'].tolist()
  [0.5, 0.0, 0.0]
  """
  prob_sum = stats["prob_sum"]
  num_experts = prob_sum.shape[-1]
  count = stats["token_count"][..., None]
  p = safe_div(prob_sum, count, 1.0 / num_experts)
  c = stats["select_count"]
  return {
      "p": p,
      "c": c,
      "m": safe_div(stats["margin_sum"], c),
      "mu": safe_div(stats["centroid_sum"], stats["gate_sum"][..., None]),
  }


def add_stats(a: Any, b: Any) -> Any:
  """Leaf-wise sum of two stats trees (accumulation over steps)."""
  return jax.tree.map(jnp.add, a, b)

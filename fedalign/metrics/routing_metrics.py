"""Routing and expert-role metrics (fedalign-moe.md section 7).

Pure, jittable functions of routing statistics (see :mod:`fedalign.models.routing`):

* :func:`js_divergence`: Jensen-Shannon divergence of two distributions (natural log).
* :func:`routing_divergence`: weighted mean JS divergence of client routing distributions
  p_i to the global one.
* :func:`expert_role_preservation`: mean pairwise cosine of the region centroids mu_i(e) of
  the clients that selected expert e, averaged over experts.
* :func:`expert_specialization_mi`: mutual information between expert selection and class
  label from a (classes x experts) selection-count table.

Every function returns finite values for degenerate input (zero vectors, zero counts, no
client selecting an expert).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import rel_entr  # p log(p / q), 0 where p = 0

from fedalign.models.routing import safe_div

_EPS = 1e-12


def js_divergence(p: jax.Array, q: jax.Array, axis: int = -1) -> jax.Array:
  """Jensen-Shannon divergence JS(p, q) = (KL(p||m) + KL(q||m)) / 2, m = (p + q) / 2.

  Natural logarithm, so values lie in [0, log 2]. Broadcasts over the other axes.

  >>> float(js_divergence(jnp.array([0.5, 0.5]), jnp.array([0.5, 0.5])))
  0.0
  >>> round(float(js_divergence(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))), 4)  # log 2
  0.6931
  """
  p = jnp.asarray(p, jnp.float32)
  q = jnp.asarray(q, jnp.float32)
  m = (p + q) / 2
  return 0.5 * (jnp.sum(rel_entr(p, m), axis=axis) + jnp.sum(rel_entr(q, m), axis=axis))


def routing_divergence(
    client_p: jax.Array, p_g: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
  """Weighted mean over clients of JS(p_i, p_g).

  Args:
    client_p: (C, E) client routing distributions p_i.
    p_g: (E,) global routing distribution.
    weights: (C,) client weights (e.g. n_i, 0 = excluded); None = uniform.

  Returns:
    Scalar; 0 when every weight is 0.

  >>> p = jnp.array([[0.5, 0.5], [1.0, 0.0]])
  >>> round(float(routing_divergence(p, jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0]))), 6)
  0.0
  """
  client_p = jnp.asarray(client_p, jnp.float32)
  js = js_divergence(client_p, jnp.asarray(p_g, jnp.float32)[None, :])
  if weights is None:
    weights = jnp.ones(client_p.shape[:1], jnp.float32)
  w = jnp.where(jnp.asarray(weights, jnp.float32) > 0, weights, 0.0)
  total = jnp.sum(w)
  return safe_div(jnp.sum(w * js), total)


def expert_role_preservation_per_expert(mu: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-expert mean pairwise cosine of mu_i(e) over client pairs i != j that selected e.

  Args:
    mu: (C, E, D) region centroids.
    c: (C, E) selection counts (clients with c_i(e) > 0 take part for expert e).

  Returns:
    ((E,) mean cosine, 0 where fewer than two clients selected e; (E,) bool validity mask).

  >>> mu = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]]); c = jnp.ones((2, 1))
  >>> [v.tolist() for v in expert_role_preservation_per_expert(mu, c)]
  [[0.0], [True]]
  """
  mu = jnp.asarray(mu, jnp.float32)
  sel = (jnp.asarray(c) > 0).astype(jnp.float32)  # (C, E)
  norm = jnp.linalg.norm(mu, axis=-1, keepdims=True)
  unit = mu / jnp.maximum(norm, _EPS)
  # sum_{i != j} s_i s_j <u_i, u_j> = |sum_i s_i u_i|^2 - sum_i s_i |u_i|^2 (s_i in {0, 1}):
  # O(C E D), no (C, C, E) array of pairwise cosines.
  total = jnp.sum(sel[:, :, None] * unit, axis=0)  # (E, D)
  self_sq = jnp.sum(sel * jnp.sum(jnp.square(unit), axis=-1), axis=0)  # (E,)
  n = jnp.sum(sel, axis=0)
  count = n * n - n  # ordered pairs i != j
  value = jnp.where(
      count > 0, (jnp.sum(jnp.square(total), axis=-1) - self_sq) / jnp.maximum(count, 1.0), 0.0
  )
  return value, count > 0


def expert_role_preservation(mu: jax.Array, c: jax.Array) -> jax.Array:
  """Mean over experts (selected by >= 2 clients) of the mean pairwise cosine of mu_i(e).

  1 means every client's expert e serves the same input region (roles preserved); lower
  values mean the same expert index serves different regions on different clients. Returns
  1.0 when no expert was selected by two clients (nothing can be blurred).

  >>> mu = jnp.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
  >>> float(expert_role_preservation(mu, jnp.ones((2, 2))))  # expert 0: cos 1, expert 1: 0
  0.5
  """
  value, valid = expert_role_preservation_per_expert(mu, c)
  n = jnp.sum(valid)
  return jnp.where(n > 0, jnp.sum(jnp.where(valid, value, 0.0)) / jnp.maximum(n, 1), 1.0)


def expert_specialization_mi(select_counts_by_class: jax.Array) -> jax.Array:
  """Mutual information I(expert; class) in nats from a (K classes, E experts) count table.

  Entry [k, e] = number of tokens of class-k examples that selected expert e. The joint
  distribution is the normalised table. 0 for an empty table; log min(K, E) at most.

  >>> round(float(expert_specialization_mi(jnp.eye(4) * 10)), 4)  # log 4
  1.3863
  >>> float(expert_specialization_mi(jnp.ones((4, 4))))
  0.0
  """
  t = jnp.asarray(select_counts_by_class, jnp.float32)
  if t.ndim != 2:
    raise ValueError(f"expert_specialization_mi needs a (classes, experts) table, got {t.shape}")
  total = jnp.sum(t)
  joint = safe_div(t, total)
  pk = jnp.sum(joint, axis=1, keepdims=True)
  pe = jnp.sum(joint, axis=0, keepdims=True)
  return jnp.sum(rel_entr(joint, pk * pe))

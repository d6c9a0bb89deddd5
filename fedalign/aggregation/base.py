"""The aggregator contract shared by every algorithm.

An aggregator is a pair of pure, jittable functions over client-stacked pytrees (leading
axis C = clients of the round):

* ``init(params) -> state``
* ``aggregate(state, global_params, deltas, stats, weights) -> (new_params, state, diagnostics)``

``deltas`` mirrors the trainable part of ``params`` with a leading client axis; leaves that are
``None`` (frozen) are left untouched. ``weights`` holds n_i, 0 for a client excluded from the
round (padding, NaN update). ``stats`` maps each MoE block path to its routing statistics
(see :mod:`fedalign.models.routing`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedalign.models.routing import safe_div

PyTree = Any


class Aggregator(NamedTuple):
  """Server-side algorithm: ``init`` and ``aggregate`` (both pure)."""

  init: Callable[[PyTree], PyTree]
  aggregate: Callable[..., tuple[PyTree, PyTree, dict]]


def normalized_weights(weights: jax.Array) -> jax.Array:
  """n_i / sum n; uniform over clients when every weight is zero (never NaN).

  >>> normalized_weights(jnp.array([1.0, 3.0])).tolist()
  [0.25, 0.75]
  """
  weights = jnp.asarray(weights, jnp.float32)
  total = jnp.sum(weights)
  uniform = jnp.ones_like(weights) / weights.shape[0]
  return safe_div(weights, total, uniform)


def weighted_mean(tree: PyTree, weights: jax.Array) -> PyTree:
  """Mean over the leading client axis of every leaf, weighted by ``weights`` (C,).

  ``None`` leaves stay ``None``.

  >>> weighted_mean({'w': jnp.array([[1.0], [3.0]])}, jnp.array([1.0, 1.0]))['w'].tolist()
  [2.0]
  """
  w = normalized_weights(weights)

  def mean(x):
    return jnp.tensordot(w.astype(x.dtype), x, axes=1)

  return jax.tree.map(mean, tree)


def apply_delta(params: PyTree, delta: PyTree) -> PyTree:
  """params + delta, leaf-wise; leaves whose delta is ``None`` are kept."""
  return jax.tree.map(
      lambda p, d: p if d is None else (p + d.astype(p.dtype)),
      params,
      delta,
      is_leaf=lambda x: x is None,
  )

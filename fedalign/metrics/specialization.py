"""Expert specialization of a model on labelled data: I(expert selection; class label).

For each class k the model runs on the evaluation examples with every other class masked out,
and the selection counts of each MoE block form a (classes x experts) table whose mutual
information (:func:`fedalign.metrics.routing_metrics.expert_specialization_mi`) measures how
much expert choice tells about the class (0 = no specialization, log min(K, E) at most).

Example:
  >>> import jax.numpy as jnp
  >>> from fedalign.models import MoEConfig, MoEDecoderLM, init_params
  >>> cfg = MoEConfig(vocab_size=16, hidden_size=8, num_heads=2, num_kv_heads=1,
  ...                 num_experts=4, top_k=1, moe_intermediate_size=4)
  >>> module = MoEDecoderLM(cfg)
  >>> fn = make_expert_specialization_fn(
  ...     lambda p, t, m: module.apply({'params': p}, t, m)[1]['routing'], num_classes=2)
  >>> mi, tables = fn(init_params(cfg), jnp.ones((4, 3), jnp.int32), jnp.ones((4, 3), bool),
  ...                 jnp.array([0, 0, 1, 1]))
  >>> tables['layers_0/mlp'].shape, float(mi['layers_0/mlp']) >= 0.0
  ((2, 4), True)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedalign.metrics.routing_metrics import expert_specialization_mi

PyTree = Any


def make_expert_specialization_fn(
    routing_fn: Callable[[PyTree, jax.Array, jax.Array], dict], num_classes: int
) -> Callable[..., tuple[dict, dict]]:
  """Jitted ``(params, tokens, mask, labels) -> ({block: MI}, {block: (K, E) counts})``.

  Args:
    routing_fn: ``(params, tokens, mask) -> aux['routing']`` of the model.
    num_classes: K.
  """

  @jax.jit
  def fn(params, tokens, mask, labels):
    def per_class(k):
      routing = routing_fn(params, tokens, mask & (labels == k)[:, None])
      return {path: s["select_count"] for path, s in routing.items()}

    tables = jax.lax.map(per_class, jnp.arange(num_classes))
    return {p: expert_specialization_mi(t) for p, t in tables.items()}, tables

  return fn

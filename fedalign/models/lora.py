"""Which parameters train: full fine-tuning or LoRA adapters (+ routers).

Trainable and frozen parts are plain pytrees with ``None`` where a leaf belongs to the other
part, so the federated engine vmaps only the trainable part over clients while the frozen base
weights are shared by every client (never copied per client).

Example:
  >>> import jax.numpy as jnp
  >>> params = {'q_proj': {'kernel': jnp.ones((2, 2)), 'lora_a': jnp.ones((2, 1)),
  ...                      'lora_b': jnp.zeros((1, 2))}}
  >>> mask = trainable_mask(params, 'lora')
  >>> trainable, frozen = partition(params, mask)
  >>> trainable['q_proj']['kernel'] is None, frozen['q_proj']['kernel'].shape
  (True, (2, 2))
  >>> combine(trainable, frozen)['q_proj']['lora_a'].shape
  (2, 1)
"""

from __future__ import annotations

from typing import Any

import jax

PyTree = Any
MODES = ("full", "lora", "router", "body")


def _keys(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def is_lora_path(keys: list[str]) -> bool:
  return bool(keys) and ("lora_a" in keys[-1] or "lora_b" in keys[-1])


def is_router_path(keys: list[str]) -> bool:
  return "router" in keys[:-1]


def trainable_mask(params: PyTree, mode: str = "full", train_router: bool = True) -> PyTree:
  """Boolean tree: which leaves train.

  Args:
    params: the model's params.
    mode: 'full' (everything), 'lora' (adapters, plus routers if ``train_router``),
      'router' (routers only), 'body' (all but the token embeddings and the LM head: the
      label words' output rows stay the pre-trained ones, FedBABU-style).
    train_router: with 'lora', also train the router kernels/biases.
  """
  if mode not in MODES:
    raise ValueError(f"trainable mode={mode!r} is invalid: expected one of {MODES}.")
  has_lora = any(is_lora_path(_keys(p)) for p, _ in jax.tree_util.tree_leaves_with_path(params))
  if mode == "lora" and not has_lora:
    raise ValueError(
        "trainable mode='lora' but the params have no LoRA leaves: set " "model.lora_rank > 0."
    )

  def pick(path, _):
    keys = _keys(path)
    if mode == "full":
      return True
    if mode == "router":
      return is_router_path(keys)
    if mode == "body":
      return keys[0] not in ("embed", "lm_head")
    return is_lora_path(keys) or (train_router and is_router_path(keys))

  return jax.tree_util.tree_map_with_path(pick, params)


def partition(params: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
  """Splits params into (trainable, frozen), ``None`` where a leaf is in the other part."""
  trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
  frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
  return trainable, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
  """Inverse of :func:`partition`."""
  return jax.tree.map(
      lambda a, b: b if a is None else a, trainable, frozen, is_leaf=lambda x: x is None
  )

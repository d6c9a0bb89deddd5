"""Simulated Byzantine clients (``config.attack``): who attacks and what they send.

Simulation only: a fixed set of ``round(attack.fraction * data.num_clients)`` clients, drawn
from ``config.seed`` alone (:func:`attacker_ids`; the same clients for every method at the
same seed), misbehaves whenever it is sampled. Inside the jitted round
(:mod:`fedalign.federated.round`):

=================== ===========================================================================
attack.kind          what an attacker does
=================== ===========================================================================
none                 nothing
sign_flip            uploads -scale * Delta_i (``attack.scale``; 1 = the literal sign flip)
scale                uploads scale * Delta_i (boosting / model replacement)
gaussian             uploads Gaussian noise of the same expected norm as scale * Delta_i
label_flip           trains on its own data with every label word k replaced by label
                     word (k + 1) mod K (decoder classification with single-token label words)
routing_inflation    uploads its honest Delta_i, but routing statistics claiming scale times the
                     tokens and counts, with every margin at its maximum (m_i(e) = 1): the
                     counts FedAlign-MoE and FedMoE weight experts by
=================== ===========================================================================

The upload attacks act on what the client sends after local training (before the server's
exclusion of non-finite updates and any defence); label_flip acts on its batches before
training.

Example:
  >>> attacker_ids(0, 10, 0.2).tolist() == attacker_ids(0, 10, 0.2).tolist()
  True
  >>> len(attacker_ids(0, 10, 0.3)), len(attacker_ids(0, 10, 0.0))
  (3, 0)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedalign.privacy import add_row_noise

PyTree = Any
ATTACK_KINDS = ("none", "sign_flip", "scale", "gaussian", "label_flip", "routing_inflation")
UPLOAD_ATTACKS = ("sign_flip", "scale", "gaussian", "routing_inflation")
_NOISE_SALT = 0x5A77  # folded into a client's rng for the gaussian attack's noise


def attacker_ids(seed: int, num_clients: int, fraction: float) -> np.ndarray:
  """Sorted ids of the attacking clients: round(fraction * N) of N, from ``seed`` only."""
  count = int(round(fraction * num_clients))
  rng = np.random.default_rng(np.random.SeedSequence([seed, 0xA77AC4]))
  return np.sort(rng.permutation(num_clients)[:count])


def check_fields(kind: Any, fraction: Any, scale: Any) -> None:
  """Raises ValueError naming the ``config.attack`` field and the accepted values.

  >>> check_fields('scale', 0.5, 10.0)
  Traceback (most recent call last):
  ...
  ValueError: config.attack.fraction=0.5 is invalid: expected a float in [0, 0.5).
  """

  def bad(field, value, expected):
    raise ValueError(f"config.attack.{field}={value!r} is invalid: expected {expected}.")

  num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
  if kind not in ATTACK_KINDS:
    bad("kind", kind, f"one of {ATTACK_KINDS}")
  if not num(fraction) or not 0 <= fraction < 0.5:
    bad("fraction", fraction, "a float in [0, 0.5)")
  if not num(scale) or scale <= 0:
    bad("scale", scale, "a float > 0")


@dataclasses.dataclass(frozen=True)
class Attack:
  """A run's attack: the kind, its parameter and the population's attacker mask.

  Attributes:
    kind: one of :data:`ATTACK_KINDS` (not 'none').
    scale: ``attack.scale``.
    attackers: (N,) bool over the client population.
    flip_table: label_flip only: (V,) int32 token map (identity except the label words).
  """

  kind: str
  scale: float
  attackers: np.ndarray
  flip_table: np.ndarray | None = None


def label_flip_table(vocab_size: int, label_ids: Sequence[int]) -> np.ndarray:
  """(V,) token map sending label word k to label word (k + 1) mod K, others to themselves.

  >>> label_flip_table(6, [2, 4, 5]).tolist()
  [0, 1, 4, 3, 5, 2]
  """
  table = np.arange(vocab_size, dtype=np.int32)
  ids = np.asarray(label_ids, np.int32)
  table[ids] = np.roll(ids, -1)
  return table


def from_config(
    config: ml_collections.ConfigDict,
    vocab_size: int | None = None,
    label_ids: Sequence[int] | None = None,
) -> Attack | None:
  """The run's :class:`Attack` (None without ``config.attack`` or for kind 'none' / fraction 0).

  ``vocab_size`` and ``label_ids`` (the single-token label words) are needed by label_flip.
  """
  a = config.get("attack")
  if a is None:
    return None
  check_fields(a.kind, a.fraction, a.scale)
  ids = attacker_ids(config.seed, config.data.num_clients, a.fraction)
  if a.kind == "none" or len(ids) == 0:
    return None
  mask = np.zeros(config.data.num_clients, bool)
  mask[ids] = True
  table = None
  if a.kind == "label_flip":
    if label_ids is None or vocab_size is None:
      raise ValueError(
          "config.attack.kind='label_flip' needs a classification task with single-token label "
          "words (the decoder on AG News); this run's task has none (multiple choice, Switch "
          "seq2seq, or a tokenizer that splits a label word)."
      )
    table = label_flip_table(vocab_size, label_ids)
  return Attack(a.kind, float(a.scale), mask, table)


def round_attackers(attack: Attack, client_ids: jax.Array) -> jax.Array:
  """(C,) bool: which of the round's clients attack."""
  return jnp.asarray(attack.attackers)[client_ids]


def flip_batches(
    attack: Attack, batches: Mapping[str, jax.Array], client_ids: jax.Array, lanes: bool
) -> dict[str, jax.Array]:
  """label_flip: the attackers' label words at their target positions mapped by the table."""
  if attack.kind != "label_flip":
    return dict(batches)
  rows = round_attackers(attack, client_ids)
  if lanes:  # (L, slots): the slot's client
    rows = rows[batches["lane_client"]]
  tokens = batches["tokens"]
  flip = rows.reshape(rows.shape + (1,) * (tokens.ndim - rows.ndim))
  flip = flip & batches["target_mask"].astype(bool)
  table = jnp.asarray(attack.flip_table)
  out = dict(batches)
  out["tokens"] = jnp.where(flip, table[tokens], tokens).astype(tokens.dtype)
  return out


def _rows(mask: jax.Array, x: jax.Array) -> jax.Array:
  return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


def poison_upload(
    attack: Attack,
    deltas: PyTree,
    stats: Mapping[str, Any],
    client_ids: jax.Array,
    rngs: jax.Array,
) -> tuple[PyTree, dict]:
  """The round's uploads with the attackers' rows replaced (:data:`UPLOAD_ATTACKS`)."""
  kind, s = attack.kind, attack.scale
  if kind not in UPLOAD_ATTACKS:
    return deltas, stats
  att = round_attackers(attack, client_ids)
  if kind == "routing_inflation":
    out = {}
    for path, st in stats.items():
      new = {k: v * s for k, v in st.items()}
      new["margin_sum"] = st["select_count"] * s  # every margin at its maximum, 1
      out[path] = {k: jnp.where(_rows(att, v), new[k], v) for k, v in st.items()}
    return deltas, out
  if kind in ("sign_flip", "scale"):
    factor = -s if kind == "sign_flip" else s
    poisoned = jax.tree.map(
        lambda x: None if x is None else x * factor, deltas, is_leaf=lambda x: x is None
    )
  else:  # gaussian: noise with the expected norm of scale * ||Delta_i||
    leaves = [x for x in jax.tree.leaves(deltas) if x is not None]
    sq = sum(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), 1) for x in leaves)
    size = sum(math.prod(x.shape[1:]) for x in leaves)
    std = s * jnp.sqrt(sq / max(size, 1))  # (C,)
    keys = jax.vmap(lambda k: jax.random.fold_in(k, _NOISE_SALT))(rngs)
    zeros = jax.tree.map(
        lambda x: None if x is None else jnp.zeros_like(x), deltas, is_leaf=lambda x: x is None
    )
    poisoned = add_row_noise(zeros, std, keys)
  deltas = jax.tree.map(
      lambda x, p: None if x is None else jnp.where(_rows(att, x), p, x),
      deltas,
      poisoned,
      is_leaf=lambda x: x is None,
  )
  return deltas, stats

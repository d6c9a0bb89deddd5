"""FedAlign-MoE: routing-consistency router merge and semantic-aware expert aggregation.

Implements fedalign-moe.md sections 3.2 (client regularizer) and 4.1-4.5 (server). See
docs/method.md for the formulas, which parts are [paper] and which are [ours], and the config
options that switch between them.

Client side::

    loss = task_loss + ... + config.lambda_reg * gating_regularizer(batch_stats, **broadcast)

where ``broadcast = broadcast(state)`` is sent with the global model each round.

Server side::

    agg = fedalign_aggregator(FedAlignConfig())
    state = agg.init(params)
    new_params, state, diagnostics = jax.jit(agg.aggregate)(state, params, deltas, stats, n)

Shapes: C clients (leading axis of deltas, stats and weights), E routed experts, D model width.
Everything is a pure function of arrays, jittable, with static Python loops over MoE blocks only.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fedalign.aggregation import moe_blocks as mb
from fedalign.aggregation.base import Aggregator
from fedalign.aggregation.moe_blocks import HIGHEST, client_sum, expert_sum, normalize
from fedalign.aggregation.permutation import (
    expert_similarity,
    linear_sum_assignment,
    permute_moe_block,
    permute_routing_stats,
)
from fedalign.algorithms.base import Algorithm, server_optimizer_from_config
from fedalign.algorithms.fedavg import fedavg_deltas
from fedalign.metrics.routing_metrics import expert_role_preservation, routing_divergence
from fedalign.models.routing import finalize_stats, safe_div
from fedalign.models.tree import get_path

PyTree = Any

_EPS = 1e-12

ROUTER_WEIGHTINGS = ("consistency", "uniform", "overlap", "margin")
SEMANTIC_SIMILARITIES = ("gate", "centroid_cosine")
ALIGNMENT_SIMILARITIES = ("centroid", "weight")
REGULARIZER_FORMS = ("marginal", "conditional")
ROUTER_OVERLAPS = ("per_expert", "bhattacharyya")


# ============================================================================================
# Configuration.
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class FedAlignConfig:
  """Options of FedAlign-MoE (defaults = the paper-faithful configuration of the spec).

  Attributes:
    lambda_reg: weight of the gating regularizer in the client loss (3.2) [paper: 0.1]. Read
      by the federated engine, not by the aggregator.
    beta: threshold tau_e = M(e) - beta * Sigma(e) (4.3) [ours: 1.0].
    semantic_similarity: 'gate' (region-conditioned gate gamma, default) or 'centroid_cosine'
      ((1 + cos(mu_i, mu_j)) / 2) (4.2) [ours].
    pairwise: True = O(N^2) pairwise S_i(e) (4.2); False = O(N) variant against the
      count-weighted consensus (4.4) [ours].
    pairwise_chunk_size: pairwise with the 'gate' similarity only: the pairwise variant goes
      expert by expert, and the router logits of one expert take (C, C, E) memory (6.4e7
      floats at 1000 clients x 64 experts); with a chunk size, gamma[i, j, e] is computed for
      chunks of this many clients i at a time under :func:`jax.lax.map`, (chunk, C, E). Same
      result up to float rounding; 0 or None = all clients at once [ours, memory].
    weight_by_n: multiply s_i(e) by n_i (4.1) [ours, off].
    router_weighting: 'consistency' (s = o * m) [paper], 'uniform' (FedAvg router, n_i),
      'overlap' (s = o), 'margin' (s = m) (ablations).
    adaptive_alpha: alpha(e) = exp(-CV(e)) (3.2) [paper: adaptive; ours: form]; False = 1.
    semantic_selection: selective expert aggregation (4.2-4.3); False = experts FedAvg by n_i.
    permutation_alignment: align client experts to the global indices first (4.5) [ours].
    centroid_clip: clip each mu_i(e) to this L2 norm [ours]; 0 or None = off. Server-side
      post-processing of the centroids it already received: NOT a privacy protection and not
      accounted (kept for existing configs and the golden aggregates). Privacy is
      ``config.dp`` (:mod:`fedalign.privacy`: clipping and noise on the client side,
      accounted; docs/privacy.md).
    centroid_noise_std: std of Gaussian noise the server adds to each received mu_i(e) (after
      clipping) [ours]; like ``centroid_clip``, a perturbation of the aggregation, not privacy.
    server_optimizer: optax transformation applied to the aggregated delta (used as the
      negated gradient); None = plain averaging (= SGD with lr 1).
    selection_min_cv: a floor on the semantic selection (4.3) [ours]: an expert whose scores
      S_i(e) over P(e) have a coefficient of variation Sigma(e) / M(e) below this excludes no
      client (A(e) = P(e); the weights stay c S normalised over A), so that consistent
      clients are not cut by tau_e's fixed share. 0 = the paper's rule at every expert.
    selection_tol: numerical slack of A(e) = {S_i(e) >= tau_e - selection_tol}, so that equal
      scores are never split by float rounding [ours, numerical].
    identity_bonus: added to the diagonal of the permutation-alignment similarity so that
      exact ties keep the client's own index (4.5) [ours, numerical].
    alignment_similarity: what permutation alignment matches experts by (4.5) [ours]:
      'centroid' (default; function space: cosine of the client's routed-token centroid
      mu_i(e') and the global expert's centroid of the previous round, falling back to the
      weight-space score for every pair where the client expert got no token this round or the
      global expert has no centroid yet, so that alignment does not depend on how a client
      labels its unused experts) or 'weight' (cosine of the flattened expert weights and router
      column, always).
    alignment_margin: a client's experts are permuted only when the best assignment's mean
      similarity per expert beats the identity's by more than this; 0 = always take the best
      assignment (4.5) [ours]. Guards against spurious swaps from drifted routing.
    regularizer_form: 'marginal' (3.2: KL of the batch routing marginal q to p_g, over the
      selected experts) [paper: what; ours: form] or 'conditional' (distillation of the
      round's global router's decisions on the client's own router inputs: mean over tokens
      of sum_e alpha(e) gG_e(x) log(gG_e(x) / gL_e(x))) [ours]. The conditional form needs a
      model that returns ``aux['router_inputs']`` (the decoder families and Switch do).
    router_overlap: 'per_expert' (4.1: o_i(e) = sqrt(p_i(e) p_g(e)), where p_g(e) cancels in
      the normalisation over clients) or 'bhattacharyya' (o_i = sum_e' sqrt(p_i(e') p_g(e'))
      per client, s_i(e) = o_i sqrt(p_i(e)) m_i(e)) [ours].
    seed: seed of the aggregator's rng (centroid noise).
    detailed_diagnostics: also return per-block arrays 'omega' (C, E), 'S' (C, E), 'tau'
      (E,), 'A' (C, E) 0/1 and 'w' (C, E) (the expert weights) in the diagnostics.
  """

  lambda_reg: float = 0.1
  beta: float = 1.0
  semantic_similarity: str = "gate"
  pairwise: bool = True
  pairwise_chunk_size: int | None = None
  weight_by_n: bool = False
  router_weighting: str = "consistency"
  adaptive_alpha: bool = True
  semantic_selection: bool = True
  permutation_alignment: bool = False
  centroid_clip: float | None = None
  centroid_noise_std: float = 0.0
  server_optimizer: optax.GradientTransformation | None = None
  selection_min_cv: float = 0.0
  selection_tol: float = 1e-6
  identity_bonus: float = 1e-6
  alignment_similarity: str = "centroid"
  alignment_margin: float = 0.0
  regularizer_form: str = "marginal"
  router_overlap: str = "per_expert"
  seed: int = 0
  detailed_diagnostics: bool = False

  def __post_init__(self):
    # 0 means 'off' for these two (the ml_collections configs cannot hold None and a float).
    if self.centroid_clip == 0:
      object.__setattr__(self, "centroid_clip", None)
    if self.pairwise_chunk_size == 0:
      object.__setattr__(self, "pairwise_chunk_size", None)

    def bad(field, expected):
      raise ValueError(
          f"config.fedalign.{field}={getattr(self, field)!r} is invalid: expected {expected}."
      )

    if self.router_weighting not in ROUTER_WEIGHTINGS:
      bad("router_weighting", f"one of {ROUTER_WEIGHTINGS}")
    if self.semantic_similarity not in SEMANTIC_SIMILARITIES:
      bad("semantic_similarity", f"one of {SEMANTIC_SIMILARITIES}")
    if self.alignment_similarity not in ALIGNMENT_SIMILARITIES:
      bad("alignment_similarity", f"one of {ALIGNMENT_SIMILARITIES}")
    if self.regularizer_form not in REGULARIZER_FORMS:
      bad("regularizer_form", f"one of {REGULARIZER_FORMS}")
    if self.router_overlap not in ROUTER_OVERLAPS:
      bad("router_overlap", f"one of {ROUTER_OVERLAPS}")
    for field in (
        "lambda_reg",
        "beta",
        "selection_tol",
        "identity_bonus",
        "centroid_noise_std",
        "alignment_margin",
        "selection_min_cv",
    ):
      if not getattr(self, field) >= 0:
        bad(field, "a float >= 0")
    if self.centroid_clip is not None and not self.centroid_clip > 0:
      bad("centroid_clip", "a float > 0, or 0 / None for no clipping")
    if self.pairwise_chunk_size is not None and not (
        isinstance(self.pairwise_chunk_size, int) and self.pairwise_chunk_size >= 1
    ):
      bad("pairwise_chunk_size", "a positive int, or 0 / None for all clients at once")


_IGNORED_CONFIG_KEYS = ("name",)


def as_fedalign_config(config: Any = None) -> FedAlignConfig:
  """FedAlignConfig from None (defaults), a FedAlignConfig, a ConfigDict or a mapping.

  Unknown keys raise ValueError (typos must not silently fall back to defaults); a key
  ``name`` (the aggregator's name in an experiment config) is ignored.

  >>> as_fedalign_config({'beta': 2.0}).beta
  2.0
  """
  if config is None:
    return FedAlignConfig()
  if isinstance(config, FedAlignConfig):
    return config
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
    items = {k: config[k] for k in config.keys()}
  elif isinstance(config, Mapping):
    items = dict(config)
  else:
    raise TypeError(f"config must be a FedAlignConfig, ConfigDict or mapping, got {type(config)}")
  fields = {f.name for f in dataclasses.fields(FedAlignConfig)}
  unknown = sorted(k for k in items if k not in fields and k not in _IGNORED_CONFIG_KEYS)
  if unknown:
    raise ValueError(f"unknown FedAlign config keys {unknown}; valid keys: {sorted(fields)}")
  return FedAlignConfig(**{k: v for k, v in items.items() if k in fields})


# ============================================================================================
# Client side: gating-distribution regularizer (3.2).
# ============================================================================================


def gating_regularizer(
    batch_stats: Mapping[str, Mapping[str, jax.Array]],
    p_g: Mapping[str, jax.Array],
    alpha: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
  """sum_l R_l, R_l = sum_e M_l(e) alpha_l(e) q_l(e) log(q_l(e) / p_g,l(e))  (spec 3.2).

  q_l = prob_sum / token_count of the batch (differentiable through ``prob_sum``),
  M_l(e) = [select_count(e) > 0] (no gradient). Terms with q = 0, and blocks whose batch has no
  valid token, contribute 0 (no NaN, finite gradients). Leading axes of the statistics (e.g.
  micro-batches) are summed over. p_g and alpha carry no gradient.

  Args:
    batch_stats: {block_path: routing stats of the current batch} (``aux['routing']``).
    p_g: {block_path: (E,)} broadcast global routing distribution.
    alpha: {block_path: (E,)} broadcast expert weights; None = 1.

  Returns:
    Scalar float32. Note: the sum is restricted to experts the batch selected, so it is a
    KL divergence (>= 0) only when every expert was selected.

  >>> from fedalign.models.routing import routing_stats
  >>> probs = jnp.array([[0.5, 0.5], [0.9, 0.1]])
  >>> s = {'moe': routing_stats(probs, jnp.array([[0, 1], [0, 1]]), jnp.ones((2, 3)))}
  >>> round(float(gating_regularizer(s, {'moe': jnp.array([0.7, 0.3])})), 6)  # q = p_g
  0.0
  """
  total = jnp.zeros((), jnp.float32)
  for path, pg in p_g.items():
    if path not in batch_stats:
      raise ValueError(
          f"gating_regularizer: no routing stats for MoE block {path!r}; "
          f"got blocks {sorted(batch_stats)}"
      )
    s = batch_stats[path]
    for field in ("token_count", "prob_sum", "select_count"):
      if field not in s:
        raise ValueError(f"gating_regularizer: stats of block {path!r} lack {field!r}")
    prob_sum = jnp.asarray(s["prob_sum"], jnp.float32)
    num_experts = prob_sum.shape[-1]
    pg = jax.lax.stop_gradient(jnp.asarray(pg, jnp.float32))
    if pg.shape != (num_experts,):
      raise ValueError(
          f"gating_regularizer: p_g of block {path!r} has shape {pg.shape}, "
          f"expected ({num_experts},)"
      )
    a = (
        jnp.ones((num_experts,), jnp.float32)
        if alpha is None
        else jax.lax.stop_gradient(jnp.asarray(alpha[path], jnp.float32))
    )
    count = jnp.asarray(s["token_count"], jnp.float32)[..., None]
    has_tokens = count > 0
    q = jnp.where(has_tokens, prob_sum / jnp.where(has_tokens, count, 1.0), 0.0)
    mask = jax.lax.stop_gradient((jnp.asarray(s["select_count"]) > 0).astype(jnp.float32))
    pos = q > 0
    q_safe = jnp.where(pos, q, 1.0)
    log_ratio = jnp.log(q_safe) - jnp.log(jnp.maximum(pg, _EPS))
    term = jnp.where(pos, q * log_ratio, 0.0)
    total = total + jnp.sum(mask * a * term)
  return total


def conditional_regularizer(
    params: PyTree,
    global_params: PyTree,
    router_inputs: Mapping[str, Mapping[str, jax.Array]],
    alpha: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
  """sum_l mean_x sum_e alpha_l(e) gG_e(x) log(gG_e(x) / gL_e(x))  (spec 3.2, conditional).

  gG = softmax(x W_G + b_G) is the round's global router, gL the client's current router, both
  applied to the client's own router inputs x (no gradient through x, gG or alpha): the local
  router is distilled toward the global router's decisions on the client's tokens.

  Args:
    params, global_params: the client's current and the round's starting (trainable) params;
      each block's ``router/kernel`` (and ``bias``) must be trainable.
    router_inputs: {block_path: {'x': (..., D), 'mask': (...)}} (``aux['router_inputs']``).
    alpha: {block_path: (E,)} expert weights; None = 1 (also decides which blocks count).

  >>> x = {'moe': {'x': jnp.ones((3, 2)), 'mask': jnp.ones(3)}}
  >>> p = {'moe': {'router': {'kernel': jnp.ones((2, 4))}}}
  >>> float(conditional_regularizer(p, p, x))  # same router: no divergence
  0.0
  """
  paths = list(alpha) if alpha is not None else list(router_inputs)
  total = jnp.zeros((), jnp.float32)
  for path in paths:
    if path not in router_inputs:
      raise ValueError(
          f"regularizer_form='conditional': no router inputs for MoE block {path!r} (the "
          f"model returns them for {sorted(router_inputs)}); use regularizer_form='marginal'."
      )

    def router(tree, which):
      node = get_path(tree, path)["router"]
      if node.get("kernel") is None:
        raise ValueError(
            f"regularizer_form='conditional' needs the router of {path!r} to be trainable "
            f"({which} params have none)."
        )
      return node

    x = jax.lax.stop_gradient(jnp.asarray(router_inputs[path]["x"], jnp.float32))
    x = x.reshape(-1, x.shape[-1])
    m = jnp.asarray(router_inputs[path]["mask"], jnp.float32).reshape(-1)

    def log_probs(node):
      logits = x @ node["kernel"].astype(jnp.float32)
      if node.get("bias") is not None:
        logits = logits + node["bias"].astype(jnp.float32)
      return jax.nn.log_softmax(logits, axis=-1)

    log_g = jax.lax.stop_gradient(log_probs(router(global_params, "global")))
    log_l = log_probs(router(params, "client"))
    a = 1.0 if alpha is None else jax.lax.stop_gradient(jnp.asarray(alpha[path], jnp.float32))
    per_token = jnp.sum(a * jnp.exp(log_g) * (log_g - log_l), axis=-1)
    total = total + safe_div(jnp.sum(per_token * m), jnp.sum(m))
  return total


def _masked_stats(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(mean, min, max) of x over mask; zeros when the mask is empty."""
  n = jnp.sum(mask)
  mean = jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(n, 1)
  lo = jnp.min(jnp.where(mask, x, jnp.inf))
  hi = jnp.max(jnp.where(mask, x, -jnp.inf))
  return (mean, jnp.where(n > 0, lo, 0.0), jnp.where(n > 0, hi, 0.0))


# ============================================================================================
# Server side: the FedAlign-MoE aggregator.
# ============================================================================================


def cosine_last(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine along the last axis (broadcasting), 0 where either vector is 0, clipped to [-1, 1]."""
  num = jnp.sum(a * b, axis=-1)
  den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return jnp.clip(safe_div(num, den), -1.0, 1.0)


def _expert_axes(x: jax.Array) -> tuple[int, ...]:
  """The axes of one expert's parameters in a (C, E, ...) leaf."""
  return tuple(range(2, x.ndim))


def _expert_dots(x: jax.Array, y: jax.Array) -> jax.Array:
  """<x[c, e], y[e]> for a (C, E, ...) leaf and y (E, ...), (C, E): one fused multiply-reduce.

  Written as a reduction from -0.0 (the exact additive identity) with a Python ``+``, which JAX
  hands to XLA as is, rather than ``jnp.sum``: XLA:CPU (jax 0.10) shares ``jnp.sum``'s 0.0
  with the program's other 0.0 constants, and then, from a few hundred clients x 64 experts
  on, runs the reduction about 8x slower (its initial value becomes a runtime operand); a
  -0.0 of its own keeps it a compile-time constant (benchmarks/aggregation_breakdown.py). An
  einsum would transpose x (the expert axis is a batch axis of both operands, not x's first).
  """
  return jax.lax.reduce(x * y[None], jnp.array(-0.0, x.dtype), lambda a, b: a + b, _expert_axes(x))


def _sq_norms(x: jax.Array) -> jax.Array:
  """|x[c, e]|^2 of a (C, E, ...) leaf, (C, E): a batched dot (one pass, no temporary)."""
  flat = x.reshape(x.shape[:2] + (-1,))
  return jnp.einsum("cep,cep->ce", flat, flat, precision=HIGHEST)


def _expert_rows(x: jax.Array, e: jax.Array) -> jax.Array:
  """Expert ``e``'s (C, P) rows of a (C, E, ...) leaf (a copy of one expert's slice)."""
  return jax.lax.dynamic_index_in_dim(x, e, axis=1, keepdims=False).reshape(x.shape[0], -1)


GRAM_BLOCK_ROWS = 256  # target rows per block of the symmetric Gram matrices (pairwise variant)


def gram_row_edges(num_clients: int) -> list[int]:
  """Edges of the client blocks of the pairwise Gram matrices: round(C / GRAM_BLOCK_ROWS)
  (at least 1) nearly equal blocks. Only the blocks on and above the diagonal are computed.

  >>> gram_row_edges(100), gram_row_edges(1000)
  ([0, 100], [0, 250, 500, 750, 1000])
  """
  nb = max(1, round(num_clients / GRAM_BLOCK_ROWS))
  return [round(b * num_clients / nb) for b in range(nb + 1)]


def _gram(rows: list[jax.Array]) -> jax.Array:
  """sum_l rows[l] rows[l]^T, (C, C), for (C, P_l) rows: one matmul per leaf and block.

  The Gram matrix is symmetric: of the nb x nb client blocks (:func:`gram_row_edges`) only the
  nb (nb + 1) / 2 on and above the diagonal are multiplied (62.5% of the FLOPs at 1000
  clients); up to ~380 clients it is one (C, P) x (P, C) matmul per leaf.
  """
  edges = gram_row_edges(rows[0].shape[0])
  nb = len(edges) - 1
  if nb == 1:
    return sum(jnp.einsum("ip,jp->ij", r, r, precision=HIGHEST) for r in rows)
  part = lambda r, a: r[edges[a] : edges[a + 1]]
  blocks = {
      (a, b): sum(jnp.einsum("ip,jp->ij", part(r, a), part(r, b), precision=HIGHEST) for r in rows)
      for a in range(nb)
      for b in range(a, nb)
  }
  return jnp.concatenate(
      [
          jnp.concatenate([blocks[a, b] if a <= b else blocks[b, a].T for b in range(nb)], 1)
          for a in range(nb)
      ],
      0,
  )


def _expert_gram_cosine(leaves: list[jax.Array], e: jax.Array, part: jax.Array | None):
  """D_ij(e) for one expert e, (C, C): the Gram matrix of the clients' updates of expert e
  (:func:`_gram` of its (C, P) rows, leaf by leaf, never concatenated) divided by the norms
  (its diagonal). Rows/columns of clients outside ``part`` are 0 whatever their deltas hold."""
  gram = _gram([_expert_rows(x, e) for x in leaves])
  norm = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  if part is not None:
    gram = jnp.where(part[:, None] & part[None, :], gram, 0.0)
    norm = jnp.where(part, norm, 0.0)
  return jnp.clip(safe_div(gram, norm[:, None] * norm[None, :]), -1.0, 1.0)


def _experts_map(fn, num_experts: int) -> jax.Array:
  """[fn(e) for e in range(E)] stacked on a leading axis, one expert at a time (lax.map)."""
  return jax.lax.map(fn, jnp.arange(num_experts))


def pairwise_expert_cosine(leaves: list[jax.Array]) -> jax.Array:
  """D_ij(e): cosine of client i's and client j's update of expert e, (C, C, E).

  The update of an expert is all its trained leaves (each (C, E, ...)). Computed expert by
  expert: one (C, P_leaf) x (P_leaf, C) Gram matmul per leaf, accumulated over the leaves
  (never concatenated); the norms are the Gram diagonal. 0 for zero vectors.

  >>> x = jnp.array([[[1.0, 0.0]], [[1.0, 1.0]]])  # 2 clients, 1 expert, 2 parameters
  >>> round(float(pairwise_expert_cosine([x[..., :1], x[..., 1:]])[0, 1, 0]), 4)
  0.7071
  """
  num_experts = leaves[0].shape[1]
  per_expert = _experts_map(lambda e: _expert_gram_cosine(leaves, e, None), num_experts)
  return jnp.transpose(per_expert, (1, 2, 0))


def consensus_expert_cosine(
    leaves: list[jax.Array], v: jax.Array, part: jax.Array | None = None
) -> jax.Array:
  """cos(Delta_i(e), sum_j v_j(e) Delta_j(e)) for every client and expert, (C, E), leaf by leaf.

  Three passes over the deltas, none of which copies them: the consensus (one
  :func:`expert_sum` scan over clients for all leaves), the clients' squared norms (a batched
  dot) and their dot products with the consensus (a fused multiply-reduce). With ``part``
  ((C,) bool; ``v`` must be 0 outside it), the rows of other clients may hold anything (NaN):
  they get cosine 0.

  >>> x = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # 2 clients, 1 expert
  >>> consensus_expert_cosine([x], jnp.array([[1.0], [0.0]]))[:, 0].tolist()
  [1.0, 0.0]
  """
  x_bars = expert_sum(v, list(leaves), part)  # [(E, ...)]
  dot = sum(_expert_dots(x, xb) for x, xb in zip(leaves, x_bars))
  sq_i = sum(_sq_norms(x) for x in leaves)
  sq_bar = sum(jnp.sum(jnp.square(xb), axis=tuple(range(1, xb.ndim))) for xb in x_bars)
  if part is not None:
    dot = jnp.where(part[:, None], dot, 0.0)
    sq_i = jnp.where(part[:, None], sq_i, 0.0)
  return jnp.clip(safe_div(dot, jnp.sqrt(sq_i) * jnp.sqrt(sq_bar)[None]), -1.0, 1.0)


def diag_gate(mu: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """gamma[..., e] = softmax(mu[..., e, :] @ kernel + bias)_e.

  mu (..., E, D), kernel (..., D, E), bias (..., E) broadcast against each other's leading axes.
  """
  logits = jnp.einsum("...ed,...df->...ef", mu, kernel, precision=HIGHEST) + bias[..., None, :]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.exp(jnp.diagonal(logp, axis1=-2, axis2=-1))


def _gate_operands(kernels: jax.Array, biases: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Every client's router as one (D, C * E) matrix and a (C * E,) bias (done once)."""
  num_clients, dim, num_experts = kernels.shape
  k_all = jnp.transpose(kernels, (1, 0, 2)).reshape(dim, num_clients * num_experts)
  return k_all, biases.reshape(num_clients * num_experts)


def _expert_gate(
    mu: jax.Array, k_all: jax.Array, b_all: jax.Array, e: jax.Array, chunk_size: int | None
) -> jax.Array:
  """gamma[i, j] = softmax(W_j^T mu_i(e) + b_j)_e for one expert e, (C, C).

  The logits of all clients i against all routers j are one (C, D) x (D, C * E) matmul; with
  ``chunk_size`` the clients i go through lax.map that many at a time, which bounds the
  logits at (chunk_size, C, E) instead of (C, C, E).
  """
  mu_e = jax.lax.dynamic_index_in_dim(mu, e, axis=1, keepdims=False)  # (C, D)
  num_clients, num_experts = mu.shape[0], mu.shape[1]

  def rows(m):  # (k, D) -> (k, C)
    logits = jnp.dot(m, k_all, precision=HIGHEST) + b_all[None]
    logits = logits.reshape(m.shape[0], num_clients, num_experts)
    own = jax.lax.dynamic_index_in_dim(logits, e, axis=2, keepdims=False)
    # softmax_e = 1 / sum_f exp(l_f - l_e): one reduction, no max pass (the sum is >= 1; an
    # overflowing exp gives inf, i.e. gamma 0, below float32's range anyway); from -0.0 for
    # the reason given in _expert_dots
    terms = jnp.exp(logits - own[..., None])
    return 1.0 / jax.lax.reduce(terms, jnp.array(-0.0, terms.dtype), lambda a, b: a + b, (2,))

  if chunk_size is None or chunk_size >= num_clients:
    return rows(mu_e)
  pad = (-num_clients) % chunk_size
  chunks = jnp.pad(mu_e, ((0, pad), (0, 0))).reshape(-1, chunk_size, mu_e.shape[-1])
  return jax.lax.map(rows, chunks).reshape(num_clients + pad, num_clients)[:num_clients]


def pairwise_gate(
    mu: jax.Array, kernels: jax.Array, biases: jax.Array, chunk_size: int | None = None
) -> jax.Array:
  """gamma[i, j, e] = softmax(W_j^T mu_i(e) + b_j)_e for every pair of clients: (C, C, E).

  mu (C, E, D), kernels (C, D, E), biases (C, E). The softmax needs every expert's logit;
  computed expert by expert, the logits take (C, C, E) memory at a time, or
  (chunk_size, C, E) with ``chunk_size`` (clients i in chunks of that many, the last one
  zero-padded).

  >>> mu = jnp.ones((3, 2, 4)); k = jnp.zeros((3, 4, 2)); b = jnp.zeros((3, 2))
  >>> pairwise_gate(mu, k, b, chunk_size=2).shape, float(pairwise_gate(mu, k, b)[0, 1, 0])
  ((3, 3, 2), 0.5)
  """
  k_all, b_all = _gate_operands(kernels, biases)
  per_expert = _experts_map(lambda e: _expert_gate(mu, k_all, b_all, e, chunk_size), mu.shape[1])
  return jnp.transpose(per_expert, (1, 2, 0))


def _pairwise_consistency(
    cfg: FedAlignConfig,
    leaves: list[jax.Array],
    part: jax.Array,
    c: jax.Array,
    mu: jax.Array,
    kernels: jax.Array | None,
    biases: jax.Array | None,
) -> jax.Array:
  """num[i, e] = sum_{j != i} c_j(e) C_ij(e) with C_ij(e) = gbar_ij(e) (1 + D_ij(e)) / 2 (4.2).

  Expert by expert (lax.map over e), so that no (C, C, E) array exists: per expert, the Gram
  matmuls of the deltas (:func:`_expert_gram_cosine`), the gate of every client's centroid
  under every client's router (:func:`_expert_gate`) or the centroid cosines, and the
  weighted row sums. ``leaves`` are the raw deltas (rows outside ``part`` may be NaN).
  """
  num_clients, num_experts = c.shape
  off = 1.0 - jnp.eye(num_clients, dtype=jnp.float32)
  if cfg.semantic_similarity == "gate":
    k_all, b_all = _gate_operands(kernels, biases)
  else:
    unit = mu / jnp.maximum(jnp.linalg.norm(mu, axis=-1, keepdims=True), _EPS)

  def one(e):
    if cfg.semantic_similarity == "gate":
      gamma = _expert_gate(mu, k_all, b_all, e, cfg.pairwise_chunk_size)
      gbar = (gamma + gamma.T) / 2
    else:
      u = jax.lax.dynamic_index_in_dim(unit, e, axis=1, keepdims=False)
      gbar = (1.0 + jnp.clip(jnp.einsum("id,jd->ij", u, u, precision=HIGHEST), -1.0, 1.0)) / 2
    dcos = _expert_gram_cosine(leaves, e, part)
    c_e = jax.lax.dynamic_index_in_dim(c, e, axis=1, keepdims=False)
    return jnp.einsum("ij,j->i", gbar * (1.0 + dcos) / 2 * off, c_e, precision=HIGHEST)

  return _experts_map(one, num_experts).T  # (C, E)


def _privatize(mu: jax.Array, cfg: FedAlignConfig, key: jax.Array) -> jax.Array:
  """Clip each mu_i(e) to cfg.centroid_clip and add N(0, centroid_noise_std^2) noise."""
  if cfg.centroid_clip is not None:
    norm = jnp.linalg.norm(mu, axis=-1, keepdims=True)
    mu = mu * jnp.minimum(1.0, cfg.centroid_clip / jnp.maximum(norm, _EPS))
  if cfg.centroid_noise_std > 0:
    mu = mu + cfg.centroid_noise_std * jax.random.normal(key, mu.shape, mu.dtype)
  return mu


def _align_block(
    cfg: FedAlignConfig,
    blk: mb.MoEBlock,
    prep: mb.Prepared,
    flat_d: dict,
    raw: dict,
    mu: jax.Array,
    prev_centroids: jax.Array,
    has_centroids: jax.Array,
):
  """Permutation alignment of one block (4.5). Returns (new flat_d entries, raw, mu, diag)."""
  flat_p, part = prep.flat_params, prep.part
  kernel_d = flat_d[blk.kernel_key]
  bias_d = None if blk.bias_key is None else flat_d[blk.bias_key]
  frozen = [k for k in blk.expert_keys if flat_d[k] is None]
  if kernel_d is None or (blk.bias_key is not None and bias_d is None) or frozen:
    warnings.warn(
        f"permutation_alignment: MoE block {blk.path!r} has a frozen router or "
        "frozen expert leaves (e.g. LoRA base weights), whose expert order the "
        "client cannot have changed; the block is not permuted."
    )
    return {}, raw, mu, {}
  e = blk.num_experts

  def core(router_kernel, router_bias, experts):
    router = {"kernel": router_kernel}
    if router_bias is not None:
      router["bias"] = router_bias
    return {"router": router, "experts": experts}

  g_core = core(
      flat_p[blk.kernel_key],
      None if blk.bias_key is None else flat_p[blk.bias_key],
      {mb.path_str(k): flat_p[k] for k in blk.expert_keys},
  )
  g_core = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g_core)
  d_core = core(kernel_d, bias_d, {mb.path_str(k): flat_d[k] for k in blk.expert_keys})
  c_core = jax.tree.map(lambda g, d: g[None] + d, g_core, d_core)  # client params (C, ...)

  # score[i, g, j]: similarity of global expert g and client i's expert j.
  score = jax.vmap(lambda cc: expert_similarity(g_core, cc, kind="weight_cosine"))(c_core)
  diag = {}
  if cfg.alignment_similarity == "centroid":
    cent_score = jax.vmap(lambda m: expert_similarity(prev_centroids, m, kind="centroid_cosine"))(
        mu
    )
    # Function space only where both sides have a centroid: the client expert got tokens this
    # round and the global expert has one. A client's unused experts are matched in weight
    # space, so relabelling a client's experts permutes its columns and nothing else.
    use = has_centroids[None, :, None] & (raw["select_count"] > 0)[:, None, :]
    score = jnp.where(use, cent_score, score)
    used = jnp.mean(use.astype(jnp.float32), axis=(1, 2))
    diag["perm_centroid_frac"] = safe_div(jnp.sum(jnp.where(part, used, 0.0)), jnp.sum(part))
  _, perm = linear_sum_assignment(
      score + cfg.identity_bonus * jnp.eye(e, dtype=score.dtype), maximize=True
  )  # (C, E)
  ident = jnp.broadcast_to(jnp.arange(e, dtype=perm.dtype), perm.shape)
  # Mean similarity gained per expert over keeping the client's own labels.
  best = jnp.mean(jnp.take_along_axis(score, perm[:, :, None], axis=2)[..., 0], axis=1)
  gain = best - jnp.mean(jnp.diagonal(score, axis1=1, axis2=2), axis=1)
  perm = jnp.where((part & (gain > cfg.alignment_margin))[:, None], perm, ident)

  # delta' = permuted(theta_g + delta) - theta_g = permuted(delta) + (permuted(theta_g) - theta_g),
  # written so that an identity permutation returns delta bit for bit.
  d_perm = jax.vmap(permute_moe_block)(d_core, perm)
  g_perm = jax.vmap(permute_moe_block, in_axes=(None, 0))(g_core, perm)
  new_core = jax.tree.map(lambda dp, gp, g: dp + (gp - g[None]), d_perm, g_perm, g_core)
  new_d = {blk.kernel_key: new_core["router"]["kernel"]}
  if blk.bias_key is not None:
    new_d[blk.bias_key] = new_core["router"]["bias"]
  for k in blk.expert_keys:
    new_d[k] = new_core["experts"][mb.path_str(k)]
  raw = jax.vmap(permute_routing_stats)(raw, perm)
  mu = jnp.take_along_axis(mu, perm[:, :, None], axis=1)
  moved = jnp.mean((perm != ident).astype(jnp.float32), axis=1)
  diag["perm_moved_frac"] = safe_div(jnp.sum(jnp.where(part, moved, 0.0)), jnp.sum(part))
  return new_d, raw, mu, diag


def _block_update(
    cfg: FedAlignConfig,
    blk: mb.MoEBlock,
    prep: mb.Prepared,
    flat_d: dict,
    deltas: dict,
    raw: dict,
    mu: jax.Array,
    p_g: jax.Array,
    alpha: jax.Array,
    centroids: jax.Array,
    has_centroids: jax.Array,
):
  """4.1-4.3 for one MoE block.

  ``flat_d``: the masked deltas (router leaves are read from it, small); ``deltas``: the same
  keys as sent (:attr:`mb.Prepared.raw_deltas`, rows of non-participants possibly NaN), from
  which the expert leaves are read with the participation mask, so that they are never copied.

  Returns (agg updates, keep masks, p_g, alpha, centroids, has_centroids, diag).
  """
  flat_p, part, w_eff, nw = prep.flat_params, prep.part, prep.weights, prep.nw
  partf = part.astype(jnp.float32)
  fin = finalize_stats(raw)
  p = jnp.where(part[:, None], fin["p"], 0.0)  # (C, E)
  c = fin["c"] * partf[:, None]
  m = fin["m"] * partf[:, None]
  agg, keep = {}, {}

  # ---- 4.1 routing-consistency weights omega and router merge ------------------------------
  if cfg.router_weighting == "uniform":
    omega = jnp.broadcast_to(nw[:, None], p.shape)
  else:
    if cfg.router_overlap == "bhattacharyya":  # one overlap per client, times its own usage
      o = jnp.sum(jnp.sqrt(p * p_g[None, :]), axis=1, keepdims=True) * jnp.sqrt(p)
    else:
      o = jnp.sqrt(p * p_g[None, :])
    s = {"consistency": o * m, "overlap": o, "margin": m}[cfg.router_weighting]
    s = s * partf[:, None]
    if cfg.weight_by_n:
      s = s * w_eff[:, None]
    omega = normalize(s, axis=0, fallback=nw[:, None])
  kernel_d = flat_d[blk.kernel_key]
  bias_d = None if blk.bias_key is None else flat_d[blk.bias_key]
  if kernel_d is not None:
    # sum_c omega[c, e] Delta_c[:, e] as a scan over clients of (E, D) slices: an einsum with
    # e as batch axis would transpose the (C, D, E) deltas with the client axis last (slow)
    agg[blk.kernel_key] = expert_sum(omega, jnp.swapaxes(deltas[blk.kernel_key], 1, 2), part).T
  if bias_d is not None:
    agg[blk.bias_key] = expert_sum(omega, bias_d, part)
  new_pg = normalize(jnp.sum(omega * p, axis=0), fallback=p_g)

  # ---- alpha(e) = exp(-CV(e)) of p_i(e) over the participating clients ----------------------
  n_part = jnp.sum(partf)
  if cfg.adaptive_alpha:
    mean_p = jnp.sum(p, axis=0) / jnp.maximum(n_part, 1.0)
    var_p = jnp.sum(partf[:, None] * (p - mean_p) ** 2, axis=0) / jnp.maximum(n_part, 1.0)
    cv = jnp.sqrt(var_p) / (mean_p + 1e-8)
    new_alpha = jnp.where(n_part > 0, jnp.exp(-cv), alpha)
  else:
    new_alpha = jnp.ones_like(alpha)

  # ---- global centroids (pooled, gate-weighted) for the next round's alignment ------------
  gs = raw["gate_sum"] * partf[:, None]
  gs_tot = jnp.sum(gs, axis=0)
  pooled = safe_div(expert_sum(gs, mu), gs_tot[:, None])
  new_centroids = jnp.where(gs_tot[:, None] > 0, pooled, centroids)
  new_has = has_centroids | (gs_tot > 0)

  # ---- 4.2-4.3 semantic consistency and selective expert aggregation -----------------------
  trained = [k for k in blk.expert_keys if deltas[k] is not None]
  leaves = [deltas[k] for k in trained]
  diag = {}
  e = blk.num_experts
  if cfg.semantic_selection and trained:
    sel = c > 0  # P(e) membership (C, E)
    self_f = sel.astype(jnp.float32)
    n_sel = jnp.sum(self_f, axis=0)  # |P(e)|
    kernel_g = jnp.asarray(flat_p[blk.kernel_key], jnp.float32)
    bias_g = (
        jnp.zeros((e,), jnp.float32)
        if blk.bias_key is None
        else jnp.asarray(flat_p[blk.bias_key], jnp.float32)
    )
    if cfg.pairwise:
      kernels = biases = None
      if cfg.semantic_similarity == "gate":
        kernels = kernel_g[None] + (0.0 if kernel_d is None else kernel_d)  # (C, D, E)
        biases = bias_g[None] + (0.0 if bias_d is None else bias_d)  # (C, E)
        kernels = jnp.broadcast_to(kernels, (part.shape[0],) + kernel_g.shape)
        biases = jnp.broadcast_to(biases, (part.shape[0], e))
      # sum_{j != i} c_j(e) C_ij(e), expert by expert (no (C, C, E) array)
      num = _pairwise_consistency(cfg, leaves, part, c, mu, kernels, biases)
      den = jnp.sum(c, axis=0)[None, :] - c  # sum_{j != i} c_j(e)
      s_multi = safe_div(num, den)
    else:
      v = normalize(c, axis=0)  # count-weighted consensus weights
      dcos = consensus_expert_cosine(leaves, v, part)  # (C, E)
      if cfg.semantic_similarity == "gate":
        kernel_new = kernel_g + agg.get(blk.kernel_key, 0.0)
        bias_new = bias_g + agg.get(blk.bias_key, 0.0) if blk.bias_key is not None else bias_g
        gbar = diag_gate(mu, kernel_new, bias_new)  # (C, E)
      else:
        mu_bar = expert_sum(v, mu)  # (E, D)
        gbar = (1.0 + cosine_last(mu, mu_bar[None])) / 2
      s_multi = gbar * (1.0 + dcos) / 2
    score = jnp.where(sel, jnp.where(n_sel[None] >= 2, s_multi, 1.0), 0.0)  # S_i(e)

    mean_s = jnp.sum(score, axis=0) / jnp.maximum(n_sel, 1.0)
    var_s = jnp.sum(self_f * (score - mean_s[None]) ** 2, axis=0) / jnp.maximum(n_sel, 1.0)
    tau = mean_s - cfg.beta * jnp.sqrt(var_s)
    in_a = sel & (score >= tau[None] - cfg.selection_tol)  # A(e)
    if cfg.selection_min_cv > 0:  # the floor: too little spread of S over P(e) -> A(e) = P(e)
      floored = safe_div(jnp.sqrt(var_s), mean_s) < cfg.selection_min_cv
      in_a = in_a | (sel & floored[None])
      multi = (n_sel >= 2).astype(jnp.float32)  # experts with a spread to measure
      diag["floored_frac"] = safe_div(jnp.sum(floored * multi), jnp.sum(multi))
    a_f = in_a.astype(jnp.float32)
    ca = c * a_f
    # w_i(e) = c S / sum_A c S; all-zero scores in A fall back to counts [ours].
    w = normalize(c * score * a_f, axis=0, fallback=normalize(ca, axis=0))
    kept = jnp.sum(ca, axis=0) <= 0  # A(e) empty: the expert keeps theta_e (and its opt state)
    sums = expert_sum(w, leaves, part)  # one scan over clients for every expert leaf
    for k, value in zip(trained, sums):
      agg[k] = value
      keep[k] = kept.reshape((e,) + (1,) * (value.ndim - 1))
    has_p = n_sel > 0
    diag["S_mean"] = safe_div(jnp.sum(score * self_f), jnp.sum(self_f))
    diag["tau_mean"] = safe_div(jnp.sum(jnp.where(has_p, tau, 0.0)), jnp.sum(has_p))
    diag["A_size_mean"] = jnp.mean(jnp.sum(a_f, axis=0))
    diag["P_size_mean"] = jnp.mean(n_sel)
    diag["kept_frac"] = jnp.mean(kept.astype(jnp.float32))
    if cfg.detailed_diagnostics:
      diag.update({"S": score, "tau": tau, "A": a_f, "w": w})
  elif trained:
    for k in trained:
      agg[k] = client_sum(nw, deltas[k], part)
    diag["kept_frac"] = jnp.where(prep.any_part, 0.0, 1.0)
  else:
    diag["kept_frac"] = jnp.ones(())

  om_mean, om_min, om_max = _masked_stats(omega, jnp.broadcast_to(part[:, None], omega.shape))
  if cfg.detailed_diagnostics:
    diag["omega"] = omega
  diag.update(
      {
          "omega_mean": om_mean,
          "omega_min": om_min,
          "omega_max": om_max,
          "alpha_mean": jnp.mean(new_alpha),
          "routing_divergence": routing_divergence(p, new_pg, w_eff),
          "expert_role_preservation": expert_role_preservation(mu, c),
      }
  )
  return agg, keep, new_pg, new_alpha, new_centroids, new_has, diag


def broadcast(state: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
  """{'p_g': {block: (E,)}, 'alpha': {block: (E,)}} to send to the clients with the model.

  >>> agg = fedalign_aggregator()
  >>> params = {'moe': {'router': {'kernel': jnp.zeros((2, 4))},
  ...                   'experts': {'wo': jnp.zeros((4, 1, 2))}}}
  >>> broadcast(agg.init(params))['p_g']['moe'].tolist()
  [0.25, 0.25, 0.25, 0.25]
  """
  return {"p_g": dict(state["p_g"]), "alpha": dict(state["alpha"])}


def fedalign_aggregator(config: Any = None, trainable: PyTree | None = None) -> Aggregator:
  """The FedAlign-MoE server (spec 4.1-4.5) as an :class:`Aggregator`.

  Args:
    config: :class:`FedAlignConfig`, an ``ml_collections.ConfigDict`` / mapping with its field
      names, or None (defaults).
    trainable: the trainable partition of the params (``None`` at frozen leaves, e.g. LoRA
      base weights), sizing the server optimizer state; None = every leaf trains.

  Returns:
    ``Aggregator(init, aggregate)``:

    * ``init(params) -> state``: p_g uniform, alpha ones, zero centroids, rng, server
      optimizer state;
    * ``aggregate(state, global_params, deltas, stats, weights) -> (params, state, diag)``.

  Example (two clients with the same update give that update, as FedAvg does):

  >>> params = {'moe': {'router': {'kernel': jnp.zeros((2, 3))},
  ...                   'experts': {'wo': jnp.ones((3, 1, 2))}}, 'head': jnp.zeros(2)}
  >>> deltas = jax.tree.map(lambda x: jnp.stack([x, x]) * 0.1 + 0.1, params)
  >>> s = {'token_count': 4., 'prob_sum': jnp.array([2., 1., 1.]), 'centroid_sum': jnp.ones((3, 2)),
  ...      'select_count': jnp.array([2., 2., 0.]), 'margin_sum': jnp.array([.5, .5, 0.]),
  ...      'gate_sum': jnp.array([1., 1., 0.])}
  >>> stats = {'moe': jax.tree.map(lambda x: jnp.stack([jnp.asarray(x)] * 2), s)}
  >>> agg = fedalign_aggregator()
  >>> new, state, diag = agg.aggregate(agg.init(params), params, deltas, stats,
  ...                                  jnp.array([1., 3.]))
  >>> new['head'].tolist(), new['moe']['experts']['wo'][2].tolist()  # expert 2: unused
  ([0.10000000149011612, 0.10000000149011612], [[1.0, 1.0]])
  """
  cfg = as_fedalign_config(config)
  opt = cfg.server_optimizer

  def init(params: PyTree) -> dict:
    p_g, alpha, cents, has = {}, {}, {}, {}
    for blk in mb.moe_blocks(params, "fedalign_aggregator.init"):
      p_g[blk.path] = jnp.full((blk.num_experts,), 1.0 / blk.num_experts, jnp.float32)
      alpha[blk.path] = jnp.ones((blk.num_experts,), jnp.float32)
      cents[blk.path] = jnp.zeros((blk.num_experts, blk.dim), jnp.float32)
      has[blk.path] = jnp.zeros((blk.num_experts,), bool)
    return {
        "p_g": p_g,
        "alpha": alpha,
        "centroids": cents,
        "has_centroids": has,
        "opt": mb.init_server_optimizer(opt, params, trainable),
        "rng": jax.random.PRNGKey(cfg.seed),
        "round": jnp.zeros((), jnp.int32),
    }

  def aggregate(
      state: Mapping[str, Any],
      global_params: PyTree,
      deltas: PyTree,
      stats: Mapping[str, Any],
      weights: jax.Array,
      client_state_deltas: PyTree = None,
  ) -> tuple[PyTree, dict, dict[str, jax.Array]]:
    del client_state_deltas
    blocks = mb.moe_blocks(global_params, "fedalign_aggregator.aggregate")
    paths = [b.path for b in blocks]
    prep = mb.prepare(global_params, deltas, weights)
    extra = sorted(set(stats) - set(paths))
    if extra:
      raise ValueError(
          f"routing stats for {extra}, which are not MoE blocks of the params (blocks: {paths})"
      )
    missing = sorted(set(paths) - set(state["p_g"]))
    if missing:
      raise ValueError(
          f"aggregator state has no entry for MoE blocks {missing}; "
          "was init called with these params?"
      )
    rng, noise_key = jax.random.split(state["rng"])
    flat_d = dict(prep.flat_deltas)  # masked: the router leaves and permutation alignment
    raw_d = dict(prep.raw_deltas)  # as sent: the expert leaves, read with prep.part
    agg = fedavg_deltas(prep)  # every trained leaf FedAvg by n_i; MoE parts replaced below
    keep: dict = {}
    new_state = {k: dict(state[k]) for k in ("p_g", "alpha", "centroids", "has_centroids")}
    diag: dict[str, jax.Array] = {}
    divs, roles = [], []
    any_part = prep.any_part
    for b_idx, blk in enumerate(blocks):
      path = blk.path
      raw = mb.block_stats(stats, blk, prep)
      mu = finalize_stats(raw)["mu"]
      mu = _privatize(mu, cfg, jax.random.fold_in(noise_key, b_idx))
      mu = jnp.where(raw["select_count"][..., None] > 0, mu, 0.0)
      if cfg.permutation_alignment:
        new_d, raw, mu, pdiag = _align_block(
            cfg,
            blk,
            prep,
            flat_d,
            raw,
            mu,
            state["centroids"][path],
            state["has_centroids"][path],
        )
        flat_d.update(new_d)
        raw_d.update(new_d)  # the aligned deltas are masked already
        diag.update({f"{path}/{k}": v for k, v in pdiag.items()})
      bagg, bkeep, pg, al, cent, has, bdiag = _block_update(
          cfg,
          blk,
          prep,
          flat_d,
          raw_d,
          raw,
          mu,
          state["p_g"][path],
          state["alpha"][path],
          state["centroids"][path],
          state["has_centroids"][path],
      )
      agg.update(bagg)
      keep.update(bkeep)
      for name, value in (("p_g", pg), ("alpha", al), ("centroids", cent), ("has_centroids", has)):
        new_state[name][path] = jnp.where(any_part, value, state[name][path])
      diag.update({f"{path}/{k}": v for k, v in bdiag.items()})
      divs.append(bdiag["routing_divergence"])
      roles.append(bdiag["expert_role_preservation"])
    new_params, opt_state = mb.finish(prep, agg, opt, state["opt"], keep)
    diag["routing_divergence"] = jnp.mean(jnp.stack(divs))
    diag["expert_role_preservation"] = jnp.mean(jnp.stack(roles))
    diag["num_participating"] = jnp.sum(prep.part.astype(jnp.float32))
    new_state.update({"opt": opt_state, "rng": rng, "round": state["round"] + 1})
    return new_params, new_state, diag

  return Aggregator(init, aggregate)


def make_fedalign(
    config: ml_collections.ConfigDict, trainable: PyTree, num_clients: int
) -> Algorithm:
  """FedAlign-MoE from ``config.fedalign`` (every :class:`FedAlignConfig` field) and
  ``config.server`` (a server optimizer on the aggregated delta)."""
  del num_clients
  fields = dict(config.fedalign.to_dict())
  cfg = as_fedalign_config(
      dict(
          fields,
          server_optimizer=server_optimizer_from_config(config),
          seed=int(config.get("seed", 0)),
      )
  )
  lam = cfg.lambda_reg

  def regularizer(params, global_params, bcast, aux):
    if cfg.regularizer_form == "conditional":
      if "router_inputs" not in aux:
        raise ValueError(
            "config.fedalign.regularizer_form='conditional' needs a model that returns "
            "aux['router_inputs'] (fedalign's decoder and Switch models do): use 'marginal'."
        )
      return lam * conditional_regularizer(
          params, global_params, aux["router_inputs"], bcast["alpha"]
      )
    return lam * gating_regularizer(aux["routing"], bcast["p_g"], bcast["alpha"])

  return Algorithm(
      config.method,
      fedalign_aggregator(cfg, trainable),
      broadcast=broadcast,
      client_loss=regularizer,
  )

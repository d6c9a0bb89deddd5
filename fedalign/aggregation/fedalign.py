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
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from fedalign.aggregation.base import Aggregator
from fedalign.aggregation.permutation import (
    expert_similarity,
    find_moe_blocks,
    linear_sum_assignment,
    permute_moe_block,
    permute_routing_stats,
)
from fedalign.metrics.routing_metrics import expert_role_preservation, routing_divergence
from fedalign.models.routing import STAT_NAMES, finalize_stats

PyTree = Any
Path = tuple[str, ...]

_EPS = 1e-12
_HI = jax.lax.Precision.HIGHEST
_EMPTY = traverse_util.empty_node

ROUTER_WEIGHTINGS = ("consistency", "uniform", "overlap", "margin")
SEMANTIC_SIMILARITIES = ("gate", "centroid_cosine")


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
    pairwise_chunk_size: pairwise with the 'gate' similarity only: compute gamma[i, j, e]
      for chunks of this many clients i at a time under :func:`jax.lax.map`, so that the
      router logits take O(chunk * C * E^2) memory instead of O(C^2 * E^2) (4e9 floats at
      1000 clients x 64 experts). Same result up to float rounding; None = all at once
      [ours, memory].
    weight_by_n: multiply s_i(e) by n_i (4.1) [ours, off].
    router_weighting: 'consistency' (s = o * m) [paper], 'uniform' (FedAvg router, n_i),
      'overlap' (s = o), 'margin' (s = m) (ablations).
    adaptive_alpha: alpha(e) = exp(-CV(e)) (3.2) [paper: adaptive; ours: form]; False = 1.
    semantic_selection: selective expert aggregation (4.2-4.3); False = experts FedAvg by n_i.
    permutation_alignment: align client experts to the global indices first (4.5) [ours].
    centroid_clip: clip each mu_i(e) to this L2 norm (3.1 privacy option) [ours]; None = off.
    centroid_noise_std: std of Gaussian noise added to each mu_i(e) (after clipping) [ours].
    server_optimizer: optax transformation applied to the aggregated delta (used as the
      negated gradient); None = plain averaging (= SGD with lr 1).
    selection_tol: numerical slack of A(e) = {S_i(e) >= tau_e - selection_tol}, so that equal
      scores are never split by float rounding [ours, numerical].
    identity_bonus: added to the diagonal of the permutation-alignment similarity so that
      exact ties keep the client's own index (4.5) [ours, numerical].
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
  selection_tol: float = 1e-6
  identity_bonus: float = 1e-6
  seed: int = 0
  detailed_diagnostics: bool = False

  def __post_init__(self):
    if self.router_weighting not in ROUTER_WEIGHTINGS:
      raise ValueError(
          f"router_weighting must be one of {ROUTER_WEIGHTINGS}, " f"got {self.router_weighting!r}"
      )
    if self.semantic_similarity not in SEMANTIC_SIMILARITIES:
      raise ValueError(
          f"semantic_similarity must be one of {SEMANTIC_SIMILARITIES}, "
          f"got {self.semantic_similarity!r}"
      )
    if self.centroid_clip is not None and not self.centroid_clip > 0:
      raise ValueError(f"centroid_clip must be > 0 or None, got {self.centroid_clip}")
    if self.pairwise_chunk_size is not None and not (
        isinstance(self.pairwise_chunk_size, int) and self.pairwise_chunk_size >= 1
    ):
      raise ValueError(
          f"pairwise_chunk_size must be a positive int or None, "
          f"got {self.pairwise_chunk_size!r}"
      )
    if not self.centroid_noise_std >= 0:
      raise ValueError(f"centroid_noise_std must be >= 0, got {self.centroid_noise_std}")


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


# ============================================================================================
# Shared helpers (also used by the modular aggregator).
# ============================================================================================


def _path_str(key: Path) -> str:
  return "/".join(str(k) for k in key)


def _block_prefix(path: str) -> Path:
  return tuple(k for k in path.split("/") if k)


class _Prepared(NamedTuple):
  flat_params: dict
  flat_deltas: dict  # key -> (C, ...) float32 delta, zeroed for excluded clients, or None
  part: jax.Array  # (C,) bool, client takes part (weight > 0)
  w_eff: jax.Array  # (C,) n_i, 0 for excluded
  nw: jax.Array  # (C,) n_i / sum n over participants; all 0 when nobody takes part
  any_part: jax.Array  # () bool


def _lookup_delta(flat_d: dict, key: Path) -> Any:
  if key in flat_d:
    return flat_d[key]
  for i in range(len(key) - 1, 0, -1):  # a None (or absent) subtree above the leaf
    if key[:i] in flat_d:
      return None
  return None


def _prepare(global_params: PyTree, deltas: PyTree, weights: jax.Array) -> _Prepared:
  """Flattens params/deltas, validates delta shapes, zeroes excluded clients' deltas."""
  weights = jnp.asarray(weights, jnp.float32)
  if weights.ndim != 1:
    raise ValueError(f"weights must have shape (C,), got {weights.shape}")
  num_clients = weights.shape[0]
  part = weights > 0  # False for NaN as well
  w_eff = jnp.where(part, weights, 0.0)
  total = jnp.sum(w_eff)
  any_part = total > 0
  nw = w_eff / jnp.where(any_part, total, 1.0)
  flat_p = traverse_util.flatten_dict(global_params, keep_empty_nodes=True)
  flat_d_raw = {} if deltas is None else traverse_util.flatten_dict(deltas, keep_empty_nodes=True)
  for key, value in flat_d_raw.items():
    if value is None or value is _EMPTY:
      continue
    if key not in flat_p:
      raise ValueError(f"delta for {_path_str(key)!r}, which is not a parameter leaf")
  flat_d = {}
  for key, p in flat_p.items():
    if p is _EMPTY:
      continue
    d = _lookup_delta(flat_d_raw, key)
    if d is None or d is _EMPTY:
      flat_d[key] = None
      continue
    expected = (num_clients,) + tuple(jnp.shape(p))
    if tuple(jnp.shape(d)) != expected:
      raise ValueError(
          f"delta of {_path_str(key)!r} has shape {tuple(jnp.shape(d))}, "
          f"expected {expected} (clients first)"
      )
    d = jnp.asarray(d, jnp.float32)
    mask = part.reshape((num_clients,) + (1,) * (d.ndim - 1))
    flat_d[key] = jnp.where(mask, d, 0.0)
  return _Prepared(flat_p, flat_d, part, w_eff, nw, any_part)


def _csum(w: jax.Array, x: jax.Array) -> jax.Array:
  """sum_c w[c] x[c] for w (C,), x (C, ...)."""
  return jnp.einsum("c,c...->...", w, x, precision=_HI)


def _esum(w: jax.Array, x: jax.Array) -> jax.Array:
  """sum_c w[c, e] x[c, e] for w (C, E), x (C, E, ...).

  Written as a fused multiply-and-reduce rather than an einsum: exact float32 everywhere and,
  on CPU, about 5x faster than a highest-precision einsum (benchmarks/aggregation_breakdown.py).
  """
  w = w.astype(x.dtype).reshape(w.shape + (1,) * (x.ndim - 2))
  return jnp.sum(w * x, axis=0)


def _fedavg_deltas(prep: _Prepared) -> dict:
  """FedAvg (weights n_i) of every trained leaf: {key: aggregated delta or None}."""
  return {k: None if d is None else _csum(prep.nw, d) for k, d in prep.flat_deltas.items()}


def _moe_blocks(global_params: PyTree, who: str) -> list[str]:
  blocks = find_moe_blocks(global_params)
  if not blocks:
    raise ValueError(
        f"{who}: params contain no MoE block (a subtree with both 'router' and "
        "'experts' keys, router kernel (D, E), experts (E, ...))"
    )
  return blocks


class _Block(NamedTuple):
  path: str
  kernel_key: Path
  bias_key: Path | None
  expert_keys: list  # every leaf under 'experts'
  num_experts: int
  dim: int


def _block_layout(flat_p: dict, path: str) -> _Block:
  prefix = _block_prefix(path)
  n = len(prefix)
  kernel_key = prefix + ("router", "kernel")
  if kernel_key not in flat_p:
    raise ValueError(f"MoE block {path!r}: missing router kernel 'router/kernel' (D, E)")
  kshape = tuple(jnp.shape(flat_p[kernel_key]))
  if len(kshape) != 2:
    raise ValueError(f"MoE block {path!r}: router kernel has shape {kshape}, expected (D, E)")
  dim, num_experts = kshape
  bias_key = prefix + ("router", "bias")
  if bias_key in flat_p:
    bshape = tuple(jnp.shape(flat_p[bias_key]))
    if bshape != (num_experts,):
      raise ValueError(
          f"MoE block {path!r}: router bias has shape {bshape}, " f"expected ({num_experts},)"
      )
  else:
    bias_key = None
  expert_keys = sorted(
      k for k, v in flat_p.items() if k[: n + 1] == prefix + ("experts",) and v is not _EMPTY
  )
  if not expert_keys:
    raise ValueError(f"MoE block {path!r}: 'experts' holds no parameter")
  for k in expert_keys:
    shape = tuple(jnp.shape(flat_p[k]))
    if not shape or shape[0] != num_experts:
      raise ValueError(
          f"MoE block {path!r}: expert leaf {_path_str(k)!r} has shape {shape}, "
          f"expected the expert axis ({num_experts}, ...) first"
      )
  return _Block(path, kernel_key, bias_key, expert_keys, num_experts, dim)


def _check_stats(
    stats: Mapping[str, Any], block: _Block, num_clients: int, fields: tuple[str, ...] = STAT_NAMES
) -> dict[str, jax.Array]:
  """Validates one block's client-stacked stats; returns float32 arrays."""
  if block.path not in stats:
    raise ValueError(
        f"no routing stats for MoE block {block.path!r}; " f"got blocks {sorted(stats)}"
    )
  s = stats[block.path]
  c, e, d = num_clients, block.num_experts, block.dim
  expected = {
      "token_count": (c,),
      "prob_sum": (c, e),
      "select_count": (c, e),
      "margin_sum": (c, e),
      "gate_sum": (c, e),
      "centroid_sum": (c, e, d),
  }
  out = {}
  for field in fields:
    if field not in s:
      raise ValueError(
          f"routing stats of MoE block {block.path!r} lack {field!r} "
          f"(expected shape {expected[field]})"
      )
    shape = tuple(jnp.shape(s[field]))
    if shape != expected[field]:
      raise ValueError(
          f"routing stats of MoE block {block.path!r}: {field!r} has shape "
          f"{shape}, expected {expected[field]} (C={c} clients, E={e} experts, "
          f"D={d})"
      )
    out[field] = jnp.asarray(s[field], jnp.float32)
  return out


def _sanitize_stats(s: dict[str, jax.Array], part: jax.Array) -> dict[str, jax.Array]:
  """Zeroes excluded clients' statistics (they may hold NaN)."""
  out = {}
  for k, v in s.items():
    mask = part.reshape(part.shape + (1,) * (v.ndim - 1))
    out[k] = jnp.where(mask, v, 0.0)
  return out


def _init_server_opt(
    opt: optax.GradientTransformation | None, params: PyTree, trainable: PyTree | None
) -> dict:
  """{'keys': {path: True}, 'state': opt state over the trainable leaves} (or {})."""
  if opt is None:
    return {}
  flat_p = traverse_util.flatten_dict(params)
  flat_t = None if trainable is None else traverse_util.flatten_dict(trainable)
  sub = {}
  for key, p in flat_p.items():
    if flat_t is not None:
      t = _lookup_delta(flat_t, key)
      if t is None or t is False or t is _EMPTY:
        continue
    sub[_path_str(key)] = jnp.asarray(p)
  return {"keys": {k: jnp.array(True) for k in sub}, "state": opt.init(sub)}


def _finish(
    flat_p: dict,
    agg: dict,
    any_part: jax.Array,
    opt: optax.GradientTransformation | None,
    opt_state: dict,
) -> tuple[PyTree, dict]:
  """Applies the aggregated delta (through the server optimizer) and unflattens.

  When no client took part, params and optimizer state are returned unchanged.
  """
  new_flat = dict(flat_p)
  if opt is None:
    for k, d in agg.items():
      if d is not None:
        p = flat_p[k]
        new_flat[k] = jnp.where(any_part, p + d.astype(p.dtype), p)
    return traverse_util.unflatten_dict(new_flat), opt_state
  keys = opt_state["keys"]
  by_str = {_path_str(k): k for k in flat_p if flat_p[k] is not _EMPTY}
  for k, d in agg.items():
    if d is not None and _path_str(k) not in keys:
      raise ValueError(
          f"delta for {_path_str(k)!r}, but the server optimizer was "
          "initialised without it (pass trainable= to init)"
      )
  grads = {}
  sub = {}
  for s in keys:
    p = flat_p[by_str[s]]
    d = agg.get(by_str[s])
    sub[s] = p
    grads[s] = -(jnp.zeros(jnp.shape(p), jnp.float32) if d is None else d)
  updates, new_state = opt.update(grads, opt_state["state"], sub)
  for s in keys:
    k = by_str[s]
    p = flat_p[k]
    new_flat[k] = jnp.where(any_part, p + updates[s].astype(p.dtype), p)
  new_state = jax.tree.map(
      lambda new, old: jnp.where(any_part, new, old), new_state, opt_state["state"]
  )
  return traverse_util.unflatten_dict(new_flat), {"keys": keys, "state": new_state}


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


def _cos_last(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine along the last axis (broadcasting), 0 where either vector is 0, clipped to [-1, 1]."""
  num = jnp.sum(a * b, axis=-1)
  den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return jnp.clip(jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0), -1.0, 1.0)


def _pairwise_cos(x: jax.Array) -> jax.Array:
  """(C, E, P) -> (C, C, E) cosine of x[i, e] and x[j, e] (0 for zero vectors)."""
  gram = jnp.einsum("iep,jep->ije", x, x, precision=_HI)
  norm = jnp.linalg.norm(x, axis=-1)  # (C, E)
  den = norm[:, None, :] * norm[None, :, :]
  return jnp.clip(jnp.where(den > 0, gram / jnp.where(den > 0, den, 1.0), 0.0), -1.0, 1.0)


def _diag_gate(mu: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """gamma[..., e] = softmax(mu[..., e, :] @ kernel + bias)_e.

  mu (..., E, D), kernel (..., D, E), bias (..., E) broadcast against each other's leading axes.
  """
  logits = jnp.einsum("...ed,...df->...ef", mu, kernel, precision=_HI) + bias[..., None, :]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.exp(jnp.diagonal(logp, axis1=-2, axis2=-1))


def _pairwise_gate(
    mu: jax.Array, kernels: jax.Array, biases: jax.Array, chunk_size: int | None = None
) -> jax.Array:
  """gamma[i, j, e] = softmax(W_j^T mu_i(e) + b_j)_e for every pair of clients: (C, C, E).

  mu (C, E, D), kernels (C, D, E), biases (C, E). The softmax needs every expert's logit, so
  all at once this builds (C, C, E, E) logits; with ``chunk_size`` the clients i go through
  :func:`jax.lax.map` in chunks of that many (the last one zero-padded), which bounds the
  logits at (chunk_size, C, E, E).

  >>> mu = jnp.ones((3, 2, 4)); k = jnp.zeros((3, 4, 2)); b = jnp.zeros((3, 2))
  >>> _pairwise_gate(mu, k, b, chunk_size=2).shape, float(_pairwise_gate(mu, k, b)[0, 1, 0])
  ((3, 3, 2), 0.5)
  """
  num_clients = mu.shape[0]
  if chunk_size is None or chunk_size >= num_clients:
    return _diag_gate(mu[:, None], kernels[None], biases[None])
  pad = (-num_clients) % chunk_size
  mu_p = jnp.pad(mu, ((0, pad),) + ((0, 0),) * (mu.ndim - 1))
  chunks = mu_p.reshape(((num_clients + pad) // chunk_size, chunk_size) + mu.shape[1:])
  out = jax.lax.map(lambda m: _diag_gate(m[:, None], kernels[None], biases[None]), chunks)
  return out.reshape((num_clients + pad,) + out.shape[2:])[:num_clients]


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
    blk: _Block,
    flat_p: dict,
    flat_d: dict,
    raw: dict,
    mu: jax.Array,
    part: jax.Array,
    prev_centroids: jax.Array,
    has_centroids: jax.Array,
):
  """Permutation alignment of one block (4.5). Returns (new flat_d entries, raw, mu, diag)."""
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
  num_clients = part.shape[0]
  e = blk.num_experts

  def core(router_kernel, router_bias, experts):
    router = {"kernel": router_kernel}
    if router_bias is not None:
      router["bias"] = router_bias
    return {"router": router, "experts": experts}

  g_core = core(
      flat_p[blk.kernel_key],
      None if blk.bias_key is None else flat_p[blk.bias_key],
      {_path_str(k): flat_p[k] for k in blk.expert_keys},
  )
  g_core = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g_core)
  d_core = core(kernel_d, bias_d, {_path_str(k): flat_d[k] for k in blk.expert_keys})
  c_core = jax.tree.map(lambda g, d: g[None] + d, g_core, d_core)  # client params (C, ...)

  weight_score = jax.vmap(lambda cc: expert_similarity(g_core, cc, kind="weight_cosine"))(c_core)
  cent_score = jax.vmap(lambda m: expert_similarity(prev_centroids, m, kind="centroid_cosine"))(mu)
  use_centroids = jnp.all(has_centroids)
  score = jnp.where(use_centroids, cent_score, weight_score)
  score = score + cfg.identity_bonus * jnp.eye(e, dtype=score.dtype)
  _, perm = linear_sum_assignment(score, maximize=True)  # (C, E)
  ident = jnp.broadcast_to(jnp.arange(e, dtype=perm.dtype), perm.shape)
  perm = jnp.where(part[:, None], perm, ident)

  # delta' = permuted(theta_g + delta) - theta_g = permuted(delta) + (permuted(theta_g) - theta_g),
  # written so that an identity permutation returns delta bit for bit.
  d_perm = jax.vmap(permute_moe_block)(d_core, perm)
  g_perm = jax.vmap(permute_moe_block, in_axes=(None, 0))(g_core, perm)
  new_core = jax.tree.map(lambda dp, gp, g: dp + (gp - g[None]), d_perm, g_perm, g_core)
  new_d = {blk.kernel_key: new_core["router"]["kernel"]}
  if blk.bias_key is not None:
    new_d[blk.bias_key] = new_core["router"]["bias"]
  for k in blk.expert_keys:
    new_d[k] = new_core["experts"][_path_str(k)]
  raw = jax.vmap(permute_routing_stats)(raw, perm)
  mu = jnp.take_along_axis(mu, perm[:, :, None], axis=1)
  moved = jnp.mean((perm != ident).astype(jnp.float32), axis=1)
  n_part = jnp.maximum(jnp.sum(part), 1)
  diag = {
      "perm_moved_frac": jnp.sum(jnp.where(part, moved, 0.0)) / n_part,
      "perm_used_centroids": use_centroids.astype(jnp.float32),
  }
  del num_clients
  return new_d, raw, mu, diag


def _block_update(
    cfg: FedAlignConfig,
    blk: _Block,
    flat_p: dict,
    flat_d: dict,
    raw: dict,
    mu: jax.Array,
    prep: _Prepared,
    p_g: jax.Array,
    alpha: jax.Array,
    centroids: jax.Array,
    has_centroids: jax.Array,
):
  """4.1-4.3 for one MoE block. Returns (agg updates, p_g, alpha, centroids, has, diag)."""
  part, w_eff, nw = prep.part, prep.w_eff, prep.nw
  partf = part.astype(jnp.float32)
  fin = finalize_stats(raw)
  p = jnp.where(part[:, None], fin["p"], 0.0)  # (C, E)
  c = fin["c"] * partf[:, None]
  m = fin["m"] * partf[:, None]
  agg = {}

  # ---- 4.1 routing-consistency weights omega and router merge ------------------------------
  if cfg.router_weighting == "uniform":
    omega = jnp.broadcast_to(nw[:, None], p.shape)
  else:
    o = jnp.sqrt(p * p_g[None, :])
    s = {"consistency": o * m, "overlap": o, "margin": m}[cfg.router_weighting]
    s = s * partf[:, None]
    if cfg.weight_by_n:
      s = s * w_eff[:, None]
    s_sum = jnp.sum(s, axis=0)
    omega = jnp.where(s_sum[None] > 0, s / jnp.where(s_sum > 0, s_sum, 1.0)[None], nw[:, None])
  kernel_d = flat_d[blk.kernel_key]
  bias_d = None if blk.bias_key is None else flat_d[blk.bias_key]
  if kernel_d is not None:
    agg[blk.kernel_key] = jnp.einsum("ce,cde->de", omega, kernel_d, precision=_HI)
  if bias_d is not None:
    agg[blk.bias_key] = jnp.sum(omega * bias_d, axis=0)
  pg_raw = jnp.sum(omega * p, axis=0)
  pg_tot = jnp.sum(pg_raw)
  new_pg = jnp.where(pg_tot > 0, pg_raw / jnp.where(pg_tot > 0, pg_tot, 1.0), p_g)

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
  pooled = _esum(gs, mu) / jnp.where(gs_tot > 0, gs_tot, 1.0)[:, None]
  new_centroids = jnp.where(gs_tot[:, None] > 0, pooled, centroids)
  new_has = has_centroids | (gs_tot > 0)

  # ---- 4.2-4.3 semantic consistency and selective expert aggregation -----------------------
  trained = [k for k in blk.expert_keys if flat_d[k] is not None]
  diag = {}
  e = blk.num_experts
  if cfg.semantic_selection and trained:
    sel = c > 0  # P(e) membership (C, E)
    self_f = sel.astype(jnp.float32)
    n_sel = jnp.sum(self_f, axis=0)  # |P(e)|
    x = jnp.concatenate(
        [flat_d[k].reshape(flat_d[k].shape[:2] + (-1,)) for k in trained], axis=-1
    )  # (C, E, P)
    kernel_g = jnp.asarray(flat_p[blk.kernel_key], jnp.float32)
    bias_g = (
        jnp.zeros((e,), jnp.float32)
        if blk.bias_key is None
        else jnp.asarray(flat_p[blk.bias_key], jnp.float32)
    )
    if cfg.pairwise:
      if cfg.semantic_similarity == "gate":
        kernels = kernel_g[None] + (0.0 if kernel_d is None else kernel_d)  # (C, D, E)
        biases = bias_g[None] + (0.0 if bias_d is None else bias_d)  # (C, E)
        kernels = jnp.broadcast_to(kernels, (part.shape[0],) + kernel_g.shape)
        biases = jnp.broadcast_to(biases, (part.shape[0], e))
        # gamma[i, j, e] = softmax(W_j^T mu_i(e) + b_j)_e
        gamma = _pairwise_gate(mu, kernels, biases, cfg.pairwise_chunk_size)  # (C, C, E)
        gbar = (gamma + jnp.swapaxes(gamma, 0, 1)) / 2
      else:
        unit = mu / jnp.maximum(jnp.linalg.norm(mu, axis=-1, keepdims=True), _EPS)
        cos_mu = jnp.clip(jnp.einsum("ied,jed->ije", unit, unit, precision=_HI), -1.0, 1.0)
        gbar = (1.0 + cos_mu) / 2
      dcos = _pairwise_cos(x)  # D_ij(e)
      cij = gbar * (1.0 + dcos) / 2
      off = 1.0 - jnp.eye(part.shape[0], dtype=jnp.float32)
      num = jnp.einsum("je,ije->ie", c, cij * off[:, :, None], precision=_HI)
      den = jnp.sum(c, axis=0)[None, :] - c  # sum_{j != i} c_j(e)
      s_multi = num / jnp.where(den > 0, den, 1.0)
    else:
      c_tot = jnp.sum(c, axis=0)
      v = c / jnp.where(c_tot > 0, c_tot, 1.0)[None]  # count-weighted consensus weights
      x_bar = _esum(v, x)  # (E, P)
      dcos = _cos_last(x, x_bar[None])  # (C, E)
      if cfg.semantic_similarity == "gate":
        kernel_new = kernel_g + agg.get(blk.kernel_key, 0.0)
        bias_new = bias_g + agg.get(blk.bias_key, 0.0) if blk.bias_key is not None else bias_g
        gbar = _diag_gate(mu, kernel_new[None], bias_new[None])  # (C, E)
      else:
        mu_bar = _esum(v, mu)  # (E, D)
        gbar = (1.0 + _cos_last(mu, mu_bar[None])) / 2
      s_multi = gbar * (1.0 + dcos) / 2
    score = jnp.where(sel, jnp.where(n_sel[None] >= 2, s_multi, 1.0), 0.0)  # S_i(e)

    mean_s = jnp.sum(score, axis=0) / jnp.maximum(n_sel, 1.0)
    var_s = jnp.sum(self_f * (score - mean_s[None]) ** 2, axis=0) / jnp.maximum(n_sel, 1.0)
    tau = mean_s - cfg.beta * jnp.sqrt(var_s)
    in_a = sel & (score >= tau[None] - cfg.selection_tol)  # A(e)
    a_f = in_a.astype(jnp.float32)
    cs = c * score * a_f
    cs_tot = jnp.sum(cs, axis=0)
    ca = c * a_f
    ca_tot = jnp.sum(ca, axis=0)
    # w_i(e) = c S / sum_A c S; all-zero scores in A fall back to counts [ours].
    w = jnp.where(
        cs_tot[None] > 0,
        cs / jnp.where(cs_tot > 0, cs_tot, 1.0)[None],
        ca / jnp.where(ca_tot > 0, ca_tot, 1.0)[None],
    )
    for k in trained:
      agg[k] = _esum(w, flat_d[k])
    kept = ca_tot <= 0
    has_p = n_sel > 0
    diag["S_mean"] = jnp.sum(score * self_f) / jnp.maximum(jnp.sum(self_f), 1.0)
    diag["tau_mean"] = jnp.sum(jnp.where(has_p, tau, 0.0)) / jnp.maximum(jnp.sum(has_p), 1)
    diag["A_size_mean"] = jnp.mean(jnp.sum(a_f, axis=0))
    diag["P_size_mean"] = jnp.mean(n_sel)
    diag["kept_frac"] = jnp.mean(kept.astype(jnp.float32))
    if cfg.detailed_diagnostics:
      diag.update({"S": score, "tau": tau, "A": a_f, "w": w})
  elif trained:
    for k in trained:
      agg[k] = _csum(nw, flat_d[k])
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
  return agg, new_pg, new_alpha, new_centroids, new_has, diag


class FedAlignAggregator(Aggregator):
  """An :class:`Aggregator` with :meth:`broadcast` (what clients need for the regularizer)."""

  __slots__ = ()

  @staticmethod
  def broadcast(state: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
    return broadcast(state)


def broadcast(state: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
  """{'p_g': {block: (E,)}, 'alpha': {block: (E,)}} to send to the clients with the model.

  >>> agg = fedalign_aggregator()
  >>> params = {'moe': {'router': {'kernel': jnp.zeros((2, 4))},
  ...                   'experts': {'wo': jnp.zeros((4, 1, 2))}}}
  >>> broadcast(agg.init(params))['p_g']['moe'].tolist()
  [0.25, 0.25, 0.25, 0.25]
  """
  return {"p_g": dict(state["p_g"]), "alpha": dict(state["alpha"])}


def fedalign_aggregator(config: Any = None) -> FedAlignAggregator:
  """The FedAlign-MoE server (spec 4.1-4.5) as an :class:`Aggregator`.

  Args:
    config: :class:`FedAlignConfig`, an ``ml_collections.ConfigDict`` / mapping with its field
      names, or None (defaults).

  Returns:
    ``FedAlignAggregator(init, aggregate)`` with ``broadcast(state)``:

    * ``init(params, trainable=None) -> state``: p_g uniform, alpha ones, zero centroids, rng,
      server optimizer state (over the leaves of ``trainable`` that are not None, e.g. a
      template of the deltas without the client axis; default every leaf).
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

  def init(params: PyTree, trainable: PyTree | None = None) -> dict:
    flat_p = traverse_util.flatten_dict(params, keep_empty_nodes=True)
    blocks = _moe_blocks(params, "fedalign_aggregator.init")
    p_g, alpha, cents, has = {}, {}, {}, {}
    for path in blocks:
      blk = _block_layout(flat_p, path)
      p_g[path] = jnp.full((blk.num_experts,), 1.0 / blk.num_experts, jnp.float32)
      alpha[path] = jnp.ones((blk.num_experts,), jnp.float32)
      cents[path] = jnp.zeros((blk.num_experts, blk.dim), jnp.float32)
      has[path] = jnp.zeros((blk.num_experts,), bool)
    return {
        "p_g": p_g,
        "alpha": alpha,
        "centroids": cents,
        "has_centroids": has,
        "server_opt": _init_server_opt(opt, params, trainable),
        "rng": jax.random.PRNGKey(cfg.seed),
        "round": jnp.zeros((), jnp.int32),
    }

  def aggregate(
      state: Mapping[str, Any],
      global_params: PyTree,
      deltas: PyTree,
      stats: Mapping[str, Any],
      weights: jax.Array,
  ) -> tuple[PyTree, dict, dict[str, jax.Array]]:
    blocks = _moe_blocks(global_params, "fedalign_aggregator.aggregate")
    prep = _prepare(global_params, deltas, weights)
    num_clients = prep.part.shape[0]
    extra = sorted(set(stats) - set(blocks))
    if extra:
      raise ValueError(
          f"routing stats for {extra}, which are not MoE blocks of the params "
          f"(blocks: {blocks})"
      )
    missing = sorted(set(blocks) - set(state["p_g"]))
    if missing:
      raise ValueError(
          f"aggregator state has no entry for MoE blocks {missing}; "
          "was init called with these params?"
      )
    rng, noise_key = jax.random.split(state["rng"])
    flat_p = prep.flat_params
    flat_d = dict(prep.flat_deltas)
    agg = _fedavg_deltas(prep)  # every trained leaf FedAvg by n_i; MoE parts replaced below
    new_state = {k: dict(state[k]) for k in ("p_g", "alpha", "centroids", "has_centroids")}
    diag: dict[str, jax.Array] = {}
    divs, roles = [], []
    keep = prep.any_part
    for b_idx, path in enumerate(blocks):
      blk = _block_layout(flat_p, path)
      raw = _sanitize_stats(_check_stats(stats, blk, num_clients), prep.part)
      mu = finalize_stats(raw)["mu"]
      mu = _privatize(mu, cfg, jax.random.fold_in(noise_key, b_idx))
      mu = jnp.where(raw["select_count"][..., None] > 0, mu, 0.0)
      if cfg.permutation_alignment:
        new_d, raw, mu, pdiag = _align_block(
            cfg,
            blk,
            flat_p,
            flat_d,
            raw,
            mu,
            prep.part,
            state["centroids"][path],
            state["has_centroids"][path],
        )
        flat_d.update(new_d)
        for k in new_d:  # leaves of this block outside the routed experts/router keep FedAvg
          agg[k] = _csum(prep.nw, new_d[k])
        diag.update({f"{path}/{k}": v for k, v in pdiag.items()})
      bagg, pg, al, cent, has, bdiag = _block_update(
          cfg,
          blk,
          flat_p,
          flat_d,
          raw,
          mu,
          prep,
          state["p_g"][path],
          state["alpha"][path],
          state["centroids"][path],
          state["has_centroids"][path],
      )
      agg.update(bagg)
      new_state["p_g"][path] = jnp.where(keep, pg, state["p_g"][path])
      new_state["alpha"][path] = jnp.where(keep, al, state["alpha"][path])
      new_state["centroids"][path] = jnp.where(keep, cent, state["centroids"][path])
      new_state["has_centroids"][path] = jnp.where(keep, has, state["has_centroids"][path])
      diag.update({f"{path}/{k}": v for k, v in bdiag.items()})
      divs.append(bdiag["routing_divergence"])
      roles.append(bdiag["expert_role_preservation"])
    new_params, server_opt = _finish(flat_p, agg, keep, opt, state["server_opt"])
    diag["routing_divergence"] = jnp.mean(jnp.stack(divs))
    diag["expert_role_preservation"] = jnp.mean(jnp.stack(roles))
    diag["num_participating"] = jnp.sum(prep.part.astype(jnp.float32))
    new_state.update({"server_opt": server_opt, "rng": rng, "round": state["round"] + 1})
    return new_params, new_state, diag

  return FedAlignAggregator(init, aggregate)

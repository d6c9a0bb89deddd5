"""Robust aggregation: server options that compose with every method (``config.server.robust``).

Two kinds of defence, both applied by the round (:mod:`fedalign.federated.round`) around the
method's own aggregator, so that no method is special-cased:

* **Transforms of the round's inputs**, before the aggregator (:func:`defend`):

  - ``norm_bound``: every client's whole update is scaled to L2 norm <= B (Sun et al., 2019),
    B = ``server.robust_norm_bound``, or, when that is 0, the median norm of the round's
    participating clients (scale-free: no bound to tune per model).
  - ``krum``: (multi-)Krum (Blanchard et al., 2017; El Mhamdi et al., 2018) on the clients'
    whole flattened updates: a client's score is the sum of squared distances to its
    n - f - 2 nearest participating neighbours (f = ``server.krum_byzantine``, n = the round's
    participants); the m lowest-scoring clients keep their weight, the others get weight 0,
    so the method aggregates the selected clients by its own rule (FedAlign-MoE's per-expert
    weights and router merge included). m = ``server.krum_select`` (1 = Krum; 0 = n - f,
    Multi-Krum). The selection is per client, not per expert: a Byzantine client is a
    client, and a per-expert selection would need a (C, E) weight input that the aggregator
    contract does not have.
  - routing statistics (``server.robust_stats``, :func:`sanitize_stats`): each client's
    token count is bounded by the valid tokens of the batches the server gave it this round
    (:func:`tokens_bound`), the other statistics
    are made consistent with it (p_i sums to 1, c_i(e) <= tokens and sum_e c_i(e) <= top_k
    tokens, margins and gates <= counts), and each client's contribution p_i(e), c_i(e) /
    tokens_i and m_i(e) is clipped to the ``server.robust_stats_quantile`` quantile (default:
    the median) of the round's participating clients for that expert. A client then weighs
    at most what an honest client of its size with a typical routing weighs.

* **Robust reductions** (``median``, ``trimmed_mean``): every weighted sum over clients that an
  aggregator computes with :func:`fedalign.aggregation.moe_blocks.client_sum` or
  :func:`~fedalign.aggregation.moe_blocks.expert_sum` becomes ``sum_c w[c] *
  location({x[c] : w[c] > 0})``, the location being the coordinate-wise median or trimmed
  mean (Yin et al., 2018) of the clients the method gives a positive weight (per expert for a
  (C, E) weight). The method thus decides who takes part in each sum (FedAlign-MoE's A(e),
  FedMoE's selecting clients) and the robust rule where the result lies; the size of a
  client's weight no longer matters, which also makes inflated routing statistics powerless.
  :func:`robust_reduction` switches the sums at trace time (a context, like
  ``jax.default_matmul_precision``).

Costs: norm bounding and the statistics defence are one pass over the updates; Krum forms the
(C, C) Gram matrix of the whole updates (C^2 P flops); median and trimmed mean sort every
coordinate over the clients (C log C per parameter, and a copy of the deltas).

Example (a scaled attacker moves the mean, not the median):
  >>> import jax.numpy as jnp
  >>> x = jnp.array([[1.0], [2.0], [3.0], [100.0]])
  >>> w = jnp.full((4,), 0.25)
  >>> float(robust_sum(w, x, kind='median')[0]), float(robust_sum(w, x, kind='trimmed_mean',
  ...                                                              trim_fraction=0.25)[0])
  (2.5, 2.5)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections

PyTree = Any
ROBUST_KINDS = ("none", "norm_bound", "median", "trimmed_mean", "krum")
REDUCTION_KINDS = ("median", "trimmed_mean")
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class RobustConfig:
  """``config.server`` robust-aggregation fields (see the module docstring).

  Attributes:
    kind: ``server.robust``: none | norm_bound | median | trimmed_mean | krum.
    norm_bound: ``server.robust_norm_bound``: norm_bound's L2 bound B > 0 on a client's whole
      update; 0 = the median norm of the round's participants.
    trim_fraction: ``server.trim_fraction`` in [0, 0.5): trimmed_mean cuts floor(fraction *
      n) of the n clients at each end of every coordinate.
    krum_byzantine: ``server.krum_byzantine``: Krum's f; 0 = the most Krum tolerates,
      floor((n - 3) / 2) for the round's n participants. Needs n >= 2 f + 3.
    krum_select: ``server.krum_select``: m clients kept; 1 = Krum, 0 = n - f (Multi-Krum).
    stats: ``server.robust_stats``: sanitize the uploaded routing statistics.
    stats_quantile: ``server.robust_stats_quantile`` in (0, 1]: each client's p_i(e),
      c_i(e) / tokens and m_i(e) is clipped to this quantile over the round's clients
      (1 = consistency bounds only, no clipping).
    top_k: experts per token of the model (bounds sum_e c_i(e)); None = no such bound.
  """

  kind: str = "none"
  norm_bound: float = 0.0
  trim_fraction: float = 0.1
  krum_byzantine: int = 0
  krum_select: int = 0
  stats: bool = False
  stats_quantile: float = 0.5
  top_k: int | None = None

  def __post_init__(self):
    check_fields(
        self.kind,
        self.norm_bound,
        self.trim_fraction,
        self.krum_byzantine,
        self.krum_select,
        self.stats_quantile,
    )

  @property
  def active(self) -> bool:
    """Whether anything is done at all."""
    return self.kind != "none" or self.stats


def check_fields(
    kind: Any,
    norm_bound: Any,
    trim_fraction: Any,
    krum_byzantine: Any,
    krum_select: Any,
    stats_quantile: Any,
    clients_per_round: int | None = None,
) -> None:
  """Raises ValueError naming the ``config.server`` field and the accepted values.

  >>> check_fields('krum', 0.0, 0.1, 4, 0, 0.5, clients_per_round=10)
  Traceback (most recent call last):
  ...
  ValueError: config.server.krum_byzantine=4 is invalid: expected an integer f with 2 f + 3 <= train.clients_per_round=10 (Krum needs n >= 2 f + 3 clients per round), or 0 (the most tolerated).
  """

  def bad(field, value, expected):
    raise ValueError(f"config.server.{field}={value!r} is invalid: expected {expected}.")

  def is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

  def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)

  if kind not in ROBUST_KINDS:
    bad("robust", kind, f"one of {ROBUST_KINDS}")
  if not is_num(norm_bound) or norm_bound < 0:
    bad("robust_norm_bound", norm_bound, "a float > 0, or 0 for the round's median client norm")
  if not is_num(trim_fraction) or not 0 <= trim_fraction < 0.5:
    bad("trim_fraction", trim_fraction, "a float in [0, 0.5)")
  if not is_int(krum_byzantine) or krum_byzantine < 0:
    bad("krum_byzantine", krum_byzantine, "an integer >= 0 (0 = the most Krum tolerates)")
  if not is_int(krum_select) or krum_select < 0:
    bad("krum_select", krum_select, "an integer >= 0 (1 = Krum, 0 = n - f: Multi-Krum)")
  if not is_num(stats_quantile) or not 0 < stats_quantile <= 1:
    bad("robust_stats_quantile", stats_quantile, "a float in (0, 1]")
  if kind == "krum" and clients_per_round is not None:
    n = clients_per_round
    if n < 3:
      bad("robust", kind, f"another defence with train.clients_per_round={n} (Krum needs >= 3)")
    if krum_byzantine and 2 * krum_byzantine + 3 > n:
      bad(
          "krum_byzantine",
          krum_byzantine,
          f"an integer f with 2 f + 3 <= train.clients_per_round={n} (Krum needs n >= 2 f + 3 "
          "clients per round), or 0 (the most tolerated)",
      )
    f = krum_byzantine or (n - 3) // 2
    if krum_select > n - f:
      bad("krum_select", krum_select, f"an integer in [0, n - f = {n - f}]")


def from_config(config: ml_collections.ConfigDict, top_k: int | None = None) -> RobustConfig | None:
  """The run's :class:`RobustConfig` from ``config.server`` (None when nothing is on).

  Configs without the fields (written before they existed) mean no defence.
  """
  s = config.server
  cfg = RobustConfig(
      kind=s.get("robust", "none"),
      norm_bound=s.get("robust_norm_bound", 0.0),
      trim_fraction=s.get("trim_fraction", 0.1),
      krum_byzantine=s.get("krum_byzantine", 0),
      krum_select=s.get("krum_select", 0),
      stats=bool(s.get("robust_stats", False)),
      stats_quantile=s.get("robust_stats_quantile", 0.5),
      top_k=top_k,
  )
  return cfg if cfg.active else None


# --------------------------------------------------------------------------------------------
# Robust reductions (median, trimmed mean), switched on at trace time.
# --------------------------------------------------------------------------------------------

_REDUCTION: contextvars.ContextVar = contextvars.ContextVar("fedalign_robust", default=None)


@contextlib.contextmanager
def robust_reduction(cfg: RobustConfig | None) -> Iterator[None]:
  """Within the block, :func:`active_reduction` returns ``(kind, trim_fraction)`` when
  ``cfg.kind`` is median / trimmed_mean (None otherwise): the toolkit's sums read it."""
  value = None
  if cfg is not None and cfg.kind in REDUCTION_KINDS:
    value = (cfg.kind, float(cfg.trim_fraction))
  token = _REDUCTION.set(value)
  try:
    yield
  finally:
    _REDUCTION.reset(token)


def active_reduction() -> tuple[str, float] | None:
  """The robust reduction in force while tracing (None: plain weighted sums)."""
  return _REDUCTION.get()


def robust_sum(
    w: jax.Array,
    x: jax.Array,
    part: jax.Array | None = None,
    *,
    kind: str = "median",
    trim_fraction: float = 0.0,
) -> jax.Array:
  """``sum_c w[c] * location({x[c] : w[c] > 0})``, coordinate-wise, for w (C,) or (C, E).

  The location (median, or trimmed mean cutting floor(trim_fraction * n) of the n selected
  clients at each end) is unweighted over the clients with a positive weight (and ``part``);
  their rows may hold anything else (NaN). A group nobody selects gives 0.

  >>> x = jnp.array([[1.0, 10.0], [2.0, 20.0], [9.0, 30.0]])[:, :, None]  # (C, E, 1)
  >>> w = jnp.array([[0.5, 1.0], [0.5, 0.0], [0.0, 0.0]])  # expert 1: client 0 only
  >>> robust_sum(w, x)[:, 0].tolist()
  [1.5, 10.0]
  """
  w = jnp.asarray(w, jnp.float32)
  if part is not None:
    w = jnp.where(part.reshape(part.shape + (1,) * (w.ndim - 1)), w, 0.0)
  sel = w > 0
  total = jnp.sum(jnp.where(sel, w, 0.0), axis=0)  # () or (E,)
  extra = x.ndim - w.ndim
  if extra < 0 or x.shape[: w.ndim] != w.shape:
    raise ValueError(f"robust_sum: x of shape {x.shape} does not start with {w.shape}")
  sel_b = sel.reshape(sel.shape + (1,) * extra)
  xs = jnp.sort(jnp.where(sel_b, x.astype(jnp.float32), jnp.inf), axis=0)
  n = jnp.sum(sel, axis=0).reshape(sel.shape[1:] + (1,) * extra)  # broadcasts to x[0]
  n = jnp.broadcast_to(n, x.shape[1:])
  if kind == "median":
    lo = jnp.maximum((n - 1) // 2, 0)
    hi = jnp.maximum(n // 2, 0)
    take = lambda i: jnp.take_along_axis(xs, i[None], axis=0)[0]
    loc = (take(lo) + take(hi)) / 2
  elif kind == "trimmed_mean":
    k = jnp.floor(trim_fraction * n + 1e-6).astype(n.dtype)
    ranks = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
    keep = (ranks >= k[None]) & (ranks < (n - k)[None])
    loc = jnp.sum(jnp.where(keep, xs, 0.0), axis=0) / jnp.maximum(n - 2 * k, 1)
  else:
    raise ValueError(f"robust_sum: kind={kind!r}, expected one of {REDUCTION_KINDS}")
  loc = jnp.where(n > 0, loc, 0.0)
  return (total.reshape(total.shape + (1,) * extra) * loc).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Transforms of the round's inputs: norm bounding, Krum, statistics.
# --------------------------------------------------------------------------------------------


def _leaves(deltas: PyTree) -> list[jax.Array]:
  return [x for x in jax.tree.leaves(deltas) if x is not None]


def client_norms(deltas: PyTree, part: jax.Array) -> jax.Array:
  """(C,) L2 norm of every client's whole update (0 outside ``part``, whatever it holds)."""
  sq = sum(
      jnp.einsum("cp,cp->c", f, f, precision=_HIGHEST)
      for f in (x.reshape(x.shape[0], -1).astype(jnp.float32) for x in _leaves(deltas))
  )
  return jnp.where(part, jnp.sqrt(jnp.maximum(sq, 0.0)), 0.0)


def masked_median(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Median of ``x[mask]`` (0 when the mask is empty).

  >>> float(masked_median(jnp.array([1.0, 5.0, 2.0, 99.0]), jnp.array([True, True, True, False])))
  2.0
  """
  w = mask.astype(jnp.float32)
  return robust_sum(w / jnp.maximum(jnp.sum(w), 1.0), x[:, None], kind="median")[0]


def bound_norms(
    deltas: PyTree, part: jax.Array, bound: float
) -> tuple[PyTree, dict[str, jax.Array]]:
  """Every client's update scaled to L2 norm <= bound (0: the participants' median norm).

  >>> d = {'w': jnp.array([[3.0, 4.0], [0.6, 0.8], [30.0, 40.0]])}
  >>> out, diag = bound_norms(d, jnp.array([True, True, True]), 0.0)  # median norm: 5
  >>> out['w'].tolist(), round(float(diag['robust_clipped_frac']), 4)
  ([[3.0, 4.0], [0.6000000238418579, 0.800000011920929], [3.0, 4.0]], 0.3333)
  """
  norms = client_norms(deltas, part)
  b = masked_median(norms, part) if bound == 0 else jnp.asarray(bound, jnp.float32)
  factor = jnp.where(norms > b, b / jnp.maximum(norms, 1e-30), 1.0)
  scaled = jax.tree.map(
      lambda x: None
      if x is None
      else x * factor.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype),
      deltas,
      is_leaf=lambda x: x is None,
  )
  n = jnp.maximum(jnp.sum(part), 1)
  diag = {
      "robust_norm_bound": b,
      "robust_clipped_frac": jnp.sum(part & (norms > b)) / n,
  }
  return scaled, diag


def krum_scores(
    deltas: PyTree, part: jax.Array, byzantine: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(scores (C,), f, n): Krum's score of every participant (inf for the others).

  score_i = sum of the n - f - 2 smallest ||Delta_i - Delta_j||^2 over participants j != i
  (at least 1 neighbour), n = participants, f = ``byzantine`` or floor((n - 3) / 2).
  """
  flat = [x.reshape(x.shape[0], -1).astype(jnp.float32) for x in _leaves(deltas)]
  flat = [jnp.where(part[:, None], f, 0.0) for f in flat]
  gram = sum(jnp.einsum("ip,jp->ij", f, f, precision=_HIGHEST) for f in flat)
  sq = jnp.diagonal(gram)
  dist = jnp.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
  c = part.shape[0]
  valid = part[:, None] & part[None, :] & ~jnp.eye(c, dtype=bool)
  dist = jnp.where(valid, dist, jnp.inf)
  n = jnp.sum(part).astype(jnp.int32)
  f = jnp.asarray(byzantine, jnp.int32) if byzantine else jnp.maximum((n - 3) // 2, 0)
  k = jnp.maximum(n - f - 2, 1)
  ranked = jnp.sort(dist, axis=1)
  near = jnp.arange(c)[None, :] < k
  scores = jnp.sum(jnp.where(near & jnp.isfinite(ranked), ranked, 0.0), axis=1)
  return jnp.where(part, scores, jnp.inf), f, n


def krum_select(
    deltas: PyTree, part: jax.Array, byzantine: int = 0, select: int = 0
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(C,) bool: the m participants of lowest Krum score (m = ``select`` or n - f).

  >>> d = {'w': jnp.array([[1.0], [1.1], [0.9], [1.05], [50.0]])}
  >>> sel, _ = krum_select(d, jnp.ones(5, bool), byzantine=1, select=1)
  >>> sel.tolist()  # 1.05: the closest to its 2 nearest neighbours
  [False, False, False, True, False]
  """
  scores, f, n = krum_scores(deltas, part, byzantine)
  m = jnp.asarray(select, jnp.int32) if select else jnp.maximum(n - f, 1)
  order = jnp.argsort(scores, stable=True)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
  chosen = part & (rank < m)
  return chosen, {"krum_selected": jnp.sum(chosen).astype(jnp.float32)}


def _winsorize(x: jax.Array, members: jax.Array, q: float) -> jax.Array:
  """x (C, E) clipped per expert to its q-quantile over ``members`` (C, E) rows."""
  if q >= 1:
    return x
  cap = jnp.nanquantile(jnp.where(members, x, jnp.nan), q, axis=0)
  cap = jnp.where(jnp.isnan(cap), jnp.inf, cap)
  return jnp.minimum(x, cap[None])


def sanitize_stats(
    stats: Mapping[str, Mapping[str, jax.Array]],
    part: jax.Array,
    tokens: jax.Array,
    top_k: int | None = None,
    quantile: float = 0.5,
) -> dict[str, dict[str, jax.Array]]:
  """Bounds and clips every client's routing statistics (module docstring).

  Args:
    stats: {block: client-stacked sufficient statistics (:mod:`fedalign.models.routing`)}.
    part: (C,) bool participants (the quantiles are over them).
    tokens: (C,) the most tokens each client can have routed this round (from the server's
      own batches: :func:`tokens_bound`).
    top_k: experts per token (sum_e c_i(e) <= top_k * tokens); None = no such bound.
    quantile: per-expert clipping quantile of p, c / tokens and m (1 = none).

  >>> s = {'moe': {'token_count': jnp.array([10., 1e6]), 'prob_sum': jnp.array([[5., 5.], [5e5, 5e5]]),
  ...      'select_count': jnp.array([[6., 4.], [1e6, 1e6]]), 'margin_sum': jnp.array([[1., 1.], [1e6, 1e6]]),
  ...      'gate_sum': jnp.array([[3., 2.], [5e5, 5e5]]), 'centroid_sum': jnp.ones((2, 2, 1))}}
  >>> out = sanitize_stats(s, jnp.array([True, True]), jnp.array([10., 10.]), top_k=1, quantile=1.0)
  >>> out['moe']['token_count'].tolist(), out['moe']['select_count'][1].tolist()
  ([10.0, 10.0], [5.0, 5.0])
  """
  out = {}
  tokens = jnp.asarray(tokens, jnp.float32)
  for path, s in stats.items():
    s = {k: jnp.asarray(v, jnp.float32) for k, v in s.items()}
    tc = jnp.clip(jnp.nan_to_num(s["token_count"]), 0.0, tokens)  # (C,)
    tcol = tc[:, None]
    # p_i: prob sums in [0, tokens], rescaled to sum to the token count (p_i sums to 1)
    ps = jnp.clip(s["prob_sum"], 0.0, tcol)
    p = jnp.where(tcol > 0, ps / jnp.maximum(jnp.sum(ps, 1, keepdims=True), 1e-30), 0.0)
    # c_i(e) <= tokens, sum_e c_i(e) <= top_k tokens
    sc = jnp.clip(s["select_count"], 0.0, tcol)
    if top_k is not None:
      tot = jnp.sum(sc, 1, keepdims=True)
      sc = sc * jnp.minimum(1.0, top_k * tcol / jnp.maximum(tot, 1e-30))
    f = jnp.where(tcol > 0, sc / jnp.maximum(tcol, 1e-30), 0.0)
    m = jnp.clip(
        jnp.where(sc > 0, s["margin_sum"] / jnp.maximum(s["select_count"], 1e-30), 0.0), 0.0, 1.0
    )
    g = jnp.clip(
        jnp.where(sc > 0, s["gate_sum"] / jnp.maximum(s["select_count"], 1e-30), 0.0), 0.0, 1.0
    )
    pc = part[:, None] & (tcol > 0)
    used = pc & (sc > 0)
    p = _winsorize(p, jnp.broadcast_to(pc, p.shape), quantile)
    f = _winsorize(f, used, quantile)
    m = _winsorize(m, used, quantile)
    sc = f * tcol
    gate = g * sc
    # the centroid mu = centroid_sum / gate_sum is kept: its sum scales with the gate sum
    ratio = jnp.where(s["gate_sum"] > 0, gate / jnp.maximum(s["gate_sum"], 1e-30), 0.0)
    out[path] = {
        "token_count": tc,
        "prob_sum": p * tcol,
        "select_count": sc,
        "margin_sum": m * sc,
        "gate_sum": gate,
        "centroid_sum": s["centroid_sum"] * ratio[..., None],
    }
    for k, v in s.items():  # any extra field passes unchanged
      out[path].setdefault(k, v)
  return out


def tokens_bound(batches: Mapping[str, jax.Array], num_clients: int, lanes: bool) -> jax.Array:
  """(C,) the most tokens each client of the round can have routed, from the server's batches.

  The valid tokens of its real steps: per row the larger of the ``mask`` and ``target_mask``
  counts (encoder / decoder tokens of a Switch model; the decoder's tokens are ``mask``'s),
  or, for batches without masks, rows x the longest token axis. With ``lanes`` the (L, slots)
  schedule is counted per client.

  >>> b = {'mask': jnp.ones((2, 3, 4, 5)), 'step_mask': jnp.array([[1, 1, 0], [1, 0, 0]])}
  >>> tokens_bound(b, 2, False).tolist()
  [40.0, 20.0]
  """
  data = {k: v for k, v in batches.items() if k != "step_mask" and not k.startswith("lane_")}
  masks = [jnp.asarray(data[k], jnp.float32) for k in ("mask", "target_mask") if k in data]
  if masks:
    per_row = masks[0].sum(-1)
    for m in masks[1:]:
      per_row = jnp.maximum(per_row, m.sum(-1))
    per_step = per_row.sum(-1)  # (C, steps) or (L, slots)
  else:
    rows = max(v.shape[2] for v in data.values() if v.ndim >= 3)
    seq = max((v.shape[3] for v in data.values() if v.ndim >= 4), default=1)
    per_step = jnp.full(batches["step_mask"].shape, float(rows * seq))
  per_step = per_step * batches["step_mask"].astype(jnp.float32)
  if lanes:
    return (
        jnp.zeros((num_clients,), jnp.float32)
        .at[batches["lane_client"].reshape(-1)]
        .add(per_step.reshape(-1))
    )
  return jnp.sum(per_step, axis=1)


def defend(
    cfg: RobustConfig,
    deltas: PyTree,
    stats: Mapping[str, Any],
    weights: jax.Array,
    tokens: jax.Array | None = None,
) -> tuple[PyTree, Any, jax.Array, dict[str, jax.Array]]:
  """The input transforms of ``cfg`` on a round: (deltas, stats, weights, diagnostics).

  Non-participants (weight 0, possibly NaN rows) are left as they are; median and trimmed
  mean need no transform (:func:`robust_reduction` switches the sums).
  """
  weights = jnp.asarray(weights, jnp.float32)
  part = weights > 0
  diag: dict[str, jax.Array] = {}
  if cfg.kind == "norm_bound":
    deltas, diag = bound_norms(deltas, part, cfg.norm_bound)
  elif cfg.kind == "krum":
    chosen, diag = krum_select(deltas, part, cfg.krum_byzantine, cfg.krum_select)
    weights = jnp.where(chosen, weights, 0.0)
    diag["krum_chosen"] = chosen
  if cfg.stats and stats:
    if tokens is None:
      raise ValueError("robust_stats needs the clients' token bounds (tokens_bound)")
    stats = sanitize_stats(stats, part, tokens, cfg.top_k, cfg.stats_quantile)
  return deltas, stats, weights, diag

"""Client-level differential privacy (DP-FedAvg style) and its accounting; client dropouts.

Config ``config.dp`` (off while ``dp.clip_norm`` is 0):

* ``clip_norm`` C: each client's model update (the whole trainable delta) is clipped to L2
  norm C on the client.
* ``noise_multiplier`` z: Gaussian noise of std z * C on what the server reads (below).
* ``delta``: the delta at which ``dp_epsilon`` is reported.
* ``stats_clip_norm`` S: methods that read each client's routing statistics (FedAlign-MoE,
  FedMoE) get them normalised per token, clipped to L2 norm S and noised with std z * S on
  the client (:func:`privatize_stats`).

With DP on every received client weighs 1 (uniform weights: DP-FedAvg needs a bounded
per-client weight; data sizes n_i are not used).

What the server reads decides where the noise goes (:data:`SUM_METHODS`):

* ``'sum'`` (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedProx): the aggregate is a
  function of the uniform sum of the clipped updates. The sum carries N(0, (z C)^2): in the
  simulation every received client's row gets an independent share N(0, (z C)^2 / m_recv)
  (m_recv = clients whose update arrived), so the sum has exactly that noise. This is central
  DP (a trusted server, or secure aggregation of the rows): a single row carries only
  1 / sqrt(m_recv) of the noise. The routing statistics are not uploaded (zeros).
* ``'rows'`` (FedAlign-MoE, FedMoE): the aggregator reads every client's row (per-expert
  weights, pairwise cosines, centroids), so every row is noised in full on the client:
  N(0, (z C)^2) on the delta, N(0, (z S)^2) on the statistics.

Accounting (Google's ``dp_accounting``, RDP; the replace-one neighbouring relation, because
the run samples a fixed number of clients without replacement (``run.sample_clients``), so
the sensitivity of a clipped quantity is 2 C and the accountant's noise multiplier is z / 2):

* ``'sum'``: per round ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))``
  (m = clients_per_round of N; ``GaussianDpEvent(z / 2)`` when m = N), self-composed over the
  rounds run. Dropouts are not credited (accounted as if every sampled client arrived).
* ``'rows'``: the server knows which client sent which row, so sampling gives no
  amplification: per round a client's rows are ``ComposedDpEvent([GaussianDpEvent(z / 2),
  GaussianDpEvent(z / 2)])`` (delta and statistics), self-composed over the rounds the client
  actually uploaded in (sampled and not dropped); ``dp_epsilon`` is the worst client's.

Example:
  >>> import ml_collections
  >>> c = ml_collections.ConfigDict({'method': 'fedavg', 'dp': dict(clip_norm=1.0,
  ...     noise_multiplier=2.0, delta=1e-5, stats_clip_norm=1.0)})
  >>> dp_view('fedalign'), dp_view('fedadam')
  ('rows', 'sum')
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

PyTree = Any

# Methods whose aggregate is a function of the (uniformly weighted) sum of the client deltas.
SUM_METHODS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox")
# Methods whose aggregate reads each client's row (deltas and routing statistics).
ROW_METHODS = ("fedalign", "fedmoe")
# The accountant's RDP orders (dp_accounting's default set, extended for large noise).
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512])
_NOISE_SALT = 0x5EED  # folds the clients' noise streams away from their training rngs


@dataclasses.dataclass(frozen=True)
class DPConfig:
  """``config.dp`` read with its defaults (every field optional: an old config is DP-off)."""

  clip_norm: float = 0.0
  noise_multiplier: float = 0.0
  delta: float = 1e-5
  stats_clip_norm: float = 1.0

  @property
  def enabled(self) -> bool:
    return self.clip_norm > 0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "DPConfig":
    dp = config.get("dp", None) or {}
    kwargs = {f.name: dp.get(f.name, f.default) for f in dataclasses.fields(cls)}
    return cls(**kwargs)


def dp_view(method: str) -> str:
  """'sum' or 'rows': what the server of ``method`` reads of the clients' uploads.

  >>> dp_view('fedavg'), dp_view('fedmoe')
  ('sum', 'rows')
  """
  if method in SUM_METHODS:
    return "sum"
  if method in ROW_METHODS:
    return "rows"
  raise ValueError(
      f"config.method={method!r} has no DP mode: client-level DP supports {SUM_METHODS} "
      f"(noise on the sum) and {ROW_METHODS} (noise on every client's row); SCAFFOLD's "
      "control-variate update is computed from the raw delta and would reveal it."
  )


def check_dp_config(config: ml_collections.ConfigDict) -> None:
  """ValueErrors naming the ``dp.*`` / ``faults.*`` field and the accepted values.

  >>> import ml_collections
  >>> c = ml_collections.ConfigDict({'method': 'fedavg', 'dp': dict(clip_norm=1.0,
  ...     noise_multiplier=-1.0, delta=1e-5, stats_clip_norm=1.0)})
  >>> check_dp_config(c)
  Traceback (most recent call last):
  ...
  ValueError: config.dp.noise_multiplier=-1.0 is invalid: expected a float >= 0 (0: clipping only, epsilon = inf).
  """

  def bad(field, value, expected):
    raise ValueError(f"config.{field}={value!r} is invalid: expected {expected}.")

  def number(field, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
      bad(field, value, "a number")

  dp = DPConfig.from_config(config)
  for name in ("clip_norm", "noise_multiplier", "delta", "stats_clip_norm"):
    number(f"dp.{name}", getattr(dp, name))
  if dp.noise_multiplier < 0:
    bad(
        "dp.noise_multiplier", dp.noise_multiplier, "a float >= 0 (0: clipping only, epsilon = inf)"
    )
  if dp.clip_norm < 0 or (dp.noise_multiplier > 0 and dp.clip_norm <= 0):
    bad(
        "dp.clip_norm",
        dp.clip_norm,
        "a float > 0 when dp.noise_multiplier > 0 (the noise std is noise_multiplier x "
        "clip_norm); 0 turns DP off",
    )
  if not 0.0 < dp.delta < 1.0:
    bad("dp.delta", dp.delta, "a float in (0, 1), e.g. 1e-5 (below 1 / number of clients)")
  if dp.enabled:
    dp_view(config.method)  # raises for methods without a DP mode
    if not dp.stats_clip_norm > 0:
      bad("dp.stats_clip_norm", dp.stats_clip_norm, "a float > 0")
  faults = config.get("faults", None) or {}
  p = faults.get("drop_prob", 0.0)
  number("faults.drop_prob", p)
  if not 0.0 <= p < 1.0:
    bad("faults.drop_prob", p, "a float in [0, 1) (the probability a sampled client drops out)")


# ---------------------------------------------------------------------------------------------
# Client side (inside the jitted round, right after the client updates).
# ---------------------------------------------------------------------------------------------


def clip_rows(tree: PyTree, clip: float) -> tuple[PyTree, jax.Array]:
  """Clips every client's row (leading axis) of ``tree`` to global L2 norm ``clip``.

  Returns (clipped tree, (C,) norms before clipping). ``None`` leaves stay ``None``.

  >>> t, n = clip_rows({'a': jnp.array([[3.0, 4.0], [0.3, 0.4]])}, 1.0)
  >>> t['a'].tolist(), n.tolist()
  ([[0.6000000238418579, 0.800000011920929], [0.30000001192092896, 0.4000000059604645]], [5.0, 0.5])
  """
  norms = jax.vmap(optax.global_norm)(tree)
  scale = jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-12))

  def one(x):
    if x is None:
      return None
    s = scale.reshape(scale.shape + (1,) * (x.ndim - 1))
    return (x.astype(jnp.float32) * s).astype(x.dtype)

  return jax.tree.map(one, tree, is_leaf=lambda x: x is None), norms


def add_row_noise(tree: PyTree, std: jax.Array, keys: jax.Array) -> PyTree:
  """Adds independent N(0, std_i^2) to every client's row i (``keys``: (C,) keys)."""
  leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: x is None)
  out = []
  for j, x in enumerate(leaves):
    if x is None:
      out.append(None)
      continue
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, j), x.shape[1:]))(keys)
    s = std.reshape(std.shape + (1,) * (x.ndim - 1))
    out.append((x.astype(jnp.float32) + s * noise).astype(x.dtype))
  return jax.tree.unflatten(treedef, out)


def normalize_stats(stats: dict[str, dict[str, jax.Array]]) -> dict[str, dict[str, jax.Array]]:
  """Per-token means of a client's routing sums (token_count becomes 1; 0 if none seen).

  The sums grow with the client's data; the means are bounded (p sums to 1, the selection
  fractions to k, margins and gates lie in [0, 1]) except the centroid part, which clipping
  bounds. :func:`fedalign.models.routing.finalize_stats` gives the same p, m and mu from them;
  c becomes the fraction of the client's tokens routed to each expert instead of a count.
  """

  def one(s):
    n = s["token_count"]
    inv = jnp.where(n > 0, 1.0 / jnp.maximum(n, 1e-12), 0.0)
    out = {k: v * inv.reshape(inv.shape + (1,) * (v.ndim - inv.ndim)) for k, v in s.items()}
    out["token_count"] = (n > 0).astype(n.dtype)
    return out

  return {path: one(s) for path, s in stats.items()}


def project_stats(stats: dict[str, dict[str, jax.Array]]) -> dict[str, dict[str, jax.Array]]:
  """Post-processing (no privacy cost) of noised per-token statistics into their valid ranges:
  p >= 0 renormalised, selection fractions in [0, 1], gate sums in [0, fraction], margins in
  [0, gate sum], token_count 1 (every received client saw tokens, as far as the server knows).
  """

  def one(s):
    out = dict(s)
    p = jnp.maximum(s["prob_sum"], 0.0)
    tot = jnp.sum(p, axis=-1, keepdims=True)
    e = p.shape[-1]
    out["prob_sum"] = jnp.where(tot > 0, p / jnp.maximum(tot, 1e-12), 1.0 / e)
    f = jnp.clip(s["select_count"], 0.0, 1.0)
    out["select_count"] = f
    g = jnp.clip(s["gate_sum"], 0.0, f)
    out["gate_sum"] = g
    out["margin_sum"] = jnp.clip(s["margin_sum"], 0.0, g)
    out["token_count"] = jnp.ones_like(s["token_count"])
    return out

  return {path: one(s) for path, s in stats.items()}


def privatize_stats(
    stats: dict[str, dict[str, jax.Array]], clip: float, std: float, keys: jax.Array
) -> tuple[dict[str, dict[str, jax.Array]], jax.Array]:
  """Client side: per-token means, every client's statistics (all blocks together) clipped to
  L2 norm ``clip`` and noised with N(0, std^2); returns (uploaded statistics, (C,) norms)."""
  normed = normalize_stats(stats)
  counts = {path: s.pop("token_count") for path, s in normed.items()}  # 0/1: not private
  clipped, norms = clip_rows(normed, clip)
  keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
  c = norms.shape[0]
  noised = add_row_noise(clipped, jnp.full((c,), std, jnp.float32), keys)
  return {path: dict(s, token_count=counts[path]) for path, s in noised.items()}, norms


def make_privatizer(config: ml_collections.ConfigDict) -> Callable | None:
  """``privatize(deltas, stats, weights, losses, rngs) -> (deltas, stats, weights, info)``
  for the round (None when ``config.dp`` is off).

  ``rngs`` are the clients' round keys (:func:`fedalign.federated.round.client_rngs`): the
  noise streams fold a constant into them, so they are independent of the local training.
  ``info``: ``dp_clip_frac`` (the fraction of received clients whose delta was clipped) and
  ``dp_sum_noise_std`` / ``dp_row_noise_std``.
  """
  dp = DPConfig.from_config(config)
  if not dp.enabled:
    return None
  view = dp_view(config.method)
  clip, z, s_clip = float(dp.clip_norm), float(dp.noise_multiplier), float(dp.stats_clip_norm)

  def privatize(deltas, stats, weights, losses, rngs):
    from fedalign.aggregation.moe_blocks import client_ok

    keys = jax.vmap(lambda k: jax.random.fold_in(k, _NOISE_SALT))(rngs)
    deltas, norms = clip_rows(deltas, clip)
    received = (jnp.asarray(weights) > 0) & client_ok(deltas, losses)
    recv_f = received.astype(jnp.float32)
    m_recv = jnp.maximum(jnp.sum(recv_f), 1.0)
    if view == "sum":
      std = jnp.full(recv_f.shape, z * clip, jnp.float32) / jnp.sqrt(m_recv)
      stats = jax.tree.map(jnp.zeros_like, stats)  # not uploaded
    else:
      std = jnp.full(recv_f.shape, z * clip, jnp.float32)
      stats, _ = privatize_stats(stats, s_clip, z * s_clip, keys)
      stats = project_stats(stats)  # server-side post-processing
    deltas = add_row_noise(deltas, std * recv_f, keys)
    weights = jnp.where(jnp.asarray(weights) > 0, 1.0, 0.0)  # uniform weights
    clipped = (norms > clip) & received
    info = {
        "dp_clip_frac": jnp.sum(clipped.astype(jnp.float32)) / m_recv,
        "dp_noise_std_row": jnp.max(std * recv_f),
    }
    return deltas, stats, weights, info

  return privatize


# ---------------------------------------------------------------------------------------------
# Accounting (host side).
# ---------------------------------------------------------------------------------------------


def _rdp_epsilon(event: Any, delta: float) -> float:
  from dp_accounting.rdp import rdp_privacy_accountant as rdp
  from dp_accounting import NeighboringRelation

  acc = rdp.RdpAccountant(RDP_ORDERS, NeighboringRelation.REPLACE_ONE)
  acc.compose(event)
  return float(acc.get_epsilon(delta))


def sum_event(noise_multiplier: float, clients_per_round: int, num_clients: int, rounds: int):
  """The ``'sum'`` view's dp_accounting event of ``rounds`` rounds (see the module doc)."""
  import dp_accounting as dpa

  gauss = dpa.GaussianDpEvent(noise_multiplier / 2.0)
  if clients_per_round >= num_clients:
    one = gauss
  else:
    one = dpa.SampledWithoutReplacementDpEvent(num_clients, clients_per_round, gauss)
  return dpa.SelfComposedDpEvent(one, rounds)


def rows_event(noise_multiplier: float, uploads: int):
  """The ``'rows'`` view's event of a client that uploaded in ``uploads`` rounds."""
  import dp_accounting as dpa

  gauss = dpa.GaussianDpEvent(noise_multiplier / 2.0)
  return dpa.SelfComposedDpEvent(dpa.ComposedDpEvent([gauss, gauss]), uploads)


def epsilon_sum(
    noise_multiplier: float, clients_per_round: int, num_clients: int, rounds: int, delta: float
) -> float:
  """epsilon of the ``'sum'`` view after ``rounds`` rounds (inf without noise, 0 for none)."""
  if rounds <= 0:
    return 0.0
  if noise_multiplier <= 0:
    return math.inf
  return _rdp_epsilon(sum_event(noise_multiplier, clients_per_round, num_clients, rounds), delta)


def epsilon_rows(noise_multiplier: float, uploads: int, delta: float) -> float:
  """epsilon of the ``'rows'`` view for a client that uploaded in ``uploads`` rounds."""
  if uploads <= 0:
    return 0.0
  if noise_multiplier <= 0:
    return math.inf
  return _rdp_epsilon(rows_event(noise_multiplier, uploads), delta)


def noise_for_epsilon(
    target: float, delta: float, epsilon_fn: Callable[[float], float], hi: float = 1e4
) -> float:
  """The smallest noise multiplier whose ``epsilon_fn(z)`` is <= ``target`` (bisection, to
  0.1%); ``epsilon_fn`` is decreasing in z. inf target -> 0 (no noise).

  >>> fn = lambda z: epsilon_sum(z, 10, 10, 5, 1e-5)
  >>> z = noise_for_epsilon(8.0, 1e-5, fn)
  >>> fn(z) <= 8.0 < fn(z * 0.99)
  True
  """
  del delta
  if math.isinf(target):
    return 0.0
  lo = 1e-3
  if epsilon_fn(hi) > target:
    raise ValueError(f"no noise multiplier <= {hi} reaches epsilon {target}")
  while hi / lo > 1.001:
    mid = math.sqrt(lo * hi)
    if epsilon_fn(mid) <= target:
      hi = mid
    else:
      lo = mid
  return hi


class Accountant:
  """``epsilon(rounds_done)`` of a run: the module doc's accounting at ``config.dp.delta``.

  Args:
    config: the run's config (``dp``, ``method``, ``data.num_clients``,
      ``train.clients_per_round``).
    uploaded: ``round_idx -> ids`` of the clients whose update arrived in that round (sampled
      and not dropped; a pure function of (seed, round)), used by the ``'rows'`` view.
  """

  def __init__(self, config: ml_collections.ConfigDict, uploaded: Callable[[int], Sequence[int]]):
    self.dp = DPConfig.from_config(config)
    self.view = dp_view(config.method)
    self.num_clients = int(config.data.num_clients)
    self.per_round = int(config.train.clients_per_round)
    self.uploaded = uploaded
    self._counts = np.zeros(self.num_clients, np.int64)
    self._counted = 0

  def uploads(self, rounds_done: int) -> np.ndarray:
    """(N,) rounds each client uploaded in, over the first ``rounds_done`` rounds."""
    if rounds_done < self._counted:
      self._counts[:] = 0
      self._counted = 0
    for r in range(self._counted, rounds_done):
      np.add.at(self._counts, np.asarray(self.uploaded(r), np.int64), 1)
    self._counted = rounds_done
    return self._counts.copy()

  def epsilon(self, rounds_done: int) -> float:
    z, delta = float(self.dp.noise_multiplier), float(self.dp.delta)
    if self.view == "sum":
      return epsilon_sum(z, self.per_round, self.num_clients, rounds_done, delta)
    return epsilon_rows(z, int(self.uploads(rounds_done).max(initial=0)), delta)

  def describe(self) -> dict[str, Any]:
    """What summary.json records about the accounting."""
    return {
        "view": self.view,
        "accountant": "dp_accounting RDP, replace-one (noise multiplier z / 2)",
        "sampling": (
            "all clients every round"
            if self.per_round >= self.num_clients
            else f"{self.per_round} of {self.num_clients} without replacement"
        ),
        **dataclasses.asdict(self.dp),
    }


# ---------------------------------------------------------------------------------------------
# Faults: client dropouts.
# ---------------------------------------------------------------------------------------------


def drop_prob(config: ml_collections.ConfigDict) -> float:
  """``config.faults.drop_prob`` (0 when the config has no ``faults``)."""
  faults = config.get("faults", None) or {}
  return float(faults.get("drop_prob", 0.0))


def dropped_mask(
    seed: int, round_idx: int, ids: np.ndarray, num_clients: int, prob: float
) -> np.ndarray:
  """(len(ids),) bool: which of the round's clients drop out (their update never arrives).

  Drawn from (seed, round) only, per client id (the order of ``ids`` does not matter).

  >>> ids = np.arange(10)
  >>> m = dropped_mask(0, 3, ids, 10, 0.5)
  >>> bool((m == dropped_mask(0, 3, ids[::-1], 10, 0.5)[::-1]).all())
  True
  >>> bool(dropped_mask(0, 3, ids, 10, 0.0).any())
  False
  """
  ids = np.asarray(ids, np.int64)
  if prob <= 0:
    return np.zeros(ids.shape, bool)
  rng = np.random.default_rng(np.random.SeedSequence([seed, round_idx, 7919]))
  return rng.random(num_clients)[ids] < prob

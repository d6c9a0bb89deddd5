"""The MoE-aggregation toolkit every aggregator is written with.

* **Finding MoE blocks**: any params subtree with both ``router`` and ``experts`` keys
  (:func:`find_moe_blocks`, :func:`moe_blocks`); :class:`MoEBlock` gives the router kernel /
  bias keys, the expert leaves (expert axis first), E and D.
* **Round inputs** (:func:`prepare`): the client-stacked deltas flattened by path, validated
  and with every non-participating client (weight 0: padding, excluded, non-finite) zeroed.
  This is the one place where excluded clients are masked; the engine only sets their weight
  to 0 (:func:`client_ok`).
* **Weighted sums with a stated precision**: :func:`client_sum` (sum_c w[c] x[c], an einsum at
  ``Precision.HIGHEST``) and :func:`expert_sum` (sum_c w[c, e] x[c, e], a scan over clients of
  fused multiply-adds: exact float32 on every backend). Given ``part``, both read the deltas
  as the clients sent them (:attr:`Prepared.raw_deltas`) and treat the rows of non-
  participants as zero without copying the deltas (the cost of an aggregation over many
  clients is memory traffic: benchmarks/aggregation_time.py).
* **Robust sums**: inside :func:`fedalign.aggregation.robust.robust_reduction` (the round
  enters it for ``server.robust`` = median | trimmed_mean), :func:`client_sum` and
  :func:`expert_sum` return ``sum_c w[c] * location({x[c] : w[c] > 0})`` with the
  coordinate-wise median or trimmed mean as the location (per expert for (C, E) weights), so
  every aggregator written with them is robust without a change.
* **One server-optimizer path on pytrees** (:func:`init_server_optimizer`,
  :func:`apply_server_update`): the aggregated delta is handed to an optax transformation as
  the negated gradient (FedOpt, Reddi et al. 2021); entries marked ``keep`` (an expert that no
  client may update, a round nobody took part in) keep both their value and their optimizer
  state.

Example (FedAvg of a two-client round, written with the toolkit):
  >>> import jax.numpy as jnp
  >>> params = {'w': jnp.zeros(2)}
  >>> deltas = {'w': jnp.array([[1.0, 0.0], [3.0, jnp.nan]])}
  >>> prep = prepare(params, deltas, jnp.array([1.0, 0.0]))  # client 1 excluded
  >>> agg = {k: client_sum(prep.nw, d) for k, d in prep.flat_deltas.items()}
  >>> new, _ = apply_server_update(None, (), params, unflatten(agg))
  >>> new['w'].tolist()
  [1.0, 0.0]
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from fedalign.aggregation import robust
from fedalign.models.routing import STAT_NAMES, safe_div

PyTree = Any
Key = tuple[str, ...]
HIGHEST = jax.lax.Precision.HIGHEST
_EMPTY = traverse_util.empty_node


# --------------------------------------------------------------------------------------------
# Paths and MoE blocks.
# --------------------------------------------------------------------------------------------


def path_str(key: Key) -> str:
  """('layers_0', 'mlp') -> 'layers_0/mlp'."""
  return "/".join(str(k) for k in key)


def path_key(path: str) -> Key:
  """'layers_0/mlp' -> ('layers_0', 'mlp')."""
  return tuple(k for k in path.split("/") if k)


def _natural_key(path: str) -> list[Any]:
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def find_moe_blocks(params: Mapping[str, Any]) -> list[str]:
  """Paths ('a/b/c') of every subtree holding both 'router' and 'experts', in natural order.

  >>> find_moe_blocks({'layers_10': {'mlp': {'router': {}, 'experts': {}}},
  ...                  'layers_2': {'mlp': {'router': {}, 'experts': {}}}})
  ['layers_2/mlp', 'layers_10/mlp']
  """
  found = []

  def visit(node: Any, prefix: tuple[str, ...]) -> None:
    if not isinstance(node, Mapping):
      return
    if "router" in node and "experts" in node:
      found.append("/".join(prefix))
      return
    for k, v in node.items():
      visit(v, prefix + (str(k),))

  visit(params, ())
  return sorted(found, key=_natural_key)


class MoEBlock(NamedTuple):
  """Where one MoE block's routed parameters live in the flat params (keys are path tuples)."""

  path: str
  kernel_key: Key  # router/kernel (D, E)
  bias_key: Key | None  # router/bias (E,), when the router has one
  expert_keys: list[Key]  # every leaf under 'experts', expert axis first
  num_experts: int
  dim: int


def block_layout(flat_params: Mapping[Key, Any], path: str) -> MoEBlock:
  """The :class:`MoEBlock` at ``path`` of flattened params; clear errors on a bad layout."""
  prefix = path_key(path)
  n = len(prefix)
  kernel_key = prefix + ("router", "kernel")
  if kernel_key not in flat_params:
    raise ValueError(f"MoE block {path!r}: missing router kernel 'router/kernel' (D, E)")
  kshape = tuple(jnp.shape(flat_params[kernel_key]))
  if len(kshape) != 2:
    raise ValueError(f"MoE block {path!r}: router kernel has shape {kshape}, expected (D, E)")
  dim, num_experts = kshape
  bias_key = prefix + ("router", "bias")
  if bias_key in flat_params:
    bshape = tuple(jnp.shape(flat_params[bias_key]))
    if bshape != (num_experts,):
      raise ValueError(
          f"MoE block {path!r}: router bias has shape {bshape}, expected ({num_experts},)"
      )
  else:
    bias_key = None
  expert_keys = sorted(
      k for k, v in flat_params.items() if k[: n + 1] == prefix + ("experts",) and v is not _EMPTY
  )
  if not expert_keys:
    raise ValueError(f"MoE block {path!r}: 'experts' holds no parameter")
  for k in expert_keys:
    shape = tuple(jnp.shape(flat_params[k]))
    if not shape or shape[0] != num_experts:
      raise ValueError(
          f"MoE block {path!r}: expert leaf {path_str(k)!r} has shape {shape}, "
          f"expected the expert axis ({num_experts}, ...) first"
      )
  return MoEBlock(path, kernel_key, bias_key, expert_keys, num_experts, dim)


def moe_blocks(params: PyTree, who: str) -> list[MoEBlock]:
  """Every MoE block of ``params``; ``who`` names the caller in the error when there is none."""
  paths = find_moe_blocks(params)
  if not paths:
    raise ValueError(
        f"{who}: params contain no MoE block (a subtree with both 'router' and "
        "'experts' keys, router kernel (D, E), experts (E, ...))"
    )
  flat = flatten(params)
  return [block_layout(flat, p) for p in paths]


def check_stats(
    stats: Mapping[str, Any],
    block: MoEBlock,
    num_clients: int,
    fields: tuple[str, ...] = STAT_NAMES,
) -> dict[str, jax.Array]:
  """One block's client-stacked routing statistics, shape-checked, as float32 arrays."""
  if block.path not in stats:
    raise ValueError(f"no routing stats for MoE block {block.path!r}; got blocks {sorted(stats)}")
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
          f"{shape}, expected {expected[field]} (C={c} clients, E={e} experts, D={d})"
      )
    out[field] = jnp.asarray(s[field], jnp.float32)
  return out


# --------------------------------------------------------------------------------------------
# Round inputs: flattening, validation, exclusion.
# --------------------------------------------------------------------------------------------


def flatten(tree: PyTree) -> dict[Key, Any]:
  """Nested dict -> {path tuple: leaf} (empty subtrees dropped)."""
  flat = traverse_util.flatten_dict(tree, keep_empty_nodes=True)
  return {k: v for k, v in flat.items() if v is not _EMPTY}


def unflatten(flat: Mapping[Key, Any]) -> PyTree:
  """Inverse of :func:`flatten` (``None`` values stay ``None`` leaves)."""
  return traverse_util.unflatten_dict(dict(flat))


def client_ok(*trees: PyTree) -> jax.Array:
  """(C,) bool: every leaf of every client-stacked tree is finite for that client.

  >>> client_ok({'d': jnp.array([[1.0], [jnp.inf]])}, jnp.array([0.5, 0.1])).tolist()
  [True, False]
  """
  leaves = [x for t in trees for x in jax.tree.leaves(t)]
  per_leaf = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in leaves]
  return jnp.all(jnp.stack(per_leaf), axis=0)


def mask_clients(part: jax.Array, tree: PyTree) -> PyTree:
  """Zeroes every leaf's rows (leading client axis) where ``part`` is False (NaN included)."""

  def zero(x):
    if x is None:
      return None
    m = part.reshape(part.shape + (1,) * (jnp.ndim(x) - 1))
    return jnp.where(m, x, jnp.zeros((), jnp.result_type(x)))

  return jax.tree.map(zero, tree, is_leaf=lambda x: x is None)


class Prepared(NamedTuple):
  """A round's inputs as every aggregator reads them."""

  params: PyTree  # the global params as given
  flat_params: dict  # path tuple -> global parameter
  flat_deltas: dict  # path tuple -> (C, ...) float32 delta, excluded clients zeroed; None frozen
  part: jax.Array  # (C,) bool: the client takes part (weight > 0)
  weights: jax.Array  # (C,) n_i, 0 for clients that do not take part
  nw: jax.Array  # (C,) n_i / sum n over participants; all 0 when nobody takes part
  any_part: jax.Array  # () bool
  # path tuple -> (C, ...) float32 delta as sent: the rows of non-participants are NOT zeroed
  # (they may hold NaN). Read with ``part`` (client_sum / expert_sum) or mask what is computed
  # from them; None frozen. ``flat_deltas`` is this with the rows zeroed, which XLA turns into
  # a full copy of the deltas wherever the zeroing cannot be fused into the consumer.
  raw_deltas: dict


def prepare(global_params: PyTree, deltas: PyTree, weights: jax.Array) -> Prepared:
  """Flattens params and client-stacked deltas, checks shapes, zeroes excluded clients.

  A client takes part when its weight is > 0; the deltas of the others (padding, excluded,
  possibly NaN) are zeroed here, once, so no aggregator has to care. Leaves whose delta is
  ``None`` (or absent) are frozen.
  """
  weights = jnp.asarray(weights, jnp.float32)
  if weights.ndim != 1:
    raise ValueError(f"weights must have shape (C,), got {weights.shape}")
  num_clients = weights.shape[0]
  part = weights > 0  # False for NaN as well
  w_eff = jnp.where(part, weights, 0.0)
  total = jnp.sum(w_eff)
  any_part = total > 0
  nw = w_eff / jnp.where(any_part, total, 1.0)
  flat_p = flatten(global_params)
  flat_d_raw = {} if deltas is None else flatten(deltas)
  for key, value in flat_d_raw.items():
    if value is not None and key not in flat_p:
      raise ValueError(f"delta for {path_str(key)!r}, which is not a parameter leaf")
  flat_d, raw_d = {}, {}
  for key, p in flat_p.items():
    d = flat_d_raw.get(key)
    if d is None:
      flat_d[key] = raw_d[key] = None
      continue
    expected = (num_clients,) + tuple(jnp.shape(p))
    if tuple(jnp.shape(d)) != expected:
      raise ValueError(
          f"delta of {path_str(key)!r} has shape {tuple(jnp.shape(d))}, "
          f"expected {expected} (clients first)"
      )
    raw_d[key] = jnp.asarray(d, jnp.float32)
    flat_d[key] = mask_clients(part, raw_d[key])
  return Prepared(global_params, flat_p, flat_d, part, w_eff, nw, any_part, raw_d)


def block_stats(
    stats: Mapping[str, Any],
    block: MoEBlock,
    prep: Prepared,
    fields: tuple[str, ...] = STAT_NAMES,
) -> dict[str, jax.Array]:
  """:func:`check_stats` with the non-participating clients' rows zeroed."""
  return mask_clients(prep.part, check_stats(stats, block, prep.part.shape[0], fields))


# --------------------------------------------------------------------------------------------
# Weighted sums and safe ratios.
# --------------------------------------------------------------------------------------------


def client_sum(w: jax.Array, x: jax.Array, part: jax.Array | None = None) -> jax.Array:
  """sum_c w[c] x[c] for w (C,), x (C, ...): an einsum at ``Precision.HIGHEST``.

  With ``part`` ((C,) bool), rows where it is False count as zero whatever they hold (NaN,
  inf), as in ``client_sum(w, where(part, x, 0))``, but without that copy of ``x``: the einsum
  runs on ``x`` as given with those rows' weights set to 0 (0 * finite = 0 exactly), and only
  if its result is not finite (0 * inf = NaN: a non-participant's non-finite row leaked in) is
  it recomputed by :func:`expert_sum`'s scan, which zeroes each such row.

  >>> x = jnp.array([[1.0, 2.0], [jnp.nan, 0.0], [3.0, 4.0]])
  >>> client_sum(jnp.array([0.5, 0.0, 0.5]), x, jnp.array([True, False, True])).tolist()
  [2.0, 3.0]
  """
  reduction = robust.active_reduction()
  if reduction is not None:  # server.robust = median | trimmed_mean (robust.robust_reduction)
    return robust.robust_sum(w, x, part, kind=reduction[0], trim_fraction=reduction[1])
  if part is None:
    return jnp.einsum("c,c...->...", w, x, precision=HIGHEST)
  w = jnp.where(part, w, jnp.zeros((), jnp.result_type(w)))
  fast = jnp.einsum("c,c...->...", w, x, precision=HIGHEST)
  return jax.lax.cond(
      jnp.all(jnp.isfinite(fast)), lambda: fast, lambda: expert_sum(w, x, part).astype(fast.dtype)
  )


def expert_sum(w: jax.Array, x: PyTree, part: jax.Array | None = None) -> PyTree:
  """sum_c w[c, ...] x[c, ...] for w (C, E) (or (C,)) and x (C, E, ...) or a list/tree of such.

  A :func:`jax.lax.scan` over clients of fused multiply-adds, one pass over ``x`` (every leaf
  of a tree in the same loop): exact float32 on every backend, no temporary of ``x``'s size.
  (On CPU, the same sum as a reduction over the client axis or as an einsum with the expert
  axis as a batch axis copies or transposes ``x`` first; at 1000 clients x 64 experts that was
  tens of seconds: benchmarks/aggregation_breakdown.py.)

  With ``part`` ((C,) bool), rows where it is False count as zero whatever they hold (NaN).

  >>> expert_sum(jnp.array([[1.0, 0.0], [1.0, 2.0]]), jnp.ones((2, 2, 3)))[:, 0].tolist()
  [2.0, 2.0]
  """
  w = jnp.asarray(w)
  num_clients = w.shape[0]
  reduction = robust.active_reduction()
  if reduction is not None:  # server.robust = median | trimmed_mean (robust.robust_reduction)
    return jax.tree.map(
        lambda leaf: robust.robust_sum(
            w, leaf, part, kind=reduction[0], trim_fraction=reduction[1]
        ),
        x,
    )
  leaves, treedef = jax.tree.flatten(x)
  for leaf in leaves:
    if leaf.shape[: w.ndim] != w.shape:
      raise ValueError(f"expert_sum: x leaf of shape {leaf.shape} does not start with {w.shape}")
  if part is None:
    part = jnp.ones((num_clients,), bool)
    masked = False
  else:
    masked = True

  def body(acc, inputs):
    wc, pc, xs = inputs
    new = []
    for a, xc in zip(acc, xs):
      term = wc.reshape(wc.shape + (1,) * (xc.ndim - wc.ndim)).astype(xc.dtype) * xc
      if masked:
        term = jnp.where(pc, term, jnp.zeros((), a.dtype))
      new.append(a + term)
    return new, None

  init = [jnp.zeros(leaf.shape[1:], leaf.dtype) for leaf in leaves]
  out, _ = jax.lax.scan(body, init, (w, part, leaves))
  return jax.tree.unflatten(treedef, out)


def normalize(s: jax.Array, axis: int = 0, fallback: Any = 0.0) -> jax.Array:
  """s / sum(s, axis) where the sum is > 0, else ``fallback`` (e.g. FedAvg weights)."""
  return safe_div(s, jnp.sum(s, axis=axis, keepdims=True), fallback)


# --------------------------------------------------------------------------------------------
# The server optimizer (one path, on pytrees).
# --------------------------------------------------------------------------------------------


def restrict(params: PyTree, template: PyTree | None) -> PyTree:
  """``params`` with ``None`` wherever ``template`` is ``None`` or ``False`` (or lacks the leaf).

  ``template`` is e.g. the trainable partition, client-stacked deltas or a boolean trainable
  mask; a ``None`` subtree freezes every leaf below it. None = keep every leaf.

  >>> restrict({'a': {'w': 1, 'b': 2}, 'c': 3}, {'a': None, 'c': True})
  {'a': {'b': None, 'w': None}, 'c': 3}
  """
  if template is None:
    return params
  flat_t = traverse_util.flatten_dict(template)

  def pick(path, p):
    key = tuple(str(k.key) for k in path)
    for i in range(1, len(key) + 1):
      if key[:i] in flat_t:
        t = flat_t[key[:i]]
        return None if (t is None or t is False) else p
    return None

  return jax.tree_util.tree_map_with_path(pick, params)


def init_server_optimizer(
    optimizer: optax.GradientTransformation | None, params: PyTree, trainable: PyTree | None
) -> PyTree:
  """The optimizer state over the trainable leaves of ``params`` (``()`` without optimizer)."""
  if optimizer is None:
    return ()
  return optimizer.init(restrict(params, trainable))


def apply_server_update(
    optimizer: optax.GradientTransformation | None,
    opt_state: PyTree,
    params: PyTree,
    delta: PyTree,
    keep: PyTree | None = None,
) -> tuple[PyTree, PyTree]:
  """global + optimizer(-delta) (plain global + delta without optimizer).

  Args:
    optimizer: optax transformation fed with the negated aggregated delta; None = identity.
    opt_state: its state (from :func:`init_server_optimizer` over the same trainable leaves).
    params: the global params.
    delta: params-structured aggregated delta, ``None`` at leaves that do not train.
    keep: optional bool tree like ``delta`` (each leaf broadcastable to the param's shape):
      True entries keep their value and their optimizer state this round (momentum or Adam
      moments do not move them either).

  Returns:
    (new params, new optimizer state).
  """
  sub = restrict(params, delta)
  if optimizer is None:
    updates = delta
  else:
    grads = jax.tree.map(lambda d: -d, delta)
    updates, new_state = optimizer.update(grads, opt_state, sub)
    if keep is not None:
      state_keep = optax.tree_utils.tree_map_params(
          optimizer, lambda _, k: k, new_state, keep, transform_non_params=lambda _: None
      )
      new_state = jax.tree.map(
          lambda k, new, old: new if k is None else jnp.where(k, old, new),
          state_keep,
          new_state,
          opt_state,
          is_leaf=lambda x: x is None,
      )
    opt_state = new_state

  def step(p, u, k):
    if u is None:
      return p
    u = u.astype(p.dtype)
    return p + (u if k is None else jnp.where(k, jnp.zeros((), p.dtype), u))

  keep_tree = jax.tree.map(lambda _: None, delta) if keep is None else keep
  new_params = jax.tree.map(
      lambda p, u, k: step(p, u, k), params, updates, keep_tree, is_leaf=lambda x: x is None
  )
  return new_params, opt_state


def like_params(params: PyTree, flat: Mapping[Key, Any]) -> PyTree:
  """A tree of ``params``' structure with ``flat[path]`` at each leaf (None where absent)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: flat.get(tuple(str(k.key) for k in path)), params
  )


def finish(
    prep: Prepared,
    agg: Mapping[Key, Any],
    optimizer: optax.GradientTransformation | None,
    opt_state: PyTree,
    keep: Mapping[Key, jax.Array] | None = None,
) -> tuple[PyTree, PyTree]:
  """Applies a round's aggregated flat delta through the server optimizer.

  Args:
    prep: the round's :class:`Prepared` inputs.
    agg: {leaf key: aggregated delta (None = frozen)}.
    optimizer, opt_state: the server optimizer (None = plain addition) and its state.
    keep: optional {leaf key: bool array broadcastable to the leaf}: entries that keep their
      value and optimizer state (e.g. an expert whose A(e) is empty).

  A round in which no client took part changes neither params nor optimizer state.
  """
  keep = keep or {}
  delta = like_params(prep.params, agg)
  keep_tree = like_params(prep.params, {k: keep.get(k) for k in agg if agg[k] is not None})
  new_params, new_state = apply_server_update(optimizer, opt_state, prep.params, delta, keep_tree)
  unchanged_if_nobody = lambda new, old: jnp.where(prep.any_part, new, old)
  return (
      jax.tree.map(unchanged_if_nobody, new_params, prep.params),
      jax.tree.map(unchanged_if_nobody, new_state, opt_state),
  )

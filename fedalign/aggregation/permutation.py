"""Expert permutation alignment (fedalign-moe.md section 4.5).

Routed experts of a Mixture-of-Experts block are interchangeable: permuting the expert axis of
every leaf under ``'experts'`` together with the router's output axis leaves the block's
function unchanged. Two independently trained copies of a model (or a client after long local
training) may therefore hold "the same" expert under different indices. This module finds, for
every MoE block independently, the permutation that best matches a client's experts to a
reference's (maximum-weight bipartite matching of an (E, E) similarity matrix) and applies it
to parameters and routing statistics.

Everything runs in-graph: the exact assignment solver is a pure-JAX shortest-augmenting-path
Hungarian algorithm (Jonker-Volgenant style, O(n^3)) built on ``jax.lax`` loops, so it can live
inside the jitted aggregation, be vmapped over clients and layers, and needs no host callback.

Main entry points:

* :func:`linear_sum_assignment` / :func:`assignment_perm`: exact assignment solver.
* :func:`expert_similarity`: (E, E) score matrices (centroid or weight-space cosine).
* :func:`permute_moe_block`, :func:`permute_routing_stats`: apply a permutation.
* :func:`align_client_to_reference`: similarity + solve + permute for one block (jittable).
* :func:`find_moe_blocks`, :func:`get_path`, :func:`set_path`, :func:`align_params`,
  :func:`permute_params`: whole-params-tree helpers, e.g. to merge independently fine-tuned
  checkpoints.

Conventions: ``perm[e]`` is the *client* expert placed at global index ``e`` (new expert ``e`` =
old expert ``perm[e]``); in score matrices rows are global/reference experts and columns are
client experts, so the solver's "column assigned to row e" is exactly ``perm[e]``.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fedalign.aggregation.moe_blocks import find_moe_blocks
from fedalign.models.tree import get_path, set_path

PyTree = Any

# Routing-statistics leaves (contract names) that carry the expert axis first / no expert axis.
EXPERT_AXIS_STATS = ("prob_sum", "select_count", "margin_sum", "gate_sum", "centroid_sum")
NO_EXPERT_AXIS_STATS = ("token_count",)

_EPS = 1e-12


# --------------------------------------------------------------------------------------------
# Exact assignment solver.
# --------------------------------------------------------------------------------------------


def _work_dtype() -> jnp.dtype:
  """float64 when jax x64 is enabled, float32 otherwise."""
  return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _lsa_min_rows(cost: jax.Array) -> jax.Array:
  """Minimum-cost assignment of every row of an (n, m) matrix, n <= m (no batch axes).

  Shortest augmenting path Hungarian algorithm with dual potentials u (rows) and v (columns)
  (the e-maxx / Jonker-Volgenant formulation, as in scipy): rows are inserted one at a time;
  for each, a Dijkstra-like search over reduced costs a[i, j] - u[i] - v[j] grows a tree of
  columns until it reaches a free column, potentials are updated so reduced costs stay >= 0,
  and the matching is flipped along the path. Arrays use a dummy index 0 (1-based rows and
  columns) exactly like the reference formulation. The inner loop over columns is vectorised,
  so there are O(n^2) sequential steps of O(m) vector work.

  Returns:
    (n,) int32, the column assigned to each row.
  """
  n, m = cost.shape
  dt = cost.dtype
  inf = jnp.array(jnp.inf, dt)
  a = jnp.zeros((n + 1, m + 1), dt).at[1:, 1:].set(cost)
  u0 = jnp.zeros((n + 1,), dt)
  v0 = jnp.zeros((m + 1,), dt)
  p0 = jnp.zeros((m + 1,), jnp.int32)  # p[j]: row matched to column j (0 = free)
  way0 = jnp.zeros((m + 1,), jnp.int32)  # way[j]: previous column on the shortest path

  def insert_row(i, carry):
    u, v, p, way = carry
    p = p.at[0].set(i)
    minv = jnp.full((m + 1,), inf)
    used = jnp.zeros((m + 1,), bool)

    def search_cond(s):
      _, _, p, _, _, _, j0, k = s
      # k bounds the loop (at most m + 1 columns can be added); only matters for non-finite input.
      return (p[j0] != 0) & (k <= m)

    def search_body(s):
      u, v, p, way, minv, used, j0, k = s
      used = used.at[j0].set(True)
      i0 = p[j0]
      cur = a[i0] - u[i0] - v
      better = (~used) & (cur < minv)
      minv = jnp.where(better, cur, minv)
      way = jnp.where(better, j0, way)
      masked = jnp.where(used, inf, minv)
      j1 = jnp.argmin(masked).astype(jnp.int32)
      delta = masked[j1]
      # Rows in the tree = rows matched to used columns (p[0] = i is the new row).
      in_tree = jnp.zeros((n + 1,), jnp.int32).at[p].max(used.astype(jnp.int32)) > 0
      u = jnp.where(in_tree, u + delta, u)
      v = jnp.where(used, v - delta, v)
      minv = jnp.where(used, minv, minv - delta)
      return u, v, p, way, minv, used, j1, k + 1

    u, v, p, way, _, _, j0, _ = jax.lax.while_loop(
        search_cond, search_body, (u, v, p, way, minv, used, jnp.int32(0), jnp.int32(0))
    )

    def augment_cond(s):
      _, j0, k = s
      return (j0 != 0) & (k <= m)

    def augment_body(s):
      p, j0, k = s
      j1 = way[j0]
      return p.at[j0].set(p[j1]), j1, k + 1

    p, _, _ = jax.lax.while_loop(augment_cond, augment_body, (p, j0, jnp.int32(0)))
    return u, v, p, way

  _, _, p, _ = jax.lax.fori_loop(1, n + 1, insert_row, (u0, v0, p0, way0))
  rows = p[1:]  # row (1-based, 0 = none) of each column
  target = jnp.where(rows > 0, rows - 1, n)  # n is out of bounds -> dropped
  col_for_row = (
      jnp.full((n,), -1, jnp.int32).at[target].set(jnp.arange(m, dtype=jnp.int32), mode="drop")
  )
  return col_for_row


def _prepare(matrix: jax.Array, maximize: bool) -> jax.Array:
  """Cast to the working dtype, turn into a cost, and subtract row minima (n <= m only)."""
  cost = jnp.asarray(matrix).astype(_work_dtype())
  if maximize:
    cost = -cost
  # Subtracting a constant from each row changes every full row assignment's cost by the same
  # amount (each row is assigned exactly once when n <= m) and improves float32 accuracy.
  return cost - jnp.min(cost, axis=-1, keepdims=True)


def _batched(fn, ndim_core: int, x: jax.Array):
  """Apply fn to the trailing ``ndim_core`` axes of x, vmapping over the leading ones."""
  for _ in range(x.ndim - ndim_core):
    fn = jax.vmap(fn)
  return fn(x)


def assignment_perm(matrix: jax.Array, maximize: bool = True) -> jax.Array:
  """Exact optimal assignment of every row of a (..., n, m) matrix (n <= m) to distinct columns.

  Pure JAX (``lax.fori_loop`` / ``lax.while_loop``), jittable, vmappable, no host callback.
  Leading axes are batch axes. Works in float64 when ``jax_enable_x64`` is on, else float32
  (optimal value exact up to float32 rounding; integer-valued inputs of moderate size are
  solved exactly). Entries must be finite: NaN/inf give an unspecified (but terminating) result.

  Args:
    matrix: (..., n, m) scores (``maximize=True``, the default) or costs, with n <= m.
    maximize: maximise the total score (default) instead of minimising the total cost.

  Returns:
    (..., n) int32 ``perm`` with ``perm[i]`` = column assigned to row i. For square input this
    is a permutation.

  >>> s = jnp.array([[0.1, 0.9, 0.0], [0.8, 0.2, 0.1], [0.0, 0.3, 0.7]])
  >>> assignment_perm(s).tolist()
  [1, 0, 2]
  >>> assignment_perm(s, maximize=False).tolist()  # min cost 0.0 + 0.2 + 0.0
  [2, 1, 0]
  """
  matrix = jnp.asarray(matrix)
  if matrix.ndim < 2:
    raise ValueError(f"assignment_perm needs a (..., n, m) matrix, got shape {matrix.shape}")
  n, m = matrix.shape[-2:]
  if n > m:
    raise ValueError(
        f"assignment_perm needs n <= m (every row gets a column), got {n} x {m}; "
        "use linear_sum_assignment for tall matrices"
    )
  if n == 0:
    return jnp.zeros(matrix.shape[:-1], jnp.int32)
  return _batched(_lsa_min_rows, 2, _prepare(matrix, maximize))


def linear_sum_assignment(matrix: jax.Array, maximize: bool = True) -> tuple[jax.Array, jax.Array]:
  """scipy-like exact linear sum assignment in pure JAX: ``(row_ind, col_ind)``.

  Same output convention as ``scipy.optimize.linear_sum_assignment`` for any (n, m) matrix
  (``min(n, m)`` pairs, ``row_ind`` sorted ascending), but note the **default is
  ``maximize=True``** (scores), unlike scipy. Jittable, vmappable over leading batch axes, no host
  callback. Tall matrices (n > m) are solved on the transpose. See :func:`assignment_perm`.

  >>> s = jnp.array([[1.0, 5.0], [4.0, 2.0], [0.0, 3.0]])
  >>> r, c = linear_sum_assignment(s)
  >>> r.tolist(), c.tolist()
  ([0, 1], [1, 0])
  """
  matrix = jnp.asarray(matrix)
  if matrix.ndim < 2:
    raise ValueError(f"linear_sum_assignment needs a (..., n, m) matrix, got {matrix.shape}")
  n, m = matrix.shape[-2:]
  batch = matrix.shape[:-2]
  if n <= m:
    col = assignment_perm(matrix, maximize)
    row = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), batch + (n,))
    return row, col
  row_for_col = assignment_perm(jnp.swapaxes(matrix, -1, -2), maximize)  # (..., m)
  order = jnp.argsort(row_for_col, axis=-1).astype(jnp.int32)
  return jnp.take_along_axis(row_for_col, order, axis=-1), order


# --------------------------------------------------------------------------------------------
# Similarities.
# --------------------------------------------------------------------------------------------


def _cosine_matrix(a: jax.Array, b: jax.Array) -> jax.Array:
  """(E, F) x (E', F) -> (E, E') cosine similarities in float32 (0 for zero vectors)."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  an = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), _EPS)
  bn = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), _EPS)
  return jnp.matmul(an, bn.T, precision=jax.lax.Precision.HIGHEST)


def expert_weight_vectors(block: Mapping[str, Any], include_router: bool = True) -> jax.Array:
  """(E, P) flattened per-expert weights of an MoE block: all 'experts' leaves (+ router column).

  Leaves are visited in sorted-key order (``jax.tree_util``), so two blocks with the same
  structure give comparable vectors.

  >>> blk = {'router': {'kernel': jnp.ones((2, 3))}, 'experts': {'wo': jnp.ones((3, 4, 2))}}
  >>> expert_weight_vectors(blk).shape
  (3, 10)
  """
  experts = jax.tree_util.tree_leaves(block["experts"])
  num_experts = experts[0].shape[0]
  parts = [x.reshape(num_experts, -1).astype(jnp.float32) for x in experts]
  if include_router:
    for x in jax.tree_util.tree_leaves(block["router"]):
      parts.append(jnp.moveaxis(x, -1, 0).reshape(num_experts, -1).astype(jnp.float32))
  return jnp.concatenate(parts, axis=1)


def expert_similarity(
    ref: Any, client: Any, kind: str = "centroid_cosine", include_router: bool = True
) -> jax.Array:
  """(E, E) similarity of global/reference experts (rows e) and client experts (columns e').

  Args:
    ref, client: for ``kind='centroid_cosine'``, (E, D) centroids (e.g. the previous round's
      global centroids and the client's mu_i, or the raw ``centroid_sum``: cosine ignores the
      positive per-expert scale; zero rows give similarity 0). For ``kind='weight_cosine'``,
      two MoE blocks (dicts with 'router' and 'experts') of the same structure.
    kind: 'centroid_cosine' (function space) or 'weight_cosine' (cosine of the flattened
      per-expert weight vectors, see :func:`expert_weight_vectors`).
    include_router: weight_cosine only: include the expert's router column (and bias).

  >>> c = jnp.eye(3)
  >>> expert_similarity(c, c[::-1]).tolist()[0]
  [0.0, 0.0, 1.0]
  """
  if kind == "centroid_cosine":
    return _cosine_matrix(jnp.asarray(ref), jnp.asarray(client))
  if kind == "weight_cosine":
    return _cosine_matrix(
        expert_weight_vectors(ref, include_router), expert_weight_vectors(client, include_router)
    )
  raise ValueError(f"unknown similarity kind {kind!r}; use 'centroid_cosine' or 'weight_cosine'")


# --------------------------------------------------------------------------------------------
# Applying permutations.
# --------------------------------------------------------------------------------------------


def _num_experts(block: Mapping[str, Any]) -> int:
  return jnp.shape(block["router"]["kernel"])[-1]


def permute_moe_block(block: Mapping[str, Any], perm: jax.Array) -> dict[str, Any]:
  """Reorder the routed experts of one MoE block: new expert e = old expert ``perm[e]``.

  Every leaf under ``'experts'`` is permuted along axis 0 and every leaf under ``'router'``
  (kernel (D, E), bias (E,)) along its last axis; all other keys (shared experts, ...) are
  returned untouched. The block's function is unchanged. Raises if a router leaf's last axis is
  not E. For client-stacked blocks, ``jax.vmap`` this function.

  >>> blk = {'router': {'kernel': jnp.arange(6.).reshape(2, 3)},
  ...        'experts': {'wo': jnp.arange(3.)[:, None, None]}}
  >>> out = permute_moe_block(blk, jnp.array([2, 0, 1]))
  >>> out['experts']['wo'].ravel().tolist(), out['router']['kernel'][0].tolist()
  ([2.0, 0.0, 1.0], [2.0, 0.0, 1.0])
  """
  num_experts = _num_experts(block)
  perm = jnp.asarray(perm)

  def router_leaf(x):
    if jnp.ndim(x) == 0 or jnp.shape(x)[-1] != num_experts:
      raise ValueError(
          f"router leaf of shape {jnp.shape(x)} has no trailing expert axis "
          f"of size {num_experts}"
      )
    return jnp.take(x, perm, axis=-1)

  def expert_leaf(x):
    if jnp.ndim(x) == 0 or jnp.shape(x)[0] != num_experts:
      raise ValueError(
          f"experts leaf of shape {jnp.shape(x)} has no leading expert axis "
          f"of size {num_experts}"
      )
    return jnp.take(x, perm, axis=0)

  out = dict(block)
  out["router"] = jax.tree_util.tree_map(router_leaf, block["router"])
  out["experts"] = jax.tree_util.tree_map(expert_leaf, block["experts"])
  return out


def permute_routing_stats(stats: Mapping[str, jax.Array], perm: jax.Array) -> dict[str, Any]:
  """Reorder one block's routing statistics like :func:`permute_moe_block`.

  ``prob_sum``, ``select_count``, ``margin_sum``, ``gate_sum``, ``centroid_sum`` are permuted
  along axis 0; ``token_count`` is kept. Unknown keys raise (so that a new statistic is not
  silently left in the old expert order).

  >>> s = {'token_count': jnp.array(4.), 'prob_sum': jnp.array([1., 2., 3.])}
  >>> permute_routing_stats(s, jnp.array([2, 0, 1]))['prob_sum'].tolist()
  [3.0, 1.0, 2.0]
  """
  out = {}
  for key, value in stats.items():
    if key in EXPERT_AXIS_STATS:
      out[key] = jnp.take(value, jnp.asarray(perm), axis=0)
    elif key in NO_EXPERT_AXIS_STATS:
      out[key] = value
    else:
      raise ValueError(
          f"unknown routing statistic {key!r}: add it to EXPERT_AXIS_STATS or "
          "NO_EXPERT_AXIS_STATS in fedalign.aggregation.permutation"
      )
  return out


def align_client_to_reference(
    ref_block: Mapping[str, Any] | None,
    client_block: Mapping[str, Any],
    client_stats: Mapping[str, jax.Array] | None = None,
    ref_centroids: jax.Array | None = None,
    method: str = "weights",
    identity_bonus: float = 1e-6,
) -> tuple[dict[str, Any], dict[str, Any] | None, jax.Array]:
  """Align one client's MoE block (and statistics) to the reference expert indices.

  Builds the (E, E) similarity of reference experts (rows) and client experts (columns),
  solves the maximum-weight assignment exactly in-graph, and permutes the client's expert
  tensors, router columns and (if given) statistics. Jittable with ``method`` static
  (``jax.jit(align_client_to_reference, static_argnames='method')``) and vmappable over
  clients (see :func:`align_clients`).

  Args:
    ref_block: the reference/global MoE block (used by ``method='weights'``; may be None for
      'centroids').
    client_block: the client's MoE block.
    client_stats: the client's routing statistics for this block (permuted too; required for
      ``method='centroids'``, where the client centroids come from ``centroid_sum``).
    ref_centroids: (E, D) reference centroids (e.g. previous round's global mu) for
      ``method='centroids'``.
    method: 'weights' (weight-space cosine) or 'centroids' (cosine of centroids).
    identity_bonus: added to the diagonal of the similarity so that exact ties (e.g. experts
      no token selected, whose centroid similarity is 0 everywhere) keep their own index.

  Returns:
    (aligned_block, aligned_stats or None, perm) with aligned expert e = client expert perm[e].

  >>> blk = {'router': {'kernel': jnp.eye(3)},
  ...        'experts': {'wo': jnp.eye(3)[:, :, None] + 1.0}}
  >>> shuffled = permute_moe_block(blk, jnp.array([1, 2, 0]))
  >>> _, _, perm = align_client_to_reference(blk, shuffled)
  >>> perm.tolist()
  [2, 0, 1]
  """
  if method == "weights":
    if ref_block is None:
      raise ValueError("method='weights' needs ref_block")
    score = expert_similarity(ref_block, client_block, kind="weight_cosine")
  elif method == "centroids":
    if client_stats is None or ref_centroids is None:
      raise ValueError("method='centroids' needs client_stats and ref_centroids")
    score = expert_similarity(ref_centroids, client_stats["centroid_sum"], kind="centroid_cosine")
  else:
    raise ValueError(f"unknown method {method!r}; use 'weights' or 'centroids'")
  score = score + identity_bonus * jnp.eye(score.shape[0], dtype=score.dtype)
  perm = assignment_perm(score, maximize=True)
  aligned_block = permute_moe_block(client_block, perm)
  aligned_stats = None if client_stats is None else permute_routing_stats(client_stats, perm)
  return aligned_block, aligned_stats, perm


def align_clients(
    ref_block: Mapping[str, Any] | None,
    client_blocks: Mapping[str, Any],
    client_stats: Mapping[str, jax.Array] | None = None,
    ref_centroids: jax.Array | None = None,
    method: str = "weights",
    identity_bonus: float = 1e-6,
) -> tuple[dict[str, Any], dict[str, Any] | None, jax.Array]:
  """:func:`align_client_to_reference` vmapped over a leading client axis (C, ...).

  ``client_blocks`` / ``client_stats`` have a leading client axis; ``ref_block`` and
  ``ref_centroids`` are shared. Returns client-stacked aligned block, stats and (C, E) perms.
  Note: the block passed must contain only client-stacked leaves (e.g. just 'router' and
  'experts').

  >>> blk = {'router': {'kernel': jnp.eye(2)}, 'experts': {'wo': jnp.eye(2)[:, :, None]}}
  >>> two = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), blk)
  >>> align_clients(blk, two)[2].tolist()
  [[0, 1], [0, 1]]
  """
  fn = functools.partial(align_client_to_reference, method=method, identity_bonus=identity_bonus)
  return jax.vmap(fn, in_axes=(None, 0, 0, None))(
      ref_block, client_blocks, client_stats, ref_centroids
  )


# --------------------------------------------------------------------------------------------
# Params-tree helpers.
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("identity_bonus",))
def _align_block_weights(ref_block, client_block, identity_bonus):
  aligned, _, perm = align_client_to_reference(
      ref_block, client_block, method="weights", identity_bonus=identity_bonus
  )
  return aligned, perm


def align_params(
    reference_params: Mapping[str, Any],
    params: Mapping[str, Any],
    method: str = "weights",
    identity_bonus: float = 1e-6,
) -> tuple[Any, dict[str, jax.Array]]:
  """Align every MoE block of ``params`` to ``reference_params`` independently (one-shot).

  The standalone utility to merge independently fine-tuned MoE checkpoints: for each block
  (see :func:`find_moe_blocks`) the client's experts and router columns are permuted to best
  match the reference's experts in weight space. Only the routed experts and routers change;
  the returned model computes the same function as ``params``. Apply the returned perms to
  routing statistics with :func:`permute_stats`. Blocks of equal shapes share one compilation.

  Args:
    reference_params, params: params trees with the same MoE block paths and shapes.
    method: only 'weights' (no statistics needed) is supported here; for centroid alignment
      call :func:`align_client_to_reference` per block.
    identity_bonus: see :func:`align_client_to_reference`.

  Returns:
    (aligned_params, {block_path: perm}).

  Example, merge two fine-tuned models by aligning then averaging:

  >>> def blk(w): return {'router': {'kernel': w.T}, 'experts': {'wo': w[:, :, None]}}
  >>> w = jnp.array([[1., 0., 0.], [0., 2., 0.], [0., 0., 3.]])
  >>> model_a = {'layers_0': {'mlp': blk(w)}, 'norm': jnp.ones(2)}
  >>> model_b = {'layers_0': {'mlp': permute_moe_block(blk(w + 0.1), jnp.array([2, 0, 1]))},
  ...            'norm': jnp.zeros(2)}
  >>> aligned_b, perms = align_params(model_a, model_b)
  >>> perms['layers_0/mlp'].tolist()
  [1, 2, 0]
  >>> merged = jax.tree_util.tree_map(lambda x, y: (x + y) / 2, model_a, aligned_b)
  >>> print(merged['layers_0']['mlp']['experts']['wo'][0, :, 0])
  [1.05 0.05 0.05]
  """
  if method != "weights":
    raise ValueError(
        "align_params supports method='weights' only; use "
        "align_client_to_reference per block for centroid alignment"
    )
  out = params
  perms = {}
  for path in find_moe_blocks(params):
    ref_block = get_path(reference_params, path)
    block = get_path(params, path)
    core = {"router": block["router"], "experts": block["experts"]}
    ref_core = {"router": ref_block["router"], "experts": ref_block["experts"]}
    ref_shapes = jax.tree_util.tree_map(jnp.shape, ref_core)
    shapes = jax.tree_util.tree_map(jnp.shape, core)
    if ref_shapes != shapes:
      raise ValueError(f"MoE block {path!r}: reference shapes {ref_shapes} != {shapes}")
    aligned_core, perm = _align_block_weights(ref_core, core, identity_bonus)
    new_block = dict(block)
    new_block.update(aligned_core)
    out = set_path(out, path, new_block)
    perms[path] = perm
  return out, perms


def permute_params(params: Mapping[str, Any], perms: Mapping[str, jax.Array]) -> Any:
  """Apply ``{block_path: perm}`` (e.g. from :func:`align_params`) to a params tree.

  >>> p = {'moe': {'router': {'kernel': jnp.eye(2)}, 'experts': {'wo': jnp.arange(2.)}}}
  >>> permute_params(p, {'moe': jnp.array([1, 0])})['moe']['experts']['wo'].tolist()
  [1.0, 0.0]
  """
  for path, perm in perms.items():
    params = set_path(params, path, permute_moe_block(get_path(params, path), perm))
  return params


def permute_stats(
    stats: Mapping[str, Mapping[str, jax.Array]], perms: Mapping[str, jax.Array]
) -> dict[str, Any]:
  """Apply ``{block_path: perm}`` to ``{block_path: routing stats}`` (blocks without perm kept).

  >>> s = {'moe': {'token_count': jnp.array(1.), 'prob_sum': jnp.array([.25, .75])}}
  >>> permute_stats(s, {'moe': jnp.array([1, 0])})['moe']['prob_sum'].tolist()
  [0.75, 0.25]
  """
  return {
      path: permute_routing_stats(s, perms[path]) if path in perms else s
      for path, s in stats.items()
  }

"""One federated round as one jitted function.

broadcast -> ``vmap(client_update, spmd_axis_name='clients')`` over the sampled clients ->
exclusion of non-finite updates -> the algorithm's aggregation. On a
:class:`jax.sharding.Mesh` with a ``'clients'`` axis the same function shards the client axis
over devices (and hosts under ``jax.distributed``); on one device it is a plain vmap.

Clients can be processed in chunks (``chunk_size``): a chunk is vmapped, chunks run one after
another under :func:`jax.lax.map`, so activation memory scales with the chunk, not with the
number of clients per round. The per-client deltas of the round are kept (the FedAlign-MoE
aggregation compares clients pairwise), which costs C x (trainable parameters): small with
LoRA.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedalign.aggregation.scaffold import CLIENT_STATE_DELTA
from fedalign.federated.algorithms import Algorithm
from fedalign.models.lora import partition

PyTree = Any
CLIENT_AXIS = "clients"


def client_rngs(seed: int | jax.Array, round_idx: jax.Array, client_ids: jax.Array) -> jax.Array:
  """Per-client keys derived from (seed, round, client) only."""
  base = jax.random.fold_in(jax.random.key(seed), round_idx)
  return jax.vmap(lambda c: jax.random.fold_in(base, c))(client_ids)


def finite(tree: PyTree) -> jax.Array:
  """True when every leaf of ``tree`` is finite everywhere (a scalar bool array).

  >>> import jax.numpy as jnp
  >>> bool(finite({'a': jnp.ones(2), 'b': jnp.array([1.0, jnp.nan])}))
  False
  """
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_round_fn(
    client_update: Callable,
    algorithm: Algorithm,
    trainable_mask: PyTree,
    *,
    seed: int,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
) -> Callable:
  """Returns ``round_fn(server_state, batches, weights, client_ids, round_idx)``.

  Args:
    client_update: from :func:`fedalign.federated.client.make_client_update`.
    algorithm: the method's hooks (aggregator, broadcast, client state).
    trainable_mask: boolean tree of trainable leaves.
    seed: the run's seed (client rngs derive from seed, round and client id).
    chunk_size: clients per vmapped chunk (None = all at once). The number of clients per
      round must be a multiple of it (the server pads with weight-0 clients).
    mesh: optional mesh with a 'clients' axis; the client axis of the data is sharded on it.

  ``server_state`` = {'params', 'agg', 'client_states' (N, ...) or None}. ``batches`` maps
  names to (C, steps, ...) arrays incl. ``step_mask`` (C, steps). ``weights`` (C,) = n_i,
  0 for padding clients. Returns (new_server_state, metrics).
  """
  spmd = CLIENT_AXIS if mesh is not None else None
  vmapped = jax.vmap(client_update, in_axes=(None, None, 0, None, 0, 0), spmd_axis_name=spmd)

  def run_clients(global_trainable, frozen, batches, broadcast, cstates, rngs):
    if chunk_size is None or chunk_size >= rngs.shape[0]:
      return vmapped(global_trainable, frozen, batches, broadcast, cstates, rngs)
    n = rngs.shape[0]
    if n % chunk_size:
      raise ValueError(
          f"clients per round ({n}) must be a multiple of chunk_size "
          f"({chunk_size}); pad with weight-0 clients."
      )
    split = lambda x: x.reshape((n // chunk_size, chunk_size) + x.shape[1:])
    outs = jax.lax.map(
        lambda xs: vmapped(global_trainable, frozen, xs[0], broadcast, xs[1], xs[2]),
        (jax.tree.map(split, batches), jax.tree.map(split, cstates), split(rngs)),
    )
    return jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), outs)

  def round_fn(server_state, batches, weights, client_ids, round_idx):
    params = server_state["params"]
    trainable, frozen = partition(params, trainable_mask)
    broadcast = algorithm.broadcast(server_state["agg"])
    has_cstate = algorithm.init_client_state is not None
    if has_cstate:
      cstates = jax.tree.map(lambda x: x[client_ids], server_state["client_states"])
    else:
      cstates = jnp.zeros((client_ids.shape[0],), jnp.float32)
    if mesh is not None:
      shard = NamedSharding(mesh, P(CLIENT_AXIS))
      batches = jax.lax.with_sharding_constraint(batches, shard)
    rngs = client_rngs(seed, round_idx, client_ids)
    deltas, stats, metrics, new_cstates = run_clients(
        trainable, frozen, batches, broadcast, cstates, rngs
    )
    ok = jax.vmap(lambda d, s, m: finite((d, s, m)))(deltas, stats, metrics["train_loss"])
    weights = jnp.where(ok, jnp.asarray(weights, jnp.float32), 0.0)
    zero_bad = lambda x: jnp.where(ok.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)
    deltas = jax.tree.map(zero_bad, deltas)
    stats = jax.tree.map(zero_bad, stats)
    agg_stats = dict(stats)
    new_state = dict(server_state)
    if has_cstate:
      new_cstates = jax.tree.map(
          lambda new, old: jnp.where(ok.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
          new_cstates,
          cstates,
      )
      agg_stats[CLIENT_STATE_DELTA] = jax.tree.map(
          lambda new, old: zero_bad(new - old), new_cstates, cstates
      )
      participating = weights > 0
      new_state["client_states"] = jax.tree.map(
          lambda all_, new, old: all_.at[client_ids].set(
              jnp.where(participating.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
          ),
          server_state["client_states"],
          new_cstates,
          cstates,
      )
    new_params, agg_state, diagnostics = algorithm.aggregator.aggregate(
        server_state["agg"], params, deltas, agg_stats, weights
    )
    new_state["params"] = new_params
    new_state["agg"] = agg_state
    real = weights > 0
    losses = jnp.where(real, metrics["train_loss"], 0.0)
    out = {
        "train_loss": jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1e-12),
        "client_train_loss": metrics["train_loss"],
        "client_steps": metrics["num_steps"],
        "excluded": ~ok,
        "routing_stats": stats,
        "diagnostics": diagnostics,
    }
    return new_state, out

  return round_fn


def init_server_state(
    params: PyTree, algorithm: Algorithm, trainable_mask: PyTree, num_clients: int
) -> dict[str, Any]:
  """The server state of round 0: params, aggregator state, per-client state if any."""
  trainable, _ = partition(params, trainable_mask)
  state = {"params": params, "agg": algorithm.aggregator.init(params), "client_states": None}
  if algorithm.init_client_state is not None:
    one = algorithm.init_client_state(trainable)
    state["client_states"] = jax.tree.map(
        lambda x: jnp.zeros((num_clients,) + x.shape, x.dtype), one
    )
  return state

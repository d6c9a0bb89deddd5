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

Or in lanes (``lanes=True``): padding every client to the round's longest one wastes most of
a vmapped round when data sizes are skewed (configs/default.py's Dirichlet alpha = 0.1
partitions, one local epoch: 0.39 to 0.52 of the computed client-steps are real). Instead the clients are packed into L vmapped
lanes by step count (:func:`lane_schedule`, longest processing time first); a lane trains its
clients one after another, restarting from the global model at each client's first step,
and writes each client's outputs at its last step (:class:`fedalign.federated.client.
ClientUpdate`). The outputs are those of the padded round (same per-client rngs and steps),
so exclusion and aggregation are unchanged. The host lays the round's batches out as
(L, slots, ...) with :func:`lane_batches`; :func:`choose_lanes` picks how many lanes.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedalign.aggregation import robust as robust_lib
from fedalign.aggregation.moe_blocks import client_ok, mask_clients
from fedalign.algorithms.base import Algorithm
from fedalign.federated import attacks as attacks_lib
from fedalign.federated.client import LANE_KEYS
from fedalign.models.lora import partition

PyTree = Any
CLIENT_AXIS = "clients"


def client_rngs(seed: int | jax.Array, round_idx: jax.Array, client_ids: jax.Array) -> jax.Array:
  """Per-client keys derived from (seed, round, client) only."""
  base = jax.random.fold_in(jax.random.key(seed), round_idx)
  return jax.vmap(lambda c: jax.random.fold_in(base, c))(client_ids)


def make_round_fn(
    client_update: Callable,
    algorithm: Algorithm,
    trainable_mask: PyTree,
    *,
    seed: int,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
    lanes: bool = False,
    robust: robust_lib.RobustConfig | None = None,
    attack: attacks_lib.Attack | None = None,
    privatize: Callable | None = None,
    param_shardings: PyTree | None = None,
) -> Callable:
  """Returns ``round_fn(server_state, batches, weights, client_ids, round_idx, seed=seed)``.

  ``seed`` passed to the jitted ``round_fn`` (an int) is an argument of the compiled program,
  not a constant in it: runs that differ only in the seed then share one compiled round (the
  persistent compilation cache). Left out, the seed given here is used.

  Args:
    client_update: from :func:`fedalign.federated.client.make_client_update`.
    algorithm: the method's hooks (aggregator, broadcast, client state).
    trainable_mask: boolean tree of trainable leaves.
    seed: the run's seed (client rngs derive from seed, round and client id).
    chunk_size: clients per vmapped chunk (None = all at once). The number of clients per
      round must be a multiple of it (the server pads with weight-0 clients).
    mesh: optional mesh with a 'clients' axis; the client axis of the data is sharded on it
      (with ``lanes``: the lane axis, whose size must then be a multiple of the mesh size).
    lanes: ``batches`` come in the lane layout of :func:`lane_batches` and the clients run
      in lanes (``client_update.lanes``); exclusive with ``chunk_size``.
    robust: robust aggregation (``config.server.robust``; :mod:`fedalign.aggregation.robust`)
      around the algorithm's aggregator; None = none.
    attack: simulated attackers (``config.attack``; :mod:`fedalign.federated.attacks`);
      None = none.
    privatize: client-level DP (:func:`fedalign.privacy.make_privatizer`): clips and noises
      each client's upload right after its update, before the server sees it; None = off.
    param_shardings: optional params-structured tree of ``NamedSharding`` on ``mesh`` (a 2-D
      ``('clients', 'experts')`` mesh: :func:`fedalign.federated.mesh.state_shardings`); the
      params are constrained to it and the client-stacked deltas to it with the client axis
      over ``'clients'`` in front, so the aggregation runs on the sharded deltas. None = no
      constraint (the 1-D mesh: replicated params).

  ``server_state`` = {'params', 'agg', 'client_states' (N, ...) or None}. ``batches`` maps
  names to (C, steps, ...) arrays incl. ``step_mask`` (C, steps) (with ``lanes``: (L, slots,
  ...) arrays and the schedule's (L, slots) fields). ``weights`` (C,) = n_i, 0 for padding
  clients. Returns (new_server_state, metrics).
  """
  spmd = CLIENT_AXIS if mesh is not None else None
  vmapped = jax.vmap(client_update, in_axes=(None, None, 0, None, 0, 0), spmd_axis_name=spmd)
  if lanes and chunk_size:
    raise ValueError(
        f"chunk_size={chunk_size} with lanes: lanes replace chunks (use chunk_size=None)."
    )
  if lanes and not callable(getattr(client_update, "lanes", None)):
    raise ValueError(
        "lanes=True needs the ClientUpdate of fedalign.federated.client.make_client_update "
        "(with its .lanes form)."
    )

  def run_clients(global_trainable, frozen, batches, broadcast, cstates, rngs):
    if lanes:
      missing = [k for k in LANE_KEYS if k not in batches]
      if missing:
        raise ValueError(f"lanes=True: the batches lack the lane schedule's fields {missing}")
      return client_update.lanes(
          global_trainable, frozen, batches, broadcast, cstates, rngs, spmd_axis_name=spmd
      )
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

  default_seed = seed

  def round_fn(server_state, batches, weights, client_ids, round_idx, seed=default_seed):
    params = server_state["params"]
    if param_shardings is not None:
      params = _constrain(params, param_shardings)
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
    if attack is not None:  # simulation: the attackers' labels (label_flip)
      batches = attacks_lib.flip_batches(attack, batches, client_ids, lanes)
    deltas, stats, metrics, new_cstates = run_clients(
        trainable, frozen, batches, broadcast, cstates, rngs
    )
    if param_shardings is not None:  # 2-D mesh: (C, E, ...) deltas over clients x experts
      deltas = _constrain(deltas, param_shardings, stacked=True)
    dp_info = {}
    if privatize is not None:  # ---- client-level DP (fedalign/privacy.py): client side
      deltas, stats, weights, dp_info = privatize(
          deltas, stats, weights, metrics["train_loss"], rngs
      )
    if attack is not None:  # simulation: the attackers' uploads (attack.kind)
      deltas, stats = attacks_lib.poison_upload(attack, deltas, stats, client_ids, rngs)
    # A client with a non-finite delta, statistic or loss gets weight 0; weight-0 clients
    # (these and the padding) are then ignored by the aggregator (moe_blocks.prepare).
    ok = client_ok(deltas, stats, metrics["train_loss"])
    weights = jnp.where(ok, jnp.asarray(weights, jnp.float32), 0.0)
    part = weights > 0
    new_state = dict(server_state)
    cs_deltas = None
    if has_cstate:
      cs_deltas = jax.tree.map(lambda new, old: new - old, new_cstates, cstates)
      # Only participating clients store their new state. Padding rows repeat a real client's
      # id: they are dropped from the scatter (index out of range) instead of racing with it.
      num_all = jax.tree.leaves(server_state["client_states"])[0].shape[0]
      idx = jnp.where(part, client_ids, num_all)
      new_state["client_states"] = jax.tree.map(
          lambda all_, new: all_.at[idx].set(new, mode="drop"),
          server_state["client_states"],
          new_cstates,
      )
    # ---- robust aggregation (server.robust, server.robust_stats): transforms of the round's
    # inputs, then the method's aggregator with robust sums (fedalign/aggregation/robust.py)
    robust_diag, agg_weights = {}, weights
    if robust is not None:
      tokens = robust_lib.tokens_bound(batches, rngs.shape[0], lanes) if robust.stats else None
      deltas, stats, agg_weights, robust_diag = robust_lib.defend(
          robust, deltas, stats, weights, tokens
      )
    with robust_lib.robust_reduction(robust):
      new_params, agg_state, diagnostics = algorithm.aggregator.aggregate(
          server_state["agg"], params, deltas, stats, agg_weights, cs_deltas
      )
    diagnostics = dict(diagnostics, **robust_diag, **dp_info)
    # ----
    new_state["params"] = new_params
    new_state["agg"] = agg_state
    losses = jnp.where(part, metrics["train_loss"], 0.0)
    out = {
        "train_loss": jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1e-12),
        "client_train_loss": metrics["train_loss"],
        "client_steps": metrics["num_steps"],
        "excluded": ~ok,
        "routing_stats": mask_clients(part, stats),
        "diagnostics": diagnostics,
    }
    return new_state, out

  return round_fn


def _constrain(tree: PyTree, shardings: PyTree, stacked: bool = False) -> PyTree:
  """``jax.lax.with_sharding_constraint`` of every non-None leaf of a params-structured tree
  (``stacked``: a leading client axis, sharded over ``'clients'``, in front of each)."""

  def one(x, s):
    if x is None:
      return None
    if stacked:
      s = NamedSharding(s.mesh, P(CLIENT_AXIS, *s.spec))
    return jax.lax.with_sharding_constraint(x, s)

  return jax.tree.map(one, tree, shardings, is_leaf=lambda x: x is None)


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


# ---------------------------------------------------------------------------------------------
# Lanes: the host side (numpy). Which client step runs in which lane at which slot.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LaneSchedule:
  """Which client step runs in which lane at which slot: (L, slots) numpy arrays.

  ``client``: the slot's client (index in the round; 0 in empty slots); ``step``: the
  client's k-th step (k = 0 .. n_i - 1); ``valid``: the slot holds a step; ``first`` /
  ``last``: it is the client's first / last step. A lane's valid slots come first.

  >>> s = lane_schedule([3, 1, 2, 0], 2)
  >>> s.client.tolist(), s.valid.tolist()
  ([[0, 0, 0], [2, 2, 1]], [[True, True, True], [True, True, True]])
  >>> s.num_slots, s.useful_fraction
  (3, 1.0)
  """

  client: np.ndarray
  step: np.ndarray
  valid: np.ndarray
  first: np.ndarray
  last: np.ndarray

  @property
  def num_lanes(self) -> int:
    return int(self.valid.shape[0])

  @property
  def num_slots(self) -> int:
    """Slots the round computes: the longest lane (the arrays may be longer, padded)."""
    return int(self.valid.sum(1).max(initial=0))

  @property
  def useful(self) -> int:
    """Real client-steps (slots holding a step)."""
    return int(self.valid.sum())

  @property
  def computed(self) -> int:
    """Client-steps computed: every lane runs ``num_slots`` slots (vmapped)."""
    return self.num_lanes * self.num_slots

  @property
  def useful_fraction(self) -> float:
    """useful / computed client-steps (1.0 when nothing is computed)."""
    return self.useful / self.computed if self.computed else 1.0


def _lpt(steps: np.ndarray, num_lanes: int) -> tuple[list[list[int]], np.ndarray]:
  """Longest processing time first: clients by decreasing steps (ties: lower index first),
  each onto the least-loaded lane (ties: lower lane). Clients with 0 steps get no lane."""
  order = np.argsort(-steps, kind="stable")
  heap = [(0, lane) for lane in range(num_lanes)]
  lanes: list[list[int]] = [[] for _ in range(num_lanes)]
  load = np.zeros(num_lanes, np.int64)
  for c in order:
    if steps[c] <= 0:
      break
    _, lane = heapq.heappop(heap)
    lanes[lane].append(int(c))
    load[lane] += steps[c]
    heapq.heappush(heap, (int(load[lane]), lane))
  return lanes, load


def _as_steps(steps: Sequence[int] | np.ndarray) -> np.ndarray:
  steps = np.asarray(steps, np.int64).reshape(-1)
  if steps.size and steps.min() < 0:
    raise ValueError(f"step counts must be >= 0, got {steps.tolist()}")
  return steps


def lane_schedule(
    steps: Sequence[int] | np.ndarray, num_lanes: int, num_slots: int | None = None
) -> LaneSchedule:
  """Packs clients of ``steps[i]`` local steps into ``num_lanes`` lanes (LPT greedy).

  Args:
    steps: real local steps per client of the round (0: the client gets no slot).
    num_lanes: L >= 1 (lanes beyond the number of clients stay empty).
    num_slots: pad the slot axis to this length (>= the longest lane), e.g. one length for
      every round of a run; None = the longest lane (at least 1).

  The longest lane is at most 4/3 of the optimum (Graham's LPT bound) and at most
  sum(steps) / L + max(steps).

  >>> lane_schedule([5, 1, 4], 2).client.tolist()
  [[0, 0, 0, 0, 0], [2, 2, 2, 2, 1]]
  """
  steps = _as_steps(steps)
  if num_lanes < 1:
    raise ValueError(f"num_lanes must be >= 1, got {num_lanes}")
  lanes, load = _lpt(steps, num_lanes)
  slots = max(int(load.max(initial=0)), 1)
  if num_slots is not None:
    if num_slots < slots:
      raise ValueError(f"num_slots={num_slots} < {slots} slots of the longest lane")
    slots = num_slots
  shape = (num_lanes, slots)
  client, step = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  valid, first, last = (np.zeros(shape, bool) for _ in range(3))
  for lane, members in enumerate(lanes):
    t = 0
    for c in members:
      n = int(steps[c])
      client[lane, t : t + n] = c
      step[lane, t : t + n] = np.arange(n)
      valid[lane, t : t + n] = True
      first[lane, t] = True
      last[lane, t + n - 1] = True
      t += n
  return LaneSchedule(client, step, valid, first, last)


def choose_lanes(
    steps: Sequence[int] | np.ndarray,
    max_lanes: int,
    *,
    min_useful: float = 0.9,
    multiple_of: int = 1,
) -> int:
  """How many lanes to run a round on: of the lane counts L <= ``max_lanes`` (multiples of
  ``multiple_of``, e.g. the mesh size), the one whose :func:`lane_schedule` has the fewest
  slots while at least ``min_useful`` of its computed client-steps are real; ties go to fewer
  lanes. If no count reaches ``min_useful``, the one with the highest fraction.

  More lanes than ``sum(steps) / max(steps)`` cannot shorten the round below its longest
  client, they only add padded slots: with skewed clients the fastest schedule can waste most
  of its lanes, which ``min_useful`` bounds (0 = the fastest schedule, whatever it wastes).

  >>> steps = [74, 54, 8, 7, 8, 24, 29, 54, 40, 10]  # Dirichlet(0.1): 10 clients, 1 epoch
  >>> [choose_lanes(steps, n) for n in (1, 2, 5, 10)]
  [1, 2, 4, 4]
  >>> choose_lanes(steps, 10, min_useful=0.0)  # the fewest lanes reaching 74 slots
  5
  """
  steps = _as_steps(steps)
  if multiple_of < 1 or max_lanes < multiple_of or max_lanes % multiple_of:
    raise ValueError(
        f"max_lanes={max_lanes} must be a positive multiple of multiple_of={multiple_of}"
    )
  if not 0.0 <= min_useful <= 1.0:
    raise ValueError(f"min_useful={min_useful} must be in [0, 1]")
  busy = int(np.count_nonzero(steps))
  top = min(max_lanes, max(multiple_of, -(-busy // multiple_of) * multiple_of))
  best, best_key = multiple_of, None
  for n in range(multiple_of, top + 1, multiple_of):
    _, load = _lpt(steps, n)
    slots = int(load.max(initial=0))
    frac = steps.sum() / (n * slots) if slots else 1.0
    ok = frac >= min_useful - 1e-12
    key = (not ok, slots if ok else -frac, n)
    if best_key is None or key < best_key:
      best, best_key = n, key
  return best


def lane_batches(batches: dict[str, np.ndarray], schedule: LaneSchedule) -> dict[str, np.ndarray]:
  """The round's padded batches ((C, steps, ...) with ``step_mask``) in the lane layout.

  A client's k-th scheduled step is its k-th real step (``step_mask`` True); every data field
  becomes (L, slots, ...) (zeros in empty slots) and the schedule is added as
  ``lane_client``, ``lane_step`` (the step's index in the client's padded batches, which
  seeds its rng as in the padded round), ``lane_first``, ``lane_last`` and ``step_mask``.

  >>> b = {'x': np.arange(6).reshape(2, 3), 'step_mask': np.array([[1, 1, 1], [0, 1, 0]], bool)}
  >>> out = lane_batches(b, lane_schedule(b['step_mask'].sum(1), 1))
  >>> out['x'].tolist(), out['lane_step'].tolist()
  ([[0, 1, 2, 4]], [[0, 1, 2, 1]])
  """
  mask = np.asarray(batches["step_mask"]).astype(bool)
  num_clients, max_steps = mask.shape
  counts = mask.sum(1)
  scheduled = np.bincount(schedule.client[schedule.valid], minlength=num_clients)
  if scheduled.shape[0] != num_clients or np.any(scheduled != counts):
    raise ValueError(
        f"the schedule's steps per client {scheduled.tolist()} differ from the batches' real "
        f"steps {counts.tolist()}"
    )
  # kth[c, k] = index of client c's k-th real step in its padded batches.
  kth = np.zeros((num_clients, max_steps), np.int32)
  for c in range(num_clients):
    real = np.flatnonzero(mask[c])
    kth[c, : len(real)] = real
  pos = np.where(schedule.valid, kth[schedule.client, schedule.step], 0).astype(np.int32)
  out = {}
  for k, v in batches.items():
    if k == "step_mask":
      continue
    v = np.asarray(v)
    g = v[schedule.client, pos]
    keep = schedule.valid.reshape(schedule.valid.shape + (1,) * (v.ndim - 2))
    out[k] = np.where(keep, g, np.zeros((), v.dtype))
  out["lane_client"] = schedule.client.astype(np.int32)
  out["lane_step"] = pos
  out["lane_first"] = schedule.first
  out["lane_last"] = schedule.last
  out["step_mask"] = schedule.valid
  return out

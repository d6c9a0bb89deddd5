"""The client update: a pure function that the round vmaps over clients.

``client_update(global_trainable, frozen, batches, broadcast, client_state, rng)
-> (delta, routing_stats, metrics, new_client_state)``

* ``global_trainable`` / ``frozen``: the global model split by
  :func:`fedalign.models.lora.partition`; only the trainable part is differentiated and
  returned as a delta, the frozen base weights are shared by every client.
* ``batches``: fixed-shape arrays (steps, batch, seq) per key plus ``step_mask`` (steps,);
  a padded step (mask 0) leaves params, optimizer state and statistics unchanged.
* ``broadcast``: what the algorithm sends with the model (e.g. FedAlign-MoE's p_g and alpha).
* routing statistics are summed over every real step of local training (section 3.1).

``client_update.lanes(global_trainable, frozen, lane_batches, broadcast, client_states, rngs)``
computes the same outputs for all C clients of a round, stacked (C, ...), from lanes: L vmapped
lanes each train their clients one after another (the schedule of
:func:`fedalign.federated.round.lane_schedule`), so no lane waits for the longest client.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fedalign.algorithms.base import Algorithm
from fedalign.models.lora import combine

PyTree = Any
# The schedule's fields in a lane-layout batch dict (the rest are data, (L, slots, ...)):
# the slot's client (index in the round), its local step index, whether it is the client's
# first / last step, and whether the slot holds a step at all (``step_mask``).
LANE_KEYS = ("lane_client", "lane_step", "lane_first", "lane_last", "step_mask")


def _select(pred: jax.Array, a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


@dataclasses.dataclass(frozen=True)
class ClientUpdate:
  """The pure client update (call it like a function) and its lane form ``lanes``.

  ``lanes(global_trainable, frozen, batches, broadcast, client_states, rngs,
  spmd_axis_name=None) -> (deltas, routing_stats, metrics, new_client_states)``, each stacked
  over the round's C clients (``rngs.shape[0]``) and equal to ``vmap(update)`` of the padded
  per-client batches: ``batches`` holds the data as (L, slots, ...) plus :data:`LANE_KEYS`
  (L, slots); ``client_states`` (C, ...) and ``rngs`` (C,) are per client. At a client's first
  slot the lane restarts from the global params, a fresh optimizer state and zero statistics;
  at its last slot the client's outputs are written to row ``lane_client`` of the outputs. A
  client without any slot (0 real steps) gets the outputs of a 0-step ``update``.
  """

  update: Callable[..., tuple]
  lanes: Callable[..., tuple]

  def __call__(self, *args: Any) -> tuple:
    return self.update(*args)


def make_client_update(
    task: Any,
    algorithm: Algorithm,
    optimizer: optax.GradientTransformation,
    *,
    load_balance_coef: float = 0.01,
    z_loss_coef: float = 0.0,
) -> ClientUpdate:
  """Builds the pure client update for a task, an algorithm and an optax client optimizer.

  Args:
    task: has ``loss(params, batch, rng) -> (loss, aux)`` with ``aux['routing']`` and the
      auxiliary router losses (see :mod:`fedalign.federated.task`).
    algorithm: the hooks of the federated method.
    optimizer: the local optimizer (optax).
    load_balance_coef / z_loss_coef: weights of the router auxiliary losses.

  Returns a :class:`ClientUpdate`: callable as ``client_update(...)``, with the lane form
  ``client_update.lanes``.
  """

  def total_loss(trainable, frozen, global_trainable, batch, broadcast, rng):
    params = combine(trainable, frozen)
    task_loss, aux = task.loss(params, batch, rng)
    loss = (
        task_loss
        + load_balance_coef * aux["load_balance_loss"]
        + z_loss_coef * aux["router_z_loss"]
    )
    if algorithm.client_loss is not None:
      loss = loss + algorithm.client_loss(trainable, global_trainable, broadcast, aux)
    return loss, (task_loss, aux["routing"])

  grad_fn = jax.value_and_grad(total_loss, has_aux=True)

  def zero_stats(global_trainable, frozen, batch, broadcast, rng):
    shape = jax.eval_shape(
        lambda: total_loss(global_trainable, frozen, global_trainable, batch, broadcast, rng)[1][1]
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)

  def local_step(carry, batch, real, global_trainable, frozen, broadcast, client_state, rng):
    """One local step from ``carry`` = (params, opt_state, stats_acc, loss_acc); a step that
    is not ``real`` leaves the carry unchanged."""
    params, opt_state, stats_acc, loss_acc = carry
    (_, (task_loss, stats)), grads = grad_fn(
        params, frozen, global_trainable, batch, broadcast, rng
    )
    if algorithm.correct_grads is not None:
      grads = algorithm.correct_grads(grads, broadcast, client_state)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    params = _select(real, new_params, params)
    opt_state = _select(real, new_opt_state, opt_state)
    stats_acc = jax.tree.map(lambda a, s: a + jnp.where(real, s, 0), stats_acc, stats)
    loss_acc = loss_acc + jnp.where(real, task_loss, 0.0)
    return params, opt_state, stats_acc, loss_acc

  def finish(params, global_trainable, broadcast, client_state, loss_sum, num_steps):
    """(delta, metrics, new client state) after ``num_steps`` real local steps."""
    delta = jax.tree.map(lambda a, b: a - b, params, global_trainable)
    metrics = {"train_loss": loss_sum / jnp.maximum(num_steps, 1.0), "num_steps": num_steps}
    new_state = client_state
    if algorithm.update_client_state is not None:
      new_state = algorithm.update_client_state(client_state, broadcast, delta, num_steps)
    return delta, metrics, new_state

  def client_update(global_trainable, frozen, batches, broadcast, client_state, rng):
    step_mask = batches["step_mask"].astype(bool)
    data = {k: v for k, v in batches.items() if k != "step_mask"}
    first = jax.tree.map(lambda x: x[0], data)
    stats0 = zero_stats(global_trainable, frozen, first, broadcast, rng)
    opt_state = optimizer.init(global_trainable)

    def step(i, carry):
      batch = jax.tree.map(lambda x: x[i], data)
      return local_step(
          carry,
          batch,
          step_mask[i],
          global_trainable,
          frozen,
          broadcast,
          client_state,
          jax.random.fold_in(rng, i),
      )

    # The loop runs up to the last real step only (a dynamic trip count): under vmap it runs
    # to the longest client of the vmapped group, so grouping clients of similar size into
    # chunks (see round.make_round_fn) skips most padded steps instead of computing them.
    last = jnp.max(jnp.where(step_mask, jnp.arange(step_mask.shape[0]) + 1, 0))
    init = (global_trainable, opt_state, stats0, jnp.zeros((), jnp.float32))
    params, _, stats, loss_sum = jax.lax.fori_loop(0, last, step, init)
    num_steps = jnp.sum(step_mask.astype(jnp.float32))
    delta, metrics, new_state = finish(
        params, global_trainable, broadcast, client_state, loss_sum, num_steps
    )
    return delta, stats, metrics, new_state

  def lanes(global_trainable, frozen, batches, broadcast, client_states, rngs, spmd_axis_name=None):
    num_clients = rngs.shape[0]
    batches = jax.tree.map(jnp.asarray, batches)
    sched = {k: batches[k] for k in LANE_KEYS}
    data = {k: v for k, v in batches.items() if k not in LANE_KEYS}
    num_lanes = sched["step_mask"].shape[0]
    stats0 = zero_stats(
        global_trainable, frozen, jax.tree.map(lambda x: x[0, 0], data), broadcast, rngs[0]
    )
    opt0 = optimizer.init(global_trainable)
    zero = jnp.zeros((), jnp.float32)

    # Every client's outputs start as those of a client without real steps (what `update`
    # returns for an all-padding client); scheduled clients overwrite theirs at their last slot.
    def idle(client_state):
      delta, metrics, new_state = finish(
          global_trainable, global_trainable, broadcast, client_state, zero, zero
      )
      return delta, stats0, metrics, new_state

    outs0 = jax.vmap(idle)(client_states)

    def lane_slot(carry, slot):
      """One slot of one lane: (restart,) step, and the outputs if the client ended here."""
      params, opt_state, stats_acc, loss_acc, count = carry
      first, real, c = slot["lane_first"], slot["step_mask"].astype(bool), slot["lane_client"]
      params = _select(first, global_trainable, params)
      opt_state = _select(first, opt0, opt_state)
      stats_acc = _select(first, stats0, stats_acc)
      loss_acc = jnp.where(first, zero, loss_acc)
      count = jnp.where(first, zero, count)
      client_state = jax.tree.map(lambda x: x[c], client_states)
      rng = jax.random.fold_in(rngs[c], slot["lane_step"])
      batch = {k: slot[k] for k in data}
      params, opt_state, stats_acc, loss_acc = local_step(
          (params, opt_state, stats_acc, loss_acc),
          batch,
          real,
          global_trainable,
          frozen,
          broadcast,
          client_state,
          rng,
      )
      count = count + real.astype(jnp.float32)
      delta, metrics, new_state = finish(
          params, global_trainable, broadcast, client_state, loss_acc, count
      )
      return (params, opt_state, stats_acc, loss_acc, count), (
          delta,
          stats_acc,
          metrics,
          new_state,
      )

    vslot = jax.vmap(lane_slot, spmd_axis_name=spmd_axis_name)

    def body(s, state):
      carry, outs = state
      slot = jax.tree.map(lambda x: x[:, s], batches)
      carry, new = vslot(carry, slot)
      # Lanes whose client ends at this slot write its row; the others point past the end.
      row = jnp.where(slot["lane_last"], slot["lane_client"], num_clients)
      outs = jax.tree.map(lambda buf, x: buf.at[row].set(x, mode="drop"), outs, new)
      return carry, outs

    lane_copies = lambda t: jax.tree.map(
        lambda x: jnp.broadcast_to(x, (num_lanes,) + jnp.shape(x)), t
    )
    carry0 = lane_copies((global_trainable, opt0, stats0, zero, zero))
    # A dynamic trip count: slots after every lane's last real one are not computed.
    valid = sched["step_mask"].astype(bool)
    last = jnp.max(jnp.where(valid, jnp.arange(valid.shape[1]) + 1, 0))
    _, outs = jax.lax.fori_loop(0, last, body, (carry0, outs0))
    return outs

  return ClientUpdate(client_update, lanes)


def client_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The local optimizer of ``config.train``: AdamW or SGD, after global-norm clipping when
  ``grad_clip`` > 0.

  >>> from fedalign.config_files import load_config
  >>> opt = client_optimizer(load_config('configs/default.py:runlocal'))
  >>> callable(opt.update)
  True
  """
  t = config.train
  if t.optimizer == "adamw":
    opt = optax.adamw(t.learning_rate, weight_decay=t.weight_decay)
  else:
    opt = optax.sgd(t.learning_rate)
  if t.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(t.grad_clip), opt)
  return opt

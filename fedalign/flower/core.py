"""The Flower path without Flower: named arrays, one client's update, the server's aggregation.

Everything here is plain numpy / JAX (no ``flwr`` import), so the engine equivalence is tested
in the default suite; :mod:`fedalign.flower.apps` wraps it in Flower's Message API.

* :func:`named_arrays` / :func:`tree_from_named`: a pytree as ``{path: array}`` (what travels in
  a Flower ``ArrayRecord``) and back into a template, with an error naming the parameter path
  and both shapes when a peer's model differs.
* :class:`Client`: one silo. It builds the run from the config (:func:`fedalign.federated.run.
  build_run`: data, model, algorithm) and runs the engine's own client update
  (``run.client_update``, the pure function the round vmaps), jitted, on its own client's
  batches of the round (the rows the engine's round would build for it), with the rng the
  engine derives from (seed, round, client).
* :class:`Server`: the engine's server half of a round: non-finite updates get weight 0
  (``client_ok``), then the method's aggregator (``algorithm.aggregator.aggregate``) on the
  clients' stacked deltas and routing statistics. Every method of :mod:`fedalign.algorithms`
  runs (SCAFFOLD's control variates live on the client and travel as their change).

Example (a few seconds on CPU):
  >>> import jax.numpy as jnp
  >>> named = named_arrays({'a': {'w': jnp.ones((2, 3))}, 'b': None}, 'delta')
  >>> {k: v.shape for k, v in named.items()}
  {'delta/a/w': (2, 3)}
  >>> tree_from_named(named, {'a': {'w': jnp.zeros((2, 3))}, 'b': None}, 'delta')['a']['w'].sum()
  Array(6., dtype=float32)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedalign.aggregation import robust as robust_lib
from fedalign.aggregation.moe_blocks import client_ok
from fedalign.config_files import load_config
from fedalign.federated import attacks as attacks_lib
from fedalign.federated.config_checks import validate_config
from fedalign.federated.round import client_rngs
from fedalign.federated.run import Run, build_run
from fedalign.models.lora import partition
from fedalign import privacy

PyTree = Any
SEP = "/"


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaves_with_names(tree: PyTree, prefix: str) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  out = []
  for path, leaf in flat:
    if leaf is None:
      continue
    out.append((SEP.join([prefix] + [_key_name(k) for k in path]), leaf))
  return out


def named_arrays(tree: PyTree, prefix: str) -> dict[str, np.ndarray]:
  """``{prefix/path/to/leaf: numpy array}`` of every non-None leaf (frozen leaves are None)."""
  return {name: np.asarray(leaf) for name, leaf in _leaves_with_names(tree, prefix)}


def tree_from_named(
    named: Mapping[str, Any], template: PyTree, prefix: str, *, sender: str = "the peer"
) -> PyTree:
  """The arrays of :func:`named_arrays` put back into ``template``'s structure and dtypes.

  Raises ValueError naming the parameter path and both shapes when a leaf's shape differs
  from the template's, and naming the paths when some are missing or unexpected.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=lambda x: x is None)
  expected = {SEP.join([prefix] + [_key_name(k) for k in p]) for p, x in flat if x is not None}
  got = {k for k in named if k == prefix or k.startswith(prefix + SEP)}
  missing, extra = sorted(expected - got), sorted(got - expected)
  if missing or extra:
    raise ValueError(
        f"{sender}'s {prefix!r} arrays do not match this model's: missing {missing[:5]}"
        f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
        f"{' ...' if len(extra) > 5 else ''} (is the model config the same on both sides?)"
    )
  leaves = []
  for path, leaf in flat:
    if leaf is None:
      leaves.append(None)
      continue
    name = SEP.join([prefix] + [_key_name(k) for k in path])
    value = np.asarray(named[name])
    if tuple(value.shape) != tuple(np.shape(leaf)):
      raise ValueError(
          f"model shape mismatch at parameter {name!r}: {sender} sent shape "
          f"{tuple(value.shape)}, this side's model has shape {tuple(np.shape(leaf))} "
          "(the model config differs between the Flower server and client)"
      )
    leaves.append(jnp.asarray(value, dtype=jnp.result_type(leaf)))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def fingerprint(tree: PyTree) -> str:
  """A short sha256 of a pytree's paths, shapes, dtypes and bytes (e.g. the frozen base)."""
  h = hashlib.sha256()
  for name, leaf in _leaves_with_names(tree, ""):
    a = np.asarray(leaf)
    h.update(f"{name}:{a.shape}:{a.dtype};".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def _parse_value(old: Any, text: str) -> Any:
  if isinstance(old, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"expected a bool, got {text!r}")
    return text.lower() in ("true", "1")
  if isinstance(old, int):
    return int(text)
  if isinstance(old, float):
    return float(text)
  return text


def load_flower_config(spec: str, overrides: str = "") -> ml_collections.ConfigDict:
  """``spec`` (``'configs/default.py:runlocal'``) with ``overrides`` applied and validated.

  ``overrides``: whitespace-separated ``field.path=value`` (as ``--config.field.path=value``
  on the command line; the value takes the type of the field it replaces).

  >>> c = load_flower_config('configs/default.py:runlocal', 'method=fedavg train.local_steps=2')
  >>> c.method, c.train.local_steps
  ('fedavg', 2)
  """
  config = load_config(spec)
  for item in overrides.split():
    key, eq, text = item.partition("=")
    key = key.removeprefix("--config.")
    if not eq:
      raise ValueError(f"override {item!r} is not field.path=value")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise ValueError(f"override {item!r}: config has no field {key!r}")
      node = node[p]
    if leaf not in node:
      raise ValueError(f"override {item!r}: config has no field {key!r}")
    try:
      node[leaf] = _parse_value(node[leaf], text)
    except ValueError as e:
      raise ValueError(f"override {item!r}: config.{key}: {e}") from None
  validate_config(config)
  return config


def check_supported(config: ml_collections.ConfigDict, run: Run) -> None:
  """Simulation-only features of the engine that the Flower path does not run: an error
  naming the field."""
  if privacy.make_privatizer(config) is not None:
    raise ValueError(
        "config.dp.clip_norm > 0: client-level DP is not run on the Flower path yet "
        "(fedalign/privacy.py runs inside the engine's round); set dp.clip_norm=0."
    )
  if privacy.drop_prob(config) > 0:
    raise ValueError(
        "config.faults.drop_prob > 0 simulates dropouts; on Flower a client that does not "
        "reply is left out of the round by itself: set faults.drop_prob=0."
    )
  if attacks_lib.from_config(config, None, run.data.candidate_ids) is not None:
    raise ValueError("config.attack simulates attackers; it is not run on the Flower path.")
  if robust_lib.from_config(config, top_k=getattr(run.model_config, "top_k", None)) is not None:
    raise ValueError(
        "config.server.robust / robust_stats: robust aggregation is not run on the Flower "
        "path yet; set them to their defaults."
    )


class Client:
  """One Flower client (silo): the engine's client update on its own client's data.

  Args:
    config: the run's config (the same on the server and every client).
    workdir: where the tokenizer (and a pre-training cache) live.
    client_id: this silo's client index in the config's partition (its Flower
      ``partition-id``).
  """

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      workdir: str | os.PathLike,
      client_id: int,
      *,
      run: Run | None = None,
  ):
    self.run = run if run is not None else build_run(config, pathlib.Path(workdir))
    self.config = self.run.config
    n = self.config.data.num_clients
    if not 0 <= int(client_id) < n:
      raise ValueError(
          f"client id (Flower node config partition-id) {client_id} is out of range: "
          f"config.data.num_clients={n}"
      )
    self.client_id = int(client_id)
    check_supported(self.config, self.run)
    trainable, self.frozen = partition(self.run.params, self.run.mask)
    self.trainable_template = trainable
    self.frozen_fingerprint = fingerprint(self.frozen)
    algo = self.run.algorithm
    self.broadcast_template = algo.broadcast(algo.aggregator.init(self.run.params))
    self.client_state = None
    if algo.init_client_state is not None:
      self.client_state = algo.init_client_state(trainable)
    # The pure function the engine's round vmaps, here for one client.
    self._update = jax.jit(self.run.client_update)

  @property
  def num_examples(self) -> int:
    return int(self.run.data.client_sizes[self.client_id])

  def train(
      self, arrays: Mapping[str, np.ndarray], round_idx: int, frozen_fingerprint: str | None = None
  ) -> dict[str, Any]:
    """Local training from the server's ``arrays`` (:meth:`Server.broadcast_arrays`).

    Returns ``{'arrays': named delta (+ routing statistics, + client-state change),
    'num_examples', 'train_loss', 'num_steps'}``.
    """
    if frozen_fingerprint is not None and frozen_fingerprint != self.frozen_fingerprint:
      raise ValueError(
          f"client {self.client_id}: the frozen base weights differ from the server's "
          f"(fingerprint {self.frozen_fingerprint} vs the server's {frozen_fingerprint}); "
          "both sides must load the same checkpoint / seed."
      )
    sender = "the server"
    global_trainable = tree_from_named(arrays, self.trainable_template, "params", sender=sender)
    broadcast = tree_from_named(arrays, self.broadcast_template, "broadcast", sender=sender)
    ids = np.asarray([self.client_id])
    batches = self.run.data.round_batches(self.config, ids, round_idx)
    batches = jax.tree.map(lambda x: x[0], batches)
    rng = client_rngs(self.config.seed, jnp.asarray(round_idx), jnp.asarray(ids))[0]
    cstate = self.client_state if self.client_state is not None else jnp.zeros((), jnp.float32)
    delta, stats, metrics, new_cstate = self._update(
        global_trainable, self.frozen, batches, broadcast, cstate, rng
    )
    out = {**named_arrays(delta, "delta"), **named_arrays(stats, "stats")}
    if self.client_state is not None:
      change = jax.tree.map(lambda a, b: a - b, new_cstate, self.client_state)
      out.update(named_arrays(change, "client_state_delta"))
      self.client_state = new_cstate
    return {
        "arrays": out,
        "num_examples": self.num_examples,
        "train_loss": float(metrics["train_loss"]),
        "num_steps": float(metrics["num_steps"]),
    }


@dataclasses.dataclass
class Reply:
  """One client's reply as the server reads it (from :meth:`Client.train`'s dict)."""

  arrays: Mapping[str, np.ndarray]
  num_examples: float
  train_loss: float


class Server:
  """The server half of the engine's round for replies that arrive over Flower."""

  def __init__(
      self, config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, run: Run | None = None
  ):
    self.run = run if run is not None else build_run(config, pathlib.Path(workdir))
    self.config = self.run.config
    check_supported(self.config, self.run)
    self.state = {k: v for k, v in self.run.initial_state.items() if k != "client_states"}
    trainable, frozen = partition(self.run.params, self.run.mask)
    self.trainable_template = trainable
    self.frozen_fingerprint = fingerprint(frozen)
    algo = self.run.algorithm
    # The routing statistics' structure: the client update's output for one client's batch.
    b = jax.tree.map(lambda x: x[0], self.run.data.round_batches(self.config, np.arange(1), 0))
    cstate = (
        algo.init_client_state(trainable)
        if algo.init_client_state is not None
        else jnp.zeros((), jnp.float32)
    )
    shapes = jax.eval_shape(
        self.run.client_update,
        trainable,
        frozen,
        b,
        algo.broadcast(self.state["agg"]),
        cstate,
        jax.random.key(0),
    )
    self.stats_template = shapes[1]
    self.cstate_template = cstate if algo.init_client_state is not None else None
    self._step = jax.jit(self._server_step)

  def _server_step(self, state, deltas, stats, losses, weights, cs_deltas):
    ok = client_ok(deltas, stats, losses)
    weights = jnp.where(ok, jnp.asarray(weights, jnp.float32), 0.0)
    params, agg, diag = self.run.algorithm.aggregator.aggregate(
        state["agg"], state["params"], deltas, stats, weights, cs_deltas
    )
    loss = jnp.sum(jnp.where(ok, losses, 0.0) * weights) / jnp.maximum(jnp.sum(weights), 1e-12)
    return {"params": params, "agg": agg}, {"train_loss": loss, "excluded": ~ok, "diag": diag}

  def round_clients(self, round_idx: int) -> np.ndarray:
    """The sampled client ids of the round, in the engine's order."""
    return self.run.round_clients(round_idx)

  def broadcast_arrays(self) -> dict[str, np.ndarray]:
    """What every sampled client receives: the global trainable params and the method's
    broadcast (FedAlign-MoE: the global routing distribution and alpha)."""
    trainable, _ = partition(self.state["params"], self.run.mask)
    broadcast = self.run.algorithm.broadcast(self.state["agg"])
    return {**named_arrays(trainable, "params"), **named_arrays(broadcast, "broadcast")}

  def aggregate(self, round_idx: int, replies: Mapping[int, Reply]) -> dict[str, Any]:
    """Aggregates the replies ``{client_id: Reply}`` of round ``round_idx`` (any subset of
    the sampled clients: a client that did not reply is left out) into the new server state;
    the clients are stacked in the engine's order (:meth:`round_clients`).

    Returns the round's metrics: ``train_loss`` (example-weighted), ``clients`` (ids in the
    stacked order), ``excluded`` (ids with a non-finite update).
    """
    if not replies:
      raise ValueError("no client replied this round: nothing to aggregate")
    order = [int(c) for c in self.round_clients(round_idx) if int(c) in replies]
    ids = order + sorted(set(replies) - set(order))
    deltas, stats, cs = [], [], []
    for cid in ids:
      r = replies[cid]
      sender = f"client {cid}"
      deltas.append(tree_from_named(r.arrays, self.trainable_template, "delta", sender=sender))
      stats.append(tree_from_named(r.arrays, self.stats_template, "stats", sender=sender))
      if self.cstate_template is not None:
        cs.append(
            tree_from_named(r.arrays, self.cstate_template, "client_state_delta", sender=sender)
        )
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    weights = jnp.asarray([replies[c].num_examples for c in ids], jnp.float32)
    losses = jnp.asarray([replies[c].train_loss for c in ids], jnp.float32)
    self.state, out = self._step(
        self.state, stack(deltas), stack(stats), losses, weights, stack(cs) if cs else None
    )
    excluded = [int(c) for c, e in zip(ids, np.asarray(out["excluded"])) if e]
    return {"train_loss": float(out["train_loss"]), "clients": ids, "excluded": excluded}

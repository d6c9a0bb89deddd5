"""Flower apps (``pip install -e ".[flower]"``): a ClientApp, a Strategy and a ServerApp.

They wrap :mod:`fedalign.flower.core` in Flower's Message API (flwr >= 1.20): parameters,
deltas and routing statistics travel as named arrays (an ``ArrayRecord`` keyed by pytree path,
e.g. ``params/decoder/layers_0/moe/router/kernel``).

* ``client_app`` (:data:`client_app`): ``query`` replies the node's ``partition-id`` (its
  client index in the config's partition) and its number of examples; ``train`` runs the
  engine's client update on that client's data from the server's arrays and replies the
  delta, the routing statistics (FedAlign-MoE's router alignment needs them) and, for
  SCAFFOLD, the change of its control variate (kept in the node's ``Context.state``).
* :class:`FedAlignStrategy`: a Flower ``Strategy`` whose rounds are fedalign's: it samples the
  engine's clients of the round (``(seed, round)``), sends each the global trainable params
  and the method's broadcast, and aggregates what arrives with the method's aggregator
  (every method of :mod:`fedalign.algorithms`).
* ``server_app`` (:data:`server_app`): builds the server from the run config and runs
  ``config.train.rounds`` rounds with the strategy; writes ``flower_params.npz`` (the final
  params, named) and ``flower_metrics.jsonl`` into the run config's ``workdir``.

Run config (``[tool.flwr.app.config]`` in the app's pyproject.toml, or ``flwr run -c``):
``config`` (a config spec, e.g. ``"configs/default.py:runlocal"``), ``overrides``
(``"method=fedavg train.rounds=2"``), ``workdir``, ``evaluate`` (server-side test accuracy
each round). Node config (``flower-supernode --node-config``): ``partition-id``.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedalign.flower import core

log = logging.getLogger(__name__)
ARRAYS, DTYPES, CONFIG, METRICS = "arrays", "dtypes", "config", "metrics"
STATE_KEY = "fedalign_client_state"
SCALARS = "__scalars__"  # in the dtypes ConfigRecord: the names of 0-d arrays


# ---------------------------------------------------------------- named arrays <-> records


def to_records(named: Mapping[str, np.ndarray]) -> tuple[ArrayRecord, ConfigRecord]:
  """Named arrays as an ``ArrayRecord``; dtypes numpy cannot save without pickle (bfloat16)
  travel as their bits (uint) with the dtype name in the ``ConfigRecord``, and 0-d arrays
  (which arrive as shape (1,)) are listed under ``SCALARS`` there."""
  arrays, dtypes, scalars = {}, {}, []
  for name, a in named.items():
    a = np.asarray(a)
    if a.ndim == 0:
      scalars.append(name)
    if a.dtype.kind == "V" or a.dtype.name == "bfloat16" or a.dtype.name.startswith("float8"):
      dtypes[name] = a.dtype.name
      a = a.view(np.dtype(f"uint{8 * a.dtype.itemsize}"))
    arrays[name] = Array(np.ascontiguousarray(a))
  if scalars:
    dtypes[SCALARS] = scalars
  return ArrayRecord(arrays), ConfigRecord(dtypes)


def from_records(arrays: ArrayRecord, dtypes: ConfigRecord | None) -> dict[str, np.ndarray]:
  """The inverse of :func:`to_records`."""
  import ml_dtypes  # noqa: F401 (registers bfloat16 with numpy)

  dtypes = dtypes if dtypes is not None else {}
  scalars = set(dtypes.get(SCALARS, []))
  out = {}
  for name, arr in arrays.items():
    a = arr.numpy()
    if name in dtypes:
      a = a.view(np.dtype(str(dtypes[name])))
    out[name] = a.reshape(()) if name in scalars else a
  return out


def _run_settings(context: Context) -> tuple[str, str, pathlib.Path, bool]:
  rc = context.run_config
  spec = str(rc.get("config", "configs/default.py:runlocal"))
  overrides = str(rc.get("overrides", ""))
  workdir = pathlib.Path(str(rc.get("workdir", "flower_run"))).expanduser()
  return spec, overrides, workdir, bool(rc.get("evaluate", True))


# ---------------------------------------------------------------- ClientApp

client_app = ClientApp()
_CLIENTS: dict[tuple, core.Client] = {}  # one built client per process and setting


def _client(context: Context) -> core.Client:
  spec, overrides, workdir, _ = _run_settings(context)
  if "partition-id" not in context.node_config:
    raise ValueError(
        "this SuperNode has no node config 'partition-id' (its client index): start it with "
        "flower-supernode --node-config 'partition-id=I'"
    )
  cid = int(context.node_config["partition-id"])
  key = (spec, overrides, str(workdir), cid)
  if key not in _CLIENTS:
    config = core.load_flower_config(spec, overrides)
    _CLIENTS[key] = core.Client(config, workdir / f"client_{cid}", cid)
  return _CLIENTS[key]


@client_app.query()
def query(msg: Message, context: Context) -> Message:
  """The node's client index and example count."""
  client = _client(context)
  info = ConfigRecord({"client_id": client.client_id, "num_examples": client.num_examples})
  return Message(RecordDict({CONFIG: info}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
  """fedalign's client update from the server's arrays on this node's client data."""
  client = _client(context)
  cfg = msg.content[CONFIG]
  arrays = from_records(msg.content[ARRAYS], msg.content.get(DTYPES))
  if client.client_state is not None and STATE_KEY in context.state:
    saved = from_records(context.state[STATE_KEY], context.state.get(STATE_KEY + "_dtypes"))
    client.client_state = core.tree_from_named(saved, client.client_state, "state")
  res = client.train(arrays, int(cfg["round"]), str(cfg["frozen_fingerprint"]))
  if client.client_state is not None:
    state_rec, state_meta = to_records(core.named_arrays(client.client_state, "state"))
    context.state[STATE_KEY] = state_rec
    context.state[STATE_KEY + "_dtypes"] = state_meta
  rec, dtypes = to_records(res["arrays"])
  metrics = MetricRecord(
      {
          "num-examples": res["num_examples"],
          "train_loss": res["train_loss"],
          "num_steps": res["num_steps"],
      }
  )
  content = RecordDict({ARRAYS: rec, DTYPES: dtypes, METRICS: metrics})
  return Message(content, reply_to=msg)


# ---------------------------------------------------------------- Strategy


class FedAlignStrategy(Strategy):
  """fedalign's rounds as a Flower Strategy: the engine's client sampling and the method's
  aggregator (:class:`fedalign.flower.core.Server`) on what the ClientApps send back.

  The server state (params, aggregator state) lives in ``self.server``; the ``arrays`` that
  Flower's loop passes around are the trainable params after each round.
  """

  def __init__(self, server: core.Server, history_path: pathlib.Path | None = None):
    self.server = server
    self.history_path = history_path
    self.nodes: dict[int, int] = {}  # client id -> Flower node id
    self.history: list[dict[str, Any]] = []

  def _discover(self, grid: Grid, timeout: float = 600) -> None:
    """Asks every connected node for its client index (``query``)."""
    node_ids = list(grid.get_node_ids())
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in node_ids]
    for reply in grid.send_and_receive(msgs, timeout=timeout):
      _raise_client_error(reply)
      cid = int(reply.content[CONFIG]["client_id"])
      node = reply.metadata.src_node_id
      if cid in self.nodes and self.nodes[cid] != node:
        raise ValueError(
            f"two SuperNodes ({self.nodes[cid]}, {node}) have partition-id={cid}: each client "
            "index must belong to one node"
        )
      self.nodes[cid] = node

  def configure_train(
      self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
  ) -> Iterable[Message]:
    r = server_round - 1  # the engine's round index
    ids = [int(c) for c in self.server.round_clients(r)]
    if any(c not in self.nodes for c in ids):
      self._discover(grid)
    missing = [c for c in ids if c not in self.nodes]
    if missing:
      raise RuntimeError(
          f"round {r} samples clients {missing} but no connected SuperNode has that "
          f"partition-id (connected: {sorted(self.nodes)})"
      )
    rec, dtypes = to_records(self.server.broadcast_arrays())
    cfg = {"round": r, "frozen_fingerprint": self.server.frozen_fingerprint}
    return [
        Message(
            RecordDict({ARRAYS: rec, DTYPES: dtypes, CONFIG: ConfigRecord(dict(cfg, client=c))}),
            dst_node_id=self.nodes[c],
            message_type="train",
            group_id=str(server_round),
        )
        for c in ids
    ]

  def aggregate_train(
      self, server_round: int, replies: Iterable[Message]
  ) -> tuple[ArrayRecord | None, MetricRecord | None]:
    by_node = {node: cid for cid, node in self.nodes.items()}
    got: dict[int, core.Reply] = {}
    for reply in replies:
      _raise_client_error(reply)
      cid = by_node[reply.metadata.src_node_id]
      m = reply.content[METRICS]
      named = from_records(reply.content[ARRAYS], reply.content.get(DTYPES))
      got[cid] = core.Reply(named, float(m["num-examples"]), float(m["train_loss"]))
    out = self.server.aggregate(server_round - 1, got)
    self.history.append({"round": server_round, **out})
    if self.history_path is not None:
      with open(self.history_path, "a") as f:
        f.write(json.dumps(self.history[-1]) + "\n")
    params, _ = to_records(core.named_arrays(self.server.state["params"], "params"))
    return params, MetricRecord({"train_loss": out["train_loss"], "clients": len(out["clients"])})

  def configure_evaluate(
      self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
  ) -> Iterable[Message]:
    return []  # evaluation is the server's (evaluate_fn), on the config's test split

  def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> None:
    return None

  def summary(self) -> None:
    log.info("FedAlignStrategy: method=%s", self.server.config.method)


def _raise_client_error(reply: Message) -> None:
  if reply.has_error():
    raise RuntimeError(
        f"the ClientApp on node {reply.metadata.src_node_id} failed: {reply.error.reason}"
    )


# ---------------------------------------------------------------- ServerApp

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
  """Builds the server from the run config and runs ``config.train.rounds`` rounds."""
  spec, overrides, workdir, evaluate = _run_settings(context)
  config = core.load_flower_config(spec, overrides)
  workdir.mkdir(parents=True, exist_ok=True)
  server = core.Server(config, workdir / "server")
  history = workdir / "flower_metrics.jsonl"
  history.unlink(missing_ok=True)
  strategy = FedAlignStrategy(server, history)
  evaluate_fn = None
  if evaluate:
    run = server.run

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
      res = run.evaluate(server.state["params"], run.data.test)
      return MetricRecord({"test_accuracy": float(res["acc"])})

  initial, _ = to_records(core.named_arrays(server.state["params"], "params"))
  strategy.start(grid, initial, num_rounds=config.train.rounds, evaluate_fn=evaluate_fn)
  np.savez(workdir / "flower_params.npz", **core.named_arrays(server.state["params"], "params"))

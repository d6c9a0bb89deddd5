"""The Flower path (fedalign/flower): the same global model as fedalign's engine.

The fast tests here need no ``flwr``: they run :class:`fedalign.flower.core.Client` (the
engine's jitted client update, one silo at a time) and :class:`fedalign.flower.core.Server`
(the engine's aggregation of what arrives) and compare with ``Run.run_round``. The real
deployment (SuperLink + 3 SuperNodes + ``flwr run`` on 127.0.0.1) is
tests/test_flower_deployment.py.
"""

import jax
import numpy as np
import pytest

from fedalign.flower import core
from fedalign.federated.run import build_run

# configs/default.py:runlocal, shrunk: 3 clients, all sampled, 2 rounds of 2 local steps.
OVERRIDES = (
    "data.num_clients=3 train.clients_per_round=3 train.rounds=2 train.local_steps=2 "
    "train.batch_size=8 train.chunk_size=0 data.max_train_examples=200 "
    "data.max_test_examples=50 data.min_client_size=10 data.seq_len=32 data.vocab_size=300 "
    "model.num_layers=1 eval.specialization_examples=0"
)
# vmap over 3 clients (engine) vs one client at a time (Flower): float32 rounding only.
ATOL = 1e-5


def tiny(method):
  return core.load_flower_config("configs/default.py:runlocal", f"method={method} " + OVERRIDES)


def max_diff(a, b):
  return max(
      float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


@pytest.mark.parametrize(
    "method", ["fedalign", pytest.param("fedavg", marks=pytest.mark.slow)]  # ~25 s each
)
def test_flower_client_and_server_equal_the_engine(method, tmp_path):
  cfg = tiny(method)
  run = build_run(cfg, tmp_path)
  server = core.Server(cfg, tmp_path, run=run)
  clients = {i: core.Client(cfg, tmp_path, i, run=run) for i in range(3)}
  state = run.initial_state
  for r in range(cfg.train.rounds):
    state, out, ids = run.run_round(state, r)
    arrays = server.broadcast_arrays()
    replies = {}
    for cid in server.round_clients(r):
      res = clients[int(cid)].train(arrays, r, server.frozen_fingerprint)
      replies[int(cid)] = core.Reply(res["arrays"], res["num_examples"], res["train_loss"])
    m = server.aggregate(r, replies)
    assert m["clients"] == [int(c) for c in ids] and m["excluded"] == []
    np.testing.assert_allclose(m["train_loss"], float(out["train_loss"]), rtol=1e-5)
  diff = max_diff(state["params"], server.state["params"])
  moved = max_diff(run.initial_state["params"], server.state["params"])
  assert diff < ATOL, diff
  assert moved > 100 * ATOL  # the model did train: the comparison can fail
  if method == "fedalign":  # the aggregator state (router alignment's p_g, alpha) too
    assert max_diff(state["agg"], server.state["agg"]) < ATOL


def test_flower_model_shape_mismatch_names_path_and_shapes(tmp_path):
  cfg = tiny("fedavg")
  run = build_run(cfg, tmp_path)
  server = core.Server(cfg, tmp_path, run=run)
  arrays = server.broadcast_arrays()
  name = next(k for k in arrays if k.endswith("router/kernel"))
  wrong = dict(arrays, **{name: np.zeros(arrays[name].shape[:-1] + (7,), np.float32)})
  client = core.Client(cfg, tmp_path, 0, run=run)
  with pytest.raises(ValueError) as e:
    client.train(wrong, 0)
  msg = str(e.value)
  assert name in msg and "(7,)" not in msg  # the full shapes, not a suffix
  assert str(tuple(wrong[name].shape)) in msg and str(tuple(arrays[name].shape)) in msg
  # The server side: a client's delta of another shape.
  res = client.train(arrays, 0)
  bad = dict(res["arrays"])
  dname = "delta" + name[len("params") :]
  bad[dname] = np.zeros((3,) + bad[dname].shape, np.float32)
  with pytest.raises(ValueError, match=r"client 0 sent shape \(3, "):
    server.aggregate(0, {0: core.Reply(bad, 10, 1.0)})
  with pytest.raises(ValueError, match="missing"):
    client.train({k: v for k, v in arrays.items() if k != name}, 0)
  with pytest.raises(ValueError, match="frozen base weights differ"):
    client.train(arrays, 0, "0" * 16)
  with pytest.raises(ValueError, match="partition-id"):
    core.Client(cfg, tmp_path, 3, run=run)


def test_load_flower_config_bad_override():
  with pytest.raises(ValueError, match="no field 'train.nope'"):
    core.load_flower_config("configs/default.py:runlocal", "train.nope=1")
  with pytest.raises(ValueError, match="config.train.local_steps"):
    core.load_flower_config("configs/default.py:runlocal", "train.local_steps=x")

"""Federated engine: golden numbers per algorithm, sharding, chunking, NaN exclusion."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedalign.algorithms import make_algorithm
from fedalign.federated.client import make_client_update
from fedalign.federated.round import CLIENT_AXIS, init_server_state, make_round_fn
from fedalign.models.lora import partition

LR = 0.1


class LinearTask:
  """loss = mean((x w - y)^2) / 2: gradients are easy to write by hand."""

  def loss(self, params, batch, rng):
    del rng
    err = batch["x"] @ params["w"] - batch["y"]
    zero = jnp.zeros((), jnp.float32)
    return 0.5 * jnp.mean(err**2), {"routing": {}, "load_balance_loss": zero, "router_z_loss": zero}


def grad(w, x, y):
  return x.T @ (x @ w - y) / len(y)


def make_config(method, **server):
  c = ml_collections.ConfigDict()
  c.method = method
  c.server = ml_collections.ConfigDict(
      dict(optimizer="none", learning_rate=1.0, momentum=0.9, b1=0.9, b2=0.99, eps=1e-3)
  )
  c.server.update(server)
  c.fedprox = ml_collections.ConfigDict(dict(mu=0.5))
  c.train = ml_collections.ConfigDict(dict(learning_rate=LR))
  return c


def toy_data(steps=2, clients=2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(clients, steps, 4, 3)).astype(np.float32)
  y = rng.normal(size=(clients, steps, 4)).astype(np.float32)
  return {"x": x, "y": y, "step_mask": np.ones((clients, steps), bool)}


def run_round(
    method,
    batches,
    weights,
    params=None,
    rounds=1,
    num_clients=None,
    chunk=None,
    mesh=None,
    **server
):
  params = params or {"w": jnp.array([0.5, -1.0, 2.0], jnp.float32)}
  mask = {"w": True}
  c = len(weights)
  alg = make_algorithm(make_config(method, **server), partition(params, mask)[0], num_clients or c)
  cu = make_client_update(LinearTask(), alg, optax.sgd(LR), load_balance_coef=0.0)
  rf = jax.jit(make_round_fn(cu, alg, mask, seed=0, chunk_size=chunk, mesh=mesh))
  state = init_server_state(params, alg, mask, num_clients or c)
  outs = []
  for r in range(rounds):
    state, out = rf(state, batches, jnp.asarray(weights, jnp.float32), jnp.arange(c), r)
    outs.append(out)
  return state, outs


def local_sgd(w, x, y, steps, mu=0.0, w_g=None, correction=None):
  for s in range(steps):
    g = grad(w, x[s], y[s])
    if mu:
      g = g + mu * (w - w_g)
    if correction is not None:
      g = g + correction
    w = w - LR * g
  return w


def test_fedavg_golden():
  b = toy_data()
  w0 = np.array([0.5, -1.0, 2.0], np.float32)
  state, _ = run_round("fedavg", b, [3.0, 1.0])
  d = [local_sgd(w0, b["x"][i], b["y"][i], 2) - w0 for i in range(2)]
  np.testing.assert_allclose(state["params"]["w"], w0 + 0.75 * d[0] + 0.25 * d[1], rtol=1e-5)


def test_fedprox_golden():
  b = toy_data(steps=3)
  w0 = np.array([0.5, -1.0, 2.0], np.float32)
  state, _ = run_round("fedprox", b, [1.0, 1.0])
  d = [local_sgd(w0, b["x"][i], b["y"][i], 3, mu=0.5, w_g=w0) - w0 for i in range(2)]
  np.testing.assert_allclose(state["params"]["w"], w0 + 0.5 * (d[0] + d[1]), rtol=1e-5)


@pytest.mark.parametrize("method", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_golden(method):
  b = toy_data()
  w0 = np.array([0.5, -1.0, 2.0], np.float32)
  state, _ = run_round(method, b, [1.0, 1.0], learning_rate=0.01)
  d = np.mean([local_sgd(w0, b["x"][i], b["y"][i], 2) - w0 for i in range(2)], axis=0)
  g = -d
  if method == "fedavgm":  # first momentum step: m = g
    expected = w0 - 0.01 * g
  elif method == "fedadam":  # bias-corrected first step
    m, v = 0.1 * g / (1 - 0.9), 0.01 * g**2 / (1 - 0.99)
    expected = w0 - 0.01 * m / (np.sqrt(v) + 1e-3)
  elif method == "fedyogi":  # optax yogi: moments start at 1e-6, bias-corrected
    m = (0.9 * 1e-6 + 0.1 * g) / (1 - 0.9)
    v = (1e-6 - 0.01 * np.sign(1e-6 - g**2) * g**2) / (1 - 0.99)
    expected = w0 - 0.01 * m / (np.sqrt(v) + 1e-3)
  else:  # optax adagrad: accumulator 0, eps inside the square root
    expected = w0 - 0.01 * g / np.sqrt(g**2 + 1e-3)
  np.testing.assert_allclose(state["params"]["w"], expected, rtol=1e-4)


def test_scaffold_golden_two_rounds():
  b = toy_data()
  w0 = np.array([0.5, -1.0, 2.0], np.float32)
  n_total = 4  # two of four clients take part; c += sum(dc_i) / N
  state, _ = run_round("scaffold", b, [1.0, 1.0], rounds=2, num_clients=n_total)
  c, ci = np.zeros(3), [np.zeros(3), np.zeros(3)]
  w = w0.copy()
  for _ in range(2):
    ws = [local_sgd(w, b["x"][i], b["y"][i], 2, correction=c - ci[i]) for i in range(2)]
    d = [wi - w for wi in ws]
    new_ci = [ci[i] - c - d[i] / (2 * LR) for i in range(2)]
    c = c + sum(new_ci[i] - ci[i] for i in range(2)) / n_total
    ci = new_ci
    w = w + 0.5 * (d[0] + d[1])
  np.testing.assert_allclose(state["params"]["w"], w, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(state["agg"]["control"]["w"], c, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(state["client_states"]["w"][:2], np.stack(ci), rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(state["client_states"]["w"][2:], 0.0)


def test_padded_steps_leave_state_unchanged():
  b = toy_data(steps=3)
  b["step_mask"][1, 1:] = False
  b2 = {k: v[:, :1] if k != "x" and k != "y" else v[:, :1] for k, v in b.items()}
  b2["step_mask"] = np.ones((2, 1), bool)
  b2["x"][0], b2["y"][0] = b["x"][0, :1], b["y"][0, :1]
  s_full, _ = run_round("fedavg", b, [0.0, 1.0])
  s_one, _ = run_round("fedavg", b2, [0.0, 1.0])
  np.testing.assert_allclose(s_full["params"]["w"], s_one["params"]["w"], rtol=1e-6)


def test_identical_clients_equal_centralised_step():
  b = toy_data(steps=1)
  b["x"][1], b["y"][1] = b["x"][0], b["y"][0]
  w0 = np.array([0.5, -1.0, 2.0], np.float32)
  state, _ = run_round("fedavg", b, [5.0, 2.0])
  np.testing.assert_allclose(
      state["params"]["w"], w0 - LR * grad(w0, b["x"][0, 0], b["y"][0, 0]), rtol=1e-6
  )


def test_nan_client_excluded_and_reported():
  b = toy_data()
  b["x"][1, 0, 0, 0] = np.nan
  w0 = np.array([0.5, -1.0, 2.0], np.float32)
  state, outs = run_round("fedavg", b, [1.0, 1.0])
  assert np.asarray(outs[0]["excluded"]).tolist() == [False, True]
  expected = local_sgd(w0, b["x"][0], b["y"][0], 2)
  np.testing.assert_allclose(state["params"]["w"], expected, rtol=1e-5)
  assert np.isfinite(float(outs[0]["train_loss"]))


def test_chunked_equals_unchunked():
  b = toy_data(clients=4, seed=3)
  s1, _ = run_round("fedavg", b, [1.0, 2.0, 3.0, 4.0])
  s2, _ = run_round("fedavg", b, [1.0, 2.0, 3.0, 4.0], chunk=2)
  np.testing.assert_allclose(s1["params"]["w"], s2["params"]["w"], rtol=1e-6)


def test_mesh_of_eight_devices_equals_one_device():
  assert len(jax.devices()) == 8, "conftest requests 8 fake CPU devices"
  mesh = jax.sharding.Mesh(np.array(jax.devices()), (CLIENT_AXIS,))
  b = toy_data(clients=8, seed=5)
  weights = np.arange(1.0, 9.0)
  s1, _ = run_round("fedavg", b, weights)
  s8, _ = run_round("fedavg", b, weights, mesh=mesh)
  np.testing.assert_allclose(s1["params"]["w"], s8["params"]["w"], rtol=1e-5, atol=1e-6)

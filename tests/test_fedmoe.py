"""Tests of the modular (FedMoE-style) aggregator, fedalign-moe.md section 5."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedalign.algorithms.fedmoe import modular_aggregator


def _toy():
  rng = np.random.default_rng(0)
  c, e, d, f = 3, 4, 2, 1
  params = {
      "embed": rng.normal(size=(3, d)),
      "moe": {
          "router": {"kernel": rng.normal(size=(d, e)), "bias": rng.normal(size=(e,))},
          "experts": {"wi_0": rng.normal(size=(e, d, f)), "wo": rng.normal(size=(e, f, d))},
          "shared_expert": {"kernel": rng.normal(size=(d, d))},
      },
  }
  deltas = jax.tree.map(lambda x: rng.normal(size=(c,) + x.shape), params)
  select = np.array([[5.0, 2.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0], [2.0, 0.0, 6.0, 0.0]])
  stats = {"moe": {"select_count": select}}
  n = np.array([10.0, 20.0, 30.0])
  return params, deltas, stats, n


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def test_modular_hand_computed():
  params, deltas, stats, n = _toy()
  agg = modular_aggregator()
  new, _, diag = jax.jit(agg.aggregate)(
      agg.init(_f32(params)), _f32(params), _f32(deltas), _f32(stats), jnp.asarray(n, jnp.float32)
  )
  nw = n / n.sum()
  for k in ("wi_0", "wo"):
    x, dx = params["moe"]["experts"][k], deltas["moe"]["experts"][k]
    expected = np.stack(
        [
            x[0] + (5 * dx[0, 0] + 3 * dx[1, 0] + 2 * dx[2, 0]) / 10,  # all three, by counts
            x[1] + (2 * dx[0, 1] + 4 * dx[1, 1]) / 6,  # clients 0 and 1
            x[2] + dx[2, 2],  # client 2 only
            x[3],  # nobody: kept
        ]
    )
    np.testing.assert_allclose(new["moe"]["experts"][k], expected, rtol=1e-5, atol=1e-6)
  for path in (
      ("embed",),
      ("moe", "router", "kernel"),
      ("moe", "router", "bias"),
      ("moe", "shared_expert", "kernel"),
  ):
    p, d, out = params, deltas, new
    for key in path:
      p, d, out = p[key], d[key], out[key]
    np.testing.assert_allclose(out, p + np.tensordot(nw, d, 1), rtol=1e-5, atol=1e-6)
  assert float(diag["moe/kept_frac"]) == pytest.approx(0.25)


def test_modular_excluded_clients_and_server_optimizer():
  params, deltas, stats, n = _toy()
  deltas = jax.tree.map(np.array, deltas)
  for leaf in jax.tree.leaves(deltas):
    leaf[2] = np.nan  # excluded client with a failed update
  weights = jnp.array([10.0, 20.0, 0.0])
  agg = modular_aggregator(optimizer=optax.sgd(1.0))
  new, _, _ = agg.aggregate(
      agg.init(_f32(params)), _f32(params), _f32(deltas), _f32(stats), weights
  )
  for leaf in jax.tree.leaves(new):
    assert np.all(np.isfinite(leaf))
  x, dx = params["moe"]["experts"]["wo"], deltas["moe"]["experts"]["wo"]
  np.testing.assert_allclose(
      new["moe"]["experts"]["wo"][0], x[0] + (5 * dx[0, 0] + 3 * dx[1, 0]) / 8, rtol=1e-5
  )
  np.testing.assert_allclose(new["moe"]["experts"]["wo"][2], x[2], rtol=1e-6)  # only client 2
  none, _, _ = agg.aggregate(
      agg.init(_f32(params)), _f32(params), _f32(deltas), _f32(stats), jnp.zeros(3)
  )
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), none, _f32(params))


def test_modular_bad_stats():
  params, deltas, stats, n = _toy()
  agg = modular_aggregator()
  with pytest.raises(ValueError, match=r"'moe'.*'select_count'.*\(3, 4\)"):
    agg.aggregate(
        agg.init(_f32(params)),
        _f32(params),
        _f32(deltas),
        {"moe": {"select_count": jnp.ones((3, 5))}},
        jnp.asarray(n),
    )
  with pytest.raises(ValueError, match="no MoE block"):
    agg.init({"w": jnp.ones(2)})

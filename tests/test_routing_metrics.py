"""Tests of fedalign/metrics/routing_metrics.py against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

from fedalign.metrics.routing_metrics import (
    expert_role_preservation,
    expert_role_preservation_per_expert,
    expert_specialization_mi,
    js_divergence,
    routing_divergence,
)


def test_js_divergence():
  p = jnp.array([0.2, 0.3, 0.5])
  assert float(js_divergence(p, p)) == pytest.approx(0.0, abs=1e-7)
  assert float(js_divergence(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))) == pytest.approx(
      np.log(2), rel=1e-6
  )
  a, b = np.array([0.5, 0.5]), np.array([0.9, 0.1])
  m = (a + b) / 2
  expected = 0.5 * (np.sum(a * np.log(a / m)) + np.sum(b * np.log(b / m)))
  assert float(js_divergence(a, b)) == pytest.approx(expected, rel=1e-5)
  assert float(js_divergence(b, a)) == pytest.approx(expected, rel=1e-5)


def test_routing_divergence_weighted():
  client_p = jnp.array([[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]])
  p_g = jnp.array([0.5, 0.5])
  js1 = float(js_divergence(client_p[1], p_g))
  value = routing_divergence(client_p, p_g, jnp.array([1.0, 3.0, 0.0]))
  assert float(value) == pytest.approx(0.75 * js1, rel=1e-5)
  assert float(routing_divergence(client_p, p_g, jnp.zeros(3))) == 0.0
  assert float(routing_divergence(client_p[:1], p_g)) == pytest.approx(0.0, abs=1e-7)


def test_expert_role_preservation():
  mu = np.zeros((3, 2, 2))
  mu[:, 0] = [[1, 0], [1, 1], [0, 1]]  # expert 0: pairwise cosines 1/sqrt2, 0, 1/sqrt2
  mu[:, 1] = [[1, 0], [-2, 0], [5, 5]]  # expert 1: clients 0 and 1 only -> cos -1
  c = np.array([[1, 1], [1, 2], [1, 0]], float)
  value, valid = expert_role_preservation_per_expert(jnp.array(mu), jnp.array(c))
  np.testing.assert_allclose(value, [np.sqrt(2) / 3, -1.0], rtol=1e-6)
  np.testing.assert_array_equal(valid, [True, True])
  assert float(expert_role_preservation(mu, c)) == pytest.approx((np.sqrt(2) / 3 - 1) / 2, rel=1e-6)
  # one client per expert: nothing to compare -> 1.0, no NaN
  assert float(expert_role_preservation(mu[:1], c[:1])) == 1.0


def test_expert_specialization_mi():
  k = 4
  assert float(expert_specialization_mi(jnp.eye(k) * 7)) == pytest.approx(np.log(k), rel=1e-6)
  assert float(expert_specialization_mi(jnp.ones((k, 6)))) == pytest.approx(0.0, abs=1e-7)
  assert float(expert_specialization_mi(jnp.zeros((k, 6)))) == 0.0
  t = np.array([[3.0, 1.0], [1.0, 3.0]])
  pj = t / t.sum()
  expected = sum(
      pj[i, j] * np.log(pj[i, j] / (pj[i].sum() * pj[:, j].sum()))
      for i in range(2)
      for j in range(2)
  )
  assert float(expert_specialization_mi(t)) == pytest.approx(expected, rel=1e-5)
  with pytest.raises(ValueError):
    expert_specialization_mi(jnp.ones(3))

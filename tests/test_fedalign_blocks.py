"""The array building blocks of the FedAlign-MoE aggregation that read the deltas without copying
them (issue 12): masked client/expert sums on the deltas as sent, the blocked symmetric Gram
matrix, the per-expert pairwise gate, the consensus cosine and the O(C E D) role-preservation
metric, each against a direct NumPy computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedalign.aggregation.moe_blocks import client_sum, expert_sum
from fedalign.algorithms import fedalign as fa
from fedalign.metrics.routing_metrics import expert_role_preservation_per_expert

RNG = np.random.default_rng(0)
PART = np.array([True, False, True, True, False, True])


def nan_rows(x, part=PART):
  """x with the rows of non-participants set to NaN / inf (what a failed client sends)."""
  x = np.array(x, np.float32)
  x[~part] = np.nan
  if (~part).sum() > 1:
    x[np.flatnonzero(~part)[-1]] = np.inf
  return x


def test_client_sum_ignores_non_participants_rows():
  x = RNG.normal(size=(6, 3, 4)).astype(np.float32)
  w = RNG.uniform(size=6).astype(np.float32)
  expected = np.einsum("c,c...->...", w * PART, np.where(PART[:, None, None], x, 0.0))
  fast = client_sum(jnp.asarray(w), jnp.asarray(x), jnp.asarray(PART))  # finite rows: no fallback
  np.testing.assert_allclose(fast, expected, rtol=1e-6, atol=1e-7)
  got = client_sum(jnp.asarray(w), jnp.asarray(nan_rows(x)), jnp.asarray(PART))  # fallback
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  jitted = jax.jit(client_sum)(jnp.asarray(w), jnp.asarray(nan_rows(x)), jnp.asarray(PART))
  np.testing.assert_allclose(jitted, expected, rtol=1e-6, atol=1e-7)


def test_client_sum_keeps_a_participants_inf():
  x = np.ones((3, 2), np.float32)
  x[0, 1] = np.inf
  got = client_sum(jnp.ones(3), jnp.asarray(x), jnp.array([True, True, False]))
  assert got[0] == 2.0 and np.isinf(got[1])


def test_expert_sum_on_a_tree_with_mask():
  w = RNG.uniform(size=(6, 3)).astype(np.float32)
  xs = {"a": RNG.normal(size=(6, 3, 4, 2)), "b": RNG.normal(size=(6, 3))}
  xs = {k: v.astype(np.float32) for k, v in xs.items()}
  got = expert_sum(jnp.asarray(w), {k: jnp.asarray(nan_rows(v)) for k, v in xs.items()}, PART)
  wm = np.where(PART[:, None], w, 0.0)
  np.testing.assert_allclose(got["a"], np.einsum("ce,ceij->eij", wm, xs["a"]), rtol=1e-5)
  np.testing.assert_allclose(got["b"], np.einsum("ce,ce->e", wm, xs["b"]), rtol=1e-5)
  plain = expert_sum(jnp.asarray(w), jnp.asarray(xs["a"]))  # no mask, one array
  np.testing.assert_allclose(plain, np.einsum("ce,ceij->eij", w, xs["a"]), rtol=1e-5)


def test_expert_sum_keeps_dtype_and_checks_shapes():
  x = jnp.ones((2, 3, 4), jnp.bfloat16)
  assert expert_sum(jnp.ones((2, 3)), x).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="does not start with"):
    expert_sum(jnp.ones((2, 3)), jnp.ones((2, 4, 4)))


@pytest.mark.parametrize("block", [2, 3, 4])  # 7 clients in 2 to 4 blocks of rows
def test_blocked_gram_equals_one_matmul(monkeypatch, block):
  rows = [jnp.asarray(RNG.normal(size=(7, p)), jnp.float32) for p in (5, 3)]
  expected = sum(np.asarray(r) @ np.asarray(r).T for r in rows)
  monkeypatch.setattr(fa, "GRAM_BLOCK_ROWS", block)
  got = jax.jit(fa._gram)(rows)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_pairwise_expert_cosine_matches_numpy(monkeypatch):
  leaves = [RNG.normal(size=(5, 3, 2, 2)), RNG.normal(size=(5, 3, 4))]
  leaves[0][1, 2] = 0.0  # a zero update: cosine 0
  leaves[1][1, 2] = 0.0
  flat = np.concatenate([l.reshape(5, 3, -1) for l in leaves], axis=-1)
  norm = np.linalg.norm(flat, axis=-1)
  dots = np.einsum("iep,jep->ije", flat, flat)
  den = norm[:, None, :] * norm[None, :, :]
  expected = np.clip(np.where(den > 0, dots / np.where(den > 0, den, 1.0), 0.0), -1, 1)
  jl = [jnp.asarray(l, jnp.float32) for l in leaves]
  np.testing.assert_allclose(fa.pairwise_expert_cosine(jl), expected, rtol=1e-5, atol=1e-6)
  monkeypatch.setattr(fa, "GRAM_BLOCK_ROWS", 2)  # 5 clients in blocks: same cosines
  np.testing.assert_allclose(fa.pairwise_expert_cosine(jl), expected, rtol=1e-5, atol=1e-6)


def test_expert_gram_cosine_masks_non_participants():
  x = RNG.normal(size=(6, 2, 3)).astype(np.float32)
  masked = fa._expert_gram_cosine([jnp.asarray(np.where(PART[:, None, None], x, 0.0))], 1, None)
  got = fa._expert_gram_cosine([jnp.asarray(nan_rows(x))], 1, jnp.asarray(PART))
  np.testing.assert_allclose(got, masked, rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(got)[~PART] == 0)


def test_pairwise_gate_matches_numpy():
  c, e, d = 4, 3, 2
  mu = RNG.normal(size=(c, e, d)).astype(np.float32)
  kernels = RNG.normal(size=(c, d, e)).astype(np.float32)
  biases = RNG.normal(size=(c, e)).astype(np.float32)
  logits = np.einsum("ied,jdf->ijef", mu, kernels) + biases[None, :, None, :]
  soft = np.exp(logits - logits.max(-1, keepdims=True))
  soft /= soft.sum(-1, keepdims=True)
  expected = np.einsum("ijee->ije", soft)
  np.testing.assert_allclose(fa.pairwise_gate(mu, kernels, biases), expected, rtol=1e-5)
  np.testing.assert_allclose(fa.pairwise_gate(mu, kernels, biases, 3), expected, rtol=1e-5)


def test_consensus_cosine_with_mask_matches_numpy():
  leaves = [RNG.normal(size=(6, 3, 2, 2)), RNG.normal(size=(6, 3, 5))]
  v = RNG.uniform(size=(6, 3)) * PART[:, None]
  flat = np.concatenate([l.reshape(6, 3, -1) for l in leaves], axis=-1) * PART[:, None, None]
  bar = np.einsum("ce,cep->ep", v, flat)
  expected = np.einsum("cep,ep->ce", flat, bar) / np.maximum(
      np.linalg.norm(flat, axis=-1) * np.linalg.norm(bar, axis=-1)[None], 1e-30
  )
  got = fa.consensus_expert_cosine(
      [jnp.asarray(nan_rows(l)) for l in leaves], jnp.asarray(v, jnp.float32), jnp.asarray(PART)
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got)[~PART] == 0)


def test_role_preservation_equals_pairwise_mean():
  c, e, d = 7, 4, 3
  mu = RNG.normal(size=(c, e, d)).astype(np.float32)
  mu[2, 1] = 0.0  # a zero centroid counts with cosine 0
  counts = RNG.integers(0, 3, size=(c, e)).astype(np.float32)
  counts[:, 3] = [1, 0, 0, 0, 0, 0, 0]  # one client only: no pair
  unit = mu / np.maximum(np.linalg.norm(mu, axis=-1, keepdims=True), 1e-12)
  sel = counts > 0
  expected = np.zeros(e)
  for k in range(e):
    pairs = [(i, j) for i in range(c) for j in range(c) if i != j and sel[i, k] and sel[j, k]]
    if pairs:
      expected[k] = np.mean([unit[i, k] @ unit[j, k] for i, j in pairs])
  value, valid = expert_role_preservation_per_expert(jnp.asarray(mu), jnp.asarray(counts))
  np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
  assert np.asarray(valid).tolist() == [s.sum() >= 2 for s in sel.T]


@pytest.mark.parametrize("pairwise", [True, False])
def test_aggregate_ignores_nan_of_excluded_client_with_blocked_gram(monkeypatch, pairwise):
  from test_fedalign_chunked import problem  # 5 clients, client 2 has weight 0

  params, deltas, stats, weights = problem()
  agg = fa.fedalign_aggregator(fa.FedAlignConfig(pairwise=pairwise, detailed_diagnostics=True))
  state = agg.init(params)
  base = jax.jit(agg.aggregate)(state, params, deltas, stats, weights)
  nan_deltas = jax.tree.map(lambda x: x.at[2].set(jnp.nan), deltas)
  monkeypatch.setattr(fa, "GRAM_BLOCK_ROWS", 2)  # 5 clients: a Gram matrix of 2 x 2 blocks
  got = jax.jit(agg.aggregate)(state, params, nan_deltas, stats, weights)
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(got)):
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-6
    )

"""Tests of fedalign.aggregation.permutation (expert permutation alignment, spec section 4.5)."""

import functools

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from fedalign.aggregation import permutation as pm

# One jitted, vmapped solver per (size, maximize): compiled once per shape and reused.
_batched_solver = {
    maximize: jax.jit(jax.vmap(functools.partial(pm.assignment_perm, maximize=maximize)))
    for maximize in (True, False)
}

# size -> number of matrices (half real-valued, half integer-valued with many ties).
_SIZES = {1: 10, 2: 20, 3: 30, 4: 30, 5: 30, 6: 30, 8: 30, 12: 20, 16: 20, 32: 10, 64: 4, 128: 3}
_MIN_SIZES = (1, 3, 8, 64)  # sizes also checked with maximize=False


def _matrices(rng, n, count):
  real = rng.normal(size=(count - count // 2, n, n)) * rng.choice([0.1, 1.0, 100.0])
  ints = rng.integers(-3, 4, size=(count // 2, n, n)).astype(np.float64)  # ties, negatives
  return np.concatenate([real, ints]).astype(np.float32)


def _check_against_scipy(mats, perms, maximize):
  n = mats.shape[-1]
  for mat, perm in zip(mats.astype(np.float64), np.asarray(perms)):
    assert sorted(perm.tolist()) == list(range(n)), perm
    rows, cols = scipy.optimize.linear_sum_assignment(mat, maximize=maximize)
    want = mat[rows, cols].sum()
    got = mat[np.arange(n), perm].sum()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * n)


@pytest.mark.parametrize("n", sorted(_SIZES))
def test_solver_matches_scipy(n):
  rng = np.random.default_rng(n)
  mats = _matrices(rng, n, _SIZES[n])
  for maximize in (True, False) if n in _MIN_SIZES else (True,):
    perms = _batched_solver[maximize](jnp.asarray(mats))
    assert perms.dtype == jnp.int32 and perms.shape == mats.shape[:2]
    _check_against_scipy(mats, perms, maximize)


def test_solver_degenerate_inputs():
  solve = _batched_solver[True]
  mats = np.stack(
      [
          np.zeros((6, 6)),
          np.ones((6, 6)),
          -np.eye(6),
          np.eye(6)[::-1] * 1e-3,
          np.full((6, 6), -7.0),
          np.arange(36.0).reshape(6, 6) % 2,
      ]
  ).astype(np.float32)
  _check_against_scipy(mats, solve(jnp.asarray(mats)), True)


def test_rectangular_linear_sum_assignment():
  rng = np.random.default_rng(1)
  for shape in ((3, 5), (5, 3)):
    for maximize in (True, False):
      mat = rng.integers(-2, 3, size=shape).astype(np.float32)
      rows, cols = pm.linear_sum_assignment(jnp.asarray(mat), maximize=maximize)
      want_r, want_c = scipy.optimize.linear_sum_assignment(mat, maximize=maximize)
      np.testing.assert_array_equal(rows, want_r)  # sorted rows, like scipy
      assert len(set(np.asarray(cols).tolist())) == len(cols)
      assert mat[rows, cols].sum() == mat[want_r, want_c].sum()
  with pytest.raises(ValueError, match="n <= m"):
    pm.assignment_perm(jnp.zeros((3, 2)))


def test_solver_float64_when_x64_enabled():
  rng = np.random.default_rng(2)
  mat = rng.normal(size=(16, 16))
  enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64
  with enable_x64(True):
    jaxpr = jax.make_jaxpr(pm.assignment_perm)(mat)
    assert "f64" in str(jaxpr)
    perm = np.asarray(jax.jit(pm.assignment_perm)(mat))
  rows, cols = scipy.optimize.linear_sum_assignment(mat, maximize=True)
  np.testing.assert_allclose(mat[np.arange(16), perm].sum(), mat[rows, cols].sum(), rtol=1e-12)


def test_jaxpr_has_no_callback():
  text = str(jax.make_jaxpr(jax.jit(pm.assignment_perm))(jnp.zeros((5, 5))))
  assert "callback" not in text
  assert "while" in text
  block, stats = _block_and_stats(np.random.default_rng(0))
  align = jax.jit(pm.align_client_to_reference, static_argnames="method")
  text = str(
      jax.make_jaxpr(lambda r, c, s: align(r, c, s, s["centroid_sum"], "centroids"))(
          block, block, stats
      )
  )
  assert "callback" not in text


def test_vmap_equals_per_matrix():
  rng = np.random.default_rng(3)
  mats = jnp.asarray(_matrices(rng, 6, 8))
  batched = _batched_solver[True](mats)
  single = jax.jit(pm.assignment_perm)
  for mat, perm in zip(mats, batched):
    np.testing.assert_array_equal(single(mat), perm)
  # Leading batch axes are also accepted directly.
  np.testing.assert_array_equal(pm.assignment_perm(mats.reshape(2, 4, 6, 6)).reshape(8, 6), batched)


# --------------------------------------------------------------------------------------------
# MoE blocks.
# --------------------------------------------------------------------------------------------

E, D, F, R = 6, 5, 4, 2


def _block_and_stats(rng):
  def arr(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  block = {
      "router": {"kernel": arr(D, E), "bias": arr(E)},
      "experts": {
          "wi_0": arr(E, D, F),
          "wi_1": arr(E, D, F),
          "wo": arr(E, F, D),
          "wi_0_lora_a": arr(E, D, R),
          "wi_0_lora_b": arr(E, R, F),
      },
      "shared_expert": {"wi": arr(D, F)},
  }
  stats = {
      "token_count": jnp.float32(50.0),
      "prob_sum": arr(E),
      "select_count": arr(E),
      "margin_sum": arr(E),
      "gate_sum": jnp.abs(arr(E)) + 1.0,
      "centroid_sum": arr(E, D),
  }
  return block, stats


def _assert_tree_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("method", ["weights", "centroids"])
def test_permute_then_align_recovers_block(method):
  rng = np.random.default_rng(4)
  block, stats = _block_and_stats(rng)
  perm = jnp.asarray(rng.permutation(E))
  shuffled = pm.permute_moe_block(block, perm)
  shuffled_stats = pm.permute_routing_stats(stats, perm)
  np.testing.assert_array_equal(shuffled["experts"]["wo"][0], block["experts"]["wo"][perm[0]])
  np.testing.assert_array_equal(
      shuffled["router"]["kernel"][:, 0], block["router"]["kernel"][:, perm[0]]
  )
  assert shuffled["shared_expert"] is block["shared_expert"]
  assert shuffled_stats["token_count"] is stats["token_count"]

  align = jax.jit(pm.align_client_to_reference, static_argnames="method")
  aligned, aligned_stats, found = align(
      block,
      shuffled,
      shuffled_stats,
      stats["centroid_sum"] / stats["gate_sum"][:, None],
      method=method,
  )
  # aligned expert e = shuffled expert found[e] = original expert perm[found[e]] = e.
  np.testing.assert_array_equal(found, np.argsort(np.asarray(perm)))
  _assert_tree_equal(aligned, block)
  _assert_tree_equal(aligned_stats, stats)


def test_align_clients_vmapped_and_identity_ties():
  rng = np.random.default_rng(5)
  block, stats = _block_and_stats(rng)
  core = {"router": block["router"], "experts": block["experts"]}
  perms = jnp.asarray(np.stack([rng.permutation(E) for _ in range(3)]))
  clients = jax.vmap(pm.permute_moe_block, in_axes=(None, 0))(core, perms)
  _, _, found = jax.jit(pm.align_clients)(core, clients)
  np.testing.assert_array_equal(found, np.argsort(np.asarray(perms), axis=1))
  # Experts no token selected (zero centroids, similarity 0 everywhere) keep their index.
  cent = stats["centroid_sum"].at[jnp.array([1, 4])].set(0.0)
  align = jax.jit(pm.align_client_to_reference, static_argnames="method")
  _, _, found = align(None, core, dict(stats, centroid_sum=cent), cent, method="centroids")
  np.testing.assert_array_equal(found, np.arange(E))


def test_permutation_errors():
  block, stats = _block_and_stats(np.random.default_rng(6))
  with pytest.raises(ValueError, match="unknown routing statistic"):
    pm.permute_routing_stats(dict(stats, mystery=jnp.zeros(E)), jnp.arange(E))
  bad = dict(block, router={"kernel": block["router"]["kernel"], "extra": jnp.zeros((D, 3))})
  with pytest.raises(ValueError, match="router leaf"):
    pm.permute_moe_block(bad, jnp.arange(E))
  with pytest.raises(ValueError, match="unknown method"):
    pm.align_client_to_reference(block, block, method="nope")


def _moe_forward(block, x, k=2):
  """Tiny pure-jnp MoE: softmax router, top-k, SiLU-gated experts (no LoRA leaves)."""
  logits = x @ block["router"]["kernel"] + block["router"]["bias"]
  probs = jax.nn.softmax(logits, axis=-1)
  gates, idx = jax.lax.top_k(probs, k)  # (T, k)
  ex = block["experts"]
  h = jax.nn.silu(jnp.einsum("td,edf->tef", x, ex["wi_0"])) * jnp.einsum(
      "td,edf->tef", x, ex["wi_1"]
  )
  out_all = jnp.einsum("tef,efd->ted", h, ex["wo"])  # (T, E, D)
  chosen = jnp.take_along_axis(out_all, idx[:, :, None], axis=1)  # (T, k, D)
  return jnp.sum(gates[:, :, None] * chosen, axis=1), idx


def test_permuted_block_computes_same_function():
  rng = np.random.default_rng(7)
  block, _ = _block_and_stats(rng)
  block["experts"] = {k: v for k, v in block["experts"].items() if "lora" not in k}
  x = jnp.asarray(rng.normal(size=(16, D)), jnp.float32)
  perm = jnp.asarray(rng.permutation(E))
  out, idx = _moe_forward(block, x)
  out_p, idx_p = _moe_forward(pm.permute_moe_block(block, perm), x)
  np.testing.assert_allclose(out_p, out, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(perm[idx_p], idx)  # same experts, new indices


# --------------------------------------------------------------------------------------------
# Params-tree helpers.
# --------------------------------------------------------------------------------------------


def test_find_get_set_path():
  blk = {"router": {"kernel": jnp.zeros((2, 3))}, "experts": {"wo": jnp.zeros((3, 1))}}
  params = {
      "layers_10": {"mlp": blk},
      "layers_2": {"mlp": blk, "attn": {"q": jnp.zeros(1)}},
      "encoder": {"layers_1": {"moe": blk}},
      "router": {},
  }
  assert pm.find_moe_blocks(params) == ["encoder/layers_1/moe", "layers_2/mlp", "layers_10/mlp"]
  assert pm.get_path(params, "layers_2/mlp") is blk
  new = pm.set_path(params, "layers_2/mlp", 1)
  assert new["layers_2"]["mlp"] == 1 and params["layers_2"]["mlp"] is blk
  assert new["layers_2"]["attn"] is params["layers_2"]["attn"]


def test_align_params_merges_independent_models():
  rng = np.random.default_rng(8)
  params = {}
  for i in range(3):
    block, _ = _block_and_stats(rng)
    params[f"layers_{i}"] = {"mlp": block, "attn": {"q": jnp.ones((D, D))}}
  params["embed"] = jnp.ones((7, D))
  # "Fine-tune" independently: small noise, then relabel each layer's experts differently.
  noisy = jax.tree_util.tree_map(
      lambda x: x + 0.01 * jnp.asarray(rng.normal(size=x.shape), x.dtype), params
  )
  true_perms = {f"layers_{i}/mlp": jnp.asarray(rng.permutation(E)) for i in range(3)}
  other = pm.permute_params(noisy, true_perms)
  aligned, perms = pm.align_params(params, other)
  assert list(perms) == ["layers_0/mlp", "layers_1/mlp", "layers_2/mlp"]
  for path, perm in true_perms.items():
    np.testing.assert_array_equal(perms[path], np.argsort(np.asarray(perm)))
  _assert_tree_equal(aligned, noisy)
  merged = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, params, aligned)
  err = jax.tree_util.tree_map(lambda m, p: float(jnp.max(jnp.abs(m - p))), merged, params)
  assert max(jax.tree_util.tree_leaves(err)) < 0.05
  stats = {"layers_0/mlp": _block_and_stats(rng)[1]}
  np.testing.assert_array_equal(
      pm.permute_stats(stats, perms)["layers_0/mlp"]["prob_sum"],
      stats["layers_0/mlp"]["prob_sum"][perms["layers_0/mlp"]],
  )

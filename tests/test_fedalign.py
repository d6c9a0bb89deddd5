"""Tests of FedAlign-MoE (fedalign/algorithms/fedalign.py), spec sections 3.2 and 4.1-4.5.

The reference values are computed in numpy (float64), formula by formula from the spec, with
explicit loops over clients and experts, independently of the implementation.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedalign.aggregation.base import apply_delta, weighted_mean
from fedalign.algorithms.fedalign import (
    FedAlignConfig,
    broadcast,
    fedalign_aggregator,
    gating_regularizer,
)
from fedalign.aggregation.permutation import permute_moe_block, permute_routing_stats
from fedalign.models.routing import routing_stats

C, E, D, F = 3, 4, 2, 1
N = np.array([10.0, 20.0, 30.0])
BLOCK = "moe"


# --------------------------------------------------------------------------------------------
# Toy problem: 3 clients, 4 experts, D = 2, F = 1.
# Expert 0: selected by all three (client 2 pulls it the opposite way -> excluded);
# expert 1: clients 0 and 1; expert 2: client 2 only; expert 3: nobody.
# --------------------------------------------------------------------------------------------


def toy_problem(d=D, f=F, seed=0):
  rng = np.random.default_rng(seed)
  params = {
      "embed": rng.normal(size=(3, d)),
      BLOCK: {
          "router": {"kernel": rng.normal(size=(d, E)), "bias": rng.normal(size=(E,)) * 0.1},
          "experts": {
              "wi_0": rng.normal(size=(E, d, f)),
              "wi_1": rng.normal(size=(E, d, f)),
              "wo": rng.normal(size=(E, f, d)),
          },
          "shared_expert": {"kernel": rng.normal(size=(d, d))},
      },
  }
  deltas = {
      "embed": rng.normal(size=(C, 3, d)) * 0.1,
      BLOCK: {
          "router": {
              "kernel": rng.normal(size=(C, d, E)) * 0.3,
              "bias": rng.normal(size=(C, E)) * 0.1,
          },
          "experts": {
              k: rng.normal(size=(C,) + v.shape) * 0.1 for k, v in params[BLOCK]["experts"].items()
          },
          "shared_expert": {"kernel": rng.normal(size=(C, d, d)) * 0.1},
      },
  }
  ex = deltas[BLOCK]["experts"]
  for k in ex:  # expert 0: clients 0 and 1 agree, client 2 goes the opposite way
    ex[k][1, 0] = ex[k][0, 0] + 0.02 * rng.normal(size=ex[k][0, 0].shape)
    ex[k][2, 0] = -ex[k][0, 0] + 0.02 * rng.normal(size=ex[k][0, 0].shape)
  select = np.array([[5.0, 2.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0], [2.0, 0.0, 6.0, 0.0]])
  token_count = select.sum(1)  # top-1
  prob = rng.uniform(0.2, 1.0, size=(C, E)) + select
  prob_sum = prob / prob.sum(1, keepdims=True) * token_count[:, None]
  margin_sum = select * rng.uniform(0.05, 0.5, size=(C, E))
  gate_sum = select * rng.uniform(0.3, 0.9, size=(C, E))
  mu = rng.normal(size=(C, E, d))
  mu[1, 0] = mu[0, 0] + 0.05 * rng.normal(size=d)  # clients 0 and 1 serve one region with
  mu[2, 0] = -mu[0, 0]  # expert 0; client 2 another one
  centroid_sum = gate_sum[..., None] * mu
  stats = {
      BLOCK: {
          "token_count": token_count,
          "prob_sum": prob_sum,
          "select_count": select,
          "margin_sum": margin_sum,
          "gate_sum": gate_sum,
          "centroid_sum": centroid_sum,
      }
  }
  return params, deltas, stats


def to_jnp(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def softmax(z):
  z = z - z.max()
  return np.exp(z) / np.exp(z).sum()


def cos(a, b):
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def reference(params, deltas, stats, n, beta=1.0, pairwise=True, similarity="gate"):
  """The spec's formulas in numpy, p_g uniform and alpha = 1 (first round)."""
  s = stats[BLOCK]
  blk, dblk = params[BLOCK], deltas[BLOCK]
  # 3.1 statistics
  p = s["prob_sum"] / s["token_count"][:, None]
  c = s["select_count"]
  m = np.where(c > 0, s["margin_sum"] / np.where(c > 0, c, 1), 0.0)
  mu = np.where(
      s["gate_sum"][..., None] > 0,
      s["centroid_sum"] / np.where(s["gate_sum"] > 0, s["gate_sum"], 1)[..., None],
      0.0,
  )
  p_g = np.full(E, 1.0 / E)
  # 4.1
  omega = np.zeros((C, E))
  for e in range(E):
    score = [np.sqrt(p[i, e] * p_g[e]) * m[i, e] for i in range(C)]
    total = sum(score)
    for i in range(C):
      omega[i, e] = score[i] / total if total > 0 else n[i] / n.sum()
  w_clients = blk["router"]["kernel"][None] + dblk["router"]["kernel"]  # W_i (C, D, E)
  b_clients = blk["router"]["bias"][None] + dblk["router"]["bias"]
  kernel_new = np.zeros((blk["router"]["kernel"].shape[0], E))
  bias_new = np.zeros(E)
  for e in range(E):
    for i in range(C):
      kernel_new[:, e] += omega[i, e] * w_clients[i][:, e]
      bias_new[e] += omega[i, e] * b_clients[i][e]
  pg_new = (omega * p).sum(0)
  pg_new = pg_new / pg_new.sum()
  alpha_new = np.exp(-p.std(0) / (p.mean(0) + 1e-8))

  # 4.2
  def flat_delta(i, e):
    return np.concatenate([dblk["experts"][k][i, e].ravel() for k in sorted(dblk["experts"])])

  S = np.zeros((C, E))
  tau = np.zeros(E)
  A = np.zeros((C, E))
  w = np.zeros((C, E))
  new_experts = {k: v.copy() for k, v in blk["experts"].items()}
  for e in range(E):
    P = [i for i in range(C) if c[i, e] > 0]
    if not P:
      continue
    if len(P) == 1:
      S[P[0], e] = 1.0
    elif pairwise:
      for i in P:
        num = den = 0.0
        for j in P:
          if j == i:
            continue
          if similarity == "gate":
            g_ij = softmax(w_clients[j].T @ mu[i, e] + b_clients[j])[e]
            g_ji = softmax(w_clients[i].T @ mu[j, e] + b_clients[i])[e]
            gbar = (g_ij + g_ji) / 2
          else:
            gbar = (1 + cos(mu[i, e], mu[j, e])) / 2
          d_ij = cos(flat_delta(i, e), flat_delta(j, e))
          num += c[j, e] * gbar * (1 + d_ij) / 2
          den += c[j, e]
        S[i, e] = num / den
    else:
      cw = np.array([c[j, e] for j in P]) / sum(c[j, e] for j in P)
      delta_bar = sum(cw[t] * flat_delta(j, e) for t, j in enumerate(P))
      mu_bar = sum(cw[t] * mu[j, e] for t, j in enumerate(P))
      for i in P:
        if similarity == "gate":
          gbar = softmax(kernel_new.T @ mu[i, e] + bias_new)[e]
        else:
          gbar = (1 + cos(mu[i, e], mu_bar)) / 2
        S[i, e] = gbar * (1 + cos(flat_delta(i, e), delta_bar)) / 2
    # 4.3
    vals = np.array([S[i, e] for i in P])
    tau[e] = vals.mean() - beta * vals.std()
    # With |P(e)| = 2 and beta = 1 the lower score sits exactly at tau (mean - std = min):
    # such structural ties are members (the implementation's selection_tol); otherwise the
    # toy case must be far from the threshold.
    tie = [abs(S[i, e] - tau[e]) < 1e-9 for i in P]
    for i, is_tie in zip(P, tie):
      assert is_tie or abs(S[i, e] - tau[e]) > 1e-4, "toy case too close to the threshold"
    members = [i for i, is_tie in zip(P, tie) if is_tie or S[i, e] >= tau[e]]
    total = sum(c[i, e] * S[i, e] for i in members)
    for i in members:
      A[i, e] = 1.0
      w[i, e] = c[i, e] * S[i, e] / total
    for k in new_experts:
      for i in members:
        new_experts[k][e] += w[i, e] * dblk["experts"][k][i, e]
  nw = n / n.sum()
  new_params = {
      "embed": params["embed"] + np.tensordot(nw, deltas["embed"], 1),
      BLOCK: {
          "router": {"kernel": kernel_new, "bias": bias_new},
          "experts": new_experts,
          "shared_expert": {
              "kernel": blk["shared_expert"]["kernel"]
              + np.tensordot(nw, dblk["shared_expert"]["kernel"], 1)
          },
      },
  }
  return dict(
      new_params=new_params, omega=omega, S=S, tau=tau, A=A, w=w, p_g=pg_new, alpha=alpha_new
  )


@functools.lru_cache(maxsize=None)
def _compiled(config):
  """One aggregator (and one jit cache) per hashable config, shared by the tests."""
  agg = fedalign_aggregator(config)
  return agg, jax.jit(agg.aggregate)


def run(config, params, deltas, stats, weights, state=None, jit=True):
  if isinstance(config, (FedAlignConfig, type(None))):
    agg, jitted = _compiled(config)
  else:
    agg = fedalign_aggregator(config)
    jitted = jax.jit(agg.aggregate)
  params, deltas, stats = to_jnp(params), to_jnp(deltas), to_jnp(stats)
  if state is None:
    state = agg.init(params)
  fn = jitted if jit else agg.aggregate
  return fn(state, params, deltas, stats, jnp.asarray(weights, jnp.float32))


def assert_tree_close(a, b, atol=1e-5, rtol=1e-5):
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol),
      a,
      b,
  )


def assert_finite(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64))), tree


# --------------------------------------------------------------------------------------------
# Hand-computed toy case.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pairwise,similarity",
    [(True, "gate"), (False, "gate"), (True, "centroid_cosine"), (False, "centroid_cosine")],
)
def test_toy_case_matches_hand_computation(pairwise, similarity):
  params, deltas, stats = toy_problem()
  ref = reference(params, deltas, stats, N, pairwise=pairwise, similarity=similarity)
  cfg = FedAlignConfig(pairwise=pairwise, semantic_similarity=similarity, detailed_diagnostics=True)
  new, state, diag = run(cfg, params, deltas, stats, N)
  assert_tree_close(new, ref["new_params"])
  for name in ("omega", "S", "tau", "A", "w"):
    np.testing.assert_allclose(
        diag[f"{BLOCK}/{name}"], ref[name], atol=1e-5, rtol=1e-5, err_msg=name
    )
  np.testing.assert_allclose(state["p_g"][BLOCK], ref["p_g"], rtol=1e-5)
  np.testing.assert_allclose(state["alpha"][BLOCK], ref["alpha"], rtol=1e-5)
  np.testing.assert_allclose(broadcast(state)["p_g"][BLOCK], ref["p_g"], rtol=1e-5)
  # The toy case exercises what it should: expert 3 unselected (kept), expert 2 selected by
  # client 2 alone (S = 1, its update applied in full), someone excluded from A(0).
  np.testing.assert_array_equal(
      np.asarray(new[BLOCK]["experts"]["wo"][3]),
      np.asarray(params[BLOCK]["experts"]["wo"][3], np.float32),
  )
  np.testing.assert_allclose(
      new[BLOCK]["experts"]["wo"][2],
      params[BLOCK]["experts"]["wo"][2] + deltas[BLOCK]["experts"]["wo"][2, 2],
      rtol=1e-5,
  )
  assert ref["A"][:, 0].sum() == 2 and ref["A"][2, 0] == 0
  assert float(diag[f"{BLOCK}/kept_frac"]) == pytest.approx(0.25)
  assert float(diag[f"{BLOCK}/A_size_mean"]) == pytest.approx(ref["A"].sum() / E)


def test_beta_large_keeps_every_selecting_client():
  params, deltas, stats = toy_problem()
  ref = reference(params, deltas, stats, N, beta=10.0)
  new, _, diag = run(FedAlignConfig(beta=10.0, detailed_diagnostics=True), params, deltas, stats, N)
  assert_tree_close(new, ref["new_params"])
  np.testing.assert_array_equal(diag[f"{BLOCK}/A"], (stats[BLOCK]["select_count"] > 0))


# --------------------------------------------------------------------------------------------
# Identical clients -> FedAvg.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        FedAlignConfig(),
        FedAlignConfig(
            pairwise=False, semantic_similarity="centroid_cosine", router_weighting="overlap"
        ),
        FedAlignConfig(permutation_alignment=True, router_weighting="margin", weight_by_n=True),
    ],
    ids=["default", "linear-centroid", "perm-margin"],
)
def test_identical_clients_equal_fedavg(cfg):
  params, deltas, stats = _perm_problem(seed=1, delta_scale=0.1)  # every expert selected
  same = lambda x: np.broadcast_to(x[:1], x.shape).copy()  # noqa: E731
  deltas = jax.tree.map(same, deltas)
  stats = jax.tree.map(same, stats)
  weights = jnp.array([1.0, 2.0, 5.0])
  new, _, _ = run(cfg, params, deltas, stats, weights)
  fedavg = apply_delta(to_jnp(params), weighted_mean(to_jnp(deltas), weights))
  assert_tree_close(new, fedavg, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Options.
# --------------------------------------------------------------------------------------------


def test_uniform_router_and_no_semantic_selection_is_fedavg():
  params, deltas, stats = toy_problem(seed=2)
  cfg = FedAlignConfig(router_weighting="uniform", semantic_selection=False, adaptive_alpha=False)
  new, state, _ = run(cfg, params, deltas, stats, N)
  fedavg = apply_delta(to_jnp(params), weighted_mean(to_jnp(deltas), jnp.asarray(N)))
  assert_tree_close(new, fedavg, atol=1e-6)
  np.testing.assert_array_equal(state["alpha"][BLOCK], np.ones(E))


def test_sgd_server_optimizer_equals_plain_averaging_and_config_dict():
  params, deltas, stats = toy_problem(seed=3)
  plain, _, _ = run(None, params, deltas, stats, N)
  cfg = ml_collections.ConfigDict({"name": "fedalign", "beta": 1.0})
  cfg.server_optimizer = optax.sgd(1.0)
  with_opt, _, _ = run(cfg, params, deltas, stats, N)
  assert_tree_close(plain, with_opt, atol=1e-6)
  with pytest.raises(ValueError, match="betta"):
    fedalign_aggregator({"betta": 1.0})


def test_adam_server_optimizer_with_frozen_leaves():
  params, deltas, stats = toy_problem(seed=3)
  deltas[BLOCK]["experts"]["wi_1"] = None  # frozen
  deltas[BLOCK]["router"] = None
  trainable = jax.tree.map(lambda x: x[0], deltas)
  agg = fedalign_aggregator(FedAlignConfig(server_optimizer=optax.adam(0.01)), trainable)
  state = agg.init(to_jnp(params))
  new, state, _ = jax.jit(agg.aggregate)(
      state, to_jnp(params), to_jnp(deltas), to_jnp(stats), jnp.asarray(N)
  )
  adam = state["opt"][0]  # the optimizer state covers the trainable leaves only
  assert adam.mu[BLOCK]["experts"]["wi_1"] is None and not jax.tree.leaves(adam.mu[BLOCK]["router"])
  assert adam.mu[BLOCK]["experts"]["wi_0"].shape == params[BLOCK]["experts"]["wi_0"].shape
  np.testing.assert_array_equal(
      new[BLOCK]["experts"]["wi_1"], np.float32(params[BLOCK]["experts"]["wi_1"])
  )
  np.testing.assert_array_equal(
      new[BLOCK]["router"]["kernel"], np.float32(params[BLOCK]["router"]["kernel"])
  )
  assert not np.allclose(new["embed"], np.float32(params["embed"]))
  assert_finite(new)


def test_centroid_privacy_noise_uses_state_rng():
  params, deltas, stats = toy_problem(seed=4)
  cfg = FedAlignConfig(centroid_clip=0.5, centroid_noise_std=0.3, detailed_diagnostics=True)
  _, state1, diag1 = run(cfg, params, deltas, stats, N)
  _, _, diag2 = run(cfg, params, deltas, stats, N, state=state1)
  assert not np.allclose(diag1[f"{BLOCK}/S"], diag2[f"{BLOCK}/S"])  # fresh noise per round
  assert_finite((diag1, diag2))


# --------------------------------------------------------------------------------------------
# Client regularizer (3.2).
# --------------------------------------------------------------------------------------------


def _tiny_router_loss(params, p_g, top_k):
  probs = jax.nn.softmax(params["x"] @ params["W"], axis=-1)
  _, top_idx = jax.lax.top_k(probs, top_k)
  stats = {BLOCK: routing_stats(probs, top_idx, params["x"])}
  return gating_regularizer(stats, {BLOCK: p_g}, {BLOCK: jnp.ones(p_g.shape)})


def test_regularizer_zero_at_p_g_positive_otherwise_and_gradients():
  key = jax.random.PRNGKey(0)
  k1, k2, k3 = jax.random.split(key, 3)
  params = {
      "W": jax.random.normal(k1, (3, 4)),
      "x": jax.random.normal(k2, (5, 3)),
      "unrelated": jax.random.normal(k3, (3, 3)),
  }
  q = jnp.mean(jax.nn.softmax(params["x"] @ params["W"], axis=-1), axis=0)
  assert abs(float(_tiny_router_loss(params, q, top_k=4))) < 1e-6
  uniform = jnp.full((4,), 0.25)
  value = float(_tiny_router_loss(params, uniform, top_k=4))
  kl = float(jnp.sum(q * jnp.log(q / uniform)))
  assert value > 0 and value == pytest.approx(kl, rel=1e-5)
  grads = jax.jit(jax.grad(_tiny_router_loss), static_argnums=2)(params, uniform, 2)
  assert float(jnp.abs(grads["W"]).sum()) > 0
  assert float(jnp.abs(grads["x"]).sum()) > 0
  np.testing.assert_array_equal(grads["unrelated"], np.zeros((3, 3)))


def test_regularizer_alpha_mask_and_no_nan():
  p_g = {BLOCK: jnp.array([0.25, 0.25, 0.25, 0.25])}
  alpha = {BLOCK: jnp.array([1.0, 0.5, 1.0, 1.0])}

  def reg(prob_sum, count, select):
    s = {BLOCK: {"token_count": count, "prob_sum": prob_sum, "select_count": select}}
    return gating_regularizer(s, p_g, alpha)

  prob_sum = jnp.array([2.0, 2.0, 0.0, 0.0])  # q = (0.5, 0.5, 0, 0)
  select = jnp.array([3.0, 1.0, 1.0, 0.0])  # expert 2 selected although q = 0
  expected = 0.5 * np.log(2) * (1.0 + 0.5)
  assert float(reg(prob_sum, 4.0, select)) == pytest.approx(expected, rel=1e-5)
  g = jax.grad(reg)(prob_sum, 4.0, select)
  assert np.all(np.isfinite(g))
  assert float(reg(jnp.zeros(4), 0.0, jnp.zeros(4))) == 0.0  # no token
  assert np.all(np.isfinite(jax.grad(reg)(jnp.zeros(4), 0.0, jnp.zeros(4))))


# --------------------------------------------------------------------------------------------
# Permutation alignment (4.5).
# --------------------------------------------------------------------------------------------


def _perm_problem(seed, delta_scale):
  rng = np.random.default_rng(seed)
  d, f = 8, 2
  params = {
      "norm": rng.normal(size=(d,)),
      BLOCK: {
          "router": {"kernel": rng.normal(size=(d, E))},
          "experts": {
              "wi_0": rng.normal(size=(E, d, f)),
              "wi_1": rng.normal(size=(E, d, f)),
              "wo": rng.normal(size=(E, f, d)),
          },
      },
  }
  deltas = jax.tree.map(lambda x: rng.normal(size=(C,) + x.shape) * delta_scale, params)
  select = rng.integers(1, 6, size=(C, E)).astype(float)  # every expert selected
  gate_sum = select * rng.uniform(0.3, 0.9, size=(C, E))
  prob = rng.uniform(0.5, 1.0, size=(C, E))
  stats = {
      BLOCK: {
          "token_count": select.sum(1),
          "prob_sum": prob / prob.sum(1, keepdims=True) * select.sum(1, keepdims=True),
          "select_count": select,
          "margin_sum": select * rng.uniform(0.1, 0.4, (C, E)),
          "gate_sum": gate_sum,
          "centroid_sum": gate_sum[..., None] * rng.normal(size=(C, E, d)),
      }
  }
  return params, deltas, stats


def _permute_client(params, deltas, stats, client, perm):
  """Client `client` relabels its experts: its full params and stats are permuted."""
  perm = jnp.asarray(perm)
  deltas = jax.tree.map(np.array, deltas)
  stats = jax.tree.map(np.array, stats)
  core = lambda t: {"router": t["router"], "experts": t["experts"]}  # noqa: E731
  theta_i = jax.tree.map(lambda g, dd: g + dd[client], core(params[BLOCK]), core(deltas[BLOCK]))
  permuted = permute_moe_block(theta_i, perm)
  new_delta = jax.tree.map(lambda t, g: np.asarray(t) - g, permuted, core(params[BLOCK]))
  for part in ("router", "experts"):
    for k, v in new_delta[part].items():
      deltas[BLOCK][part][k][client] = v
  one = {k: v[client] for k, v in stats[BLOCK].items()}
  for k, v in permute_routing_stats(one, perm).items():
    stats[BLOCK][k][client] = np.asarray(v)
  return deltas, stats


def test_permutation_alignment_undoes_a_client_relabelling():
  params, deltas, stats = _perm_problem(seed=5, delta_scale=0.05)
  cfg = FedAlignConfig(permutation_alignment=True)
  perm = [2, 0, 3, 1]
  # Round 1: no global centroids yet -> weight-space similarity.
  ref, state1, diag = run(cfg, params, deltas, stats, N)
  assert float(diag[f"{BLOCK}/perm_moved_frac"]) == 0.0
  assert float(diag[f"{BLOCK}/perm_centroid_frac"]) == 0.0
  p_deltas, p_stats = _permute_client(params, deltas, stats, 1, perm)
  out, state1b, diag = run(cfg, params, p_deltas, p_stats, N)
  assert float(diag[f"{BLOCK}/perm_moved_frac"]) == pytest.approx(1.0 / 3.0)
  assert_tree_close(out, ref, atol=2e-5)
  assert_tree_close(state1["p_g"], state1b["p_g"])
  # Round 2: centroids of round 1 in the state. Clients' regions stay close to them while
  # their weight updates are large and random (weight space alone would be ambiguous).
  rng = np.random.default_rng(6)
  cents = np.asarray(state1["centroids"][BLOCK])
  assert np.all(np.asarray(state1["has_centroids"][BLOCK]))
  stats2 = jax.tree.map(np.array, stats)
  g = stats2[BLOCK]["gate_sum"]
  stats2[BLOCK]["centroid_sum"] = g[..., None] * (
      cents[None] + 0.05 * rng.normal(size=(C, E, cents.shape[-1]))
  )
  _, deltas2, _ = _perm_problem(seed=7, delta_scale=3.0)
  ref2, _, diag = run(cfg, params, deltas2, stats2, N, state=state1)
  assert float(diag[f"{BLOCK}/perm_centroid_frac"]) == 1.0
  assert float(diag[f"{BLOCK}/perm_moved_frac"]) == 0.0
  p_deltas2, p_stats2 = _permute_client(params, deltas2, stats2, 0, perm)
  out2, _, diag = run(cfg, params, p_deltas2, p_stats2, N, state=state1)
  assert float(diag[f"{BLOCK}/perm_moved_frac"]) > 0
  assert_tree_close(out2, ref2, atol=1e-4)


@pytest.mark.parametrize(
    "perm", [[3, 2, 1, 0], [2, 3, 1, 0], [3, 2, 0, 1], [1, 0, 3, 2], [0, 1, 3, 2]]
)
@pytest.mark.parametrize("similarity", ["centroid", "weight"])
def test_alignment_is_invariant_to_relabelling_experts_nobody_routed_to(similarity, perm):
  """Round 2, nobody routes to experts 2 and 3, client 1 relabels its experts [3, 2, 1, 0].

  Their centroids are 0, so a centroid score alone cannot place them (before the fix the
  router columns differed by ~0.35 from the un-relabelled run); the weight-space score does.
  """
  params, deltas, stats = _perm_problem(seed=5, delta_scale=0.05)
  cfg = FedAlignConfig(permutation_alignment=True, alignment_similarity=similarity)
  _, state1, _ = run(cfg, params, deltas, stats, N)
  assert np.all(np.asarray(state1["has_centroids"][BLOCK]))
  stats2 = jax.tree.map(np.array, stats)
  for k in ("select_count", "margin_sum", "gate_sum", "centroid_sum"):
    stats2[BLOCK][k][:, 2:] = 0.0
  ref, _, _ = run(cfg, params, deltas, stats2, N, state=state1)
  p_deltas, p_stats = _permute_client(params, deltas, stats2, 1, perm)
  out, _, diag = run(cfg, params, p_deltas, p_stats, N, state=state1)
  assert float(diag[f"{BLOCK}/perm_moved_frac"]) > 0
  assert_tree_close(out, ref, atol=2e-5)


# --------------------------------------------------------------------------------------------
# Bad input and degenerate input.
# --------------------------------------------------------------------------------------------


def test_bad_stats_shape_names_block_field_and_shape():
  params, deltas, stats = toy_problem()
  stats[BLOCK]["prob_sum"] = stats[BLOCK]["prob_sum"][:, :3]
  with pytest.raises(ValueError, match=r"'moe'.*'prob_sum'.*\(3, 4\)"):
    run(None, params, deltas, stats, N, jit=False)
  params, deltas, stats = toy_problem()
  stats[BLOCK]["centroid_sum"] = stats[BLOCK]["centroid_sum"][..., :1]
  with pytest.raises(ValueError, match=r"'moe'.*'centroid_sum'.*\(3, 4, 2\)"):
    run(None, params, deltas, stats, N, jit=False)
  params, deltas, stats = toy_problem()
  del stats[BLOCK]["margin_sum"]
  with pytest.raises(ValueError, match="margin_sum"):
    run(None, params, deltas, stats, N, jit=False)
  with pytest.raises(ValueError, match="no routing stats for MoE block 'moe'"):
    run(None, params, deltas, {}, N, jit=False)


def test_params_without_moe_blocks_raise():
  agg = fedalign_aggregator()
  with pytest.raises(ValueError, match="no MoE block"):
    agg.init({"dense": {"kernel": jnp.zeros((2, 2))}})
  with pytest.raises(ValueError, match="no MoE block"):
    agg.aggregate(
        {},
        {"dense": {"kernel": jnp.zeros((2, 2))}},
        {"dense": {"kernel": jnp.zeros((3, 2, 2))}},
        {},
        jnp.ones(3),
    )


def test_bad_delta_shape_raises():
  params, deltas, stats = toy_problem()
  deltas["embed"] = deltas["embed"][:2]
  with pytest.raises(ValueError, match=r"'embed'.*\(3, 3, 2\)"):
    run(None, params, deltas, stats, N, jit=False)


def test_zero_token_client_and_experts_no_nan():
  params, deltas, stats = toy_problem()
  for k in stats[BLOCK]:
    stats[BLOCK][k][1] = 0.0  # client 1 saw no token at all
  new, state, diag = run(FedAlignConfig(detailed_diagnostics=True), params, deltas, stats, N)
  assert_finite((new, state, diag))
  # expert 1 is now selected by client 0 only: its update is applied in full
  np.testing.assert_allclose(
      new[BLOCK]["experts"]["wo"][1],
      params[BLOCK]["experts"]["wo"][1] + deltas[BLOCK]["experts"]["wo"][0, 1],
      rtol=1e-5,
  )


def test_all_zero_scores_no_nan():
  params, deltas, stats = toy_problem()
  stats[BLOCK]["margin_sum"][:] = 0.0  # s = o * m = 0 -> omega falls back to n_i
  ex = deltas[BLOCK]["experts"]
  for k in ex:  # expert 1 (clients 0 and 1): opposite updates -> D = -1 -> S = 0
    ex[k][1, 1] = -ex[k][0, 1]
  new, state, diag = run(FedAlignConfig(detailed_diagnostics=True), params, deltas, stats, N)
  assert_finite((new, state, diag))
  np.testing.assert_allclose(
      diag[f"{BLOCK}/omega"], np.broadcast_to((N / N.sum())[:, None], (C, E)), rtol=1e-6
  )
  np.testing.assert_allclose(diag[f"{BLOCK}/S"][:2, 1], [0.0, 0.0], atol=1e-6)
  # all-zero scores in A(1): count-weighted fallback (c = 2 and 4)
  c = stats[BLOCK]["select_count"][:, 1]
  expected = params[BLOCK]["experts"]["wo"][1] + (c[0] * ex["wo"][0, 1] + c[1] * ex["wo"][1, 1]) / (
      c[0] + c[1]
  )
  np.testing.assert_allclose(new[BLOCK]["experts"]["wo"][1], expected, rtol=1e-5, atol=1e-6)


def test_single_client_no_nan_and_applies_its_update():
  params, deltas, stats = toy_problem()
  one = lambda x: x[2:3]  # noqa: E731
  deltas, stats = jax.tree.map(one, deltas), jax.tree.map(one, stats)
  new, state, diag = run(FedAlignConfig(detailed_diagnostics=True), params, deltas, stats, N[2:3])
  assert_finite((new, state, diag))
  # one client: omega = 1 (router = client router), S = 1 on selected experts
  expected = apply_delta(to_jnp(params), jax.tree.map(lambda x: jnp.float32(x[0]), deltas))
  for e in (0, 2):  # the experts client 2 selected
    np.testing.assert_allclose(
        new[BLOCK]["experts"]["wo"][e], expected[BLOCK]["experts"]["wo"][e], rtol=1e-5
    )
  np.testing.assert_array_equal(
      new[BLOCK]["experts"]["wo"][1], np.float32(params[BLOCK]["experts"]["wo"][1])
  )
  assert_tree_close(new[BLOCK]["router"], expected[BLOCK]["router"])
  np.testing.assert_allclose(diag[f"{BLOCK}/S"][0, [0, 2]], [1.0, 1.0])


def test_all_clients_excluded_keeps_params_and_state():
  params, deltas, stats = toy_problem()
  deltas = jax.tree.map(lambda x: np.full_like(x, np.nan), deltas)  # failed clients
  stats = jax.tree.map(lambda x: np.full_like(x, np.nan), stats)
  cfg = FedAlignConfig(server_optimizer=optax.adam(0.1), permutation_alignment=True)
  agg = fedalign_aggregator(cfg)
  state = agg.init(to_jnp(params))
  new, new_state, diag = jax.jit(agg.aggregate)(
      state, to_jnp(params), to_jnp(deltas), to_jnp(stats), jnp.zeros(C)
  )
  assert_tree_close(new, to_jnp(params), atol=0, rtol=0)
  for k in ("p_g", "alpha", "centroids", "opt"):
    assert_tree_close(new_state[k], state[k], atol=0, rtol=0)
  assert_finite(diag)


def test_excluded_client_with_nan_update_is_ignored():
  params, deltas, stats = toy_problem()
  ref, _, _ = run(
      None,
      params,
      jax.tree.map(lambda x: x[:2], deltas),
      jax.tree.map(lambda x: x[:2], stats),
      N[:2],
  )
  deltas = jax.tree.map(np.array, deltas)
  for leaf in jax.tree.leaves(deltas):
    leaf[2] = np.nan
  out, _, diag = run(None, params, deltas, stats, np.array([N[0], N[1], 0.0]))
  assert_tree_close(out, ref)
  assert_finite(diag)


# --------------------------------------------------------------------------------------------
# In-graph: no host callback.
# --------------------------------------------------------------------------------------------


def test_jaxpr_has_no_callback():
  params, deltas, stats = toy_problem()
  cfg = FedAlignConfig(
      permutation_alignment=True,
      centroid_noise_std=0.1,
      centroid_clip=1.0,
      server_optimizer=optax.adam(1e-3),
  )
  agg = fedalign_aggregator(cfg)
  state = agg.init(to_jnp(params))
  jaxpr = jax.make_jaxpr(jax.jit(agg.aggregate))(
      state, to_jnp(params), to_jnp(deltas), to_jnp(stats), jnp.asarray(N)
  )
  text = str(jaxpr)
  assert "while" in text  # the assignment solver is in the graph
  assert "callback" not in text

"""FedAlign-MoE's [ours] options of Science I and II (spec 3.2 conditional regularizer, 4.1
Bhattacharyya router overlap, 4.3 selection floor, 4.5 alignment margin), each against a numpy
reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedalign.algorithms.fedalign import FedAlignConfig, conditional_regularizer
from test_fedalign import (
    BLOCK,
    C,
    E,
    N,
    _perm_problem,
    _permute_client,
    assert_tree_close,
    reference,
    run,
    toy_problem,
)


def log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_conditional_regularizer_matches_numpy_and_trains_only_the_local_router():
  rng = np.random.default_rng(0)
  d, t = 5, 7
  x = rng.normal(size=(2, t, d)).astype(np.float32)
  mask = np.ones((2, t), np.float32)
  mask[1, 4:] = 0
  glob = {BLOCK: {"router": {"kernel": rng.normal(size=(d, E)), "bias": rng.normal(size=E)}}}
  loc = jax.tree.map(lambda v: v + 0.3 * rng.normal(size=v.shape), glob)
  alpha = rng.uniform(0.2, 1.0, size=E)
  xs = x.reshape(-1, d)
  lg = log_softmax(xs @ glob[BLOCK]["router"]["kernel"] + glob[BLOCK]["router"]["bias"])
  ll = log_softmax(xs @ loc[BLOCK]["router"]["kernel"] + loc[BLOCK]["router"]["bias"])
  per_token = (alpha * np.exp(lg) * (lg - ll)).sum(-1)
  expected = (per_token * mask.reshape(-1)).sum() / mask.sum()
  f32 = lambda t: jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), t)
  inputs = {BLOCK: {"x": jnp.asarray(x), "mask": jnp.asarray(mask)}}
  got = conditional_regularizer(f32(loc), f32(glob), inputs, {BLOCK: jnp.asarray(alpha)})
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  # Gradients: into the local router only.
  g_loc, g_glob = jax.grad(
      lambda a, b: conditional_regularizer(a, b, inputs, {BLOCK: jnp.asarray(alpha)}),
      argnums=(0, 1),
  )(f32(loc), f32(glob))
  assert float(jnp.abs(g_loc[BLOCK]["router"]["kernel"]).sum()) > 0
  assert float(jnp.abs(g_glob[BLOCK]["router"]["kernel"]).sum()) == 0
  assert float(conditional_regularizer(f32(glob), f32(glob), inputs)) == pytest.approx(0, abs=1e-6)


def test_conditional_regularizer_through_the_decoder_and_the_engine_hook():
  import ml_collections

  from fedalign.algorithms import make_algorithm
  from fedalign.config_files import load_config
  from fedalign.models import MoEConfig, build_module, init_params

  cfg = MoEConfig(
      vocab_size=16,
      hidden_size=8,
      num_heads=2,
      num_kv_heads=1,
      num_experts=4,
      top_k=2,
      moe_intermediate_size=4,
      num_layers=2,
  )
  module = build_module(cfg)
  params = init_params(cfg, 0)
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 16
  _, aux = module.apply({"params": params}, tokens, jnp.ones((2, 6), bool))
  assert sorted(aux["router_inputs"]) == sorted(aux["routing"])
  assert aux["router_inputs"]["layers_0/mlp"]["x"].shape == (12, 8)
  c = load_config("configs/default.py")
  c.method = "fedalign"
  c.fedalign.regularizer_form = "conditional"
  alg = make_algorithm(c, params, 4)
  bcast = alg.broadcast(alg.aggregator.init(params))
  moved = jax.tree.map(lambda v: v * 1.1, params)
  assert float(alg.client_loss(params, params, bcast, aux)) == pytest.approx(0, abs=1e-6)
  assert float(alg.client_loss(moved, params, bcast, aux)) > 0
  with pytest.raises(ValueError, match="router_inputs"):
    alg.client_loss(params, params, bcast, {"routing": aux["routing"]})
  del ml_collections


def test_bhattacharyya_overlap_uses_p_g_and_matches_numpy():
  params, deltas, stats = toy_problem(seed=1)
  uniform = np.full(E, 1.0 / E)
  skewed = np.array([0.55, 0.25, 0.15, 0.05])
  omegas = {}
  for overlap in ("per_expert", "bhattacharyya"):
    cfg = FedAlignConfig(router_overlap=overlap, detailed_diagnostics=True)
    for name, pg in (("uniform", uniform), ("skewed", skewed)):
      state = None
      from fedalign.algorithms.fedalign import fedalign_aggregator

      agg = fedalign_aggregator(cfg)
      state = agg.init(jax.tree.map(jnp.asarray, params))
      state["p_g"] = {BLOCK: jnp.asarray(pg, jnp.float32)}
      _, _, diag = run(cfg, params, deltas, stats, N, state=state)
      omegas[overlap, name] = np.asarray(diag[f"{BLOCK}/omega"])
  # The spec's defect: per expert, p_g cancels; the Bhattacharyya form depends on it.
  np.testing.assert_allclose(
      omegas["per_expert", "uniform"], omegas["per_expert", "skewed"], atol=1e-6
  )
  assert np.abs(omegas["bhattacharyya", "uniform"] - omegas["bhattacharyya", "skewed"]).max() > 1e-3
  # Reference: o_i = sum_e sqrt(p_i p_g), s = o_i sqrt(p_i(e)) m_i(e), omega = s / sum_i s.
  st = stats[BLOCK]
  p = st["prob_sum"] / st["token_count"][:, None]
  m = np.where(st["select_count"] > 0, st["margin_sum"] / np.maximum(st["select_count"], 1), 0)
  o = np.sqrt(p * skewed).sum(1, keepdims=True)
  s = o * np.sqrt(p) * m
  tot = s.sum(0, keepdims=True)
  expected = np.where(tot > 0, s / np.where(tot > 0, tot, 1), N[:, None] / N.sum())
  np.testing.assert_allclose(omegas["bhattacharyya", "skewed"], expected, rtol=1e-5, atol=1e-6)


def test_alignment_margin_keeps_the_identity_unless_the_gain_clears_it():
  params, deltas, stats = _perm_problem(seed=5, delta_scale=0.05)
  p_deltas, p_stats = _permute_client(params, deltas, stats, 1, [2, 0, 3, 1])
  _, _, diag = run(FedAlignConfig(permutation_alignment=True), params, p_deltas, p_stats, N)
  assert float(diag[f"{BLOCK}/perm_moved_frac"]) == pytest.approx(1 / 3)  # client 1 moved
  cfg = FedAlignConfig(permutation_alignment=True, alignment_margin=10.0)  # unreachable gain
  _, _, diag = run(cfg, params, p_deltas, p_stats, N)
  assert float(diag[f"{BLOCK}/perm_moved_frac"]) == 0.0
  # Un-relabelled clients have gain 0 and are never moved, whatever the margin.
  _, _, diag = run(
      FedAlignConfig(permutation_alignment=True, alignment_margin=0.0), params, deltas, stats, N
  )
  assert float(diag[f"{BLOCK}/perm_moved_frac"]) == 0.0


def test_selection_floor_keeps_every_client_where_the_scores_barely_spread():
  params, deltas, stats = toy_problem()
  ref = reference(params, deltas, stats, N)  # the paper's rule
  c, S = stats[BLOCK]["select_count"], ref["S"]
  # The toy's experts: 0 has 3 selecting clients with S spread by CV 0.42 (client 2 goes the
  # other way and is excluded), 1 has 2 tied clients (CV 0), 2 one client, 3 none.
  cv0 = S[:, 0].std() / S[:, 0].mean()
  assert 0.35 < cv0 < 0.5 and ref["A"][:, 0].tolist() == [1, 1, 0]

  # A floor below expert 0's spread changes nothing but floors the tied expert 1.
  new, _, diag = run(FedAlignConfig(selection_min_cv=0.3), params, deltas, stats, N)
  assert_tree_close(new, ref["new_params"])
  assert float(diag[f"{BLOCK}/floored_frac"]) == pytest.approx(0.5)

  # Above it, expert 0 keeps all three clients, weighted c S / sum c S; the others as before.
  cfg = FedAlignConfig(selection_min_cv=0.5, detailed_diagnostics=True)
  new, _, diag = run(cfg, params, deltas, stats, N)
  assert float(diag[f"{BLOCK}/floored_frac"]) == pytest.approx(1.0)
  np.testing.assert_array_equal(diag[f"{BLOCK}/A"][:, 0], [1, 1, 1])
  np.testing.assert_array_equal(diag[f"{BLOCK}/A"][:, 1:], ref["A"][:, 1:])
  w0 = c[:, 0] * S[:, 0] / (c[:, 0] * S[:, 0]).sum()
  np.testing.assert_allclose(diag[f"{BLOCK}/w"][:, 0], w0, rtol=1e-5)
  for k, got in new[BLOCK]["experts"].items():
    theta, d = params[BLOCK]["experts"][k], deltas[BLOCK]["experts"][k]
    np.testing.assert_allclose(got[0], theta[0] + np.tensordot(w0, d[:, 0], 1), rtol=1e-5)
    np.testing.assert_allclose(got[1:], ref["new_params"][BLOCK]["experts"][k][1:], rtol=1e-5)


@pytest.mark.parametrize(
    "field, value",
    [
        ("regularizer_form", "token"),
        ("router_overlap", "cosine"),
        ("alignment_margin", -0.1),
        ("selection_min_cv", -1.0),
    ],
)
def test_bad_option_names_field(field, value):
  with pytest.raises(ValueError, match=f"config.fedalign.{field}="):
    FedAlignConfig(**{field: value})

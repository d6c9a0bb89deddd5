"""The method registry and the engine's contract with it: padding, client state, server
optimizers, kept experts, config validation (the bugs of issue 11, each pinned)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import golden_aggregates as g
from fedalign.algorithms import METHODS, make_algorithm
from fedalign.algorithms.fedalign import FedAlignConfig
from fedalign.federated.client import make_client_update
from fedalign.federated.round import init_server_state, make_round_fn
from fedalign.models.lora import partition, trainable_mask
from test_engine import LR, LinearTask, make_config, toy_data


def test_registry_builds_every_method_and_names_the_choices():
  for method in ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold"):
    alg = make_algorithm(make_config(method), {"w": jnp.zeros(3)}, 4)
    assert alg.name == method
  assert set(METHODS) >= {"fedmoe", "fedalign"}
  with pytest.raises(ValueError, match=r"config.method='fedsgd'.*one of"):
    make_algorithm(make_config("fedsgd"), None, 4)


def test_fedopt_name_and_a_different_server_optimizer_is_an_error():
  with pytest.raises(ValueError, match=r"server.optimizer='yogi' contradicts.*'fedadam'"):
    make_algorithm(make_config("fedadam", optimizer="yogi"), None, 4)
  # The same optimizer asked both ways is fine, and so is fedavg + server.optimizer.
  make_algorithm(make_config("fedadam", optimizer="adam"), None, 4)
  assert make_algorithm(make_config("fedavg", optimizer="adam"), None, 4).name == "fedavg"
  with pytest.raises(ValueError, match=r"config.server.optimizer='lamb'.*one of"):
    make_algorithm(make_config("fedavg", optimizer="lamb"), None, 4)


def test_server_optimizer_none_with_a_learning_rate_warns_that_it_is_an_sgd_step(caplog):
  """'none' with server.learning_rate != 1 is a scaled step (documented), not plain
  averaging: it says so, since overriding only server.optimizer=none on a config with a server
  learning rate (configs/default.py: 3e-3) otherwise silently shrinks every update."""
  from fedalign.algorithms.base import server_optimizer_from_config

  with caplog.at_level("WARNING", logger="fedalign.algorithms.base"):
    opt = server_optimizer_from_config(make_config("fedavg", learning_rate=3e-3))
  assert opt is not None and "not as plain averaging" in caplog.text
  # the update is 3e-3 x the mean delta: sgd on the negated delta
  params = {"w": jnp.ones(2)}
  updates, _ = opt.update({"w": -jnp.array([1.0, -2.0])}, opt.init(params), params)
  np.testing.assert_allclose(updates["w"], [3e-3, -6e-3], rtol=1e-6)
  caplog.clear()
  with caplog.at_level("WARNING", logger="fedalign.algorithms.base"):
    assert server_optimizer_from_config(make_config("fedavg")) is None  # plain averaging
  assert caplog.text == ""


@pytest.mark.parametrize("method", ["fedavg", "fedprox"])
def test_cosine_server_learning_rate_scales_each_rounds_step(method):
  """server.lr_schedule='cosine': round r moves the params by lr(r) x the step plain averaging
  takes from the same params (the schedule's step count lives in the server optimizer state,
  every method gets it from server_optimizer_from_config)."""
  params = {"w": jnp.array([0.5, -1.0, 2.0], jnp.float32)}
  mask = {"w": True}
  batches, weights, ids = toy_data(clients=3), jnp.array([1.0, 2.0, 1.0]), jnp.arange(3)

  def round_fn(server):
    config = make_config(method, **server)
    config.train.rounds = 4
    alg = make_algorithm(config, partition(params, mask)[0], 3)
    cu = make_client_update(LinearTask(), alg, optax.sgd(LR), load_balance_coef=0.0)
    return alg, jax.jit(make_round_fn(cu, alg, mask, seed=0))

  alg, cosine = round_fn(dict(lr_schedule="cosine", learning_rate=0.8, lr_final_fraction=0.25))
  plain_alg, plain = round_fn({})
  lr = optax.cosine_decay_schedule(0.8, decay_steps=4, alpha=0.25)
  state = init_server_state(params, alg, mask, 3)
  for r in range(3):
    new, _ = cosine(state, batches, weights, ids, r)
    ref, _ = plain(init_server_state(state["params"], plain_alg, mask, 3), batches, weights, ids, r)
    np.testing.assert_allclose(
        new["params"]["w"] - state["params"]["w"],
        float(lr(r)) * (ref["params"]["w"] - state["params"]["w"]),
        rtol=2e-5,
        atol=1e-7,
    )
    state = new
  assert int(state["agg"]["opt"][1].count) == 3 and float(lr(2)) == pytest.approx(0.5)
  with pytest.raises(ValueError, match=r"server.lr_schedule='step'.*\('constant', 'cosine'\)"):
    make_algorithm(make_config(method, lr_schedule="step"), partition(params, mask)[0], 3)


def test_cosine_schedule_refuses_resuming_with_other_rounds(tmp_path):
  """A run's cosine schedule spans its train.rounds: resuming it with more rounds is refused
  (it would change the rounds already run); a constant schedule may be extended."""
  from fedalign.config_files import load_config
  from fedalign.federated.config_checks import check_workdir_config, validate_config

  cfg = load_config("configs/default.py:runlocal")
  cfg.server.lr_schedule = "cosine"
  check_workdir_config(tmp_path, cfg)
  cfg.train.rounds += 5
  with pytest.raises(ValueError, match=r"train.rounds=3.*lr_schedule='cosine'.*same train.rounds"):
    check_workdir_config(tmp_path, cfg)
  cfg.server.lr_schedule = "constant"
  with pytest.raises(ValueError, match=r"server.lr_schedule: 'cosine' -> 'constant'"):
    check_workdir_config(tmp_path, cfg)
  constant = load_config("configs/default.py:runlocal")
  (tmp_path / "c").mkdir()
  check_workdir_config(tmp_path / "c", constant)
  constant.train.rounds += 5
  check_workdir_config(tmp_path / "c", constant)  # resumable
  for field, value, accepted in [
      ("lr_schedule", "linear", r"one of \('constant', 'cosine'\)"),
      ("lr_final_fraction", 1.5, r"\[0, 1\]"),
  ]:
    bad = load_config("configs/default.py:runlocal")
    bad.server[field] = value
    with pytest.raises(ValueError, match=rf"config.server.{field}=.*{accepted}"):
      validate_config(bad)


# ---------------------------------------------------------------------------------------------
# A padded round equals the unpadded one (weight-0 copies of the first client, as the server
# pads to a multiple of the chunk size / mesh size).
# ---------------------------------------------------------------------------------------------


def run_linear(method, batches, weights, ids, num_clients, chunk=None, rounds=2):
  params = {"w": jnp.array([0.5, -1.0, 2.0], jnp.float32)}
  mask = {"w": True}
  alg = make_algorithm(make_config(method), partition(params, mask)[0], num_clients)
  cu = make_client_update(LinearTask(), alg, optax.sgd(LR), load_balance_coef=0.0)
  rf = jax.jit(make_round_fn(cu, alg, mask, seed=0, chunk_size=chunk))
  state = init_server_state(params, alg, mask, num_clients)
  for r in range(rounds):
    state, _ = rf(state, batches, jnp.asarray(weights, jnp.float32), jnp.asarray(ids), r)
  return state


def pad(batches, ids, weights, extra):
  padded = {k: np.concatenate([v, v[:extra] * 0]) for k, v in batches.items()}
  return padded, np.concatenate([ids, ids[:extra]]), np.concatenate([weights, [0.0] * extra])


@pytest.mark.parametrize("method", ["fedavg", "fedprox", "fedavgm", "fedadam", "scaffold"])
def test_padded_round_equals_unpadded_round(method):
  b = toy_data(clients=3)
  ids, weights = np.array([4, 1, 2]), np.array([1.0, 2.0, 3.0])
  ref = run_linear(method, b, weights, ids, num_clients=5)
  pb, pids, pw = pad(b, ids, weights, 1)
  got = run_linear(method, pb, pw, pids, num_clients=5, chunk=2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, ref)


def test_scaffold_padded_round_keeps_every_control_variate():
  """The padding row repeats client 4's id; before the fix its stale c_i won the scatter."""
  b = toy_data(clients=3)
  ids, weights = np.array([4, 1, 2]), np.array([1.0, 2.0, 3.0])
  pb, pids, pw = pad(b, ids, weights, 1)
  state = run_linear("scaffold", pb, pw, pids, num_clients=3 + 2, chunk=2, rounds=1)
  ci = np.asarray(state["client_states"]["w"])
  assert np.all(np.abs(ci[[4, 1, 2]]) > 0) and np.all(ci[[0, 3]] == 0)
  # One round from c = 0: c = (1 / N) sum_i c_i over the participants (the others are 0).
  np.testing.assert_allclose(state["agg"]["control"]["w"], ci.sum(0) / 5, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("fedmoe", marks=pytest.mark.slow),
        pytest.param("fedalign_perm", marks=pytest.mark.slow),
    ],
)
def test_padded_moe_round_equals_unpadded_round(case):
  method, trainable, overrides = g.CASES[case]
  config = g.base_config(method, trainable, overrides)
  cfg, params, batches = g.model_and_batches(False)
  mask = trainable_mask(params, trainable)
  from fedalign.federated.task import CausalLMTask
  from fedalign.models import build_module

  task = CausalLMTask(build_module(cfg))
  alg = make_algorithm(config, partition(params, mask)[0], 4)
  cu = make_client_update(task, alg, optax.sgd(0.05))
  b3 = {k: v[:3] for k, v in batches.items()}
  ids, weights = np.array([2, 0, 3]), np.array([30.0, 10.0, 20.0])
  outs = []
  for chunk, (bb, ii, ww) in ((None, (b3, ids, weights)), (2, pad(b3, ids, weights, 1))):
    rf = jax.jit(make_round_fn(cu, alg, mask, seed=0, chunk_size=chunk))
    state = init_server_state(params, alg, mask, 4)
    state, _ = rf(state, bb, jnp.asarray(ww, jnp.float32), jnp.asarray(ii), 0)
    outs.append(state["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *outs)


# ---------------------------------------------------------------------------------------------
# Server optimizers: state over the trainable leaves only; kept experts keep their state.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fedmoe", "fedalign", "fedavg", "scaffold"])
def test_lora_server_optimizer_state_covers_only_the_trainable_leaves(method):
  config = g.base_config(method, "lora", {"server.optimizer": "adam", "server.learning_rate": 0.01})
  _, params, _ = g.model_and_batches(True)
  mask = trainable_mask(params, "lora")
  trainable = partition(params, mask)[0]
  state = make_algorithm(config, trainable, 4).aggregator.init(params)
  adam = state["opt"][0]
  size = lambda t: sum(x.size for x in jax.tree.leaves(t))
  assert size(adam.mu) == size(adam.nu) == size(trainable) < size(params) / 2


def moe_problem():
  """Two clients, 2 experts; expert 1 selected in round 1 only."""
  rng = np.random.default_rng(0)
  params = {
      "moe": {
          "router": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
          "experts": {"wo": jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)},
      }
  }
  deltas = jax.tree.map(
      lambda x: jnp.asarray(0.1 * rng.normal(size=(2,) + x.shape), jnp.float32), params
  )

  def stats(select):
    select = jnp.asarray(select, jnp.float32)
    return {
        "moe": {
            "token_count": jnp.full((2,), 8.0),
            "prob_sum": jnp.full((2, 2), 4.0),
            "select_count": select,
            "margin_sum": 0.1 * select,
            "gate_sum": 0.5 * select,
            "centroid_sum": jnp.asarray(rng.normal(size=(2, 2, 3)), jnp.float32)
            * select[..., None],
        }
    }

  return params, deltas, stats([[4.0, 4.0], [4.0, 4.0]]), stats([[8.0, 0.0], [8.0, 0.0]])


@pytest.mark.parametrize("method", ["fedmoe", "fedalign"])
@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_expert_nobody_may_update_keeps_params_and_optimizer_state(method, optimizer):
  """'If A(e) is empty the expert keeps theta_e' also with a server optimizer (momentum /
  Adam used to move it through their state)."""
  params, deltas, stats1, stats2 = moe_problem()
  config = g.base_config(
      method, "full", {"server.optimizer": optimizer, "server.learning_rate": 0.5}
  )
  agg = make_algorithm(config, params, 2).aggregator
  aggregate = jax.jit(agg.aggregate)
  w = jnp.array([1.0, 2.0])
  p1, s1, _ = aggregate(agg.init(params), params, deltas, stats1, w)
  assert not np.allclose(p1["moe"]["experts"]["wo"][1], params["moe"]["experts"]["wo"][1])
  p2, s2, _ = aggregate(s1, p1, deltas, stats2, w)
  np.testing.assert_array_equal(p2["moe"]["experts"]["wo"][1], p1["moe"]["experts"]["wo"][1])
  assert not np.allclose(p2["moe"]["experts"]["wo"][0], p1["moe"]["experts"]["wo"][0])
  for new, old in zip(jax.tree.leaves(s2["opt"]), jax.tree.leaves(s1["opt"])):
    if np.shape(new)[:1] == (2,) and np.ndim(new) == 3:  # expert leaves' moments
      np.testing.assert_array_equal(new[1], old[1])


# ---------------------------------------------------------------------------------------------
# FedAlign-MoE options: all reachable from a run's config, validated.
# ---------------------------------------------------------------------------------------------


def test_default_config_sets_every_fedalign_option():
  import dataclasses

  from fedalign.config_files import load_config

  c = load_config("configs/default.py")
  fields = {f.name for f in dataclasses.fields(FedAlignConfig)} - {"server_optimizer", "seed"}
  assert set(c.fedalign.keys()) == fields
  c.method = "fedalign"
  c.fedalign.detailed_diagnostics = True
  c.fedalign.pairwise_chunk_size = 2
  c.fedalign.alignment_similarity = "weight"
  alg = make_algorithm(c, None, 4)  # 0 = off for centroid_clip / pairwise_chunk_size
  assert alg.name == "fedalign"


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("beta", -0.5, r"config.fedalign.beta=-0.5 is invalid: expected a float >= 0"),
        ("lambda_reg", -1.0, r"config.fedalign.lambda_reg=-1.0 .*>= 0"),
        ("alignment_similarity", "gate", r"alignment_similarity='gate'.*\('centroid', 'weight'\)"),
        ("router_weighting", "x", r"router_weighting='x'.*one of"),
        ("centroid_clip", -1.0, r"centroid_clip=-1.0.*> 0"),
    ],
)
def test_bad_fedalign_option_names_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    FedAlignConfig(**{field: value})

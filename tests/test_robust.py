"""Robust aggregation and simulated attacks (issue 15 items 1-2): each defence against NumPy on
hand-made updates, their composition with the methods through the jitted round, the routing-
inflation attack and its defence, the attacker set, the config checks."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedalign.aggregation import moe_blocks as mb
from fedalign.aggregation import robust
from fedalign.algorithms import make_algorithm
from fedalign.federated import attacks
from fedalign.federated.client import make_client_update
from fedalign.federated.round import init_server_state, make_round_fn
from fedalign.models.lora import partition
from fedalign.models.routing import routing_stats
from fedalign.reports import write_generated_block

# ------------------------------------------------------------------ defences vs NumPy


def test_median_and_trimmed_mean_equal_numpy_per_expert():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 3, 4)).astype(np.float32)  # (C, E, P)
  w = rng.uniform(0.1, 1.0, size=(7, 3)).astype(np.float32)
  w[[1, 4], 0] = 0.0  # expert 0: clients 1 and 4 not selected
  w[:, 2] = 0.0
  w[5, 2] = 0.7  # expert 2: one client
  x[1, 0] = np.nan  # a non-selected row may hold anything
  part = np.ones(7, bool)
  part[6] = False  # client 6 does not take part at all
  x[6] = 1e9
  for e in range(3):
    sel = (w[:, e] > 0) & part
    vals = x[sel, e]
    total = w[sel, e].sum()
    med = robust.robust_sum(jnp.asarray(w), jnp.asarray(x), jnp.asarray(part), kind="median")
    np.testing.assert_allclose(med[e], total * np.median(vals, axis=0), rtol=1e-6)
    k = int(np.floor(0.2 * len(vals)))
    srt = np.sort(vals, axis=0)
    tm_ref = srt[k : len(vals) - k].mean(axis=0)
    tm = robust.robust_sum(
        jnp.asarray(w), jnp.asarray(x), jnp.asarray(part), kind="trimmed_mean", trim_fraction=0.2
    )
    np.testing.assert_allclose(tm[e], total * tm_ref, rtol=1e-6)
  # exact hand-made values: median of {1, 2, 3, 100} = 2.5, trimmed (1 each end) = 2.5
  x1 = jnp.array([[1.0], [2.0], [3.0], [100.0], [-7.0]])
  w1 = jnp.array([0.25, 0.25, 0.25, 0.25, 0.0])
  assert float(robust.robust_sum(w1, x1, kind="median")[0]) == 2.5
  assert float(robust.robust_sum(w1, x1, kind="trimmed_mean", trim_fraction=0.25)[0]) == 2.5
  assert float(robust.robust_sum(w1 * 0, x1, kind="median")[0]) == 0.0  # nobody selected


def test_toolkit_sums_are_robust_inside_the_context_only():
  x = jnp.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [300.0, 30.0]])
  w = jnp.full((4,), 0.25)
  part = jnp.array([True, True, True, True])
  assert mb.client_sum(w, x, part).tolist() == [76.5, 7.5]
  with robust.robust_reduction(robust.RobustConfig(kind="median")):
    assert mb.client_sum(w, x, part).tolist() == [2.5, 0.0]
    assert mb.expert_sum(jnp.ones((4, 1)), x[:, :1, None])[0, 0].tolist() == 4 * 2.5
  with robust.robust_reduction(robust.RobustConfig(kind="norm_bound")):  # not a reduction
    assert mb.client_sum(w, x, part).tolist() == [76.5, 7.5]
  assert robust.active_reduction() is None


def test_norm_bound_scales_to_the_bound():
  rng = np.random.default_rng(1)
  d = {"a": rng.normal(size=(5, 3)).astype(np.float32), "b": rng.normal(size=(5, 2, 2))}
  d["a"][4] *= 50
  norms = np.sqrt((d["a"] ** 2).sum(1) + (d["b"] ** 2).sum((1, 2)))
  part = jnp.ones(5, bool)
  for bound in (0.0, 1.5):
    out, diag = robust.bound_norms(jax.tree.map(jnp.asarray, d), part, bound)
    b = np.median(norms) if bound == 0 else bound
    factor = np.minimum(1.0, b / norms)
    np.testing.assert_allclose(out["a"], d["a"] * factor[:, None], rtol=1e-5)
    np.testing.assert_allclose(out["b"], d["b"] * factor[:, None, None], rtol=1e-5)
    np.testing.assert_allclose(float(diag["robust_norm_bound"]), b, rtol=1e-6)


def test_krum_picks_the_honest_cluster():
  rng = np.random.default_rng(2)
  honest = 1.0 + 0.05 * rng.normal(size=(7, 6))
  bad = -5.0 + 0.01 * rng.normal(size=(3, 6))  # a tight colluding cluster far away
  x = np.concatenate([honest, bad]).astype(np.float32)
  part = jnp.ones(10, bool)
  # NumPy Krum scores: n - f - 2 nearest squared distances
  f = 3
  dist = ((x[:, None] - x[None]) ** 2).sum(-1)
  np.fill_diagonal(dist, np.inf)
  ref = np.sort(dist, 1)[:, : 10 - f - 2].sum(1)
  scores, _, _ = robust.krum_scores({"w": jnp.asarray(x)}, part, f)
  np.testing.assert_allclose(scores, ref, rtol=1e-4)
  chosen, _ = robust.krum_select({"w": jnp.asarray(x)}, part, f, 1)  # Krum
  assert int(np.flatnonzero(chosen)[0]) == int(np.argmin(ref)) and int(chosen.sum()) == 1
  chosen, _ = robust.krum_select({"w": jnp.asarray(x)}, part, f, 0)  # Multi-Krum, m = n - f
  assert chosen.tolist() == [True] * 7 + [False] * 3
  part2 = part.at[0].set(False)  # a non-participant is never chosen
  chosen, _ = robust.krum_select({"w": jnp.asarray(x)}, part2, f, 0)
  assert not bool(chosen[0]) and int(chosen.sum()) == 6


def test_sanitize_stats_bounds_and_clips():
  c, e = 5, 4
  rng = np.random.default_rng(3)
  tc = np.full(c, 100.0, np.float32)
  sel = rng.integers(10, 60, size=(c, e)).astype(np.float32)
  s = {
      "token_count": tc.copy(),
      "prob_sum": np.tile(np.float32([40, 30, 20, 10]), (c, 1)),
      "select_count": sel.copy(),
      "margin_sum": sel * 0.2,
      "gate_sum": sel * 0.5,
      "centroid_sum": np.ones((c, e, 3), np.float32) * sel[..., None] * 0.5,
  }
  # client 4 inflates everything 1000x and claims margin 1
  for k in ("token_count", "prob_sum", "select_count", "gate_sum", "centroid_sum"):
    s[k][4] *= 1000
  s["margin_sum"][4] = s["select_count"][4]
  out = robust.sanitize_stats({"moe": s}, jnp.ones(c, bool), jnp.asarray(tc), top_k=2)["moe"]
  assert np.asarray(out["token_count"]).tolist() == [100.0] * c
  f = np.asarray(out["select_count"]) / 100
  honest_f = sel[:4] / 100
  med = np.median(np.concatenate([honest_f, np.ones((1, e))]), axis=0)  # attacker f = 1
  np.testing.assert_allclose(f[4], med, rtol=1e-5)  # clipped to the median
  np.testing.assert_allclose(f[:4], np.minimum(honest_f, med[None]), rtol=1e-5)
  m = np.asarray(out["margin_sum"]) / np.asarray(out["select_count"])
  assert np.all(m <= 0.2 + 1e-6)  # the attacker's margin 1 clipped to the honest 0.2
  ps = np.asarray(out["prob_sum"]).sum(1)
  np.testing.assert_allclose(ps[:4], 100.0, rtol=1e-5)  # p_i sums to 1
  assert ps[4] <= 100.0 + 1e-3  # the attacker's p is clipped below it
  # centroids mu = centroid_sum / gate_sum unchanged
  mu = np.asarray(out["centroid_sum"]) / np.asarray(out["gate_sum"])[..., None]
  np.testing.assert_allclose(mu, 1.0, rtol=1e-5)


# ------------------------------------------------------------------ attacks


def test_attacker_set_is_deterministic_from_the_seed():
  a = attacks.attacker_ids(3, 20, 0.2)
  assert a.tolist() == attacks.attacker_ids(3, 20, 0.2).tolist() and len(a) == 4
  assert len(attacks.attacker_ids(3, 20, 0.3)) == 6
  assert attacks.attacker_ids(4, 20, 0.2).tolist() != a.tolist()
  cfg = ml_collections.ConfigDict(
      dict(seed=3, data=dict(num_clients=20), attack=dict(kind="scale", fraction=0.2, scale=2.0))
  )
  for method in ("fedavg", "fedalign"):  # the config's method plays no part
    cfg.method = method
    assert np.flatnonzero(attacks.from_config(cfg).attackers).tolist() == a.tolist()
  cfg.attack.fraction = 0.0
  assert attacks.from_config(cfg) is None


def test_label_flip_changes_only_the_attackers_label_words():
  table = attacks.label_flip_table(10, [7, 8, 9])
  atk = attacks.Attack("label_flip", 1.0, np.array([False, True]), table)
  tokens = jnp.array([[[[1, 7]]], [[[7, 8]]]])  # (C=2, steps, B, T)
  tmask = jnp.array([[[[0, 1]]], [[[1, 1]]]], bool)
  out = attacks.flip_batches(atk, {"tokens": tokens, "target_mask": tmask}, jnp.arange(2), False)
  assert out["tokens"].tolist() == [[[[1, 7]]], [[[8, 9]]]]


# ------------------------------------------------------------------ through the jitted round


class ToyMoETask:
  """A one-block MoE regression: 4 experts (D -> 1), top-1 routing, real routing stats."""

  def loss(self, params, batch, rng):
    del rng
    blk = params["moe"]
    x = batch["x"]
    probs = jax.nn.softmax(x @ blk["router"]["kernel"], axis=-1)
    top = jnp.argmax(probs, axis=-1)[:, None]
    outs = jnp.einsum("bd,edo->beo", x, blk["experts"]["wo"])[..., 0]  # (B, E)
    pred = jnp.sum(probs * outs, axis=-1) + x @ params["head"]
    zero = jnp.zeros((), jnp.float32)
    aux = {
        "routing": {"moe": routing_stats(probs, top, x)},
        "load_balance_loss": zero,
        "router_z_loss": zero,
    }
    return 0.5 * jnp.mean((pred - batch["y"]) ** 2), aux


def toy_params():
  k = jax.random.split(jax.random.key(0), 3)
  return {
      "moe": {
          "router": {"kernel": jax.random.normal(k[0], (3, 4)) * 0.5},
          "experts": {"wo": jax.random.normal(k[1], (4, 3, 1)) * 0.5},
      },
      "head": jax.random.normal(k[2], (3,)) * 0.5,
  }


def toy_batches(clients=6, steps=2):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(clients, steps, 8, 3)).astype(np.float32)
  y = (x @ np.float32([1.0, -2.0, 0.5])).astype(np.float32)
  mask = np.ones((clients, steps, 8, 1), bool)  # one valid token per row: the token bound
  return {"x": x, "y": y, "mask": mask, "step_mask": np.ones((clients, steps), bool)}


def toy_config(method, robust_kind="none", **server):
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 0
  c.server = ml_collections.ConfigDict(
      dict(optimizer="none", learning_rate=1.0, momentum=0.9, b1=0.9, b2=0.99, eps=1e-3)
  )
  c.server.update(server)
  c.fedprox = ml_collections.ConfigDict(dict(mu=0.1))
  c.train = ml_collections.ConfigDict(dict(learning_rate=0.1))
  c.fedalign = ml_collections.ConfigDict(dict(detailed_diagnostics=True))
  return c


def toy_round(method, rcfg=None, atk=None, server=None):
  params = toy_params()
  mask = jax.tree.map(lambda _: True, params)
  batches = toy_batches()
  c = batches["x"].shape[0]
  alg = make_algorithm(toy_config(method, **(server or {})), partition(params, mask)[0], c)
  cu = make_client_update(ToyMoETask(), alg, optax.sgd(0.1), load_balance_coef=0.0)
  rf = jax.jit(make_round_fn(cu, alg, mask, seed=0, robust=rcfg, attack=atk))
  state = init_server_state(params, alg, mask, c)
  new, out = rf(state, batches, jnp.arange(1.0, c + 1.0), jnp.arange(c), 0)
  moved = jax.tree.map(lambda a, b: a - b, new["params"], params)
  return moved, out


def dist(a, b):
  return float(
      jnp.sqrt(sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
  )


SCALED = attacks.Attack("scale", 100.0, np.array([False, False, True, False, False, False]))


def test_a_scaled_attacker_moves_undefended_fedavg_and_not_defended():
  clean, _ = toy_round("fedavg")
  attacked, _ = toy_round("fedavg", atk=SCALED)
  ref = dist(clean, jax.tree.map(jnp.zeros_like, clean))  # the clean update's norm
  assert dist(attacked, clean) > 5 * ref  # one of six clients at 100x: far off
  for rcfg in (
      robust.RobustConfig(kind="median"),
      robust.RobustConfig(kind="trimmed_mean", trim_fraction=0.2),
      robust.RobustConfig(kind="norm_bound"),
      robust.RobustConfig(kind="krum"),
  ):
    defended, out = toy_round("fedavg", rcfg, SCALED)
    assert dist(defended, clean) < 0.6 * ref, rcfg.kind
  assert not bool(np.asarray(out["diagnostics"]["krum_chosen"])[2])  # Krum drops the attacker


@pytest.mark.parametrize(
    "method",
    [
        "fedalign",
        pytest.param("fedadam", marks=pytest.mark.slow),
        pytest.param("scaffold", marks=pytest.mark.slow),
        pytest.param("fedmoe", marks=pytest.mark.slow),
    ],
)
def test_median_composes_with_every_method(method):
  # fedadam: the server step is normalised per coordinate (about lr), so the attacker moves it
  # less to begin with and the median's gain is smaller
  server = {"learning_rate": 0.1} if method == "fedadam" else {}
  clean, _ = toy_round(method, server=server)
  attacked, _ = toy_round(method, atk=SCALED, server=server)
  defended, _ = toy_round(method, robust.RobustConfig(kind="median"), SCALED, server=server)
  assert dist(defended, clean) < (0.7 if method == "fedadam" else 0.3) * dist(attacked, clean)


def test_routing_inflation_captures_expert_weight_undefended_not_defended():
  atk = attacks.Attack("routing_inflation", 1000.0, np.array([False, True] + [False] * 4))
  _, clean = toy_round("fedalign")
  _, out = toy_round("fedalign", atk=atk)
  _, dfd = toy_round("fedalign", robust.RobustConfig(kind="none", stats=True, top_k=1), atk)
  w_clean = np.asarray(clean["diagnostics"]["moe/w"])  # (C, E) expert weights
  w_att = np.asarray(out["diagnostics"]["moe/w"])
  w_def = np.asarray(dfd["diagnostics"]["moe/w"])
  used = w_att[1] > 0  # experts the attacker is aggregated into
  assert used.any()
  assert np.all(w_att[1][used] > 0.99)  # the attacker takes over those experts
  # defended: the attacker weighs about what it weighs honestly (clean: at most 0.23 here),
  # its counts and margins clipped to the median client's
  assert np.all(w_clean[1] < 0.25) and np.all(w_def[1] < 0.35)
  assert np.all(np.delete(w_def, 1, axis=0).sum(0)[used] > 0.65)


def test_routing_inflation_leaves_fedavg_unchanged():
  # experiments/robustness.py does not run FedAvg x routing_inflation and shows the clean run
  atk = attacks.Attack("routing_inflation", 1000.0, np.array([False, True] + [False] * 4))
  for rcfg in (None, robust.RobustConfig(kind="median", stats=True, top_k=1)):
    clean, _ = toy_round("fedavg", rcfg)
    attacked, _ = toy_round("fedavg", rcfg, atk)
    for x, y in zip(jax.tree.leaves(clean), jax.tree.leaves(attacked)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  moved, _ = toy_round("fedalign", atk=atk)  # the premise: it does move FedAlign-MoE
  assert dist(moved, toy_round("fedalign")[0]) > 0


def test_gaussian_attack_noise_has_the_scaled_norm():
  atk = attacks.Attack("gaussian", 3.0, np.array([True] * 6))
  honest, _ = toy_round("fedavg")
  noisy, out = toy_round("fedavg", atk=atk)
  assert not bool(np.any(np.asarray(out["excluded"])))
  assert dist(noisy, honest) > dist(honest, jax.tree.map(jnp.zeros_like, honest))


# ------------------------------------------------------------------ config checks


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("server.robust", "mean", "config.server.robust='mean' is invalid"),
        ("server.trim_fraction", 0.5, "config.server.trim_fraction=0.5 is invalid"),
        ("server.robust_norm_bound", -1.0, "config.server.robust_norm_bound=-1.0"),
        ("server.krum_byzantine", 4, "2 f + 3 <= train.clients_per_round=10"),
        ("server.robust_stats_quantile", 0.0, "robust_stats_quantile=0.0"),
        ("attack.kind", "backdoor", "config.attack.kind='backdoor' is invalid"),
        ("attack.fraction", 0.5, "config.attack.fraction=0.5 is invalid"),
        ("attack.fraction", -0.1, "config.attack.fraction=-0.1 is invalid"),
        ("attack.scale", -2.0, "config.attack.scale=-2.0 is invalid"),
    ],
)
def test_config_checks_name_the_field(field, value, message):
  from fedalign.config_files import load_config
  from fedalign.federated.config_checks import validate_config

  cfg = load_config("configs/default.py:runlocal")
  validate_config(cfg)
  section, name = field.split(".")
  if field == "server.krum_byzantine":
    cfg.server.robust = "krum"
  cfg[section][name] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
    validate_config(cfg)


def test_krum_needs_enough_clients_per_round():
  with pytest.raises(ValueError, match="Krum needs >= 3"):
    robust.check_fields("krum", 0.0, 0.1, 0, 0, 0.5, clients_per_round=2)
  robust.check_fields("krum", 0.0, 0.1, 0, 0, 0.5, clients_per_round=3)  # f = 0: fine


# ------------------------------------------------------------------ experiments/robustness.py


def test_robustness_grid_and_tables_from_run_files(tmp_path):
  from experiments import robustness as rx

  cells = rx.grid(
      ["fedavg", "fedalign"],
      ["none", "median"],
      ["scale", "routing_inflation"],
      [0.0, 0.2],
      [1.0],
      [0, 1],
  )
  names = {c.name for c in cells}
  assert "fedavg__none__routing_inflation__f0.2__a1__s0" not in names  # = clean, not run
  assert "fedalign__median__routing_inflation__f0.2__a1__s1" in names
  # per seed: 2 methods x 2 defences x clean, + scale for both, + inflation for FedAlign only
  assert len(cells) == 2 * (2 * 2 + 2 * 2 + 2)
  acc = {
      ("fedavg", "none", "none", 0): [0.40, 0.50],
      ("fedavg", "none", "scale", 0.2): [0.20, 0.30],
      ("fedalign", "median", "scale", 0.2): [0.45],
      ("fedalign", "none", "routing_inflation", 0.2): [0.41],
  }
  (tmp_path / "runs").mkdir()
  for (m, d, attack, f), values in acc.items():
    for seed, a in enumerate(values):
      cell = rx.Cell(m, d, attack, float(f), 1.0, seed)
      rec = {"cell": rx.dataclasses.asdict(cell), "final_test_accuracy": a, "wall_time_s": 1.0}
      (tmp_path / "runs" / f"{cell.name}.json").write_text(json.dumps(rec))
  docs = tmp_path / "doc.md"
  docs.write_text("hand-written\n")
  other = tmp_path / "other_grid"
  (other / "runs").mkdir(parents=True)
  rx.write_tables(other, "- the other grid's header", str(docs))
  write_generated_block(docs, rx.docs_key(tmp_path), "old tables")
  body = rx.write_tables(tmp_path, "- header", str(docs))
  assert "| FedAvg | none | 0.450 ± 0.071 (2) | 0.250 ± 0.071 (2) |" in body
  assert "| FedAlign-MoE | median | - | 0.450 (1) |" in body
  # FedAvg ignores routing statistics: its inflation row is the clean run
  inflation = body.split("attack = routing_inflation")[1]
  assert "| FedAvg | none | 0.450 ± 0.071 (2) | = clean |" in inflation
  assert "| FedAlign-MoE | none | - | 0.410 (1) |" in inflation
  text = docs.read_text()
  assert text.startswith("hand-written\n") and "old tables" not in text and body.rstrip() in text
  # the other workdir's block is kept, above this one's (the order they were first written)
  assert "- the other grid's header" in text and text.index("other grid") < text.index(
      body.rstrip()
  )
  assert text.count(rx.docs_key(tmp_path)) == 2  # its begin and end markers, once

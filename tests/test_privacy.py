"""Client-level DP (fedalign/privacy.py): accounting, client-side noise, clipping, validation;
faults: dropouts, an interrupted checkpoint write, a corrupted last metrics line, an unreadable
pre-trained checkpoint."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import types

import dp_accounting as dpa
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from fedalign import privacy
from fedalign.algorithms.fedavg import fedavg_aggregator
from fedalign.federated.config_checks import validate_config
from fedalign.federated.hooks import truncate_metrics
from fedalign.federated.run import sample_clients
from fedalign.federated.server import run_experiment
from fedalign.models.routing import finalize_stats
from tests.test_server import default_config, read_metrics, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def dp_config(method="fedavg", clip=1.0, z=1.0, n=10, m=10, stats_clip=1.0):
  return ml_collections.ConfigDict(
      {
          "method": method,
          "seed": 0,
          "data": {"num_clients": n},
          "train": {"clients_per_round": m},
          "dp": dict(clip_norm=clip, noise_multiplier=z, delta=1e-5, stats_clip_norm=stats_clip),
          "faults": {"drop_prob": 0.0},
      }
  )


def direct_epsilon(event, delta=1e-5):
  acc = rdp.RdpAccountant(privacy.RDP_ORDERS, dpa.NeighboringRelation.REPLACE_ONE)
  acc.compose(event)
  return acc.get_epsilon(delta)


# ------------------------------------------------------------------------------ accounting
def test_accountant_equals_direct_dp_accounting():
  # 'sum' view, 3 of 10 clients a round without replacement, 7 rounds, z = 1.5 (sensitivity 2C).
  c = dp_config(z=1.5, n=10, m=3)
  acc = privacy.Accountant(c, lambda r: sample_clients(0, r, 10, 3))
  gauss = dpa.GaussianDpEvent(0.75)
  want = direct_epsilon(
      dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(10, 3, gauss), 7)
  )
  assert acc.epsilon(7) == pytest.approx(want, rel=1e-9)
  assert 0 < acc.epsilon(1) < acc.epsilon(7) < direct_epsilon(dpa.SelfComposedDpEvent(gauss, 7))
  # All clients every round: no amplification.
  full = privacy.Accountant(dp_config(z=1.5, n=4, m=4), lambda r: np.arange(4))
  assert full.epsilon(5) == pytest.approx(direct_epsilon(dpa.SelfComposedDpEvent(gauss, 5)))
  # 'rows' view: the worst client's uploads, delta and statistics composed, no amplification.
  uploaded = lambda r: sample_clients(0, r, 10, 3)
  rows = privacy.Accountant(dp_config("fedalign", z=2.0, n=10, m=3), uploaded)
  counts = np.bincount(np.concatenate([uploaded(r) for r in range(9)]), minlength=10)
  g = dpa.GaussianDpEvent(1.0)
  event = dpa.SelfComposedDpEvent(dpa.ComposedDpEvent([g, g]), int(counts.max()))
  assert rows.epsilon(9) == pytest.approx(direct_epsilon(event), rel=1e-9)
  assert rows.epsilon(3) <= rows.epsilon(9)  # recomputed from scratch when going back
  assert privacy.Accountant(dp_config(z=0.0), uploaded).epsilon(2) == float("inf")


def test_noise_for_epsilon_inverts_the_accountant():
  fn = lambda z: privacy.epsilon_sum(z, 20, 20, 10, 1e-5)  # all clients: the fast Gaussian RDP
  z = privacy.noise_for_epsilon(4.0, 1e-5, fn)
  assert fn(z) <= 4.0 < fn(z / 1.01)
  assert privacy.noise_for_epsilon(float("inf"), 1e-5, fn) == 0.0


# ------------------------------------------------------------------------------ client side
def fake_stats(rng, clients=3, experts=4, dim=6, tokens=50.0):
  probs = rng.dirichlet(np.ones(experts), size=clients)
  sel = rng.uniform(0.2, 0.8, size=(clients, experts))
  return {
      "moe": {
          "token_count": jnp.full((clients,), tokens, jnp.float32),
          "prob_sum": jnp.asarray(probs * tokens, jnp.float32),
          "select_count": jnp.asarray(sel * tokens, jnp.float32),
          "margin_sum": jnp.asarray(sel * tokens * 0.1, jnp.float32),
          "gate_sum": jnp.asarray(sel * tokens * 0.4, jnp.float32),
          "centroid_sum": jnp.asarray(rng.normal(size=(clients, experts, dim)), jnp.float32),
      }
  }


def run_privatizer(config, deltas, stats, weights):
  priv = jax.jit(privacy.make_privatizer(config))
  c = weights.shape[0]
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(c))
  return priv(deltas, stats, weights, jnp.zeros((c,)), keys)


def test_uploaded_statistics_are_noised_on_the_client_and_exact_without_noise():
  rng = np.random.default_rng(0)
  stats = fake_stats(rng)
  deltas = {"w": jnp.asarray(rng.normal(size=(3, 5)) * 0.01, jnp.float32)}
  weights = jnp.array([10.0, 20.0, 30.0])
  # No noise and a clip far above the statistics' norm: the upload is the per-token means,
  # from which the server's p, m and mu are the raw ones (c becomes a fraction of tokens).
  _, up, w, _ = run_privatizer(dp_config("fedalign", z=0.0, stats_clip=1e6), deltas, stats, weights)
  raw, seen = finalize_stats(stats["moe"]), finalize_stats(up["moe"])
  for k in ("p", "m", "mu"):
    np.testing.assert_allclose(seen[k], raw[k], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(seen["c"], raw["c"] / 50.0, rtol=1e-6)
  assert w.tolist() == [1.0, 1.0, 1.0]  # uniform weights under DP
  # With noise: what the server sees differs from the raw statistics, on every client.
  _, up, _, _ = run_privatizer(dp_config("fedalign", z=1.0, stats_clip=1.0), deltas, stats, weights)
  normed = privacy.normalize_stats(stats)["moe"]
  diff = np.abs(np.asarray(up["moe"]["centroid_sum"] - normed["centroid_sum"])).reshape(3, -1)
  assert (diff.max(axis=1) > 0.05).all()
  # The noise is drawn client by client, before the server's projection: its std is z * S.
  big = fake_stats(rng, clients=2, experts=8, dim=4000)
  clipped, norms = privacy.clip_rows(
      {k: v for k, v in privacy.normalize_stats(big)["moe"].items() if k != "token_count"}, 1.0
  )
  noised, _ = jax.jit(privacy.privatize_stats, static_argnums=(1, 2))(
      big, 1.0, 0.5, jax.random.split(jax.random.key(1), 2)
  )
  resid = np.asarray(noised["moe"]["centroid_sum"] - clipped["centroid_sum"])
  assert np.std(resid) == pytest.approx(0.5, rel=0.02)


def test_clipping_bounds_each_clients_contribution():
  params = {"w": jnp.zeros(4)}
  agg = fedavg_aggregator()
  base = jnp.array([[0.1, 0.0, 0.0, 0.0], [0.0, 0.1, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0]])
  weights = jnp.array([5.0, 50.0, 500.0])

  def aggregate(d):
    deltas, stats, w, _ = run_privatizer(dp_config(clip=1.0, z=0.0), {"w": d}, {}, weights)
    new, _, _ = agg.aggregate(agg.init(params), params, deltas, stats, w)
    return np.asarray(new["w"])

  honest = aggregate(base)
  attacked = aggregate(base.at[2].set(jnp.array([0.0, 0.0, 0.0, 1e6])))
  moved = np.linalg.norm(attacked - honest)
  # Uniform weights 1/3 each: the huge client moves the mean by at most clip / 3 (it replaced a
  # delta of norm 0.1, so by at most (1 + 0.1) / 3).
  assert moved <= (1.0 + 0.1) / 3 + 1e-6
  assert moved == pytest.approx(np.hypot(1.0, 0.1) / 3, rel=1e-5)


def test_sum_view_noise_on_the_sum_is_z_times_clip():
  c, d = 4, 20000
  deltas = {"w": jnp.zeros((c, d))}
  weights = jnp.array([1.0, 1.0, 1.0, 0.0])  # the last row is padding: no share, not counted
  noised, stats, _, info = run_privatizer(dp_config(clip=0.5, z=2.0), deltas, {}, weights)
  rows = np.asarray(noised["w"])
  assert np.std(rows[:3].sum(0)) == pytest.approx(2.0 * 0.5, rel=0.03)
  assert np.all(rows[3] == 0)
  assert float(info["dp_noise_std_row"]) == pytest.approx(1.0 / np.sqrt(3))


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "field,value,match",
    [
        ("dp.noise_multiplier", -0.5, r"config.dp.noise_multiplier=-0.5 is invalid"),
        ("dp.clip_norm", 0.0, r"config.dp.clip_norm=0.0 is invalid: expected a float > 0 when"),
        ("dp.clip_norm", -1.0, r"config.dp.clip_norm=-1.0 is invalid"),
        ("dp.delta", 0.0, r"config.dp.delta=0.0 is invalid: expected a float in \(0, 1\)"),
        ("dp.delta", 1.5, r"config.dp.delta=1.5 is invalid"),
        ("dp.stats_clip_norm", 0.0, r"config.dp.stats_clip_norm=0.0 is invalid"),
        (
            "faults.drop_prob",
            1.0,
            r"config.faults.drop_prob=1.0 is invalid: expected a float in \[0, 1\)",
        ),
        ("faults.drop_prob", -0.1, r"config.faults.drop_prob=-0.1 is invalid"),
        ("faults.drop_prob", "x", r"config.faults.drop_prob='x' is invalid: expected a number"),
        ("method", "scaffold", r"config.method='scaffold' has no DP mode"),
    ],
)
def test_bad_dp_and_fault_fields_are_rejected(field, value, match):
  c = default_config("runlocal")
  c.dp.noise_multiplier, c.dp.clip_norm = 1.0, 1.0
  section, name = field.split(".") if "." in field else (None, field)
  if section is None:
    c[name] = value
  elif field == "faults.drop_prob" and isinstance(value, str):
    c.faults = ml_collections.ConfigDict({"drop_prob": value})
  else:
    c[section][name] = value
  with pytest.raises(ValueError, match=match):
    validate_config(c)


def test_scaffold_warns_without_sgd():
  from fedalign.algorithms.scaffold import make_scaffold

  c = default_config("runlocal")
  c.method = "scaffold"
  with pytest.warns(UserWarning, match="option-II control variate"):
    make_scaffold(c, {"w": jnp.zeros(2)}, 4)
  c.train.optimizer = "sgd"
  import warnings

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    make_scaffold(c, {"w": jnp.zeros(2)}, 4)


# ------------------------------------------------------------------------------ faults
def test_corrupted_metrics_lines(tmp_path, caplog):
  p = tmp_path / "metrics.jsonl"
  p.write_text('{"round": 1}\n{"round": 2}\n{"round": 3, "test_acc')
  truncate_metrics(p, 2)
  assert p.read_text() == '{"round": 1}\n{"round": 2}\n'
  assert "not a complete metrics record" in caplog.text
  p.write_text('{"round": 1}\n{"rou\n{"round": 3}\n')
  with pytest.raises(ValueError, match="line 2 is not a metrics record"):
    truncate_metrics(p, 3)


def test_unreadable_pretrained_checkpoint_has_a_clear_message(tmp_path):
  from fedalign.models import api
  from fedalign.models.config import MoEConfig
  from fedalign.models.from_config import load_model
  from fedalign.models.hf import save_pretrained

  cfg = MoEConfig(
      vocab_size=64,
      hidden_size=16,
      intermediate_size=32,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      num_experts=4,
      top_k=2,
      moe_intermediate_size=16,
  )
  save_pretrained(api.MoEModel(cfg, api.init_params(cfg, jax.random.key(0), seq_len=8)), tmp_path)
  f = tmp_path / "model.safetensors"
  f.write_bytes(f.read_bytes()[:100])  # truncated download
  c = default_config("runlocal")
  c.model.hf_checkpoint = str(tmp_path)
  with pytest.raises(
      ValueError, match=r"could not be loaded: .*model.safetensors.*write the checkpoint again"
  ):
    load_model(c, types.SimpleNamespace(vocab_size=64))


def fault_config():
  c = tiny_config("fedavg", rounds=2)
  c.data.num_clients = 6
  c.train.clients_per_round = 4
  c.eval.specialization_examples = 0
  c.dp.clip_norm, c.dp.noise_multiplier = 0.05, 0.5
  c.faults.drop_prob = 0.4
  return c


def test_dropouts_dp_and_an_interrupted_save_resume_exactly(tmp_path, caplog):
  """One run with DP and dropouts; then its last checkpoint write is interrupted (what a kill
  leaves: orbax's uncommitted '<step>.orbax-checkpoint-tmp' folder) and its last metrics line
  half-written: the resumed run equals the uninterrupted one."""
  c = fault_config()
  a = tmp_path / "a"
  summary = run_experiment(c, a)
  rows = read_metrics(a)
  for r, row in enumerate(rows):
    ids = sample_clients(c.seed, r, 6, 4)
    want = ids[privacy.dropped_mask(c.seed, r, ids, 6, 0.4)].tolist()
    assert row["dropped_clients"] == want
    assert row["dp_epsilon"] == pytest.approx(privacy.epsilon_sum(0.5, 4, 6, r + 1, 1e-5))
  assert sum(len(r["dropped_clients"]) for r in rows) > 0  # the seed drops someone
  assert summary["dp_epsilon"] == rows[-1]["dp_epsilon"] and summary["dp"]["view"] == "sum"

  b = tmp_path / "b"
  shutil.copytree(a, b)
  (b / "summary.json").unlink()
  ck = b / "checkpoints"
  (ck / "2" / "commit_success.txt").unlink()
  (ck / "2").rename(ck / "2.orbax-checkpoint-tmp")
  text = (b / "metrics.jsonl").read_text()
  (b / "metrics.jsonl").write_text(text[: len(text) - 40])  # the last record cut mid-way
  resumed = run_experiment(c, b)
  assert "not a complete metrics record" in caplog.text
  assert read_metrics(b) == rows
  assert resumed["final_test_accuracy"] == summary["final_test_accuracy"]
  assert sorted(p.name for p in ck.iterdir()) == ["1", "2"]


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import orbax.checkpoint as ocp
from tests.test_privacy import fault_config
from fedalign.federated.server import run_experiment
orig, calls = ocp.JsonCheckpointHandler.async_save, []
def save(self, *a, **k):
  calls.append(1)
  if len(calls) == 2:  # the second checkpoint (round 2): killed while writing it
    os.kill(os.getpid(), signal.SIGKILL)
  return orig(self, *a, **k)
ocp.JsonCheckpointHandler.async_save = save
run_experiment(fault_config(), {workdir!r})
"""


@pytest.mark.slow
def test_kill_during_checkpoint_write_resumes_exactly(tmp_path):
  """A process SIGKILLed while writing its round-2 checkpoint; resuming equals the
  uninterrupted run (three runs: slow)."""
  c = fault_config()
  run_experiment(c, tmp_path / "ref")
  work = tmp_path / "killed"
  proc = subprocess.run(
      [sys.executable, "-c", KILL_SCRIPT.format(repo=str(REPO), workdir=str(work))],
      cwd=REPO,
      env=dict(os.environ, PYTHONPATH=str(REPO)),
      capture_output=True,
      text=True,
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert any(p.name.endswith("orbax-checkpoint-tmp") for p in (work / "checkpoints").iterdir())
  run_experiment(c, work)
  assert read_metrics(work) == read_metrics(tmp_path / "ref")

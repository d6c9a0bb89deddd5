"""The mechanism benchmark (issue 13): ground-truth roles, exact recovery, one tiny run."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import mechanism as mech
from fedalign import synthetic as syn
from fedalign.reports import docs_key
from fedalign.federated.round import init_server_state

HP = dataclasses.replace(mech.Hyper(**mech.TINY), rounds=1)


def test_pretrained_student_has_one_expert_per_cluster():
  _, info = mech.pretrained(0, HP)
  assert info["mi"] > 0.9 * math.log(HP.num_clusters), info
  assert info["mi_max"] == math.log(HP.num_clusters)


def recover(variant):
  """Setting c with lr 0: every client returns its permuted copy of the global model."""
  hp = dataclasses.replace(HP, learning_rate=0.0)
  params0, _ = mech.pretrained(0, HP)
  config = mech.variant_config(mech.VARIANTS[variant], hp, 0.0)
  eng = mech.get_engine(variant, config, hp, params0)
  state = init_server_state(params0, eng.algorithm, eng.mask, hp.num_clients)
  teacher = syn.Teacher.create(0, hp.num_clusters, hp.dim, hp.num_classes)
  sizes, data, _ = mech.client_data(0, hp, teacher)
  rng = np.random.default_rng(0)
  perms = np.stack(
      [
          np.stack([rng.permutation(hp.num_experts) for _ in range(hp.num_layers)])
          for _ in range(hp.num_clients)
      ]
  ).astype(np.int32)
  ids = np.arange(hp.num_clients)
  b = mech.round_batches(0, 0, hp, data, ids, 3, 3, perms)
  state, _ = eng.round_fn(state, b, jnp.asarray(sizes, jnp.float32), jnp.asarray(ids, jnp.int32), 0)
  return params0, state["params"]


def max_abs_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_permutation_alignment_recovers_the_global_model_exactly():
  params0, aligned = recover("fedalign_perm")
  assert max_abs_diff(params0, aligned) < 1e-5
  _, averaged = recover("fedavg")
  assert max_abs_diff(params0, averaged) > 1e-2


def test_tiny_runner_writes_run_file_and_table(tmp_path):
  docs = tmp_path / "docs.md"
  docs.write_text("# Mechanism\n\nHand-written reading.\n")
  argv = [
      f"--workdir={tmp_path}",
      "--tiny",
      "--seeds=0",
      "--settings=a10",
      "--variants=fedavg,fedalign_not_a_real_option",
      f"--docs_out={docs}",
      "--lr=0.001",  # no tuning (test_a_fresh_workdir_chooses_the_lr_first)
  ]
  mech.VARIANTS["fedalign_not_a_real_option"] = {"fedalign.not_a_real_option": 1}
  try:
    assert mech.main(argv) == 0
  finally:
    del mech.VARIANTS["fedalign_not_a_real_option"]
  runs = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
  assert runs == ["a10__fedavg__s0.json"]
  md = (tmp_path / "results.md").read_text()
  assert "| fedavg | 1 |" in md and "d vs FedAvg" in md
  run = json.loads((tmp_path / "runs" / "a10__fedavg__s0.json").read_text())
  assert run["environment"]["jax"] == jax.__version__
  assert f"Environments (run files): 1 x JAX {jax.__version__}, " in md
  # --docs_out: the tables go into this workdir's block; the reading and one block remain after
  # a rewrite.
  assert mech.main(argv[:1] + ["--tables_only", f"--docs_out={docs}"]) == 0
  text = docs.read_text()
  assert text.startswith("# Mechanism\n\nHand-written reading.\n")
  assert text.count("| fedavg | 1 |") == 1
  assert text.count(docs_key("experiments/mechanism.py", tmp_path)) == 2  # begin and end


def test_a_fresh_workdir_chooses_the_lr_first(tmp_path, monkeypatch):
  """The plain command tunes the client lr on the validation seeds (as the published tables
  did) unless the workdir has a tuning.json or --lr fixes it."""
  tuned, ran = [], []

  def fake_tune(workdir, hp):
    tuned.append(hp.learning_rate)
    return {"learning_rate": 0.003}

  monkeypatch.setattr(mech, "tune", fake_tune)
  monkeypatch.setattr(mech, "run_all", lambda w, s, st, v, hp: ran.append(hp.learning_rate))
  monkeypatch.setattr(mech, "render", lambda *args: "tables\n")
  assert mech.main([f"--workdir={tmp_path / 'a'}", "--tiny"]) == 0
  assert (tuned, ran) == ([mech.Hyper().learning_rate], [0.003])
  assert mech.main([f"--workdir={tmp_path / 'b'}", "--tiny", "--lr=0.01"]) == 0
  assert (tuned, ran[1:]) == ([mech.Hyper().learning_rate], [0.01])
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "tuning.json").write_text('{"learning_rate": 0.0003}')
  assert mech.main([f"--workdir={tmp_path / 'c'}", "--tiny"]) == 0
  assert ran[2:] == [0.0003] and len(tuned) == 1
  with pytest.raises(SystemExit, match="tuning.json holds a chosen one"):
    mech.main([f"--workdir={tmp_path / 'c'}", "--tiny", "--lr=0.01"])
  with pytest.raises(
      SystemExit, match=r"--lr=-0.1 is invalid: expected a client learning rate > 0"
  ):
    mech.main([f"--workdir={tmp_path / 'd'}", "--tiny", "--lr=-0.1"])


def test_compare_runs_matches_setting_variant_and_seed(tmp_path):
  """--compare: the accuracy differences of two workdirs' run files, matched by key."""
  for root, runs in (
      ("a", {("a10", "fedavg", 0): 0.5, ("a10", "fedavg", 1): 0.6, ("a200", "fedmoe", 0): 0.7}),
      ("b", {("a10", "fedavg", 0): 0.5, ("a10", "fedavg", 1): 0.65, ("a200", "fedmoe", 0): 0.4}),
  ):
    (tmp_path / root / "runs").mkdir(parents=True)
    for (setting, variant, seed), acc in runs.items():
      rec = {"setting": setting, "variant": variant, "seed": seed, "accuracy": acc}
      (tmp_path / root / "runs" / f"{setting}__{variant}__s{seed}.json").write_text(json.dumps(rec))
  (tmp_path / "b" / "runs" / "a50__fedavg__s0.json").write_text(
      json.dumps({"setting": "a50", "variant": "fedavg", "seed": 0, "accuracy": 0.1})
  )  # no partner: not matched
  cmp = mech.compare_runs(tmp_path / "a", tmp_path / "b")
  assert (cmp["matched"], cmp["identical"]) == (3, 1)
  assert math.isclose(cmp["median_abs_diff"], 0.05) and math.isclose(cmp["max_abs_diff"], 0.3)
  assert cmp["max_abs_diff_by_setting"] == pytest.approx({"a10": 0.05, "a200": 0.3})

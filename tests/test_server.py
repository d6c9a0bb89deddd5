"""Server loop: the README command on a reduced config, resume, corrupted checkpoints, bad input."""

import importlib.util
import json
import logging
import pathlib
import shutil

import pytest

from fedalign.federated.server import run_experiment

REPO = pathlib.Path(__file__).resolve().parents[1]


def default_config(arg=None):
  spec = importlib.util.spec_from_file_location("default_cfg", REPO / "configs" / "default.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def tiny_config(method="fedavg", rounds=3):
  c = default_config("runlocal")
  c.method = method
  c.data.num_clients = 4
  c.data.max_train_examples = 600
  c.data.max_test_examples = 200
  c.data.min_client_size = 10
  c.data.seq_len = 24
  c.data.vocab_size = 300
  c.model.hidden_size = 16
  c.model.intermediate_size = 32
  c.model.moe_intermediate_size = 16
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.train.clients_per_round = 3
  c.train.local_steps = 2
  c.train.batch_size = 8
  c.train.rounds = rounds
  return c


def read_metrics(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  for r in rows:  # timings differ between runs
    for k in ("elapsed_s", "round_time_s"):
      r.pop(k)
  return rows


def test_readme_command_learns_on_reduced_config(tmp_path):
  """The default pipeline (embedded AG News, label-word scoring) learns well above chance.

  Reduced for test time: 2 IID clients (the README command itself uses 10 Dirichlet-0.1
  clients), 3,000 train rows, 4 rounds of 25 local steps.
  """
  c = default_config("runlocal")
  c.data.partition = "iid"
  c.data.num_clients = 2
  c.data.max_train_examples = 3000
  c.data.seq_len = 32
  c.train.clients_per_round = 2
  c.train.local_steps = 25
  c.train.learning_rate = 3e-3
  c.train.rounds = 4
  summary = run_experiment(c, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [1, 2, 3, 4]
  for key in ("round", "method", "test_accuracy", "train_loss", "elapsed_s"):
    assert key in rows[-1]
  saved = json.loads((tmp_path / "summary.json").read_text())
  for key in ("method", "final_test_accuracy", "best_test_accuracy", "rounds", "config"):
    assert key in saved
  assert saved["final_test_accuracy"] == summary["final_test_accuracy"]
  assert summary["best_test_accuracy"] > 0.35, summary  # chance 0.25; 400 test rows
  assert (tmp_path / "plots" / "accuracy.png").exists()


@pytest.mark.parametrize(
    "method",
    [  # SCAFFOLD's round trip of client states is also covered by tests/test_checkpoint.py
        pytest.param("fedavg", marks=pytest.mark.slow),
        pytest.param("scaffold", marks=pytest.mark.slow),
        "fedalign",
    ],
)
def test_resume_reproduces_uninterrupted_run(tmp_path, method):
  full, part = tmp_path / "full", tmp_path / "part"
  run_experiment(tiny_config(method, rounds=3), full)
  first = run_experiment(tiny_config(method, rounds=2), part)  # "killed" after round 2's checkpoint
  second = run_experiment(tiny_config(method, rounds=3), part)  # same command again: resumes
  assert read_metrics(part) == read_metrics(full)
  # the timings go on from the checkpoint's: they add up over the run's two segments
  elapsed = [json.loads(l)["elapsed_s"] for l in (part / "metrics.jsonl").read_text().splitlines()]
  assert (first["resumed_from_round"], second["resumed_from_round"]) == (0, 2)
  assert elapsed[2] > elapsed[1] and elapsed[2] > first["wall_time_s"] - 1.0, elapsed
  assert second["wall_time_s"] >= elapsed[2] > second["session_wall_time_s"], (second, elapsed)


def test_corrupted_latest_checkpoint_falls_back_with_warning(tmp_path, caplog):
  full, part = tmp_path / "full", tmp_path / "part"
  run_experiment(tiny_config(rounds=3), full)
  run_experiment(tiny_config(rounds=3), part)
  latest = part / "checkpoints" / "3"
  for f in latest.rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "meta" not in str(f):
      f.write_bytes(b"\x00garbage")
  lines = (part / "metrics.jsonl").read_text().splitlines()
  (part / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")  # the crash lost round 3
  with caplog.at_level(logging.WARNING):
    run_experiment(tiny_config(rounds=3), part)
  assert any("unreadable" in r.message for r in caplog.records)
  assert read_metrics(part) == read_metrics(full)


def test_capacity_factor_reaches_the_model(tmp_path):
  """model.capacity_factor > 0 switches the decoder to sparse capacity dispatch."""
  from fedalign.models.from_config import model_config_from

  c = tiny_config()
  assert model_config_from(c, 100).capacity_factor is None
  c.model.capacity_factor = 1.25
  assert model_config_from(c, 100).capacity_factor == 1.25
  c.train.rounds = 1
  summary = run_experiment(c, tmp_path)
  assert summary["rounds"] == 1


def test_workdir_with_a_different_config_is_refused(tmp_path):
  run_experiment(tiny_config(rounds=1), tmp_path)
  other = tiny_config(rounds=1)
  other.data.alpha = 1.0
  with pytest.raises(ValueError, match=r"data\.alpha: 0\.1 -> 1\.0"):
    run_experiment(other, tmp_path)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("method", "fedfoo", "config.method='fedfoo' is invalid: expected one of"),
        (
            "train.clients_per_round",
            9,
            r"train.clients_per_round=9 is invalid: expected an integer "
            r"in \[1, data.num_clients=4\]",
        ),
        ("data.partition", "zipf", "config.data.partition='zipf'"),
        ("train.trainable", "lora", "model.lora_rank"),
        ("model.moe_impl", "ragged", "config.model.moe_impl='ragged' is invalid"),
    ],
)
def test_bad_config_fails_before_compute(tmp_path, field, value, match):
  c = tiny_config()
  section, _, key = field.rpartition(".")
  (c[section] if section else c)[key] = value
  with pytest.raises(ValueError, match=match):
    run_experiment(c, tmp_path)
  assert not (tmp_path / "metrics.jsonl").exists()


def test_partition_leaving_a_client_empty_is_an_error(tmp_path):
  c = tiny_config()
  c.data.partition = "pathological"
  c.data.num_clients = 4
  c.data.classes_per_client = 1
  c.data.max_train_examples = 3
  with pytest.raises(ValueError, match="num_clients|classes_per_client|no data"):
    run_experiment(c, tmp_path)


@pytest.mark.parametrize(
    "module,override,expected",
    [
        (
            "fedalign.main",
            "--config.train.learning_rat=0.1",
            "no field 'learning_rat' in train (its fields: batch_size, ",
        ),
        ("experiments.reproduce", "--config.rounds=3", "Did you mean --config.train.rounds?"),
    ],
)
def test_unknown_config_key_on_the_command_line_is_rejected(tmp_path, module, override, expected):
  """A mistyped --config.PATH override: one flags error naming the field, the fields at that
  level and the nearest real path (ml_collections alone raises a bare AttributeError)."""
  import subprocess
  import sys

  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          module,
          "--config=configs/default.py",
          f"--workdir={tmp_path}",
          override,
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 1
  assert "FATAL Flags parsing error" in proc.stderr and expected in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow  # the engine-level mesh test (test_engine.py) runs by default
def test_mesh_run_matches_single_device_run(tmp_path):
  """train.use_mesh shards the round's clients over the 8 fake CPU devices (padded with
  weight-0 clients to a multiple of lcm(chunk, devices)); the metrics match one device."""
  single, meshed = tmp_path / "single", tmp_path / "mesh"
  c = tiny_config(rounds=1)
  run_experiment(c, single)
  c.train.use_mesh = True
  run_experiment(c, meshed)
  a, b = read_metrics(single)[0], read_metrics(meshed)[0]
  assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
  assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=0.011)


def test_cli_help_lists_the_config_flag():
  """--config is the CLI's own flag (absl files it under fedalign.main for --helpshort), though
  config_files.define_config_flag defines it."""
  import subprocess
  import sys

  proc = subprocess.run(
      [sys.executable, "-m", "fedalign.main", "--helpshort"],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert "  --config: Path to a get_config() file." in proc.stdout + proc.stderr
  assert "  --workdir: " in proc.stdout + proc.stderr

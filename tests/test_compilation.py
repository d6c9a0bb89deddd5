"""The persistent compilation cache: a rerun of the same command does not recompile."""

import json
import pathlib
import subprocess
import sys

from fedalign.compilation import CompileTimer, default_cache_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--config=configs/default.py:runlocal",
    "--config.train.rounds=1",
    "--config.data.max_train_examples=300",
    "--config.data.max_test_examples=64",
    "--config.data.num_clients=3",
    "--config.train.clients_per_round=3",
    "--config.train.local_steps=2",
    "--config.train.batch_size=8",
    "--config.data.vocab_size=300",
    "--config.eval.specialization_examples=0",
]


def run_cli(workdir, cache_dir, *extra):
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "fedalign.main",
          *TINY,
          f"--workdir={workdir}",
          *extra,
          f"--compilation_cache_dir={cache_dir}",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((workdir / "summary.json").read_text())


def test_rerun_loads_compiled_programs_from_the_cache(tmp_path):  # four CLI runs, ~20 s
  cache = tmp_path / "cache"
  first = run_cli(tmp_path / "a", cache)
  second = run_cli(tmp_path / "b", cache)  # same command, new workdir
  assert first["compilations"] > 10 and first["compile_time_s"] > 1.0
  # a cold run compiles (a program requested twice is loaded the second time)
  assert first["compile_cache_hits"] < first["compilations"] / 2
  # the rerun loads every program instead of compiling it (JAX's count and its figure of the
  # seconds saved; the compile time itself is a timing, not tested)
  assert second["compilations"] == first["compilations"]
  assert second["compile_cache_hits"] == second["compilations"], (first, second)
  assert second["compile_time_saved_s"] > 0.0
  assert second["final_test_accuracy"] == first["final_test_accuracy"]
  # another seed: other data and client rngs, the same programs (the seed is an argument of
  # the round, not a constant in it)
  third = run_cli(tmp_path / "c", cache, "--config.seed=1")
  assert third["compile_cache_hits"] == third["compilations"] == first["compilations"]
  # resuming the first run for one more round: the restored state is placed as a fresh one
  # (uncommitted), so the round is the same program (it was compiled again: orbax commits)
  resumed = run_cli(tmp_path / "a", cache, "--config.train.rounds=2")
  assert resumed["compile_cache_hits"] == resumed["compilations"], (first, resumed)


def test_compile_timer_counts_a_compilation_and_the_default_dir(monkeypatch, tmp_path):
  import jax
  import jax.numpy as jnp

  with CompileTimer() as timer:
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(jnp.ones(7))
  assert timer.compilations >= 1 and timer.seconds > 0
  monkeypatch.setenv("FEDALIGN_COMPILATION_CACHE", str(tmp_path))
  assert default_cache_dir() == tmp_path

"""Shared pytest setup.

Eight fake CPU devices are requested before JAX starts so that sharding tests can build a
'clients' mesh; every other test runs on the first device as usual.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compilation dominates the tests (tiny shapes, many programs): XLA's optimization passes are
# skipped (about 25% less wall time for the engine tests on 2 cores; the golden aggregates
# still match at 1e-6). Inherited by the subprocess tests. FEDALIGN_TEST_OPTIMIZE=1 keeps them.
if os.environ.get("FEDALIGN_TEST_OPTIMIZE") != "1":
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """Path of ../shared/data (the real benchmark files); skips when absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"needs the benchmark files in {SHARED_DATA} (../shared/data), not found")
  return SHARED_DATA


@pytest.fixture
def run_benchmark(tmp_path):
  """Runs ``python benchmarks/SCRIPT ARGS --tag test`` from the repository root with its
  results JSON written under ``tmp_path`` (FEDALIGN_BENCHMARK_RESULTS); returns that JSON
  (``<script stem>_test.json``). A non-zero exit fails with the output's tail."""
  import json
  import subprocess
  import sys

  def run(script: str, *args: str) -> dict:
    env = dict(os.environ, FEDALIGN_BENCHMARK_RESULTS=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args, "--tag", "test"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads((tmp_path / f"{pathlib.Path(script).stem}_test.json").read_text())

  return run


def pytest_configure(config):
  """A persistent XLA compilation cache shared by the tests of one run.

  Several tests build the same federated round in fresh closures (e.g. an interrupted run
  and its resumption); the cache turns their identical compilations into lookups.
  """
  import tempfile

  import jax

  cache = os.environ.get("FEDALIGN_TEST_COMPILATION_CACHE") or tempfile.mkdtemp(
      prefix="fedalign-xla-cache-"
  )
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

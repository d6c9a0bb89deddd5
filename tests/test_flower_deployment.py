"""The Flower deployment engine on 127.0.0.1: a SuperLink, 3 SuperNodes and ``flwr run`` as
subprocesses, 2 rounds of a tiny config; the final global model equals fedalign's engine on
the same clients (tolerance ``ATOL``, float32 rounding of the vmapped vs per-client update).

flwr is an optional extra (``pip install -e ".[flower]"``) that downgrades protobuf / rich /
typer, so when the test's Python lacks it the test builds a separate venv under
``~/.cache/fedalign/flower-venv`` (``FEDALIGN_FLOWER_VENV`` overrides): a venv that sees this
Python's packages (a .pth file) with flwr and its pins installed over them. Without network
(pip fails) the test is skipped with the reason.
"""

import os
import pathlib
import shutil
import site
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fedalign.federated.run import build_run
from fedalign.flower import core

from test_flower import ATOL, OVERRIDES, max_diff

REPO = pathlib.Path(__file__).resolve().parents[1]
FLWR_SPEC = "flwr>=1.20,<2"
TIMEOUT_S = 900


def _flower_bin() -> pathlib.Path:
  """A bin/ folder whose python imports flwr and fedalign's dependencies."""
  try:
    import flwr  # noqa: F401

    return pathlib.Path(sys.executable).parent
  except ImportError:
    pass
  venv = pathlib.Path(
      os.environ.get("FEDALIGN_FLOWER_VENV", pathlib.Path.home() / ".cache/fedalign/flower-venv")
  )
  py = venv / "bin" / "python"
  ok = (
      py.exists() and subprocess.run([py, "-c", "import flwr"], capture_output=True).returncode == 0
  )
  if not ok:
    base = getattr(sys, "_base_executable", sys.executable)
    r = subprocess.run([base, "-m", "venv", "--clear", str(venv)], capture_output=True, text=True)
    if r.returncode:
      pytest.skip(f"cannot create the Flower venv {venv}: {r.stderr[-500:]}")
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    pathlib.Path(purelib, "_fedalign_base.pth").write_text("\n".join(site.getsitepackages()))
    r = subprocess.run(
        [py, "-m", "pip", "install", "-q", FLWR_SPEC], capture_output=True, text=True, timeout=600
    )
    if r.returncode:
      pytest.skip(f"flwr cannot be installed ({FLWR_SPEC}, no network?): {r.stderr[-500:]}")
  return venv / "bin"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise RuntimeError(f"{what} exited with {proc.returncode}")
    with socket.socket() as s:
      if s.connect_ex(("127.0.0.1", port)) == 0:
        return
    time.sleep(0.2)
  raise TimeoutError(f"{what} did not listen on {port} in {timeout} s")


# In the default run (issue 16: the deployment test belongs there). The costliest test of the
# suite: 300 s measured on 2 CPU cores shared with other jobs (each ClientApp process imports
# JAX, builds the run and compiles), plus ~25 s to build the flwr venv on its first use.
def test_flower_deployment_equals_engine(tmp_path):
  bindir = _flower_bin()
  env = dict(os.environ)
  env.update(
      PATH=f"{bindir}{os.pathsep}{env['PATH']}",
      PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
      FLWR_HOME=str(tmp_path / "flwr_home"),
      JAX_PLATFORMS="cpu",
  )
  # flwr 1.42: the SuperLink serves its Fleet, Control and Runtime APIs on one HTTP port.
  link_port = _free_port()
  (tmp_path / "flwr_home").mkdir()
  (tmp_path / "flwr_home" / "config.toml").write_text(
      f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
  )
  app = tmp_path / "app"
  app.mkdir()
  shutil.copy(REPO / "deploy/flower/pyproject.toml", app / "pyproject.toml")
  workdir = tmp_path / "run"
  procs, logs = [], []

  def start(name, args):
    f = open(tmp_path / f"{name}.log", "w")
    logs.append(tmp_path / f"{name}.log")
    p = subprocess.Popen(args, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    procs.append(p)
    return p

  try:
    link = start(
        "superlink",
        [
            bindir / "flower-superlink",
            "--insecure",
            "--host=127.0.0.1",
            f"--port={link_port}",
            f"--database={tmp_path / 'state.db'}",
        ],
    )
    _wait_port(link_port, link, "flower-superlink")
    for i in range(3):
      start(
          f"supernode{i}",
          [
              bindir / "flower-supernode",
              "--insecure",
              f"--superlink=127.0.0.1:{link_port}",
              f"--port={_free_port()}",
              f"--node-config=partition-id={i}",
          ],
      )
    run_config = f"workdir='{workdir}' overrides='method=fedalign {OVERRIDES}' evaluate=false"
    r = subprocess.run(
        [bindir / "flwr", "run", str(app), "local", "--run-config", run_config, "--stream"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    t0 = time.time()
    while not (workdir / "flower_params.npz").exists() and time.time() - t0 < 60:
      time.sleep(0.5)
    assert (workdir / "flower_params.npz").exists(), out[-3000:]
  finally:
    for p in procs:
      p.terminate()
    for p in procs:
      try:
        p.wait(10)
      except subprocess.TimeoutExpired:
        p.kill()
    for path in logs:
      print(f"---- {path.name}\n{path.read_text()[-2000:]}")

  got = dict(np.load(workdir / "flower_params.npz"))
  cfg = core.load_flower_config("configs/default.py:runlocal", "method=fedalign " + OVERRIDES)
  run = build_run(cfg, tmp_path / "engine")
  state = run.initial_state
  for rnd in range(cfg.train.rounds):
    state, _, _ = run.run_round(state, rnd)
  engine = core.named_arrays(state["params"], "params")
  assert sorted(got) == sorted(engine)
  initial = core.named_arrays(run.initial_state["params"], "params")
  assert max_diff(engine, got) < ATOL
  assert max_diff(initial, got) > 100 * ATOL  # the model trained: the check can fail

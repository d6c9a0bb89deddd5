"""Multi-process runs on localhost: 2 processes x 2 fake CPU devices form one 4-device mesh.

Every run here is ``python -m fedalign.main`` in subprocesses (``--distributed`` with
``FEDALIGN_COORDINATOR=127.0.0.1:<free port>``, ``FEDALIGN_NUM_PROCESSES=2``,
``FEDALIGN_PROCESS_ID=0|1``; CPU collectives over gloo), on a tiny config: 8 clients, 3 per
round (padded to 4 rows, one per device: process 1 holds a weight-0 padding row), 2 local
steps, a 1-layer MoE. The compiled programs go to the pytest run's compilation cache
(tests/conftest.py).

Tolerance of the comparisons: the runs compute the same function; they differ only in where
the round's sums over clients run (one device, or partial sums on 4 devices combined across
processes), i.e. in float32 rounding order. Over 4 rounds of 2 AdamW steps the final
parameters (magnitudes up to ~1) differ by ~5e-7 (measured); the test allows 2e-5 absolute.

The 2-D ('clients', 'experts') mesh on 2 processes (LAYOUTS_2D): 4 fake devices each with the
experts axis within a process, and (-m slow) 2 each with it across processes; 2 rounds with a
stop and resume, against the same 1-device run (the module's ``one_device`` fixture, computed
once): params within the same 2e-5 (measured 8.4e-7 and 4.7e-7).
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY = [
    "--config=configs/default.py:runlocal",
    "--config.method=fedavg",
    "--config.data.num_clients=8",
    "--config.train.clients_per_round=3",
    "--config.train.local_steps=2",
    "--config.train.batch_size=8",
    "--config.train.chunk_size=0",
    "--config.data.max_train_examples=400",
    "--config.data.max_test_examples=100",
    "--config.data.min_client_size=10",
    "--config.data.seq_len=32",
    "--config.data.vocab_size=300",
    "--config.model.num_layers=1",
    "--config.model.moe_impl=dense",
    "--config.eval.specialization_examples=0",
]
ATOL = 2e-5
TIMEOUT_S = 600


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("FEDALIGN_") and k != "XLA_FLAGS"}
  env.update(
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
  )
  env.update(extra)
  return env


def _cache_args() -> list[str]:
  cache = jax.config.jax_compilation_cache_dir
  return [f"--compilation_cache_dir={cache}"] if cache else ["--nocompilation_cache"]


def _cmd(workdir: pathlib.Path, *args: str) -> list[str]:
  return [
      sys.executable,
      "-m",
      "fedalign.main",
      *TINY,
      *_cache_args(),
      f"--workdir={workdir}",
      *args,
  ]


def launch(
    workdir: pathlib.Path,
    *args: str,
    processes: int = 2,
    devices: int = 2,
    env: dict[str, str] | None = None,
    process_args: dict[int, list[str]] | None = None,
) -> list[subprocess.Popen]:
  """Starts the ``processes`` processes of one run (one plain process when 1);
  ``process_args[i]``: extra flags of process i only."""
  procs = []
  port = free_port()
  for pid in range(processes):
    extra = dict(env or {})
    if processes > 1:
      extra = {
          "FEDALIGN_COORDINATOR": f"127.0.0.1:{port}",
          "FEDALIGN_NUM_PROCESSES": str(processes),
          "FEDALIGN_PROCESS_ID": str(pid),
          "FEDALIGN_INIT_TIMEOUT": "120",
          **extra,
      }
    flags = list(args) + (["--distributed"] if processes > 1 else [])
    flags += (process_args or {}).get(pid, [])
    procs.append(
        subprocess.Popen(
            _cmd(workdir, *flags),
            cwd=REPO,
            env=_env(devices, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )
  return procs


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[tuple[int, str]]:
  """``[(returncode, output), ...]``; kills what is still running after ``timeout``."""
  deadline = time.monotonic() + timeout
  out = []
  for p in procs:
    try:
      text, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      text, _ = p.communicate()
      text += "\n[killed by the test: timeout]"
    out.append((p.returncode, text))
  return out


def _ok(results: list[tuple[int, str]]) -> None:
  for i, (rc, text) in enumerate(results):
    assert rc == 0, f"process {i} exited with {rc}:\n{text[-4000:]}"


def load_params(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
  """The ``params`` of checkpoint ``step`` as numpy arrays, by path."""
  import orbax.checkpoint as ocp

  path = workdir / "checkpoints" / str(step) / "state"
  ck = ocp.StandardCheckpointer()
  meta = ck.metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  is_arr = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree, is_leaf=is_arr)
  state = ck.restore(path, target)
  flat, _ = jax.tree_util.tree_flatten_with_path(state["params"])
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


class Background:
  """A run started in the background; :meth:`wait` finishes it (once) and returns its
  workdir."""

  def __init__(self, workdir: pathlib.Path, *args: str, **kw):
    self.workdir, self.args, self.kw, self.procs, self.done = workdir, args, kw, None, False

  def start(self) -> "Background":
    if self.procs is None:
      self.procs = launch(self.workdir, *self.args, **self.kw)
    return self

  def wait(self) -> pathlib.Path:
    if not self.done:
      _ok(finish(self.start().procs))
      self.done = True
    return self.workdir

  def kill(self) -> None:
    for p in self.procs or []:
      if p.poll() is None:
        p.kill()
        p.communicate()


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The 1-device reference (no mesh, 4 rounds of TINY), shared by the multi-process tests:
  started by the first test that needs it, in parallel with that test's own runs."""
  run = Background(
      tmp_path_factory.mktemp("one"),
      "--config.train.rounds=4",
      "--config.train.use_mesh=False",
      processes=1,
      devices=1,
  )
  yield run
  run.kill()


def test_two_processes_resume_equal_single_process(tmp_path, one_device):
  """2 processes x 2 devices: 2 rounds, stop, resume to 4 rounds from the round-2
  checkpoint; params and metrics equal the single-process 4-device run and the 1-device run
  (no mesh)."""
  mp, four = tmp_path / "mp", tmp_path / "four"
  t0 = time.monotonic()
  first = launch(mp, "--config.train.rounds=2", "--config.train.use_mesh=True")
  singles = launch(
      four, "--config.train.rounds=4", "--config.train.use_mesh=True", processes=1, devices=4
  )
  one_device.start()
  _ok(finish(first))
  assert sorted(int(p.name) for p in (mp / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
  assert [m["round"] for m in metrics(mp)] == [1, 2]
  resumed = finish(launch(mp, "--config.train.rounds=4", "--config.train.use_mesh=True"))
  _ok(resumed)
  assert "resumed from round 2" in resumed[0][1] and "resumed from round 2" in resumed[1][1]
  # Process 0 reports; process 1 prints no summary line.
  assert "final_test_accuracy=" in resumed[0][1]
  assert "final_test_accuracy=" not in resumed[1][1]
  _ok(finish(singles))
  one = one_device.wait()
  cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
  print(f"4 runs: {time.monotonic() - t0:.0f} s wall, {cpu.ru_utime + cpu.ru_stime:.0f} s CPU")

  # metrics.jsonl: one line per round, written by process 0 only, equal across the runs.
  m_mp, m_four, m_one = metrics(mp), metrics(four), metrics(one)
  assert [m["round"] for m in m_mp] == [1, 2, 3, 4]
  for a, b, c in zip(m_mp, m_four, m_one):
    assert a["test_accuracy"] == b["test_accuracy"] == c["test_accuracy"]
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(a["train_loss"], c["train_loss"], rtol=1e-5)
    assert a["client_accuracy"] == b["client_accuracy"]
  assert json.loads((mp / "summary.json").read_text())["rounds"] == 4
  assert (mp / "routing_distributions.npz").exists() and (mp / "plots" / "accuracy.png").exists()

  p_mp, p_four, p_one = load_params(mp, 4), load_params(four, 4), load_params(one, 4)
  assert p_mp.keys() == p_four.keys() == p_one.keys()
  for k in p_mp:
    np.testing.assert_allclose(p_mp[k], p_four[k], atol=ATOL, rtol=0, err_msg=k)
    np.testing.assert_allclose(p_mp[k], p_one[k], atol=ATOL, rtol=0, err_msg=k)
  # Rounds 3 and 4 (after the resume) moved the parameters by far more than the tolerance.
  p_two = load_params(mp, 2)
  moved = max(float(np.max(np.abs(p_mp[k] - p_two[k]))) for k in p_mp)
  assert moved > 100 * ATOL


# The 2-D layouts on 2 processes: (devices per process, train.mesh_shape).
LAYOUTS_2D = {
    # Each process holds 2 client rows and both expert shards of each: process 0 evaluates
    # on its own 4 devices (mesh.local_view).
    "experts_within": (4, "clients:4,experts:2"),
    # Each expert shard on one of the 4 devices of both processes: every process takes part
    # in the evaluation on the globally sharded params (hooks.Evaluate, write=False on 1).
    "experts_across": (2, "clients:1,experts:4"),
}


@pytest.mark.parametrize(
    "layout",
    [
        "experts_within",
        # Another ~75 s (two more 2-process runs); the same comparison.
        pytest.param("experts_across", marks=pytest.mark.slow),
    ],
)
def test_two_processes_2d_mesh_resume_equal_one_device(tmp_path, one_device, layout):
  """2 processes, one ('clients', 'experts') mesh over their devices (LAYOUTS_2D): 1 round,
  stop, resume to 2 from the round-1 checkpoint (both processes write and restore their
  expert shards); params and metrics equal the 1-device run's rounds 1-2."""
  t0, cpu0 = time.monotonic(), _child_cpu_s()
  devices, shape = LAYOUTS_2D[layout]
  mp = tmp_path / layout
  flags = ["--config.train.use_mesh=True", f"--config.train.mesh_shape={shape}"]
  first = launch(mp, "--config.train.rounds=1", *flags, devices=devices)
  one_device.start()
  _ok(finish(first))
  ckpts = mp / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [1]
  # Both processes wrote their part of the sharded checkpoint.
  assert {p.name for p in (ckpts / "1" / "state").glob("ocdbt.process_*")} == {
      "ocdbt.process_0",
      "ocdbt.process_1",
  }
  out = finish(launch(mp, "--config.train.rounds=2", *flags, devices=devices))
  _ok(out)
  assert "resumed from round 1" in out[0][1] and "resumed from round 1" in out[1][1]
  assert "final_test_accuracy=" in out[0][1]
  assert "final_test_accuracy=" not in out[1][1]
  spmd = "every process takes part in the evaluation"
  assert (spmd in out[1][1]) == (layout == "experts_across")
  one = one_device.wait()
  print(
      f"{layout}: {time.monotonic() - t0:.0f} s wall, {_child_cpu_s() - cpu0:.0f} s CPU of the "
      "subprocesses (with the 1-device reference when it ran here)"
  )

  m_mp, m_one = metrics(mp), metrics(one)[:2]
  assert [m["round"] for m in m_mp] == [1, 2]
  for a, c in zip(m_mp, m_one):
    assert a["test_accuracy"] == c["test_accuracy"]
    assert a["client_accuracy"] == c["client_accuracy"]
    np.testing.assert_allclose(a["train_loss"], c["train_loss"], rtol=1e-5)
  p_mp, p_one = load_params(mp, 2), load_params(one, 2)
  assert p_mp.keys() == p_one.keys()
  assert any("'experts'" in k for k in p_mp)
  for k in p_mp:
    np.testing.assert_allclose(p_mp[k], p_one[k], atol=ATOL, rtol=0, err_msg=k)
  worst = max(float(np.max(np.abs(p_mp[k] - p_one[k]))) for k in p_mp)
  print(f"2-D mesh {layout}, 2 processes vs 1 device: params within {worst:.1e}")
  # Round 2 (after the resume) moved the parameters by far more than the tolerance.
  p_1 = load_params(mp, 1)
  assert max(float(np.max(np.abs(p_mp[k] - p_1[k]))) for k in p_mp) > 100 * ATOL


def _child_cpu_s() -> float:
  cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
  return cpu.ru_utime + cpu.ru_stime


def test_config_mismatch_across_processes(tmp_path):
  """Process 1 with another seed: both processes stop with the differing field named, before
  anything is written."""
  procs = launch(
      tmp_path / "w", "--config.train.use_mesh=True", process_args={1: ["--config.seed=1"]}
  )
  for rc, text in finish(procs, timeout=300):
    assert rc != 0
    assert "differs from process 0's" in text and "seed: 0 -> 1" in text, text[-3000:]
  assert not (tmp_path / "w" / "config.json").exists()


def test_multiprocess_needs_the_mesh(tmp_path):
  """Two processes without train.use_mesh: a ValueError naming the field."""
  for rc, text in finish(launch(tmp_path / "w", "--config.train.use_mesh=False"), timeout=300):
    assert rc != 0 and "config.train.use_mesh=False is invalid" in text, text[-3000:]


def test_unreachable_coordinator_times_out(tmp_path):
  """Process 1 alone (no process 0 hosts the coordinator): a TimeoutError naming the address
  after FEDALIGN_INIT_TIMEOUT, not a hang."""
  t0 = time.monotonic()
  port = free_port()
  env = {
      "FEDALIGN_COORDINATOR": f"127.0.0.1:{port}",
      "FEDALIGN_NUM_PROCESSES": "2",
      "FEDALIGN_PROCESS_ID": "1",
      "FEDALIGN_INIT_TIMEOUT": "3",
  }
  p = subprocess.Popen(
      _cmd(tmp_path / "w", "--distributed"),
      cwd=REPO,
      env=_env(2, **env),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  ((rc, text),) = finish([p], timeout=120)
  assert rc != 0 and "killed by the test" not in text
  assert f"the coordinator 127.0.0.1:{port} (FEDALIGN_COORDINATOR) was unreachable for 3 s" in text
  assert time.monotonic() - t0 < 100


def test_bad_cluster_env():
  from fedalign.federated.distributed import cluster_from_env, timeout_from_env

  base = {"FEDALIGN_COORDINATOR": "h:12", "FEDALIGN_NUM_PROCESSES": "2"}
  with pytest.raises(ValueError, match="FEDALIGN_PROCESS_ID is not"):
    cluster_from_env(base)
  with pytest.raises(ValueError, match="FEDALIGN_PROCESS_ID='x' is invalid"):
    cluster_from_env({**base, "FEDALIGN_PROCESS_ID": "x"})
  with pytest.raises(ValueError, match="FEDALIGN_NUM_PROCESSES='0' is invalid"):
    cluster_from_env({**base, "FEDALIGN_NUM_PROCESSES": "0", "FEDALIGN_PROCESS_ID": "0"})
  with pytest.raises(ValueError, match="expected host:port"):
    cluster_from_env({**base, "FEDALIGN_COORDINATOR": "h", "FEDALIGN_PROCESS_ID": "0"})
  with pytest.raises(ValueError, match="without FEDALIGN_COORDINATOR"):
    cluster_from_env({"FEDALIGN_PROCESS_ID": "0"})
  assert cluster_from_env({}) is None
  with pytest.raises(ValueError, match="FEDALIGN_INIT_TIMEOUT='0' is invalid"):
    timeout_from_env({"FEDALIGN_INIT_TIMEOUT": "0"})


def test_process_rows_and_global_arrays():
  """One process, 4 of the 8 fake devices: the rows each device holds, the global array
  assembled from given rows, and the error when a held row is missing."""
  from fedalign.federated.mesh import client_sharding, global_arrays, process_rows, replicate
  from fedalign.federated.mesh import local_view

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("clients",))
  sharding = client_sharding(mesh)
  assert process_rows(sharding, 8).tolist() == list(range(8))
  x = np.arange(16, dtype=np.float32).reshape(8, 2)
  perm = np.array([3, 1, 0, 2, 7, 6, 5, 4])  # rows given in any order
  g = global_arrays(sharding, 8, perm, {"x": x[perm]})["x"]
  np.testing.assert_array_equal(np.asarray(g), x)
  assert [s.data.shape for s in g.addressable_shards] == [(2, 2)] * 4
  with pytest.raises(ValueError, match=r"rows \[7\] are held"):
    global_arrays(sharding, 8, np.arange(7), {"x": x[:7]})
  r = replicate({"w": np.ones(3), "n": None}, mesh)
  assert r["n"] is None and r["w"].sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(local_view(r)["w"]), np.ones(3))


def test_local_view_single_process_2d_mesh_unchanged():
  """One process: every experts group is local, and local_view returns expert-sharded
  arrays as they are (evaluation runs sharded over all devices, as before)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from fedalign.federated.mesh import experts_within_process, local_view

  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("clients", "experts"))
  assert experts_within_process(mesh)
  w = jax.device_put(np.arange(8.0).reshape(4, 2), NamedSharding(mesh, P("experts")))
  view = local_view({"w": w})
  assert view["w"] is w and view["w"].sharding.spec == P("experts")


def test_experts_within_process_layouts():
  """The two layouts of LAYOUTS_2D on 2 processes, with stand-in devices (process_index only):
  the experts groups lie within a process for (4, 2) on 2 x 4 devices, not for (1, 4) on
  2 x 2 (nor for an experts axis outermost over a process boundary)."""
  from types import SimpleNamespace

  from fedalign.federated.mesh import experts_within_process

  def mesh(per_process, shape, axes=("clients", "experts")):
    devs = [SimpleNamespace(process_index=i // per_process) for i in range(2 * per_process)]
    grid = np.empty(len(devs), object)
    grid[:] = devs
    return SimpleNamespace(devices=grid.reshape(shape), axis_names=axes)

  assert experts_within_process(mesh(4, (4, 2)))
  assert not experts_within_process(mesh(2, (1, 4)))
  assert not experts_within_process(mesh(2, (2, 2), ("experts", "clients")))
  assert experts_within_process(mesh(2, (4,), ("clients",)))

"""Multi-host start-up and the few cross-process steps of a run.

One process per host (TPU pod slice) or per GPU node runs the same command with the same
config and workdir (on a filesystem every host sees: a shared disk or a ``gs://`` bucket).
:func:`initialize` comes first (``python -m fedalign.main --distributed``); afterwards
``jax.devices()`` lists the devices of every process and the run's ``'clients'`` mesh
(``--config.train.use_mesh=True``, :mod:`fedalign.federated.mesh`) shards the sampled clients
over all of them. Each process builds only the batches of the clients its devices hold;
process 0 alone writes ``metrics.jsonl``, ``summary.json``, plots, routing dumps,
``config.json`` and the tokenizer; every process takes part in the orbax checkpoint writes and
restores. docs/scaling.md has the launch commands and what was tested.

Environment (all three, or none for JAX's auto-detection: TPU pods, SLURM, Open MPI):

* ``FEDALIGN_COORDINATOR``: ``host:port`` of process 0 (its coordination service listens there);
* ``FEDALIGN_NUM_PROCESSES``: how many processes;
* ``FEDALIGN_PROCESS_ID``: this process, 0 .. N-1;
* ``FEDALIGN_INIT_TIMEOUT`` (optional): seconds to wait for the coordinator and the other
  processes (default 300).

Launch examples::

    # TPU pod slice (every worker; coordinates come from the TPU metadata):
    gcloud compute tpus tpu-vm ssh NAME --worker=all --command \\
      "python -m fedalign.main --config=configs/paper/agnews_switch_base16.py \\
       --workdir=gs://bucket/run --config.train.use_mesh=True --distributed"

    # Two GPU nodes, 8 GPUs each (run on each node with its own process id):
    FEDALIGN_COORDINATOR=node0:1234 FEDALIGN_NUM_PROCESSES=2 FEDALIGN_PROCESS_ID=$RANK \\
      python -m fedalign.main --config=... --workdir=/shared/run \\
      --config.train.use_mesh=True --distributed
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

log = logging.getLogger(__name__)

ENV_COORDINATOR = "FEDALIGN_COORDINATOR"
ENV_NUM_PROCESSES = "FEDALIGN_NUM_PROCESSES"
ENV_PROCESS_ID = "FEDALIGN_PROCESS_ID"
ENV_TIMEOUT = "FEDALIGN_INIT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300


def cluster_from_env(env: Mapping[str, str]) -> dict[str, Any] | None:
  """The explicit cluster of the ``FEDALIGN_*`` variables, or None (auto-detection).

  >>> cluster_from_env({'FEDALIGN_COORDINATOR': 'h:1', 'FEDALIGN_NUM_PROCESSES': '2',
  ...                   'FEDALIGN_PROCESS_ID': '1'})
  {'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 1}
  >>> cluster_from_env({'FEDALIGN_COORDINATOR': 'h:1', 'FEDALIGN_NUM_PROCESSES': '2',
  ...                   'FEDALIGN_PROCESS_ID': '2'})
  Traceback (most recent call last):
  ...
  ValueError: FEDALIGN_PROCESS_ID='2' is invalid: expected an integer in 0..1 (FEDALIGN_NUM_PROCESSES=2).
  """
  coordinator = env.get(ENV_COORDINATOR, "")
  if not coordinator:
    extra = [n for n in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if env.get(n)]
    if extra:
      raise ValueError(
          f"{' and '.join(extra)} set without {ENV_COORDINATOR}: set all three "
          f"({ENV_COORDINATOR}=host:port) or none (JAX's cluster auto-detection)."
      )
    return None
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"{ENV_COORDINATOR}={coordinator!r} is invalid: expected host:port.")
  for name in (ENV_NUM_PROCESSES, ENV_PROCESS_ID):
    if name not in env:
      raise ValueError(
          f"{ENV_COORDINATOR} is set but {name} is not: set both "
          f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}."
      )
  try:
    n = int(env[ENV_NUM_PROCESSES])
  except ValueError:
    n = 0
  if n < 1:
    raise ValueError(
        f"{ENV_NUM_PROCESSES}={env[ENV_NUM_PROCESSES]!r} is invalid: expected an integer >= 1."
    )
  try:
    pid = int(env[ENV_PROCESS_ID])
  except ValueError:
    pid = -1
  if not 0 <= pid < n:
    raise ValueError(
        f"{ENV_PROCESS_ID}={env[ENV_PROCESS_ID]!r} is invalid: expected an integer in "
        f"0..{n - 1} ({ENV_NUM_PROCESSES}={n})."
    )
  return {"coordinator_address": coordinator, "num_processes": n, "process_id": pid}


def timeout_from_env(env: Mapping[str, str]) -> int:
  """``FEDALIGN_INIT_TIMEOUT`` in whole seconds (default 300).

  >>> timeout_from_env({}), timeout_from_env({'FEDALIGN_INIT_TIMEOUT': '20'})
  (300, 20)
  """
  raw = env.get(ENV_TIMEOUT, "")
  if not raw:
    return DEFAULT_TIMEOUT_S
  try:
    value = int(raw)
  except ValueError:
    value = 0
  if value < 1:
    raise ValueError(f"{ENV_TIMEOUT}={raw!r} is invalid: expected whole seconds >= 1.")
  return value


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until ``address`` (host:port) accepts TCP connections.

  Raises:
    TimeoutError: not reachable within ``timeout_s`` seconds (clear message instead of the
      coordination client's abort).
  """
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  last: Exception | None = None
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      raise TimeoutError(
          f"the coordinator {address} ({ENV_COORDINATOR}) was unreachable for {timeout_s:.0f} s "
          f"(last error: {last}). Start process 0 (it hosts the coordinator), check the host "
          f"and port and the firewall, or raise {ENV_TIMEOUT}."
      )
    time.sleep(0.5)


def initialize(timeout_s: int | None = None) -> None:
  """``jax.distributed.initialize`` from the ``FEDALIGN_*`` variables, or auto-detection.

  With ``FEDALIGN_COORDINATOR`` (host:port), ``FEDALIGN_NUM_PROCESSES`` and
  ``FEDALIGN_PROCESS_ID`` set, those are passed explicitly (GPU clusters without a scheduler
  JAX knows, localhost tests); otherwise JAX auto-detects the cluster (TPU pods, SLURM, Open
  MPI). CPU collectives go through gloo (multi-process CPU runs; no effect on GPU/TPU).

  Processes other than 0 first wait for the coordinator's port (a ``TimeoutError`` naming
  it after ``timeout_s``, default ``FEDALIGN_INIT_TIMEOUT`` or 300 s). Process 0 waits up to
  ``timeout_s`` for the others to connect; if they do not, JAX aborts the process with
  ``DEADLINE_EXCEEDED`` (not an exception), after the message logged here.
  """
  cluster = cluster_from_env(os.environ)
  timeout = timeout_s if timeout_s is not None else timeout_from_env(os.environ)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if cluster is None:
    jax.distributed.initialize(initialization_timeout=timeout)
  else:
    pid, n, addr = cluster["process_id"], cluster["num_processes"], cluster["coordinator_address"]
    if pid != 0:
      wait_for_coordinator(addr, timeout)
    else:
      print(
          f"fedalign: process 0 of {n} hosts the coordinator at {addr}; waiting up to "
          f"{timeout} s ({ENV_TIMEOUT}) for the other processes to connect (JAX aborts with "
          "DEADLINE_EXCEEDED if they do not).",
          file=sys.stderr,
          flush=True,
      )
    jax.distributed.initialize(**cluster, initialization_timeout=timeout)
  if jax.default_backend() == "cpu" and jax.process_count() > 1:
    # Found here (jax 0.10.2): a multi-process CPU run whose round program came from the
    # persistent compilation cache stalled in gloo's context set-up (GetKeyValue timed out)
    # while the same resume compiled afresh ran; so CPU processes compile (TPU/GPU keep it).
    if jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir:
      log.warning("multi-process CPU run: the persistent compilation cache is turned off")
    jax.config.update("jax_enable_compilation_cache", False)
  log.info(
      "jax.distributed: process %d of %d, %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.device_count(),
  )


def is_main() -> bool:
  """True on process 0 (the one that writes metrics, summaries, plots and config files)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's ``data`` (lengths may differ), in process order."""
  from jax.experimental import multihost_utils

  lens = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32)))
  n = int(lens.max())
  buf = np.zeros(n, np.uint8)
  buf[: len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lens), n)
  return [bytes(r[: int(k)]) for r, k in zip(rows, lens.reshape(-1))]


def config_hash(config: ml_collections.ConfigDict) -> str:
  """SHA-256 of the config's JSON (keys sorted).

  >>> from fedalign.config_files import load_config
  >>> len(config_hash(load_config('configs/default.py:runlocal')))
  64
  """
  return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()


def check_same_config(config: ml_collections.ConfigDict) -> None:
  """Every process must run process 0's config: compares config hashes across processes.

  Raises:
    ValueError: on every process, naming the processes whose config differs and the first
      differing fields.
  """
  if jax.process_count() == 1:
    return
  import json

  from fedalign.config_files import flatten_config

  mine = config.to_json(sort_keys=True)
  texts = [b.decode() for b in _allgather_bytes(mine.encode())]
  hashes = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
  bad = [i for i, h in enumerate(hashes) if h != hashes[0]]
  if not bad:
    return
  ref = flatten_config(json.loads(texts[0]))
  details = []
  for i in bad:
    other = flatten_config(json.loads(texts[i]))
    diff = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k))
    details.append(
        f"process {i}: " + ", ".join(f"{k}: {ref.get(k)!r} -> {other.get(k)!r}" for k in diff[:10])
    )
  raise ValueError(
      f"the config of process(es) {bad} differs from process 0's (config hash "
      f"{hashes[0][:12]}): {'; '.join(details)}. Every process must run the same command."
  )

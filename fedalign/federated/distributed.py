"""Multi-host start-up: one process per host (TPU pod slice) or per GPU node.

Call :func:`initialize` first thing in every process; afterwards ``jax.devices()`` lists the
devices of every host, and the run's ``'clients'`` mesh (``--config.train.use_mesh=True``)
shards the sampled clients over all of them. Each process runs the same command with the same
config and workdir (on a shared filesystem); orbax coordinates checkpoint writes across hosts.

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

import logging
import os

import jax

log = logging.getLogger(__name__)


def initialize() -> None:
  """``jax.distributed.initialize`` from FEDALIGN_* variables, or auto-detection.

  With ``FEDALIGN_COORDINATOR`` (host:port), ``FEDALIGN_NUM_PROCESSES`` and
  ``FEDALIGN_PROCESS_ID`` set, those are passed explicitly (GPU clusters without a scheduler
  JAX knows); otherwise JAX auto-detects the cluster (TPU pods, SLURM, Open MPI).
  """
  coordinator = os.environ.get("FEDALIGN_COORDINATOR")
  if coordinator:
    for name in ("FEDALIGN_NUM_PROCESSES", "FEDALIGN_PROCESS_ID"):
      if name not in os.environ:
        raise ValueError(
            f"FEDALIGN_COORDINATOR is set but {name} is not: set both "
            "FEDALIGN_NUM_PROCESSES and FEDALIGN_PROCESS_ID."
        )
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=int(os.environ["FEDALIGN_NUM_PROCESSES"]),
        process_id=int(os.environ["FEDALIGN_PROCESS_ID"]),
    )
  else:
    jax.distributed.initialize()
  log.info(
      "jax.distributed: process %d of %d, %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.device_count(),
  )

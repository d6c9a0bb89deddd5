"""FedOpt (Reddi et al., "Adaptive Federated Optimization", 2021): FedAvgM, FedAdam, FedYogi,
FedAdagrad.

Each is FedAvg whose mean delta is fed, negated, to a server optimizer: ``fedavgm`` = SGD with
momentum (``server.momentum``), ``fedadam`` / ``fedyogi`` / ``fedadagrad`` = optax's adam /
yogi / adagrad at ``server.learning_rate`` (about 1e-2), with ``server.b1``, ``server.b2`` and
``server.eps`` (Reddi's tau). Conventions: see
:func:`fedalign.algorithms.base.server_optimizer`. The method name already picks the optimizer,
so ``server.optimizer`` must stay 'none' (or name the same optimizer). Any other method can
use a server optimizer through ``server.optimizer``.

Example:
  >>> import ml_collections
  >>> c = ml_collections.ConfigDict({'method': 'fedadam', 'server': dict(optimizer='none',
  ...     learning_rate=0.01, momentum=0.9, b1=0.9, b2=0.99, eps=1e-3)})
  >>> make_fedopt(c, None, 10).name
  'fedadam'
"""

from __future__ import annotations

from typing import Any

import ml_collections

from fedalign.algorithms.base import Algorithm, server_optimizer_from_config
from fedalign.algorithms.fedavg import fedavg_aggregator

PyTree = Any
FEDOPT_OPTIMIZERS = {
    "fedavgm": "momentum",
    "fedadam": "adam",
    "fedyogi": "yogi",
    "fedadagrad": "adagrad",
}


def make_fedopt(
    config: ml_collections.ConfigDict, trainable: PyTree, num_clients: int
) -> Algorithm:
  """FedAvg + the server optimizer that ``config.method`` names (see :data:`FEDOPT_OPTIMIZERS`)."""
  del num_clients
  opt = server_optimizer_from_config(config, implied=FEDOPT_OPTIMIZERS[config.method])
  return Algorithm(config.method, fedavg_aggregator(trainable, opt))

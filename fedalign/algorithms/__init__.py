"""Federated methods, one module each, and the registry the engine builds them from.

=============  ==========================================  ===================================
method         module                                      what it adds to FedAvg
=============  ==========================================  ===================================
fedavg         :mod:`fedalign.algorithms.fedavg`           (example-weighted mean of deltas)
fedavgm ...    :mod:`fedalign.algorithms.fedopt`           a named server optimizer (FedOpt)
fedprox        :mod:`fedalign.algorithms.fedprox`          a proximal term in the client loss
scaffold       :mod:`fedalign.algorithms.scaffold`         control variates (per-client state)
fedmoe         :mod:`fedalign.algorithms.fedmoe`           per-expert averaging by counts
fedalign       :mod:`fedalign.algorithms.fedalign`         FedAlign-MoE (router + expert
                                                           alignment, gating regularizer)
=============  ==========================================  ===================================

Each module ends in ``make_<method>(config, trainable, num_clients) -> Algorithm``; every
aggregator is written with :mod:`fedalign.aggregation.moe_blocks` and has the contract of
:class:`fedalign.aggregation.base.Aggregator`.

Example:
  >>> import ml_collections
  >>> c = ml_collections.ConfigDict({'method': 'fedavg', 'server': dict(optimizer='none',
  ...     learning_rate=1.0, momentum=0.9, b1=0.9, b2=0.99, eps=1e-3)})
  >>> make_algorithm(c, None, 10).name
  'fedavg'
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from fedalign.algorithms import fedalign, fedavg, fedmoe, fedopt, fedprox, scaffold
from fedalign.algorithms.base import Algorithm

PyTree = Any
Constructor = Callable[[ml_collections.ConfigDict, PyTree, int], Algorithm]

ALGORITHMS: dict[str, Constructor] = {
    "fedavg": fedavg.make_fedavg,
    "fedprox": fedprox.make_fedprox,
    **{name: fedopt.make_fedopt for name in fedopt.FEDOPT_OPTIMIZERS},
    "scaffold": scaffold.make_scaffold,
    "fedmoe": fedmoe.make_fedmoe,
    "fedalign": fedalign.make_fedalign,
}
METHODS = tuple(ALGORITHMS)


def make_algorithm(
    config: ml_collections.ConfigDict, trainable: PyTree, num_clients: int
) -> Algorithm:
  """Builds the method named ``config.method`` (one of :data:`METHODS`).

  Args:
    config: the run's config (each method's module says which fields it reads).
    trainable: the trainable partition of the params (``None`` at frozen leaves).
    num_clients: total number of clients (SCAFFOLD's control update).
  """
  if config.method not in ALGORITHMS:
    raise ValueError(f"config.method={config.method!r} is invalid: expected one of {METHODS}.")
  return ALGORITHMS[config.method](config, trainable, num_clients)


__all__ = ["ALGORITHMS", "METHODS", "Algorithm", "make_algorithm"]

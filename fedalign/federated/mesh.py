"""The run's device mesh and the arrays placed on it: built in this one module.

:func:`make_mesh` builds the mesh of a run from its config (today one ``'clients'`` axis
over every device of every process, ``config.train.use_mesh``); the round's per-client inputs
are sharded over that axis (:func:`client_sharding`) and the server state is replicated
(:func:`replicated`). A later layout with more axes (e.g. ``('clients', 'experts')``) changes
:func:`make_mesh` and the two shardings; the host side below works for any sharding, since it
asks the sharding which rows this process's devices hold.

Multi-process runs (``jax.distributed``, :mod:`fedalign.federated.distributed`): every
process builds only the rows of the client axis that its own devices hold
(:func:`process_rows`) and :func:`global_arrays` assembles the global arrays from them with
:func:`jax.make_array_from_callback`; :func:`local_view` gives the single-device copy of a
replicated array that host-side code (evaluation, metrics) reads on one process.

Example (one process; the rows of every device are local):
  >>> import numpy as np
  >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), (CLIENT_AXIS,))
  >>> process_rows(client_sharding(mesh), 4).tolist()
  [0, 1, 2, 3]
  >>> x = global_arrays(client_sharding(mesh), 4, np.arange(4), {'x': np.arange(8).reshape(4, 2)})
  >>> tuple(x['x'].sharding.spec), np.asarray(x['x'][3]).tolist()
  (('clients',), [6, 7])
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedalign.federated.round import CLIENT_AXIS

PyTree = Any


def make_mesh(config: ml_collections.ConfigDict, devices: list[Any] | None = None) -> Mesh | None:
  """The run's mesh: a ``'clients'`` axis over ``devices`` (default: every device of every
  process) when ``config.train.use_mesh``, else None (one device, plain vmap).

  Raises:
    ValueError: a multi-process run without ``train.use_mesh`` (each process would run the
      whole round alone), or ``train.lanes`` not a multiple of the mesh size.
  """
  t = config.train
  if not t.use_mesh:
    if jax.process_count() > 1:
      raise ValueError(
          f"config.train.use_mesh=False is invalid in a multi-process run "
          f"({jax.process_count()} processes): expected True, the sampled clients are "
          "sharded over the devices of every process."
      )
    return None
  devices = list(jax.devices() if devices is None else devices)
  mesh = Mesh(np.array(devices), (CLIENT_AXIS,))
  lanes = int(t.get("lanes", 0))
  if lanes and lanes % mesh.size:
    raise ValueError(
        f"config.train.lanes={lanes} is invalid with train.use_mesh=True: expected a multiple "
        f"of the mesh size ({mesh.size} devices), the lane axis is sharded over the devices."
    )
  return mesh


def client_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of per-client inputs: the leading (client or lane) axis over
  ``'clients'``."""
  return NamedSharding(mesh, P(CLIENT_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of the server state and the round's outputs: a full copy on every device."""
  return NamedSharding(mesh, P())


def process_rows(sharding: jax.sharding.Sharding, num_rows: int) -> np.ndarray:
  """The rows of a ``(num_rows, ...)`` array that this process's devices hold (sorted)."""
  index = sharding.addressable_devices_indices_map((num_rows,))
  rows = set()
  for idx in index.values():
    rows.update(range(num_rows)[idx[0]] if idx else range(num_rows))
  return np.array(sorted(rows), np.int64)


def global_arrays(
    sharding: jax.sharding.Sharding,
    num_rows: int,
    rows: np.ndarray,
    local: dict[str, np.ndarray],
) -> dict[str, jax.Array]:
  """Global ``(num_rows, ...)`` arrays from this process's rows.

  Args:
    sharding: the arrays' sharding (e.g. :func:`client_sharding`).
    num_rows: the global size of the leading axis.
    rows: the global row index of each row of ``local`` (at least
      :func:`process_rows`'s rows; more are ignored).
    local: ``name -> (len(rows), ...)`` numpy arrays.
  """
  rows = np.asarray(rows, np.int64)
  order = np.argsort(rows, kind="stable")

  def one(v: np.ndarray) -> jax.Array:
    v = np.asarray(v)
    shape = (num_rows,) + v.shape[1:]

    def callback(idx):
      want = np.arange(num_rows)[idx[0]] if idx else np.arange(num_rows)
      pos = order[np.minimum(np.searchsorted(rows[order], want), len(rows) - 1)]
      if len(rows) == 0 or not np.array_equal(rows[pos], want):
        missing = sorted(set(want.tolist()) - set(rows.tolist()))
        raise ValueError(f"rows {missing} are held by this process's devices but not given")
      return v[pos][(slice(None),) + tuple(idx[1:])]

    return jax.make_array_from_callback(shape, sharding, callback)

  return {k: one(v) for k, v in local.items()}


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """``tree``'s arrays as global arrays replicated on every device of ``mesh`` (every process
  passes the same values). ``None`` leaves stay None."""
  sharding = replicated(mesh)

  def one(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(one, tree)


def local_view(tree: PyTree) -> PyTree:
  """Each replicated global array as its copy on this process's first device (host-side code
  of one process, e.g. evaluation, may then run jitted functions on it alone); arrays that
  are fully addressable are returned as they are.

  >>> import jax.numpy as jnp
  >>> local_view({'w': jnp.ones(2)})['w'].tolist()
  [1.0, 1.0]
  """

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError(
            f"local_view needs replicated arrays; got one of shape {x.shape} sharded as "
            f"{x.sharding}"
        )
      return x.addressable_data(0)
    return x

  return jax.tree.map(one, tree)

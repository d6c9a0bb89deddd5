"""The run's device mesh and the arrays placed on it: built in this one module.

:func:`make_mesh` builds the mesh of a run from its config (``config.train.use_mesh``,
``config.train.mesh_shape``): by default one ``'clients'`` axis over every device of every
process; with ``mesh_shape='clients:4,experts:2'`` a 2-D ``('clients', 'experts')`` mesh. The
round's per-client inputs are sharded over ``'clients'`` (:func:`client_sharding`; replicated
over ``'experts'``). The server state is placed by :func:`state_shardings`: on a mesh with an
``'experts'`` axis every leaf under a MoE block's ``experts`` subtree (the stacked (E, ...)
expert weights, their LoRA adapters, the server optimizer's moments of them, per-client states
of them) is sharded over ``'experts'`` along its expert axis, everything else replicated
(:func:`replicated`). The host side below works for any sharding, since it asks the sharding
which rows this process's devices hold.

Multi-process runs (``jax.distributed``, :mod:`fedalign.federated.distributed`): every
process builds only the rows of the client axis that its own devices hold
(:func:`process_rows`) and :func:`global_arrays` assembles the global arrays from them with
:func:`jax.make_array_from_callback`; :func:`local_view` gives the arrays that host-side code
(evaluation) of one process runs on: a replicated array's copy on its first device, an
expert-sharded array's shards held by its devices when the ``'experts'`` axis lies within
each process (:func:`experts_within_process`; otherwise every process takes part in the
evaluation on the global arrays: :class:`fedalign.federated.hooks.Evaluate`).

Example (one process; the rows of every device are local):
  >>> import numpy as np
  >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), (CLIENT_AXIS,))
  >>> process_rows(client_sharding(mesh), 4).tolist()
  [0, 1, 2, 3]
  >>> x = global_arrays(client_sharding(mesh), 4, np.arange(4), {'x': np.arange(8).reshape(4, 2)})
  >>> tuple(x['x'].sharding.spec), np.asarray(x['x'][3]).tolist()
  (('clients',), [6, 7])
  >>> parse_mesh_shape('experts:2,clients:-1', 8)
  {'clients': 4, 'experts': 2}
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedalign.aggregation.moe_blocks import block_layout, find_moe_blocks, flatten, path_key
from fedalign.federated.round import CLIENT_AXIS

PyTree = Any
EXPERT_AXIS = "experts"
MESH_AXES = (CLIENT_AXIS, EXPERT_AXIS)  # the mesh's axis order (experts innermost)


def parse_mesh_shape(spec: str, num_devices: int) -> dict[str, int]:
  """``config.train.mesh_shape`` as ``{axis: size}`` in :data:`MESH_AXES` order.

  ``spec``: ``''`` (one ``'clients'`` axis over every device, the default) or comma-separated
  ``name:size`` entries with names from :data:`MESH_AXES` (each at most once, any order);
  one size may be ``-1`` (the device count over the others' product). The sizes' product must
  be ``num_devices``.

  >>> parse_mesh_shape('', 8)
  {'clients': 8}
  >>> parse_mesh_shape('clients:4,experts:2', 8)
  {'clients': 4, 'experts': 2}
  >>> parse_mesh_shape('clients:3,experts:2', 8)
  Traceback (most recent call last):
  ...
  ValueError: config.train.mesh_shape='clients:3,experts:2' is invalid: expected axis sizes whose product is the device count, 8 (got 6).
  """

  def bad(expected: str) -> ValueError:
    return ValueError(f"config.train.mesh_shape={spec!r} is invalid: expected {expected}.")

  fmt = (
      f"'' or comma-separated name:size entries with names from {MESH_AXES}, e.g. "
      "'clients:4,experts:2'"
  )
  if not isinstance(spec, str):
    raise bad(fmt)
  if not spec.strip():
    return {CLIENT_AXIS: num_devices}
  sizes: dict[str, int] = {}
  for entry in spec.split(","):
    name, sep, size = (part.strip() for part in entry.partition(":"))
    if not sep or name not in MESH_AXES:
      raise bad(fmt + f" (got the entry {entry.strip()!r})")
    if name in sizes:
      raise bad(fmt + f" (the axis {name!r} twice)")
    try:
      sizes[name] = int(size)
    except ValueError:
      raise bad(f"integer sizes (got {size!r} for {name!r})") from None
    if sizes[name] < 1 and sizes[name] != -1:
      raise bad(f"sizes >= 1, or -1 for one axis (got {sizes[name]} for {name!r})")
  if CLIENT_AXIS not in sizes:
    sizes[CLIENT_AXIS] = -1 if -1 not in sizes.values() else 1
  inferred = [k for k, v in sizes.items() if v == -1]
  if len(inferred) > 1:
    raise bad(f"at most one size -1 (got {inferred})")
  known = int(np.prod([v for v in sizes.values() if v != -1]))
  if inferred:
    if num_devices % known:
      raise bad(f"axis sizes that divide the device count, {num_devices} (got {known})")
    sizes[inferred[0]] = num_devices // known
  total = int(np.prod(list(sizes.values())))
  if total != num_devices:
    raise bad(f"axis sizes whose product is the device count, {num_devices} (got {total})")
  return {k: sizes[k] for k in MESH_AXES if k in sizes}


def make_mesh(config: ml_collections.ConfigDict, devices: list[Any] | None = None) -> Mesh | None:
  """The run's mesh over ``devices`` (default: every device of every process) when
  ``config.train.use_mesh``, else None (one device, plain vmap).

  The axes are those of ``config.train.mesh_shape`` (:func:`parse_mesh_shape`; default one
  ``'clients'`` axis), in :data:`MESH_AXES` order: the devices in ``jax.devices()`` order
  reshaped to the axis sizes, so the devices of one ``'experts'`` group are consecutive (the
  same host where a host holds several devices).

  Raises:
    ValueError: a multi-process run without ``train.use_mesh`` (each process would run the
      whole round alone); ``train.mesh_shape`` set with ``train.use_mesh=False``, malformed,
      not a factorization of the device count, or with an experts axis that does not divide
      ``model.num_experts`` (checked again against every MoE block of the loaded model by
      :func:`state_shardings`); ``train.lanes`` not a multiple of the ``'clients'`` axis
      size. (An experts axis may span processes: :func:`experts_within_process`.)
  """
  t = config.train
  spec = t.get("mesh_shape", "")
  if not t.use_mesh:
    if spec:
      raise ValueError(
          f"config.train.mesh_shape={spec!r} is invalid with train.use_mesh=False: expected "
          "'' (no mesh), or set --config.train.use_mesh=True."
      )
    if jax.process_count() > 1:
      raise ValueError(
          f"config.train.use_mesh=False is invalid in a multi-process run "
          f"({jax.process_count()} processes): expected True, the sampled clients are "
          "sharded over the devices of every process."
      )
    return None
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_shape(spec, len(devices))
  experts = sizes.get(EXPERT_AXIS, 1)
  m = config.get("model", ml_collections.ConfigDict())
  num_experts = m.get("num_experts", 0)
  known = not m.get("hf_checkpoint", "") or m.get("check_checkpoint", False)
  if known and num_experts and num_experts % experts:
    raise ValueError(
        f"config.train.mesh_shape={spec!r} is invalid: expected an experts axis size that "
        f"divides model.num_experts={num_experts} (got {experts})."
    )
  mesh = Mesh(np.array(devices).reshape(tuple(sizes.values())), tuple(sizes))
  lanes = int(t.get("lanes", 0))
  if lanes and lanes % client_axis_size(mesh):
    raise ValueError(
        f"config.train.lanes={lanes} is invalid with train.use_mesh=True: expected a multiple "
        f"of the 'clients' axis size ({client_axis_size(mesh)} devices), the lane axis is "
        "sharded over it."
    )
  return mesh


def client_axis_size(mesh: Mesh | None) -> int:
  """The size of the mesh's ``'clients'`` axis (1 without a mesh): the round's client (or
  lane) axis is padded to a multiple of it."""
  return 1 if mesh is None else int(mesh.shape[CLIENT_AXIS])


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


def place(tree: PyTree, shardings: PyTree) -> PyTree:
  """``tree``'s arrays as global arrays with the matching sharding of ``shardings`` (a tree
  of the same structure, e.g. :func:`state_shardings`; every process passes the same
  values). ``None`` leaves stay None."""

  def one(x, sharding):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(one, tree, shardings)


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def state_shardings(state: PyTree, mesh: Mesh) -> PyTree:
  """The sharding of every leaf of a server state ``{'params', 'agg', 'client_states'}``.

  The rule: on a mesh without an ``'experts'`` axis everything is replicated. With one, a
  leaf is sharded over ``'experts'`` along its expert axis when its path runs through the
  ``experts`` subtree of a MoE block of ``state['params']`` (a subtree with ``router`` and
  ``experts``; :func:`fedalign.aggregation.moe_blocks.find_moe_blocks`) and that axis has
  the block's E entries: axis 0 (the params' stacked expert weights and LoRA adapters, the
  server optimizer's moments of them), axis 1 under ``client_states`` ((N, E, ...) per-client
  states). Every other leaf (attention, dense and shared-expert MLPs, embeddings, routers,
  per-expert routing statistics (E,), centroids (E, D)) is replicated.

  Raises:
    ValueError: the experts axis does not divide a block's E, or the params hold no MoE block.

  >>> import numpy as np, jax.numpy as jnp
  >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), MESH_AXES)
  >>> params = {'moe': {'router': {'kernel': jnp.zeros((3, 4))},
  ...                   'experts': {'wi': jnp.zeros((4, 3, 5))}}, 'head': jnp.zeros(3)}
  >>> sh = state_shardings({'params': params, 'agg': {'opt': params}}, mesh)
  >>> tuple(sh['params']['moe']['experts']['wi'].spec), tuple(sh['agg']['opt']['head'].spec)
  (('experts',), ())
  """
  rep = replicated(mesh)
  if EXPERT_AXIS not in mesh.axis_names:
    return jax.tree.map(lambda _: rep, state)
  k = int(mesh.shape[EXPERT_AXIS])
  flat = flatten(state["params"])
  blocks = {
      path_key(p): block_layout(flat, p).num_experts for p in find_moe_blocks(state["params"])
  }
  if not blocks:
    raise ValueError(
        "config.train.mesh_shape has an 'experts' axis but the model has no MoE block (a "
        "subtree with 'router' and 'experts'): expected a mesh without it."
    )
  for path, e in blocks.items():
    if e % k:
      raise ValueError(
          f"config.train.mesh_shape is invalid: expected an experts axis size that divides "
          f"the {e} experts of MoE block {'/'.join(path)!r} (got {k})."
      )

  def one(path, x):
    keys = tuple(_key_name(p) for p in path)
    lead = 1 if keys[:1] == ("client_states",) else 0
    for block, e in blocks.items():
      n = len(block)
      for i in range(len(keys) - n):
        if keys[i : i + n] == block and keys[i + n] == "experts":
          if len(np.shape(x)) > lead and np.shape(x)[lead] == e:
            return NamedSharding(mesh, P(*([None] * lead), EXPERT_AXIS))
    return rep

  return jax.tree_util.tree_map_with_path(one, state)


def experts_within_process(mesh: Mesh) -> bool:
  """True when every ``'experts'`` group of ``mesh`` (the devices along the experts axis at one
  ``'clients'`` index) lies on one process, so each process holds every expert shard on its own
  devices (:func:`local_view`); always true for one process or a mesh without ``'experts'``."""
  if EXPERT_AXIS not in mesh.axis_names:
    return True
  groups = np.moveaxis(mesh.devices, mesh.axis_names.index(EXPERT_AXIS), -1)
  groups = groups.reshape(-1, groups.shape[-1])
  return all(len({d.process_index for d in g}) == 1 for g in groups)


def local_view(tree: PyTree) -> PyTree:
  """``tree``'s global arrays as arrays on this process's devices only (host-side code of one
  process, e.g. evaluation on process 0, may then run jitted functions on them alone); a tree
  whose arrays are all fully addressable (one process) is returned as it is.

  Replicated trees (the 1-D mesh) become each array's copy on this process's first device.
  With arrays sharded over ``'experts'`` (the 2-D mesh) whose every shard this process holds
  (:func:`experts_within_process`), each array becomes the same shards, not copied, on a mesh
  of this process's devices with the same axes and partition spec: evaluation then runs
  sharded over the local devices, as one process does over all of them.

  Raises:
    ValueError: a shard of an array lies on another process only (an experts axis spanning
      processes: evaluate on the global arrays with every process instead).

  >>> import jax.numpy as jnp
  >>> local_view({'w': jnp.ones(2)})['w'].tolist()
  [1.0, 1.0]
  """
  leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  remote = [x for x in leaves if not x.is_fully_addressable]
  if not remote:
    return tree
  if all(x.is_fully_replicated for x in remote):
    return jax.tree.map(
        lambda x: x.addressable_data(0)
        if isinstance(x, jax.Array) and not x.is_fully_addressable
        else x,
        tree,
    )
  meshes = {x.sharding.mesh for x in remote if isinstance(x.sharding, NamedSharding)}
  if len(meshes) != 1 or len(remote) != sum(isinstance(x.sharding, NamedSharding) for x in remote):
    raise ValueError("local_view needs the arrays of one mesh (NamedSharding)")
  local = _local_mesh(meshes.pop())

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return x
    sharding = NamedSharding(local, x.sharding.spec)
    want = sharding.devices_indices_map(x.shape)
    have = x.sharding.devices_indices_map(x.shape)
    if any(have[d] != idx for d, idx in want.items()):
      raise ValueError(
          f"local_view: an array of shape {x.shape} sharded as {x.sharding.spec} has shards "
          "on other processes only (an experts axis spanning processes)"
      )
    shards = {s.device: s.data for s in x.addressable_shards}
    return jax.make_array_from_single_device_arrays(
        x.shape, sharding, [shards[d] for d in local.devices.flat]
    )

  return jax.tree.map(one, tree)


def _local_mesh(mesh: Mesh) -> Mesh:
  """This process's devices of a ``('clients', 'experts')`` mesh as a mesh with the same
  axes: the ``'clients'`` rows whose every device this process holds, stacked."""
  me = jax.process_index()
  rows = mesh.devices.reshape(-1, mesh.devices.shape[-1])  # experts innermost (MESH_AXES)
  mine = [r for r in rows if all(d.process_index == me for d in r)]
  if mesh.axis_names[-1] != EXPERT_AXIS or not mine:
    raise ValueError(
        f"local_view: process {me} holds no whole 'experts' group of the mesh {mesh.shape} "
        "(an experts axis spanning processes)"
    )
  return Mesh(np.array(mine).reshape((len(mine),) + mesh.devices.shape[1:]), mesh.axis_names)

"""Orbax checkpoints of the whole federated run: server state, aggregator and client states.

The state is saved as the named pytree it is (``{'params': ..., 'agg': ..., 'client_states':
...}``, jax arrays written where they live, sharded arrays by every host for its shards) with
``ocp.args.StandardSave``, plus JSON metadata (round, history). It is restored with
``ocp.args.StandardRestore`` against an abstract copy of a freshly initialised state of the same
config: every ``jax.Array`` leaf becomes a ``jax.ShapeDtypeStruct`` with the template's sharding,
so a sharded state comes back sharded the same way; ``None`` placeholders, empty tuples and
optimizer-state namedtuples take the template's structure.

A checkpoint whose tree differs from the template (another config) raises a ``ValueError``
naming the first differing path and shape. Checkpoints of fedalign < 0.2 (its flat leaf layout:
arrays named ``00000``, ``00001``... in leaf order) are restored by leaf order when the count and
shapes match, with a logged note. Each step's metadata holds checksums of the saved arrays
(:func:`state_checksums`), verified on restore. A step whose files cannot be read back (a
half-written or corrupted latest checkpoint) or read back other values than were saved is skipped
by :meth:`Checkpointer.restore_latest` with a warning and the previous one is used.

Example:
  >>> import tempfile, jax.numpy as jnp
  >>> ckpt = Checkpointer(tempfile.mkdtemp(), keep=2)
  >>> ckpt.save(3, {'w': jnp.ones(2)}, {'round': 3})
  >>> state, meta = ckpt.restore_latest({'w': jnp.zeros(2)})
  >>> state['w'].tolist(), meta['round']
  ([1.0, 1.0], 3)
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
log = logging.getLogger(__name__)

_OLD_LEAF_NAME = re.compile(r"^\d{5}$")


class CheckpointMismatchError(ValueError):
  """A readable checkpoint whose tree differs from the run's state (another config or version).

  :meth:`Checkpointer.restore_latest` raises it instead of falling back: older steps of the same
  workdir would not match either, and starting over silently would overwrite them.
  """


def _key_name(k: Any) -> str:
  """One path entry as text: dict keys, namedtuple fields and sequence indices alike."""
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _named_leaves(tree: PyTree, is_leaf=None) -> list[tuple[str, tuple[int, ...]]]:
  """``[('agg/opt/0/mu/w', shape), ...]`` in leaf order (``None`` and empty nodes have none).

  Orbax stores a namedtuple as a dict of its fields and a tuple as a list; the names used here
  are the same for both forms, so a template and a checkpoint's metadata compare directly.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [("/".join(_key_name(k) for k in path), tuple(np.shape(x))) for path, x in flat]


def _abstract(x: Any) -> Any:
  """The restore target of one template leaf: shape, dtype and, for a jax array committed to
  its devices (sharded, placed), its sharding. Other leaves are read as numpy arrays."""
  if isinstance(x, jax.Array) and (x.committed or jnp.issubdtype(x.dtype, jax.dtypes.prng_key)):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  x = np.asarray(x)
  return np.zeros(x.shape, x.dtype)  # restored as a numpy array


def _placed_like(restored: Any, template: Any) -> Any:
  """A restored leaf as its template leaf is: an uncommitted jax array (left to JAX to place)
  stays uncommitted. Committed arguments are other programs to jit: a resumed run would compile
  its round again instead of loading it from the compilation cache."""
  if isinstance(template, jax.Array) and not isinstance(restored, jax.Array):
    return jax.device_put(restored)  # a transfer (jnp.asarray compiles a program per shape)
  return restored


def _is_array_metadata(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _first_difference(
    saved: list[tuple[str, tuple[int, ...]]], wanted: list[tuple[str, tuple[int, ...]]]
) -> str | None:
  """Describes the first entry where two named-leaf lists differ; None when they agree."""
  for i in range(max(len(saved), len(wanted))):
    s = saved[i] if i < len(saved) else None
    w = wanted[i] if i < len(wanted) else None
    if s == w:
      continue
    if s is None:
      return f"the run's state has {w[0]!r} {w[1]}, which the checkpoint lacks"
    if w is None:
      return f"the checkpoint has {s[0]!r} {s[1]}, which the run's state lacks"
    if s[0] != w[0]:
      return f"the checkpoint has {s[0]!r} {s[1]} where the run's state has {w[0]!r} {w[1]}"
    return f"{s[0]!r} has shape {s[1]} in the checkpoint, {w[1]} in the run's state"
  return None


CHECKSUMS_KEY = "_checksums"  # in a step's JSON metadata: the state's checksums at save time


class CheckpointCorruptError(ValueError):
  """A step whose arrays read back differ from what was saved (bit rot, an overwritten file).

  :meth:`Checkpointer.restore_latest` skips such a step, like an unreadable one."""


def _word_checksums(x: jax.Array) -> jax.Array:
  """(2,) uint32: the sum of ``x``'s 32-bit (or narrower) words and their sum weighted by odd
  position weights, both modulo 2**32. Any single changed word changes both; a swap of two
  words changes the second. Elementwise plus one reduction, so a sharded array is reduced
  where it lives (no gather)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    w = x.astype(jnp.uint32)
  else:
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    w = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)  # 8 bytes: a trailing 2
  pos = jnp.zeros(w.shape, jnp.uint32)
  for d, n in enumerate(w.shape):
    pos = pos * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d)
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * (2 * pos + 1), dtype=jnp.uint32)])


@jax.jit
def _tree_checksums(tree: PyTree) -> PyTree:
  return jax.tree.map(_word_checksums, tree)


def state_checksums(tree: PyTree) -> dict[str, list[int]]:
  """``{leaf name: [sum, weighted sum]}`` of every array of ``tree`` (see
  :func:`_word_checksums`), computed in one jitted program where the arrays live.

  >>> import jax.numpy as jnp
  >>> a = state_checksums({'w': jnp.array([1.0, 2.0])})
  >>> b = state_checksums({'w': jnp.array([2.0, 1.0])})
  >>> a['w'][0] == b['w'][0], a['w'][1] == b['w'][1]
  (True, False)
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  names = ["/".join(_key_name(k) for k in path) for path, _ in flat]
  groups: dict[Any, list[int]] = {}  # one program per set of devices the leaves live on
  for i, (_, x) in enumerate(flat):
    devices = frozenset(d.id for d in x.sharding.device_set) if isinstance(x, jax.Array) else None
    groups.setdefault(devices, []).append(i)

  def host(x: jax.Array) -> np.ndarray:  # replicated: every process holds the whole result
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))

  out = {}
  for idx in groups.values():
    for i, sums in zip(idx, _tree_checksums([flat[i][1] for i in idx])):
      out[names[i]] = host(sums).tolist()
  return {name: out[name] for name in names}


class Checkpointer:
  """Keeps the last ``keep`` checkpoints of a run under ``directory``.

  Args:
    directory: the folder of the run's checkpoints (created if missing).
    keep: how many of the newest steps are kept on disk.
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 3):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )

  def save(self, step: int, state: PyTree, metadata: dict[str, Any]) -> None:
    """Writes ``state`` (a pytree of arrays) and JSON ``metadata`` as checkpoint ``step``,
    with the state's checksums (:func:`state_checksums`) in the metadata: :meth:`restore`
    verifies them."""
    metadata = {**metadata, CHECKSUMS_KEY: state_checksums(state)}
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(metadata)
        ),
    )
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    """The steps on disk, oldest first."""
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def _saved_tree(self, step: int) -> PyTree:
    meta = self.manager.item_metadata(step)["state"]
    tree = getattr(meta, "tree", meta)
    if tree is None:
      raise ValueError(f"checkpoint step {step} in {self.directory} has no readable state")
    return tree

  def restore(self, step: int, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores ``step`` into the structure, dtypes and shardings of ``template``.

    Args:
      step: a step of :meth:`steps`.
      template: a state of the run's config (e.g. freshly initialised); only its structure,
        shapes, dtypes and shardings are used.

    Returns:
      ``(state, metadata)``.

    Raises:
      CheckpointMismatchError: (a ValueError) the checkpoint's tree differs from the template's
        (another config).
      Exception: whatever orbax raises for unreadable files.
    """
    saved_tree = self._saved_tree(step)
    saved = _named_leaves(saved_tree, is_leaf=_is_array_metadata)
    wanted = _named_leaves(template)
    if (
        saved
        and all(_OLD_LEAF_NAME.match(name) for name, _ in saved)
        and not all(_OLD_LEAF_NAME.match(name) for name, _ in wanted)
    ):
      return self._restore_flat_layout(step, template, saved)
    diff = _first_difference(saved, wanted)
    if diff is not None:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not match the run's state: {diff}. "
          "It was written by a different config; use a new workdir (or the old config)."
      )
    out = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree.map(_abstract, template)),
            meta=ocp.args.JsonRestore(),
        ),
    )
    state = jax.tree.map(_placed_like, out["state"], template)
    meta = dict(out["meta"])
    saved_sums = meta.pop(CHECKSUMS_KEY, None)  # absent in checkpoints written before checksums
    if saved_sums is not None:
      read = state_checksums(state)
      bad = [name for name in saved_sums if read.get(name) != saved_sums[name]]
      if bad or read.keys() != saved_sums.keys():
        raise CheckpointCorruptError(
            f"checkpoint step {step} in {self.directory} reads back other values than were "
            f"saved (checksum mismatch in {', '.join(bad[:3]) or 'the leaf names'}"
            f"{', ...' if len(bad) > 3 else ''}): its files were damaged after writing"
        )
    return state, meta

  def _restore_flat_layout(
      self, step: int, template: PyTree, saved: list[tuple[str, tuple[int, ...]]]
  ) -> tuple[PyTree, dict[str, Any]]:
    """fedalign < 0.2 wrote the leaves as ``{'00000': x0, ...}``: restore them by leaf order."""
    template_leaves, treedef = jax.tree.flatten(template)
    wanted = [(f"{i:05d}", tuple(np.shape(x))) for i, x in enumerate(template_leaves)]
    diff = _first_difference(sorted(saved), wanted)
    if diff is not None:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} was written by fedalign < 0.2 (flat "
          f"leaf layout: arrays '00000', '00001'... in leaf order) and does not match the run's "
          f"state by leaf order ({len(saved)} arrays saved, {len(wanted)} expected; {diff}). "
          "Restore it with the old version of fedalign or start a new workdir."
      )
    log.info(
        "checkpoint step %d in %s was written by fedalign < 0.2 (flat leaf layout); restoring "
        "its %d arrays by leaf order. The next save writes the named layout.",
        step,
        self.directory,
        len(saved),
    )
    abstract = {f"{i:05d}": _abstract(x) for i, x in enumerate(template_leaves)}
    out = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    leaves = [_placed_like(out["state"][f"{i:05d}"], x) for i, x in enumerate(template_leaves)]
    return jax.tree.unflatten(treedef, leaves), dict(out["meta"])

  def restore_latest(self, template: PyTree) -> tuple[PyTree, dict[str, Any]] | None:
    """The newest readable checkpoint, falling back to older ones; None if there is none.

    Raises:
      CheckpointMismatchError: a readable step does not match ``template``.
    """
    for step in reversed(self.steps()):
      try:
        return self.restore(step, template)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 - any unreadable step is skipped
        log.warning(
            "checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
            step,
            self.directory,
            type(e).__name__,
            e,
        )
    return None

  def close(self) -> None:
    """Releases the checkpoint manager."""
    self.manager.close()

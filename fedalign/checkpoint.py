"""Orbax checkpoints of the whole federated run: server state, aggregator and client states.

The state is saved as its flat list of leaves (plus JSON metadata: round, config
fingerprint); it is restored into the structure of a freshly initialised state of the same
config, so ``None`` placeholders and empty optimizer states need no special handling.
A step whose files cannot be read back (a half-written or corrupted latest checkpoint) is
skipped with a warning and the previous one is used.

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
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
log = logging.getLogger(__name__)


class Checkpointer:
  """Keeps the last ``keep`` checkpoints of a run under ``directory``."""

  def __init__(self, directory: str | os.PathLike, keep: int = 3):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: PyTree, metadata: dict[str, Any]) -> None:
    leaves = {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(metadata)
        ),
    )
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def restore(self, step: int, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores ``step`` into the structure of ``template`` (raises if unreadable)."""
    template_leaves, treedef = jax.tree.flatten(template)
    abstract = {
        f"{i:05d}": np.zeros(np.shape(x), np.asarray(x).dtype)
        for i, x in enumerate(template_leaves)
    }
    out = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    leaves = out["state"]
    if len(leaves) != len(template_leaves):
      raise ValueError(
          f"checkpoint step {step} has {len(leaves)} arrays, the run's state has "
          f"{len(template_leaves)}: it was written by a different config."
      )
    restored = []
    for i, t in enumerate(template_leaves):
      x = np.asarray(leaves[f"{i:05d}"])
      if x.shape != np.shape(t):
        raise ValueError(
            f"checkpoint step {step}: array {i} has shape {x.shape}, expected "
            f"{np.shape(t)}: it was written by a different config."
        )
      restored.append(x)
    return jax.tree.unflatten(treedef, restored), dict(out["meta"])

  def restore_latest(self, template: PyTree) -> tuple[PyTree, dict[str, Any]] | None:
    """The newest readable checkpoint, falling back to older ones; None if there is none."""
    for step in reversed(self.steps()):
      try:
        return self.restore(step, template)
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
    self.manager.close()

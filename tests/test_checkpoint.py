"""Checkpointer: the named state pytree through orbax, sharded restores, the old flat layout."""

import ast
import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from fedalign.checkpoint import CheckpointCorruptError, CheckpointMismatchError, Checkpointer

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_state(scale=1.0, width=3):
  params = {"dense": {"w": scale * jnp.ones((2, width)), "b": jnp.arange(width, dtype=jnp.float32)}}
  return {
      "params": params,
      "agg": {
          "opt": optax.adam(1e-3).init(params),
          "empty_tuple": (),
          "empty_dict": {},
          "nothing": None,
          "key": jax.random.PRNGKey(int(scale)),
          "excluded": jnp.array([True, False, True]),
          "round": jnp.asarray(int(scale), jnp.int32),
      },
      "client_states": None,
  }


def test_round_trip_keeps_structure_values_and_dtypes(tmp_path):
  state = make_state(7.0)
  state["agg"]["opt"] = jax.tree.map(lambda x: x + 2, state["agg"]["opt"])
  ckpt = Checkpointer(tmp_path, keep=2)
  ckpt.save(1, make_state(1.0), {"round": 1})
  ckpt.save(2, state, {"round": 2, "history": [{"round": 1, "test_accuracy": 0.5}]})
  out, meta = ckpt.restore_latest(make_state(0.0))
  assert meta == {"round": 2, "history": [{"round": 1, "test_accuracy": 0.5}]}
  assert jax.tree.structure(out) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(state)):
    assert isinstance(a, jax.Array)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert isinstance(out["agg"]["opt"][0], optax.ScaleByAdamState)
  assert out["agg"]["key"].dtype == jnp.uint32 and out["agg"]["excluded"].dtype == jnp.bool_
  state1, meta1 = ckpt.restore(1, make_state(0.0))
  assert meta1 == {"round": 1} and float(state1["params"]["dense"]["w"][0, 0]) == 1.0
  assert ckpt.steps() == [1, 2]
  ckpt.close()


# Reading the damaged step makes orbax (0.12) abandon an asyncio callback that fires after its
# event loop closed; Python reports it as unraisable ("Event loop is closed"), harmlessly.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_arrays_are_detected_and_the_previous_step_is_used(tmp_path, caplog):
  """Files that read back cleanly but hold other values than were saved (the state of another
  save copied over, flipped bytes) fail the checksums in the step's metadata: restore_latest
  warns and falls back to the previous step (it used to restore the damaged values)."""
  import shutil

  ckpt = Checkpointer(tmp_path / "a", keep=3)
  ckpt.save(1, make_state(1.0), {"round": 1})
  ckpt.save(2, make_state(2.0), {"round": 2})
  other = Checkpointer(tmp_path / "b")
  other.save(2, make_state(5.0), {"round": 2})
  other.close()
  shutil.rmtree(tmp_path / "a" / "2" / "state")
  shutil.copytree(tmp_path / "b" / "2" / "state", tmp_path / "a" / "2" / "state")
  with pytest.raises(
      CheckpointCorruptError, match=r"step 2 .*checksum mismatch in .*params/dense/w"
  ):
    ckpt.restore(2, make_state(0.0))
  with caplog.at_level(logging.WARNING):
    out, meta = ckpt.restore_latest(make_state(0.0))
  assert meta == {"round": 1} and float(out["params"]["dense"]["w"][0, 0]) == 1.0
  assert any("reads back other values" in r.message for r in caplog.records)

  ckpt.save(3, make_state(3.0), {"round": 3})
  for f in sorted((tmp_path / "a" / "3" / "state").rglob("d/*")):
    data = bytearray(f.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(
        b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 64]
    )
    f.write_bytes(bytes(data))
  out, meta = ckpt.restore_latest(make_state(0.0))  # damaged or unreadable: either way, step 1
  assert meta == {"round": 1}
  ckpt.close()


def test_a_restored_state_is_placed_as_the_fresh_one(tmp_path):
  """Orbax commits restored arrays to their device; a fresh single-device state is uncommitted,
  and a jitted function sees the two as different programs (a resumed run compiled its round
  again). Restored leaves of an uncommitted template come back uncommitted."""
  fresh = make_state(1.0)
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, fresh, {"round": 1})
  out, _ = ckpt.restore(1, make_state(0.0))
  ckpt.close()
  arrays = [x for x in jax.tree.leaves(out)]
  assert arrays and all(isinstance(x, jax.Array) and not x.committed for x in arrays)
  step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1 if x.dtype != jnp.bool_ else x, s))
  step(fresh)
  step(out)
  assert step._cache_size() == 1


def test_leaf_names_are_on_disk(tmp_path):
  ckpt = Checkpointer(tmp_path)
  ckpt.save(5, make_state(), {"round": 5})
  ckpt.close()
  text = (tmp_path / "5" / "state" / "_METADATA").read_text()
  tree = json.loads(text)["tree_metadata"]
  paths = [ast.literal_eval(k) for k in tree]  # keys like "('params', 'dense', 'w')"
  assert {p[0] for p in paths} == {"params", "agg", "client_states"}
  assert ("params", "dense", "w") in paths and ("agg", "opt", "0", "mu", "dense", "w") in paths
  assert not any(len(p) == 1 and p[0].isdigit() for p in paths), paths  # not the flat layout


def test_mismatched_template_names_the_first_difference(tmp_path):
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, make_state(width=3), {"round": 1})
  with pytest.raises(
      ValueError, match=r"'agg/opt/0/mu/dense/b' has shape \(3,\) in the checkpoint, \(4,\)"
  ):
    ckpt.restore(1, make_state(width=4))
  other = make_state()
  other["params"]["extra"] = jnp.zeros(2)
  with pytest.raises(CheckpointMismatchError, match="extra"):
    ckpt.restore_latest(other)  # a mismatch is not an unreadable step: no silent fallback


def _write_old_layout(directory, step, state, meta):
  """What fedalign < 0.2's Checkpointer.save wrote: leaves by order, after np.asarray."""
  leaves = {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
  mgr = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
  )
  mgr.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(meta)),
  )
  mgr.wait_until_finished()
  mgr.close()


def test_old_flat_layout_restores_by_leaf_order(tmp_path, caplog):
  state = make_state(3.0)
  _write_old_layout(tmp_path, 4, state, {"round": 4})
  ckpt = Checkpointer(tmp_path)
  with caplog.at_level(logging.INFO, logger="fedalign.checkpoint"):
    out, meta = ckpt.restore_latest(make_state(0.0))
  assert meta == {"round": 4}
  assert any("flat leaf layout" in r.message for r in caplog.records)
  assert jax.tree.structure(out) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_old_flat_layout_that_does_not_fit_fails_clearly(tmp_path):
  _write_old_layout(tmp_path, 4, make_state(width=3), {"round": 4})
  with pytest.raises(ValueError, match=r"fedalign < 0\.2 \(flat leaf layout.*new workdir"):
    Checkpointer(tmp_path).restore(4, make_state(width=5))


SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from fedalign.checkpoint import Checkpointer
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("clients",))
    sharded = NamedSharding(mesh, P("clients"))
    replicated = NamedSharding(mesh, P())
    def state(v):
      return {
          "params": {"w": jax.device_put(jnp.full((4, 3), v), replicated)},
          "agg": {"key": jax.random.PRNGKey(0), "nothing": None},
          "client_states": {"c": jax.device_put(
              jnp.arange(16 * 5, dtype=jnp.float32).reshape(16, 5) * v, sharded)},
      }
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, state(2.0), {"round": 1})
    out, meta = ckpt.restore_latest(state(0.0))
    c = out["client_states"]["c"]
    assert c.sharding.is_equivalent_to(sharded, c.ndim), c.sharding
    assert len(c.addressable_shards) == 8 and c.addressable_shards[0].data.shape == (2, 5)
    assert out["params"]["w"].sharding.is_equivalent_to(replicated, 2)
    np.testing.assert_array_equal(np.asarray(c), np.arange(80, dtype=np.float32).reshape(16, 5) * 2)
    np.testing.assert_array_equal(np.asarray(out["params"]["w"]), np.full((4, 3), 2.0))
    assert meta == {"round": 1}
    ckpt.close()
    print("SHARDED_OK")
    """)


def test_sharded_state_restores_with_its_sharding(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  res = subprocess.run(
      [sys.executable, "-c", SHARDED_SCRIPT, str(tmp_path / "ckpt")],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert res.returncode == 0 and "SHARDED_OK" in res.stdout, res.stdout + res.stderr

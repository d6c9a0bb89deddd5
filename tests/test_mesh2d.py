"""The 2-D ('clients', 'experts') mesh (``train.mesh_shape``) on the 8 fake CPU devices of
tests/conftest.py: the same rounds as one device, expert leaves sharded over 'experts', the
aggregation on the sharded deltas, and the bad-input errors.

Tolerance: float32 sums over clients and devices run in another order on the mesh (partial
sums per device plus cross-device reductions); params within 2e-5 absolute, losses and routing
statistics within 1e-5 relative (measured: see the assertions' messages when they fail).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fedalign.config_files import load_config
from fedalign.federated.mesh import EXPERT_AXIS, make_mesh, parse_mesh_shape
from fedalign.federated.run import build_run
from fedalign.federated.server import run_experiment

ROUNDS = 2
PARAM_ATOL = 2e-5
LOSS_RTOL = 1e-5


def small_config(method: str):
  """``configs/default.py:runlocal`` (4 experts, width 32) with one (MoE) layer and 6 of 8
  clients per round of 2 local steps, all at once (8 rows on a 4-wide client axis: 2 weight-0
  padding clients), for test time.
  FedAlign-MoE: LoRA (rank 2, adapters on attention and experts, routers trained) and a
  server Adam, so adapters and optimizer moments are sharded too."""
  c = load_config("configs/default.py:runlocal")
  c.method = method
  c.data.num_clients = 8
  c.data.max_train_examples = 800
  c.data.max_test_examples = 100
  c.model.num_layers = 1
  c.train.clients_per_round = 6
  c.train.chunk_size = 0
  c.train.local_steps = 2
  c.train.batch_size = 8
  c.train.rounds = ROUNDS
  if method == "fedalign":
    c.model.lora_rank = 2
    c.train.trainable = "lora"
    c.server.optimizer = "adam"
    c.server.learning_rate = 1e-2
  return c


def expert_leaf(path) -> bool:
  return "'experts'" in jax.tree_util.keystr(path)


def run_rounds(config, workdir, data=None):
  run = build_run(config, workdir, data=data)
  state, outs = run.initial_state, []
  for r in range(ROUNDS):
    state, out, _ = run.run_round(state, r)
    outs.append(jax.tree.map(np.asarray, out))
  return run, state, outs


@pytest.fixture(
    scope="module",
    # FedAlign-MoE (LoRA, server Adam) covers every kind of sharded leaf in the default run
    # (~30 s: two compilations of the round); FedAvg adds 25 s.
    params=[pytest.param("fedavg", marks=pytest.mark.slow), "fedalign"],
)
def runs(request, tmp_path_factory):
  """(1-device run, its state and outputs; the (4, 2) mesh's), ROUNDS rounds each."""
  c = small_config(request.param)
  work = tmp_path_factory.mktemp(request.param)
  one = run_rounds(c, work)
  c.train.use_mesh = True
  c.train.mesh_shape = "clients:4,experts:2"
  two = run_rounds(c, work, data=one[0].data)
  return request.param, one, two


def test_2d_mesh_rounds_equal_one_device(runs):
  method, (one, s1, o1), (run, s2, o2) = runs
  assert run.mesh.shape == {"clients": 4, "experts": 2}
  # expert parallel on the mesh (2 expert shards), one layout on one device: the same rounds
  assert (one.model_config.expert_shards, run.model_config.expert_shards) == (1, 2)
  assert run.pad_step == 4  # the 'clients' axis: 6 clients padded to 8 rows
  for a, b in zip(o1, o2):
    np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(
        b["client_train_loss"][:6], a["client_train_loss"][:6], rtol=LOSS_RTOL
    )
    for x, y in zip(jax.tree.leaves(a["routing_stats"]), jax.tree.leaves(b["routing_stats"])):
      # Sums of tokens' hidden states (centroids) cancel: a tolerance relative to their scale.
      scale = float(np.max(np.abs(x), initial=1.0))
      np.testing.assert_allclose(y[:6], x[:6], rtol=LOSS_RTOL, atol=LOSS_RTOL * scale)
  leaves1 = jax.tree_util.tree_leaves_with_path(s1)
  leaves2 = jax.tree.leaves(s2)
  assert len(leaves1) == len(leaves2)
  worst = 0.0
  for (path, x), y in zip(leaves1, leaves2):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) or x.dtype == jnp.uint32:
      np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
      continue
    diff = float(np.max(np.abs(np.asarray(y, np.float64) - np.asarray(x, np.float64)), initial=0))
    worst = max(worst, diff)
    assert diff <= PARAM_ATOL, (method, jax.tree_util.keystr(path), diff)
  # The rounds moved the params (the comparison is not between two initial states).
  init = jax.tree.leaves(run.initial_state["params"])
  assert (
      max(
          float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
          for a, b in zip(init, jax.tree.leaves(s2["params"]))
      )
      > 1e-3
  )


def test_expert_leaves_sharded_over_experts(runs):
  method, _, (run, state, _) = runs
  sharded = []
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    name = jax.tree_util.keystr(path)
    if expert_leaf(path):
      assert x.sharding.spec == P(EXPERT_AXIS), (name, x.sharding.spec)
      assert x.addressable_shards[0].data.shape == (x.shape[0] // 2,) + x.shape[1:], name
      sharded.append(name)
    else:
      assert x.sharding.is_fully_replicated, (name, x.sharding)
  assert any("['params']" in n and "'wi_0']" in n for n in sharded), sharded
  if method == "fedalign":  # LoRA adapters and the server Adam's moments of them
    assert any("['params']" in n and "wo_lora_b" in n for n in sharded), sharded
    assert any("['agg']" in n and "mu" in n and "wi_1_lora_a" in n for n in sharded), sharded


def test_aggregation_runs_on_sharded_deltas(runs):
  """In the compiled round no collective moves frozen expert weights, whole or gathered per
  block of routed rows: with expert parallelism each device multiplies the rows routed to its
  experts by the weights it holds, and only the (tokens, D) outputs are summed over
  'experts'. The aggregation's collectives move (E/2, ...) shards of the trainable expert
  leaves. (Inside the client's local loop XLA keeps the per-client trainable expert leaves,
  LoRA adapters here, whole: docs/scaling.md.)"""
  _, _, (run, state, _) = runs
  batches, weights, ids_in, _ = run.round_arrays(0)
  hlo = (
      run.round_fn.lower(state, batches, jnp.asarray(weights), jnp.asarray(ids_in), 0)
      .compile()
      .as_text()
  )
  leaves = [
      (x.shape, m)
      for (path, x), m in zip(
          jax.tree_util.tree_leaves_with_path(state["params"]), jax.tree.leaves(run.mask)
      )
      if expert_leaf(path)
  ]
  shard = lambda shape: (shape[0] // 2,) + shape[1:]
  dims = lambda shape: ",".join(map(str, shape))
  collectives = [
      l for l in hlo.splitlines() if re.search(r"(all-gather|all-reduce|all-to-all)(-start)?\(", l)
  ]
  frozen = [shape for shape, m in leaves if not m]
  trainable = [shape for shape, m in leaves if m]
  assert trainable and collectives
  if frozen:  # LoRA (FedAlign-MoE here); full fine-tuning (FedAvg) has no frozen expert leaf
    # (E, D, F) whole, (E/2, D, F) shards, or (clients, blocks, D, F) weights of routed blocks
    # (what the sparse path all-reduces without expert parallelism)
    moved = re.compile("|".join(rf"\[(\d+,)*{dims(s[1:])}\]" for s in frozen))
    assert not [l for l in collectives if moved.search(l)], [
        l[:300] for l in collectives if moved.search(l)
    ]
  # The deltas of the trainable expert leaves reach the aggregation as (E/2, ...) shards: an
  # all-reduce of the shards (FedAvg's weighted client sum) or an all-gather of the clients'
  # (C, E/2, ...) shards (FedAlign-MoE's per-expert weights: a scan over the clients).
  half = re.compile("|".join(rf"f32\[(\d+,)?{dims(shard(s))}\]" for s in trainable))
  assert any(half.search(l) for l in collectives), half.pattern


def test_default_mesh_is_one_clients_axis():
  c = load_config("configs/default.py:runlocal")
  c.train.use_mesh = True
  mesh = make_mesh(c)
  assert mesh.axis_names == ("clients",) and mesh.size == jax.device_count()
  c.train.mesh_shape = "experts:2"  # the clients axis takes the rest
  assert make_mesh(c).shape == {"clients": 4, "experts": 2}


@pytest.mark.parametrize(
    "use_mesh, shape, match",
    [
        (
            True,
            "clients:3,experts:2",
            r"mesh_shape='clients:3,experts:2' is invalid: expected axis sizes whose product is the device count, 8 \(got 6\)",
        ),
        (True, "clients:2,experts:4,", r"names from \('clients', 'experts'\)"),
        (
            True,
            "clients:4,model:2",
            r"names from \('clients', 'experts'\).*got the entry 'model:2'",
        ),
        (True, "clients:x", r"integer sizes \(got 'x' for 'clients'\)"),
        (True, "clients:-1,experts:-1", r"at most one size -1"),
        (
            True,
            "clients:1,experts:8",
            r"experts axis size that divides model.num_experts=4 \(got 8\)",
        ),
        (
            False,
            "clients:4,experts:2",
            r"mesh_shape='clients:4,experts:2' is invalid with train.use_mesh=False",
        ),
    ],
)
def test_bad_mesh_shape(use_mesh, shape, match):
  c = load_config("configs/default.py:runlocal")
  c.train.use_mesh, c.train.mesh_shape = use_mesh, shape
  with pytest.raises(ValueError, match=match):
    make_mesh(c)


def test_experts_axis_checked_against_the_loaded_model(tmp_path):
  """A model whose blocks' E the experts axis does not divide (the config's num_experts
  unknown beforehand, e.g. a checkpoint's): a ValueError naming the block."""
  from fedalign.federated.mesh import state_shardings

  c = load_config("configs/default.py:runlocal")
  c.train.use_mesh, c.train.mesh_shape = True, "clients:2,experts:4"
  mesh = make_mesh(c)
  params = {"moe": {"router": {"kernel": jnp.zeros((3, 6))}, "experts": {"w": jnp.zeros((6, 3))}}}
  with pytest.raises(ValueError, match=r"divides the 6 experts of MoE block 'moe' \(got 4\)"):
    state_shardings({"params": params}, mesh)
  assert parse_mesh_shape("clients:2,experts:4", 8) == {"clients": 2, "experts": 4}


@pytest.mark.slow  # ~2 min on 2 cores: two full runs with evaluation and a restart
def test_2d_mesh_resume_equals_uninterrupted(tmp_path):
  """run_experiment on the (4, 2) mesh, stopped after round 1 and resumed to round 3 (orbax
  restores the expert leaves into the template's 'experts' sharding), equals the
  uninterrupted (4, 2) run and the 1-device run."""
  import json

  def metrics(w):
    rows = [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
      r.pop("elapsed_s"), r.pop("round_time_s")
    return rows

  c = small_config("fedalign")
  c.train.rounds = 3
  run_experiment(c, tmp_path / "one")
  c.train.use_mesh, c.train.mesh_shape = True, "clients:4,experts:2"
  run_experiment(c, tmp_path / "full")
  c.train.rounds = 1
  run_experiment(c, tmp_path / "resumed")
  c.train.rounds = 3
  run_experiment(c, tmp_path / "resumed")
  one, full, resumed = (metrics(tmp_path / n) for n in ("one", "full", "resumed"))
  assert len(one) == len(full) == len(resumed) == 3
  for a, b, r in zip(one, full, resumed):
    assert b["test_accuracy"] == r["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=0.011)
    assert r["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=LOSS_RTOL)

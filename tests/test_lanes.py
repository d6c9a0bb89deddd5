"""Lanes (train.lanes): the lane round equals the padded round; the LPT schedule and layout.

The lane round packs the round's clients into L vmapped lanes that train their clients one
after another (fedalign.federated.round.lane_schedule / lane_batches, ClientUpdate.lanes);
every per-client output must be the padded vmapped round's: deltas, routing statistics,
losses, step counts, client states (SCAFFOLD) and the per-client rngs.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import golden_aggregates as g
from fedalign.algorithms import make_algorithm
from fedalign.config_files import load_config
from fedalign.data import partition as part
from fedalign.data.agnews import load_embedded_agnews
from fedalign.federated.client import make_client_update
from fedalign.federated.config_checks import validate_config
from fedalign.federated.round import (
    CLIENT_AXIS,
    choose_lanes,
    client_rngs,
    init_server_state,
    lane_batches,
    lane_schedule,
    make_round_fn,
)
from fedalign.models.lora import partition, trainable_mask
from test_engine import make_config

NUM_CLIENTS = 6  # the population (SCAFFOLD keeps 6 control variates)
IDS = np.array([2, 0, 4, 1, 2])  # the last row: a weight-0 padding copy of client 2
WEIGHTS = np.array([3.0, 1.0, 2.0, 5.0, 0.0], np.float32)


class NoisyLinearTask:
  """Least squares with rng noise on the targets (so a wrong per-step rng changes the deltas)
  and a params-dependent 'routing' statistic (so a wrong accumulation changes the stats)."""

  def loss(self, params, batch, rng):
    noise = 0.1 * jax.random.normal(rng, batch["y"].shape)
    err = batch["x"] @ params["w"] - batch["y"] + noise
    zero = jnp.zeros((), jnp.float32)
    stats = {"blk": {"pred_sum": jnp.sum(batch["x"] @ params["w"]), "n": jnp.ones(())}}
    return 0.5 * jnp.mean(err**2), {
        "routing": stats,
        "load_balance_loss": zero,
        "router_z_loss": zero,
    }


def unequal_batches(seed=0):
  """5 clients of 4, 1, 3 (with a hole), 2 and 0 (the weight-0 padding row) real steps."""
  rng = np.random.default_rng(seed)
  c, s = len(IDS), 4
  x = rng.normal(size=(c, s, 4, 3)).astype(np.float32)
  y = rng.normal(size=(c, s, 4)).astype(np.float32)
  mask = np.zeros((c, s), bool)
  mask[0, :4] = True
  mask[1, :1] = True
  mask[2, [0, 2, 3]] = True  # a masked step between real ones
  mask[3, :2] = True
  return {"x": x, "y": y, "step_mask": mask}


def linear_setup(method):
  params = {"w": jnp.array([0.5, -1.0, 2.0], jnp.float32)}
  mask = {"w": True}
  alg = make_algorithm(make_config(method), partition(params, mask)[0], NUM_CLIENTS)
  # AdamW: a lane must also restart the optimizer state at each client's first step.
  cu = make_client_update(NoisyLinearTask(), alg, optax.adamw(0.05), load_balance_coef=0.0)
  return params, mask, alg, cu


def run_rounds(method, batches, num_lanes=None, rounds=2, mesh=None):
  params, mask, alg, cu = linear_setup(method)
  rf = jax.jit(make_round_fn(cu, alg, mask, seed=0, lanes=num_lanes is not None, mesh=mesh))
  if num_lanes is not None:
    batches = lane_batches(batches, lane_schedule(batches["step_mask"].sum(1), num_lanes))
  state = init_server_state(params, alg, mask, NUM_CLIENTS)
  outs = []
  for r in range(rounds):
    state, out = rf(state, batches, jnp.asarray(WEIGHTS), jnp.asarray(IDS), r)
    outs.append(out)
  return state, outs


def assert_trees_close(a, b, rtol=1e-6, atol=1e-6):
  """Leaf by leaf; ``atol`` is relative to the leaf's scale (sums of routing statistics reach
  ~1e3, where float32 rounding alone is ~1e-4)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    scale = max(1.0, float(np.max(np.abs(y)))) if y.size and y.dtype.kind == "f" else 1.0
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale)


# ---------------------------------------------------------------------------------------------
# The client outputs: ClientUpdate.lanes == vmap(ClientUpdate) of the padded batches.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [
        pytest.param("fedavg", marks=pytest.mark.slow),
        pytest.param("fedprox", marks=pytest.mark.slow),
    ]
    + ["scaffold"],
)
def test_lane_client_outputs_equal_vmapped_padded_clients(method):
  params, mask, alg, cu = linear_setup(method)
  b = unequal_batches()
  rng = np.random.default_rng(1)
  trainable = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
  frozen = partition(params, mask)[1]
  if method == "scaffold":  # non-zero server and client control variates
    broadcast = {"control": {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}}
    cstates = {"w": jnp.asarray(rng.normal(size=(len(IDS), 3)), jnp.float32)}
  else:
    broadcast, cstates = {}, jnp.zeros((len(IDS),), jnp.float32)
  rngs = client_rngs(0, 3, jnp.asarray(IDS))
  ref = jax.jit(jax.vmap(cu, in_axes=(None, None, 0, None, 0, 0)))(
      trainable, frozen, b, broadcast, cstates, rngs
  )
  deltas, stats, metrics, new_states = ref
  assert np.asarray(metrics["num_steps"]).tolist() == [4, 1, 3, 2, 0]
  assert np.all(np.asarray(deltas["w"][4]) == 0) and float(stats["blk"]["n"][4]) == 0
  assert np.all(np.abs(np.asarray(deltas["w"][:4])) > 0)
  if method == "scaffold":  # c_i+ = c_i - c - delta / (K lr) after a step; unchanged at 0
    np.testing.assert_array_equal(new_states["w"][4], cstates["w"][4])
    assert np.all(np.asarray(new_states["w"][:4]) != np.asarray(cstates["w"][:4]))
  lanes_fn = jax.jit(cu.lanes)
  for num_lanes in (1, 2, len(IDS)):
    lb = lane_batches(b, lane_schedule(b["step_mask"].sum(1), num_lanes))
    assert lb["x"].shape[:2] == (num_lanes, {1: 10, 2: 5, 5: 4}[num_lanes])
    got = lanes_fn(trainable, frozen, lb, broadcast, cstates, rngs)
    assert_trees_close(got, ref)


def test_lane_client_outputs_depend_on_the_rngs():
  """The comparison above can fail: other client rngs give other deltas."""
  params, mask, _, cu = linear_setup("fedavg")
  trainable, frozen = partition(params, mask)
  b = unequal_batches()
  lb = lane_batches(b, lane_schedule(b["step_mask"].sum(1), 2))
  cst = jnp.zeros((len(IDS),))
  a = cu.lanes(trainable, frozen, lb, {}, cst, client_rngs(0, 3, jnp.asarray(IDS)))
  other = cu.lanes(trainable, frozen, lb, {}, cst, client_rngs(0, 4, jnp.asarray(IDS)))
  assert np.max(np.abs(np.asarray(a[0]["w"][:4] - other[0]["w"][:4]))) > 1e-4


# ---------------------------------------------------------------------------------------------
# The round: lanes == padded (server state, client states, metrics) over two rounds.
# ---------------------------------------------------------------------------------------------


_REF = {}
DEFAULT_CASES = {("fedavg", 1), ("fedprox", 2), ("scaffold", 5)}  # each method, each lane count


@pytest.mark.parametrize(
    "method, num_lanes",
    [
        pytest.param(m, n, marks=() if (m, n) in DEFAULT_CASES else pytest.mark.slow)
        for m in ("fedavg", "fedprox", "scaffold")
        for n in (1, 2, len(IDS))
    ],
)
def test_lane_round_equals_padded_round(method, num_lanes):
  b = unequal_batches(seed=2)
  if method not in _REF:
    _REF[method] = run_rounds(method, b)
  ref_state, ref_outs = _REF[method]
  state, outs = run_rounds(method, b, num_lanes)
  assert_trees_close(state, ref_state)
  assert_trees_close(outs, ref_outs)
  assert np.asarray(ref_outs[0]["client_steps"]).tolist() == [4, 1, 3, 2, 0]
  if method == "scaffold":  # every participant stored its c_i, the padding row none
    ci = np.asarray(ref_state["client_states"]["w"])
    assert np.all(np.abs(ci[[2, 0, 4, 1]]) > 0) and np.all(ci[[3, 5]] == 0)


def test_lane_round_on_a_mesh_of_eight_devices_equals_padded_round():
  assert len(jax.devices()) == 8, "conftest requests 8 fake CPU devices"
  mesh = jax.sharding.Mesh(np.array(jax.devices()), (CLIENT_AXIS,))
  b = unequal_batches(seed=4)
  ref_state, ref_outs = run_rounds("fedavg", b, rounds=1)
  state, outs = run_rounds("fedavg", b, num_lanes=8, rounds=1, mesh=mesh)
  assert_trees_close(state, ref_state, atol=2e-6)
  assert_trees_close(outs, ref_outs, atol=2e-6)


def test_lanes_and_chunks_are_exclusive():
  _, mask, alg, cu = linear_setup("fedavg")
  with pytest.raises(ValueError, match="lanes replace chunks"):
    make_round_fn(cu, alg, mask, seed=0, chunk_size=2, lanes=True)
  with pytest.raises(ValueError, match="needs the ClientUpdate"):
    make_round_fn(cu.update, alg, mask, seed=0, lanes=True)


# ---------------------------------------------------------------------------------------------
# FedAlign-MoE on the tiny MoE: routing statistics accumulated per client, p_g broadcast.
# ---------------------------------------------------------------------------------------------

_MOE = {}


def moe_setup():
  from fedalign.federated.task import CausalLMTask
  from fedalign.models import build_module

  config = g.base_config("fedalign", "full", {})
  cfg, params, batches = g.model_and_batches(False)
  mask = trainable_mask(params, "full")
  alg = make_algorithm(config, partition(params, mask)[0], 4)
  cu = make_client_update(CausalLMTask(build_module(cfg)), alg, optax.sgd(0.05))
  step_mask = np.zeros((4, 3), bool)
  step_mask[0], step_mask[1, :1], step_mask[2, :2] = True, True, True  # 3, 1, 2, 0 steps
  _MOE["setup"] = (params, mask, alg, cu, dict(batches, step_mask=step_mask))


def moe_round(num_lanes):
  if "setup" not in _MOE:
    moe_setup()
  params, mask, alg, cu, batches = _MOE["setup"]
  if num_lanes is not None:
    batches = lane_batches(batches, lane_schedule(batches["step_mask"].sum(1), num_lanes))
  rf = jax.jit(make_round_fn(cu, alg, mask, seed=0, lanes=num_lanes is not None))
  state = init_server_state(params, alg, mask, 4)
  weights, ids = jnp.array([10.0, 30.0, 20.0, 0.0]), jnp.array([0, 1, 2, 0])
  outs = []
  for r in range(2):  # the second round regularizes towards the first round's p_g
    state, out = rf(state, batches, weights, ids, r)
    outs.append(out)
  return state, outs


@pytest.mark.slow  # ~30 s of compilation (two MoE programs) on 2 shared cores, up to 60 s
def test_fedalign_moe_lane_clients_equal_vmapped_padded_clients():
  """Client level (no aggregation to compile): deltas, per-client routing statistics (summed
  over each client's own real steps only), losses and step counts, 2 lanes. The default run
  covers the same accumulation on the linear task's statistics."""
  if "setup" not in _MOE:
    moe_setup()
  params, mask, alg, cu, batches = _MOE["setup"]
  trainable, frozen = partition(params, mask)
  broadcast = alg.broadcast(alg.aggregator.init(params))
  cstates, rngs = jnp.zeros((4,)), client_rngs(0, 1, jnp.array([0, 1, 2, 0]))
  ref = jax.jit(jax.vmap(cu, in_axes=(None, None, 0, None, 0, 0)))(
      trainable, frozen, batches, broadcast, cstates, rngs
  )
  assert np.asarray(ref[2]["num_steps"]).tolist() == [3, 1, 2, 0]
  counts = [np.asarray(blk["token_count"]) for blk in ref[1].values()]
  assert counts and all(np.all(c[:3] > 0) and c[3] == 0 for c in counts)
  lb = lane_batches(batches, lane_schedule(batches["step_mask"].sum(1), 2))
  got = jax.jit(cu.lanes)(trainable, frozen, lb, broadcast, cstates, rngs)
  assert_trees_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("num_lanes", [1, 2, 4])
def test_fedalign_moe_lane_round_equals_padded_round(num_lanes):
  if "ref" not in _MOE:
    _MOE["ref"] = moe_round(None)
  ref_state, ref_outs = _MOE["ref"]
  assert np.asarray(ref_outs[0]["client_steps"]).tolist() == [3, 1, 2, 0]
  counts = [np.asarray(blk["token_count"]) for blk in ref_outs[1]["routing_stats"].values()]
  assert counts and all(np.all(c[:3] > 0) and c[3] == 0 for c in counts)
  state, outs = moe_round(num_lanes)
  assert_trees_close(state, ref_state, rtol=1e-5, atol=1e-6)
  assert_trees_close(outs, ref_outs, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The schedule (pure numpy).
# ---------------------------------------------------------------------------------------------


def check_schedule(steps, s):
  """Every client's steps 0..n-1 once, contiguous in one lane, first/last flags right."""
  for c, n in enumerate(steps):
    where = np.argwhere(s.valid & (s.client == c))
    assert len(where) == n
    if n == 0:
      continue
    lanes_of_c = set(where[:, 0].tolist())
    assert len(lanes_of_c) == 1
    lane = lanes_of_c.pop()
    slots = where[:, 1]
    assert np.all(np.diff(slots) == 1)
    assert s.step[lane, slots].tolist() == list(range(n))
    assert s.first[lane, slots].tolist() == [True] + [False] * (n - 1)
    assert s.last[lane, slots].tolist() == [False] * (n - 1) + [True]
  assert not np.any((s.first | s.last) & ~s.valid)
  for lane in range(s.num_lanes):  # a lane's valid slots come first
    v = s.valid[lane]
    assert np.all(v[: v.sum()])


def test_lpt_schedule_is_valid_and_within_four_thirds_of_the_optimum():
  rng = np.random.default_rng(0)
  for _ in range(40):
    c, num_lanes = int(rng.integers(1, 8)), int(rng.integers(1, 4))
    steps = rng.integers(0, 12, size=c)
    s = lane_schedule(steps, num_lanes)
    check_schedule(steps, s)
    best = min(
        max(np.bincount(assign, weights=steps, minlength=num_lanes))
        for assign in itertools.product(range(num_lanes), repeat=c)
    )
    assert s.num_slots <= math.ceil(4 / 3 * best) and s.num_slots >= best
  assert lane_schedule([0, 0], 2).num_slots == 0 and lane_schedule([0, 0], 2).valid.shape == (2, 1)


def test_lane_batches_place_each_real_step_and_zero_the_rest():
  b = unequal_batches()
  s = lane_schedule(b["step_mask"].sum(1), 2, num_slots=7)
  lb = lane_batches(b, s)
  assert lb["x"].shape == (2, 7, 4, 3) and s.num_slots == 5
  for lane, slot in itertools.product(range(2), range(7)):
    if not s.valid[lane, slot]:
      assert np.all(lb["x"][lane, slot] == 0) and not lb["step_mask"][lane, slot]
      continue
    c, i = s.client[lane, slot], lb["lane_step"][lane, slot]
    assert b["step_mask"][c, i]  # a real step of that client, at its padded index
    np.testing.assert_array_equal(lb["x"][lane, slot], b["x"][c, i])
    np.testing.assert_array_equal(lb["y"][lane, slot], b["y"][c, i])
  hole = lb["lane_step"][s.valid & (s.client == 2)]
  assert hole.tolist() == [0, 2, 3]
  with pytest.raises(ValueError, match="differ from the batches"):
    lane_batches(b, lane_schedule([4, 1, 3, 2, 1], 2))
  with pytest.raises(ValueError, match="num_slots=3 < 5"):
    lane_schedule(b["step_mask"].sum(1), 2, num_slots=3)


def dirichlet_steps(seed):
  """Local steps of the default config's clients: Dirichlet(0.1), 10 clients, 1 epoch of
  batches of 32 on the embedded AG News training rows (configs/default.py)."""
  cfg = load_config("configs/default.py")
  labels = np.asarray(load_embedded_agnews()[0].label)
  clients = part.dirichlet_partition(labels, 10, 0.1, seed, min_size=cfg.data.min_client_size)
  return np.array([math.ceil(len(c) / cfg.train.batch_size) for c in clients])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chosen_lanes_keep_nine_tenths_of_the_steps_useful_at_any_lane_count(seed):
  steps = dirichlet_steps(seed)
  total, longest = steps.sum(), steps.max()
  assert total / (10 * longest) < 0.55  # all 10 clients padded to the longest: mostly waste
  slots = []
  for max_lanes in range(1, 11):
    n = choose_lanes(steps, max_lanes)
    s = lane_schedule(steps, n)
    check_schedule(steps, s)
    assert n <= max_lanes and s.useful == total
    assert s.useful_fraction >= 0.9, (max_lanes, n, s.useful_fraction)
    slots.append(s.num_slots)
    if max_lanes <= 4:  # balanced: within 10% of a perfect split (or of the longest client)
      assert s.num_slots <= 1.1 * max(longest, math.ceil(total / max_lanes)), (max_lanes, n)
  assert slots[0] == total and all(b <= a for a, b in zip(slots, slots[1:]))  # never slower
  # Exactly 10 lanes would leave 9 lanes idle most of the time (one client each).
  assert lane_schedule(steps, 10).useful_fraction < 0.55


def test_choose_lanes_options_and_errors():
  steps = [74, 54, 8, 7, 8, 24, 29, 54, 40, 10]
  assert choose_lanes(steps, 10, min_useful=0.0) == 5  # fewest lanes reaching 74 slots
  assert choose_lanes(steps, 10, min_useful=1.0) == 2  # 154 + 154: no slot wasted
  assert lane_schedule(steps, 2).useful_fraction == 1.0
  assert choose_lanes(steps, 8, multiple_of=4) == 4
  assert choose_lanes([5, 5, 5, 5], 4) == 4 and choose_lanes([5, 5, 5], 4) == 3
  assert choose_lanes([0, 0, 0], 4) == 1
  with pytest.raises(ValueError, match="multiple of multiple_of=4"):
    choose_lanes(steps, 6, multiple_of=4)
  with pytest.raises(ValueError, match="min_useful"):
    choose_lanes(steps, 2, min_useful=1.5)


# ---------------------------------------------------------------------------------------------
# Config and Run.
# ---------------------------------------------------------------------------------------------


def test_config_checks_of_lanes():
  cfg = load_config("configs/default.py:runlocal")
  assert cfg.train.lanes == 0
  cfg.train.chunk_size = 0
  cfg.train.lanes = 3
  validate_config(cfg)
  cfg.train.lanes = -1
  with pytest.raises(ValueError, match=r"config.train.lanes=-1 is invalid"):
    validate_config(cfg)
  cfg.train.lanes, cfg.train.chunk_size = 3, 2
  with pytest.raises(ValueError, match=r"config.train.chunk_size=2 is invalid.*lanes replace"):
    validate_config(cfg)
  cfg.train.chunk_size, cfg.train.lanes_min_useful = 0, 1.5
  with pytest.raises(ValueError, match=r"config.train.lanes_min_useful=1.5 is invalid"):
    validate_config(cfg)


@pytest.mark.slow
def test_run_with_lanes_equals_the_padded_round(tmp_path):
  """build_run with train.lanes: a sampled round (6 of 10 clients, one epoch) in lanes."""
  from fedalign.federated.run import build_run

  cfg = load_config("configs/default.py:runlocal")
  cfg.data.tokenizer = "bytes"
  cfg.train.update(local_steps=0, local_epochs=1, clients_per_round=6, chunk_size=0, lanes=3)
  validate_config(cfg)
  run = build_run(cfg, tmp_path)
  batches, weights, ids_in, ids = run.round_inputs(0)
  assert "lane_client" in batches and np.array_equal(ids_in, ids) and len(ids) == 6
  steps = run.data.round_batches(cfg, ids, 0)["step_mask"].sum(1)
  assert batches["x" if "x" in batches else "tokens"].shape[0] == run.round_lanes(steps)
  # Sampled clients: the slot axis is padded to the run's bound (one shape per lane count).
  assert batches["step_mask"].shape[1] >= batches["step_mask"].sum(1).max()
  state, out = run.round_fn(run.initial_state, batches, weights, ids_in, 0)
  padded = jax.jit(make_round_fn(run.client_update, run.algorithm, run.mask, seed=cfg.seed))
  ref_state, ref_out = padded(
      run.initial_state, run.data.round_batches(cfg, ids, 0), weights, ids, 0
  )
  assert np.asarray(out["client_steps"]).tolist() == steps.tolist()
  assert_trees_close(state, ref_state, rtol=1e-5, atol=1e-6)
  assert_trees_close(out, ref_out, rtol=1e-5, atol=1e-6)

"""moe_impl='sparse' (block-sparse, dropless) equals moe_impl='dense' (every expert on every
token): layout invariants, logits and gradients, LoRA on experts, degenerate routing, vmap over
clients, the chunked federated round, the 8-device mesh, bfloat16, and the config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import golden_aggregates as g
from fedalign.algorithms import make_algorithm
from fedalign.config_files import load_config
from fedalign.federated.client import make_client_update
from fedalign.federated.config_checks import validate_config
from fedalign.federated.round import CLIENT_AXIS, init_server_state, make_round_fn
from fedalign.federated.task import CausalLMTask
from fedalign.models import build_module, family_config
from fedalign.models.lora import partition, trainable_mask
from fedalign.models.moe import MoEBlock, sharded_sparse_layout, sparse_blocks, sparse_layout


def block_cfg(family="mixtral", **kw):
  fields = dict(
      vocab_size=32,
      hidden_size=8,
      num_heads=1,
      num_kv_heads=1,
      num_experts=4,
      top_k=2,
      moe_intermediate_size=6,
      moe_block_size=4,
  )
  fields.update(kw)
  return family_config(family, **fields)


def random_params(module, *args, seed=0, std=0.25):
  """Random params of ``module`` without compiling its init: normal(0, std) leaves (LoRA B
  included, so adapters change the output), norm scales around 1."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, s: jnp.asarray(
          rng.normal(float("scale" in jax.tree_util.keystr(p)), std, s.shape), s.dtype
      ),
      shapes,
  )


def random_block_params(cfg, x, mask, seed=0):
  return random_params(MoEBlock(cfg), x, mask, seed=seed)


def block_loss(cfg):
  """Sum of squares of the block's output on valid tokens + its load-balancing loss."""

  def loss(params, x, mask):
    out, _, losses = MoEBlock(cfg).apply({"params": params}, x, mask)
    valid = mask[..., None].astype(jnp.float32)
    return jnp.sum((out.astype(jnp.float32) * valid) ** 2) + losses["load_balance_loss"], out

  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def assert_trees_close(a, b, tol):
  """Every leaf within ``tol`` x max(1, the leaf's largest magnitude) (float32 sums in another
  order differ in the last bits, relative to the leaf's scale)."""
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    atol = tol * max(1.0, float(np.abs(y).max()))
    np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize(
    "tokens,experts,k,block,routing",
    [
        (13, 4, 2, 4, "random"),
        (13, 4, 2, 3, "random"),
        (13, 4, 1, 64, "random"),  # fewer rows than a block
        (16, 4, 1, 4, "one_expert"),  # experts 1..3 get no rows
        (9, 5, 5, 2, "random"),  # top_k = E: every expert gets every token
        (40, 8, 2, 1, "random"),
    ],
)
def test_layout_holds_every_row_once_in_a_block_of_its_expert(tokens, experts, k, block, routing):
  rng = np.random.default_rng(tokens * experts + k)
  if routing == "one_expert":
    top_idx = np.zeros((tokens, k), np.int32)
  else:
    top_idx = np.stack([rng.permutation(experts)[:k] for _ in range(tokens)]).astype(np.int32)
  dest, src, block_expert = jax.jit(sparse_layout, static_argnums=(1, 2))(top_idx, experts, block)
  dest, src, block_expert = map(np.asarray, (dest, src, block_expert))
  b, nb = sparse_blocks(tokens * k, experts, block)
  assert src.shape == (nb * b,) and block_expert.shape == (nb,)
  assert len(np.unique(dest)) == tokens * k  # no row dropped or overwritten
  np.testing.assert_array_equal(src[dest], np.repeat(np.arange(tokens), k).reshape(tokens, k))
  np.testing.assert_array_equal(block_expert[dest // b], top_idx)  # each row in its expert
  assert np.sum(src < tokens) == tokens * k  # every other row is padding
  # Blocks of an expert are contiguous, experts in order, and no expert has an empty block.
  used = np.unique(dest // b)
  assert np.all(np.diff(block_expert[used]) >= 0)
  assert len(used) == sum(-(-np.sum(top_idx == e) // b) for e in range(experts))


def test_block_count_bound_is_tight_and_static():
  # Worst case for 8 experts and blocks of 4: 7 experts with 1 row, one with the rest.
  rows, e, b = 40, 8, 4
  worst = sum(-(-c // b) for c in [1] * 7 + [rows - 7])
  assert sparse_blocks(rows, e, b) == (b, worst) == (4, 16)
  rng = np.random.default_rng(0)
  for _ in range(200):  # no routing needs more
    counts = np.bincount(rng.integers(0, e, rows), minlength=e)
    assert sum(-(-c // b) for c in counts) <= 16
  assert sparse_blocks(3072, 8, 64) == (64, 47 + 8)
  assert sparse_blocks(5, 8, 64) == (5, 5)  # more experts than rows: one row per block
  assert sparse_blocks(40, 8, 1) == (1, 40)


@pytest.mark.parametrize("shards,routing", [(2, "random"), (4, "random"), (2, "one_expert")])
def test_sharded_layout_puts_each_row_in_its_experts_shard_once(shards, routing):
  tokens, experts, k, block = 13, 8, 2, 3
  rng = np.random.default_rng(shards)
  if routing == "one_expert":  # every row on shard 1: a shard's buffer holds all of them
    top_idx = np.stack([[5, 4]] * tokens).astype(np.int32)
  else:
    top_idx = np.stack([rng.permutation(experts)[:k] for _ in range(tokens)]).astype(np.int32)
  fn = jax.jit(sharded_sparse_layout, static_argnums=(1, 2, 3))
  dest, src, block_expert = map(np.asarray, fn(top_idx, experts, shards, block))
  b, nb = sparse_blocks(tokens * k, experts // shards, block)
  assert dest.shape == (shards, tokens, k) and src.shape == (shards, nb * b)
  per = experts // shards
  inside = dest < nb * b
  np.testing.assert_array_equal(inside, np.arange(shards)[:, None, None] == top_idx // per)
  for s in range(shards):
    d = dest[s][inside[s]]
    assert len(np.unique(d)) == len(d)  # no row overwritten
    np.testing.assert_array_equal(src[s][d], np.nonzero(inside[s])[0])  # its token
    np.testing.assert_array_equal(block_expert[s][d // b], top_idx[inside[s]] % per)
    assert np.sum(src[s] < tokens) == len(d)  # the rest is padding


@pytest.mark.parametrize(
    "family,shards,forced",
    [("mixtral", 2, False), ("mixtral", 4, True), ("qwen2_moe", 2, False)],
)
def test_expert_shards_equal_dense_outputs_and_gradients(family, shards, forced):
  """Expert parallelism (MoEConfig.expert_shards) computes the same function: LoRA on the
  experts, a gated shared expert (qwen2_moe), all tokens on one shard (forced)."""
  cfg = block_cfg(
      family, num_experts=8, lora_rank=2, lora_targets=("experts",), norm_topk_prob=not forced
  )
  if family == "qwen2_moe":
    cfg = cfg.replace(shared_expert_intermediate_size=6)
  x = jax.random.normal(jax.random.key(1), (2, 7, 8))
  mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], bool)
  params = random_block_params(cfg, x, mask)
  if forced:
    x = jnp.abs(x) + 0.1
    params["router"]["kernel"] = jnp.zeros((8, 8)).at[:, 6].set(5.0).at[0, 7].set(0.5)
  (l_s, out_s), g_s = jax.jit(block_loss(cfg.replace(expert_shards=shards)))(params, x, mask)
  (l_d, out_d), g_d = jax.jit(block_loss(cfg.replace(moe_impl="dense")))(params, x, mask)
  np.testing.assert_allclose(out_s, out_d, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(l_s, l_d, rtol=1e-6)
  assert_trees_close(g_s, g_d, 1e-5)
  assert float(jnp.abs(out_d).max()) > 0.1
  with pytest.raises(
      ValueError,
      match=r"expert_shards=3 is invalid: expected a positive " r"divisor of num_experts=8",
  ):
    cfg.replace(expert_shards=3)
  with pytest.raises(ValueError, match=r"expert_shards=2 is invalid: expected 1 unless"):
    cfg.replace(expert_shards=2, moe_impl="dense")


# ----------------------------------------------------------------------------- one block


@pytest.mark.parametrize("top_k,forced", [(4, False), (1, True), (2, True)])
def test_block_sparse_equals_dense_outputs_and_gradients(top_k, forced):
  """Random routing with top_k = E (every expert gets every token), and a router kernel that
  sends every token to expert 2 first (with top_k = 2 the second choice is expert 1): one
  expert's group spans several blocks, the others get no row."""
  cfg = block_cfg(top_k=top_k, norm_topk_prob=not forced)
  x = jax.random.normal(jax.random.key(1), (2, 7, 8))
  mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], bool)
  params = random_block_params(cfg, x, mask)
  if forced:
    x = jnp.abs(x) + 0.1
    params["router"]["kernel"] = jnp.zeros((8, 4)).at[:, 2].set(5.0).at[0, 1].set(0.5)
  (l_s, out_s), g_s = jax.jit(block_loss(cfg))(params, x, mask)
  (l_d, out_d), g_d = jax.jit(block_loss(cfg.replace(moe_impl="dense")))(params, x, mask)
  # Padded tokens are routed too: the outputs agree at every position.
  np.testing.assert_allclose(out_s, out_d, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(l_s, l_d, rtol=1e-6)
  assert_trees_close(g_s, g_d, 1e-5)
  assert float(jnp.abs(out_d).max()) > 0.1
  expert_grad = np.abs(np.asarray(g_s[0]["experts"]["wi_0"])).max(axis=(1, 2))
  used = {1: [2], 2: [1, 2], 4: [0, 1, 2, 3]}[top_k]
  assert np.all(expert_grad[used] > 0)
  assert np.all(np.delete(expert_grad, used) == 0.0)  # experts without tokens: no gradient


def test_vmap_of_gradient_over_clients():
  """vmap(grad) over a client axis (per-client params and data), as in the federated round;
  jax.lax.ragged_dot cannot do this (NotImplementedError in jax 0.10)."""
  cfg = block_cfg(lora_rank=2, lora_targets=("experts",))
  x = jax.random.normal(jax.random.key(3), (3, 2, 5, 8))
  mask = jnp.ones((3, 2, 5), bool).at[1, 0, 3:].set(False)
  per_client = [random_block_params(cfg, x[0], mask[0], seed=s) for s in range(3)]
  params = jax.tree.map(lambda *a: jnp.stack(a), *per_client)

  def run(c):
    return jax.jit(jax.vmap(block_loss(c)))(params, x, mask)

  (l_s, out_s), g_s = run(cfg)
  (l_d, out_d), g_d = run(cfg.replace(moe_impl="dense"))
  np.testing.assert_allclose(out_s, out_d, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(l_s, l_d, rtol=1e-6)
  assert_trees_close(g_s, g_d, 1e-5)
  assert float(jnp.std(l_d)) > 0  # clients differ


def test_bfloat16_runs_and_is_close():
  """bfloat16 parameters and compute (router float32) against the float32 dense reference."""
  cfg = block_cfg(dtype="bfloat16", param_dtype="bfloat16", lora_rank=2)
  x = jax.random.normal(jax.random.key(4), (2, 7, 8)).astype(jnp.bfloat16)
  mask = jnp.ones((2, 7), bool)
  params = random_block_params(cfg, x, mask)
  (_, out), grads = jax.jit(block_loss(cfg))(params, x, mask)
  ref_cfg = cfg.replace(dtype="float32", param_dtype="float32", moe_impl="dense")
  f32 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float32), t)
  (_, out_ref), grads_ref = jax.jit(block_loss(ref_cfg))(f32(params), f32(x), mask)
  assert out.dtype == jnp.bfloat16 and grads[0]["experts"]["wi_0"].dtype == jnp.bfloat16
  scale = float(jnp.abs(out_ref).max())
  assert scale > 0.1
  np.testing.assert_allclose(f32(out), out_ref, atol=0.03 * scale)
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(f32(grads)), jax.tree.leaves(grads_ref)
  ):
    b = np.asarray(b)
    np.testing.assert_allclose(
        a, b, atol=0.05 * (np.abs(b).max() + 1e-3), err_msg=jax.tree_util.keystr(path)
    )


# ----------------------------------------------------------------------------- model


def tiny_decoder_config(**overrides):
  """A 1-layer Mixtral-family decoder with LoRA, 4 experts top-2 (the decoder/round tests)."""
  kw = dict(
      vocab_size=32,
      hidden_size=8,
      intermediate_size=12,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      num_experts=4,
      top_k=2,
      moe_intermediate_size=6,
      lora_rank=2,
  )
  return family_config("mixtral", **{**kw, **overrides})


def test_decoder_logits_and_gradients_equal_dense():
  cfg = tiny_decoder_config(moe_block_size=4)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 6)), jnp.int32)
  mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2], bool)
  params = random_params(build_module(cfg), ids, mask)
  batch = {"tokens": ids, "mask": mask, "target_mask": mask}

  def fn(c):
    module = build_module(c)

    def loss(p):  # the training loss, with the logits on the side
      return (
          CausalLMTask(module).loss(p, batch, jax.random.key(0))[0],
          module.apply({"params": p}, ids, mask)[0],
      )

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (loss_s, logits_s), g_s = fn(cfg)
  (loss_d, logits_d), g_d = fn(cfg.replace(moe_impl="dense"))
  np.testing.assert_allclose(logits_s, logits_d, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(loss_s, loss_d, rtol=1e-6)
  assert_trees_close(g_s, g_d, 1e-5)
  assert float(jnp.abs(g_s["layers_0"]["mlp"]["experts"]["wo_lora_b"]).max()) > 1e-4


# ----------------------------------------------------------------------------- rounds


def tiny_round_setup(num_clients, moe_impl):
  cfg = tiny_decoder_config(
      lora_targets=("experts",),
      moe_block_size=4,
      moe_impl=moe_impl,
  )
  ids = jnp.zeros((2, 6), jnp.int32)
  params = random_params(build_module(cfg), ids, ids > 0, seed=1, std=0.1)
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, 32, size=(num_clients, 2, 2, 6)).astype(np.int32)
  tokens = (tokens % 8 + 8 * (np.arange(num_clients) % 4)[:, None, None, None]).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  mask[1, :, :, 4:] = False
  step_mask = np.ones((num_clients, 2), bool)
  step_mask[0, 1] = False
  batches = {"tokens": tokens, "mask": mask, "target_mask": mask, "step_mask": step_mask}
  return cfg, params, batches


def run_round(num_clients, moe_impl, method="fedavg", chunk_size=None, mesh=None):
  """One round (LoRA on the experts, routers trained; local SGD)."""
  cfg, params, batches = tiny_round_setup(num_clients, moe_impl)
  mask = trainable_mask(params, "lora")
  config = g.base_config(method, "lora", {})
  alg = make_algorithm(config, partition(params, mask)[0], num_clients)
  cu = make_client_update(CausalLMTask(build_module(cfg)), alg, optax.sgd(0.5))
  rf = jax.jit(make_round_fn(cu, alg, mask, seed=0, chunk_size=chunk_size, mesh=mesh))
  state = init_server_state(params, alg, mask, num_clients)
  weights = jnp.arange(1.0, num_clients + 1.0)
  state, out = rf(state, batches, weights, jnp.arange(num_clients), 0)
  return state["params"], out


@pytest.mark.slow  # ~22 s CPU
def test_chunked_round_sparse_equals_dense():
  """Chunks of 2 of 4 clients (lax.map over vmapped chunks). The default run keeps the vmap
  test above; its rounds run 'sparse' too (the default) and tests/test_golden.py compares
  them with golden numbers computed with 'dense'."""
  p_s, out_s = run_round(4, "sparse", chunk_size=2)
  p_d, out_d = run_round(4, "dense", chunk_size=2)
  assert_trees_close(p_s, p_d, 1e-5)
  np.testing.assert_allclose(out_s["train_loss"], out_d["train_loss"], rtol=1e-5)
  p0 = tiny_round_setup(4, "sparse")[1]
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), p_s, p0)
  assert max(jax.tree.leaves(moved)) > 1e-3  # the round did train something


@pytest.mark.slow  # ~25 s CPU
def test_mesh_round_sparse_equals_dense():
  """FedAlign-MoE's round with the client axis sharded over conftest's 8 fake CPU devices."""
  assert len(jax.devices()) == 8, "conftest requests 8 fake CPU devices"
  mesh = jax.sharding.Mesh(np.array(jax.devices()), (CLIENT_AXIS,))
  p_s, _ = run_round(8, "sparse", "fedalign", mesh=mesh)
  p_d, _ = run_round(8, "dense", "fedalign", mesh=mesh)
  assert_trees_close(p_s, p_d, 1e-5)


# ----------------------------------------------------------------------------- configs


def test_default_config_is_dropless_sparse():
  from fedalign.models.from_config import model_config_from

  c = load_config("configs/default.py")
  validate_config(c)
  m = model_config_from(c, 1024)
  assert (m.moe_impl, m.capacity_factor, m.moe_block_size) == ("sparse", None, 64)


@pytest.mark.parametrize(
    "field,value,match",
    [
        (
            "moe_impl",
            "ragged",
            r"config\.model\.moe_impl='ragged' is invalid: expected one of "
            r"\('sparse', 'dense'\) in federated runs",
        ),
        ("moe_impl", "grouped", r"config\.model\.moe_impl='grouped' is invalid"),
        ("moe_block_size", 0, r"config\.model\.moe_block_size=0 is invalid: expected a positive"),
        ("capacity_factor", -1.0, r"config\.model\.capacity_factor=-1\.0 is invalid"),
    ],
)
def test_federated_config_checks(field, value, match):
  c = load_config("configs/default.py:runlocal")
  c.model[field] = value
  with pytest.raises(ValueError, match=match):
    validate_config(c)


def test_capacity_only_with_sparse():
  c = load_config("configs/default.py:runlocal")
  c.model.capacity_factor = 1.25
  validate_config(c)  # capacity dispatch: moe_impl='sparse' + capacity_factor
  c.model.moe_impl = "dense"
  with pytest.raises(
      ValueError,
      match=r"config\.model\.capacity_factor=1\.25 is invalid: "
      r"expected 0 \(dropless\) with model\.moe_impl='dense'",
  ):
    validate_config(c)
  with pytest.raises(ValueError, match=r"MoEConfig\.capacity_factor=1\.25 is invalid"):
    block_cfg(moe_impl="dense", capacity_factor=1.25)


def test_workdir_of_a_dense_run_resumes_with_sparse(tmp_path):
  """moe_impl / moe_block_size change how, not what, the experts compute: a workdir written
  before 'sparse' became the default (moe_impl='dense', no moe_block_size) resumes."""
  from fedalign.federated.config_checks import check_workdir_config

  old = load_config("configs/default.py:runlocal")
  old.model.moe_impl = "dense"
  del old.model["moe_block_size"]
  check_workdir_config(tmp_path, old)
  check_workdir_config(tmp_path, load_config("configs/default.py:runlocal"))
  changed = load_config("configs/default.py:runlocal")
  changed.model.capacity_factor = 1.25  # another function: refused
  with pytest.raises(ValueError, match=r"model\.capacity_factor: 0\.0 -> 1\.25"):
    check_workdir_config(tmp_path, changed)

"""Unit tests of the Flax MoE models: parameter tree, invariances, LoRA, routing statistics,
expert dispatch implementations and config validation (fast: tiny shapes)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedalign.models import (
    MoEConfig,
    build_module,
    family_config,
    finalize_stats,
    init_params,
    trainable_mask,
)
from fedalign.models.lora import combine, partition
from fedalign.models.moe import MoEBlock

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 6)), jnp.int32)
MASK = jnp.asarray([[1] * 6, [1, 1, 1, 1, 0, 0]], bool)


def small(family="qwen2_moe", **kw):
  fields = dict(
      vocab_size=32,
      hidden_size=16,
      num_layers=2,
      num_heads=2,
      num_kv_heads=1,
      num_experts=4,
      top_k=2,
      moe_intermediate_size=8,
      intermediate_size=12,
  )
  if family in ("qwen2_moe", "deepseek_moe"):
    fields["shared_expert_intermediate_size"] = 8
  fields.update(kw)
  return family_config(family, **fields)


def random_params(module, *args, seed=0, std=0.3):
  """Random params of ``module`` without compiling its init (slow on CPU): normal(0, std)
  leaves, norm scales around 1."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  return jax.tree_util.tree_map_with_path(
      lambda p, s: jnp.asarray(rng.normal(float(_keys(p)[-1] == "scale"), std, s.shape), s.dtype),
      shapes,
  )


def logits_fn(cfg):
  module = build_module(cfg)
  return jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask)[0])


def _keys(path):
  return tuple(str(getattr(k, "key", k)) for k in path)


# ----------------------------------------------------------------------------- parameter tree

_ATTN = {
    "k_norm": {"scale": (4,)},
    "k_proj": {"bias": (4,), "kernel": (8, 4), "lora_a": (8, 2), "lora_b": (2, 4)},
    "o_proj": {"kernel": (8, 8), "lora_a": (8, 2), "lora_b": (2, 8)},
    "q_norm": {"scale": (4,)},
    "q_proj": {"bias": (8,), "kernel": (8, 8), "lora_a": (8, 2), "lora_b": (2, 8)},
    "v_proj": {"bias": (4,), "kernel": (8, 4), "lora_a": (8, 2), "lora_b": (2, 4)},
}
EXPECTED_SHAPES = {
    "embed": {"embedding": (16, 8)},
    "final_norm": {"scale": (8,)},
    "layers_0": {
        "attn": _ATTN,
        "input_norm": {"scale": (8,)},
        "mlp": {"wi_0": {"kernel": (8, 6)}, "wi_1": {"kernel": (8, 6)}, "wo": {"kernel": (6, 8)}},
        "post_attn_norm": {"scale": (8,)},
    },
    "layers_1": {
        "attn": _ATTN,
        "input_norm": {"scale": (8,)},
        "mlp": {
            "experts": {
                "wi_0": (3, 8, 4),
                "wi_0_lora_a": (3, 8, 2),
                "wi_0_lora_b": (3, 2, 4),
                "wi_1": (3, 8, 4),
                "wi_1_lora_a": (3, 8, 2),
                "wi_1_lora_b": (3, 2, 4),
                "wo": (3, 4, 8),
                "wo_lora_a": (3, 4, 2),
                "wo_lora_b": (3, 2, 8),
            },
            "router": {"kernel": (8, 3)},
            "shared_expert": {
                "wi_0": {"kernel": (8, 5)},
                "wi_1": {"kernel": (8, 5)},
                "wo": {"kernel": (5, 8)},
            },
            "shared_expert_gate": {"kernel": (8, 1)},
        },
        "post_attn_norm": {"scale": (8,)},
    },
    "lm_head": {"kernel": (8, 16)},
}


def test_parameter_shape_tree():
  cfg = family_config(
      "qwen2_moe",
      vocab_size=16,
      hidden_size=8,
      num_layers=2,
      num_heads=2,
      num_kv_heads=1,
      num_experts=3,
      top_k=2,
      moe_intermediate_size=4,
      intermediate_size=6,
      shared_expert_intermediate_size=5,
      first_k_dense=1,
      qk_norm="head",
      lora_rank=2,
      lora_targets=("attention", "experts"),
      param_dtype="bfloat16",
  )
  tree = jax.eval_shape(build_module(cfg).init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32))[
      "params"
  ]
  assert jax.tree.map(lambda s: s.shape, tree) == EXPECTED_SHAPES
  dtypes = {_keys(p): s.dtype for p, s in jax.tree_util.tree_leaves_with_path(tree)}
  assert dtypes.pop(("layers_1", "mlp", "router", "kernel")) == jnp.float32  # router in f32
  assert set(dtypes.values()) == {jnp.dtype(jnp.bfloat16)}


# ----------------------------------------------------------------------------- invariances


def test_expert_permutation_leaves_logits_unchanged():
  cfg = small("qwen3_moe", num_experts=5)
  params = random_params(build_module(cfg), IDS, seed=1)
  f = logits_fn(cfg)
  perm = np.array([3, 0, 4, 2, 1])
  block = params["layers_1"]["mlp"]
  permuted = dict(params)
  permuted["layers_1"] = {
      **params["layers_1"],
      "mlp": {
          "experts": jax.tree.map(lambda w: w[perm], block["experts"]),
          "router": {"kernel": block["router"]["kernel"][:, perm]},
      },
  }
  a, b = f(params, IDS, MASK), f(permuted, IDS, MASK)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  # Permuting the experts alone (not the router) does change the function.
  broken = dict(permuted)
  broken["layers_1"] = {
      **permuted["layers_1"],
      "mlp": {**permuted["layers_1"]["mlp"], "router": block["router"]},
  }
  assert float(jnp.max(jnp.abs(f(broken, IDS, MASK) - a))) > 1e-3


def _without_lora(tree):
  if isinstance(tree, dict):
    return {k: _without_lora(v) for k, v in tree.items() if not k.endswith(("lora_a", "lora_b"))}
  return tree


def test_zero_initialised_lora_leaves_logits_unchanged():
  base_cfg = small("deepseek_moe", first_k_dense=1)  # dense layer + shared experts
  lora_cfg = base_cfg.replace(
      lora_rank=4, lora_targets=("attention", "experts", "shared_expert", "dense_mlp")
  )
  # The model's own init (B = 0); an rbg key compiles much faster than threefry on CPU.
  params = init_params(lora_cfg, jax.random.key(2, impl="unsafe_rbg"))
  assert not any(
      np.any(v)
      for p, v in jax.tree_util.tree_leaves_with_path(params)
      if _keys(p)[-1].endswith("lora_b")
  )
  n_lora = sum("lora" in _keys(p)[-1] for p, _ in jax.tree_util.tree_leaves_with_path(params))
  assert n_lora == 2 * (4 * 2 + 3 + 3 + 3)  # q,k,v,o x2 layers; dense; shared; experts
  a = logits_fn(lora_cfg)(params, IDS, MASK)
  b = logits_fn(base_cfg)(_without_lora(params), IDS, MASK)
  np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_training_adapters_changes_only_adapters_and_routers():
  cfg = small("qwen2_moe", lora_rank=2, lora_targets=("attention", "experts"))
  module = build_module(cfg)
  params = random_params(module, IDS, seed=3, std=0.2)
  mask = trainable_mask(params, "lora")
  trainable, frozen = partition(params, mask)
  opt = optax.sgd(0.5)
  state = opt.init(trainable)

  def loss_fn(tr):
    logits, aux = module.apply({"params": combine(tr, frozen)}, IDS, MASK)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, IDS[:, 1:, None], -1)[..., 0]
    return jnp.sum(nll * MASK[:, 1:]) / jnp.sum(MASK[:, 1:]) + 0.01 * aux["load_balance_loss"]

  @jax.jit
  def step(tr, state):
    grads = jax.grad(loss_fn)(tr)
    updates, state = opt.update(grads, state, tr)
    return optax.apply_updates(tr, updates), state

  for _ in range(3):
    trainable, state = step(trainable, state)
  new = combine(trainable, frozen)
  changed = {
      _keys(p)
      for p, (a, b) in zip(
          [p for p, _ in jax.tree_util.tree_leaves_with_path(params)],
          zip(jax.tree.leaves(params), jax.tree.leaves(new)),
      )
      if not np.array_equal(a, b)
  }
  allowed = {_keys(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}
  assert changed <= allowed
  assert all("lora" in k[-1] or "router" in k for k in allowed)
  assert changed == allowed  # every adapter and every router moved


# ----------------------------------------------------------------------------- routing stats


K_ROUTER = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 1.5]], np.float32)
X = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -2.0]]], np.float32)
TOKEN_MASK = np.array([[1, 1, 1, 0]], bool)  # the last token is padding


def _block(top_k, **kw):
  cfg = family_config(
      "olmoe",
      hidden_size=2,
      num_heads=1,
      num_kv_heads=1,
      num_experts=3,
      top_k=top_k,
      moe_intermediate_size=4,
      **kw,
  )
  block = MoEBlock(cfg)
  params = random_params(block, jnp.asarray(X), jnp.asarray(TOKEN_MASK))
  params = {**params, "router": {"kernel": jnp.asarray(K_ROUTER)}}
  return block, params


def _by_hand(top_k):
  """p, c, m, mu written out token by token."""
  valid = [x for x, v in zip(X[0], TOKEN_MASK[0]) if v]
  p, c, m, gate, cen = np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3), np.zeros((3, 2))
  for x in valid:
    logits = x @ K_ROUTER
    g = np.exp(logits) / np.exp(logits).sum()
    order = np.argsort(-g)
    chosen, runner_up = order[:top_k], (g[order[top_k]] if top_k < 3 else 0.0)
    p += g / len(valid)
    for e in chosen:
      c[e] += 1
      m[e] += g[e] - runner_up
      gate[e] += g[e]
      cen[e] += g[e] * x
  m = np.where(c > 0, m / np.maximum(c, 1), 0.0)
  mu = np.where(gate[:, None] > 0, cen / np.maximum(gate, 1e-30)[:, None], 0.0)
  return p, c, m, mu


@pytest.mark.parametrize("top_k,counts", [(1, [2, 0, 1]), (2, [2, 3, 1])])
def test_routing_statistics_by_hand(top_k, counts):
  block, params = _block(top_k)
  _, stats, _ = block.apply({"params": params}, jnp.asarray(X), jnp.asarray(TOKEN_MASK))
  assert float(stats["token_count"]) == 3.0
  fin = finalize_stats(stats)
  p, c, m, mu = _by_hand(top_k)
  np.testing.assert_array_equal(c, counts)
  np.testing.assert_array_equal(fin["c"], counts)
  np.testing.assert_allclose(fin["p"], p, atol=1e-6)
  np.testing.assert_allclose(fin["m"], m, atol=1e-6)
  np.testing.assert_allclose(fin["mu"], mu, atol=1e-6)
  if top_k == 1:  # expert 1 is never selected: zero margin and centroid, not NaN
    assert float(fin["m"][1]) == 0.0 and np.all(np.asarray(fin["mu"][1]) == 0.0)


# ----------------------------------------------------------------------------- dispatch


def _block_outputs(cfg, params, x, mask):
  out, stats, _ = jax.jit(lambda p, x, m: MoEBlock(cfg).apply({"params": p}, x, m))(params, x, mask)
  return np.asarray(out), stats


def test_dense_sparse_ragged_and_large_capacity_agree():
  cfg = small("qwen2_moe", hidden_size=8, num_heads=1, num_kv_heads=1)
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  mask = jnp.asarray([[1] * 5, [1, 1, 1, 0, 0]], bool)
  params = random_params(MoEBlock(cfg), x, mask, seed=2)
  dense, s0 = _block_outputs(cfg.replace(moe_impl="dense"), params, x, mask)
  sparse, s1 = _block_outputs(cfg.replace(moe_block_size=4), params, x, mask)
  ragged, s2 = _block_outputs(cfg.replace(moe_impl="ragged"), params, x, mask)
  capped, s3 = _block_outputs(cfg.replace(capacity_factor=8.0), params, x, mask)
  valid = np.asarray(mask)
  np.testing.assert_allclose(sparse, dense, atol=1e-5, rtol=0)
  np.testing.assert_allclose(ragged, dense, atol=1e-5, rtol=0)
  np.testing.assert_allclose(capped[valid], dense[valid], atol=1e-5, rtol=0)
  assert np.abs(dense).max() > 1e-2
  for s in (s1, s2, s3):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), s, s0)


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_small_capacity_drops_tokens(family):
  extra = dict(shared_expert_intermediate_size=4) if family == "qwen2_moe" else {}
  cfg = family_config(
      family,
      hidden_size=2,
      num_heads=1,
      num_kv_heads=1,
      num_experts=3,
      top_k=1,
      moe_intermediate_size=4,
      capacity_factor=0.75,
      **extra,
  )
  x = jnp.asarray([[[1.0, 0.5], [0.5, 1.0], [1.0, 1.0], [2.0, 0.3]]])
  mask = jnp.ones((1, 4), bool)
  params = random_params(MoEBlock(cfg), x, mask, std=1.0)
  params = {**params, "router": {"kernel": jnp.asarray([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]])}}
  # capacity = ceil(0.75 * 4 tokens * top-1 / 3 experts) = 1: all pick expert 0, only the
  # first token fits.
  out, _ = _block_outputs(cfg, params, x, mask)
  full, _ = _block_outputs(cfg.replace(capacity_factor=None), params, x, mask)
  no_experts = {**params, "experts": jax.tree.map(jnp.zeros_like, params["experts"])}
  shared_only, _ = _block_outputs(cfg.replace(capacity_factor=None), no_experts, x, mask)
  np.testing.assert_allclose(out[0, 0], full[0, 0], atol=1e-6)
  np.testing.assert_allclose(out[0, 1:], shared_only[0, 1:], atol=1e-6)
  assert np.abs(full[0, 1:] - shared_only[0, 1:]).max() > 1e-4  # dropping changed them
  if family == "olmoe":
    assert np.all(out[0, 1:] == 0.0)


def _one_hot_capacity_reference(top_idx, top_w, valid, num_experts, cap, x, w):
  """The GShard one-hot formulation: a (T, E, C) dispatch tensor and two einsums."""
  t, k = top_idx.shape
  onehot = jax.nn.one_hot(top_idx, num_experts) * valid[:, None, None]
  flat = jnp.swapaxes(onehot, 0, 1).reshape(k * t, num_experts)
  position = (jnp.cumsum(flat, 0) - 1.0) * flat
  slots = (flat * (position < cap))[..., None] * jax.nn.one_hot(position.astype(jnp.int32), cap)
  slots = jnp.swapaxes(slots.reshape(k, t, num_experts, cap), 0, 1)
  dispatch, combine = slots.sum(1), (slots * top_w[:, :, None, None]).sum(1)
  expert_out = jnp.einsum("ecd,edf->ecf", jnp.einsum("tec,td->ecd", dispatch, x), w)
  return jnp.einsum("tec,ecd->td", combine, expert_out)


@pytest.mark.parametrize("cap", [1, 3, 8, 40])
def test_scatter_capacity_dispatch_matches_one_hot_dispatch(cap):
  """The linear scatter/gather dispatch = the one-hot einsum form: outputs, gradients, vmap."""
  from fedalign.models import moe

  t, k, e, d = 29, 2, 5, 6
  first = jax.random.randint(jax.random.key(0), (t,), 0, e)
  top_idx = jnp.stack(
      [first, (first + 1 + jax.random.randint(jax.random.key(5), (t,), 0, e - 1)) % e], axis=1
  )
  top_w = jax.random.uniform(jax.random.key(1), (t, k))
  valid = (jax.random.uniform(jax.random.key(2), (t,)) > 0.2).astype(jnp.float32)
  x = jax.random.normal(jax.random.key(3), (t, d))
  w = jax.random.normal(jax.random.key(4), (e, d, d))

  def scatter(x, w):
    slot, keep = moe.capacity_slots(top_idx, valid, e, cap)
    buf = moe.scatter_to_experts(x, top_idx, slot, e, cap)
    return moe.gather_from_experts(jnp.einsum("ecd,edf->ecf", buf, w), top_idx, slot, top_w * keep)

  ref = lambda x, w: _one_hot_capacity_reference(top_idx, top_w, valid, e, cap, x, w)
  np.testing.assert_allclose(scatter(x, w), ref(x, w), atol=1e-5)
  g_new = jax.grad(lambda x, w: scatter(x, w).sum(), argnums=(0, 1))(x, w)
  g_ref = jax.grad(lambda x, w: ref(x, w).sum(), argnums=(0, 1))(x, w)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), g_new, g_ref)
  xs = jnp.stack([x, -2.0 * x])
  np.testing.assert_allclose(
      jax.vmap(scatter, (0, None))(xs, w), jnp.stack([ref(x, w), ref(-2.0 * x, w)]), atol=1e-4
  )
  slot, keep = moe.capacity_slots(top_idx, valid, e, cap)
  assert int(keep.sum()) <= e * cap and not bool(keep[valid == 0].any())
  assert bool(jnp.all((slot == cap) == ~keep))


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(num_experts=4, top_k=5), "top_k"),
        (dict(hidden_size=30, num_heads=4), "num_heads"),
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(moe_impl="grouped"), "moe_impl"),
        (dict(moe_impl="dense", capacity_factor=1.25), "capacity_factor"),
        (dict(moe_impl="ragged", capacity_factor=1.25), "capacity_factor"),
        (dict(moe_block_size=0), "moe_block_size"),
        (dict(lora_targets=("mlp",)), "lora_targets"),
    ],
)
def test_config_validation_names_the_field(kw, field):
  with pytest.raises(ValueError, match=rf"MoEConfig\.{field}="):
    MoEConfig(**kw).validate()
  with pytest.raises(ValueError, match=field):
    family_config("mixtral", **kw)

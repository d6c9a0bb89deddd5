"""Switch Transformer: HF parity (with and without dropped tokens), routing statistics, checkpoint
validation, the parameter-shape tree, config validation and the text-to-text scoring helpers."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedalign.models import api
from fedalign.models.hf_switch import load_switch_pretrained, save_switch_pretrained
from fedalign.models.routing import STAT_NAMES
from fedalign.models.switch import (
    SwitchSparseMLP,
    SwitchTransformer,
    classify,
    pack_targets,
    relative_position_bucket,
    score_choices,
    score_targets,
    shift_right,
    switch_base_16,
    switch_tiny,
)


# ------------------------------------------------------------------------------------ HF parity
def _hf_model(expert_capacity: int, tie: bool):
  torch = pytest.importorskip("torch")
  tr = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hcfg = tr.SwitchTransformersConfig(
      vocab_size=64,
      d_model=16,
      d_kv=4,
      d_ff=32,
      num_layers=4,
      num_decoder_layers=3,
      num_sparse_encoder_layers=2,
      num_sparse_decoder_layers=1,
      num_heads=2,
      num_experts=4,
      expert_capacity=expert_capacity,
      relative_attention_num_buckets=8,
      relative_attention_max_distance=16,
      dropout_rate=0.0,
      decoder_start_token_id=0,
      tie_word_embeddings=tie,
      attn_implementation="eager",
  )
  hm = tr.SwitchTransformersForConditionalGeneration(hcfg).eval()
  if not tie:  # transformers 5.x unties the input embeddings too; fedalign shares one.
    with torch.no_grad():
      hm.encoder.embed_tokens.weight.copy_(hm.shared.weight)
      hm.decoder.embed_tokens.weight.copy_(hm.shared.weight)
  return hm


def _hf_forward(hm, ids, mask, dec, dmask):
  """HF logits and, per router, the expert that processed each token (-1 = dropped)."""
  import torch

  caught, hooks = {}, []
  for name, mod in hm.named_modules():
    if type(mod).__name__ == "SwitchTransformersTop1Router":
      hooks.append(
          mod.register_forward_hook(
              lambda m, i, o, name=name: caught.__setitem__(name, o[0].numpy())
          )
      )
  with torch.no_grad():
    out = hm(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask).long(),
        decoder_input_ids=torch.tensor(dec),
        decoder_attention_mask=torch.tensor(dmask).long(),
    )
  for h in hooks:
    h.remove()
  index = {}
  for name, onehot in caught.items():  # 'encoder.block.1.layer.1.mlp.router'
    parts = name.split(".")
    index[f"{parts[0]}/block_{parts[2]}/mlp"] = np.where(onehot.sum(-1) > 0, onehot.argmax(-1), -1)
  return out.logits.numpy(), index


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(2, 64, (2, 11))
  mask = np.ones((2, 11), bool)
  mask[1, 7:] = False
  dec = rng.integers(2, 64, (2, 9))
  dmask = np.ones((2, 9), bool)
  dmask[0, 6:] = False
  return ids, mask, dec, dmask


@pytest.mark.parametrize(
    "expert_capacity,tie,drops", [(64, True, False), (2, True, True), (3, False, True)]
)
def test_logit_parity_with_transformers(tmp_path, expert_capacity, tie, drops):
  hm = _hf_model(expert_capacity, tie)
  hm.save_pretrained(tmp_path / "hf")
  model = load_switch_pretrained(tmp_path / "hf")
  assert model.config.encoder_sparse_layers == (1, 3)
  assert model.config.decoder_sparse_layers == (1,)
  ids, mask, dec, dmask = _inputs()
  hf_logits, hf_index = _hf_forward(hm, ids, mask, dec, dmask)
  (logits, aux), inter = model.module.apply(
      {"params": model.params},
      jnp.asarray(ids),
      jnp.asarray(mask),
      jnp.asarray(dec),
      jnp.asarray(dmask),
      mutable=["intermediates"],
  )
  np.testing.assert_allclose(np.asarray(logits), hf_logits, atol=1e-4, rtol=0)
  assert sorted(hf_index) == sorted(aux["routing"])
  n_dropped = 0
  for path, hf_idx in hf_index.items():
    stack, block, _ = path.split("/")
    ours = np.asarray(inter["intermediates"][stack][block]["mlp"]["expert_index"][0])
    np.testing.assert_array_equal(ours, hf_idx, err_msg=path)  # same choices, same drops
    n_dropped += int((hf_idx < 0).sum())
  assert (n_dropped > 0) == drops

  # ... and transformers loads what we save, with the same logits.
  save_switch_pretrained(model, tmp_path / "ours")
  import transformers

  hm2 = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
      tmp_path / "ours", attn_implementation="eager"
  ).eval()
  np.testing.assert_allclose(_hf_forward(hm2, ids, mask, dec, dmask)[0], hf_logits, atol=1e-5)


def test_relative_position_buckets_match_transformers():
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from transformers.models.switch_transformers.modeling_switch_transformers import (
      SwitchTransformersAttention,
  )

  rel = np.arange(-700, 701)
  for bidirectional in (True, False):
    for nb, md in ((32, 128), (8, 16), (8, 20)):
      ref = SwitchTransformersAttention._relative_position_bucket(
          torch.tensor(rel), bidirectional, nb, md
      ).numpy()
      np.testing.assert_array_equal(relative_position_bucket(rel, bidirectional, nb, md), ref)


# ------------------------------------------------------------------------------- routing stats
def test_routing_stats_shapes_and_padding_mask():
  cfg = switch_tiny()
  module = SwitchTransformer(cfg)
  params = _random_params(cfg)
  rng = np.random.default_rng(1)
  ids = rng.integers(2, cfg.vocab_size, (3, 10))
  mask = np.ones((3, 10), bool)
  mask[0, 6:] = False
  mask[2, 3:] = False
  dec = rng.integers(2, cfg.vocab_size, (3, 7))
  dmask = np.ones((3, 7), bool)
  dmask[1, 4:] = False
  fwd = jax.jit(lambda p, i, m, d, dm: module.apply({"params": p}, i, m, d, dm)[1])
  aux = fwd(params, ids, mask, dec, dmask)
  assert cfg.moe_block_paths == ("encoder/block_1/mlp", "decoder/block_1/mlp")
  assert set(aux["routing"]) == set(cfg.moe_block_paths)
  e, d = cfg.num_experts, cfg.d_model
  shapes = {
      "token_count": (),
      "prob_sum": (e,),
      "select_count": (e,),
      "margin_sum": (e,),
      "gate_sum": (e,),
      "centroid_sum": (e, d),
  }
  for path, stats in aux["routing"].items():
    assert set(stats) == set(STAT_NAMES)
    assert {k: v.shape for k, v in stats.items()} == shapes, path
    expected = mask.sum() if path.startswith("encoder") else dmask.sum()
    assert float(stats["token_count"]) == expected
    assert float(stats["select_count"].sum()) == expected  # top-1: one expert per token
    np.testing.assert_allclose(float(stats["prob_sum"].sum()), expected, rtol=1e-5)
  for name in ("load_balance_loss", "router_z_loss"):
    assert aux[name].shape == () and np.isfinite(float(aux[name]))
  # Padded tokens do not count: changing them leaves every statistic unchanged.
  ids2 = np.where(mask, ids, rng.integers(2, cfg.vocab_size, ids.shape))
  dec2 = np.where(dmask, dec, rng.integers(2, cfg.vocab_size, dec.shape))
  aux2 = fwd(params, ids2, mask, dec2, dmask)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
      aux["routing"],
      aux2["routing"],
  )
  np.testing.assert_allclose(aux["load_balance_loss"], aux2["load_balance_loss"], rtol=1e-5)
  # Permuting the expert axis (router kernel's last axis with every 'experts' leaf) permutes
  # the statistics and leaves the losses unchanged.
  perm = np.array([2, 0, 3, 1])
  permuted = jax.tree.map(lambda x: x, params)
  for path in cfg.moe_block_paths:
    stack, block, _ = path.split("/")
    blk = permuted[stack][block]["mlp"]
    blk["router"] = {"kernel": blk["router"]["kernel"][:, perm]}
    blk["experts"] = {k: v[perm] for k, v in blk["experts"].items()}
  aux3 = fwd(permuted, ids, mask, dec, dmask)
  for path in cfg.moe_block_paths:
    for k in ("prob_sum", "select_count", "centroid_sum"):
      np.testing.assert_allclose(
          aux["routing"][path][k][perm], aux3["routing"][path][k], rtol=1e-4, atol=1e-4
      )
  np.testing.assert_allclose(aux["router_z_loss"], aux3["router_z_loss"], rtol=1e-5)


def test_training_mode_router_jitter():
  cfg = switch_tiny(dropout_rate=0.0, router_jitter_noise=0.2)
  module = SwitchTransformer(cfg)
  params = _random_params(cfg)
  ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  dec = shift_right(ids[:, :4], cfg.decoder_start_token_id)
  train = jax.jit(
      lambda key, det: module.apply(
          {"params": params}, ids, None, dec, None, det, rngs={"dropout": key}
      )[1]["routing"],
      static_argnums=1,
  )
  a, b = train(jax.random.key(1), False), train(jax.random.key(2), False)
  path = "encoder/block_1/mlp"
  assert not np.allclose(a[path]["prob_sum"], b[path]["prob_sum"])  # jittered router input
  e1, e2 = train(jax.random.key(1), True), train(jax.random.key(2), True)
  np.testing.assert_array_equal(e1[path]["prob_sum"], e2[path]["prob_sum"])  # eval: no noise
  # The load-balance loss reaches the router kernel.
  mlp = SwitchSparseMLP(cfg)
  x = jax.random.normal(jax.random.key(0), (2, 6, 32))
  p = jax.jit(mlp.init)(jax.random.key(0), x)["params"]
  lb = lambda p, key: mlp.apply({"params": p}, x, None, False, rngs={"dropout": key})[2][
      "load_balance_loss"
  ]
  _, g = jax.jit(jax.value_and_grad(lb))(p, jax.random.key(1))
  assert float(jnp.abs(g["router"]["kernel"]).sum()) > 0


@pytest.mark.slow
def test_training_mode_dropout_gradients():
  cfg = switch_tiny(dropout_rate=0.1, router_jitter_noise=0.01)
  module = SwitchTransformer(cfg)
  params = _random_params(cfg)
  ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  dec = shift_right(ids[:, :4], cfg.decoder_start_token_id)

  def loss(p, key):
    logits, aux = module.apply({"params": p}, ids, None, dec, None, False, rngs={"dropout": key})
    return jnp.mean(logits**2) + aux["load_balance_loss"] + aux["router_z_loss"]

  vg = jax.jit(jax.value_and_grad(loss))
  (l1, g), (l2, _) = vg(params, jax.random.key(1)), vg(params, jax.random.key(2))
  assert np.isfinite(float(l1)) and float(l1) != float(l2)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))


# ------------------------------------------------------------------------------ bad checkpoints
TINY4 = dict(num_layers=4, encoder_sparse_step=2)  # encoder MoE layers 1 and 3


def _random_params(cfg, seed=0):
  """Random params from the shape tree (no init compile: keeps the tests fast)."""
  shapes = jax.eval_shape(
      lambda: SwitchTransformer(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  )["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32), shapes)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
  path = tmp_path_factory.mktemp("switch") / "ckpt"
  cfg = switch_tiny(**TINY4)
  save_switch_pretrained(api.MoEModel(cfg, _random_params(cfg)), path)
  return path


def _tiny_checkpoint(tmp_path, tiny_ckpt):
  path = tmp_path / "ckpt"
  shutil.copytree(tiny_ckpt, path)
  return switch_tiny(**TINY4), path


def _edit_config(path, **changes):
  hf = json.loads((path / "config.json").read_text())
  hf.update(changes)
  (path / "config.json").write_text(json.dumps(hf))


def test_checkpoint_round_trip_and_lora(tmp_path, tiny_ckpt):
  cfg, path = _tiny_checkpoint(tmp_path, tiny_ckpt)
  model = load_switch_pretrained(path)
  assert model.config == cfg
  ids = jnp.ones((1, 5), jnp.int32)
  logits, _ = model(ids)
  lora = load_switch_pretrained(path, lora_rank=2, lora_targets=("experts",))
  experts = lora.params["encoder"]["block_1"]["mlp"]["experts"]
  assert experts["wi_lora_a"].shape == (4, 32, 2) and experts["wo_lora_b"].shape == (4, 2, 32)
  assert not np.any(np.asarray(experts["wo_lora_b"])) and np.any(np.asarray(experts["wi_lora_a"]))
  np.testing.assert_allclose(np.asarray(lora(ids)[0]), np.asarray(logits), atol=1e-6)
  with pytest.raises(ValueError, match="merge the adapters"):
    save_switch_pretrained(lora, tmp_path / "lora")


def test_checkpoint_with_other_number_of_experts_is_rejected(tmp_path, tiny_ckpt):
  _, path = _tiny_checkpoint(tmp_path, tiny_ckpt)
  _edit_config(path, num_experts=2)
  with pytest.raises(
      ValueError,
      match=r"encoder\.block\.1\.layer\.1\.mlp\.router\.classifier" r"\.weight.*num_experts=2",
  ):
    load_switch_pretrained(path)
  # Extra expert tensors beyond the config are named as well.
  other = tmp_path / "other"
  shutil.copytree(path, other)
  _edit_config(other, num_experts=4)
  from safetensors.numpy import load_file, save_file

  tensors = load_file(str(other / "model.safetensors"))
  tensors["decoder.block.1.layer.2.mlp.experts.expert_4.wi.weight"] = np.zeros((64, 32), np.float32)
  save_file(tensors, str(other / "model.safetensors"))
  with pytest.raises(
      ValueError,
      match=r"unexpected tensor 'decoder\.block\.1\.layer\.2\.mlp"
      r"\.experts\.expert_4\.wi\.weight'",
  ):
    load_switch_pretrained(other)


def test_checkpoint_with_other_sparse_layout_is_rejected(tmp_path, tiny_ckpt):
  _, path = _tiny_checkpoint(tmp_path, tiny_ckpt)
  _edit_config(path, num_sparse_encoder_layers=1)  # step 4: only layer 1 is sparse
  with pytest.raises(
      ValueError, match=r"missing tensor 'encoder\.block\.3\.layer\.1\.mlp\.wi" r"\.weight'.*dense"
  ):
    load_switch_pretrained(path)
  _edit_config(path, num_sparse_encoder_layers=4)  # step 1: every layer sparse
  with pytest.raises(
      ValueError,
      match=r"missing tensor 'encoder\.block\.0\.layer\.1\.mlp\.router"
      r"\.classifier\.weight'.*sparse",
  ):
    load_switch_pretrained(path)


# --------------------------------------------------------------------------- shapes and config
TINY_SHAPES = {
    "shared/embedding": (128, 32),
    "encoder/final_norm/scale": (32,),
    "decoder/final_norm/scale": (32,),
    "encoder/block_0/self_attn/relative_attention_bias": (8, 4),
    "decoder/block_0/self_attn/relative_attention_bias": (8, 4),
    "encoder/block_0/mlp/wi/kernel": (32, 64),
    "encoder/block_0/mlp/wo/kernel": (64, 32),
    "decoder/block_0/mlp/wi/kernel": (32, 64),
    "decoder/block_0/mlp/wo/kernel": (64, 32),
    "encoder/block_1/mlp/router/kernel": (32, 4),
    "encoder/block_1/mlp/experts/wi": (4, 32, 64),
    "encoder/block_1/mlp/experts/wo": (4, 64, 32),
    "decoder/block_1/mlp/router/kernel": (32, 4),
    "decoder/block_1/mlp/experts/wi": (4, 32, 64),
    "decoder/block_1/mlp/experts/wo": (4, 64, 32),
}
for _stack in ("encoder", "decoder"):
  for _i in (0, 1):
    _attn = ("self_attn", "cross_attn") if _stack == "decoder" else ("self_attn",)
    for _a in _attn:
      for _n in "qkvo":
        TINY_SHAPES[f"{_stack}/block_{_i}/{_a}/{_n}/kernel"] = (32, 32)
      TINY_SHAPES[f"{_stack}/block_{_i}/{_a}_norm/scale"] = (32,)
    TINY_SHAPES[f"{_stack}/block_{_i}/mlp_norm/scale"] = (32,)


def test_param_shape_tree_of_tiny_config():
  cfg = switch_tiny()
  shapes = jax.eval_shape(
      lambda: SwitchTransformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  )["params"]
  flat = {
      "/".join(k.key for k in p): tuple(v.shape)
      for p, v in jax.tree_util.tree_leaves_with_path(shapes)
  }
  assert flat == TINY_SHAPES
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(shapes))
  untied = jax.eval_shape(
      lambda: SwitchTransformer(cfg.replace(tie_word_embeddings=False)).init(
          jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
      )
  )["params"]
  assert untied["lm_head"]["kernel"].shape == (32, 128)


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(encoder_sparse_step=-1), "encoder_sparse_step"),
        (dict(decoder_sparse_step=5), "decoder_sparse_step"),
        (dict(d_kv=None, num_heads=5), "num_heads"),
        (dict(capacity_factor=1.25), "capacity_factor"),
        (dict(expert_capacity=0), "expert_capacity"),
        (dict(dense_act_fn="gated-gelu"), "dense_act_fn"),
        (dict(relative_attention_max_distance=3), "relative_attention_max_distance"),
        (dict(lora_targets=("router",)), "lora_targets"),
    ],
)
def test_config_validation_names_the_field(changes, field):
  with pytest.raises(ValueError, match=rf"SwitchConfig\.{field}="):
    switch_tiny(**changes)


def test_switch_base_16_hyperparameters():
  cfg = switch_base_16()
  assert (cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.resolved_d_kv, cfg.num_experts) == (
      768,
      3072,
      12,
      64,
      16,
  )
  assert cfg.encoder_sparse_layers == cfg.decoder_sparse_layers == (1, 3, 5, 7, 9, 11)
  assert cfg.expert_capacity == 64 and cfg.tie_word_embeddings and cfg.vocab_size == 32128
  from fedalign.models.hf_switch import config_from_hf, config_to_hf

  assert config_from_hf(config_to_hf(cfg)) == cfg


# ------------------------------------------------------------------------------ scoring helpers
def test_scoring_helpers_agree():
  cfg = switch_tiny()
  params = _random_params(cfg, 3)
  rng = np.random.default_rng(2)
  enc = jnp.asarray(rng.integers(2, cfg.vocab_size, (3, 8)), jnp.int32)
  enc_mask = jnp.asarray(np.arange(8)[None] < np.array([[8], [5], [3]]))
  # Label words of different token lengths (never truncated), with EOS.
  labels, label_mask = pack_targets([[11], [12, 13, 14], [15, 16]], eos_id=cfg.eos_token_id)
  assert labels.shape == (3, 4) and label_mask.sum(-1).tolist() == [2, 4, 3]
  cls = jax.jit(classify, static_argnums=1)
  scores, pred = cls(params, cfg, enc, enc_mask, labels, label_mask, False)
  assert scores.shape == (3, 3) and pred.shape == (3,)
  np.testing.assert_array_equal(pred, jnp.argmax(scores, -1))
  st = jax.jit(score_targets, static_argnums=1)
  for k in range(3):
    tgt = jnp.broadcast_to(labels[k], (3, 4))
    tmask = jnp.broadcast_to(label_mask[k], (3, 4))
    np.testing.assert_allclose(
        scores[:, k], st(params, cfg, enc, enc_mask, tgt, tmask), rtol=1e-5, atol=1e-5
    )
  norm, _ = cls(params, cfg, enc, enc_mask, labels, label_mask, True)
  np.testing.assert_allclose(norm, scores / label_mask.sum(-1)[None], rtol=1e-5)
  assert bool(jnp.all(scores < 0))
  # Per-example options (B, K, L): multiple choice.
  opts = jnp.asarray(rng.integers(2, cfg.vocab_size, (3, 2, 4)), jnp.int32)
  omask = jnp.ones((3, 2, 4), bool).at[:, 1, 2:].set(False)
  mc = jax.jit(score_choices, static_argnums=1)(params, cfg, enc, enc_mask, opts, omask)
  np.testing.assert_allclose(
      mc[:, 1], st(params, cfg, enc, enc_mask, opts[:, 1], omask[:, 1]), rtol=1e-5, atol=1e-5
  )


def test_shift_right():
  out = shift_right(jnp.array([[5, 6, 7], [8, -100, -100]]), 0)
  assert out.tolist() == [[0, 5, 6], [0, 8, 0]]

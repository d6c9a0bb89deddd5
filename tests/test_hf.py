"""Hugging Face checkpoint I/O and parity with the PyTorch (transformers) implementations.

Tiny random transformers models (float32, 2 layers, vocab 100) are saved with
``save_pretrained``, loaded with :func:`fedalign.models.hf.load_pretrained`, and compared on a
right-padded batch: logits, router logits and top-k expert choices at unpadded positions.
"""

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from safetensors.torch import save_file as torch_save_file  # noqa: E402

from fedalign.models import MoEConfig, MoEModel, build_module, family_config  # noqa: E402
from fedalign.models import hf  # noqa: E402
from fedalign.models.hf import CheckpointError  # noqa: E402
from fedalign.models.moe import MoEBlock, Router  # noqa: E402

TOL = 1e-4
VOCAB = 100
IDS = np.random.default_rng(0).integers(3, VOCAB, (2, 7))
MASK = np.ones((2, 7), np.int64)
MASK[1, 4:] = 0  # right padding
VALID = MASK.astype(bool)

# Configs differ in experts, top-k, shared experts, norm_topk_prob, GQA, head_dim, dense layers,
# tied embeddings, biases and clip_qkv.
HF_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "olmoe": lambda: transformers.OlmoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=6,
        num_experts_per_tok=3,
        clip_qkv=2.0,
        pad_token_id=0,
        eos_token_id=2,
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=40,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=1,
        mlp_only_layers=[0],
        tie_word_embeddings=True,
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=24,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    ),
}
FAMILIES = list(HF_CONFIGS)


def randomize(module: "torch.nn.Module", seed: int = 1, router_std: float = 1.0) -> None:
  """Weights large enough that logits and routing are far from trivial."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name:
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("gate.weight") and "shared" not in name:
        p.copy_(router_std * noise)
      else:
        p.copy_(0.15 * noise)


def forward_with_routers(model: MoEModel, ids, mask):
  """(logits, {layer: (router_logits, top_idx)}) of our model, router outputs captured."""
  module = model.module

  @jax.jit
  def run(params, ids, mask):
    return module.apply(
        {"params": params},
        ids,
        mask,
        mutable=["intermediates"],
        capture_intermediates=lambda mdl, _: isinstance(mdl, Router),
    )

  (logits, _), state = run(model.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))
  routers = {}
  for layer, sub in state["intermediates"].items():
    logits_r, _, _, top_idx = sub["mlp"]["router"]["__call__"][0]
    routers[int(layer.split("_")[1])] = (np.asarray(logits_r), np.asarray(top_idx))
  return np.asarray(logits), routers


def torch_logits(model, ids=IDS, mask=MASK, **kw):
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)


@dataclasses.dataclass
class Case:
  family: str
  directory: pathlib.Path
  torch_model: object
  torch_out: object
  model: MoEModel
  logits: np.ndarray
  routers: dict


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory) -> Case:
  family = request.param
  torch.manual_seed(0)
  config = HF_CONFIGS[family]()
  config._attn_implementation = "eager"
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  randomize(model)
  directory = tmp_path_factory.mktemp(family)
  model.save_pretrained(directory)
  out = torch_logits(model, output_router_logits=True)
  ours = hf.load_pretrained(directory)
  logits, routers = forward_with_routers(ours, IDS, MASK)
  return Case(family, directory, model, out, ours, logits, routers)


def test_save_pretrained_of_transformers_writes_per_expert_layout(case):
  with safe_open(str(case.directory / "model.safetensors"), "np") as f:
    keys = list(f.keys())
  assert not any("gate_up_proj" in k for k in keys)
  expert = "block_sparse_moe.experts.0.w1" if case.family == "mixtral" else "experts.0.gate_proj"
  assert any(expert in k for k in keys)


def test_logit_parity(case):
  ref = case.torch_out.logits.numpy()
  assert ref[VALID].std() > 0.3  # a meaningful comparison, not near-zero logits
  np.testing.assert_allclose(case.logits[VALID], ref[VALID], atol=TOL, rtol=0)


def test_router_parity(case):
  torch_routers = case.torch_out.router_logits
  moe_layers = case.model.config.moe_layer_ids
  assert len(torch_routers) == len(moe_layers) == len(case.routers) > 0
  k = case.model.config.top_k
  valid = VALID.reshape(-1)
  for layer, ref in zip(moe_layers, torch_routers):
    ref = ref.float().numpy()
    ours_logits, ours_idx = case.routers[layer]
    np.testing.assert_allclose(ours_logits[valid], ref[valid], atol=TOL, rtol=0)
    ref_idx = np.sort(torch.topk(torch.tensor(ref), k, dim=-1).indices.numpy(), axis=-1)
    np.testing.assert_array_equal(np.sort(ours_idx, axis=-1)[valid], ref_idx[valid])
    assert len(np.unique(ours_idx[valid])) > 1  # routing is not degenerate


def test_round_trip_through_transformers(case, tmp_path):
  hf.save_pretrained(case.model, tmp_path)
  loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, output_loading_info=True, attn_implementation="eager"
  )
  assert not any(
      info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
  ), info
  ref = torch_logits(loaded.eval()).logits.numpy()
  np.testing.assert_allclose(ref[VALID], case.logits[VALID], atol=TOL, rtol=0)
  again = hf.load_pretrained(tmp_path)
  assert again.config == case.model.config
  jax.tree.map(np.testing.assert_array_equal, again.params, case.model.params)


def test_fused_expert_layout_loads_same_params(case, tmp_path):
  # transformers 5.x holds experts fused in memory: write that state dict as a checkpoint.
  state = {k: v.detach().clone().contiguous() for k, v in case.torch_model.state_dict().items()}
  assert any(k.endswith("experts.gate_up_proj") for k in state)
  torch_save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  shutil.copy(case.directory / "config.json", tmp_path / "config.json")
  fused = hf.load_pretrained(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, fused.params, case.model.params)


def test_sharded_checkpoint(tmp_path):
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS["mixtral"]())
  randomize(model)
  model.save_pretrained(tmp_path / "one")
  model.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
  assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
  a = hf.load_pretrained(tmp_path / "one")
  b = hf.load_pretrained(tmp_path / "sharded")
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def deepseek_torch_config(**kw):
  fields = dict(
      vocab_size=VOCAB,
      hidden_size=32,
      intermediate_size=48,
      moe_intermediate_size=8,
      num_hidden_layers=2,
      num_attention_heads=4,
      n_routed_experts=6,
      num_experts_per_tok=2,
      n_shared_experts=2,
      routed_scaling_factor=2.5,
      norm_topk_prob=False,
      topk_method="greedy",
      first_k_dense_replace=1,
  )
  fields.update(kw)
  return transformers.DeepseekV2Config(**fields)


def test_deepseek_moe_block_parity():
  from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

  torch.manual_seed(0)
  config = deepseek_torch_config()
  block = DeepseekV2Moe(config).eval()
  randomize(block)
  x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    ref = block(x).numpy()
    _, _, ref_idx = block.gate(x)
  # Our block from the same tensors, through hf.py's DeepSeek names (shared_experts, gate).
  cfg = family_config(
      "deepseek_moe",
      hidden_size=32,
      num_heads=4,
      num_kv_heads=4,
      num_experts=6,
      top_k=2,
      moe_intermediate_size=8,
      shared_expert_intermediate_size=16,
      routed_scaling_factor=2.5,
      norm_topk_prob=False,
  )
  store = hf.TensorStore.from_arrays(
      {f"model.layers.0.mlp.{k}": v.detach().numpy() for k, v in block.state_dict().items()}
  )
  experts = hf._read_experts(store, cfg, "model.layers.0.mlp.experts")
  xj = jnp.asarray(x.numpy())
  expected = jax.eval_shape(MoEBlock(cfg).init, jax.random.key(0), xj)["params"]

  def leaf(path, spec):
    keys = hf._path_keys(path)
    if keys[0] == "experts":
      return jnp.asarray(experts[keys[1]])
    name, transpose = hf.hf_name(cfg, ("layers_0", "mlp") + keys, store)
    value = store.get(name, spec.shape[::-1] if transpose else spec.shape)
    return jnp.asarray(value.T if transpose else value)

  params = jax.tree_util.tree_map_with_path(leaf, expected)
  assert not store.unused()
  (out, _, _), state = MoEBlock(cfg).apply(
      {"params": params},
      xj,
      mutable=["intermediates"],
      capture_intermediates=lambda mdl, _: isinstance(mdl, Router),
  )
  np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)
  assert np.abs(ref).max() > 0.1
  top_idx = state["intermediates"]["router"]["__call__"][0][3]
  np.testing.assert_array_equal(np.sort(np.asarray(top_idx), -1), np.sort(ref_idx.numpy(), -1))


def test_deepseek_v1_checkpoint_round_trip(tmp_path):
  cfg = family_config(
      "deepseek_moe",
      vocab_size=VOCAB,
      hidden_size=32,
      num_layers=3,
      num_heads=4,
      num_kv_heads=4,
      num_experts=4,
      top_k=2,
      moe_intermediate_size=8,
      shared_expert_intermediate_size=16,
      intermediate_size=24,
      first_k_dense=1,
      routed_scaling_factor=1.5,
  )
  model = random_model(cfg, seed=3)
  hf.save_pretrained(model, tmp_path)
  raw = json.loads((tmp_path / "config.json").read_text())
  assert raw["model_type"] == "deepseek" and raw["n_shared_experts"] == 2
  assert raw["first_k_dense_replace"] == 1 and raw["n_routed_experts"] == 4
  with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
    keys = set(f.keys())
  assert {
      "model.layers.0.mlp.gate_proj.weight",
      "model.layers.1.mlp.gate.weight",
      "model.layers.2.mlp.shared_experts.down_proj.weight",
      "model.layers.2.mlp.experts.3.up_proj.weight",
  } <= keys
  again = hf.load_pretrained(tmp_path)
  assert again.config == cfg
  jax.tree.map(np.testing.assert_array_equal, again.params, model.params)


def test_deepseek_config_mapping():
  raw = {
      "model_type": "deepseek",
      "vocab_size": 64,
      "hidden_size": 32,
      "intermediate_size": 40,
      "moe_intermediate_size": 8,
      "num_hidden_layers": 6,
      "num_attention_heads": 4,
      "n_routed_experts": 8,
      "num_experts_per_tok": 3,
      "n_shared_experts": 2,
      "first_k_dense_replace": 1,
      "moe_layer_freq": 2,
      "norm_topk_prob": True,
      "aux_loss_alpha": 0.005,
  }
  cfg = hf.config_from_hf(raw)
  assert cfg.family == "deepseek_moe" and cfg.num_experts == 8 and cfg.top_k == 3
  assert cfg.shared_expert_intermediate_size == 16 and not cfg.shared_expert_gate
  assert cfg.moe_layer_ids == (2, 4)  # layer_idx >= 1 and layer_idx % 2 == 0
  assert cfg.norm_topk_prob and cfg.routed_scaling_factor == 1.0
  assert cfg.router_aux_loss_coef == 0.005 and cfg.num_kv_heads == 4


@pytest.mark.parametrize(
    "raw",
    [
        {"model_type": "deepseek_v2", "kv_lora_rank": 512, "q_lora_rank": None},
        {"model_type": "deepseek", "kv_lora_rank": 512},
    ],
)
def test_mla_rejected(raw):
  with pytest.raises(CheckpointError, match="kv_lora_rank.*MLA|MLA.*kv_lora_rank"):
    hf.config_from_hf(raw)


def test_hf_defaults_match_transformers():
  classes = {
      "mixtral": transformers.MixtralConfig,
      "olmoe": transformers.OlmoeConfig,
      "qwen2_moe": transformers.Qwen2MoeConfig,
      "qwen3_moe": transformers.Qwen3MoeConfig,
  }
  for model_type, cls in classes.items():
    default = cls()
    for name, value in hf.HF_DEFAULTS[model_type].items():
      if name == "rope_theta":
        actual = default.rope_parameters["rope_theta"]
      elif name == "num_key_value_heads" and value is None:
        actual, value = default.num_key_value_heads, default.num_attention_heads
      elif name == "mlp_only_layers":
        actual, value = default.mlp_only_layers or None, value
      elif name == "sliding_window" and model_type != "mixtral":
        continue
      else:
        actual = getattr(default, name)
      assert actual == value, (model_type, name, actual, value)


# ----------------------------------------------------------------------------- LoRA, dtypes


def tiny(family="qwen3_moe", **kw):
  fields = dict(
      vocab_size=VOCAB,
      hidden_size=32,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      num_experts=4,
      top_k=2,
      moe_intermediate_size=16,
      intermediate_size=24,
  )
  fields.update(kw)
  return family_config(family, **fields)


def random_model(cfg: MoEConfig, seed: int = 0, std: float = 0.3) -> MoEModel:
  """Random params without compiling the model's init (norm scales around 1)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(build_module(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))[
      "params"
  ]
  return MoEModel(
      cfg,
      jax.tree_util.tree_map_with_path(
          lambda p, s: jnp.asarray(rng.normal(float(p[-1].key == "scale"), std, s.shape), s.dtype),
          shapes,
      ),
  )


def test_save_merges_lora(tmp_path):
  cfg = tiny(lora_rank=2, lora_targets=("attention", "experts"))
  model = random_model(cfg, seed=1, std=0.2)  # non-zero adapters, so that merging matters
  hf.save_pretrained(model, tmp_path)
  merged = hf.load_pretrained(tmp_path)
  assert merged.config.lora_rank == 0
  ids, valid = jnp.asarray(IDS), jnp.asarray(VALID)
  a = jax.jit(lambda p: model.module.apply({"params": p}, ids, valid)[0])(model.params)
  run_merged = jax.jit(lambda p: merged.module.apply({"params": p}, ids, valid)[0])
  b = run_merged(merged.params)
  np.testing.assert_allclose(np.asarray(a)[VALID], np.asarray(b)[VALID], atol=TOL, rtol=0)
  # ... and the adapters mattered: the base weights alone compute something else.
  c = run_merged(_without_lora(model.params))
  assert float(jnp.max(jnp.abs(a - c))) > 1e-2


def _without_lora(tree):
  if isinstance(tree, dict):
    return {k: _without_lora(v) for k, v in tree.items() if not k.endswith(("lora_a", "lora_b"))}
  return tree


def test_load_with_fresh_lora_adapters(tmp_path):
  base = random_model(tiny(), seed=2)
  hf.save_pretrained(base, tmp_path)
  model = hf.load_pretrained(tmp_path, lora_rank=4, lora_alpha=8.0)
  assert model.config.lora_rank == 4
  q = model.params["layers_0"]["attn"]["q_proj"]
  assert q["lora_b"].shape == (4, 32) and not np.any(q["lora_b"])  # B = 0: same function
  assert 0.5 / 32**0.5 < float(jnp.std(q["lora_a"])) < 2 / 32**0.5
  experts = model.params["layers_1"]["mlp"]["experts"]
  assert experts["wo_lora_a"].shape == (4, 16, 4) and not np.any(experts["wo_lora_b"])
  lora_leaves = [
      p for p, _ in jax.tree_util.tree_leaves_with_path(model.params) if "lora" in str(p[-1])
  ]
  assert len(lora_leaves) == 2 * (4 * 2 + 3 * 2)  # per layer: q,k,v,o and 3 expert weights
  np.testing.assert_array_equal(
      model.params["layers_1"]["mlp"]["experts"]["wi_0"],
      base.params["layers_1"]["mlp"]["experts"]["wi_0"],
  )
  with pytest.raises(CheckpointError, match="hidden_size"):
    hf.load_pretrained(tmp_path, hidden_size=64)


def test_bfloat16_checkpoint(tmp_path):
  model = random_model(tiny(dtype="bfloat16", param_dtype="bfloat16"), seed=4)
  hf.save_pretrained(model, tmp_path)
  with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
    assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    assert f.get_slice("model.layers.0.mlp.gate.weight").get_dtype() == "F32"  # router
  again = hf.load_pretrained(tmp_path, "bfloat16")
  assert again.params["embed"]["embedding"].dtype == jnp.bfloat16
  assert again.params["layers_0"]["mlp"]["router"]["kernel"].dtype == jnp.float32
  jax.tree.map(np.testing.assert_array_equal, again.params, model.params)


def test_save_refuses_what_the_family_cannot_express(tmp_path):
  cfg = tiny("mixtral", shared_expert_intermediate_size=8)
  with pytest.raises(CheckpointError, match="shared_expert_intermediate_size"):
    hf.save_pretrained(MoEModel(cfg, {}), tmp_path)  # refused before params are read
  with pytest.raises(CheckpointError, match="family"):
    hf.config_to_hf(dataclasses.replace(tiny(), family="custom"))


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> pathlib.Path:
  directory = tmp_path_factory.mktemp("saved")
  hf.save_pretrained(random_model(tiny("qwen2_moe", shared_expert_intermediate_size=8)), directory)
  return directory


def edited_copy(src: pathlib.Path, dst: pathlib.Path, config=None, tensors=None):
  dst.mkdir(exist_ok=True)
  raw = json.loads((src / "config.json").read_text())
  (dst / "config.json").write_text(json.dumps(config(raw) if config else raw))
  with safe_open(str(src / "model.safetensors"), "np") as f:
    arrays = {k: f.get_tensor(k) for k in f.keys()}
  save_file(tensors(arrays) if tensors else arrays, str(dst / "model.safetensors"))
  return dst


def test_error_wrong_model_type(saved, tmp_path):
  d = edited_copy(saved, tmp_path, config=lambda c: {**c, "model_type": "llama"})
  with pytest.raises(CheckpointError, match=r"config\.json.*model_type='llama'.*mixtral"):
    hf.load_pretrained(d)


def test_error_missing_tensor(saved, tmp_path):
  key = "model.layers.1.mlp.experts.2.up_proj.weight"
  d = edited_copy(saved, tmp_path, tensors=lambda t: {k: v for k, v in t.items() if k != key})
  with pytest.raises(CheckpointError, match=rf"{key}.*missing from .*model\.safetensors"):
    hf.load_pretrained(d)


def test_error_mismatched_shape(saved, tmp_path):
  key = "model.layers.0.self_attn.k_proj.weight"
  d = edited_copy(saved, tmp_path, tensors=lambda t: {**t, key: t[key][:, :-1]})
  with pytest.raises(
      CheckpointError,
      match=rf"model\.safetensors: tensor '{key}' has shape \(16, 31\), " r"expected \(16, 32\)",
  ):
    hf.load_pretrained(d)


def test_error_unexpected_tensors(saved, tmp_path):
  d = edited_copy(
      saved,
      tmp_path,
      tensors=lambda t: {
          **t,
          "model.layers.0.mlp.experts.9.up_proj.weight": np.zeros((16, 32), np.float32),
          "extra.bias": np.zeros(3, np.float32),
      },
  )
  with pytest.raises(CheckpointError, match=r"2 unexpected tensor.*extra\.bias.*experts\.9"):
    hf.load_pretrained(d)


def test_error_fused_and_per_expert_mixed(saved, tmp_path):
  d = edited_copy(
      saved,
      tmp_path,
      tensors=lambda t: {
          **t,
          "model.layers.0.mlp.experts.gate_up_proj": np.zeros((4, 32, 32), np.float32),
      },
  )
  with pytest.raises(CheckpointError, match="both fused"):
    hf.load_pretrained(d)


def test_error_no_weights(saved, tmp_path):
  shutil.copy(saved / "config.json", tmp_path / "config.json")
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(CheckpointError, match=r"model\.safetensors.*pytorch_model\.bin"):
    hf.load_pretrained(tmp_path)


BASE = dict(
    model_type="mixtral",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
)


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(num_attention_heads=0), "num_attention_heads"),
        (dict(num_key_value_heads=3), "num_kv_heads"),
        (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (
            dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
            "rope_type",
        ),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
        (dict(sliding_window=16), "sliding_window"),
        (
            dict(model_type="qwen2_moe", num_experts=4, use_sliding_window=True),
            "use_sliding_window",
        ),
        (dict(model_type="qwen3_moe", num_experts=4, mlp_only_layers=[5]), "mlp_only_layers"),
        (dict(model_type="olmoe", num_experts=4, attention_bias=True), "attention_bias"),
        (dict(quantization_config={"quant_method": "fp8"}), "quantization_config"),
    ],
)
def test_error_config_fields(change, field):
  with pytest.raises(CheckpointError, match=field):
    hf.config_from_hf({**BASE, **change}, source="ckpt/config.json")


def test_inactive_sliding_window_and_legacy_rope_accepted():
  cfg = hf.config_from_hf(
      {**BASE, "sliding_window": None, "rope_theta": 500.0, "rope_scaling": None}
  )
  assert cfg.rope_theta == 500.0 and cfg.num_experts == 4 and cfg.norm_topk_prob
  cfg = hf.config_from_hf(
      {
          **BASE,
          "model_type": "qwen2_moe",
          "num_experts": 4,
          "use_sliding_window": False,
          "sliding_window": 4096,
      }
  )
  assert cfg.shared_expert_gate and cfg.qkv_bias and cfg.rope_theta == 10000.0


# config.json of published checkpoints (architecture fields as on the hub).
REAL_CONFIGS = {
    "Mixtral-8x7B-v0.1": dict(
        model_type="mixtral",
        hidden_act="silu",
        hidden_size=4096,
        intermediate_size=14336,
        max_position_embeddings=32768,
        num_attention_heads=32,
        num_experts_per_tok=2,
        num_hidden_layers=32,
        num_key_value_heads=8,
        num_local_experts=8,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        router_aux_loss_coef=0.02,
        sliding_window=None,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        vocab_size=32000,
    ),
    "OLMoE-1B-7B-0924": dict(
        model_type="olmoe",
        attention_bias=False,
        clip_qkv=None,
        hidden_act="silu",
        hidden_size=2048,
        intermediate_size=1024,
        max_position_embeddings=4096,
        norm_topk_prob=False,
        num_attention_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
        num_hidden_layers=16,
        num_key_value_heads=16,
        rms_norm_eps=1e-5,
        rope_scaling=None,
        rope_theta=10000.0,
        router_aux_loss_coef=0.01,
        vocab_size=50304,
    ),
    "Qwen1.5-MoE-A2.7B": dict(
        model_type="qwen2_moe",
        hidden_act="silu",
        hidden_size=2048,
        intermediate_size=5632,
        max_position_embeddings=8192,
        max_window_layers=21,
        num_attention_heads=16,
        num_hidden_layers=24,
        num_key_value_heads=16,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        sliding_window=32768,
        use_sliding_window=False,
        vocab_size=151936,
        decoder_sparse_step=1,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        num_experts_per_tok=4,
        num_experts=60,
        norm_topk_prob=False,
        router_aux_loss_coef=0.001,
    ),
    "Qwen3-30B-A3B": dict(
        model_type="qwen3_moe",
        attention_bias=False,
        decoder_sparse_step=1,
        head_dim=128,
        hidden_act="silu",
        hidden_size=2048,
        intermediate_size=6144,
        max_position_embeddings=40960,
        max_window_layers=48,
        mlp_only_layers=[],
        moe_intermediate_size=768,
        norm_topk_prob=True,
        num_attention_heads=32,
        num_experts=128,
        num_experts_per_tok=8,
        num_hidden_layers=48,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_scaling=None,
        rope_theta=1e6,
        sliding_window=None,
        use_sliding_window=False,
        vocab_size=151936,
    ),
    "deepseek-moe-16b-base": dict(
        model_type="deepseek",
        attention_bias=False,
        aux_loss_alpha=0.001,
        first_k_dense_replace=1,
        hidden_act="silu",
        hidden_size=2048,
        intermediate_size=10944,
        max_position_embeddings=4096,
        moe_intermediate_size=1408,
        moe_layer_freq=1,
        n_routed_experts=64,
        n_shared_experts=2,
        norm_topk_prob=False,
        num_attention_heads=16,
        num_experts_per_tok=6,
        num_hidden_layers=28,
        num_key_value_heads=16,
        pretraining_tp=1,
        rms_norm_eps=1e-6,
        rope_scaling=None,
        rope_theta=10000,
        scoring_func="softmax",
        seq_aux=True,
        vocab_size=102400,
    ),
}
REAL_EXPECTED = {  # (family, experts, top_k, shared width, MoE layers, head_dim, norm top-k)
    "Mixtral-8x7B-v0.1": ("mixtral", 8, 2, 0, 32, 128, True),
    "OLMoE-1B-7B-0924": ("olmoe", 64, 8, 0, 16, 128, False),
    "Qwen1.5-MoE-A2.7B": ("qwen2_moe", 60, 4, 5632, 24, 128, False),
    "Qwen3-30B-A3B": ("qwen3_moe", 128, 8, 0, 48, 128, True),
    "deepseek-moe-16b-base": ("deepseek_moe", 64, 6, 2816, 27, 128, False),
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_published_configs_map(name):
  cfg = hf.config_from_hf(REAL_CONFIGS[name], "bfloat16")
  got = (
      cfg.family,
      cfg.num_experts,
      cfg.top_k,
      cfg.shared_expert_intermediate_size,
      len(cfg.moe_layer_ids),
      cfg.resolved_head_dim,
      cfg.norm_topk_prob,
  )
  assert got == REAL_EXPECTED[name]
  assert hf.config_from_hf(hf.config_to_hf(cfg), "bfloat16") == cfg  # config round trip

"""Hugging Face checkpoint I/O for the MoE decoder LMs (local directories only, never a hub).

:func:`load_pretrained` reads ``config.json`` plus ``model.safetensors`` (or the shards listed by
``model.safetensors.index.json``) of a Mixtral (``model_type`` ``mixtral``), OLMoE (``olmoe``),
Qwen2-MoE (``qwen2_moe``), Qwen3-MoE (``qwen3_moe``) or DeepSeek-MoE v1 (``deepseek``: the
``deepseek-ai/deepseek-moe-16b`` checkpoints, whose attention is Llama-like) checkpoint and
returns a :class:`~fedalign.models.api.MoEModel`. DeepSeek-V2/V3 checkpoints use multi-head
latent attention (MLA), which this model does not implement: they are rejected.

Expert weights are accepted in both layouts:

* per expert, as checkpoints on the hub and transformers' ``save_pretrained`` write them:
  ``...mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`` (Mixtral:
  ``...block_sparse_moe.experts.{e}.w1/w3/w2.weight``);
* fused, as transformers 5.x holds them in memory: ``...mlp.experts.gate_up_proj`` (E, 2F, D)
  and ``...mlp.experts.down_proj`` (E, D, F).

:func:`save_pretrained` writes ``config.json`` and one ``model.safetensors`` in the per-expert
layout with the family's own tensor names (Mixtral: ``block_sparse_moe.experts.{e}.w1/w2/w3``),
which is what transformers (5.x, tested; also 4.x's layout) writes itself and what
``AutoModelForCausalLM.from_pretrained`` loads into its fused experts. LoRA adapters are merged into the base weights (W + alpha/r * A B) before
writing, so the saved model computes what the adapted model computes. DeepSeek-MoE is written
in the v1 format (``model_type`` ``deepseek``), which transformers loads only with the original
remote code (``trust_remote_code``); :func:`load_pretrained` reads it back.

Anything the model cannot represent (rope scaling, an active sliding window, MLA, biases other
than Qwen2's q/k/v biases, an activation other than SiLU, quantised weights) raises
:class:`CheckpointError` naming the field; so do a missing tensor, a tensor of the wrong shape
and tensors that nothing uses (listed). Nothing is broadcast, truncated or skipped silently;
the only tensors ignored are rotary ``inv_freq`` buffers and, with tied embeddings, an
``lm_head.weight`` equal to the embedding.

Example:
  >>> import tempfile, jax.numpy as jnp
  >>> from fedalign.models import MoEModel, family_config
  >>> cfg = family_config('mixtral', vocab_size=64, hidden_size=16, num_layers=1,
  ...                     num_heads=2, num_kv_heads=1, num_experts=4, top_k=2,
  ...                     moe_intermediate_size=8, intermediate_size=8)
  >>> model = MoEModel.random(cfg)
  >>> d = tempfile.mkdtemp()
  >>> _ = save_pretrained(model, d)
  >>> again = load_pretrained(d)
  >>> bool(jnp.all(again.params['layers_0']['mlp']['experts']['wi_0']
  ...              == model.params['layers_0']['mlp']['experts']['wi_0']))
  True
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from fedalign.models.api import MoEModel, build_module
from fedalign.models.config import DTYPES, MoEConfig, family_config
from fedalign.models.hf_files import (  # noqa: F401 (part of this module's API)
    CONFIG_NAME,
    IGNORED_SUFFIXES,
    INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    TensorStore,
    read_config,
)
from fedalign.models.tree import get_path

PyTree = Any


#: HF ``model_type`` -> MoEConfig family.
MODEL_TYPES = {
    "mixtral": "mixtral",
    "olmoe": "olmoe",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "deepseek": "deepseek_moe",
}
#: MoEConfig family -> (HF model_type, architectures entry) written by save_pretrained.
_ARCHITECTURES = {
    "mixtral": ("mixtral", "MixtralForCausalLM"),
    "olmoe": ("olmoe", "OlmoeForCausalLM"),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "deepseek_moe": ("deepseek", "DeepseekForCausalLM"),
}
_MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2")

# Defaults of the HF config classes (transformers 5.x; DeepSeek: the v1 remote-code
# DeepseekConfig), used for fields a config.json leaves out.
_COMMON_DEFAULTS = dict(
    hidden_act="silu", initializer_range=0.02, tie_word_embeddings=False, head_dim=None
)
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096 * 32,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.001,
        sliding_window=None,
    ),
    "olmoe": dict(
        vocab_size=50304,
        hidden_size=2048,
        intermediate_size=2048,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=None,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        num_experts=64,
        num_experts_per_tok=8,
        router_aux_loss_coef=0.01,
        norm_topk_prob=False,
        clip_qkv=None,
        attention_bias=False,
    ),
    "qwen2_moe": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        num_experts=60,
        num_experts_per_tok=4,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        norm_topk_prob=False,
        router_aux_loss_coef=0.001,
        decoder_sparse_step=1,
        mlp_only_layers=None,
        qkv_bias=True,
        use_sliding_window=False,
    ),
    "qwen3_moe": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=False,
        router_aux_loss_coef=0.001,
        decoder_sparse_step=1,
        mlp_only_layers=None,
        attention_bias=False,
        use_sliding_window=False,
    ),
    "deepseek": dict(
        vocab_size=102400,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=30,
        num_attention_heads=32,
        num_key_value_heads=None,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        n_routed_experts=None,
        n_shared_experts=None,
        num_experts_per_tok=None,
        moe_intermediate_size=1407,
        moe_layer_freq=1,
        first_k_dense_replace=0,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        scoring_func="softmax",
        aux_loss_alpha=0.001,
        attention_bias=False,
        mlp_bias=False,
    ),
}

# Our names <-> HF names of the gated MLP projections.
_MLP_NAMES = {"wi_0": "gate_proj", "wi_1": "up_proj", "wo": "down_proj"}
_MIXTRAL_EXPERT_NAMES = {"wi_0": "w1", "wi_1": "w3", "wo": "w2"}
# Fields of MoEConfig that load_pretrained may override (they change no weight shape).
OVERRIDABLE = (
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "moe_impl",
    "capacity_factor",
    "moe_block_size",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "initializer_range",
)


# --------------------------------------------------------------------------------------------
# config.json -> MoEConfig
# --------------------------------------------------------------------------------------------


class _Fields:
  """Typed, range-checked access to config.json fields with the family's HF defaults."""

  def __init__(self, raw: Mapping[str, Any], defaults: Mapping[str, Any], source: str):
    self.raw, self.defaults, self.source = raw, {**_COMMON_DEFAULTS, **defaults}, source

  def bad(self, name: str, expected: str, value: Any = None) -> CheckpointError:
    value = self.raw.get(name, self.defaults.get(name)) if value is None else value
    return CheckpointError(
        f"{self.source}: field {name!r}={value!r} is not supported: " f"expected {expected}."
    )

  def get(self, name: str) -> Any:
    return self.raw[name] if name in self.raw else self.defaults.get(name)

  def int(self, name: str, minimum: int = 1, allow_none: bool = False) -> int | None:
    value = self.get(name)
    if value is None and allow_none:
      return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise self.bad(name, f"an integer >= {minimum}", value)
    return value

  def float(self, name: str, positive: bool = False, allow_none: bool = False) -> float | None:
    value = self.get(name)
    if value is None and allow_none:
      return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (positive and not value > 0)
        or not np.isfinite(value)
    ):
      raise self.bad(name, "a positive number" if positive else "a finite number", value)
    return float(value)

  def bool(self, name: str) -> bool:
    value = self.get(name)
    if not isinstance(value, bool):
      raise self.bad(name, "true or false", value)
    return value

  def alias_int(self, names: tuple[str, ...], minimum: int = 1) -> tuple[str, int]:
    """The first of several synonymous fields present (they must agree when several are)."""
    present = [n for n in names if self.raw.get(n) is not None]
    if not present:
      name = next((n for n in names if self.defaults.get(n) is not None), None)
      if name is None:
        raise self.bad(names[0], f"an integer >= {minimum} (the field is missing)")
      return name, self.int(name, minimum)
    values = {n: self.int(n, minimum) for n in present}
    if len(set(values.values())) > 1:
      raise CheckpointError(f"{self.source}: fields {values} disagree: expected one value.")
    return present[0], values[present[0]]


def _rope_theta(f: _Fields) -> float:
  """rope_theta from rope_parameters (5.x) or rope_theta/rope_scaling (4.x); default rope only."""
  theta = None
  params = f.raw.get("rope_parameters")
  if params is not None:
    if not isinstance(params, dict):
      raise f.bad("rope_parameters", "a dict with rope_type 'default'")
    if params and all(isinstance(v, dict) for v in params.values()):
      raise f.bad("rope_parameters", "a single (not per-layer-type) rope dict")
    rtype = params.get("rope_type", params.get("type", "default"))
    if rtype != "default":
      raise CheckpointError(
          f"{f.source}: field 'rope_parameters.rope_type'={rtype!r} is not "
          "supported: expected 'default' (no rope scaling)."
      )
    prf = params.get("partial_rotary_factor", 1.0)
    if prf != 1.0:
      raise CheckpointError(
          f"{f.source}: field 'rope_parameters.partial_rotary_factor'="
          f"{prf!r} is not supported: expected 1.0."
      )
    theta = params.get("rope_theta")
  scaling = f.raw.get("rope_scaling")
  if scaling is not None:
    rtype = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
    if rtype != "default":
      raise f.bad("rope_scaling", "null (rope scaling is not implemented)")
  if f.raw.get("partial_rotary_factor", 1.0) != 1.0:
    raise f.bad("partial_rotary_factor", "1.0")
  legacy = f.raw.get("rope_theta")
  if theta is not None and legacy is not None and float(theta) != float(legacy):
    raise CheckpointError(
        f"{f.source}: 'rope_theta'={legacy!r} disagrees with "
        f"'rope_parameters.rope_theta'={theta!r}."
    )
  value = theta if theta is not None else legacy if legacy is not None else f.defaults["rope_theta"]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
    raise f.bad("rope_theta", "a positive number", value)
  return float(value)


def config_from_hf(
    hf: Mapping[str, Any], dtype: str = "float32", source: str = CONFIG_NAME
) -> MoEConfig:
  """Maps a Hugging Face ``config.json`` dict to a validated :class:`MoEConfig`.

  Args:
    hf: the parsed config.json.
    dtype: compute and parameter dtype of the model ('float32', 'bfloat16', 'float16').
    source: file name used in error messages.

  >>> cfg = config_from_hf({'model_type': 'olmoe', 'vocab_size': 64, 'hidden_size': 16,
  ...   'intermediate_size': 8, 'num_hidden_layers': 1, 'num_attention_heads': 2,
  ...   'num_experts': 4, 'num_experts_per_tok': 2})
  >>> cfg.family, cfg.num_experts, cfg.moe_intermediate_size, cfg.qk_norm
  ('olmoe', 4, 8, 'full')
  """
  model_type = hf.get("model_type")
  if model_type in _MLA_MODEL_TYPES or (
      model_type == "deepseek"
      and (hf.get("kv_lora_rank") is not None or hf.get("q_lora_rank") is not None)
  ):
    raise CheckpointError(
        f"{source}: model_type={model_type!r} uses multi-head latent attention (MLA: "
        f"q_lora_rank={hf.get('q_lora_rank')!r}, kv_lora_rank={hf.get('kv_lora_rank')!r}), "
        "which this model does not implement: expected a DeepSeek-MoE v1 checkpoint "
        "(model_type 'deepseek', Llama-like q/k/v/o attention)."
    )
  if model_type not in MODEL_TYPES:
    raise CheckpointError(
        f"{source}: model_type={model_type!r} is not supported: expected "
        f"one of {sorted(MODEL_TYPES)}."
    )
  if dtype not in DTYPES:
    raise CheckpointError(f"dtype={dtype!r} is invalid: expected one of {DTYPES}.")
  if hf.get("quantization_config") is not None:
    raise CheckpointError(
        f"{source}: field 'quantization_config' is set: quantised "
        "checkpoints are not supported (expected plain float weights)."
    )
  f = _Fields(hf, HF_DEFAULTS[model_type], source)
  family = MODEL_TYPES[model_type]
  if f.get("hidden_act") != "silu":
    raise f.bad("hidden_act", "'silu' (SwiGLU experts)")

  num_layers = f.int("num_hidden_layers")
  num_heads = f.int("num_attention_heads")
  kv = f.int("num_key_value_heads", allow_none=True)
  hidden = f.int("hidden_size")
  head_dim = f.int("head_dim", allow_none=True)
  if head_dim is not None and head_dim * num_heads == hidden:
    head_dim = None  # the default: keeps configs comparable across checkpoints
  fields: dict[str, Any] = dict(
      vocab_size=f.int("vocab_size"),
      hidden_size=hidden,
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=num_heads if kv is None else kv,
      head_dim=head_dim,
      rms_norm_eps=f.float("rms_norm_eps", positive=True),
      tie_word_embeddings=f.bool("tie_word_embeddings"),
      max_position_embeddings=f.int("max_position_embeddings"),
      rope_theta=_rope_theta(f),
      initializer_range=f.float("initializer_range", positive=True),
      qk_norm="none",
      qkv_bias=False,
      clip_qkv=None,
      router_bias=False,
      shared_expert_intermediate_size=0,
      shared_expert_gate=False,
      first_k_dense=0,
      moe_every=1,
      dense_layers=(),
      routed_scaling_factor=1.0,
      dtype=dtype,
      param_dtype=dtype,
  )
  if model_type in ("olmoe", "qwen3_moe", "deepseek") and f.bool("attention_bias"):
    raise f.bad(
        "attention_bias", "false (attention biases are not implemented for " f"{model_type})"
    )
  if f.raw.get("mlp_bias"):
    raise f.bad("mlp_bias", "false")

  def experts_and_top_k(names: tuple[str, ...]) -> None:
    name, e = f.alias_int(names, minimum=0)
    fields["num_experts"] = e
    if e > 0:
      k = f.int("num_experts_per_tok")
      if k > e:
        raise f.bad("num_experts_per_tok", f"an integer in [1, {name}={e}]", k)
      fields["top_k"] = k

  def qwen_layers() -> None:
    step = f.int("decoder_sparse_step")
    only = f.get("mlp_only_layers") or []
    if not isinstance(only, list) or any(
        isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers for i in only
    ):
      raise f.bad("mlp_only_layers", f"a list of layer indices in [0, {num_layers})")
    fields.update(moe_every=step, dense_layers=tuple(sorted(set(only))))
    if f.get("use_sliding_window"):
      raise f.bad("use_sliding_window", "false (sliding-window attention is not implemented)")
    types = f.raw.get("layer_types")
    if types is not None and any(t != "full_attention" for t in types):
      raise f.bad("layer_types", "only 'full_attention' layers")

  if model_type == "mixtral":
    experts_and_top_k(("num_local_experts", "num_experts"))
    inter = f.int("intermediate_size")
    fields.update(intermediate_size=inter, moe_intermediate_size=inter, norm_topk_prob=True)
    window = f.int("sliding_window", allow_none=True)
    if window is not None and window < fields["max_position_embeddings"]:
      raise f.bad(
          "sliding_window",
          "null or >= max_position_embeddings (sliding-window " "attention is not implemented)",
      )
  elif model_type == "olmoe":
    experts_and_top_k(("num_experts", "num_local_experts"))
    inter = f.int("intermediate_size")
    if head_dim is not None and head_dim * num_heads != hidden:
      raise f.bad(
          "head_dim",
          f"hidden_size / num_attention_heads = {hidden // num_heads} "
          "(OLMoE's q/k norms span hidden_size)",
      )
    fields.update(
        intermediate_size=inter,
        moe_intermediate_size=inter,
        qk_norm="full",
        norm_topk_prob=f.bool("norm_topk_prob"),
        clip_qkv=f.float("clip_qkv", positive=True, allow_none=True),
    )
  elif model_type == "qwen2_moe":
    experts_and_top_k(("num_experts", "num_local_experts"))
    shared = f.int("shared_expert_intermediate_size")
    fields.update(
        intermediate_size=f.int("intermediate_size"),
        moe_intermediate_size=f.int("moe_intermediate_size"),
        shared_expert_intermediate_size=shared,
        shared_expert_gate=True,
        qkv_bias=f.bool("qkv_bias"),
        norm_topk_prob=f.bool("norm_topk_prob"),
    )
    qwen_layers()
  elif model_type == "qwen3_moe":
    experts_and_top_k(("num_experts", "num_local_experts"))
    fields.update(
        intermediate_size=f.int("intermediate_size"),
        moe_intermediate_size=f.int("moe_intermediate_size"),
        qk_norm="head",
        norm_topk_prob=f.bool("norm_topk_prob"),
    )
    qwen_layers()
  else:  # deepseek (v1)
    experts_and_top_k(("n_routed_experts",))
    if f.get("scoring_func") != "softmax":
      raise f.bad("scoring_func", "'softmax'")
    if f.raw.get("topk_method", "greedy") != "greedy":
      raise f.bad("topk_method", "'greedy' (group-limited routing is not implemented)")
    moe_inter = f.int("moe_intermediate_size")
    n_shared = f.int("n_shared_experts", minimum=0, allow_none=True) or 0
    first_k = f.int("first_k_dense_replace", minimum=0)
    if first_k > num_layers:
      raise f.bad("first_k_dense_replace", f"an integer in [0, num_hidden_layers={num_layers}]")
    freq = f.int("moe_layer_freq")
    fields.update(
        intermediate_size=f.int("intermediate_size"),
        moe_intermediate_size=moe_inter,
        shared_expert_intermediate_size=moe_inter * n_shared,
        first_k_dense=first_k,
        dense_layers=tuple(i for i in range(first_k, num_layers) if i % freq),
        norm_topk_prob=f.bool("norm_topk_prob"),
        routed_scaling_factor=f.float("routed_scaling_factor", positive=True),
    )
  aux_name = "aux_loss_alpha" if model_type == "deepseek" else "router_aux_loss_coef"
  fields["router_aux_loss_coef"] = f.float(aux_name)
  try:
    return family_config(family, **fields)
  except ValueError as err:
    raise CheckpointError(f"{source}: {err}") from None


def config_to_hf(config: MoEConfig) -> dict[str, Any]:
  """The Hugging Face ``config.json`` dict of a config (inverse of :func:`config_from_hf`).

  Raises :class:`CheckpointError` naming the field when the family's HF model cannot express
  the config (e.g. a Mixtral with shared experts).

  >>> config_to_hf(family_config('qwen3_moe', num_experts=4, top_k=2))['model_type']
  'qwen3_moe'
  """
  cfg = config.validate()
  if cfg.family not in _ARCHITECTURES:
    raise CheckpointError(
        f"MoEConfig.family={cfg.family!r} has no Hugging Face format: "
        f"expected one of {sorted(_ARCHITECTURES)}."
    )
  model_type, arch = _ARCHITECTURES[cfg.family]

  def need(field: str, expected: Any, why: str = "") -> None:
    if getattr(cfg, field) != expected:
      raise CheckpointError(
          f"MoEConfig.{field}={getattr(cfg, field)!r} cannot be saved as a Hugging Face "
          f"{model_type} checkpoint: expected {expected!r}{why}."
      )

  if cfg.num_experts < 1:
    need("num_experts", "a positive number of experts")
  need("router_bias", False)
  need("lora_rank", 0, " (merge adapters first: save_pretrained does)")
  moe_layers = cfg.moe_layer_ids
  all_layers = tuple(range(cfg.num_layers))
  hd = cfg.resolved_head_dim
  out: dict[str, Any] = dict(
      architectures=[arch],
      model_type=model_type,
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads,
      hidden_act="silu",
      max_position_embeddings=cfg.max_position_embeddings,
      initializer_range=cfg.initializer_range,
      rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=cfg.tie_word_embeddings,
      attention_dropout=0.0,
      num_experts_per_tok=cfg.top_k,
      router_aux_loss_coef=cfg.router_aux_loss_coef,
      rope_theta=cfg.rope_theta,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      dtype=cfg.param_dtype,
      use_cache=True,
  )
  if cfg.family != "deepseek_moe":
    out["head_dim"] = hd
  if cfg.family in ("mixtral", "olmoe", "qwen3_moe", "deepseek_moe"):
    need("qkv_bias", False)
    need("shared_expert_gate", False)
  if cfg.family != "olmoe":
    need("clip_qkv", None)
  if cfg.family != "deepseek_moe":
    need("routed_scaling_factor", 1.0)
  if cfg.family in ("mixtral", "olmoe"):
    need("shared_expert_intermediate_size", 0)
    if moe_layers != all_layers:
      raise CheckpointError(
          f"MoEConfig: layers {sorted(set(all_layers) - set(moe_layers))} "
          f"are dense, but every {model_type} layer is MoE (expected "
          "first_k_dense=0, moe_every=1, dense_layers=())."
      )
  if cfg.family == "mixtral":
    need("qk_norm", "none")
    need("norm_topk_prob", True, " (Mixtral always renormalises the top-k weights)")
    out.update(
        num_local_experts=cfg.num_experts,
        intermediate_size=cfg.moe_intermediate_size,
        sliding_window=None,
        router_jitter_noise=0.0,
    )
  elif cfg.family == "olmoe":
    need("qk_norm", "full")
    if hd * cfg.num_heads != cfg.hidden_size:
      need("head_dim", None, " (OLMoE's q/k norms span hidden_size)")
    out.update(
        num_experts=cfg.num_experts,
        intermediate_size=cfg.moe_intermediate_size,
        norm_topk_prob=cfg.norm_topk_prob,
        clip_qkv=cfg.clip_qkv,
        attention_bias=False,
    )
  elif cfg.family in ("qwen2_moe", "qwen3_moe"):
    if cfg.family == "qwen2_moe":
      need("qk_norm", "none")
      if cfg.shared_expert_intermediate_size < 1:
        need("shared_expert_intermediate_size", "a positive size (Qwen2-MoE always has one)")
      need("shared_expert_gate", True, " (Qwen2-MoE gates its shared expert)")
      out.update(
          shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
          qkv_bias=cfg.qkv_bias,
          use_sliding_window=False,
          sliding_window=None,
          layer_types=["full_attention"] * cfg.num_layers,
      )
    else:
      need("qk_norm", "head")
      need("shared_expert_intermediate_size", 0)
      out.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    mlp_only = [i for i in all_layers if (i + 1) % cfg.moe_every == 0 and i not in moe_layers]
    out.update(
        num_experts=cfg.num_experts,
        moe_intermediate_size=cfg.moe_intermediate_size,
        intermediate_size=cfg.intermediate_size,
        norm_topk_prob=cfg.norm_topk_prob,
        decoder_sparse_step=cfg.moe_every,
        mlp_only_layers=mlp_only,
    )
  else:  # deepseek_moe -> DeepSeek-MoE v1
    need("qk_norm", "none")
    if hd * cfg.num_heads != cfg.hidden_size:
      need("head_dim", None, " (DeepSeek-MoE v1 has head_dim = hidden_size / heads)")
    first_k = moe_layers[0] if moe_layers else cfg.num_layers
    if not moe_layers or moe_layers != tuple(range(first_k, cfg.num_layers)):
      raise CheckpointError(
          f"MoEConfig: MoE layers {list(moe_layers)} are not 'every layer "
          "from first_k_dense on', which DeepSeek-MoE v1 requires."
      )
    n_shared, rem = divmod(cfg.shared_expert_intermediate_size, cfg.moe_intermediate_size)
    if rem:
      need(
          "shared_expert_intermediate_size",
          f"a multiple of moe_intermediate_size={cfg.moe_intermediate_size}",
      )
    out.pop("router_aux_loss_coef")
    out.update(
        n_routed_experts=cfg.num_experts,
        n_shared_experts=n_shared or None,
        moe_intermediate_size=cfg.moe_intermediate_size,
        intermediate_size=cfg.intermediate_size,
        first_k_dense_replace=first_k,
        moe_layer_freq=1,
        norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor,
        scoring_func="softmax",
        topk_method="greedy",
        aux_loss_alpha=cfg.router_aux_loss_coef,
        seq_aux=True,
        attention_bias=False,
        rope_scaling=None,
    )
  return out


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def _layer(path: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
  return int(path[0].split("_", 1)[1]), path[1:]


def _moe_prefix(cfg: MoEConfig, i: int, store: TensorStore | None = None) -> str:
  """HF name of layer i's MoE module (Mixtral: 'block_sparse_moe', or 'mlp' in 5.x memory)."""
  if cfg.family != "mixtral":
    return f"model.layers.{i}.mlp"
  if store is not None and not any(
      k.startswith(f"model.layers.{i}.block_sparse_moe.") for k in store.locations
  ):
    return f"model.layers.{i}.mlp"
  return f"model.layers.{i}.block_sparse_moe"


def hf_name(
    cfg: MoEConfig, path: tuple[str, ...], store: TensorStore | None = None
) -> tuple[str, bool]:
  """(HF tensor name, whether our array is its transpose) of a non-expert parameter leaf.

  >>> hf_name(family_config('olmoe', num_layers=1), ('layers_0', 'attn', 'k_norm', 'scale'))
  ('model.layers.0.self_attn.k_norm.weight', False)
  """
  if path == ("embed", "embedding"):
    return "model.embed_tokens.weight", False
  if path == ("final_norm", "scale"):
    return "model.norm.weight", False
  if path == ("lm_head", "kernel"):
    return "lm_head.weight", True
  if path[0].startswith("layers_"):
    i, rest = _layer(path)
    pre = f"model.layers.{i}"
    norms = {
        ("input_norm", "scale"): "input_layernorm",
        ("post_attn_norm", "scale"): "post_attention_layernorm",
    }
    if rest in norms:
      return f"{pre}.{norms[rest]}.weight", False
    if rest[0] == "attn" and len(rest) == 3:
      leaf = {"kernel": "weight", "bias": "bias", "scale": "weight"}[rest[2]]
      return f"{pre}.self_attn.{rest[1]}.{leaf}", rest[2] == "kernel"
    if rest[0] == "mlp":
      moe = _moe_prefix(cfg, i, store)
      if rest[1] == "router":
        return f"{moe}.gate.{'weight' if rest[2] == 'kernel' else 'bias'}", rest[2] == "kernel"
      if rest[1] == "shared_expert":
        shared = "shared_experts" if cfg.family == "deepseek_moe" else "shared_expert"
        return f"{moe}.{shared}.{_MLP_NAMES[rest[2]]}.weight", True
      if rest[1] == "shared_expert_gate":
        return f"{moe}.shared_expert_gate.weight", True
      if rest[1] in _MLP_NAMES and len(rest) == 3:
        return f"{pre}.mlp.{_MLP_NAMES[rest[1]]}.weight", True
  raise CheckpointError(f"parameter {'/'.join(path)} has no Hugging Face name.")


def _expected_params(cfg: MoEConfig) -> PyTree:
  module = build_module(cfg)
  return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def _read_experts(store: TensorStore, cfg: MoEConfig, prefix: str) -> dict[str, np.ndarray]:
  """wi_0/wi_1 (E, D, F), wo (E, F, D) from the fused or the per-expert layout."""
  e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
  fused = (f"{prefix}.gate_up_proj", f"{prefix}.down_proj")
  per_expert = [k for k in store.locations if k.startswith(prefix + ".") and k not in fused]
  if any(k in store for k in fused):
    if per_expert:
      raise CheckpointError(
          f"{store.locations[per_expert[0]]}: experts of {prefix} are stored both fused "
          f"({[k for k in fused if k in store]}) and per expert ({per_expert[:3]}...): "
          "expected one layout."
      )
    what = f" = (experts, 2 * intermediate, hidden) for {e} experts"
    gate_up = store.get(fused[0], (e, 2 * f, d), what)
    down = store.get(fused[1], (e, d, f), " = (experts, hidden, intermediate)")
    return {
        "wi_0": np.swapaxes(gate_up[:, :f], 1, 2),
        "wi_1": np.swapaxes(gate_up[:, f:], 1, 2),
        "wo": np.swapaxes(down, 1, 2),
    }
  out = {}
  for ours, hf in _MLP_NAMES.items():
    shape = (d, f) if ours == "wo" else (f, d)
    names = (hf, _MIXTRAL_EXPERT_NAMES[ours])
    if cfg.family == "mixtral":
      names = names[::-1]
    stacked = []
    for j in range(e):
      key = next(
          (f"{prefix}.{j}.{n}.weight" for n in names if f"{prefix}.{j}.{n}.weight" in store),
          f"{prefix}.{j}.{names[0]}.weight",
      )
      stacked.append(store.get(key, shape, f" for expert {j} of {e}"))
    out[ours] = np.swapaxes(np.stack(stacked), 1, 2)
  return out


def params_from_hf(store: TensorStore, cfg: MoEConfig) -> PyTree:
  """Our params tree (no LoRA) from a store of HF tensors; checks names, shapes and extras."""
  base_cfg = cfg.replace(lora_rank=0)
  expected = _expected_params(base_cfg)
  experts_cache: dict[str, dict[str, np.ndarray]] = {}

  def leaf(path, spec):
    keys = _path_keys(path)
    if "experts" in keys:
      pos = keys.index("experts")
      i, _ = _layer(keys)
      prefix = f"{_moe_prefix(cfg, i, store)}.experts"
      if prefix not in experts_cache:
        experts_cache[prefix] = _read_experts(store, cfg, prefix)
      value = experts_cache[prefix][keys[pos + 1]]
    else:
      name, transpose = hf_name(cfg, keys, store)
      shape = spec.shape[::-1] if transpose else spec.shape
      value = store.get(name, shape, f" for {'/'.join(keys)}")
      value = value.T if transpose else value
    return jnp.asarray(value, dtype=spec.dtype)

  params = jax.tree_util.tree_map_with_path(leaf, expected)
  if cfg.tie_word_embeddings and "lm_head.weight" in store:
    shape = (cfg.vocab_size, cfg.hidden_size)
    head = store.get("lm_head.weight", shape)
    if not np.array_equal(head, store.get("model.embed_tokens.weight", shape)):
      raise CheckpointError(
          f"{store.locations['lm_head.weight']}: tie_word_embeddings is true "
          "but 'lm_head.weight' differs from 'model.embed_tokens.weight'."
      )
  extra = store.unused()
  if extra:
    files = sorted({store.locations[k] for k in extra})
    raise CheckpointError(
        f"{len(extra)} unexpected tensor(s) in {', '.join(files)} (not used "
        f"by a {cfg.family} model with this config): {extra[:20]}"
        + (" ..." if len(extra) > 20 else "")
    )
  return params


def params_to_hf(params: PyTree, cfg: MoEConfig) -> dict[str, np.ndarray]:
  """HF tensors (per-expert layout, family names) of a params tree without LoRA leaves."""
  expected = _expected_params(cfg)
  got = jax.tree_util.tree_structure(params)
  if got != jax.tree_util.tree_structure(expected):
    raise CheckpointError(
        f"params do not match MoEConfig (family {cfg.family}): expected the "
        f"tree {jax.tree_util.tree_structure(expected)}, got {got}."
    )
  tensors: dict[str, np.ndarray] = {}
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    keys = _path_keys(path)
    spec = get_path(expected, keys)
    value = np.asarray(value)
    if value.shape != spec.shape:
      raise CheckpointError(
          f"parameter {'/'.join(keys)} has shape {value.shape}, expected " f"{spec.shape}."
      )
    if "experts" in keys:
      i, _ = _layer(keys)
      ours = keys[keys.index("experts") + 1]
      names = _MIXTRAL_EXPERT_NAMES if cfg.family == "mixtral" else _MLP_NAMES
      for j in range(value.shape[0]):
        key = f"{_moe_prefix(cfg, i)}.experts.{j}.{names[ours]}.weight"
        tensors[key] = np.ascontiguousarray(value[j].T)
    else:
      name, transpose = hf_name(cfg, keys)
      tensors[name] = np.ascontiguousarray(value.T if transpose else value)
  return tensors


def merge_lora(params: PyTree, config: MoEConfig) -> PyTree:
  """Folds every LoRA adapter into its base weight: W + (lora_alpha / lora_rank) * A @ B.

  Returns a params tree without LoRA leaves, for ``config.replace(lora_rank=0)``.

  >>> p = {'q': {'kernel': jnp.zeros((2, 2)), 'lora_a': jnp.ones((2, 1)),
  ...            'lora_b': jnp.ones((1, 2))}}
  >>> merge_lora(p, MoEConfig(lora_rank=1, lora_alpha=2.0))['q']['kernel'].tolist()
  [[2.0, 2.0], [2.0, 2.0]]
  """
  if config.lora_rank == 0:
    return params
  scale = config.lora_alpha / config.lora_rank

  def merge(node):
    if not isinstance(node, Mapping):
      return node
    out = {}
    for key, value in node.items():
      if key.endswith(("lora_a", "lora_b")):
        continue
      # LoRADense: kernel + lora_a/lora_b; stacked experts: wi_0 + wi_0_lora_a/wi_0_lora_b.
      a_key = "lora_a" if key == "kernel" else f"{key}_lora_a"
      b_key = "lora_b" if key == "kernel" else f"{key}_lora_b"
      if a_key in node and b_key in node and not isinstance(value, Mapping):
        delta = jnp.matmul(node[a_key].astype(jnp.float32), node[b_key].astype(jnp.float32))
        out[key] = (value.astype(jnp.float32) + scale * delta).astype(value.dtype)
      else:
        out[key] = merge(value)
    return out

  return merge(params)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_pretrained(
    path: str | os.PathLike, dtype: str = "float32", *, seed: int = 0, **overrides: Any
) -> MoEModel:
  """Loads a local Hugging Face checkpoint directory as a :class:`MoEModel`.

  Args:
    path: directory with config.json and model.safetensors (or sharded safetensors with
      model.safetensors.index.json).
    dtype: parameter and compute dtype ('float32', 'bfloat16', 'float16'); routers stay
      float32.
    seed: initialises the LoRA adapters when ``lora_rank`` > 0 is overridden (A random,
      B zero, so the loaded model computes the checkpoint's function).
    **overrides: MoEConfig fields that change no pretrained weight: one of
      :data:`OVERRIDABLE` (e.g. ``lora_rank=8``, ``moe_impl='ragged'``).

  Raises:
    CheckpointError: unsupported model_type or feature, bad config field, missing, misshapen
      or unexpected tensors (the message names the file, tensor or field).

  Example (``load_pretrained('/ckpt/OLMoE-1B-7B', 'bfloat16', lora_rank=8)``): see the module
  docstring for a runnable round trip.
  """
  directory = pathlib.Path(path)
  if read_config(directory).get("model_type") == "switch_transformers":
    from fedalign.models.hf_switch import load_switch_pretrained

    return load_switch_pretrained(directory, **overrides)
  bad = sorted(set(overrides) - set(OVERRIDABLE))
  if bad:
    raise CheckpointError(
        f"load_pretrained overrides {bad} are not allowed: expected fields "
        f"among {OVERRIDABLE} (the rest comes from config.json)."
    )
  raw = read_config(directory)
  cfg = config_from_hf(raw, dtype, source=str(directory / CONFIG_NAME))
  store = TensorStore.open(directory)
  try:
    params = params_from_hf(store, cfg)
  finally:
    store.close()
  if overrides:
    try:
      cfg = cfg.replace(**overrides)
    except ValueError as err:
      raise CheckpointError(str(err)) from None
    if cfg.lora_rank > 0:
      params = _add_lora(params, cfg, seed)
  return MoEModel(cfg, params)


def _add_lora(params: PyTree, cfg: MoEConfig, seed: int) -> PyTree:
  """Fresh adapters with the model's own initialisers (A ~ N(0, 1/d_in), B = 0), without
  re-initialising (or compiling the init of) the pretrained weights."""
  expected = _expected_params(cfg)
  paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(expected)]
  keys = iter(jax.random.split(jax.random.key(seed), len(paths)))

  def leaf(path, spec):
    names = _path_keys(path)
    key = next(keys)
    if names[-1].endswith("lora_a"):
      std = 1.0 / spec.shape[-2] ** 0.5
      return (std * jax.random.normal(key, spec.shape, jnp.float32)).astype(spec.dtype)
    if names[-1].endswith("lora_b"):
      return jnp.zeros(spec.shape, spec.dtype)
    return get_path(params, names)

  return jax.tree_util.tree_map_with_path(leaf, expected)


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def save_pretrained(
    model: MoEModel, path: str | os.PathLike, extra_config: Mapping[str, Any] | None = None
) -> pathlib.Path:
  """Writes ``config.json`` and ``model.safetensors`` (per-expert layout) to ``path``.

  LoRA adapters, if any, are merged into the base weights; the written config has no LoRA.
  ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads Mixtral, OLMoE, Qwen2-MoE
  and Qwen3-MoE results with the same logits; DeepSeek-MoE is written in the v1 remote-code
  format. Returns the directory.

  Args:
    model: the model (MoEConfig family mixtral, olmoe, qwen2_moe, qwen3_moe or deepseek_moe).
    path: output directory (created if needed; files there are overwritten).
    extra_config: further config.json fields that describe no architecture, e.g. the token
      ids of the source checkpoint (``{k: read_config(src)[k] for k in TOKEN_ID_FIELDS}``).
      Token ids are written as null unless given here (the model does not know them).
  """
  cfg = model.config
  if type(cfg).__name__ == "SwitchConfig":
    from fedalign.models.hf_switch import save_switch_pretrained

    return save_switch_pretrained(model, path)
  if not isinstance(cfg, MoEConfig):
    raise CheckpointError(f"save_pretrained needs a MoEConfig model, got " f"{type(cfg).__name__}.")
  params = merge_lora(model.params, cfg)
  cfg = cfg.replace(lora_rank=0)
  hf_config = config_to_hf(cfg)
  hf_config.update({k: None for k in TOKEN_ID_FIELDS})
  clash = sorted(set(extra_config or {}) & (set(hf_config) - set(TOKEN_ID_FIELDS)))
  if clash:
    raise CheckpointError(
        f"extra_config fields {clash} describe the architecture, which "
        "comes from model.config: expected other fields (e.g. token ids)."
    )
  hf_config.update(extra_config or {})
  tensors = params_to_hf(params, cfg)
  directory = pathlib.Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
  return directory


__all__ = [
    "CheckpointError",
    "HF_DEFAULTS",
    "MODEL_TYPES",
    "OVERRIDABLE",
    "TOKEN_ID_FIELDS",
    "TensorStore",
    "config_from_hf",
    "config_to_hf",
    "hf_name",
    "load_pretrained",
    "merge_lora",
    "params_from_hf",
    "params_to_hf",
    "read_config",
    "save_pretrained",
]

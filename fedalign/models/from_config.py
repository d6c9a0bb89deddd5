"""The model of a run from its config: type, sizes, random init or a Hugging Face checkpoint.

Models (``config.model.type``):

* ``'decoder'`` (default): an MoE causal LM (:class:`~fedalign.models.MoEConfig` from the
  ``config.model`` sizes, :func:`model_config_from`);
* ``'switch'``: the Switch Transformer encoder-decoder
  (:class:`~fedalign.models.switch.SwitchConfig`, :func:`switch_config_from`).

With ``config.model.hf_checkpoint`` (a local Hugging Face checkpoint directory) either type
loads its config and weights with :func:`fedalign.models.hf.load_pretrained` instead
(:func:`load_model`).
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import jax
import ml_collections

from fedalign.models.api import init_params
from fedalign.models.config import MoEConfig, family_config

PyTree = Any
MODEL_TYPES = ("decoder", "switch")


def model_type(config: ml_collections.ConfigDict) -> str:
  """``config.model.type``: 'decoder' (default, also for configs without the field) | 'switch'.

  >>> import ml_collections
  >>> model_type(ml_collections.ConfigDict({'model': {'hidden_size': 8}}))
  'decoder'
  """
  return config.model.get("type", "decoder") or "decoder"


def switch_config_from(config: ml_collections.ConfigDict, tokenizer: Any) -> Any:
  """A random-init :class:`~fedalign.models.switch.SwitchConfig` from ``config.model``.

  Reads ``hidden_size`` (d_model), ``intermediate_size`` (d_ff, dense and expert FFN),
  ``num_layers`` (encoder and decoder), ``num_heads``, ``num_experts``, ``lora_rank``,
  ``lora_alpha``, and the optional Switch fields ``d_kv`` (0 = hidden_size // num_heads),
  ``sparse_step`` (default 2: every other layer is MoE), ``expert_capacity`` (tokens per expert
  and row; 0 = dropless, default), ``dropout_rate`` and ``router_jitter_noise`` (default 0).
  Special ids come from the tokenizer (pad = decoder start, as in T5).
  """
  from fedalign.models.switch import SwitchConfig

  m = config.model
  pad = tokenizer.pad_id
  eos = tokenizer.eos_id if tokenizer.eos_id is not None else pad
  step = int(m.get("sparse_step", 2))
  capacity = int(m.get("expert_capacity", 0))
  return SwitchConfig(
      vocab_size=tokenizer.vocab_size,
      d_model=m.hidden_size,
      d_kv=int(m.get("d_kv", 0)) or None,
      d_ff=m.intermediate_size,
      num_heads=m.num_heads,
      num_layers=m.num_layers,
      num_decoder_layers=m.num_layers,
      num_experts=m.num_experts,
      encoder_sparse_step=min(step, m.num_layers),
      decoder_sparse_step=min(step, m.num_layers),
      expert_capacity=capacity or None,
      capacity_factor=None,
      relative_attention_num_buckets=int(m.get("relative_attention_num_buckets", 32)),
      relative_attention_max_distance=int(m.get("relative_attention_max_distance", 128)),
      dropout_rate=float(m.get("dropout_rate", 0.0)),
      router_jitter_noise=float(m.get("router_jitter_noise", 0.0)),
      pad_token_id=pad,
      eos_token_id=eos,
      decoder_start_token_id=pad,
      router_aux_loss_coef=config.train.load_balance_coef,
      router_z_loss_coef=config.train.z_loss_coef,
      lora_rank=m.lora_rank,
      lora_alpha=m.lora_alpha,
  ).validate()


def load_model(config: ml_collections.ConfigDict, tokenizer: Any) -> tuple[Any, PyTree]:
  """(model config, params) of a run: random init from ``config.model`` or, when
  ``config.model.hf_checkpoint`` is set, the checkpoint (either model type).

  Fine-tuning fields applied to a checkpoint: ``lora_rank`` / ``lora_alpha`` (when
  ``lora_rank`` > 0: fresh adapters, the loaded function unchanged), ``moe_impl``,
  ``capacity_factor`` and ``moe_block_size`` (decoder),
  ``dropout_rate`` / ``router_jitter_noise`` (Switch, when the config has them), ``dtype``
  (decoder, optional, default 'float32': parameter and compute dtype, e.g. 'bfloat16'; routers
  stay float32; also used for random init).
  """
  m = config.model
  mtype = model_type(config)
  if not m.hf_checkpoint:
    if mtype == "switch":
      mcfg = switch_config_from(config, tokenizer)
    else:
      mcfg = model_config_from(config, tokenizer.vocab_size)
    return mcfg, init_params(mcfg, jax.random.key(config.seed), seq_len=config.data.seq_len)
  from fedalign.models.hf import load_pretrained, read_config
  from fedalign.models.hf_files import CheckpointError

  raw = read_config(pathlib.Path(m.hf_checkpoint))
  is_switch = raw.get("model_type") == "switch_transformers"
  if is_switch != (mtype == "switch"):
    raise ValueError(
        f"config.model.hf_checkpoint={m.hf_checkpoint!r} holds a {raw.get('model_type')!r} "
        f"model but config.model.type={mtype!r}: set config.model.type="
        f"{'switch' if is_switch else 'decoder'!r}."
    )
  overrides: dict[str, Any] = {}
  if m.lora_rank > 0:
    overrides.update(lora_rank=m.lora_rank, lora_alpha=m.lora_alpha)
  if is_switch:
    for name in ("dropout_rate", "router_jitter_noise"):
      if name in m:
        overrides[name] = float(m[name])
  else:
    overrides["moe_impl"] = m.moe_impl
    if "moe_block_size" in m:
      overrides["moe_block_size"] = int(m.moe_block_size)
    if m.get("capacity_factor", 0.0):
      overrides["capacity_factor"] = float(m.capacity_factor)
  from fedalign.pretrained import verify_if_shipped

  verify_if_shipped(m.hf_checkpoint)
  try:
    model = load_pretrained(
        m.hf_checkpoint, m.get("dtype", "float32"), seed=config.seed, **overrides
    )
  except CheckpointError as e:  # an unreadable shipped or pre-trained checkpoint
    raise CheckpointError(
        f"config.model.hf_checkpoint={m.hf_checkpoint!r} could not be loaded: {e} Download or "
        "write the checkpoint again; a fedalign pre-training cache (config.pretrain.dir, "
        "default WORKDIR/pretrained) is rebuilt when you delete that directory."
    ) from e
  if m.get("check_checkpoint", False):
    check_checkpoint_matches(config, model.config, tokenizer)
  if tokenizer.vocab_size > model.config.vocab_size:
    raise ValueError(
        f"the tokenizer of {m.hf_checkpoint} has {tokenizer.vocab_size} tokens but the model "
        f"only {model.config.vocab_size} embeddings: not the checkpoint's own tokenizer?"
    )
  return model.config, model.params


# config.model fields compared with the checkpoint by ``model.check_checkpoint``.
CHECKED_FIELDS = (
    "family",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "num_experts",
    "top_k",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)


def check_checkpoint_matches(
    config: ml_collections.ConfigDict, checkpoint_config: Any, tokenizer: Any
) -> None:
  """Raises ValueError naming the config's and the checkpoint's values where they differ.

  With ``config.model.check_checkpoint`` (configs/default.py), the ``config.model`` sizes
  (:data:`CHECKED_FIELDS`) must be the checkpoint's architecture and ``config.data.vocab_size``
  its tokenizer's size, so that a config never silently runs another model than it states.
  """
  m = config.model
  diffs = [
      f"model.{f}: config {m[f]!r} vs checkpoint {getattr(checkpoint_config, f)!r}"
      for f in CHECKED_FIELDS
      if f in m and m[f] != getattr(checkpoint_config, f)
  ]
  if config.data.vocab_size != tokenizer.vocab_size:
    diffs.append(
        f"data.vocab_size: config {config.data.vocab_size!r} vs the checkpoint's tokenizer "
        f"{tokenizer.vocab_size!r}"
    )
  if tokenizer.vocab_size > checkpoint_config.vocab_size:
    diffs.append(
        f"tokenizer size {tokenizer.vocab_size} vs checkpoint vocab_size "
        f"{checkpoint_config.vocab_size}"
    )
  if diffs:
    raise ValueError(
        f"config.model.hf_checkpoint={m.hf_checkpoint!r} does not match the config "
        f"(config.model.check_checkpoint=True): {'; '.join(diffs)}. Set the config fields to "
        "the checkpoint's, or use the checkpoint the config was written for."
    )


def model_config_from(config: ml_collections.ConfigDict, vocab_size: int) -> MoEConfig:
  """The decoder's :class:`~fedalign.models.MoEConfig` from ``config.model`` sizes.

  ``max_position_embeddings`` covers ``config.data.seq_len``; the router loss coefficients
  come from ``config.train``; ``model.dtype`` (default 'float32') sets parameter and compute
  dtype.

  >>> import ml_collections
  >>> from fedalign.config_files import load_config
  >>> cfg = load_config('configs/default.py:runlocal')
  >>> model_config_from(cfg, 512).vocab_size
  512
  """
  m = config.model
  fields = dict(
      vocab_size=vocab_size,
      hidden_size=m.hidden_size,
      intermediate_size=m.intermediate_size,
      num_layers=m.num_layers,
      num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads,
      num_experts=m.num_experts,
      top_k=m.top_k,
      moe_intermediate_size=m.moe_intermediate_size,
      shared_expert_intermediate_size=m.shared_expert_intermediate_size,
      lora_rank=m.lora_rank,
      lora_alpha=m.lora_alpha,
      moe_impl=m.moe_impl,
      capacity_factor=m.capacity_factor or None,
      moe_block_size=int(m.get("moe_block_size", MoEConfig.moe_block_size)),
      dtype=m.get("dtype", "float32"),
      param_dtype=m.get("dtype", "float32"),
      router_aux_loss_coef=config.train.load_balance_coef,
      router_z_loss_coef=config.train.z_loss_coef,
      max_position_embeddings=max(config.data.seq_len, 8),
  )
  if m.family in ("deepseek_moe",) and m.shared_expert_intermediate_size == 0:
    fields.pop("shared_expert_intermediate_size")
  try:
    return family_config(m.family, **fields)
  except ValueError as e:  # name the run config's field, not the MoEConfig attribute
    message = str(e)
    match = re.match(r"MoEConfig\.(\w+)=", message)
    if match:
      name = match.group(1)
      field = _RUN_FIELDS.get(name, f"model.{name}" if name in m else None)
      if field:
        message = f"config.{field}=" + message[match.end() :]
    raise ValueError(message) from None


# MoEConfig attributes that model_config_from fills from fields outside config.model.
_RUN_FIELDS = {
    "router_aux_loss_coef": "train.load_balance_coef",
    "router_z_loss_coef": "train.z_loss_coef",
}

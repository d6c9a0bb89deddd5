"""Hugging Face SwitchTransformers checkpoints <-> fedalign Switch params (safetensors, offline).

:func:`load_switch_pretrained` reads a directory written by
``SwitchTransformersForConditionalGeneration.save_pretrained`` (``config.json`` with
``model_type: switch_transformers`` and ``model.safetensors`` or a sharded
``model.safetensors.index.json``); :func:`save_switch_pretrained` writes one back that
``transformers`` loads. No network access, no torch needed.

Tensor names (transformers 5.x; experts are NOT fused, one Linear pair per expert)::

    shared.weight (V, D)                                  -> shared/embedding
    {enc,dec}oder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight (out, in) -> .../kernel (in, out)
    {enc,dec}oder.block.0.layer.0.SelfAttention.relative_attention_bias.weight (buckets, H)
    decoder.block.{i}.layer.1.EncDecAttention.{q,k,v,o}.weight
    ....layer.{j}.layer_norm.weight                       -> *_norm/scale
    ....layer.{f}.mlp.{wi,wo}.weight                      -> mlp/{wi,wo}/kernel   (dense layer)
    ....layer.{f}.mlp.router.classifier.weight (E, D)     -> mlp/router/kernel (D, E)
    ....layer.{f}.mlp.experts.expert_{e}.wi.weight (F, D) -> mlp/experts/wi[e] (D, F)
    ....layer.{f}.mlp.experts.expert_{e}.wo.weight (D, F) -> mlp/experts/wo[e] (F, D)
    {enc,dec}oder.final_layer_norm.weight                 -> {enc,dec}oder/final_norm/scale
    lm_head.weight (V, D)                                 -> lm_head/kernel (untied only)

(f = 1 in the encoder, 2 in the decoder, after the cross-attention.) A checkpoint whose tensors
disagree with its config.json (number of experts, which layers are sparse, shapes) is rejected
with an error naming the tensor.

Example:
  >>> from fedalign.models.switch import switch_tiny
  >>> from fedalign.models.api import MoEModel
  >>> model = MoEModel.random(switch_tiny())
  >>> save_switch_pretrained(model, '/tmp/switch_tiny_ckpt')
  >>> load_switch_pretrained('/tmp/switch_tiny_ckpt').config == model.config
  True
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedalign.models.api import MoEModel
from fedalign.models.hf_files import TensorStore
from fedalign.models.layers import dtype_of
from fedalign.models.switch import SwitchConfig
from fedalign.models.tree import get_path

PathLike = str | pathlib.Path
PyTree = Any
MODEL_TYPE = "switch_transformers"
UNLIMITED_CAPACITY = 1 << 20  # expert_capacity written for a dropless config

# Config fields copied one to one between config.json and SwitchConfig.
_SAME_FIELDS = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_heads",
    "num_layers",
    "num_experts",
    "router_bias",
    "router_jitter_noise",
    "router_ignore_padding_tokens",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "dropout_rate",
    "layer_norm_epsilon",
    "dense_act_fn",
    "tie_word_embeddings",
    "pad_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "initializer_factor",
)
_HF_DEFAULTS = dict(
    vocab_size=32128,
    d_model=768,
    d_kv=64,
    d_ff=2048,
    num_heads=12,
    num_layers=12,
    num_experts=8,
    expert_capacity=64,
    num_sparse_encoder_layers=3,
    num_sparse_decoder_layers=3,
    router_bias=False,
    router_jitter_noise=0.01,
    router_ignore_padding_tokens=False,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    dense_act_fn="relu",
    tie_word_embeddings=True,
    pad_token_id=0,
    eos_token_id=1,
    router_aux_loss_coef=0.001,
    router_z_loss_coef=0.001,
    initializer_factor=1.0,
)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
def _hf_step(num_layers: int, num_sparse: int) -> int:
  """HF's sparse step (SwitchTransformersConfig.__post_init__, including its 0-sparse hack)."""
  return num_layers // num_sparse if num_sparse > 0 else num_layers


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> SwitchConfig:
  """SwitchConfig from a SwitchTransformers config.json dict (+ fedalign-only overrides).

  >>> config_from_hf({'num_layers': 4, 'num_sparse_encoder_layers': 2,
  ...                 'num_sparse_decoder_layers': 2}).encoder_sparse_layers
  (1, 3)
  """
  if hf.get("model_type", MODEL_TYPE) != MODEL_TYPE:
    raise ValueError(
        f"config.json model_type={hf.get('model_type')!r}: expected " f"{MODEL_TYPE!r}."
    )
  get = lambda k: hf[k] if hf.get(k) is not None else _HF_DEFAULTS.get(k)
  fields = {k: get(k) for k in _SAME_FIELDS}
  if fields["decoder_start_token_id"] is None:
    fields["decoder_start_token_id"] = fields["pad_token_id"]
  if isinstance(fields["eos_token_id"], (list, tuple)):
    fields["eos_token_id"] = fields["eos_token_id"][0]
  act = fields["dense_act_fn"]
  if act.startswith("gated-"):
    raise ValueError(
        f"config.json dense_act_fn={act!r}: gated feed-forward layers are not "
        "supported by SwitchTransformers in transformers 5.x nor by fedalign."
    )
  n_enc = fields["num_layers"]
  n_dec = hf.get("num_decoder_layers") or n_enc
  fields["num_decoder_layers"] = n_dec
  fields["encoder_sparse_step"] = _hf_step(n_enc, get("num_sparse_encoder_layers"))
  fields["decoder_sparse_step"] = _hf_step(n_dec, get("num_sparse_decoder_layers"))
  fields["expert_capacity"] = int(get("expert_capacity"))
  fields["capacity_factor"] = None
  fields.update(overrides)
  return SwitchConfig(**fields).validate()


def _num_sparse_for(num_layers: int, layers: tuple[int, ...]) -> int:
  """num_sparse_*_layers whose HF step gives exactly ``layers`` as sparse layers."""
  for n in range(0, num_layers + 1):
    if SwitchConfig.sparse_layers(num_layers, _hf_step(num_layers, n)) == layers:
      return n
  raise ValueError(
      f"sparse layers {layers} of a {num_layers}-layer stack cannot be expressed "
      "by SwitchTransformersConfig (step = num_layers // num_sparse_layers, layer "
      "i sparse iff i % step == 1); change encoder/decoder_sparse_step."
  )


def config_to_hf(cfg: SwitchConfig) -> dict[str, Any]:
  """The config.json dict of a SwitchConfig (raises if HF cannot express the layout)."""
  cfg = cfg.validate()
  out: dict[str, Any] = {
      "architectures": ["SwitchTransformersForConditionalGeneration"],
      "model_type": MODEL_TYPE,
      "is_encoder_decoder": True,
      "router_dtype": "float32",
      "dtype": cfg.param_dtype,
  }
  for k in _SAME_FIELDS:
    out[k] = getattr(cfg, k)
  out["d_kv"] = cfg.resolved_d_kv
  out["num_decoder_layers"] = cfg.resolved_num_decoder_layers
  out["num_sparse_encoder_layers"] = _num_sparse_for(cfg.num_layers, cfg.encoder_sparse_layers)
  out["num_sparse_decoder_layers"] = _num_sparse_for(
      cfg.resolved_num_decoder_layers, cfg.decoder_sparse_layers
  )
  out["encoder_sparse_step"] = _hf_step(cfg.num_layers, out["num_sparse_encoder_layers"])
  out["decoder_sparse_step"] = _hf_step(
      cfg.resolved_num_decoder_layers, out["num_sparse_decoder_layers"]
  )
  if cfg.expert_capacity is not None:
    out["expert_capacity"] = cfg.expert_capacity
  else:
    # HF has only a fixed per-row capacity: dropless (or a capacity factor, which HF cannot
    # express) is written as a capacity no sequence reaches.
    out["expert_capacity"] = UNLIMITED_CAPACITY
    if cfg.capacity_factor is not None:
      out["fedalign_capacity_factor"] = cfg.capacity_factor
  return out


# --------------------------------------------------------------------------------------------
# Tensor-name mapping
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Entry:
  path: tuple[str, ...]  # flax param path
  kind: str  # 'copy' | 'linear' (transpose) | 'experts' (stack transposed)
  names: tuple[str, ...]  # HF tensor name(s)
  why: str  # what in the config implies this tensor


def _mapping(cfg: SwitchConfig) -> list[_Entry]:
  entries = [_Entry(("shared", "embedding"), "copy", ("shared.weight",), "vocab_size/d_model")]
  if not cfg.tie_word_embeddings:
    entries.append(
        _Entry(("lm_head", "kernel"), "linear", ("lm_head.weight",), "tie_word_embeddings=False")
    )
  for stack, num_layers, sparse, step_field in (
      ("encoder", cfg.num_layers, cfg.encoder_sparse_layers, "encoder"),
      ("decoder", cfg.resolved_num_decoder_layers, cfg.decoder_sparse_layers, "decoder"),
  ):
    is_dec = stack == "decoder"
    for i in range(num_layers):
      p, blk = f"{stack}.block.{i}.layer", (stack, f"block_{i}")
      for n in "qkvo":
        entries.append(
            _Entry(
                blk + ("self_attn", n, "kernel"),
                "linear",
                (f"{p}.0.SelfAttention.{n}.weight",),
                "attention",
            )
        )
      if i == 0:
        entries.append(
            _Entry(
                blk + ("self_attn", "relative_attention_bias"),
                "copy",
                (f"{p}.0.SelfAttention.relative_attention_bias.weight",),
                "relative attention bias of the first layer",
            )
        )
      entries.append(
          _Entry(
              blk + ("self_attn_norm", "scale"), "copy", (f"{p}.0.layer_norm.weight",), "layer norm"
          )
      )
      ff = 1
      if is_dec:
        for n in "qkvo":
          entries.append(
              _Entry(
                  blk + ("cross_attn", n, "kernel"),
                  "linear",
                  (f"{p}.1.EncDecAttention.{n}.weight",),
                  "cross-attention",
              )
          )
        entries.append(
            _Entry(
                blk + ("cross_attn_norm", "scale"),
                "copy",
                (f"{p}.1.layer_norm.weight",),
                "layer norm",
            )
        )
        ff = 2
      entries.append(
          _Entry(
              blk + ("mlp_norm", "scale"), "copy", (f"{p}.{ff}.layer_norm.weight",), "layer norm"
          )
      )
      m = f"{p}.{ff}.mlp"
      if i in sparse:
        why = (
            f"config.json makes {stack} layer {i} sparse ({step_field} sparse layers "
            f"{sparse}, num_experts={cfg.num_experts})"
        )
        entries.append(
            _Entry(
                blk + ("mlp", "router", "kernel"), "linear", (f"{m}.router.classifier.weight",), why
            )
        )
        if cfg.router_bias:
          entries.append(
              _Entry(
                  blk + ("mlp", "router", "bias"),
                  "copy",
                  (f"{m}.router.classifier.bias",),
                  why + ", router_bias=True",
              )
          )
        for w in ("wi", "wo"):
          entries.append(
              _Entry(
                  blk + ("mlp", "experts", w),
                  "experts",
                  tuple(f"{m}.experts.expert_{e}.{w}.weight" for e in range(cfg.num_experts)),
                  why,
              )
          )
      else:
        why = f"config.json makes {stack} layer {i} dense ({step_field} sparse layers {sparse})"
        for w in ("wi", "wo"):
          entries.append(_Entry(blk + ("mlp", w, "kernel"), "linear", (f"{m}.{w}.weight",), why))
    entries.append(
        _Entry(
            (stack, "final_norm", "scale"),
            "copy",
            (f"{stack}.final_layer_norm.weight",),
            "final layer norm",
        )
    )
  return entries


def _hf_shape(kind: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if kind == "linear":
    return tuple(reversed(flax_shape))
  if kind == "experts":
    return (flax_shape[2], flax_shape[1])
  return tuple(flax_shape)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _leaf_paths(tree: PyTree) -> list[tuple[str, ...]]:
  return [
      tuple(str(getattr(k, "key", k)) for k in p)
      for p, _ in jax.tree_util.tree_leaves_with_path(tree)
  ]


_IGNORABLE = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def params_from_hf(
    cfg: SwitchConfig,
    names: set[str],
    shape: Callable[[str], tuple],
    get: Callable[[str], np.ndarray],
    where: str = "checkpoint",
    lora_seed: int = 0,
) -> PyTree:
  """Params (nested dict of numpy arrays in cfg.param_dtype) from HF tensors.

  Raises ValueError naming the tensor when a tensor is missing, unexpected or mis-shaped.
  """
  from fedalign.models.api import build_module

  shapes = jax.eval_shape(
      lambda: build_module(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  )["params"]
  pdtype = dtype_of(cfg.param_dtype)
  names = set(names)
  if "shared.weight" not in names and "encoder.embed_tokens.weight" in names:
    names.add("shared.weight")
    shape_ = shape
    get_ = get
    alias = lambda n: "encoder.embed_tokens.weight" if n == "shared.weight" else n
    shape = lambda n: shape_(alias(n))
    get = lambda n: get_(alias(n))
  used: set[str] = set()
  params: dict = {}
  for entry in _mapping(cfg):
    want = tuple(get_path(shapes, entry.path).shape)
    hf_want = _hf_shape(entry.kind, want)
    for name in entry.names:
      if name not in names:
        raise ValueError(f"{where}: missing tensor {name!r} ({entry.why}).")
      got = shape(name)
      if tuple(got) != hf_want:
        raise ValueError(
            f"{where}: tensor {name!r} has shape {tuple(got)}, expected {hf_want} "
            f"from config.json ({entry.why})."
        )
      used.add(name)
    if entry.kind == "experts":
      value = np.stack([get(n).T for n in entry.names])
    elif entry.kind == "linear":
      value = get(entry.names[0]).T
    else:
      value = get(entry.names[0])
    _set(params, entry.path, np.ascontiguousarray(value).astype(pdtype))
  # fedalign (like T5 and transformers 4.x) feeds both stacks from one input embedding; with
  # tie_word_embeddings=False transformers 5.x keeps separate encoder/decoder copies, which are
  # accepted only when equal to shared.weight.
  for name in _IGNORABLE:
    if name in names and name not in used:
      if tuple(shape(name)) != tuple(params["shared"]["embedding"].shape) or not np.array_equal(
          get(name).astype(pdtype), params["shared"]["embedding"]
      ):
        raise ValueError(
            f"{where}: tensor {name!r} differs from 'shared.weight'; fedalign "
            "uses one input embedding for the encoder and the decoder."
        )
  ignorable = set(_IGNORABLE) | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
  extra = sorted(names - used - ignorable)
  if extra:
    name = extra[0]
    hint = ""
    if ".experts.expert_" in name:
      hint = f" (config.json says num_experts={cfg.num_experts} or makes this layer dense)"
    elif ".mlp.router." in name:
      hint = (
          " (config.json makes this layer dense: encoder sparse layers "
          f"{cfg.encoder_sparse_layers}, decoder sparse layers {cfg.decoder_sparse_layers})"
      )
    elif ".mlp.wi." in name or ".mlp.wo." in name:
      hint = " (config.json makes this layer sparse)"
    elif ".block." in name:
      hint = (
          f" (config.json has num_layers={cfg.num_layers}, num_decoder_layers="
          f"{cfg.resolved_num_decoder_layers})"
      )
    raise ValueError(
        f"{where}: unexpected tensor {name!r}{hint}; {len(extra)} unexpected " "tensor(s) in all."
    )
  # LoRA adapters (fedalign-only leaves) get the usual fresh initialisation: A ~ N(0, 1/d_in)
  # (d_in = the second-to-last axis), B = 0, so the loaded model's function is unchanged.
  rng = np.random.default_rng(lora_seed)
  for p in _leaf_paths(shapes):
    if _has(params, p):
      continue
    shape_ = tuple(get_path(shapes, p).shape)
    if p[-1].endswith("lora_a"):
      value = rng.standard_normal(shape_, np.float32) * shape_[-2] ** -0.5
    elif p[-1].endswith("lora_b"):
      value = np.zeros(shape_, np.float32)
    else:
      raise AssertionError(f"internal: no HF tensor for param {'/'.join(p)}")
    _set(params, p, value.astype(pdtype))
  return params


def _has(tree: dict, path: tuple[str, ...]) -> bool:
  for k in path:
    if not isinstance(tree, dict) or k not in tree:
      return False
    tree = tree[k]
  return True


def load_switch_pretrained(path: PathLike, **overrides: Any) -> MoEModel:
  """Loads a SwitchTransformers checkpoint directory (config.json + safetensors).

  ``overrides`` set fedalign-only fields of :class:`SwitchConfig` (e.g. ``lora_rank=8``,
  ``param_dtype='bfloat16'``, ``dropout_rate=0.0``, ``expert_capacity=None``).
  """
  path = pathlib.Path(path)
  cfg_file = path / "config.json"
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{cfg_file} not found.")
  hf = json.loads(cfg_file.read_text())
  if hf.get("fedalign_capacity_factor") is not None and "capacity_factor" not in overrides:
    overrides = dict(
        overrides, capacity_factor=hf["fedalign_capacity_factor"], expert_capacity=None
    )
  cfg = config_from_hf(hf, **overrides)
  store = TensorStore.open(path)  # safetensors file or sharded index; bfloat16 included
  try:
    params = params_from_hf(
        cfg, set(store.keys()), store.shape, lambda n: store.get(n, store.shape(n)), where=str(path)
    )
  finally:
    store.close()
  return MoEModel(cfg, jax.tree.map(jnp.asarray, params))


def params_to_hf(cfg: SwitchConfig, params: PyTree) -> dict[str, np.ndarray]:
  """HF tensors (torch layout, numpy) from Switch params. LoRA adapters must be merged first."""
  lora = [p for p in _leaf_paths(params) if "lora" in p[-1]]
  if lora:
    raise ValueError(
        f"params have LoRA leaves (e.g. {'/'.join(lora[0])}): merge the adapters "
        "into the base weights before saving an HF checkpoint."
    )
  tensors: dict[str, np.ndarray] = {}
  for entry in _mapping(cfg):
    value = np.asarray(get_path(params, entry.path))
    if entry.kind == "experts":
      for e, name in enumerate(entry.names):
        tensors[name] = np.ascontiguousarray(value[e].T)
    elif entry.kind == "linear":
      tensors[entry.names[0]] = np.ascontiguousarray(value.T)
    else:
      tensors[entry.names[0]] = np.ascontiguousarray(value)
  if not cfg.tie_word_embeddings:
    # transformers 5.x unties encoder/decoder input embeddings from `shared` too.
    for name in _IGNORABLE:
      tensors[name] = tensors["shared.weight"]
  return tensors


def save_switch_pretrained(model: MoEModel, path: PathLike) -> None:
  """Writes config.json + model.safetensors that ``transformers`` loads as
  SwitchTransformersForConditionalGeneration (tied embeddings stored once as shared.weight)."""
  from safetensors.flax import save_file

  cfg = model.config
  if not isinstance(cfg, SwitchConfig):
    raise TypeError(
        f"save_switch_pretrained needs a SwitchConfig model, got " f"{type(cfg).__name__}."
    )
  hf = config_to_hf(cfg)
  tensors = params_to_hf(cfg, model.params)
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  save_file(
      {k: jnp.asarray(v) for k, v in tensors.items()},
      str(path / "model.safetensors"),
      metadata={"format": "pt"},
  )
  (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")

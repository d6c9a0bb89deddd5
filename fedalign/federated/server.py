"""The server loop: data, model, rounds, evaluation, logging and checkpoints.

:func:`run_experiment` is what ``python -m fedalign.main`` calls. Every random choice derives
from ``(config.seed, round)`` (client sampling, data order) or ``(seed, round, client)``
(client rngs), so a run resumed from a checkpoint reproduces the uninterrupted run.

Outputs in the workdir: ``config.json`` (resolved config), ``metrics.jsonl`` (one JSON object
per evaluated round), ``summary.json``, ``checkpoints/``, ``plots/`` and ``tokenizer.json``.

Models (``config.model.type``):

* ``'decoder'`` (default): an MoE causal LM (:class:`~fedalign.models.MoEConfig` from the
  ``config.model`` sizes), trained with :class:`~fedalign.federated.task.CausalLMTask` on
  ``prompt + label word`` and evaluated by label-word scoring (one pass when every label word
  is a single token, else each label word scored as a sequence);
* ``'switch'``: the Switch Transformer encoder-decoder
  (:class:`~fedalign.models.switch.SwitchConfig`), text-to-text: the prompt is the encoder
  input, the label word (+ EOS) the decoder target
  (:func:`~fedalign.data.formatting.format_seq2seq_classification`), trained with
  :class:`~fedalign.federated.task.Seq2SeqTask` and evaluated by scoring every label word
  sequence as the decoder target
  (:func:`~fedalign.metrics.evaluation.make_seq2seq_classification_evaluator`).

With ``config.model.hf_checkpoint`` (a local Hugging Face checkpoint directory) either type
loads its config and weights with :func:`fedalign.models.hf.load_pretrained` instead of the
``config.model`` sizes, and the tokenizer is the checkpoint's ``tokenizer.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from fedalign.checkpoint import Checkpointer
from fedalign.algorithms import METHODS, make_algorithm
from fedalign.federated.client import make_client_update
from fedalign.federated.round import CLIENT_AXIS, init_server_state, make_round_fn
from fedalign.federated.task import CausalLMTask, Seq2SeqTask
from fedalign.models import MoEConfig, build_module, family_config, init_params
from fedalign.models.lora import partition, trainable_mask
from fedalign.pretrain import maybe_pretrained

log = logging.getLogger(__name__)
PyTree = Any
# Fields that may change between a run and its resumption.
RESUMABLE_FIELDS = ("train.rounds", "eval.every", "checkpoint.every", "checkpoint.keep")
MODEL_TYPES = ("decoder", "switch")
VALIDATION_SEED = 20231  # fixed: the validation hold-out never depends on config.seed


# ----------------------------------------------------------------------------- config checks
def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects bad fields before any compute, naming the field and the accepted values."""

  def bad(field, value, expected):
    raise ValueError(f"config.{field}={value!r} is invalid: expected {expected}.")

  if config.method not in METHODS:
    bad("method", config.method, f"one of {METHODS}")
  if model_type(config) not in MODEL_TYPES:
    bad("model.type", model_type(config), f"one of {MODEL_TYPES}")
  if config.model.hf_checkpoint is None:  # an ml_collections placeholder nobody filled in
    raise ValueError(
        "config.model.hf_checkpoint is not set: this config fine-tunes a pretrained "
        "checkpoint; pass --config.model.hf_checkpoint=/path/to/checkpoint (a local Hugging "
        "Face directory with config.json, model.safetensors and tokenizer.json), or use the "
        "config's ':runlocal' variant (tiny random-weights model)."
    )
  if config.model.hf_checkpoint:
    ckpt = pathlib.Path(config.model.hf_checkpoint)
    if not (ckpt / "config.json").is_file():
      bad(
          "model.hf_checkpoint",
          config.model.hf_checkpoint,
          "a local Hugging Face checkpoint directory holding config.json, model.safetensors "
          "and tokenizer.json (download it beforehand; nothing is fetched at run time)",
      )
  d, t = config.data, config.train
  if d.num_clients < 1:
    bad("data.num_clients", d.num_clients, "an integer >= 1")
  if not 1 <= t.clients_per_round <= d.num_clients:
    bad(
        "train.clients_per_round",
        t.clients_per_round,
        f"an integer in [1, data.num_clients={d.num_clients}]",
    )
  if d.partition not in ("dirichlet", "iid", "pathological"):
    bad("data.partition", d.partition, "one of ('dirichlet', 'iid', 'pathological')")
  if d.partition == "dirichlet" and d.alpha <= 0:
    bad("data.alpha", d.alpha, "a positive float")
  if t.rounds < 1:
    bad("train.rounds", t.rounds, "an integer >= 1")
  if t.local_steps < 0 or (t.local_steps == 0 and t.local_epochs < 1):
    bad("train.local_epochs", t.local_epochs, "an integer >= 1 (or train.local_steps > 0)")
  if t.batch_size < 1:
    bad("train.batch_size", t.batch_size, "an integer >= 1")
  if t.optimizer not in ("adamw", "sgd"):
    bad("train.optimizer", t.optimizer, "one of ('adamw', 'sgd')")
  if t.trainable not in ("full", "lora"):
    bad("train.trainable", t.trainable, "one of ('full', 'lora')")
  if t.trainable == "lora" and config.model.lora_rank < 1 and not config.model.hf_checkpoint:
    bad("model.lora_rank", config.model.lora_rank, "an integer >= 1 when train.trainable='lora'")
  if t.chunk_size < 0:
    bad("train.chunk_size", t.chunk_size, "0 (all clients at once) or a positive integer")
  if config.model.get("moe_impl", "dense") != "dense":
    # jax.lax.ragged_dot has no batching rule for the client axis of a vmapped round
    # (NotImplementedError in jax 0.10); use capacity_factor for sparse dispatch instead.
    bad(
        "model.moe_impl",
        config.model.moe_impl,
        "'dense' in federated runs (use model.capacity_factor > 0 for sparse dispatch)",
    )
  if config.model.get("capacity_factor", 0.0) < 0:
    bad("model.capacity_factor", config.model.capacity_factor, "0 (dropless) or a positive float")
  from fedalign.data.multiple_choice import MC_DATASETS
  from fedalign.models.config import DTYPES

  datasets = ("agnews_embedded", "agnews") + MC_DATASETS
  if d.dataset not in datasets:
    bad("data.dataset", d.dataset, f"one of {datasets}")
  if d.dataset in MC_DATASETS:
    if model_type(config) != "decoder":
      bad(
          "model.type",
          model_type(config),
          f"'decoder' with data.dataset={d.dataset!r} (options are scored by a causal LM)",
      )
    if not d.data_dir or not pathlib.Path(d.data_dir).is_dir():
      bad(
          "data.data_dir",
          d.data_dir,
          f"an existing directory holding the {d.dataset} files "
          f"(e.g. ../shared/data/{d.dataset}) for data.dataset={d.dataset!r}",
      )
  if config.eval.get("mc_metric", "acc") not in ("acc", "acc_norm"):
    bad("eval.mc_metric", config.eval.mc_metric, "one of ('acc', 'acc_norm')")
  dtype = config.model.get("dtype", "float32")
  if dtype not in DTYPES:
    bad("model.dtype", dtype, f"one of {DTYPES}")
  if dtype != "float32" and model_type(config) != "decoder":
    bad("model.dtype", dtype, "'float32' with model.type='switch'")
  split = config.eval.get("split", "test")
  if split not in ("test", "validation"):
    bad("eval.split", split, "one of ('test', 'validation')")
  if split == "validation" and not config.data.get("validation_examples", 0):
    bad(
        "eval.split",
        split,
        "'test' unless data.validation_examples > 0 holds " "out training rows to evaluate on",
    )
  if config.eval.every < 1:
    bad("eval.every", config.eval.every, "an integer >= 1")
  if config.checkpoint.every < 0:
    bad("checkpoint.every", config.checkpoint.every, "0 (never) or a positive integer")


def check_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir whose saved config differs (except :data:`RESUMABLE_FIELDS`)."""
  path = workdir / "config.json"
  new = _flatten(json.loads(config.to_json()))
  if path.exists():
    old = _flatten(json.loads(path.read_text()))
    diff = sorted(
        k for k in set(old) | set(new) if k not in RESUMABLE_FIELDS and old.get(k) != new.get(k)
    )
    if diff:
      details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:10])
      raise ValueError(
          f"workdir {workdir} holds a run of a different config ({details}); "
          "use a new --workdir or the same config to resume."
      )
  path.write_text(config.to_json(indent=2))


# ----------------------------------------------------------------------------- model
def model_type(config: ml_collections.ConfigDict) -> str:
  """``config.model.type``: 'decoder' (default, also for configs without the field) | 'switch'."""
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
  ``lora_rank`` > 0: fresh adapters, the loaded function unchanged), ``moe_impl`` (decoder),
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
    if m.get("capacity_factor", 0.0):
      overrides["capacity_factor"] = float(m.capacity_factor)
  model = load_pretrained(m.hf_checkpoint, m.get("dtype", "float32"), seed=config.seed, **overrides)
  if tokenizer.vocab_size > model.config.vocab_size:
    raise ValueError(
        f"the tokenizer of {m.hf_checkpoint} has {tokenizer.vocab_size} tokens but the model "
        f"only {model.config.vocab_size} embeddings: not the checkpoint's own tokenizer?"
    )
  return model.config, model.params


def model_config_from(config: ml_collections.ConfigDict, vocab_size: int) -> MoEConfig:
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
      dtype=m.get("dtype", "float32"),
      param_dtype=m.get("dtype", "float32"),
      router_aux_loss_coef=config.train.load_balance_coef,
      router_z_loss_coef=config.train.z_loss_coef,
      max_position_embeddings=max(config.data.seq_len, 8),
  )
  if m.family in ("deepseek_moe",) and m.shared_expert_intermediate_size == 0:
    fields.pop("shared_expert_intermediate_size")
  return family_config(m.family, **fields)


def client_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  t = config.train
  if t.optimizer == "adamw":
    opt = optax.adamw(t.learning_rate, weight_decay=t.weight_decay)
  else:
    opt = optax.sgd(t.learning_rate)
  if t.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(t.grad_clip), opt)
  return opt


# ----------------------------------------------------------------------------- data
class FederatedData:
  """Formatted train/test arrays, the client partition and the tokenizer of a run."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path):
    from fedalign.data import partition as part
    from fedalign.data.agnews import AGNEWS_LABEL_WORDS, AGNEWS_TEMPLATE, load_embedded_agnews
    from fedalign.data import formatting as fmt_lib
    from fedalign.data.tokenize import HFTokenizer, load_tokenizer, train_bpe
    from fedalign.data import multiple_choice as mc_lib

    d = config.data
    self.multiple_choice = d.dataset in mc_lib.MC_DATASETS  # MMLU, HellaSwag
    if d.dataset == "agnews_embedded":
      train, test = load_embedded_agnews()
    elif d.dataset == "agnews":
      from fedalign.data.agnews import TextSplit
      from fedalign.data.builders import load_records

      if not d.data_dir:
        raise ValueError(
            "config.data.data_dir is empty: dataset='agnews' reads the AG News "
            "CSV files from a manual directory (see fedalign.data.sources)."
        )
      splits = []
      for split in ("train", "test"):
        recs = load_records("ag_news", split, d.data_dir, str(workdir / "tfds"))
        splits.append(
            TextSplit([r["text"] for r in recs], np.asarray([r["label"] for r in recs], np.int32))
        )
      train, test = splits
    elif self.multiple_choice:  # fixed, seed-independent train/test split; label = topic group
      train, test = mc_lib.load_splits(d.dataset, d.data_dir)
    else:
      raise ValueError(
          f"config.data.dataset={d.dataset!r} is invalid: expected one of "
          "('agnews_embedded', 'agnews', 'mmlu', 'hellaswag')."
      )
    if d.get("validation_examples", 0):
      # A fixed hold-out of the training rows (the same for every seed and method), for
      # choosing hyper-parameters without touching the test split (eval.split='validation').
      if not 0 < d.validation_examples < len(train):
        raise ValueError(
            f"config.data.validation_examples={d.validation_examples} is "
            f"invalid: expected an integer in [0, {len(train)}) (0 = none)"
        )
      held = np.random.default_rng(np.random.SeedSequence([VALIDATION_SEED])).permutation(
          len(train)
      )
      validation = train.subset(np.sort(held[: d.validation_examples]))
      train = train.subset(np.sort(held[d.validation_examples :]))
      if config.eval.get("split", "test") == "validation":
        test = validation
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 7919]))
    if d.max_train_examples and d.max_train_examples < len(train):
      train = train.subset(np.sort(rng.choice(len(train), d.max_train_examples, replace=False)))
    if d.max_test_examples and d.max_test_examples < len(test):
      test = test.subset(np.sort(rng.choice(len(test), d.max_test_examples, replace=False)))
    self.num_classes = len(train.groups) if self.multiple_choice else len(AGNEWS_LABEL_WORDS)

    labels = np.asarray(train.label)
    if d.partition == "dirichlet":
      self.clients = part.dirichlet_partition(
          labels, d.num_clients, d.alpha, config.seed, min_size=d.min_client_size
      )
    elif d.partition == "iid":
      self.clients = part.iid_partition(len(labels), d.num_clients, config.seed)
    else:
      self.clients = part.pathological_partition(
          labels, d.num_clients, d.classes_per_client, config.seed
      )
    empty = [i for i, c in enumerate(self.clients) if len(c) == 0]
    if empty:
      raise ValueError(
          f"the {d.partition} partition leaves clients {empty} with no data: "
          "lower data.num_clients or raise data.alpha / data.min_client_size."
      )
    self.client_sizes = np.array([len(c) for c in self.clients])
    self.label_counts = part.label_counts(labels, self.clients, self.num_classes)

    self.seq2seq = model_type(config) == "switch"
    label_words = fmt_lib.AGNEWS_SEQ2SEQ_LABEL_WORDS if self.seq2seq else AGNEWS_LABEL_WORDS
    if self.multiple_choice:  # options are scored as sequences; keeps MMLU's " A".." D" whole
      label_words = mc_lib.ADDED_TOKENS[d.dataset]
    self.label_words = label_words
    tok_path = workdir / "tokenizer.json"
    if config.model.hf_checkpoint:  # the checkpoint's own tokenizer, whatever data.tokenizer
      self.tokenizer = HFTokenizer.from_file(config.model.hf_checkpoint)
    elif d.tokenizer == "bpe":
      if tok_path.exists():
        self.tokenizer = load_tokenizer(tok_path)
      else:
        client_text = [train.text[i] for c in self.clients for i in c]
        self.tokenizer = train_bpe(
            client_text, d.vocab_size, path=tok_path, added_tokens=label_words
        )
    else:
      self.tokenizer = load_tokenizer(d.tokenizer)
    self.test_labels = np.asarray(test.label)
    # What the evaluator reads: candidate_ids (decoder, single-token label words),
    # choices (decoder, multi-token label words: each scored as a sequence) or
    # candidates (switch: label-word decoder targets).
    self.candidate_ids = self.choices = self.candidates = None
    if self.multiple_choice:  # train: prompt + gold option; test: (N, 4, T), labels = groups
      self.batch_keys = ("tokens", "mask", "target_mask")
      ex = mc_lib.format_train(d.dataset, train, self.tokenizer, d.seq_len)
      self.train = {k: ex[k] for k in self.batch_keys}
      self.test = mc_lib.format_test(d.dataset, test, self.tokenizer, d.seq_len)
      self.mc_metric = config.eval.get("mc_metric", "acc")
    elif self.seq2seq:
      fmt = dict(label_words=label_words, template=AGNEWS_TEMPLATE, max_len=d.seq_len)
      ex = fmt_lib.format_seq2seq_classification(train.text, train.label, self.tokenizer, **fmt)
      self.batch_keys = ("tokens", "mask", "target_tokens", "target_mask")
      self.train = {k: ex[k] for k in self.batch_keys}
      test_ex = fmt_lib.format_seq2seq_classification(test.text, test.label, self.tokenizer, **fmt)
      self.test = {k: test_ex[k] for k in ("tokens", "mask", "labels")}
      self.candidates = fmt_lib.seq2seq_label_candidates(self.tokenizer, label_words)
    else:
      fmt = dict(label_words=label_words, template=AGNEWS_TEMPLATE, max_len=d.seq_len)
      ex = fmt_lib.format_classification(train.text, train.label, self.tokenizer, **fmt)
      self.batch_keys = ("tokens", "mask", "target_mask")
      self.train = {k: ex[k] for k in self.batch_keys}
      words = fmt_lib.label_word_ids(self.tokenizer, label_words)
      if all(len(w) == 1 for w in words):
        test_ex = fmt_lib.format_classification(test.text, test.label, self.tokenizer, **fmt)
        self.test = {
            k: test_ex[k] for k in ("tokens", "mask", "target_mask", "labels", "last_index")
        }
        self.candidate_ids = fmt_lib.single_token_ids(self.tokenizer, label_words)
      else:  # e.g. a checkpoint's tokenizer splits a label word: score whole sequences
        self.choices = fmt_lib.format_label_word_choices(
            test.text, test.label, self.tokenizer, **fmt
        )
        self.test = {
            k: self.choices[k] for k in ("tokens", "mask", "target_mask", "option_chars", "labels")
        }

  def round_batches(
      self, config: ml_collections.ConfigDict, client_ids: np.ndarray, round_idx: int
  ) -> dict[str, np.ndarray]:
    """(C, S, B, T) arrays of the sampled clients for one round."""
    from fedalign.data.batching import make_client_batches

    t = config.train
    kw = dict(num_steps=t.local_steps) if t.local_steps > 0 else dict(epochs=t.local_epochs)
    if t.local_steps == 0:
      # One compiled shape for the whole run: pad to the largest client's step count.
      kw["num_padded_steps"] = int(
          t.local_epochs * math.ceil(self.client_sizes.max() / t.batch_size)
      )
    b = make_client_batches(
        self.train,
        [self.clients[c] for c in client_ids],
        t.batch_size,
        seed=config.seed,
        round=round_idx,
        client_ids=client_ids,
        **kw,
    )
    return {k: b[k] for k in self.batch_keys + ("step_mask",)}


def sample_clients(seed: int, round_idx: int, num_clients: int, per_round: int) -> np.ndarray:
  """Sorted client ids of a round, derived from (seed, round) only."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, round_idx, 104729]))
  return np.sort(rng.choice(num_clients, per_round, replace=False))


def _to_py(x: Any) -> Any:
  x = np.asarray(x)
  return x.item() if x.ndim == 0 else x.tolist()


# ----------------------------------------------------------------------------- the run
def run_experiment(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Runs (or resumes) a federated experiment; returns the summary written to summary.json.

  Example (a few seconds on CPU):
    >>> import tempfile, importlib.util
    >>> spec = importlib.util.spec_from_file_location('c', 'configs/default.py')
    >>> mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    >>> cfg = mod.get_config('runlocal'); cfg.train.rounds = 1
    >>> summary = run_experiment(cfg, tempfile.mkdtemp())  # doctest: +SKIP
  """
  from fedalign.metrics.evaluation import client_accuracy

  validate_config(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  check_workdir_config(workdir, config)
  t0 = time.time()
  reported_config = config
  config = maybe_pretrained(config, workdir)  # config.pretrain.enabled: the cached checkpoint
  data = FederatedData(config, workdir)
  mcfg, params = load_model(config, data.tokenizer)
  module = build_module(mcfg)
  mask = trainable_mask(params, config.train.trainable)
  trainable, _ = partition(params, mask)
  algorithm = make_algorithm(config, trainable, config.data.num_clients)
  task = (
      Seq2SeqTask(module) if data.seq2seq else CausalLMTask(module, config.train.prompt_loss_weight)
  )
  client_update = make_client_update(
      task,
      algorithm,
      client_optimizer(config),
      load_balance_coef=config.train.load_balance_coef,
      z_loss_coef=config.train.z_loss_coef,
  )
  mesh = None
  if config.train.use_mesh:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), (CLIENT_AXIS,))
  chunk = config.train.chunk_size or None
  round_fn = jax.jit(
      make_round_fn(client_update, algorithm, mask, seed=config.seed, chunk_size=chunk, mesh=mesh)
  )
  evaluate = make_evaluator(data, mcfg, module, config.eval.batch_size)
  test_examples = {k: jnp.asarray(v) for k, v in data.test.items()}
  specialization = make_specialization(data, module, config.eval.specialization_examples)

  state = init_server_state(params, algorithm, mask, config.data.num_clients)
  ckpt = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep)
  start_round, history = 0, []
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, meta = restored
    state = jax.tree.map(jnp.asarray, state)
    start_round = int(meta["round"])
    history = list(meta.get("history", []))
    log.info("resumed from round %d (%s)", start_round, ckpt.directory)
  metrics_path = workdir / "metrics.jsonl"
  _truncate_metrics(metrics_path, start_round)

  cpr = config.train.clients_per_round
  # Weight-0 padding clients make the round's client count a multiple of the chunk size and
  # of the number of devices on the mesh.
  step = math.lcm(chunk or 1, mesh.size if mesh is not None else 1)
  pad_to = int(math.ceil(cpr / step) * step)
  rounds = config.train.rounds
  bar = tqdm(
      range(start_round, rounds),
      desc=f"{config.method}",
      initial=start_round,
      total=rounds,
      disable=None,
  )
  for r in bar:
    rt = time.time()
    ids = sample_clients(config.seed, r, config.data.num_clients, cpr)
    if chunk is not None:  # chunks of similar size: the local loop stops at a chunk's longest
      ids = ids[np.argsort(-data.client_sizes[ids], kind="stable")]
    batches = data.round_batches(config, ids, r)
    weights = data.client_sizes[ids].astype(np.float32)
    if pad_to > cpr:  # weight-0 padding clients (chunks / devices)
      extra = pad_to - cpr
      batches = {
          k: np.concatenate([v, np.zeros((extra,) + v.shape[1:], v.dtype)])
          for k, v in batches.items()
      }
      weights = np.concatenate([weights, np.zeros(extra, np.float32)])
      ids_in = np.concatenate([ids, np.repeat(ids[:1], extra)])
    else:
      ids_in = ids
    state, out = round_fn(state, batches, jnp.asarray(weights), jnp.asarray(ids_in), r)
    train_loss = float(out["train_loss"])
    excluded = [int(c) for c, e in zip(ids, np.asarray(out["excluded"])[:cpr]) if e]
    round_time = time.time() - rt
    record = {
        "round": r + 1,
        "method": config.method,
        "train_loss": train_loss,
        "excluded_clients": excluded,
        "round_time_s": round_time,
    }
    if (r + 1) % config.eval.every == 0 or r + 1 == rounds:
      ev = evaluate(state["params"], test_examples)
      record["test_accuracy"] = float(ev["acc"])
      if config.eval.per_client:
        acc_c = client_accuracy(ev["correct"], test_examples["labels"], data.label_counts)
        record["client_accuracy"] = [round(float(a), 5) for a in acc_c]
        record["mean_client_accuracy"] = float(jnp.mean(acc_c))
      record.update(_diagnostics(out))
      _save_client_routing(
          workdir / "routing_distributions.npz", out, ids, r + 1, config.data.num_clients
      )
      if specialization is not None:
        mi, _ = specialization(state["params"])
        record["expert_specialization"] = float(np.mean([float(v) for v in mi.values()]))
        record["expert_specialization_per_block"] = {k: float(v) for k, v in mi.items()}
      record["elapsed_s"] = time.time() - t0
      history.append(
          {"round": r + 1, "test_accuracy": record["test_accuracy"], "train_loss": train_loss}
      )
      with metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
      bar.set_postfix(acc=f"{record['test_accuracy']:.3f}", loss=f"{train_loss:.3f}")
      log.info(
          "round %d/%d %s test_accuracy=%.4f train_loss=%.4f (%.1fs)",
          r + 1,
          rounds,
          config.method,
          record["test_accuracy"],
          train_loss,
          round_time,
      )
    if excluded:
      log.warning("round %d: clients %s sent non-finite updates and were excluded", r + 1, excluded)
    every = config.checkpoint.every
    if every and ((r + 1) % every == 0 or r + 1 == rounds):
      ckpt.save(r + 1, state, {"round": r + 1, "history": history})
  ckpt.close()

  accs = [h["test_accuracy"] for h in history]
  summary = {
      "method": config.method,
      "final_test_accuracy": accs[-1] if accs else float("nan"),
      "best_test_accuracy": max(accs) if accs else float("nan"),
      "last5_mean_test_accuracy": float(np.mean(accs[-5:])) if accs else float("nan"),
      "rounds": rounds,
      "num_clients": config.data.num_clients,
      "client_sizes": data.client_sizes.tolist(),
      "wall_time_s": time.time() - t0,
      "config": json.loads(reported_config.to_json()),
  }
  if config.model.hf_checkpoint:
    summary["checkpoint"] = str(config.model.hf_checkpoint)
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  _plot(workdir, history, data, config)
  return summary


def make_evaluator(data: FederatedData, mcfg: Any, module: Any, batch_size: int) -> Any:
  """The jitted ``evaluate(params, data.test) -> {'acc', 'correct', 'pred', ...}`` of a run."""
  from fedalign.metrics import evaluation as ev

  if data.seq2seq:
    return ev.make_seq2seq_classification_evaluator(mcfg, data.candidates, batch_size)
  apply_fn = lambda p, tok, m: module.apply({"params": p}, tok, m)[0]
  if getattr(data, "multiple_choice", False):  # MMLU / HellaSwag: every option scored
    return ev.make_multiple_choice_evaluator(
        apply_fn,
        max(1, batch_size // data.test["tokens"].shape[1]),
        labels_key="answers",
        metric=data.mc_metric,
    )
  if data.candidate_ids is not None:
    return ev.make_classification_evaluator(apply_fn, data.candidate_ids, batch_size)
  # Multi-token label words: K sequences per example, so K times smaller batches.
  return ev.make_multiple_choice_evaluator(apply_fn, max(1, batch_size // len(data.label_words)))


def make_specialization(data: FederatedData, module: Any, max_examples: int) -> Any:
  """``params -> ({block: MI}, {block: (K, E)})``: expert specialization on test prompts.

  Mutual information between expert selection and class label (method doc, section 7) over
  the first ``max_examples`` test examples; the label word itself is masked out so that only
  the prompt is routed. None when ``max_examples`` is 0.
  """
  from fedalign.metrics.specialization import make_expert_specialization_fn

  if max_examples <= 0 or np.ndim(data.test["tokens"]) != 2:
    return None  # off, or multi-token label words (K sequences per example)
  n = min(max_examples, len(data.test["labels"]))
  tokens = jnp.asarray(data.test["tokens"][:n])
  mask = jnp.asarray(data.test["mask"][:n])
  if "target_mask" in data.test and not data.seq2seq:
    mask = mask & ~jnp.asarray(data.test["target_mask"][:n])
  labels = jnp.asarray(data.test["labels"][:n])
  if data.seq2seq:

    def routing_fn(p, t, m):  # one decoder step per example, masked like its encoder input
      return module.apply({"params": p}, t, m, None, m[:, :1])[1]["routing"]

  else:

    def routing_fn(p, t, m):
      return module.apply({"params": p}, t, m)[1]["routing"]

  fn = make_expert_specialization_fn(routing_fn, data.num_classes)
  return lambda params: fn(params, tokens, mask, labels)


def _diagnostics(out: dict[str, Any]) -> dict[str, Any]:
  """Scalar diagnostics of the aggregator plus routing divergence and role preservation."""
  from fedalign.metrics import routing_metrics as rm
  from fedalign.models.routing import finalize_stats

  rec: dict[str, Any] = {}
  for k, v in out["diagnostics"].items():
    v = np.asarray(v)
    rec[f"agg/{k}"] = _to_py(v) if v.size <= 64 else float(v.mean())
  divs, roles = [], []
  for path, s in out["routing_stats"].items():
    if path.startswith("_"):
      continue
    f = finalize_stats(s)
    real = np.asarray(s["token_count"]) > 0
    if not real.any():
      continue
    p = f["p"][real]
    p_mean = jnp.mean(p, axis=0)
    divs.append(float(rm.routing_divergence(p, p_mean / jnp.sum(p_mean), jnp.ones(p.shape[0]))))
    roles.append(float(rm.expert_role_preservation(f["mu"][real], f["c"][real])))
  if divs:
    rec["routing_divergence"] = float(np.mean(divs))
    rec["expert_role_preservation"] = float(np.mean(roles))
  return rec


def _save_client_routing(
    path: pathlib.Path, out: dict[str, Any], ids: np.ndarray, round_num: int, num_clients: int
) -> None:
  """Writes each MoE block's per-client routing distribution p_i (clients, experts).

  Rows are client ids (NaN for clients not sampled this round); ``p_i`` is the mean router
  probability over the client's local training tokens in this round (section 3.1 of the
  method doc). Keys are block paths with '/' as '.', plus ``round`` and ``client_ids``.
  """
  from fedalign.models.routing import finalize_stats

  arrays: dict[str, np.ndarray] = {"round": np.asarray(round_num), "client_ids": np.asarray(ids)}
  for block, s in out["routing_stats"].items():
    if block.startswith("_"):
      continue
    p = np.asarray(finalize_stats(s)["p"], np.float32)[: len(ids)]
    full = np.full((num_clients, p.shape[-1]), np.nan, np.float32)
    full[ids] = p
    arrays[block.replace("/", ".")] = full
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _truncate_metrics(path: pathlib.Path, start_round: int) -> None:
  """Drops metric lines past the resumed round so a resumed file equals an uninterrupted one."""
  if not path.exists():
    return
  keep = [
      line
      for line in path.read_text().splitlines()
      if line.strip() and json.loads(line)["round"] <= start_round
  ]
  path.write_text("".join(line + "\n" for line in keep))


def _plot(
    workdir: pathlib.Path,
    history: list[dict],
    data: FederatedData,
    config: ml_collections.ConfigDict,
) -> None:
  """Accuracy-vs-round curve and the partition's clients x classes counts."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from fedalign.data.partition import plot_label_counts

  plots = workdir / "plots"
  plots.mkdir(exist_ok=True)
  if history:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([h["round"] for h in history], [h["test_accuracy"] for h in history], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("global test accuracy")
    ax.set_title(f"{config.method}, alpha={config.data.alpha}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plots / "accuracy.png", dpi=120)
    plt.close(fig)
  plot_label_counts(data.label_counts, plots / "partition.png")

"""Config checks of a federated run: bad fields are rejected before any compute.

:func:`validate_config` checks every field's value first and the filesystem (checkpoint and
data directories) last, so a bad value is reported whether or not the data exists on this
machine. :func:`check_workdir_config` refuses to resume a workdir of a different config.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections

from fedalign.aggregation import robust as robust_lib
from fedalign.data.federated import DATA_TASKS, DATASETS
from fedalign.federated import attacks as attacks_lib
from fedalign.data.multiple_choice import MC_DATASETS
from fedalign.algorithms import METHODS
from fedalign.algorithms.base import SERVER_LR_SCHEDULES
from fedalign.config_files import config_differences, flatten_config
from fedalign.models.config import DTYPES, MoEConfig
from fedalign.models.from_config import MODEL_TYPES, model_config_from, model_type
from fedalign.privacy import check_dp_config

# Fields that may change between a run and its resumption. model.moe_impl / moe_block_size
# change how the experts are computed, not what ('dense' and dropless 'sparse' are the same
# function), so workdirs of runs made before 'sparse' became the default resume.
RESUMABLE_FIELDS = (
    "train.rounds",
    "eval.every",
    "checkpoint.every",
    "checkpoint.keep",
    "model.moe_impl",
    "model.moe_block_size",
)
# Expert compute of the decoder that a vmapped federated round can run (MoEConfig.moe_impl).
FEDERATED_MOE_IMPLS = ("sparse", "dense")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects bad fields before any compute, naming the field and the accepted values.

  Field values are checked first, then the paths (``model.hf_checkpoint``, ``data.data_dir``).

  >>> from fedalign.config_files import load_config
  >>> cfg = load_config('configs/default.py:runlocal')
  >>> validate_config(cfg)
  >>> cfg.train.optimizer = 'lion'
  >>> validate_config(cfg)
  Traceback (most recent call last):
  ...
  ValueError: config.train.optimizer='lion' is invalid: expected one of ('adamw', 'sgd').
  """

  def bad(field, value, expected):
    raise ValueError(f"config.{field}={value!r} is invalid: expected {expected}.")

  # ---- field values
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
  d, t = config.data, config.train
  if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
    bad("seed", config.seed, "an integer >= 0")
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
  for name in ("min_client_size", "max_train_examples", "max_test_examples"):
    if d.get(name, 0) < 0:
      bad(
          f"data.{name}",
          d[name],
          "an integer >= 0 (0 = no limit)" if "max" in name else "an integer >= 0",
      )
  if d.get("validation_examples", 0) < 0:
    bad("data.validation_examples", d.validation_examples, "an integer >= 0 (0 = none held out)")
  if d.seq_len < 1:
    bad("data.seq_len", d.seq_len, "a positive integer (tokens per example)")
  if t.rounds < 1:
    bad("train.rounds", t.rounds, "an integer >= 1")
  if t.local_steps < 0:
    bad(
        "train.local_steps",
        t.local_steps,
        "0 (train.local_epochs over the data) or an integer >= 1",
    )
  if t.local_steps == 0 and t.local_epochs < 1:
    bad("train.local_epochs", t.local_epochs, "an integer >= 1 (or train.local_steps > 0)")
  if t.batch_size < 1:
    bad("train.batch_size", t.batch_size, "an integer >= 1")
  if not t.learning_rate > 0:
    bad("train.learning_rate", t.learning_rate, "a positive float")
  for name in (
      "weight_decay",
      "grad_clip",
      "load_balance_coef",
      "z_loss_coef",
      "prompt_loss_weight",
  ):
    if t.get(name, 0.0) < 0:
      bad(
          f"train.{name}",
          t[name],
          "a float >= 0" + (" (0 = no clipping)" if name == "grad_clip" else ""),
      )
  if t.optimizer not in ("adamw", "sgd"):
    bad("train.optimizer", t.optimizer, "one of ('adamw', 'sgd')")
  if t.trainable not in ("full", "lora", "body"):
    bad("train.trainable", t.trainable, "one of ('full', 'lora', 'body')")
  if t.trainable == "lora" and config.model.lora_rank < 1 and not config.model.hf_checkpoint:
    bad("model.lora_rank", config.model.lora_rank, "an integer >= 1 when train.trainable='lora'")
  if t.chunk_size < 0:
    bad("train.chunk_size", t.chunk_size, "0 (all clients at once) or a positive integer")
  lanes = t.get("lanes", 0)
  if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 0:
    bad("train.lanes", lanes, "0 (off: clients padded to the longest) or a positive integer")
  if lanes and t.chunk_size:
    bad(
        "train.chunk_size",
        t.chunk_size,
        f"0 with train.lanes={lanes} (lanes replace chunks: --config.train.chunk_size=0)",
    )
  min_useful = t.get("lanes_min_useful", 0.9)
  if isinstance(min_useful, bool) or not isinstance(min_useful, (int, float)):
    bad("train.lanes_min_useful", min_useful, "a float in [0, 1]")
  if not 0.0 <= min_useful <= 1.0:
    bad("train.lanes_min_useful", min_useful, "a float in [0, 1]")
  moe_impl = config.model.get("moe_impl", "sparse")
  if moe_impl not in FEDERATED_MOE_IMPLS:
    # jax.lax.ragged_dot's gradient has no batching rule for the client axis of the vmapped
    # round (NotImplementedError in jax 0.10); 'sparse' is the vmappable dropless path.
    bad(
        "model.moe_impl",
        moe_impl,
        f"one of {FEDERATED_MOE_IMPLS} in federated runs ('ragged' cannot be vmapped over "
        "clients; 'sparse' is dropless and computes the top-k experts only)",
    )
  capacity_factor = config.model.get("capacity_factor", 0.0)
  if capacity_factor < 0:
    bad("model.capacity_factor", capacity_factor, "0 (dropless) or a positive float")
  if capacity_factor > 0 and moe_impl != "sparse":
    bad(
        "model.capacity_factor",
        capacity_factor,
        f"0 (dropless) with model.moe_impl={moe_impl!r}; capacity dispatch is "
        "model.moe_impl='sparse' with model.capacity_factor > 0",
    )
  block_size = config.model.get("moe_block_size", MoEConfig.moe_block_size)
  if not isinstance(block_size, int) or block_size < 1:
    bad("model.moe_block_size", block_size, "a positive integer (rows per expert block)")
  if d.dataset not in DATASETS:
    bad("data.dataset", d.dataset, f"one of {tuple(DATASETS)}")
  if (
      config.method in ("fedalign", "fedmoe")
      and not config.model.hf_checkpoint
      and config.model.get("num_experts", 1) < 1
  ):
    bad(
        "model.num_experts",
        config.model.num_experts,
        f"an integer >= 1 with method={config.method!r} (it aggregates experts and routers)",
    )
  if model_type(config) == "decoder" and not config.model.hf_checkpoint:
    # the model's own checks (sizes, top_k, heads) under the run config's field names, now
    # rather than after the data is built; the tokenizer's vocabulary size is not known yet
    model_config_from(config, max(int(d.get("vocab_size", 0)), 1))
  if d.dataset in MC_DATASETS and model_type(config) != "decoder":
    bad(
        "model.type",
        model_type(config),
        f"'decoder' with data.dataset={d.dataset!r} (options are scored by a causal LM)",
    )
  task = d.get("task", "classification")
  if task not in DATA_TASKS:
    bad("data.task", task, f"one of {DATA_TASKS}")
  if task == "lm" and (d.dataset in MC_DATASETS or model_type(config) != "decoder"):
    bad(
        "data.task",
        task,
        "'classification' unless data.dataset is 'agnews_embedded' or 'agnews' and "
        f"model.type='decoder' (got {d.dataset!r}, {model_type(config)!r}): 'lm' is next-token "
        "language modelling on the AG News texts with a causal LM",
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
        "'test' unless data.validation_examples > 0 holds out training rows to evaluate on",
    )
  if config.eval.every < 1:
    bad("eval.every", config.eval.every, "an integer >= 1")
  if config.eval.batch_size < 1:
    bad("eval.batch_size", config.eval.batch_size, "an integer >= 1")
  if config.eval.get("specialization_examples", 0) < 0:
    bad("eval.specialization_examples", config.eval.specialization_examples, "an integer >= 0")
  if config.checkpoint.every < 0:
    bad("checkpoint.every", config.checkpoint.every, "0 (never) or a positive integer")
  if config.checkpoint.keep < 1:
    bad(
        "checkpoint.keep",
        config.checkpoint.keep,
        "an integer >= 1 (the newest checkpoints kept; a run resumes from the latest)",
    )
  check_dp_config(config)  # dp.* and faults.* (fedalign/privacy.py)

  # ---- robust aggregation and simulated attacks (docs/robustness.md)
  srv = config.server
  if not srv.get("learning_rate", 1.0) > 0:
    bad("server.learning_rate", srv.learning_rate, "a positive float (1.0 = plain averaging)")
  for name in ("momentum", "b1", "b2"):
    if name in srv and not 0.0 <= srv[name] < 1.0:
      bad(f"server.{name}", srv[name], "a float in [0, 1)")
  if "eps" in srv and not srv.eps > 0:
    bad("server.eps", srv.eps, "a positive float")
  if srv.get("lr_schedule", "constant") not in SERVER_LR_SCHEDULES:
    bad("server.lr_schedule", srv.lr_schedule, f"one of {SERVER_LR_SCHEDULES}")
  if not 0.0 <= srv.get("lr_final_fraction", 0.0) <= 1.0:
    bad("server.lr_final_fraction", srv.lr_final_fraction, "a number in [0, 1]")
  robust_lib.check_fields(
      srv.get("robust", "none"),
      srv.get("robust_norm_bound", 0.0),
      srv.get("trim_fraction", 0.1),
      srv.get("krum_byzantine", 0),
      srv.get("krum_select", 0),
      srv.get("robust_stats_quantile", 0.5),
      clients_per_round=t.clients_per_round,
  )
  if srv.get("robust_stats", False) not in (True, False):
    bad("server.robust_stats", srv.robust_stats, "True or False")
  attack = config.get("attack")
  if attack is not None:
    attacks_lib.check_fields(attack.kind, attack.fraction, attack.scale)
    if attack.kind == "label_flip" and (
        d.dataset in MC_DATASETS or model_type(config) != "decoder" or task == "lm"
    ):
      bad(
          "attack.kind",
          attack.kind,
          "an upload attack with this task (label_flip permutes the label words of decoder "
          "classification; multiple choice, data.task='lm' and Switch seq2seq have none)",
      )

  # ---- the filesystem
  if config.model.hf_checkpoint:
    ckpt = pathlib.Path(config.model.hf_checkpoint)
    if not (ckpt / "config.json").is_file():
      bad(
          "model.hf_checkpoint",
          config.model.hf_checkpoint,
          "a local Hugging Face checkpoint directory holding config.json, model.safetensors "
          "and tokenizer.json (download it beforehand; nothing is fetched at run time)",
      )
    # the family first: a checkpoint of another family would otherwise fail later, on its
    # tokenizer or its weights, or be pointed at the other model.type
    from fedalign.models.hf import MODEL_TYPES as HF_DECODER_TYPES
    from fedalign.models.hf_files import read_config

    hf_type = read_config(ckpt).get("model_type")
    if hf_type != "switch_transformers" and hf_type not in HF_DECODER_TYPES:
      bad(
          "model.hf_checkpoint",
          config.model.hf_checkpoint,
          f"a checkpoint of a supported family: its config.json has model_type={hf_type!r}; "
          f"supported are {sorted(HF_DECODER_TYPES)} (model.type='decoder') and "
          "'switch_transformers' (model.type='switch')",
      )
    wanted = "switch" if hf_type == "switch_transformers" else "decoder"
    if model_type(config) != wanted:
      bad(
          "model.type",
          model_type(config),
          f"{wanted!r} for model.hf_checkpoint={config.model.hf_checkpoint!r} "
          f"(model_type={hf_type!r})",
      )
  if d.dataset in MC_DATASETS and (not d.data_dir or not pathlib.Path(d.data_dir).is_dir()):
    bad(
        "data.data_dir",
        d.data_dir,
        f"an existing directory holding the {d.dataset} files "
        f"(e.g. ../shared/data/{d.dataset}) for data.dataset={d.dataset!r}",
    )


def check_workdir_config(
    workdir: pathlib.Path, config: ml_collections.ConfigDict, *, write: bool = True
) -> None:
  """Refuses a workdir whose saved config differs (except :data:`RESUMABLE_FIELDS`), then
  writes ``workdir/config.json`` (``write=False``: checks only, e.g. on processes other than
  0 of a multi-process run).

  >>> import tempfile
  >>> from fedalign.config_files import load_config
  >>> cfg, work = load_config('configs/default.py:runlocal'), pathlib.Path(tempfile.mkdtemp())
  >>> check_workdir_config(work, cfg)
  >>> cfg.train.rounds = 9  # resumable: fine
  >>> check_workdir_config(work, cfg)
  >>> cfg.seed = 1
  >>> check_workdir_config(work, cfg)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: workdir ... holds a run of a different config (seed: 0 -> 1); ...
  """
  path = pathlib.Path(workdir) / "config.json"
  new = flatten_config(config)
  if path.exists():
    old = flatten_config(json.loads(path.read_text()))
    resumable = RESUMABLE_FIELDS
    if new.get("server.lr_schedule", "constant") != "constant":
      # The schedule spans train.rounds: more rounds would change the rounds already run.
      resumable = tuple(f for f in resumable if f != "train.rounds")
    diff = config_differences(old, new, resumable)
    if diff == ["train.rounds"] and resumable != RESUMABLE_FIELDS:
      raise ValueError(
          f"workdir {workdir} holds a run of train.rounds={old.get('train.rounds')!r}, and "
          f"config.server.lr_schedule={new['server.lr_schedule']!r} decays over train.rounds: "
          f"train.rounds={new['train.rounds']!r} would change the learning rate of the rounds "
          "already run. Use a new --workdir, or the same train.rounds to resume."
      )
    if diff:
      details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:10])
      raise ValueError(
          f"workdir {workdir} holds a run of a different config ({details}); "
          "use a new --workdir or the same config to resume."
      )
  if write:
    path.write_text(config.to_json(indent=2))

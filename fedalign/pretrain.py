"""Central pre-training of the small MoE LM on text disjoint from the clients' data.

The paper fine-tunes pre-trained MoE models (Switch-base-16, DeepSeek-MoE-16B): experts and
routers start with roles that heterogeneous clients can pull apart. The CPU-scale analog gets
such a start from this module: a causal LM of the experiment's architecture is trained centrally
on Dolly-15k, MMLU and HellaSwag text (``config.pretrain.sources``; never the federated
dataset), with a byte-level BPE tokenizer trained on that same text, and written as a Hugging
Face checkpoint (``config.json``, ``model.safetensors``, ``tokenizer.json``) that the federated
run loads through ``config.model.hf_checkpoint``.

The result is cached: :func:`ensure_pretrained` reuses ``pretrain_info.json`` + checkpoint when
the pre-training fields, the architecture and the tokenizer settings are unchanged, so a grid
pre-trains once (``experiments/reproduce.py`` caches it in ``WORKDIR/pretrained``). The
pre-training seed (``config.pretrain.seed``) is independent of ``config.seed``: every federated
seed fine-tunes the same checkpoint.

The label words of the federated task (AG News: `` World``, `` Sports``, `` Business``,
`` Tech``) are added to the tokenizer as whole tokens (``config.pretrain.added_tokens``), as a
large tokenizer would have them; they are trained wherever they occur in the corpus.

Command (about 2 minutes on 2 CPU cores for the analog's sizes)::

    python -m fedalign.pretrain --config=configs/cpu_analog.py --workdir=/tmp/pretrained

Example (a few seconds)::

    >>> import tempfile, importlib.util
    >>> spec = importlib.util.spec_from_file_location('c', 'configs/cpu_analog.py')
    >>> mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    >>> cfg = mod.get_config('runlocal')
    >>> path = ensure_pretrained(cfg, tempfile.mkdtemp())  # doctest: +SKIP
    >>> sorted(p.name for p in path.iterdir())  # doctest: +SKIP
    ['config.json', 'model.safetensors', 'pretrain_info.json', 'pretrain_loss.png', ...]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

log = logging.getLogger(__name__)

SOURCES = ("dolly", "mmlu", "hellaswag")
INFO_FILE = "pretrain_info.json"


# config.model fields that do not change the pretrained checkpoint (fine-tuning / compute).
_NOT_IN_KEY = (
    "hf_checkpoint",
    "check_checkpoint",
    "lora_rank",
    "lora_alpha",
    "moe_impl",
    "capacity_factor",
    "moe_block_size",
)


def _pretrain_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Everything the checkpoint depends on (the cache key)."""
  p = config.pretrain
  model = {k: v for k, v in config.model.to_dict().items() if k not in _NOT_IN_KEY}
  return {
      "pretrain": {
          k: v for k, v in p.to_dict().items() if k not in ("enabled", "dir", "save_every")
      },
      "model": model,
      "vocab_size": config.data.vocab_size,
      "load_balance_coef": config.train.load_balance_coef,
  }


def validate_pretrain_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field and the accepted values."""
  p = config.pretrain
  sources = [s.strip() for s in str(p.sources).split(",") if s.strip()]
  bad = [s for s in sources if s not in SOURCES]
  if not sources or bad:
    raise ValueError(
        f"config.pretrain.sources={p.sources!r} is invalid: expected a "
        f"comma-separated subset of {SOURCES}"
    )
  if config.data.dataset.split("_")[0] in sources:
    raise ValueError(
        f"config.pretrain.sources={p.sources!r} contains the federated dataset "
        f"config.data.dataset={config.data.dataset!r}: pre-training text must be "
        "disjoint from the clients' and the test data"
    )
  for name in ("steps", "batch_size", "seq_len"):
    if int(p[name]) < 1:
      raise ValueError(f"config.pretrain.{name}={p[name]!r} is invalid: expected an integer >= 1")
  if not p.learning_rate > 0:
    raise ValueError(
        f"config.pretrain.learning_rate={p.learning_rate!r} is invalid: expected "
        "a positive float"
    )
  for name, expected in (
      ("max_chars", "0 (all text) or a positive integer"),
      ("warmup_steps", "an integer >= 0"),
  ):
    if int(p.get(name, 0)) < 0:
      raise ValueError(f"config.pretrain.{name}={p[name]!r} is invalid: expected {expected}")
  if config.model.get("type", "decoder") != "decoder":
    raise ValueError(
        f"config.model.type={config.model.type!r}: pre-training supports " "'decoder' models only"
    )
  if not pathlib.Path(p.data_dir).is_dir():
    raise ValueError(
        f"config.pretrain.data_dir={p.data_dir!r} is not a directory: expected "
        "the folder holding dolly/, mmlu/ and hellaswag/ (../shared/data)"
    )


def pretrain_corpus(
    data_dir: str | os.PathLike, sources: Sequence[str] = SOURCES, max_chars: int = 0
) -> list[str]:
  """Documents of the pre-training corpus, in a fixed order.

  Dolly: instruction, context and response; MMLU (test + dev): question and the four choices;
  HellaSwag (validation): context and the correct ending. ``max_chars`` > 0 stops once that
  many characters are collected (sources interleaved, so each contributes).
  """
  from fedalign.data import sources as src

  data_dir = pathlib.Path(data_dir)
  per_source: list[list[str]] = []
  for name in sources:
    if name == "dolly":
      docs = []
      for split in src.dolly_splits(data_dir / "dolly"):
        for r in src.read_dolly(data_dir / "dolly", split).records:
          docs.append(
              "\n".join(t for t in (r["instruction"], r["context"], r["response"]) if t.strip())
          )
    elif name == "mmlu":
      docs = []
      for split in src.mmlu_splits(data_dir / "mmlu"):
        for r in src.read_mmlu(data_dir / "mmlu", split).records:
          docs.append(r["question"] + "\n" + "\n".join(r["choices"]))
    elif name == "hellaswag":
      docs = [
          r["ctx"] + " " + r["endings"][r["label"]]
          for r in src.read_hellaswag(data_dir / "hellaswag").records
      ]
    else:
      raise ValueError(f"unknown pre-training source {name!r}: expected one of {SOURCES}")
    per_source.append(docs)
  out, total = [], 0
  for i in range(max(len(d) for d in per_source)):
    for docs in per_source:
      if i < len(docs):
        out.append(docs[i])
        total += len(docs[i])
        if max_chars and total >= max_chars:
          return out
  return out


def pack_windows(
    ids: Sequence[Sequence[int]], seq_len: int, bos_id: int, eos_id: int
) -> np.ndarray:
  """Concatenates ``<bos> doc <eos>`` streams and cuts them into (N, seq_len) windows.

  >>> pack_windows([[5, 6], [7]], 4, 1, 2).tolist()
  [[1, 5, 6, 2]]
  """
  stream = np.fromiter((t for doc in ids for t in (bos_id, *doc, eos_id)), np.int32)
  n = len(stream) // seq_len
  return stream[: n * seq_len].reshape(n, seq_len)


def pretrain(config: ml_collections.ConfigDict, out_dir: str | os.PathLike) -> pathlib.Path:
  """Trains tokenizer + model from scratch and writes the checkpoint to ``out_dir``.

  Next-token loss on every token of packed windows plus the load-balancing loss
  (``config.train.load_balance_coef``); AdamW with linear warm-up and cosine decay; 2% of the
  windows are held out and their loss is reported in ``pretrain_info.json``.
  """
  from fedalign.data.tokenize import train_bpe
  from fedalign.models.from_config import model_config_from
  from fedalign.models import build_module, init_params
  from fedalign.models.api import MoEModel
  from fedalign.models.hf import save_pretrained

  validate_pretrain_config(config)
  p = config.pretrain
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  sources = [s.strip() for s in str(p.sources).split(",") if s.strip()]
  docs = pretrain_corpus(p.data_dir, sources, int(p.max_chars))
  log.info(
      "pre-training corpus: %d documents, %.1f MB from %s",
      len(docs),
      sum(map(len, docs)) / 1e6,
      sources,
  )
  tok = train_bpe(
      docs,
      config.data.vocab_size,
      path=out_dir / "tokenizer.json",
      added_tokens=list(p.added_tokens),
  )
  windows = pack_windows(tok.encode(docs), int(p.seq_len), tok.bos_id, tok.eos_id)
  rng = np.random.default_rng(int(p.seed))
  windows = windows[rng.permutation(len(windows))]
  n_val = max(1, len(windows) // 50)
  val, train = windows[:n_val], windows[n_val:]
  if len(train) < p.batch_size:
    raise ValueError(
        f"the pre-training corpus gives {len(train)} windows of "
        f"config.pretrain.seq_len={p.seq_len}, fewer than config.pretrain."
        f"batch_size={p.batch_size}: raise pretrain.max_chars"
    )

  cfg = model_config_from(config, tok.vocab_size)
  cfg = dataclasses.replace(cfg, max_position_embeddings=max(int(p.seq_len), config.data.seq_len))
  module = build_module(cfg)
  params = init_params(cfg, jax.random.key(int(p.seed)), seq_len=int(p.seq_len))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0,
      p.learning_rate,
      min(int(p.warmup_steps), int(p.steps) - 1) or 1,
      int(p.steps),
      end_value=p.learning_rate * 0.1,
  )
  opt = optax.chain(
      optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=float(p.weight_decay))
  )
  opt_state = opt.init(params)
  lb = float(config.train.load_balance_coef)

  def lm_loss(params, tokens):
    logits, aux = module.apply({"params": params}, tokens, jnp.ones(tokens.shape, bool))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
    return ce + lb * aux["load_balance_loss"], ce

  @jax.jit
  def step(params, opt_state, tokens):
    (_, ce), grads = jax.value_and_grad(lm_loss, has_aux=True)(params, tokens)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, ce

  @jax.jit
  def eval_ce(params, tokens):
    return lm_loss(params, tokens)[1]

  def val_loss(params):
    b = int(p.batch_size)
    losses = [
        float(eval_ce(params, jnp.asarray(val[i : i + b]))) for i in range(0, len(val) - b + 1, b)
    ] or [float(eval_ce(params, val))]
    return float(np.mean(losses))

  token_ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  val_before = val_loss(params)
  losses = []
  per_epoch = len(train) // int(p.batch_size)
  order = rng.permutation(len(train))
  for s in tqdm(range(int(p.steps)), desc="pretrain", disable=None):
    j = s % per_epoch
    if j == 0 and s:
      order = rng.permutation(len(train))
    batch = train[order[j * p.batch_size : (j + 1) * p.batch_size]]
    params, opt_state, ce = step(params, opt_state, jnp.asarray(batch))
    if s % 50 == 0 or s == p.steps - 1:
      losses.append((s + 1, float(ce)))
      log.info("pretrain step %d/%d loss %.4f", s + 1, p.steps, losses[-1][1])
    every = int(p.get("save_every", 0))
    if every and (s + 1) % every == 0 and s + 1 < p.steps:
      # Intermediate checkpoints (step_N/): the specialisation-vs-training-length record.
      snap = out_dir / f"step_{s + 1}"
      save_pretrained(MoEModel(cfg, params), snap, extra_config=token_ids)
      shutil.copy(out_dir / "tokenizer.json", snap / "tokenizer.json")
      log.info("intermediate checkpoint %s", snap)
  val_after = val_loss(params)
  save_pretrained(MoEModel(cfg, params), out_dir, extra_config=token_ids)
  info = {
      "fields": _pretrain_fields(config),
      "documents": len(docs),
      "characters": int(sum(map(len, docs))),
      "train_windows": int(len(train)),
      "validation_windows": int(n_val),
      "tokens_seen": int(p.steps * p.batch_size * p.seq_len),
      "epochs": float(p.steps * p.batch_size / len(train)),
      "validation_loss_before": val_before,
      "validation_loss_after": val_after,
      "loss_curve": losses,
      "wall_time_s": time.time() - t0,
  }
  _plot_losses(losses, out_dir / "pretrain_loss.png")
  (out_dir / INFO_FILE).write_text(json.dumps(info, indent=1))
  log.info(
      "pre-trained in %.0fs: held-out loss %.3f -> %.3f; checkpoint %s",
      info["wall_time_s"],
      val_before,
      val_after,
      out_dir,
  )
  return out_dir


def _plot_losses(losses: list[tuple[int, float]], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.plot([s for s, _ in losses], [v for _, v in losses])
  ax.set_xlabel("step")
  ax.set_ylabel("train next-token loss")
  ax.set_title("central pre-training")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def is_cached(config: ml_collections.ConfigDict, out_dir: str | os.PathLike) -> bool:
  """True when ``out_dir`` holds a finished pre-training of exactly this config."""
  out_dir = pathlib.Path(out_dir)
  info = out_dir / INFO_FILE
  if not (
      info.is_file()
      and (out_dir / "model.safetensors").is_file()
      and (out_dir / "tokenizer.json").is_file()
  ):
    return False
  stored = json.loads(info.read_text()).get("fields")
  return stored == json.loads(json.dumps(_pretrain_fields(config)))


def ensure_pretrained(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> pathlib.Path:
  """The checkpoint directory of ``config.pretrain``, pre-training it unless cached.

  The directory is ``config.pretrain.dir`` or, when that is empty, ``workdir/pretrained``.
  A cached directory whose fields differ is retrained in place (with a warning).
  """
  out = pathlib.Path(config.pretrain.dir or pathlib.Path(workdir) / "pretrained")
  if is_cached(config, out):
    log.info("using the cached pre-trained checkpoint %s", out)
    return out
  if (out / INFO_FILE).exists():
    log.warning("%s was pre-trained with other settings: pre-training again", out)
  return pretrain(config, out)


def maybe_pretrained(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> ml_collections.ConfigDict:
  """``config`` with ``model.hf_checkpoint`` set to the (cached) pre-trained checkpoint when
  ``config.pretrain.enabled``; unchanged otherwise."""
  if "pretrain" not in config or not config.pretrain.enabled:
    return config
  if config.model.hf_checkpoint:
    raise ValueError(
        "config.pretrain.enabled=True and config.model.hf_checkpoint="
        f"{config.model.hf_checkpoint!r}: choose one (pre-train, or load a "
        "checkpoint)"
    )
  path = ensure_pretrained(config, workdir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.hf_checkpoint = str(path)
  config.pretrain.enabled = False
  return config


def main(argv: list[str]) -> None:
  from absl import app

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  config = _FLAGS.config
  config.pretrain.dir = _FLAGS.workdir
  out = (
      pretrain(config, _FLAGS.workdir)
      if _FLAGS.force
      else ensure_pretrained(config, _FLAGS.workdir)
  )
  info = json.loads((pathlib.Path(out) / INFO_FILE).read_text())
  print(
      f"checkpoint={out} validation_loss={info['validation_loss_before']:.3f}->"
      f"{info['validation_loss_after']:.3f} wall_time_s={info['wall_time_s']:.0f}"
  )


if __name__ == "__main__":
  from absl import app, flags
  from fedalign.config_files import define_config_flag

  define_config_flag("config", "Experiment config with a pretrain section.")
  flags.DEFINE_string("workdir", None, "Checkpoint directory to write (or reuse).")
  flags.DEFINE_bool("force", False, "Pre-train even when a matching cache exists.")
  flags.mark_flags_as_required(["config", "workdir"])
  _FLAGS = flags.FLAGS
  app.run(main)

"""The data of a federated run: train/test splits, client partition, tokenizer, token arrays.

:class:`FederatedData` is what :func:`fedalign.federated.run.build_run` builds from
``config.data``. The raw splits come from :data:`DATASETS`, a registry ``name -> loader``
(``loader(config, workdir) -> (train, test)``); add a dataset by adding a loader there.

Example (the embedded AG News sample, byte tokenizer):
    >>> import tempfile
    >>> from fedalign.config_files import load_config
    >>> cfg = load_config('configs/default.py:runlocal')
    >>> cfg.data.tokenizer = 'bytes'
    >>> data = FederatedData(cfg, tempfile.mkdtemp())
    >>> len(data.clients) == cfg.data.num_clients
    True
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pathlib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from fedalign.data import formatting as fmt_lib
from fedalign.data import multiple_choice as mc_lib
from fedalign.data import partition as part
from fedalign.data.agnews import (
    AGNEWS_LABEL_WORDS,
    AGNEWS_TEMPLATE,
    TextSplit,
    load_embedded_agnews,
)
from fedalign.data.tokenize import HFTokenizer, load_tokenizer, train_bpe
from fedalign.models.from_config import model_type

VALIDATION_SEED = 20231  # fixed: the validation hold-out never depends on config.seed
Loader = Callable[[ml_collections.ConfigDict, pathlib.Path], tuple[Any, Any]]


def _agnews_embedded(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[Any, Any]:
  """The AG News sample shipped with the package (no files needed)."""
  return load_embedded_agnews()


def _agnews(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[Any, Any]:
  """AG News through its TFDS builder from the CSV files in ``config.data.data_dir``."""
  from fedalign.data.builders import load_records

  d = config.data
  if not d.data_dir:
    raise ValueError(
        "config.data.data_dir is empty: dataset='agnews' reads the AG News "
        "CSV files from a manual directory (see fedalign.data.sources)."
    )
  splits = []
  for split in ("train", "test"):
    recs = load_records("ag_news", split, d.data_dir, str(pathlib.Path(workdir) / "tfds"))
    splits.append(
        TextSplit([r["text"] for r in recs], np.asarray([r["label"] for r in recs], np.int32))
    )
  return splits[0], splits[1]


def _multiple_choice(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[Any, Any]:
  """MMLU / HellaSwag: the fixed, seed-independent train/test split; label = topic group."""
  return mc_lib.load_splits(config.data.dataset, config.data.data_dir)


#: config.data.task: label-word classification (every dataset) | next-token language modelling
#: on the AG News texts (the domain-heterogeneous setting: clients differ by topic)
DATA_TASKS = ("classification", "lm")

# config.data.dataset -> loader(config, workdir) -> (train, test) splits.
DATASETS: dict[str, Loader] = {
    "agnews_embedded": _agnews_embedded,
    "agnews": _agnews,
    "mmlu": _multiple_choice,
    "hellaswag": _multiple_choice,
}


@contextlib.contextmanager
def _seq_len_named(seq_len: int):
  """Re-raises the formatters' ``max_len=...`` errors as ``config.data.seq_len`` errors."""
  try:
    yield
  except ValueError as e:
    if not str(e).startswith("max_len="):
      raise
    raise ValueError(f"config.data.seq_len={seq_len!r} is invalid: {e}") from None


class FederatedData:
  """Formatted train/test arrays, the client partition and the tokenizer of a run.

  Attributes: ``clients`` (example indices per client), ``client_sizes``, ``label_counts``
  (clients x classes), ``num_classes``, ``tokenizer``, ``train`` / ``test`` (token arrays),
  ``batch_keys``, ``label_words``, ``test_labels``, ``seq2seq``, ``multiple_choice``, ``lm``
  (``data.task = 'lm'``: next-token LM on the texts, the labels only partition) and what
  the evaluator reads: ``candidate_ids``, ``choices`` or ``candidates`` (see below).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    workdir = pathlib.Path(workdir)

    d = config.data
    self.multiple_choice = d.dataset in mc_lib.MC_DATASETS  # MMLU, HellaSwag
    # 'lm': next-token language modelling on the AG News texts (the domain setting)
    self.lm = d.get("task", "classification") == "lm"
    if d.dataset not in DATASETS:
      raise ValueError(
          f"config.data.dataset={d.dataset!r} is invalid: expected one of {tuple(DATASETS)}."
      )
    train, test = DATASETS[d.dataset](config, workdir)
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
    if config.train.batch_size > self.client_sizes.max():
      logging.getLogger(__name__).warning(
          "config.train.batch_size=%d exceeds the largest client's %d examples: every local "
          "batch is padded to %d rows (memory and compute grow with batch_size, the examples "
          "seen do not); a batch_size <= %d avoids the padding.",
          config.train.batch_size,
          self.client_sizes.max(),
          config.train.batch_size,
          self.client_sizes.max(),
      )
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
      if jax.process_count() > 1:  # process 0 trains and writes it, the others read the file
        from jax.experimental import multihost_utils

        if jax.process_index() == 0 and not tok_path.exists():
          client_text = [train.text[i] for c in self.clients for i in c]
          train_bpe(client_text, d.vocab_size, path=tok_path, added_tokens=label_words)
        multihost_utils.sync_global_devices("fedalign tokenizer")
        self.tokenizer = load_tokenizer(tok_path)
      elif tok_path.exists():
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
    with _seq_len_named(d.seq_len):  # formatting errors name max_len: say which field it is
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
        test_ex = fmt_lib.format_seq2seq_classification(
            test.text, test.label, self.tokenizer, **fmt
        )
        self.test = {k: test_ex[k] for k in ("tokens", "mask", "labels")}
        self.candidates = fmt_lib.seq2seq_label_candidates(self.tokenizer, label_words)
      elif self.lm:  # next-token LM on the texts; the topics only partition and break down
        self.batch_keys = ("tokens", "mask", "target_mask")
        fmt = dict(num_labels=self.num_classes, max_len=d.seq_len)
        ex = fmt_lib.format_lm(train.text, train.label, self.tokenizer, **fmt)
        self.train = {k: ex[k] for k in self.batch_keys}
        test_ex = fmt_lib.format_lm(test.text, test.label, self.tokenizer, **fmt)
        self.test = {k: test_ex[k] for k in self.batch_keys + ("labels",)}
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
              k: self.choices[k]
              for k in ("tokens", "mask", "target_mask", "option_chars", "labels")
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

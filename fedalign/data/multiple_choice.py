"""Federated multiple-choice tasks (MMLU, HellaSwag): fixed splits, topic groups, token arrays.

What :class:`~fedalign.data.federated.FederatedData` uses for ``config.data.dataset`` in
:data:`MC_DATASETS`. The raw files are read with :mod:`fedalign.data.sources` from a manual
directory (``config.data.data_dir``, e.g. ``../shared/data/mmlu`` or
``../shared/data/hellaswag``); nothing is downloaded.

**Splits.** Only these splits exist offline: MMLU ``test`` (14,042 rows, 57 subjects) and
``dev`` (285 rows, 5 per subject); HellaSwag ``validation`` (10,042 rows, 192 activity labels).
They are cut into a federated training pool and a held-out test part by a fixed rule that
depends on no seed (the same for every seed, method and ``alpha``):

* rows are grouped by their topic group (below), in file order;
* the **last** ``n // 5`` rows of each group (``n`` = the group's rows; :data:`TEST_EVERY`)
  form the held-out test part, the others the training pool: a 20% test part stratified by
  group (a group with fewer than 5 rows is training-only);
* MMLU's ``dev`` rows all join the training pool.

MMLU: 11,250 + 285 = 11,535 training rows, 2,792 test rows; HellaSwag: 8,111 training rows,
1,931 test rows. A contiguous block per group rather than every 5th row because HellaSwag
draws several examples from the same video or article next to each other in the file (one
example's gold ending can be the next one's context): a block keeps such neighbours on the same
side of the split except at one boundary per group.

**Groups (the partition's "label").** The answer letter carries no topic, so the non-IID
partition is over a per-example topic group: the MMLU ``subject`` (57 groups) and the HellaSwag
``activity_label`` (192 groups). The Dirichlet partition
(:func:`fedalign.data.partition.dirichlet_partition`, ``config.data.alpha``) draws, for each
group, the clients' shares of that group's rows, so a small ``alpha`` gives each client a few
subjects / activities. ``label`` of a :class:`MCSplit` is that group id;
``FederatedData.num_classes`` is the number of groups and ``label_counts`` is clients x groups,
so the per-client accuracy of the server (:func:`fedalign.metrics.evaluation.client_accuracy`)
is the per-group test accuracy weighted by each client's training group distribution.

**Formats** (zero-shot, the standard prompts of :mod:`fedalign.data.formatting`):

* MMLU: header ``"The following are multiple choice questions (with answers) about
  {subject}.\\n\\n"`` + question + ``"A. .."`` to ``"D. .."`` + ``"\\nAnswer:"``; options
  ``" A"`` .. ``" D"``.
* HellaSwag: ``"{activity_label}: {ctx}"``; options ``" " + ending``.

Training rows (:func:`format_train`, (N, T)): BOS + prompt + the gold option, ``target_mask``
exactly on the gold option's tokens (MMLU: the answer letter; HellaSwag: the correct ending),
i.e. the causal LM loss on the answer only. Test rows (:func:`format_test`, (N, 4, T)): every
option after the same prompt, scored by summed log-probability
(:func:`fedalign.metrics.evaluation.multiple_choice_eval`: ``acc``, and ``acc_norm`` per
character, the usual HellaSwag metric). A training row equals the test row of its gold option.

Example:
    >>> import numpy as np
    >>> from fedalign.data.tokenize import ByteTokenizer
    >>> train_idx, test_idx = split_by_group(["a"] * 5 + ["b"] * 3)
    >>> train_idx.tolist(), test_idx.tolist()
    ([0, 1, 2, 3, 5, 6, 7], [4])
    >>> rec = {"subject": "math", "question": "2+2?", "choices": ["1", "4", "3", "5"],
    ...        "answer": 1}
    >>> split = MCSplit([rec], ["x"], np.zeros(1, np.int32), ("math",))
    >>> ex = format_train("mmlu", split, ByteTokenizer(), max_len=128)
    >>> ByteTokenizer().decode(ex["tokens"][0][ex["target_mask"][0]])
    ' B'
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple, Sequence

import numpy as np

from fedalign.data import sources
from fedalign.data.formatting import (
    MMLU_OPTIONS,
    format_multiple_choice,
    hellaswag_context,
    mmlu_prompt,
    mmlu_question,
)
from fedalign.data.tokenize import Tokenizer

#: ``config.data.dataset`` values handled here.
MC_DATASETS: tuple[str, ...] = ("mmlu", "hellaswag")
#: Options per question (both datasets).
NUM_OPTIONS = 4
#: The last ``n // TEST_EVERY`` rows of each group (file order) are the held-out test part.
TEST_EVERY = 5
#: The record field that is the topic group of each dataset.
GROUP_FIELD: dict[str, str] = {"mmlu": "subject", "hellaswag": "activity_label"}
#: Strings a BPE trained on client text should keep as single tokens (the MMLU answer letters).
ADDED_TOKENS: dict[str, tuple[str, ...]] = {"mmlu": MMLU_OPTIONS, "hellaswag": ()}

Examples = dict[str, np.ndarray]


class MCSplit(NamedTuple):
  """Multiple-choice rows: ``records`` (source dicts), ``text`` (prompt and options: what a
  BPE tokenizer is trained on), ``label`` (int32 group id of each row: the partition's class)
  and ``groups`` (group names, index = group id, the same for train and test)."""

  records: list[dict]
  text: list[str]
  label: np.ndarray
  groups: tuple[str, ...]

  def __len__(self) -> int:  # type: ignore[override]
    return len(self.records)

  def subset(self, idx: np.ndarray) -> "MCSplit":
    """The rows ``idx`` (e.g. one client's indices from a partitioner)."""
    idx = np.asarray(idx, dtype=np.int64)
    return MCSplit(
        [self.records[i] for i in idx], [self.text[i] for i in idx], self.label[idx], self.groups
    )


def _check_dataset(dataset: str) -> None:
  if dataset not in MC_DATASETS:
    raise ValueError(
        f"dataset={dataset!r} is not a multiple-choice dataset: expected one " f"of {MC_DATASETS}."
    )


def split_by_group(
    groups: Sequence[str], test_every: int = TEST_EVERY
) -> tuple[np.ndarray, np.ndarray]:
  """``(train_idx, test_idx)``: the last ``n // test_every`` rows of each group are test.

  Rows keep their order; no randomness, so the split is the same for every seed.

  >>> [a.tolist() for a in split_by_group(["x", "y", "x", "x", "y"], test_every=2)]
  [[0, 1, 2], [3, 4]]
  """
  keys = np.asarray(groups)
  is_test = np.zeros(len(keys), dtype=bool)
  for g in np.unique(keys):
    rows = np.flatnonzero(keys == g)
    k = len(rows) // test_every
    if k:
      is_test[rows[len(rows) - k :]] = True
  return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def record_text(dataset: str, record: dict) -> str:
  """The text of one row that a tokenizer is trained on: the prompt and every option.

  >>> record_text("hellaswag", {"activity_label": "Roofing", "ctx": "A man is on a roof.",
  ...                           "endings": ["a", "b", "c", "d"], "label": 0})
  'Roofing: A man is on a roof. a b c d'
  """
  if dataset == "mmlu":
    return mmlu_prompt(record)[0] + mmlu_question(record, with_answer=True)
  return hellaswag_context(record) + "".join(" " + e for e in record["endings"])


def read_pools(dataset: str, data_dir: str | pathlib.Path) -> tuple[list[dict], list[dict]]:
  """``(train_records, test_records)`` of ``dataset`` under the fixed split rule above.

  Records are the readers' dicts plus ``uid``, unique over both pools (MMLU:
  ``"test/<subject>:<row>"`` or ``"dev/<subject>:<row>"``; HellaSwag: the reader's ``id``).

  Raises:
    ValueError: ``data_dir`` is empty or not a directory (the message names
      ``config.data.data_dir``).
  """
  _check_dataset(dataset)
  if not data_dir or not pathlib.Path(data_dir).is_dir():
    raise ValueError(
        f"config.data.data_dir={str(data_dir)!r} is not a directory: dataset={dataset!r} "
        f"reads its files from a local directory. {sources.DOWNLOAD_INSTRUCTIONS[dataset]}"
    )
  if dataset == "mmlu":
    rows = sources.read_mmlu(data_dir, "test").records
    extra = (
        sources.read_mmlu(data_dir, "dev").records if "dev" in sources.mmlu_splits(data_dir) else []
    )
    for split, recs in (("test", rows), ("dev", extra)):
      for r in recs:
        r["uid"] = f"{split}/{r['id']}"
  else:
    rows = sources.read_hellaswag(data_dir, "validation").records
    extra = []
    for r in rows:
      r["uid"] = r["id"]
  train_idx, test_idx = split_by_group([r[GROUP_FIELD[dataset]] for r in rows])
  return extra + [rows[i] for i in train_idx], [rows[i] for i in test_idx]


def load_splits(dataset: str, data_dir: str | pathlib.Path) -> tuple[MCSplit, MCSplit]:
  """``(train, test)`` :class:`MCSplit` of ``dataset`` (see the module docstring).

  Example:
    >>> train, test = load_splits("mmlu", "../shared/data/mmlu")  # doctest: +SKIP
    >>> len(train), len(test), len(train.groups)  # doctest: +SKIP
    (11535, 2792, 57)
  """
  train_rec, test_rec = read_pools(dataset, data_dir)
  field = GROUP_FIELD[dataset]
  groups = tuple(sorted({r[field] for r in train_rec + test_rec}))
  gid = {g: i for i, g in enumerate(groups)}

  def make(recs: list[dict]) -> MCSplit:
    return MCSplit(
        recs,
        [record_text(dataset, r) for r in recs],
        np.array([gid[r[field]] for r in recs], dtype=np.int32),
        groups,
    )

  return make(train_rec), make(test_rec)


def _parts(
    dataset: str, records: Sequence[dict]
) -> tuple[list[str] | None, list[str], list[list[str]], list[int]]:
  """``(prefixes, contexts, options, answers)`` for :func:`format_multiple_choice`."""
  _check_dataset(dataset)
  if dataset == "mmlu":
    prompts = [mmlu_prompt(r) for r in records]
    return (
        [h for h, _ in prompts],
        [b for _, b in prompts],
        [list(MMLU_OPTIONS)] * len(records),
        [int(r["answer"]) for r in records],
    )
  return (
      None,
      [hellaswag_context(r) for r in records],
      [[" " + e for e in r["endings"]] for r in records],
      [int(r["label"]) for r in records],
  )


def format_train(dataset: str, split: MCSplit, tokenizer: Tokenizer, max_len: int) -> Examples:
  """Training rows: prompt + gold option, loss on the gold option only.

  Returns:
    ``tokens`` (N, T) int32, ``mask``, ``target_mask`` (N, T) bool (``target_mask`` marks
    exactly the gold option's tokens), ``answers`` (N,) int32 (gold option index).
  """
  prefixes, contexts, options, answers = _parts(dataset, split.records)
  gold = [[opts[a]] for opts, a in zip(options, answers)]
  ex = format_multiple_choice(
      contexts, gold, [0] * len(gold), tokenizer, max_len=max_len, prefixes=prefixes
  )
  return {
      "tokens": ex["tokens"][:, 0],
      "mask": ex["mask"][:, 0],
      "target_mask": ex["target_mask"][:, 0],
      "answers": np.asarray(answers, dtype=np.int32),
  }


def format_test(dataset: str, split: MCSplit, tokenizer: Tokenizer, max_len: int) -> Examples:
  """Test rows: every option after the prompt, for the multiple-choice evaluator.

  Returns:
    ``tokens``, ``mask``, ``target_mask`` (N, 4, T); ``option_chars`` (N, 4) float32;
    ``answers`` (N,) int32 (gold option index, what the evaluator scores against) and
    ``labels`` (N,) int32 (group id: what per-client accuracy reweights by).
  """
  prefixes, contexts, options, answers = _parts(dataset, split.records)
  ex = format_multiple_choice(
      contexts, options, answers, tokenizer, max_len=max_len, prefixes=prefixes
  )
  return {
      "tokens": ex["tokens"],
      "mask": ex["mask"],
      "target_mask": ex["target_mask"],
      "option_chars": ex["option_chars"],
      "answers": ex["labels"],
      "labels": np.asarray(split.label, dtype=np.int32),
  }

"""AG News: class names, the label-word prompt format, and the embedded default dataset.

The embedded subset (``fedalign/data/embedded/``, built by :mod:`fedalign.data.make_embedded`)
ships inside the package, so the default configuration and CI run with no data directory.

Example:
    >>> train, test = load_embedded_agnews()
    >>> len(train.text), len(test.text), int(test.label.sum())
    (9776, 2000, 3000)
"""

from __future__ import annotations

import gzip
import json
import pathlib
from typing import NamedTuple

import numpy as np

from fedalign.data.sources import AG_NEWS_CLASSES

EMBEDDED_DIR = pathlib.Path(__file__).resolve().parent / "embedded"

#: Class names in label order (0 = World, 1 = Sports, 2 = Business, 3 = Sci/Tech).
AGNEWS_CLASSES: tuple[str, ...] = AG_NEWS_CLASSES
#: Label words scored after the prompt (leading space: they follow "Topic:").
AGNEWS_LABEL_WORDS: tuple[str, ...] = (" World", " Sports", " Business", " Tech")
#: Prompt template; ``{text}`` is the article (truncated from the left when too long).
AGNEWS_TEMPLATE: str = "{text}\nTopic:"


class TextSplit(NamedTuple):
  """A text-classification split: ``text`` (list of str) and ``label`` (int32 array)."""

  text: list[str]
  label: np.ndarray

  def __len__(self) -> int:  # type: ignore[override]
    return len(self.text)

  def subset(self, idx: np.ndarray) -> "TextSplit":
    """The rows ``idx`` (e.g. one client's indices from a partitioner)."""
    idx = np.asarray(idx, dtype=np.int64)
    return TextSplit([self.text[i] for i in idx], self.label[idx])


def _read(path: pathlib.Path) -> TextSplit:
  if not path.is_file():
    raise FileNotFoundError(
        f"embedded dataset file {path} is missing; rebuild it with "
        "`python -m fedalign.data.make_embedded --source ../shared/data/ag_news`."
    )
  text, label = [], []
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for line in f:
      obj = json.loads(line)
      text.append(obj["text"])
      label.append(obj["label"])
  return TextSplit(text, np.asarray(label, dtype=np.int32))


def load_embedded_agnews() -> tuple[TextSplit, TextSplit]:
  """Loads the embedded AG News subset: 9,776 train rows, 2,000 balanced test rows.

  Returns:
    ``(train, test)``, each a :class:`TextSplit` ``(text: list[str], label: int32 array)``
    with labels 0-3 in :data:`AGNEWS_CLASSES` order. Train and test share no text.

  Example:
    >>> train, test = load_embedded_agnews()
    >>> np.bincount(test.label).tolist()
    [500, 500, 500, 500]
  """
  return _read(EMBEDDED_DIR / "agnews_train.jsonl.gz"), _read(EMBEDDED_DIR / "agnews_test.jsonl.gz")

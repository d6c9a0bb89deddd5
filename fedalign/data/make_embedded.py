"""Builds the embedded AG News subset shipped in ``fedalign/data/embedded/``.

Train: the two 5,000-row train subsets of shared/data/ag_news, deduplicated on
whitespace-normalised text (9,777 rows), minus any row whose text also occurs in the full
official test split (1 row) -> 9,776 rows. Test: a class-balanced sample of ``test.csv``
(``--test-per-class`` rows per class, 500 by default = 2,000 rows) drawn with a fixed seed,
kept in file order. Written as gzip'd JSON Lines ``{"text", "label", "id"}`` with a fixed gzip
mtime, so the output is byte-for-byte reproducible.

Run (from the repository root):
    python -m fedalign.data.make_embedded --source ../shared/data/ag_news

Example:
    >>> train, test = build_embedded("../shared/data/ag_news")  # doctest: +SKIP
    >>> len(train), len(test)  # doctest: +SKIP
    (9776, 2000)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import pathlib

import numpy as np

from fedalign.data import sources

EMBEDDED_DIR = pathlib.Path(__file__).resolve().parent / "embedded"
TRAIN_FILE = "agnews_train.jsonl.gz"
TEST_FILE = "agnews_test.jsonl.gz"


def build_embedded(
    source_dir: str | pathlib.Path, test_per_class: int = 500, seed: int = 0
) -> tuple[list[dict], list[dict]]:
  """Returns (train, test) record lists for the embedded subset (see module docstring)."""
  train = sources.read_ag_news(source_dir, "train").records
  test_all = sources.read_ag_news(source_dir, "test").records
  test_texts = {r["text"] for r in test_all}
  train = [r for r in train if r["text"] not in test_texts]
  labels = np.array([r["label"] for r in test_all])
  rng = np.random.default_rng(seed)
  keep = []
  for c in range(len(sources.AG_NEWS_CLASSES)):
    idx = np.flatnonzero(labels == c)
    if len(idx) < test_per_class:
      raise ValueError(
          f"test.csv has {len(idx)} rows of class {c}; test_per_class={test_per_class} "
          "is too large."
      )
    keep.append(rng.choice(idx, size=test_per_class, replace=False))
  test = [test_all[i] for i in np.sort(np.concatenate(keep))]
  return train, test


def write_jsonl_gz(records: list[dict], path: pathlib.Path) -> None:
  """Writes ``{"text", "label", "id"}`` records as reproducible gzip'd JSON Lines."""
  payload = "".join(
      json.dumps({"text": r["text"], "label": r["label"], "id": r["id"]}, ensure_ascii=False) + "\n"
      for r in records
  ).encode("utf-8")
  with open(path, "wb") as raw:
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
      f.write(payload)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--source", default="../shared/data/ag_news", help="AG News manual dir")
  parser.add_argument("--out", default=str(EMBEDDED_DIR))
  parser.add_argument("--test-per-class", type=int, default=500)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  train, test = build_embedded(args.source, args.test_per_class, args.seed)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for name, recs in ((TRAIN_FILE, train), (TEST_FILE, test)):
    write_jsonl_gz(recs, out / name)
    digest = hashlib.sha256((out / name).read_bytes()).hexdigest()
    counts = sources.count_by(recs, "label")
    print(f"{out / name}: {len(recs)} rows, per class {counts}, sha256 {digest}")


if __name__ == "__main__":
  main()

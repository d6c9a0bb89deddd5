"""The embedded AG News subset: loader, counts, disjointness, reproducible build."""

import hashlib

import numpy as np

from fedalign.data import agnews, make_embedded, sources


def test_load_embedded_agnews():
  train, test = agnews.load_embedded_agnews()
  assert len(train) == 9776 and len(test) == 2000
  assert np.bincount(test.label).tolist() == [500] * 4
  assert train.label.dtype == np.int32 and set(np.unique(train.label)) == {0, 1, 2, 3}
  assert not set(train.text) & set(test.text)  # no verbatim test row in train
  assert len(set(train.text)) == len(train.text)
  sub = train.subset(np.array([2, 0]))
  assert sub.text == [train.text[2], train.text[0]] and sub.label.tolist() == [
      train.label[2],
      train.label[0],
  ]
  size = sum(p.stat().st_size for p in agnews.EMBEDDED_DIR.glob("*.gz"))
  assert size < 3_000_000
  assert (agnews.EMBEDDED_DIR / "SOURCE.md").is_file()


def test_make_embedded_reproduces_shipped_files(shared_data, tmp_path):
  make_embedded.main(["--source", str(shared_data / "ag_news"), "--out", str(tmp_path)])
  for name in (make_embedded.TRAIN_FILE, make_embedded.TEST_FILE):
    got = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    want = hashlib.sha256((agnews.EMBEDDED_DIR / name).read_bytes()).hexdigest()
    assert got == want, name
  # the embedded test rows are real rows of the official test split
  test_all = {r["text"] for r in sources.read_ag_news(shared_data / "ag_news", "test").records}
  _, test = agnews.load_embedded_agnews()
  assert set(test.text) <= test_all

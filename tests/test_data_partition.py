"""Partitioners: coverage, determinism, skew vs alpha, natural groups, errors, plot."""

import numpy as np
import pytest

from fedalign.data import partition as P


@pytest.fixture(scope="module")
def labels():
  return np.random.default_rng(0).integers(0, 4, size=2000)


def _assert_exact_cover(parts, n):
  allidx = np.concatenate(parts)
  assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))


def test_iid(labels):
  parts = P.iid_partition(len(labels), 7, seed=3)
  _assert_exact_cover(parts, len(labels))
  assert max(map(len, parts)) - min(map(len, parts)) <= 1
  assert all(np.array_equal(a, b) for a, b in zip(parts, P.iid_partition(len(labels), 7, 3)))


def test_dirichlet_cover_determinism_and_skew(labels):
  skews = []
  for alpha in (100.0, 1.0, 0.1):
    parts = P.dirichlet_partition(labels, 10, alpha, seed=1, min_size=10)
    _assert_exact_cover(parts, len(labels))
    assert min(map(len, parts)) >= 10
    again = P.dirichlet_partition(labels, 10, alpha, seed=1, min_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    counts = P.label_counts(labels, parts, 4)
    assert counts.sum() == len(labels)
    skews.append(P.label_skew(counts))
  assert skews[0] < 0.1 < skews[1] < skews[2]
  other = P.dirichlet_partition(labels, 10, 0.1, seed=2, min_size=10)
  assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_errors(labels):
  with pytest.raises(ValueError, match="num_clients=100.*min_size=50.*lower min_size"):
    P.dirichlet_partition(labels, 100, 0.5, seed=0, min_size=50)
  with pytest.raises(ValueError, match="alpha=0.001.*max_retries=3.*Raise alpha"):
    P.dirichlet_partition(labels, 50, 0.001, seed=0, min_size=30, max_retries=3)
  with pytest.raises(ValueError, match="alpha must be > 0"):
    P.dirichlet_partition(labels, 5, 0.0, seed=0)


def test_pathological(labels):
  parts = P.pathological_partition(labels, 6, 2, seed=0)
  _assert_exact_cover(parts, len(labels))
  assert [len(np.unique(labels[p])) for p in parts] == [2] * 6
  with pytest.raises(ValueError, match="classes_per_client=5"):
    P.pathological_partition(labels, 6, 5, seed=0)


def test_group_partition():
  groups = np.array(["law"] * 5 + ["math"] * 3 + ["bio"] * 2 + ["art"])
  parts, names = P.group_partition(groups)
  assert names == [["art"], ["bio"], ["law"], ["math"]]
  assert [len(p) for p in parts] == [1, 2, 5, 3]
  parts2, names2 = P.group_partition(groups, num_clients=2, seed=0)
  _assert_exact_cover(parts2, len(groups))
  assert sorted(sum(names2, [])) == ["art", "bio", "law", "math"]
  assert sorted(map(len, parts2)) == [5, 6]
  with pytest.raises(ValueError, match="num_clients=5 > number of groups"):
    P.group_partition(groups, num_clients=5)


def test_label_counts_and_plot(labels, tmp_path):
  parts = P.dirichlet_partition(labels, 5, 0.3, seed=0)
  counts = P.label_counts(labels, parts, 4)
  assert counts.shape == (5, 4)
  out = P.plot_label_counts(counts, tmp_path / "plots" / "counts.png", ["W", "S", "B", "T"])
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="num_classes=3"):
    P.label_counts(labels, parts, 3)

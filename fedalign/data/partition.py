"""Client partitioners: IID, Dirichlet label skew, pathological k-class, natural (group key).

Every partitioner returns ``list[np.ndarray]``: one sorted int64 index array per client, into
the dataset's rows. Each is deterministic given ``seed`` (a ``numpy.random.Generator`` is made
from it). :func:`label_counts` gives the clients x classes count matrix, :func:`label_skew` the
mean total-variation distance of client label distributions from the global one, and
:func:`plot_label_counts` draws the matrix to a PNG (matplotlib, Agg backend).

Example:
    >>> labels = np.repeat(np.arange(4), 50)
    >>> parts = dirichlet_partition(labels, num_clients=4, alpha=0.5, seed=0, min_size=5)
    >>> sum(len(p) for p in parts)
    200
    >>> int(label_counts(labels, parts, 4).sum())
    200
"""

from __future__ import annotations

import logging
import pathlib
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

Partition = list[np.ndarray]


def _check_labels(labels: np.ndarray | Sequence[int], name: str = "labels") -> np.ndarray:
  y = np.asarray(labels)
  if y.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
  if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0):
    raise ValueError(f"{name} must be non-negative integers (class ids), got dtype {y.dtype}")
  return y.astype(np.int64)


def _check_clients(num_clients: int) -> None:
  if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")


def iid_partition(num_examples: int, num_clients: int, seed: int) -> Partition:
  """Shuffles ``range(num_examples)`` and splits it into ``num_clients`` near-equal parts.

  >>> [len(p) for p in iid_partition(10, 3, seed=0)]
  [4, 3, 3]
  """
  _check_clients(num_clients)
  if num_examples < num_clients:
    raise ValueError(
        f"num_examples={num_examples} < num_clients={num_clients}: some client would get no "
        "data. Use fewer clients."
    )
  perm = np.random.default_rng(seed).permutation(num_examples)
  return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]


def dirichlet_partition(
    labels: np.ndarray | Sequence[int],
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_retries: int = 100,
    balance: bool = True,
) -> Partition:
  """Label-skewed partition: for each class, client shares ~ Dirichlet(alpha * 1).

  The scheme of Yurochkin et al. 2019 / Hsu et al. 2019 as implemented in NIID-Bench
  (Li et al. 2022): each class's shuffled examples are cut by the sampled proportions; with
  ``balance`` a client already holding >= N / num_clients examples gets no more. The whole
  draw is repeated until every client has at least ``min_size`` examples, at most
  ``max_retries`` times. Smaller ``alpha`` = more skew.

  Raises:
    ValueError: ``num_clients * min_size > N`` (infeasible), ``alpha <= 0``, or no draw met
      ``min_size`` within ``max_retries`` (message suggests what to change).

  >>> y = np.repeat(np.arange(2), 20)
  >>> parts = dirichlet_partition(y, 2, alpha=100.0, seed=1, min_size=5)
  >>> sorted(np.concatenate(parts).tolist()) == list(range(40))
  True
  """
  y = _check_labels(labels)
  _check_clients(num_clients)
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got {alpha!r}")
  n = len(y)
  if num_clients * min_size > n:
    raise ValueError(
        f"cannot give each of num_clients={num_clients} clients min_size={min_size} "
        f"examples out of {n}: lower min_size or num_clients."
    )
  rng = np.random.default_rng(seed)
  classes = np.unique(y)
  sizes_seen = []
  for attempt in range(max_retries):
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    counts = np.zeros(num_clients, dtype=np.int64)
    for k in classes:
      idx_k = np.flatnonzero(y == k)
      rng.shuffle(idx_k)
      p = rng.dirichlet(np.full(num_clients, float(alpha)))
      if balance:
        p = p * (counts < n / num_clients)
        if p.sum() <= 0:  # every client full: fall back to the raw draw
          p = rng.dirichlet(np.full(num_clients, float(alpha)))
      p = p / p.sum()
      cuts = (np.cumsum(p) * len(idx_k)).astype(np.int64)[:-1]
      for j, part in enumerate(np.split(idx_k, cuts)):
        buckets[j].append(part)
        counts[j] += len(part)
    sizes_seen.append(int(counts.min()))
    if counts.min() >= min_size:
      if attempt:
        log.info("dirichlet_partition: min_size met after %d redraws", attempt)
      return [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
  raise ValueError(
      f"dirichlet_partition: no draw with alpha={alpha} gave every one of {num_clients} "
      f"clients min_size={min_size} examples in max_retries={max_retries} tries (largest "
      f"minimum seen: {max(sizes_seen)}). Raise alpha or max_retries, or lower min_size (in a run's "
      "config: raise data.alpha, or lower data.min_client_size or data.num_clients)."
  )


def pathological_partition(
    labels: np.ndarray | Sequence[int], num_clients: int, classes_per_client: int, seed: int
) -> Partition:
  """Each client holds exactly ``classes_per_client`` classes (McMahan et al. 2017 style).

  Classes are shuffled and dealt round-robin (client i gets classes ``perm[(i*k + j) % C]``),
  then each class's shuffled examples are split evenly among the clients holding it. If
  ``num_clients * classes_per_client < C`` some classes are held by nobody; their examples
  are left out and a warning gives the count.

  >>> y = np.repeat(np.arange(4), 10)
  >>> parts = pathological_partition(y, 4, 2, seed=0)
  >>> [len(np.unique(y[p])) for p in parts]
  [2, 2, 2, 2]
  """
  y = _check_labels(labels)
  _check_clients(num_clients)
  classes = np.unique(y)
  c = len(classes)
  if not 1 <= classes_per_client <= c:
    raise ValueError(
        f"classes_per_client={classes_per_client} must be between 1 and the number of "
        f"classes present ({c})."
    )
  rng = np.random.default_rng(seed)
  perm = classes[rng.permutation(c)]
  holders: dict[int, list[int]] = {int(k): [] for k in classes}
  for i in range(num_clients):
    for j in range(classes_per_client):
      holders[int(perm[(i * classes_per_client + j) % c])].append(i)
  buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
  left_out = 0
  for k in classes:
    idx_k = np.flatnonzero(y == k)
    rng.shuffle(idx_k)
    hs = holders[int(k)]
    if not hs:
      left_out += len(idx_k)
      continue
    if len(idx_k) < len(hs):
      raise ValueError(
          f"class {k} has {len(idx_k)} examples but {len(hs)} clients hold it: lower "
          "num_clients or classes_per_client."
      )
    for i, part in zip(hs, np.array_split(idx_k, len(hs))):
      buckets[i].append(part)
  if left_out:
    log.warning(
        "pathological_partition: %d examples of classes held by no client are left out "
        "(num_clients * classes_per_client < number of classes)",
        left_out,
    )
  return [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]


def group_partition(
    groups: Sequence, num_clients: int | None = None, seed: int = 0
) -> tuple[Partition, list[list]]:
  """Natural partition by a per-example group key (Dolly category, MMLU subject, ...).

  With ``num_clients=None`` every distinct group is one client (groups in sorted order).
  Otherwise groups are shuffled (``seed``) and assigned greedily, largest first, to the
  currently smallest client, so each group lives on exactly one client.

  Returns:
    ``(partition, client_groups)``: index arrays and the list of group keys of each client.

  >>> parts, names = group_partition(["b", "a", "b", "c"])
  >>> [p.tolist() for p in parts], names
  ([[1], [0, 2], [3]], [['a'], ['b'], ['c']])
  """
  keys = np.asarray(groups)
  if keys.ndim != 1:
    raise ValueError(f"groups must be a 1-D sequence of keys, got shape {keys.shape}")
  uniq, inv = np.unique(keys, return_inverse=True)
  members = [np.flatnonzero(inv == g) for g in range(len(uniq))]
  if num_clients is None:
    return [m.astype(np.int64) for m in members], [[u.item()] for u in uniq]
  _check_clients(num_clients)
  if num_clients > len(uniq):
    raise ValueError(
        f"num_clients={num_clients} > number of groups ({len(uniq)}): a group is never "
        "split, so some client would be empty. Use num_clients <= groups or None."
    )
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(uniq))
  order = order[np.argsort([-len(members[g]) for g in order], kind="stable")]
  sizes = np.zeros(num_clients, dtype=np.int64)
  assigned: list[list[int]] = [[] for _ in range(num_clients)]
  for g in order:
    j = int(np.argmin(sizes))
    assigned[j].append(int(g))
    sizes[j] += len(members[g])
  parts = [np.sort(np.concatenate([members[g] for g in a])).astype(np.int64) for a in assigned]
  names = [[uniq[g].item() for g in sorted(a)] for a in assigned]
  return parts, names


def label_counts(
    labels: np.ndarray | Sequence[int], partition: Partition, num_classes: int
) -> np.ndarray:
  """The (clients, classes) matrix of example counts.

  >>> label_counts([0, 1, 1], [np.array([0, 1]), np.array([2])], 2).tolist()
  [[1, 1], [0, 1]]
  """
  y = _check_labels(labels)
  if y.size and y.max() >= num_classes:
    raise ValueError(f"labels contain class {y.max()} >= num_classes={num_classes}")
  return np.stack([np.bincount(y[p], minlength=num_classes) for p in partition]).astype(np.int64)


def label_skew(counts: np.ndarray) -> float:
  """Mean total-variation distance between client label distributions and the global one.

  0 for identical distributions, up to 1 - max_k p_k for one-class clients. Empty clients
  are ignored.

  >>> label_skew(np.array([[5, 5], [5, 5]]))
  0.0
  >>> label_skew(np.array([[10, 0], [0, 10]]))
  0.5
  """
  counts = np.asarray(counts, dtype=np.float64)
  glob = counts.sum(0) / counts.sum()
  n = counts.sum(1)
  keep = n > 0
  p = counts[keep] / n[keep, None]
  return float(np.mean(0.5 * np.abs(p - glob).sum(1)))


def plot_label_counts(
    counts: np.ndarray,
    path: str | pathlib.Path,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> pathlib.Path:
  """Draws the (clients, classes) count matrix as stacked bars per client to a PNG.

  >>> import tempfile
  >>> p = plot_label_counts(np.array([[3, 1], [0, 4]]), tempfile.mkdtemp() + "/c.png")
  >>> p.suffix
  '.png'
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  counts = np.asarray(counts)
  c, k = counts.shape
  names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
  fig, ax = plt.subplots(figsize=(max(4.0, 0.4 * c + 2), 3.5))
  bottom = np.zeros(c)
  cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
  for j in range(k):
    ax.bar(np.arange(c), counts[:, j], bottom=bottom, label=names[j], color=cmap(j % cmap.N))
    bottom += counts[:, j]
  ax.set_xlabel("client")
  ax.set_ylabel("examples")
  ax.set_xticks(np.arange(c))
  ax.set_title(title or f"label counts per client (skew {label_skew(counts):.2f})")
  if k <= 20:
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path

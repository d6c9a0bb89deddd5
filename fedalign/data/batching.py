"""Fixed-shape client batches: every client's data as (steps, batch, ...) arrays plus masks,
so clients with different data sizes stack into (clients, steps, batch, ...) for ``vmap``.

Input: ``examples``, a dict of numpy arrays with a leading example axis (e.g. the output of
:func:`fedalign.data.formatting.format_classification`: ``tokens`` (N, T), ``mask``,
``target_mask``, ``labels`` (N,), ...), and ``clients``: one index array per client (a
partitioner's output). Output: every field as (C, S, B, ...) plus

* ``step_mask`` (C, S) bool - the step is real (padded steps must leave client state unchanged);
* ``example_mask`` (C, S, B) bool - the slot holds a real example (a partial last batch of an
  epoch has padded slots, whose ``mask``/``target_mask`` are all False);
* ``example_index`` (C, S, B) int32 - row of ``examples`` in the slot, -1 for padding.

Two conventions:

* ``num_steps=S``: every client takes S full batches per round (the LLM-FL frameworks'
  ``max_steps``), cycling through fresh permutations of its data; no padding at all.
* ``epochs=E``: each client does E passes over its data in ``ceil(n_i / B)`` batches per pass,
  padded to the largest client of the group. :func:`group_clients_by_size` groups clients of
  similar size so that little is padded; :func:`padding_fraction` reports the waste.

Shuffling derives from ``(seed, round, client_id)`` through ``numpy.random.SeedSequence``, so a
client's batches do not depend on which other clients are batched with it.

Example:
    >>> ex = {"x": np.arange(10)}
    >>> b = make_client_batches(ex, [np.arange(7), np.arange(7, 10)], 2, seed=0, round=0,
    ...                         epochs=1)
    >>> b["x"].shape, b["step_mask"].tolist()
    ((2, 4, 2), [[True, True, True, True], [True, True, False, False]])
    >>> [sorted(c["x"].tolist()) for c in unpad_client_batches(b)]
    [[0, 1, 2, 3, 4, 5, 6], [7, 8, 9]]
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Batches = dict[str, np.ndarray]

RESERVED = ("step_mask", "example_mask", "example_index")


def client_rng(seed: int, round: int, client: int) -> np.random.Generator:
  """The numpy Generator for one client in one round: ``SeedSequence([seed, round, client])``.

  >>> int(client_rng(0, 1, 2).integers(100)) == int(client_rng(0, 1, 2).integers(100))
  True
  """
  return np.random.default_rng(np.random.SeedSequence([int(seed), int(round), int(client)]))


def steps_per_client(sizes: Sequence[int], batch_size: int, epochs: int) -> np.ndarray:
  """Real steps of each client for ``epochs`` passes: ``epochs * ceil(n_i / batch_size)``.

  >>> steps_per_client([7, 3, 0], 2, 1).tolist()
  [4, 2, 0]
  """
  return np.array([epochs * math.ceil(int(n) / batch_size) for n in sizes], dtype=np.int64)


def _client_slots(
    idx: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    num_steps: int | None,
    epochs: int | None,
) -> np.ndarray:
  """(steps_i, B) example rows of one client, -1 in padded slots."""
  n = len(idx)
  if num_steps is not None:
    if n == 0:
      return np.full((0, batch_size), -1, dtype=np.int64)
    need = num_steps * batch_size
    perms = [idx[rng.permutation(n)] for _ in range(math.ceil(need / n))]
    return np.concatenate(perms)[:need].reshape(num_steps, batch_size)
  rows = []
  per_epoch = math.ceil(n / batch_size)
  for _ in range(epochs):
    order = idx[rng.permutation(n)]
    padded = np.full(per_epoch * batch_size, -1, dtype=np.int64)
    padded[:n] = order
    rows.append(padded.reshape(per_epoch, batch_size))
  return np.concatenate(rows) if rows else np.full((0, batch_size), -1, dtype=np.int64)


def make_client_batches(
    examples: dict[str, np.ndarray],
    clients: Sequence[np.ndarray],
    batch_size: int,
    *,
    seed: int,
    round: int,
    num_steps: int | None = None,
    epochs: int | None = None,
    client_ids: Sequence[int] | None = None,
    num_padded_steps: int | None = None,
) -> Batches:
  """Stacks the clients' examples into fixed-shape (C, S, B, ...) arrays (module docstring).

  Args:
    examples: dict of arrays with a leading example axis N (all the same N).
    clients: one int index array into the N examples per client.
    batch_size: B.
    seed, round: shuffling seed and round number.
    num_steps: fixed number of local steps S (exclusive with ``epochs``).
    epochs: whole local epochs; S = the largest client's step count (or
      ``num_padded_steps`` if given, which must be >= it - e.g. to reuse one compiled shape).
    client_ids: global ids of these clients for the rng (default ``0..C-1``); pass them when
      batching a sampled subset or a size group of clients.

  Returns:
    dict with every field of ``examples`` as (C, S, B, ...) (padding slots zero) plus
    ``step_mask`` (C, S), ``example_mask`` (C, S, B), ``example_index`` (C, S, B) int32.
  """
  if (num_steps is None) == (epochs is None):
    raise ValueError("give exactly one of num_steps (fixed local steps) or epochs")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if num_steps is not None and num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if epochs is not None and epochs < 1:
    raise ValueError(f"epochs must be >= 1, got {epochs}")
  if not examples:
    raise ValueError("examples is empty")
  clash = [k for k in examples if k in RESERVED]
  if clash:
    raise ValueError(f"examples must not have the reserved fields {clash}")
  sizes = {k: v.shape[0] for k, v in examples.items()}
  n_total = next(iter(sizes.values()))
  if any(s != n_total for s in sizes.values()):
    raise ValueError(f"examples fields have different leading sizes: {sizes}")
  ids = list(range(len(clients))) if client_ids is None else [int(c) for c in client_ids]
  if len(ids) != len(clients):
    raise ValueError(f"{len(clients)} clients but {len(ids)} client_ids")
  slots = []
  for cid, idx in zip(ids, clients):
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n_total):
      raise ValueError(f"client {cid} has indices outside 0..{n_total - 1}")
    slots.append(_client_slots(idx, batch_size, client_rng(seed, round, cid), num_steps, epochs))
  s_max = num_steps if num_steps is not None else max((len(s) for s in slots), default=0)
  if num_padded_steps is not None:
    if num_padded_steps < s_max:
      raise ValueError(f"num_padded_steps={num_padded_steps} < {s_max} steps of the largest client")
    s_max = num_padded_steps
  s_max = max(s_max, 1)
  index = np.full((len(clients), s_max, batch_size), -1, dtype=np.int64)
  step_mask = np.zeros((len(clients), s_max), dtype=bool)
  for c, sl in enumerate(slots):
    index[c, : len(sl)] = sl
    step_mask[c, : len(sl)] = True
  valid = index >= 0
  safe = np.where(valid, index, 0)
  out: Batches = {}
  for k, v in examples.items():
    g = v[safe]
    vm = valid.reshape(valid.shape + (1,) * (v.ndim - 1))
    out[k] = np.where(vm, g, np.zeros((), dtype=v.dtype))
  out["step_mask"] = step_mask
  out["example_mask"] = valid
  out["example_index"] = index.astype(np.int32)
  return out


def unpad_client_batches(batches: Batches) -> list[dict[str, np.ndarray]]:
  """Inverse of :func:`make_client_batches`: each client's real examples in batch order.

  Returns one dict per client with every field as (n_i, ...) (``example_index`` included,
  ``step_mask``/``example_mask`` dropped). With ``epochs=E`` each example appears E times.
  """
  valid = batches["example_mask"]
  out = []
  for c in range(valid.shape[0]):
    m = valid[c]
    out.append({k: v[c][m] for k, v in batches.items() if k not in ("step_mask", "example_mask")})
  return out


def padding_fraction(batches: Batches) -> float:
  """Fraction of example slots that are padding (wasted compute) in a batch dict.

  >>> b = make_client_batches({"x": np.arange(3)}, [np.arange(2), np.arange(2, 3)], 1,
  ...                         seed=0, round=0, epochs=1)
  >>> padding_fraction(b)
  0.25
  """
  return float(1.0 - np.mean(batches["example_mask"]))


def group_clients_by_size(sizes: Sequence[int], group_size: int) -> list[np.ndarray]:
  """Sorts clients by data size (largest first) and cuts them into groups of ``group_size``
  (the last may be smaller), so clients batched together need similar step counts.

  >>> [g.tolist() for g in group_clients_by_size([5, 100, 7, 90], 2)]
  [[1, 3], [2, 0]]
  """
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}")
  order = np.argsort(-np.asarray(sizes), kind="stable")
  return [order[i : i + group_size] for i in range(0, len(order), group_size)]


def planned_padding_fraction(
    sizes: Sequence[int],
    batch_size: int,
    epochs: int,
    groups: Sequence[np.ndarray] | None = None,
) -> float:
  """Padding fraction of ``epochs`` whole epochs when each group (default: all clients
  together) is padded to its largest client - without building any batch.

  >>> round(planned_padding_fraction([100, 10], 10, 1), 6)
  0.45
  >>> planned_padding_fraction([100, 10], 10, 1, groups=[np.array([0]), np.array([1])])
  0.0
  """
  sizes = np.asarray(sizes, dtype=np.int64)
  groups = [np.arange(len(sizes))] if groups is None else groups
  real = slots = 0
  for g in groups:
    steps = steps_per_client(sizes[g], batch_size, epochs)
    real += int(sizes[g].sum()) * epochs
    slots += len(g) * int(steps.max(initial=0)) * batch_size
  return float(1.0 - real / slots) if slots else 0.0

"""The periodic actions of the server loop and the files they write.

The loop (:func:`fedalign.federated.server.run_experiment`) calls every action after every
round as ``action(round_num, state, out)`` (``round_num`` counts from 1, ``out`` holds the
round function's outputs plus ``client_ids``, ``train_loss``, ``excluded_clients`` and
``round_time_s``); an action may return a dict, merged into ``out`` for the actions after it
(e.g. :class:`Evaluate` returns the metrics record that :class:`ProgressBar` shows).

Actions: :class:`Evaluate` (test accuracy, diagnostics and one ``metrics.jsonl`` line),
:class:`RoutingDump` (``routing_distributions.npz``), :class:`Checkpoint`,
:class:`ProgressBar` and :func:`warn_excluded`; :func:`plot_run` draws ``plots/`` at the end.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from fedalign.federated.mesh import experts_within_process, local_view, replicated

log = logging.getLogger("fedalign.federated.server")
PyTree = Any


# Keys of the loop's ``out`` that :class:`Evaluate` copies into the metrics record when present.
RECORD_EXTRAS = ("dropped_clients", "dp_epsilon")


class PeriodicAction(Protocol):
  """``action(round_num, state, out) -> dict | None``, called after every round."""

  def __call__(self, round_num: int, state: PyTree, out: dict[str, Any]) -> dict[str, Any] | None:
    ...


def every_n(n: int, rounds: int) -> Callable[[int], bool]:
  """``round_num -> bool``: every ``n`` rounds and after the last.

  >>> [r for r in range(1, 8) if every_n(3, 7)(r)]
  [3, 6, 7]
  """
  return lambda round_num: bool(n) and (round_num % n == 0 or round_num == rounds)


def to_py(x: Any) -> Any:
  """An array as a Python scalar or (nested) list.

  >>> to_py(np.float32(2.0)), to_py(np.arange(2))
  (2.0, [0, 1])
  """
  x = np.asarray(x)
  return x.item() if x.ndim == 0 else x.tolist()


class Evaluate:
  """Evaluates the global model on the run's test split every ``config.eval.every`` rounds
  (and after the last): appends one record to ``metrics.jsonl`` and to ``history``, logs it
  and returns it.

  The record: round, method, train_loss, excluded_clients, round_time_s, test_accuracy,
  per-client accuracies (``config.eval.per_client``), aggregator diagnostics
  (``agg/...``), routing divergence / expert role preservation, expert specialization
  (``config.eval.specialization_examples`` > 0) and elapsed_s (seconds since ``t0``: for a
  resumed run, the checkpoint's elapsed_s plus this process's time).

  Multi-process runs: process 0 evaluates on its own devices' copy of the params
  (:func:`~fedalign.federated.mesh.local_view`), unless the ``'experts'`` mesh axis spans
  processes (:func:`on_every_process`): then every process runs this action (``write=False``
  on all but process 0, which alone writes and returns the record) and the evaluation is one
  jitted program over the globally sharded params with replicated outputs.
  """

  def __init__(
      self,
      run: Any,
      metrics_path: pathlib.Path,
      history: list[dict[str, Any]],
      t0: float,
      *,
      write: bool = True,
  ):
    self.run, self.metrics_path, self.history, self.t0 = run, metrics_path, history, t0
    self.write = write
    config = run.config
    self.due = every_n(config.eval.every, config.train.rounds)
    self.evaluate = run.evaluate
    self.test_examples = {k: jnp.asarray(v) for k, v in run.data.test.items()}
    self.specialization = make_specialization(
        run.data, run.module, config.eval.specialization_examples
    )
    self.spmd = on_every_process(run)
    if self.spmd:
      # The experts axis spans processes: no process holds every expert shard, so every
      # process runs the evaluation on the globally sharded params (host test data, the same
      # on every process) and reads its replicated outputs from its own devices.
      log.info("the experts axis spans processes: every process takes part in the evaluation")
      rep = replicated(run.mesh)
      self.evaluate = jax.jit(run.evaluate, out_shardings=rep)
      self.test_examples = {k: np.asarray(v) for k, v in run.data.test.items()}
      if self.specialization is not None:
        self.specialization = jax.jit(self.specialization, out_shardings=rep)

  def __call__(self, round_num: int, state: PyTree, out: dict[str, Any]) -> dict[str, Any] | None:
    from fedalign.metrics.evaluation import client_accuracy

    if not self.due(round_num):
      return None
    config, data = self.run.config, self.run.data
    train_loss = out["train_loss"]
    record = {
        "round": round_num,
        "method": config.method,
        "train_loss": train_loss,
        "excluded_clients": out["excluded_clients"],
        "round_time_s": out["round_time_s"],
    }
    for key in RECORD_EXTRAS:  # faults and privacy (fedalign/privacy.py)
      if key in out:
        record[key] = out[key]
    # Multi-process: this process's copy (the global params when every process evaluates).
    params = state["params"] if self.spmd else local_view(state["params"])
    ev = local_view(self.evaluate(params, self.test_examples))
    if self.specialization is not None:
      spec = local_view(self.specialization(params))
    if not self.write:
      return None
    record["test_accuracy"] = float(ev["acc"])
    if "nll" in ev:  # data.task = 'lm': test_accuracy is the next-token accuracy
      record["test_nll"] = float(ev["nll"])
      record["test_perplexity"] = float(ev["ppl"])
      record["test_nll_by_label"] = [round(float(v), 5) for v in ev["nll_by_label"]]
    if config.eval.per_client:
      acc_c = client_accuracy(ev["correct"], data.test["labels"], data.label_counts)
      record["client_accuracy"] = [round(float(a), 5) for a in acc_c]
      record["mean_client_accuracy"] = float(jnp.mean(acc_c))
    record.update(diagnostics(out))
    if self.specialization is not None:
      mi, _ = spec
      record["expert_specialization"] = float(np.mean([float(v) for v in mi.values()]))
      record["expert_specialization_per_block"] = {k: float(v) for k, v in mi.items()}
    record["elapsed_s"] = time.time() - self.t0
    entry = {"round": round_num, "test_accuracy": record["test_accuracy"], "train_loss": train_loss}
    if "test_nll" in record:
      entry["test_nll"] = record["test_nll"]
    self.history.append(entry)
    with self.metrics_path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    log.info(
        "round %d/%d %s test_accuracy=%.4f train_loss=%.4f (%.1fs)",
        round_num,
        config.train.rounds,
        config.method,
        record["test_accuracy"],
        train_loss,
        out["round_time_s"],
    )
    return record


def on_every_process(run: Any) -> bool:
  """True when :class:`Evaluate` must run on every process (``write=False`` but on process
  0): a multi-process run whose ``'experts'`` mesh axis spans processes."""
  return run.mesh is not None and not experts_within_process(run.mesh)


class RoutingDump:
  """Writes the round's per-client routing distributions (:func:`save_client_routing`) on the
  evaluated rounds."""

  def __init__(self, path: pathlib.Path, config: ml_collections.ConfigDict):
    self.path, self.num_clients = path, config.data.num_clients
    self.due = every_n(config.eval.every, config.train.rounds)

  def __call__(self, round_num: int, state: PyTree, out: dict[str, Any]) -> None:
    if self.due(round_num):
      save_client_routing(self.path, out, out["client_ids"], round_num, self.num_clients)


class Checkpoint:
  """Saves ``state`` with ``{'round', 'history', 'elapsed_s'}`` every
  ``config.checkpoint.every`` rounds (and after the last; never when 0). ``elapsed_s`` is the
  time since ``t0`` (the run's start; a resumed run passes its start minus the checkpoint's
  elapsed_s, so that the figure adds up over the segments of a resumed run)."""

  def __init__(self, ckpt: Any, config: ml_collections.ConfigDict, history: list[dict], t0: float):
    self.ckpt, self.history, self.t0 = ckpt, history, t0
    self.due = every_n(config.checkpoint.every, config.train.rounds)

  def __call__(self, round_num: int, state: PyTree, out: dict[str, Any]) -> None:
    if self.due(round_num):
      meta = {"round": round_num, "history": self.history, "elapsed_s": time.time() - self.t0}
      self.ckpt.save(round_num, state, meta)


class ProgressBar:
  """A tqdm bar over the rounds (shown on a terminal only), with the last accuracy and loss."""

  def __init__(self, desc: str, start: int, total: int):
    self.bar = tqdm(desc=desc, initial=start, total=total, disable=None)

  def __call__(self, round_num: int, state: PyTree, out: dict[str, Any]) -> None:
    if "test_accuracy" in out:
      self.bar.set_postfix(acc=f"{out['test_accuracy']:.3f}", loss=f"{out['train_loss']:.3f}")
    self.bar.update(1)

  def close(self) -> None:
    self.bar.close()


def warn_excluded(round_num: int, state: PyTree, out: dict[str, Any]) -> None:
  """Logs the clients whose non-finite updates the round excluded."""
  if out["excluded_clients"]:
    log.warning(
        "round %d: clients %s sent non-finite updates and were excluded",
        round_num,
        out["excluded_clients"],
    )


def make_specialization(data: Any, module: Any, max_examples: int) -> Any:
  """``params -> ({block: MI}, {block: (K, E)})``: expert specialization on test prompts.

  Mutual information between expert selection and class label (method doc, section 7) over
  the first ``max_examples`` test examples; the label word itself is masked out so that only
  the prompt is routed (``data.task = 'lm'``: the whole text, whose label is its topic). None
  when ``max_examples`` is 0.
  """
  from fedalign.metrics.specialization import make_expert_specialization_fn

  if max_examples <= 0 or np.ndim(data.test["tokens"]) != 2:
    return None  # off, or multi-token label words (K sequences per example)
  n = min(max_examples, len(data.test["labels"]))
  tokens = jnp.asarray(data.test["tokens"][:n])
  mask = jnp.asarray(data.test["mask"][:n])
  if "target_mask" in data.test and not data.seq2seq and not getattr(data, "lm", False):
    mask = mask & ~jnp.asarray(data.test["target_mask"][:n])  # (an LM's targets are the text)
  labels = jnp.asarray(data.test["labels"][:n])
  if data.seq2seq:

    def routing_fn(p, t, m):  # one decoder step per example, masked like its encoder input
      return module.apply({"params": p}, t, m, None, m[:, :1])[1]["routing"]

  else:

    def routing_fn(p, t, m):
      return module.apply({"params": p}, t, m)[1]["routing"]

  fn = make_expert_specialization_fn(routing_fn, data.num_classes)
  return lambda params: fn(params, tokens, mask, labels)


# FedAlign-MoE's per-(client, expert) arrays (``fedalign.detailed_diagnostics=True``): written
# whole, whatever their size (experiments/plots.py plots them); other arrays above 64 entries are
# written as their mean.
DETAILED_DIAGNOSTICS = ("omega", "S", "A", "tau", "w")


def diagnostics(out: dict[str, Any]) -> dict[str, Any]:
  """Diagnostics of the aggregator (scalars; :data:`DETAILED_DIAGNOSTICS` arrays whole) plus
  routing divergence and role preservation.

  >>> rec = diagnostics({'diagnostics': {'b/omega': np.full((10, 16), 0.1), 'b/x': np.ones(100)},
  ...                    'routing_stats': {}})
  >>> len(rec['agg/b/omega']), len(rec['agg/b/omega'][0]), rec['agg/b/x']
  (10, 16, 1.0)
  """
  from fedalign.metrics import routing_metrics as rm
  from fedalign.models.routing import finalize_stats

  rec: dict[str, Any] = {}
  for k, v in out["diagnostics"].items():
    v = np.asarray(v)
    whole = v.size <= 64 or k.rsplit("/", 1)[-1] in DETAILED_DIAGNOSTICS
    rec[f"agg/{k}"] = to_py(v) if whole else float(v.mean())
  divs, roles = [], []
  for path, s in out["routing_stats"].items():
    if path.startswith("_"):
      continue
    f = finalize_stats(s)
    real = np.asarray(s["token_count"]) > 0
    if not real.any():
      continue
    p = f["p"][real]
    p_mean = jnp.mean(p, axis=0)
    divs.append(float(rm.routing_divergence(p, p_mean / jnp.sum(p_mean), jnp.ones(p.shape[0]))))
    roles.append(float(rm.expert_role_preservation(f["mu"][real], f["c"][real])))
  if divs:
    rec["routing_divergence"] = float(np.mean(divs))
    rec["expert_role_preservation"] = float(np.mean(roles))
  return rec


def save_client_routing(
    path: pathlib.Path, out: dict[str, Any], ids: np.ndarray, round_num: int, num_clients: int
) -> None:
  """Writes each MoE block's per-client routing distribution p_i (clients, experts).

  Rows are client ids (NaN for clients not sampled this round); ``p_i`` is the mean router
  probability over the client's local training tokens in this round (section 3.1 of the
  method doc). Keys are block paths with '/' as '.', plus ``round`` and ``client_ids``.
  """
  from fedalign.models.routing import finalize_stats

  arrays: dict[str, np.ndarray] = {"round": np.asarray(round_num), "client_ids": np.asarray(ids)}
  for block, s in out["routing_stats"].items():
    if block.startswith("_"):
      continue
    p = np.asarray(finalize_stats(s)["p"], np.float32)[: len(ids)]
    full = np.full((num_clients, p.shape[-1]), np.nan, np.float32)
    full[ids] = p
    arrays[block.replace("/", ".")] = full
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def truncate_metrics(path: pathlib.Path, start_round: int) -> None:
  """Drops metric lines past the resumed round so a resumed file equals an uninterrupted one.

  A last line that is not a whole JSON record (the run was killed while writing it, before
  that round's checkpoint) is dropped with a warning: its round runs again. An unreadable line
  before the last one is an error naming it (it cannot be told which round it was).

  >>> import tempfile
  >>> p = pathlib.Path(tempfile.mkdtemp()) / 'metrics.jsonl'
  >>> _ = p.write_text('{"round": 1}\\n{"round": 2}\\n{"rou')
  >>> truncate_metrics(p, 2); p.read_text()
  '{"round": 1}\\n{"round": 2}\\n'
  """
  if not path.exists():
    return
  lines = path.read_text().splitlines()
  keep = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      round_num = int(record["round"])
    except (ValueError, KeyError, TypeError) as e:
      if i == len(lines) - 1:
        log.warning(
            "%s: dropping its last line, which is not a complete metrics record (%s: %r...): "
            "the run was interrupted while writing it; that round is run again",
            path,
            type(e).__name__,
            line[:60],
        )
        continue
      raise ValueError(
          f"{path}: line {i + 1} is not a metrics record ({type(e).__name__}: {line[:60]!r}); "
          "only the last line can be a partial write. Repair or remove that line (or start a "
          "new --workdir) to resume."
      ) from e
    if round_num <= start_round:
      keep.append(line)
  path.write_text("".join(line + "\n" for line in keep))


def plot_run(
    workdir: pathlib.Path,
    history: list[dict],
    data: Any,
    config: ml_collections.ConfigDict,
) -> None:
  """Accuracy-vs-round curve and the partition's clients x classes counts."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  from fedalign.data.partition import plot_label_counts

  plots = workdir / "plots"
  plots.mkdir(exist_ok=True)
  if history:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([h["round"] for h in history], [h["test_accuracy"] for h in history], marker="o")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_xlabel("round")
    ax.set_ylabel("global test accuracy")
    ax.set_title(f"{config.method}, alpha={config.data.alpha}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plots / "accuracy.png", dpi=120)
    plt.close(fig)
  plot_label_counts(data.label_counts, plots / "partition.png")

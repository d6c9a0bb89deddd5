"""One federated run built from its config: data, model, algorithm, the jitted round.

:func:`build_run` is the single place where a run is put together; the server loop
(:func:`fedalign.federated.server.run_experiment`), the PyTorch comparison
(``experiments/compare_pytorch.py``) and the benchmarks use it. :meth:`Run.round_inputs`
holds the host side of a round: client sampling (:func:`sample_clients`, from
``(seed, round)`` only), size-sorting for chunks and weight-0 padding clients, or with
``train.lanes`` the lane schedule and layout of the round's batches.

Example (a few seconds on CPU):
    >>> import tempfile
    >>> from fedalign.config_files import load_config
    >>> cfg = load_config('configs/default.py:runlocal')
    >>> run = build_run(cfg, tempfile.mkdtemp())
    >>> batches, weights, ids_in, ids = run.round_inputs(0)
    >>> len(ids) == cfg.train.clients_per_round
    True
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedalign.aggregation import robust as robust_lib
from fedalign.data.federated import FederatedData
from fedalign.algorithms import make_algorithm
from fedalign.federated import attacks as attacks_lib
from fedalign.federated.client import client_optimizer, make_client_update
from fedalign.federated.distributed import barrier, is_main
from fedalign.federated.mesh import (
    EXPERT_AXIS,
    client_axis_size,
    client_sharding,
    global_arrays,
    make_mesh,
    place,
    process_rows,
    replicated,
    state_shardings,
)
from fedalign.federated.round import (
    choose_lanes,
    init_server_state,
    lane_batches,
    lane_schedule,
    make_round_fn,
)
from fedalign.federated.task import CausalLMTask, Seq2SeqTask
from fedalign.models import build_module
from fedalign.models.config import MoEConfig
from fedalign.models.from_config import load_model
from fedalign.models.lora import partition, trainable_mask
from fedalign.pretrain import maybe_pretrained
from fedalign import privacy

PyTree = Any


def sample_clients(seed: int, round_idx: int, num_clients: int, per_round: int) -> np.ndarray:
  """Sorted client ids of a round, derived from (seed, round) only.

  >>> sample_clients(0, 3, 10, 4).tolist() == sample_clients(0, 3, 10, 4).tolist()
  True
  >>> len(sample_clients(0, 3, 10, 4))
  4
  """
  rng = np.random.default_rng(np.random.SeedSequence([seed, round_idx, 104729]))
  return np.sort(rng.choice(num_clients, per_round, replace=False))


@dataclasses.dataclass
class Training:
  """The training side of a run (no data): what :func:`build_training` returns."""

  module: Any
  mask: PyTree
  algorithm: Any
  task: Any
  client_update: Callable


def expert_parallel(mcfg: Any, mesh: Any) -> Any:
  """The model config with expert parallelism matching ``mesh``'s ``'experts'`` axis.

  On a mesh with an ``'experts'`` axis of size k, a decoder's dropless sparse experts run as
  k shards (``MoEConfig.expert_shards``), so each device computes the rows routed to the
  experts it holds with its own weights (the same function; docs/scaling.md). Other models
  (Switch, capacity dispatch, ``moe_impl`` dense/ragged) and other meshes: unchanged.
  """
  if mesh is None or EXPERT_AXIS not in mesh.axis_names or not isinstance(mcfg, MoEConfig):
    return mcfg
  if mcfg.moe_impl != "sparse" or mcfg.capacity_factor is not None:
    return mcfg
  return mcfg.replace(expert_shards=int(mesh.shape[EXPERT_AXIS]))


def build_training(
    config: ml_collections.ConfigDict,
    mcfg: Any,
    params: PyTree,
    *,
    seq2seq: bool = False,
    num_clients: int | None = None,
    scored_tokens: int | None = None,
) -> Training:
  """Module, trainable mask, algorithm, task and pure client update of a model.

  Args:
    config: the run's config (``train``, ``method`` and the method's fields).
    mcfg: the model config (:func:`fedalign.models.from_config.load_model`).
    params: the initial parameters.
    seq2seq: a Switch (encoder-decoder) model: :class:`Seq2SeqTask`, else
      :class:`CausalLMTask`.
    num_clients: the size of the client population (default ``config.data.num_clients``).
    scored_tokens: the most target tokens of a training row: the LM head then runs on the
      scored positions only (:class:`CausalLMTask`); None: the full head.
  """
  t = config.train
  module = build_module(mcfg)
  mask = trainable_mask(params, t.trainable)
  trainable, _ = partition(params, mask)
  algorithm = make_algorithm(config, trainable, num_clients or config.data.num_clients)
  if seq2seq:
    task = Seq2SeqTask(module)
  else:
    task = CausalLMTask(module, t.prompt_loss_weight, scored_tokens)
  client_update = make_client_update(
      task,
      algorithm,
      client_optimizer(config),
      load_balance_coef=t.load_balance_coef,
      z_loss_coef=t.z_loss_coef,
  )
  return Training(module, mask, algorithm, task, client_update)


@dataclasses.dataclass
class Run:
  """Everything a federated run needs, built by :func:`build_run`.

  ``round_fn(state, batches, weights, client_ids, round_idx) -> (state, out)`` is jitted;
  ``pad_step`` = lcm(chunk size, 'clients' axis size): the number of clients given to ``round_fn`` is
  rounded up to a multiple of it with weight-0 padding clients. ``lanes`` > 0
  (``train.lanes``): ``round_fn`` takes the lane layout and no client is padded.
  """

  config: ml_collections.ConfigDict  # the resolved config (pre-training applied)
  data: FederatedData
  model_config: Any
  module: Any
  params: PyTree
  mask: PyTree
  algorithm: Any
  task: Any
  client_update: Callable
  round_fn: Callable
  mesh: jax.sharding.Mesh | None
  chunk_size: int | None
  pad_step: int
  evaluate: Callable
  initial_state: PyTree
  lanes: int = 0
  lanes_min_useful: float = 0.9

  def round_inputs(
      self, round_idx: int
  ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """``(batches, weights, client_ids_padded, ids)`` of round ``round_idx``.

    ``ids`` are the sampled clients (sorted by decreasing size when the round is chunked:
    chunks of similar size, the local loop stops at a chunk's longest client); ``batches``,
    ``weights`` (= client sizes) and ``client_ids_padded`` carry weight-0 padding clients up
    to a multiple of ``pad_step``. With ``lanes``: ``batches`` in the lane layout
    (:func:`~fedalign.federated.round.lane_batches`) on :meth:`round_lanes` lanes, no
    padding clients.
    """
    config, data = self.config, self.data
    cpr = config.train.clients_per_round
    ids = self.round_clients(round_idx)
    batches = data.round_batches(config, ids, round_idx)
    weights = data.client_sizes[ids].astype(np.float32)
    weights[self.dropped(round_idx, ids)] = 0.0  # faults.drop_prob: the update never arrives
    if self.lanes:
      steps = batches["step_mask"].sum(1)
      num_lanes = self.round_lanes(steps)
      slots = None
      if cpr < config.data.num_clients:
        # Sampled clients: one slot length per lane count for the whole run (LPT's bound
        # sum / L + max over the largest possible sample), not one compilation per round.
        top = np.sort(self.population_steps())[::-1][:cpr]
        slots = max(1, int(-(-top.sum() // num_lanes) + top[0]))
      schedule = lane_schedule(steps, num_lanes, num_slots=slots)
      return lane_batches(batches, schedule), weights, ids, ids
    pad_to = int(math.ceil(cpr / self.pad_step) * self.pad_step)
    if pad_to == cpr:
      return batches, weights, ids, ids
    extra = pad_to - cpr
    batches = {
        k: np.concatenate([v, np.zeros((extra,) + v.shape[1:], v.dtype)])
        for k, v in batches.items()
    }
    weights = np.concatenate([weights, np.zeros(extra, np.float32)])
    ids_in = np.concatenate([ids, np.repeat(ids[:1], extra)])
    return batches, weights, ids_in, ids

  def round_clients(self, round_idx: int) -> np.ndarray:
    """The sampled clients of round ``round_idx`` in the order of the round's client axis
    (from ``(seed, round)`` only: the same on every process)."""
    config = self.config
    ids = sample_clients(
        config.seed, round_idx, config.data.num_clients, config.train.clients_per_round
    )
    if self.chunk_size is not None:
      ids = ids[np.argsort(-self.data.client_sizes[ids], kind="stable")]
    return ids

  def round_arrays(
      self, round_idx: int
  ) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    """:meth:`round_inputs` as ``round_fn`` takes them: on a mesh, ``batches`` are global
    arrays sharded over the client axis, of which this process built only the rows its own
    devices hold (the other processes build theirs); without a mesh, numpy arrays.

    Every row is the one :meth:`round_inputs` builds (the batches of a client derive from
    ``(seed, round, client)`` only), so a multi-process round equals the single-process one.
    With ``lanes`` a lane mixes clients: every process builds the whole round's batches and
    keeps its rows.
    """
    if self.mesh is None:
      return self.round_inputs(round_idx)
    sharding = client_sharding(self.mesh)
    if self.lanes:
      batches, weights, ids_in, ids = self.round_inputs(round_idx)
      num = len(next(iter(batches.values())))
      return global_arrays(sharding, num, np.arange(num), batches), weights, ids_in, ids
    config, data = self.config, self.data
    cpr = config.train.clients_per_round
    ids = self.round_clients(round_idx)
    pad_to = int(math.ceil(cpr / self.pad_step) * self.pad_step)
    rows = process_rows(sharding, pad_to)
    real = rows[rows < cpr]
    # A process whose rows are all padding builds one client's batches for the shapes.
    built = data.round_batches(config, ids[real] if real.size else ids[:1], round_idx)
    local = {}
    for k, v in built.items():
      out = np.zeros((len(rows),) + v.shape[1:], v.dtype)
      out[: real.size] = v[: real.size]  # rows are sorted: the real ones come first
      local[k] = out
    weights = np.concatenate(
        [data.client_sizes[ids].astype(np.float32), np.zeros(pad_to - cpr, np.float32)]
    )
    weights[:cpr][self.dropped(round_idx, ids)] = 0.0  # faults.drop_prob
    ids_in = np.concatenate([ids, np.repeat(ids[:1], pad_to - cpr)])
    return global_arrays(sharding, pad_to, rows, local), weights, ids_in, ids

  def dropped(self, round_idx: int, ids: np.ndarray) -> np.ndarray:
    """(len(ids),) bool: the round's clients that drop out mid-round (``faults.drop_prob``,
    drawn from (seed, round) per client id): they train, but their update never arrives."""
    c = self.config
    return privacy.dropped_mask(c.seed, round_idx, ids, c.data.num_clients, privacy.drop_prob(c))

  def uploaded(self, round_idx: int) -> np.ndarray:
    """The ids of round ``round_idx``'s clients whose update arrives (sampled, not dropped)."""
    c = self.config
    ids = sample_clients(c.seed, round_idx, c.data.num_clients, c.train.clients_per_round)
    return ids[~self.dropped(round_idx, ids)]

  def round_lanes(self, steps: np.ndarray) -> int:
    """The lanes of a round whose clients take ``steps`` local steps
    (:func:`~fedalign.federated.round.choose_lanes` from ``train.lanes`` and
    ``train.lanes_min_useful``; a multiple of the 'clients' axis size)."""
    multiple = client_axis_size(self.mesh)
    return choose_lanes(steps, self.lanes, min_useful=self.lanes_min_useful, multiple_of=multiple)

  def population_steps(self) -> np.ndarray:
    """Real local steps of every client of the population in a round."""
    t = self.config.train
    if t.local_steps > 0:
      return np.full(len(self.data.client_sizes), t.local_steps, np.int64)
    return t.local_epochs * -(-np.asarray(self.data.client_sizes, np.int64) // t.batch_size)

  def run_round(self, state: PyTree, round_idx: int) -> tuple[PyTree, dict[str, Any], np.ndarray]:
    """One round from ``state``: ``(new state, round_fn's outputs, sampled client ids)``."""
    batches, weights, ids_in, ids = self.round_arrays(round_idx)
    seed = int(self.config.seed)
    # the seed as an argument (int32), not a constant: other seeds reuse the compiled round
    extra = {"seed": seed} if 0 <= seed < 2**31 else {}
    state, out = self.round_fn(
        state, batches, jnp.asarray(weights), jnp.asarray(ids_in), round_idx, **extra
    )
    return state, out, ids


def build_run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    data: FederatedData | None = None,
) -> Run:
  """Builds a run: data, model, algorithm, client update, jitted round, evaluator, state.

  Args:
    config: a validated config (:func:`fedalign.federated.config_checks.validate_config`).
      With ``config.pretrain.enabled`` the cached pre-trained checkpoint is used
      (:func:`fedalign.pretrain.maybe_pretrained`); ``Run.config`` is the resolved config.
    workdir: where the tokenizer (and the pre-training cache) live.
    data: reuse an existing :class:`FederatedData` of the same data config (e.g. several
      model variants on the same data); built from ``config`` when None.
  """
  workdir = pathlib.Path(workdir)
  if jax.process_count() > 1 and "pretrain" in config and config.pretrain.enabled:
    if is_main():  # process 0 pre-trains (or finds the cache); the others then read it
      maybe_pretrained(config, workdir)
    barrier("fedalign pretrain")
  config = maybe_pretrained(config, workdir)  # config.pretrain.enabled: the cached checkpoint
  if data is None:
    data = FederatedData(config, workdir)
  mcfg, params = load_model(config, data.tokenizer)
  scored = None
  # The LM head on the target positions only (a bound from every row); a language model
  # (data.task = 'lm') scores every position: the full head.
  if not data.seq2seq and not getattr(data, "lm", False):
    from fedalign.metrics.evaluation import max_scored_tokens

    scored = max_scored_tokens(data.train["target_mask"], data.train["mask"])
  mesh = make_mesh(config)  # None without train.use_mesh; checks train.lanes against it
  mcfg = expert_parallel(mcfg, mesh)
  training = build_training(config, mcfg, params, seq2seq=data.seq2seq, scored_tokens=scored)
  chunk = config.train.chunk_size or None
  lanes = int(config.train.get("lanes", 0))
  state = init_server_state(params, training.algorithm, training.mask, config.data.num_clients)
  # On a mesh the round's outputs come back replicated: every process can read them (metrics)
  # without a gather of arrays it does not hold. The new state comes back in the state's own
  # layout: replicated on a 1-D mesh; on a 2-D mesh the expert leaves sharded over 'experts'
  # (mesh.state_shardings), which is also how it is placed here and restored from checkpoints.
  jit_kw, param_shardings = {}, None
  if mesh is not None:
    shardings = state_shardings(state, mesh)
    state = place(state, shardings)  # global arrays on every device of every process
    jit_kw = {"out_shardings": replicated(mesh)}
    if EXPERT_AXIS in mesh.axis_names:
      jit_kw = {"out_shardings": (shardings, replicated(mesh))}
      param_shardings = shardings["params"]
  # Robust aggregation (server.robust*) and simulated attackers (attack.*), if any.
  robust = robust_lib.from_config(config, top_k=getattr(mcfg, "top_k", None))
  attack = attacks_lib.from_config(config, getattr(mcfg, "vocab_size", None), data.candidate_ids)
  round_fn = jax.jit(
      make_round_fn(
          training.client_update,
          training.algorithm,
          training.mask,
          seed=config.seed,
          chunk_size=chunk,
          mesh=mesh,
          lanes=bool(lanes),
          robust=robust,
          attack=attack,
          privatize=privacy.make_privatizer(config),
          param_shardings=param_shardings,
      ),
      **jit_kw,
  )
  # Weight-0 padding clients make the round's client count a multiple of the chunk size and
  # of the 'clients' axis size (lanes need none: the lane axis is sharded).
  pad_step = 1 if lanes else math.lcm(chunk or 1, client_axis_size(mesh))
  evaluate = make_evaluator(data, mcfg, training.module, config.eval.batch_size)
  return Run(
      config=config,
      data=data,
      model_config=mcfg,
      module=training.module,
      params=params,
      mask=training.mask,
      algorithm=training.algorithm,
      task=training.task,
      client_update=training.client_update,
      round_fn=round_fn,
      mesh=mesh,
      chunk_size=chunk,
      pad_step=pad_step,
      evaluate=evaluate,
      initial_state=state,
      lanes=lanes,
      lanes_min_useful=float(config.train.get("lanes_min_useful", 0.9)),
  )


def make_evaluator(data: FederatedData, mcfg: Any, module: Any, batch_size: int) -> Any:
  """The jitted ``evaluate(params, data.test) -> {'acc', 'correct', 'pred', ...}`` of a run."""
  from fedalign.metrics import evaluation as ev

  if data.seq2seq:
    return ev.make_seq2seq_classification_evaluator(mcfg, data.candidates, batch_size)
  apply_fn = lambda p, tok, m: module.apply({"params": p}, tok, m)[0]
  # The LM head on the scored positions only (the label word's, the options').
  scored = lambda p, tok, m, pos: module.apply({"params": p}, tok, m, logit_positions=pos)[0]
  if getattr(data, "lm", False):  # data.task = 'lm': next-token accuracy and log-likelihood
    return ev.make_lm_evaluator(apply_fn, batch_size, data.num_classes)
  if getattr(data, "multiple_choice", False):  # MMLU / HellaSwag: every option scored
    return ev.make_multiple_choice_evaluator(
        apply_fn,
        max(1, batch_size // data.test["tokens"].shape[1]),
        labels_key="answers",
        metric=data.mc_metric,
        scored_apply_fn=scored,
    )
  if data.candidate_ids is not None:
    return ev.make_classification_evaluator(
        apply_fn, data.candidate_ids, batch_size, scored_apply_fn=scored
    )
  # Multi-token label words: K sequences per example, so K times smaller batches.
  return ev.make_multiple_choice_evaluator(
      apply_fn, max(1, batch_size // len(data.label_words)), scored_apply_fn=scored
  )

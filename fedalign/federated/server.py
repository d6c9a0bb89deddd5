"""The server loop: rounds of a built run, with periodic actions (evaluation, checkpoints, ...).

:func:`run_experiment` is what ``python -m fedalign.main`` calls. Every random choice derives
from ``(config.seed, round)`` (client sampling, data order) or ``(seed, round, client)``
(client rngs), so a run resumed from a checkpoint reproduces the uninterrupted run.

Outputs in the workdir: ``config.json`` (resolved config), ``metrics.jsonl`` (one JSON object
per evaluated round), ``summary.json``, ``checkpoints/``, ``plots/`` and (a tokenizer trained by
the run) ``tokenizer.json``.

The run is built by :func:`fedalign.federated.run.build_run` (data: :mod:`fedalign.data.federated`,
model: :mod:`fedalign.models.from_config`, config checks:
:mod:`fedalign.federated.config_checks`); the loop below only calls the jitted round and the
periodic actions of :mod:`fedalign.federated.hooks`.

Models (``config.model.type``):

* ``'decoder'`` (default): an MoE causal LM (:class:`~fedalign.models.MoEConfig` from the
  ``config.model`` sizes), trained with :class:`~fedalign.federated.task.CausalLMTask` on
  ``prompt + label word`` and evaluated by label-word scoring (one pass when every label word
  is a single token, else each label word scored as a sequence);
* ``'switch'``: the Switch Transformer encoder-decoder
  (:class:`~fedalign.models.switch.SwitchConfig`), text-to-text: the prompt is the encoder
  input, the label word (+ EOS) the decoder target
  (:func:`~fedalign.data.formatting.format_seq2seq_classification`), trained with
  :class:`~fedalign.federated.task.Seq2SeqTask` and evaluated by scoring every label word
  sequence as the decoder target
  (:func:`~fedalign.metrics.evaluation.make_seq2seq_classification_evaluator`).

With ``config.model.hf_checkpoint`` (a local Hugging Face checkpoint directory) either type
loads its config and weights with :func:`fedalign.models.hf.load_pretrained` instead of the
``config.model`` sizes, and the tokenizer is the checkpoint's ``tokenizer.json``.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedalign.checkpoint import Checkpointer
from fedalign.compilation import CompileTimer
from fedalign.federated import hooks
from fedalign.federated.config_checks import check_workdir_config, validate_config
from fedalign.federated.distributed import barrier, check_same_config, is_main
from fedalign.federated.mesh import make_mesh
from fedalign.federated.run import build_run
from fedalign import privacy

log = logging.getLogger(__name__)


def run_experiment(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Runs (or resumes) a federated experiment; returns the summary written to summary.json.

  Example (a few seconds on CPU):
    >>> import tempfile, importlib.util
    >>> spec = importlib.util.spec_from_file_location('c', 'configs/default.py')
    >>> mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    >>> cfg = mod.get_config('runlocal'); cfg.train.rounds = 1
    >>> summary = run_experiment(cfg, tempfile.mkdtemp())  # doctest: +SKIP
  """
  validate_config(config)
  check_same_config(config)  # multi-process: every process runs process 0's config
  make_mesh(config)  # mesh errors (e.g. multi-process without train.use_mesh) before any work
  main = is_main()  # process 0 writes the files; every process computes and checkpoints
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  check_workdir_config(workdir, config, write=False)
  barrier("fedalign workdir config")  # every process has read config.json before it changes
  if main:
    check_workdir_config(workdir, config)
  t0 = time.time()
  compile_timer = CompileTimer()
  with compile_timer:  # compile seconds of the whole run (cache hits cost ~0)
    reported_config = config
    run = build_run(config, workdir)
    config, data = run.config, run.data

    state = run.initial_state
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep)
    start_round, history = 0, []
    restored = ckpt.restore_latest(state)
    # run_t0: when the run would have started had it never been interrupted: a resumed run's
    # elapsed_s / wall_time_s go on from the checkpoint's (the time of the rounds it holds)
    run_t0 = t0
    if restored is not None:
      state, meta = restored
      state = jax.tree.map(jnp.asarray, state)
      start_round = int(meta["round"])
      history = list(meta.get("history", []))
      run_t0 = t0 - float(meta.get("elapsed_s", 0.0))  # absent in checkpoints before it
      log.info("resumed from round %d (%s)", start_round, ckpt.directory)
    metrics_path = workdir / "metrics.jsonl"
    rounds, cpr = config.train.rounds, config.train.clients_per_round
    dp_on = privacy.DPConfig.from_config(config).enabled  # config.dp: client-level DP
    accountant = privacy.Accountant(config, run.uploaded) if dp_on else None
    actions: list[hooks.PeriodicAction] = []
    if main:
      hooks.truncate_metrics(metrics_path, start_round)
      bar = hooks.ProgressBar(config.method, start_round, rounds)
      actions += [
          hooks.Evaluate(run, metrics_path, history, run_t0),
          hooks.RoutingDump(workdir / "routing_distributions.npz", config),
          bar,
          hooks.warn_excluded,
      ]
    elif hooks.on_every_process(run):  # an experts axis across processes: a joint evaluation
      actions.append(hooks.Evaluate(run, metrics_path, history, run_t0, write=False))
    actions.append(hooks.Checkpoint(ckpt, config, history, run_t0))  # every process takes part
    for r in range(start_round, rounds):
      rt = time.time()
      state, out, ids = run.run_round(state, r)
      out = jax.tree.map(np.asarray, out)  # replicated on a mesh: every process reads it
      out = dict(out, client_ids=ids, train_loss=float(out["train_loss"]))
      out["excluded_clients"] = [
          int(c) for c, e in zip(ids, np.asarray(out["excluded"])[:cpr]) if e
      ]
      out["round_time_s"] = time.time() - rt
      out["dropped_clients"] = sorted(int(c) for c in ids[run.dropped(r, ids)])  # faults
      if accountant is not None:
        out["dp_epsilon"] = accountant.epsilon(r + 1)
      for action in actions:
        out.update(action(r + 1, state, out) or {})
    if main:
      bar.close()
    ckpt.close()

  accs = [h["test_accuracy"] for h in history]
  summary = {
      "method": config.method,
      "final_test_accuracy": accs[-1] if accs else float("nan"),
      "best_test_accuracy": max(accs) if accs else float("nan"),
      "last5_mean_test_accuracy": float(np.mean(accs[-5:])) if accs else float("nan"),
      "rounds": rounds,
      "num_clients": config.data.num_clients,
      "client_sizes": data.client_sizes.tolist(),
      "wall_time_s": time.time() - run_t0,
      "session_wall_time_s": time.time() - t0,
      "resumed_from_round": start_round,
      "compile_time_s": compile_timer.seconds,
      "compilations": compile_timer.compilations,
      "compile_cache_hits": compile_timer.cache_hits,
      "compile_time_saved_s": compile_timer.seconds_saved,
      "config": json.loads(reported_config.to_json()),
  }
  nlls = [h["test_nll"] for h in history if "test_nll" in h]
  if nlls:  # data.task = 'lm' (test_accuracy above is the next-token accuracy)
    summary["final_test_nll"] = nlls[-1]
    summary["best_test_nll"] = min(nlls)
    summary["final_test_perplexity"] = float(np.exp(nlls[-1]))
  if accountant is not None:
    summary["dp_epsilon"] = accountant.epsilon(rounds)
    summary["dp"] = accountant.describe()
  if config.model.hf_checkpoint:
    summary["checkpoint"] = str(config.model.hf_checkpoint)
  log.info(
      "compiled %d programs in %.1f s, %d of them loaded from the compilation cache "
      "(%.1f s saved; wall time %.1f s)",
      compile_timer.compilations,
      compile_timer.seconds,
      compile_timer.cache_hits,
      compile_timer.seconds_saved,
      summary["wall_time_s"],
  )
  if main:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    hooks.plot_run(workdir, history, data, config)
  return summary

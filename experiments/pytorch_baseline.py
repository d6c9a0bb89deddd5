"""PyTorch side-by-side baseline: FedAvg the way the PyTorch LLM-FL frameworks run it.

A Hugging Face ``transformers`` Mixtral model, clients trained one after another (load the
global state dict, train a fresh ``torch.optim.AdamW``, deep-copy the local state dict), then
an example-weighted mean of the state dicts. Everything that is not the training framework is
fedalign's, so the two runs differ only in the engine:

* data: :class:`fedalign.data.federated.FederatedData` (same partition, tokenizer and
  formatted arrays), :func:`fedalign.federated.run.sample_clients` and
  ``FederatedData.round_batches`` (:func:`fedalign.data.batching.make_client_batches`: the same
  ``(seed, round, client)`` data order);
* model: fedalign's initial parameters (:func:`fedalign.models.from_config.load_model`, i.e.
  ``init_params`` with ``config.seed``) written with :func:`fedalign.models.hf.save_pretrained`
  and read by ``transformers.AutoModelForCausalLM.from_pretrained`` (Mixtral family);
* loss: mean next-token cross-entropy over the target (label-word) tokens, as
  :class:`fedalign.federated.task.CausalLMTask`, plus ``load_balance_coef`` times fedalign's
  load-balancing loss, re-implemented here in torch from ``output_router_logits=True``:
  per MoE layer ``E * sum_e f_e P_e`` over the valid (unpadded) tokens (``f_e``: fraction of
  tokens with e in their top-k, ``P_e``: mean router probability), averaged over the layers.
  transformers' own ``load_balancing_loss_func`` pools f and P over all layers before taking
  the product (and ``router_aux_loss_coef`` is applied only when ``labels`` are passed), so it
  is not used. The router z-loss (``z_loss_coef``) and ``prompt_loss_weight`` are mirrored too;
* optimizer: ``torch.optim.AdamW(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay)`` (optax's
  ``adamw`` defaults; both decay every parameter) after
  ``torch.nn.utils.clip_grad_norm_(grad_clip)`` (optax's ``clip_by_global_norm``; torch divides
  by ``norm + 1e-6``, optax by ``norm``). Padded steps (``step_mask`` False, epoch mode) are
  skipped and padded example slots (all-False ``mask`` rows) are dropped from the batch, which
  changes no loss term (they hold no target and no valid token);
* FedAvg: ``sum_i n_i theta_i / sum_i n_i`` over the sampled clients' state dicts; a client
  with a non-finite state is given weight 0, as fedalign excludes it;
* evaluation: label-word scoring on the same test arrays (label word removed from the input,
  logits at ``last_index``, argmax over the label-word ids), as
  :func:`fedalign.metrics.evaluation.classification_eval`.

``torch.set_num_threads(--threads)`` (default 2, the cores of the reference machine) and
``torch.manual_seed(config.seed)`` are set first (training itself draws nothing random);
``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` (see the comment at the imports).

Outputs in the workdir: ``config.json``, ``hf_init/`` (the exported initial model),
``tokenizer.json``, ``metrics.jsonl`` (one line per evaluated round: ``round``,
``test_accuracy``, ``train_loss``, ``round_time_s`` and more) and ``summary.json``.
``round_time_s`` covers what fedalign's does: client sampling, batch building, local training
and aggregation (not evaluation). A rerun starts over (no resumption).

Command (from the repository root)::

    python -m experiments.pytorch_baseline --config=configs/default.py:base --workdir=/tmp/pt \\
        [--config.train.rounds=5 ...] [--threads=2]

The side-by-side comparison with fedalign (timing and accuracy, the report
``benchmarks/pytorch_vs_jax.md``) is ``experiments/compare_pytorch.py``.

In Python (a few seconds)::

    >>> import tempfile
    >>> from experiments.pytorch_baseline import load_config, run_baseline
    >>> cfg = load_config('configs/default.py:runlocal')
    >>> cfg.train.rounds = 1
    >>> summary = run_baseline(cfg, tempfile.mkdtemp())  # doctest: +SKIP
    >>> 0.0 <= summary['final_test_accuracy'] <= 1.0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Mapping, Sequence

# PyTorch's OpenMP threads otherwise spin-wait at every parallel region: on a shared machine
# (other processes on the cores) a 2-thread step then stalls for whole scheduler slices
# (measured here: 0.1 s client updates taking 3-4 s). Passive waiting removes the stalls;
# libgomp reads this when torch is first imported. Set the variable yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

log = logging.getLogger("experiments.pytorch_baseline")

REPO = pathlib.Path(__file__).resolve().parents[1]
METHOD = "fedavg_pytorch"
StateDict = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- config
def load_config(spec: str) -> ml_collections.ConfigDict:
  """``'configs/default.py'`` or ``'configs/default.py:runlocal'`` -> its ``get_config()``.

  >>> load_config('configs/default.py:runlocal').train.rounds
  3
  """
  from fedalign import config_files

  return config_files.load_config(spec)


def check_supported(config: ml_collections.ConfigDict) -> None:
  """The baseline covers FedAvg of a random-init Mixtral decoder with full fine-tuning."""
  from fedalign.federated.config_checks import validate_config
  from fedalign.models.from_config import model_type

  validate_config(config)
  problems = []
  if model_type(config) != "decoder":
    problems.append(f"model.type={model_type(config)!r} (expected 'decoder')")
  if config.model.family != "mixtral":
    problems.append(f"model.family={config.model.family!r} (expected 'mixtral')")
  if config.model.hf_checkpoint:
    problems.append("model.hf_checkpoint is set (expected a random-init model)")
  if config.train.trainable != "full" or config.model.lora_rank:
    problems.append("LoRA (expected train.trainable='full', model.lora_rank=0)")
  if config.train.optimizer != "adamw":
    problems.append(f"train.optimizer={config.train.optimizer!r} (expected 'adamw')")
  if config.server.optimizer != "none" or config.method not in ("fedavg",):
    problems.append(
        f"method={config.method!r} / server.optimizer={config.server.optimizer!r}"
        " (expected plain FedAvg)"
    )
  if problems:
    raise ValueError(
        "the PyTorch baseline supports plain FedAvg of a random-init Mixtral "
        "decoder with full AdamW fine-tuning; unsupported: "
        + "; ".join(problems)
        + " (configs/default.py:base is such a config)"
    )


# ----------------------------------------------------------------------------- model I/O
def export_initial_model(
    config: ml_collections.ConfigDict, tokenizer: Any, directory: str | os.PathLike
) -> tuple[Any, Any, pathlib.Path]:
  """fedalign's initial model (``load_model``: init_params with config.seed) as an HF
  checkpoint; returns ``(model config, params, directory)``."""
  from fedalign.models.from_config import load_model
  from fedalign.models import MoEModel
  from fedalign.models.hf import save_pretrained

  mcfg, params = load_model(config, tokenizer)
  path = save_pretrained(MoEModel(mcfg, params), directory)
  return mcfg, params, pathlib.Path(path)


def load_torch_model(directory: str | os.PathLike) -> torch.nn.Module:
  """``AutoModelForCausalLM.from_pretrained`` in float32 (default attention and experts
  implementations of the installed transformers)."""
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)


def torch_state_to_params(state: Mapping[str, torch.Tensor], hf_dir: str | os.PathLike) -> Any:
  """A torch state dict (transformers' in-memory names, fused experts) -> fedalign params,
  through :func:`fedalign.models.hf.load_pretrained` (the config.json of ``hf_dir``)."""
  from safetensors.torch import save_file
  from fedalign.models.hf import load_pretrained

  with tempfile.TemporaryDirectory() as tmp:
    shutil.copy(pathlib.Path(hf_dir) / "config.json", pathlib.Path(tmp) / "config.json")
    save_file(
        {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()},
        str(pathlib.Path(tmp) / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return load_pretrained(tmp).params


# ----------------------------------------------------------------------------- loss
def router_losses(
    router_logits: Sequence[torch.Tensor], mask: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
  """fedalign's (load-balance, z) router losses, each averaged over the MoE layers.

  Per layer (valid = unpadded tokens, n = their count, g = softmax of the router logits):
  ``lb = E * sum_e (#valid tokens with e in top-k / n) * (sum_valid g_e / n)`` (gradient
  through the probabilities only) and ``z = sum_valid logsumexp(logits)^2 / n``.

  >>> lg = (torch.zeros(3, 4),)
  >>> lb, z = router_losses(lg, torch.ones(1, 3, dtype=torch.bool), 2)
  >>> round(float(lb), 4)
  2.0
  """
  valid = mask.reshape(-1).to(torch.float32)
  n = valid.sum().clamp_min(1.0)
  lbs, zs = [], []
  for logits in router_logits:
    logits = logits.to(torch.float32)
    e = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    idx = torch.topk(probs, top_k, dim=-1).indices
    select = F.one_hot(idx, e).to(torch.float32).sum(dim=-2) * valid[:, None]
    f = select.sum(0) / n
    p = (probs * valid[:, None]).sum(0) / n
    lbs.append(e * torch.sum(f.detach() * p))
    zs.append(torch.sum(torch.logsumexp(logits, dim=-1) ** 2 * valid) / n)
  return torch.stack(lbs).mean(), torch.stack(zs).mean()


def shifted_cross_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
  """(sum of next-token CE over positions t+1 with ``target``, their count), as fedalign's."""
  ce = F.cross_entropy(
      logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
      tokens[:, 1:].reshape(-1).long(),
      reduction="none",
  )
  w = target[:, 1:].reshape(-1).to(torch.float32)
  return torch.sum(ce * w), torch.sum(w)


def client_loss(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], config: ml_collections.ConfigDict
) -> tuple[torch.Tensor, torch.Tensor]:
  """(total loss to differentiate, task loss) of one batch: label-word CE + router losses."""
  t = config.train
  tokens, mask, target = batch["tokens"], batch["mask"], batch["target_mask"]
  out = model(
      input_ids=tokens, attention_mask=mask.long(), output_router_logits=True, use_cache=False
  )
  total, count = shifted_cross_entropy(out.logits, tokens, target & mask)
  task = total / count.clamp_min(1.0)
  if t.prompt_loss_weight:
    p_total, p_count = shifted_cross_entropy(out.logits, tokens, mask & ~target)
    task = task + t.prompt_loss_weight * p_total / p_count.clamp_min(1.0)
  lb, z = router_losses(out.router_logits, mask, model.config.num_experts_per_tok)
  loss = task + t.load_balance_coef * lb
  if t.z_loss_coef:
    loss = loss + t.z_loss_coef * z
  return loss, task


def make_optimizer(
    model: torch.nn.Module, config: ml_collections.ConfigDict
) -> torch.optim.Optimizer:
  """AdamW with optax.adamw's defaults (b1=0.9, b2=0.999, eps=1e-8)."""
  t = config.train
  return torch.optim.AdamW(
      model.parameters(),
      lr=t.learning_rate,
      betas=(0.9, 0.999),
      eps=1e-8,
      weight_decay=t.weight_decay,
  )


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Mapping[str, torch.Tensor],
    config: ml_collections.ConfigDict,
) -> float:
  """One local step (forward, backward, clip, AdamW); returns the task loss."""
  optimizer.zero_grad(set_to_none=True)
  loss, task = client_loss(model, batch, config)
  loss.backward()
  if config.train.grad_clip > 0:
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
  optimizer.step()
  return float(task.detach())


def step_batch(batches: Mapping[str, np.ndarray], c: int, s: int) -> dict[str, torch.Tensor]:
  """Client c's step-s batch as tensors, padded example slots (all-False mask) dropped."""
  rows = np.asarray(batches["mask"][c, s]).any(axis=-1)
  return {
      "tokens": torch.from_numpy(np.asarray(batches["tokens"][c, s][rows], np.int64)),
      "mask": torch.from_numpy(np.asarray(batches["mask"][c, s][rows], bool)),
      "target_mask": torch.from_numpy(np.asarray(batches["target_mask"][c, s][rows], bool)),
  }


def train_client(
    model: torch.nn.Module,
    global_state: Mapping[str, torch.Tensor],
    batches: Mapping[str, np.ndarray],
    c: int,
    config: ml_collections.ConfigDict,
) -> tuple[StateDict, float, int]:
  """Local training of the c-th sampled client from the global state.

  Returns (deep copy of the local state dict, mean task loss over real steps, real steps).
  """
  model.load_state_dict(global_state)
  model.train()
  optimizer = make_optimizer(model, config)
  losses = []
  for s in range(batches["step_mask"].shape[1]):
    if not batches["step_mask"][c, s]:
      continue  # padded step: nothing to do
    losses.append(train_step(model, optimizer, step_batch(batches, c, s), config))
  return (copy.deepcopy(model.state_dict()), float(np.mean(losses)) if losses else 0.0, len(losses))


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> StateDict:
  """Example-weighted mean of state dicts: ``sum_i w_i sd_i / sum_i w_i``.

  >>> a, b = {'w': torch.tensor([1.0])}, {'w': torch.tensor([4.0])}
  >>> fedavg([a, b], [2, 1])['w'].tolist()
  [2.0]
  """
  w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
  if not float(w.sum()) > 0:
    raise ValueError("every client has weight 0: nothing to average")
  w = (w / w.sum()).to(torch.float32)
  out = {}
  for key, ref in states[0].items():
    acc = torch.zeros_like(ref, dtype=torch.float32)
    for wi, sd in zip(w, states):
      if wi != 0:
        acc += wi * sd[key].to(torch.float32)
    out[key] = acc.to(ref.dtype)
  return out


def _finite(state: Mapping[str, torch.Tensor]) -> bool:
  return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: torch.nn.Module, test: Mapping[str, np.ndarray], candidate_ids: Any, batch_size: int
) -> dict[str, Any]:
  """Label-word accuracy: the label word removed from the input, log-softmax at last_index,
  argmax over the candidate ids (fedalign's ``classification_eval``)."""
  model.eval()
  cand = torch.as_tensor(np.asarray(candidate_ids), dtype=torch.long)
  tm = np.asarray(test["target_mask"])
  tokens = np.where(tm, 0, np.asarray(test["tokens"]))
  mask = np.asarray(test["mask"]) & ~tm
  last = np.asarray(test["last_index"])
  preds = []
  for i in range(0, len(tokens), batch_size):
    tb = torch.from_numpy(tokens[i : i + batch_size].astype(np.int64))
    mb = torch.from_numpy(mask[i : i + batch_size].astype(np.int64))
    lb = torch.from_numpy(last[i : i + batch_size].astype(np.int64))
    hidden = model.model(input_ids=tb, attention_mask=mb, use_cache=False).last_hidden_state
    row = hidden[torch.arange(len(lb)), lb]
    logp = torch.log_softmax(model.lm_head(row).float(), dim=-1)[:, cand]
    preds.append(torch.argmax(logp, dim=-1).numpy())
  pred = np.concatenate(preds)
  correct = pred == np.asarray(test["labels"])
  return {"acc": float(correct.mean()), "pred": pred, "correct": correct}


def torch_round(
    model: torch.nn.Module,
    global_state: Mapping[str, torch.Tensor],
    data: Any,
    config: ml_collections.ConfigDict,
    r: int,
) -> tuple[StateDict, float, list[int]]:
  """One FedAvg round (the part that ``round_time_s`` times): sample, batch, train the clients
  one after another, average; the new global state is loaded into ``model``.

  Returns (new global state, example-weighted mean train loss, excluded client ids).
  """
  from fedalign.federated.run import sample_clients

  ids = sample_clients(config.seed, r, config.data.num_clients, config.train.clients_per_round)
  batches = data.round_batches(config, ids, r)
  states, weights, losses, excluded = [], [], [], []
  for c, cid in enumerate(ids):
    state, loss, _ = train_client(model, global_state, batches, c, config)
    ok = _finite(state) and np.isfinite(loss)
    if not ok:
      excluded.append(int(cid))
    states.append(state)
    weights.append(float(data.client_sizes[cid]) if ok else 0.0)
    losses.append(loss if ok else 0.0)
  new_state = fedavg(states, weights)
  del states
  model.load_state_dict(new_state)
  train_loss = float(np.dot(losses, weights) / max(np.sum(weights), 1e-12))
  return new_state, train_loss, excluded


# ----------------------------------------------------------------------------- the run
def run_baseline(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, threads: int = 2
) -> dict[str, Any]:
  """Runs the PyTorch FedAvg baseline; returns the summary written to summary.json."""
  from fedalign.data.federated import FederatedData
  from fedalign.metrics.evaluation import client_accuracy

  check_supported(config)
  torch.set_num_threads(threads)
  torch.manual_seed(config.seed)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json(indent=2))
  t0 = time.time()
  data = FederatedData(config, workdir)
  if data.candidate_ids is None:
    raise ValueError(
        "the PyTorch baseline scores single-token label words only; this "
        "tokenizer splits a label word (use data.tokenizer='bpe')."
    )
  _, _, hf_dir = export_initial_model(config, data.tokenizer, workdir / "hf_init")
  model = load_torch_model(hf_dir)
  global_state = copy.deepcopy(model.state_dict())
  metrics_path = workdir / "metrics.jsonl"
  metrics_path.write_text("")
  history = []
  rounds = config.train.rounds
  for r in range(rounds):
    rt = time.time()
    global_state, train_loss, excluded = torch_round(model, global_state, data, config, r)
    round_time = time.time() - rt
    record = {
        "round": r + 1,
        "method": METHOD,
        "train_loss": train_loss,
        "excluded_clients": excluded,
        "round_time_s": round_time,
    }
    if (r + 1) % config.eval.every == 0 or r + 1 == rounds:
      ev = evaluate(model, data.test, data.candidate_ids, config.eval.batch_size)
      record["test_accuracy"] = ev["acc"]
      if config.eval.per_client:
        acc_c = np.asarray(client_accuracy(ev["correct"], data.test["labels"], data.label_counts))
        record["client_accuracy"] = [round(float(a), 5) for a in acc_c]
        record["mean_client_accuracy"] = float(acc_c.mean())
      record["elapsed_s"] = time.time() - t0
      history.append({"round": r + 1, "test_accuracy": ev["acc"], "train_loss": train_loss})
      with metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
      log.info(
          "round %d/%d %s test_accuracy=%.4f train_loss=%.4f (%.2fs)",
          r + 1,
          rounds,
          METHOD,
          ev["acc"],
          train_loss,
          round_time,
      )
  accs = [h["test_accuracy"] for h in history]
  summary = {
      "method": METHOD,
      "final_test_accuracy": accs[-1] if accs else float("nan"),
      "best_test_accuracy": max(accs) if accs else float("nan"),
      "rounds": rounds,
      "num_clients": config.data.num_clients,
      "client_sizes": data.client_sizes.tolist(),
      "wall_time_s": time.time() - t0,
      "torch_threads": torch.get_num_threads(),
      "attn_implementation": model.config._attn_implementation,
      "experts_implementation": getattr(model.config, "_experts_implementation", None),
      "config": json.loads(config.to_json()),
  }
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str]) -> None:
  from absl import app

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  summary = run_baseline(_CONFIG.value, _WORKDIR.value, _THREADS.value)
  print(
      f"final_test_accuracy={summary['final_test_accuracy']:.4f} "
      f"rounds={summary['rounds']} workdir={_WORKDIR.value}"
  )


if __name__ == "__main__":
  from absl import app, flags
  from fedalign.config_files import define_config_flag

  _CONFIG = define_config_flag("config", "Path to a get_config() file.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
  _THREADS = flags.DEFINE_integer("threads", 2, "torch.set_num_threads.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)

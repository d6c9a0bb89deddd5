"""The PyTorch / transformers FedAvg baseline (experiments/pytorch_baseline.py) computes what
fedalign computes: same loss and gradients on the same batch, same weights after local AdamW
steps, same FedAvg, and a 1-round run writes metrics.jsonl. The comparison harness
(experiments/compare_pytorch.py) times fedalign's round built by build_run and renders its
report tables."""

import json
import pathlib
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import compare_pytorch as cp  # noqa: E402
from experiments import pytorch_baseline as pb  # noqa: E402
from fedalign.algorithms import make_algorithm  # noqa: E402
from fedalign.algorithms.fedavg import fedavg_aggregator  # noqa: E402
from fedalign.data.federated import FederatedData  # noqa: E402
from fedalign.federated.client import client_optimizer, make_client_update  # noqa: E402
from fedalign.federated.round import init_server_state, make_round_fn  # noqa: E402
from fedalign.federated.task import CausalLMTask  # noqa: E402
from fedalign.models import build_module  # noqa: E402
from fedalign.models.lora import trainable_mask  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config():
  cfg = pb.load_config(str(REPO / "configs" / "default.py") + ":runlocal")
  cfg.data.max_train_examples = 400
  cfg.data.max_test_examples = 64
  cfg.data.num_clients = 2
  cfg.data.alpha = 1.0
  cfg.data.vocab_size = 300
  cfg.data.seq_len = 32
  cfg.train.clients_per_round = 2
  cfg.train.local_steps = 2
  cfg.train.batch_size = 4
  cfg.train.rounds = 1
  cfg.train.weight_decay = 0.01  # exercise the decoupled decay too
  cfg.eval.specialization_examples = 0
  return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  cfg = tiny_config()
  work = tmp_path_factory.mktemp("baseline")
  data = FederatedData(cfg, work)
  mcfg, params, hf_dir = pb.export_initial_model(cfg, data.tokenizer, work / "hf")
  batches = data.round_batches(cfg, np.array([0, 1]), 0)
  return dict(
      cfg=cfg, work=work, data=data, mcfg=mcfg, params=params, hf_dir=hf_dir, batches=batches
  )


def max_rel_err(a, b):
  errs = jax.tree.map(
      lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(x)) + 1e-12)), a, b
  )
  return max(jax.tree.leaves(errs))


def max_abs_err(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


def test_loss_and_gradients_match_fedalign(setup):
  cfg, b = setup["cfg"], setup["batches"]
  task = CausalLMTask(build_module(setup["mcfg"]))
  batch = {k: jnp.asarray(v[0, 0]) for k, v in b.items() if k != "step_mask"}
  coef = cfg.train.load_balance_coef

  def total(p):
    loss, aux = task.loss(p, batch, None)
    return loss + coef * aux["load_balance_loss"], loss

  (j_total, j_task), j_grads = jax.jit(jax.value_and_grad(total, has_aux=True))(setup["params"])
  model = pb.load_torch_model(setup["hf_dir"])
  model.train()
  t_total, t_task = pb.client_loss(model, pb.step_batch(b, 0, 0), cfg)
  t_total.backward()
  assert abs(float(j_task) - t_task.item()) < 1e-4
  assert abs(float(j_total) - t_total.item()) < 1e-4
  t_grads = pb.torch_state_to_params(
      {n: p.grad for n, p in model.named_parameters()}, setup["hf_dir"]
  )
  assert max_rel_err(j_grads, t_grads) < 1e-4


def test_local_training_and_fedavg_round_match_fedalign(setup):
  """Two clients x two AdamW steps (clip, weight decay) then FedAvg: fedalign's jitted round
  vs the sequential torch clients, per client (losses, local weights) and aggregated."""
  cfg, b, data, params = setup["cfg"], setup["batches"], setup["data"], setup["params"]
  module = build_module(setup["mcfg"])
  mask = trainable_mask(params, "full")
  algorithm = make_algorithm(cfg, params, cfg.data.num_clients)
  client_update = make_client_update(
      CausalLMTask(module),
      algorithm,
      client_optimizer(cfg),
      load_balance_coef=cfg.train.load_balance_coef,
  )
  round_fn = jax.jit(make_round_fn(client_update, algorithm, mask, seed=cfg.seed))
  state = init_server_state(params, algorithm, mask, cfg.data.num_clients)
  weights = data.client_sizes[:2].astype(np.float32)
  state, out = round_fn(state, b, jnp.asarray(weights), jnp.arange(2), 0)

  model = pb.load_torch_model(setup["hf_dir"])
  global_state = {k: v.clone() for k, v in model.state_dict().items()}
  states, losses = [], []
  for c in range(2):
    sd, loss, steps = pb.train_client(model, global_state, b, c, cfg)
    assert steps == 2
    states.append(sd)
    losses.append(loss)
  np.testing.assert_allclose(np.asarray(out["client_train_loss"]), losses, atol=1e-4)
  # Each client's local weights: the same jitted round with weights (1, 0) / (0, 1), whose
  # FedAvg is that client's local model.
  fresh = init_server_state(params, algorithm, mask, cfg.data.num_clients)
  for c in range(2):
    one_hot = jnp.asarray(np.eye(2, dtype=np.float32)[c])
    local, _ = round_fn(fresh, b, one_hot, jnp.arange(2), 0)
    got = pb.torch_state_to_params(states[c], setup["hf_dir"])
    assert max_abs_err(local["params"], got) < 1e-5
  avg = pb.fedavg(states, weights)
  assert max_abs_err(state["params"], pb.torch_state_to_params(avg, setup["hf_dir"])) < 1e-5


def test_fedavg_equals_fedalign_weighted_mean(setup, tmp_path):
  """Pure aggregation on the same two (random) client models."""
  params = setup["params"]
  keys = jax.random.split(jax.random.key(1), 2)
  clients = [
      jax.tree.map(lambda p, k=k: p + 0.1 * jax.random.normal(k, p.shape), params) for k in keys
  ]
  weights = np.array([3.0, 7.0], np.float32)
  deltas = jax.tree.map(lambda a, c, p: jnp.stack([a - p, c - p]), clients[0], clients[1], params)
  agg = fedavg_aggregator()
  expected, _, _ = agg.aggregate(agg.init(params), params, deltas, {}, jnp.asarray(weights))
  from fedalign.models import MoEModel
  from fedalign.models.hf import save_pretrained

  states = []
  for i, p in enumerate(clients):  # the official route: save_pretrained -> from_pretrained
    path = save_pretrained(MoEModel(setup["mcfg"], p), tmp_path / f"client{i}")
    states.append(pb.load_torch_model(path).state_dict())
  # The conversion is exact: each client model round-trips.
  assert max_abs_err(clients[0], pb.torch_state_to_params(states[0], setup["hf_dir"])) == 0
  got = pb.torch_state_to_params(pb.fedavg(states, weights), setup["hf_dir"])
  assert max_abs_err(expected, got) < 1e-6


def test_one_round_run_writes_metrics(setup, tmp_path):
  cfg = setup["cfg"]
  shutil.copy(setup["work"] / "tokenizer.json", tmp_path / "tokenizer.json")
  summary = pb.run_baseline(cfg, tmp_path, threads=2)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(rows) == 1
  row = rows[0]
  assert row["round"] == 1 and row["method"] == pb.METHOD
  assert 0.0 <= row["test_accuracy"] <= 1.0
  assert np.isfinite(row["train_loss"]) and row["round_time_s"] > 0
  assert summary["final_test_accuracy"] == row["test_accuracy"]
  assert (tmp_path / "hf_init" / "config.json").is_file()


def test_router_losses_match_fedalign_definition():
  """Padded tokens are ignored and the value is E * sum_e f_e P_e averaged over layers."""
  torch.manual_seed(0)
  logits = (torch.randn(6, 4), torch.randn(6, 4))
  mask = torch.tensor([[True, True, True, True, False, False]])
  lb, z = pb.router_losses(logits, mask, 2)
  expect_lb, expect_z = [], []
  for lg in logits:
    lg = lg[:4]
    p = torch.softmax(lg, -1)
    sel = torch.zeros(4)
    for row in torch.topk(p, 2, -1).indices:
      sel[row] += 1
    expect_lb.append(4 * torch.sum(sel / 4 * p.mean(0)))
    expect_z.append(torch.mean(torch.logsumexp(lg, -1) ** 2))
  assert abs(float(lb) - float(torch.stack(expect_lb).mean())) < 1e-6
  assert abs(float(z) - float(torch.stack(expect_z).mean())) < 1e-5


def test_compare_times_fedalign_round_built_by_build_run(setup, tmp_path):
  run_round = cp.make_fedalign_round(setup["cfg"], setup["data"], tmp_path)
  assert run_round(0) > 0 and run_round(1) > 0


def fake_compare_result():
  rows = lambda acc, loss, t: [
      {
          "round": r + 1,
          "test_accuracy": acc + 0.01 * r,
          "train_loss": loss - 0.1 * r,
          "round_time_s": t * (3 if r == 0 else 1),
      }
      for r in range(3)
  ]
  cfg = tiny_config().to_dict()
  inter_rows = [
      {
          "round": r + 2,
          "order": ["jax", "torch2", "torch1"],
          "jax": 1.0,
          "torch2": 2.0,
          "torch1": 1.5,
          "loadavg_1min": 1.0,
      }
      for r in range(2)
  ]
  return {
      "command": "python -m experiments.compare_pytorch --config=configs/default.py",
      "machine": {
          "cpu": "cpu",
          "cores": 2,
          "python": "3",
          "torch": "t",
          "transformers": "tf",
          "jax": "j",
          "jax_backend": "cpu",
          "jax_devices": 1,
          "flax": "f",
          "optax": "o",
          "numpy": "n",
          "omp_wait_policy": "PASSIVE",
      },
      "loadavg": {k: (1.0, 1.0, 1.0) for k in ("start", "between", "after_runs", "end")},
      "wall_s": {"jax": 1.0, "torch": 1.0, "interleaved": 1.0, "total": 3.0},
      "timing": cp.timing_summary(rows(0.3, 2.0, 1.0), rows(0.31, 2.0, 2.0)),
      "interleaved": {
          "warmup": {"jax": 5.0, "torch2": 2.0, "torch1": 1.5},
          "rows": inter_rows,
          "median_s": {"jax": 1.0, "torch2": 2.0, "torch1": 1.5},
          "median_ratio": {"torch2": 2.0, "torch1": 1.5},
          "torch_threads": [2, 1],
      },
      "jax": rows(0.3, 2.0, 1.0),
      "torch": rows(0.31, 2.0, 2.0),
      "seed_noise": [{"seed": 1, "rows": rows(0.25, 2.1, 1.0)}],
      "torch_threads": 2,
      "attn_implementation": "sdpa",
      "experts_implementation": "grouped_mm",
      "client_sizes": [200, 200],
      "config": cfg,
  }


def test_report_is_tables_and_points_to_the_reading():
  md = cp.render_markdown(fake_compare_result())
  assert "docs/pytorch_comparison.md" in md
  assert (REPO / "docs" / "pytorch_comparison.md").is_file()
  assert "| round | fedalign acc | PyTorch acc |" in md
  assert "| 1 | 0.3000 | 0.3100 | +0.0100 |" in md
  assert "**2.00**" in md and "python -m experiments.compare_pytorch" in md
  assert "Why" not in md  # the prose lives in docs/pytorch_comparison.md

"""Paper setup: federated LoRA fine-tuning of DeepSeek-MoE-16B on HellaSwag (FedAlign-MoE, sec. 6).

Command (a local copy of deepseek-ai/deepseek-moe-16b-base is required; nothing is downloaded
at run time)::

    python -m fedalign.main --config=configs/paper/hellaswag_deepseek_moe16b_lora.py \\
        --config.model.hf_checkpoint=/path/to/deepseek-moe-16b-base --workdir=/tmp/hs_ds16_a0.1

Model, checkpoint directory, LoRA, optimiser and federated setup are those of
``mmlu_deepseek_moe16b_lora.py`` (both are built by ``_deepseek_moe16b_lora.py``; the MMLU
config's docstring describes the checkpoint layout and the shared choices). Leaving
``model.hf_checkpoint`` unset is an error that names it. ``data.data_dir`` defaults to
``<repo>/../shared/data/hellaswag``.

Setup [paper]: DeepSeek-MoE-16B with LoRA, 10 clients, Dirichlet alpha = 0.1, 25 rounds,
1 local epoch, AdamW, learning rate 1e-4, lambda = 0.1. Paper accuracy (FedAvg /
FedAlign-MoE): 0.521 / 0.585 at alpha = 0.1, 0.717 / 0.753 at alpha = 1.0
(``--config.data.alpha=1.0`` and a new ``--workdir``).
[ours]: only HellaSwag's validation split (10,042 rows) exists offline, so it is cut by a fixed,
seed-independent rule: the last 20% of each activity label's rows (file order; labels with
fewer than 5 rows are training-only) are held out (1,931 rows), the rest are the federated
training pool (8,111 rows) - see :mod:`fedalign.data.multiple_choice`. The Dirichlet "label"
is the ``activity_label`` (192 groups, from 1 to 2,627 rows each), not the answer index;
per-client accuracy weights the per-activity test accuracy by each client's activity mix.
Prompt ``"{activity_label}: {ctx}"``, trained with the LM loss on the correct ending only,
evaluated by scoring the 4 endings with ``acc_norm`` (log-likelihood per character, the
lm-evaluation-harness metric for HellaSwag; ``--config.eval.mc_metric=acc`` for the
unnormalised one). 192 tokens (no row is longer at ~4 characters per token; ~50% of the slots
are padding), batch 8, LoRA rank 8, dropless block-sparse experts (blocks of 64), evaluation
every 5 rounds.

Accuracy of this code: not measured here (no accelerator); the paper's numbers are above.

Accelerator memory and time (estimates, NOT measured on an accelerator; activation and FLOP
figures from XLA's accounting of one compiled training step on CPU, as in the MMLU config):

* Weights 32.8 GB (16.4B, bfloat16), LoRA adapters 147.0M parameters (0.29 GB), one client's
  training state ~1.2 GB, the round's 10 deltas ~3 GB (details in the MMLU config).
* Activations at batch 8 x 192 tokens (1,536 tokens x top-6 = 9,216 routed rows per step,
  in 207 blocks of 64 rows): 0.89 GB per MoE layer with float32 activations (an upper
  figure; linear in the tokens per step), ~24 GB for the 27 MoE layers + ~1.7 GB for the rest
  (float32 logits 1,536 x 102,400), plus ~5.6 GB (float32) of transient per-block expert
  weights (capacity dispatch at 1.25: 0.90 GB per MoE layer, no transient weights).
* Peak ~60-70 GB with ``train.chunk_size=1``: one 80 GB H100 (or A100-80GB);
  ``--config.train.batch_size=4`` needs ~50 GB. Mesh: none (one device); several devices as
  in the MMLU config. Per device with the 2-D mesh (``--config.train.use_mesh=True
  --config.train.mesh_shape=clients:1,experts:K``; XLA's memory analysis on fake CPU devices,
  ``benchmarks/paper_memory.py --batch 8 --seq 192 --block_size 64 --dtype bfloat16
  --experts K``, expert parallel): 1 device 33.1 GB weights + 32.2 GB temp = 65.3 GB; 8 x H100
  (``experts:8``) 6.6 + 26.0 = 32.6 GB; v4-32 / v5e-16 (``experts:16``) 4.8 + 25.8 = 30.6 GB
  (docs/scaling.md).
* Time, FLOP basis ~2.8B active parameters per token: XLA counts 13.2 GFLOP per training
  token (12.1 with capacity dispatch). A round is one epoch over 8,111 x 192 tokens = 1.56M
  tokens, ~2.1e16 FLOP: 50-140 s on one H100 at 15-40% of its bfloat16 peak; the weight
  gathers (XLA: ~1,220 GB accessed per step in float32 accounting, against ~420 GB with
  capacity dispatch) may make it ~3 min per round instead (1,014 steps at ~3.3 TB/s), ~3x
  capacity dispatch (``--config.model.capacity_factor=1.25``; see the MMLU config). An
  evaluation (1,931 x 4 x 192 tokens) ~1e16 FLOP, 25-65 s. 25 rounds + 5 evaluations:
  ~25-90 min, plus compilation (5-15 min) and checkpoint writes (~33 GB each); within a
  factor ~3.

Tiny variant that runs on CPU in seconds (random 2-layer DeepSeek-MoE, LoRA rank 4, BPE on the
clients' text, 400 / 100 questions, 4 clients, 2 rounds; run by tests/test_paper_configs.py)::

    python -m fedalign.main --config=configs/paper/hellaswag_deepseek_moe16b_lora.py:runlocal \\
        --workdir=/tmp/hellaswag_ds_tiny
"""

import pathlib

import ml_collections

from fedalign.config_files import load_module


def _builder():
  return load_module(pathlib.Path(__file__).resolve().parent / "_deepseek_moe16b_lora.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The paper's DeepSeek-MoE-16B HellaSwag setup; ``get_config('runlocal')``: tiny variant.

  >>> c = get_config('runlocal')  # doctest: +SKIP
  >>> c.data.dataset, c.eval.mc_metric  # doctest: +SKIP
  ('hellaswag', 'acc_norm')
  """
  return _builder().build(
      "hellaswag",
      arg,
      seq_len=192,
      batch_size=8,
      eval_batch_size=32,
      mc_metric="acc_norm",
      runlocal_seq_len=128,
  )

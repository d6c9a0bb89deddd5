"""Expert specialisation of a pre-trained checkpoint vs the same architecture at random init.

For each MoE layer: the mutual information I(expert; domain) between the routed experts of a
token and the domain of its text (Dolly / MMLU / HellaSwag / AG News), and within Dolly by
instruction category (8 categories), and by AG News topic (the four topics that split the
clients of configs/domain.py: what that setting's premise needs); the routing entropy
H(expert) (nats; log E is uniform) and H(expert | domain); and per-domain routing heatmaps
(fraction of each domain's top-k choices that go to each expert). The checkpoint's own tokenizer encodes every text; the random-init
model (seed 0) uses the same tokenizer and architecture.

Samples (fixed, seed 0): ``--docs`` documents per domain (the first ``--seq_len`` tokens of
each, ``<bos>`` first); Dolly categories ``--docs`` // 2 each. Dolly / MMLU / HellaSwag
documents are pre-training documents (the pre-training holds out windows, not documents);
AG News (never pre-trained on) comes from the embedded test split.

Command (docs/pretraining.md; ``--data_dir`` = ../shared/data)::

    python -m experiments.pretraining_report --data_dir=/work/shared/data \\
        --out=docs/pretraining.md --tries=step_500=/tmp/moe-small/step_500,...

``--tries`` adds rows (name=checkpoint) to the table of tries (the layer-mean MI of each).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from typing import Any

import numpy as np

from fedalign.reports import write_generated_block

DOMAINS = ("dolly", "mmlu", "hellaswag", "agnews")


def domain_texts(data_dir: str, docs: int, seed: int = 0) -> tuple[dict, dict]:
  """({domain: texts}, {dolly category: texts}), fixed samples."""
  from fedalign.data import sources as src
  from fedalign.data.agnews import load_embedded_agnews

  rng = np.random.default_rng(seed)
  data = pathlib.Path(data_dir)

  def pick(items, n):
    idx = rng.choice(len(items), min(n, len(items)), replace=False)
    return [items[i] for i in sorted(idx)]

  dolly = [
      r for s in src.dolly_splits(data / "dolly") for r in src.read_dolly(data / "dolly", s).records
  ]
  dolly_text = lambda r: "\n".join(
      t for t in (r["instruction"], r["context"], r["response"]) if t.strip()
  )
  mmlu = [
      r for s in src.mmlu_splits(data / "mmlu") for r in src.read_mmlu(data / "mmlu", s).records
  ]
  hs = src.read_hellaswag(data / "hellaswag").records
  ag = load_embedded_agnews()[1]
  out = {
      "dolly": [dolly_text(r) for r in pick(dolly, docs)],
      "mmlu": [r["question"] + "\n" + "\n".join(r["choices"]) for r in pick(mmlu, docs)],
      "hellaswag": [r["ctx"] + " " + r["endings"][r["label"]] for r in pick(hs, docs)],
      "agnews": pick(list(ag.text), docs),
  }
  cats = {}
  for c in src.DOLLY_CATEGORIES:
    cats[c] = [dolly_text(r) for r in pick([r for r in dolly if r["category"] == c], docs // 2)]
  return out, cats


def topic_texts(docs: int, seed: int = 0) -> dict[str, list[str]]:
  """{AG News topic: texts}: ``docs`` // 2 fixed texts per topic from the embedded test split.

  >>> {k: len(v) for k, v in topic_texts(8).items()}
  {'World': 4, 'Sports': 4, 'Business': 4, 'Sci/Tech': 4}
  """
  from fedalign.data.agnews import AGNEWS_CLASSES, load_embedded_agnews

  rng = np.random.default_rng(seed)
  test = load_embedded_agnews()[1]
  labels = np.asarray(test.label)
  out = {}
  for k, name in enumerate(AGNEWS_CLASSES):
    rows = np.flatnonzero(labels == k)
    pick = np.sort(rng.choice(rows, min(docs // 2, len(rows)), replace=False))
    out[name] = [test.text[i] for i in pick]
  return out


def encode(tok: Any, texts: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  ids = [[tok.bos_id] + list(t)[: seq_len - 1] for t in tok.encode(texts)]
  tokens = np.zeros((len(ids), seq_len), np.int32)
  mask = np.zeros((len(ids), seq_len), bool)
  for i, row in enumerate(ids):
    tokens[i, : len(row)] = row
    mask[i, : len(row)] = True
  return tokens, mask


def selection_tables(
    model_cfg: Any, params: Any, groups: dict[str, tuple]
) -> dict[str, np.ndarray]:
  """{moe layer: (groups x experts) top-k selection counts}."""
  import jax
  import jax.numpy as jnp

  from fedalign.models import build_module

  module = build_module(model_cfg)
  fn = jax.jit(lambda p, t, m: module.apply({"params": p}, t, m)[1]["routing"])
  tables: dict[str, list] = {}
  for tokens, mask in groups.values():
    total: dict[str, np.ndarray] = {}
    for i in range(0, len(tokens), 64):
      r = fn(params, jnp.asarray(tokens[i : i + 64]), jnp.asarray(mask[i : i + 64]))
      for layer, s in r.items():
        total[layer] = total.get(layer, 0) + np.asarray(s["select_count"], np.float64)
    for layer, c in total.items():
      tables.setdefault(layer, []).append(c)
  return {k: np.stack(v) for k, v in sorted(tables.items())}


def mi_entropy(table: np.ndarray) -> tuple[float, float, float]:
  """(I(expert; group), H(expert), H(expert | group)) in nats of a count table."""
  joint = table / table.sum()
  pg = joint.sum(1, keepdims=True)
  pe = joint.sum(0, keepdims=True)
  nz = joint > 0
  mi = float(np.sum(joint[nz] * np.log(joint[nz] / (pg * pe)[nz])))
  h = float(-np.sum(pe[pe > 0] * np.log(pe[pe > 0])))
  return mi, h, h - mi


def analyse(checkpoint: str, data_dir: str, docs: int, seq_len: int) -> dict[str, Any]:
  """Tables and metrics of a checkpoint and of its architecture at random init."""
  from fedalign.data.tokenize import HFTokenizer
  from fedalign.models import init_params
  from fedalign.models.hf import load_pretrained

  model = load_pretrained(checkpoint)
  tok = HFTokenizer.from_file(checkpoint)
  domains, cats = domain_texts(data_dir, docs)
  g_dom = {k: encode(tok, v, seq_len) for k, v in domains.items()}
  g_cat = {k: encode(tok, v, seq_len) for k, v in cats.items()}
  g_top = {k: encode(tok, v, seq_len) for k, v in topic_texts(docs).items()}
  out: dict[str, Any] = {"config": model.config, "domains": list(g_dom), "categories": list(g_cat)}
  for label, params in (
      ("trained", model.params),
      ("random", init_params(model.config, 0, seq_len)),
  ):
    dom = selection_tables(model.config, params, g_dom)
    cat = selection_tables(model.config, params, g_cat)
    top = selection_tables(model.config, params, g_top)
    out[label] = {
        layer: {
            "domain": mi_entropy(dom[layer]),
            "category": mi_entropy(cat[layer]),
            "topic": mi_entropy(top[layer]),
            "domain_table": dom[layer],
        }
        for layer in dom
    }
  return out


def heatmap(result: dict[str, Any], path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  layers = list(result["trained"])
  fig, axes = plt.subplots(2, len(layers), figsize=(4.2 * len(layers), 4.6), squeeze=False)
  for row, label in enumerate(("trained", "random")):
    for j, layer in enumerate(layers):
      t = result[label][layer]["domain_table"]
      frac = t / t.sum(1, keepdims=True)
      ax = axes[row, j]
      im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.25, frac.max()))
      ax.set_yticks(range(len(result["domains"])), result["domains"])
      ax.set_xlabel("expert")
      mi = result[label][layer]["domain"][0]
      ax.set_title(f"{label}: {layer} (MI {mi:.3f})", fontsize=9)
      fig.colorbar(im, ax=ax, fraction=0.046)
  fig.suptitle(title + ": share of each domain's top-k choices per expert", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def layer_mean(result: dict[str, Any], label: str, key: str) -> float:
  return float(np.mean([v[key][0] for v in result[label].values()]))


def main() -> None:
  import fedalign.pretrained as shipped

  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--checkpoint", default="", help="default: the shipped moe-small")
  ap.add_argument("--data_dir", required=True)
  ap.add_argument("--docs", type=int, default=256)
  ap.add_argument("--seq_len", type=int, default=64)
  ap.add_argument("--out", default="docs/pretraining.md")
  ap.add_argument("--plots", default="docs/plots/pretraining")
  ap.add_argument("--tries", default="", help="name=checkpoint,... rows of the table of tries")
  args = ap.parse_args()
  ckpt = args.checkpoint or str(shipped.path("moe-small"))
  res = analyse(ckpt, args.data_dir, args.docs, args.seq_len)
  plots = pathlib.Path(args.plots).resolve()
  plots.mkdir(parents=True, exist_ok=True)
  heatmap(res, plots / "routing_heatmap.png", "moe-small")
  info_file = pathlib.Path(ckpt) / "pretrain_info.json"
  info = json.loads(info_file.read_text()) if info_file.exists() else {}
  cfg = res["config"]
  lines = [
      f"Checkpoint `{os.path.relpath(ckpt)}`: {cfg.family}, hidden {cfg.hidden_size}, {cfg.num_layers} layers "
      f"(MoE layers {list(cfg.moe_layer_ids)}), {cfg.num_experts} routed experts of "
      f"{cfg.moe_intermediate_size}, top-{cfg.top_k}, shared expert "
      f"{cfg.shared_expert_intermediate_size}, vocab {cfg.vocab_size}.",
      f"Samples: {args.docs} documents per domain, {args.docs // 2} per Dolly category and per "
      f"AG News topic (embedded test split), the first {args.seq_len} tokens of each; "
      "random init = the same architecture, seed 0. "
      f"Nats; H(expert) is at most log {cfg.num_experts} = {np.log(cfg.num_experts):.3f}.",
      "",
      "| layer | model | I(expert; domain) | I(expert; Dolly category) | I(expert; AG News topic) "
      "| H(expert) | H(expert \\| domain) |",
      "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for layer in res["trained"]:
    for label in ("trained", "random"):
      d, c = res[label][layer]["domain"], res[label][layer]["category"]
      t = res[label][layer]["topic"]
      lines.append(
          f"| {layer} | {label} | {d[0]:.4f} | {c[0]:.4f} | {t[0]:.4f} | {d[1]:.3f} | {d[2]:.3f} |"
      )
  for label in ("trained", "random"):
    lines.append(
        f"| mean | {label} | {layer_mean(res, label, 'domain'):.4f} | "
        f"{layer_mean(res, label, 'category'):.4f} | {layer_mean(res, label, 'topic'):.4f} | | |"
    )
  rel = os.path.relpath(plots / "routing_heatmap.png", pathlib.Path(args.out).resolve().parent)
  lines += ["", f"![routing heatmaps]({rel})", ""]
  if args.tries:
    lines += [
        "Tries (layer-mean MI, trained / the same architecture at random init; held-out loss "
        "from each checkpoint's pretrain_info.json when it has one):",
        "",
        "| checkpoint | experts | I(expert; domain) | I(expert; Dolly category) | "
        "I(expert; AG News topic) | held-out loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for item in args.tries.split(","):
      name, path = item.split("=", 1)
      r = analyse(path, args.data_dir, args.docs, args.seq_len)
      f = pathlib.Path(path) / "pretrain_info.json"
      loss = json.loads(f.read_text()).get("validation_loss_after") if f.exists() else None
      both = lambda key: (
          f"{layer_mean(r, 'trained', key):.4f} / {layer_mean(r, 'random', key):.4f}"
      )
      rc = r["config"]
      lines.append(
          f"| {name} | {rc.num_experts} of {rc.moe_intermediate_size}, top-{rc.top_k} | "
          f"{both('domain')} | {both('category')} | {both('topic')} | "
          f"{'' if loss is None else f'{loss:.3f}'} |"
      )
  if info:
    lines = [
        f"Pre-training record (`pretrain_info.json`): {info.get('documents')} documents, "
        f"{info.get('tokens_seen', 0) / 1e6:.1f}M tokens seen ({info.get('epochs', 0):.2f} "
        f"epochs), held-out loss {info.get('validation_loss_before', 0):.3f} -> "
        f"{info.get('validation_loss_after', 0):.3f}, wall time "
        f"{info.get('wall_time_s', 0) / 60:.1f} min.",
        "",
    ] + lines
  text = "\n".join(lines) + "\n"
  write_generated_block(args.out, "experiments/pretraining_report.py", text)
  print(text)
  if info:
    print(
        "held-out loss", info.get("validation_loss_before"), "->", info.get("validation_loss_after")
    )


if __name__ == "__main__":
  main()

"""Turn text examples into fixed-length token arrays for training and evaluation.

Conventions (shared with :mod:`fedalign.data.batching` and :mod:`fedalign.metrics.evaluation`):

* ``tokens`` int32, right-padded with the tokenizer's ``pad_id``; ``mask`` bool marks real
  tokens. BOS is prepended when ``add_bos`` and the tokenizer has one.
* ``target_mask`` bool marks the tokens that are scored: token ``t`` is predicted by the logits
  at position ``t - 1`` (causal LM), so position 0 is never a target.
* Long inputs are truncated from the **left of the text** (the oldest tokens go); the template's
  fixed parts (e.g. ``"\\nTopic:"``) and the target (label word, option) are never truncated.

Classification has two formats (``mode``):

* ``"label_word"`` (a) - default and what the configs use: BOS + prompt + label-word tokens,
  ``target_mask`` on the label word; trained with the LM loss and evaluated by label-word
  scoring. AG News: ``"{text}\\nTopic:"`` + one of ``" World"``, ``" Sports"``, ``" Business"``,
  ``" Tech"``, ``max_len`` ~64.
* ``"head"`` (b) - BOS + prompt only, for a classification head on the hidden state at
  ``last_index``; ``target_mask`` is all False.

Both give ``labels`` (N,) int32 and ``last_index`` (N,) (position of the last prompt token).

Language modelling on the same texts (``data.task = 'lm'``, the domain-heterogeneous setting:
clients differ by topic, the task does not name it): :func:`format_lm` gives BOS + the text,
``target_mask`` on every text token; long texts are cut from the **right** (the first
``max_len`` tokens are kept, so every row starts at its text's beginning); ``labels`` stay the
topics (for partitioning and per-topic metrics only).

Encoder-decoder (text-to-text, Switch / T5) classification: :func:`format_seq2seq_classification`
puts the prompt (``template`` around the text, + EOS) in the encoder input ``tokens``/``mask``
and the label word (+ EOS) in the decoder target ``target_tokens``/``target_mask``;
:func:`seq2seq_label_candidates` gives every label word's target, scored as a whole sequence
at evaluation (:func:`fedalign.metrics.evaluation.make_seq2seq_classification_evaluator`).

Example:
    >>> from fedalign.data.tokenize import ByteTokenizer
    >>> ex = format_classification(["Goal!"], [1], ByteTokenizer(), max_len=24)
    >>> ex["tokens"].shape, int(ex["target_mask"].sum()), ex["labels"].tolist()
    ((1, 24), 7, [1])
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from fedalign.data.agnews import AGNEWS_LABEL_WORDS, AGNEWS_TEMPLATE
from fedalign.data.tokenize import Tokenizer

log = logging.getLogger(__name__)

Examples = dict[str, np.ndarray]

#: AG News label words for text-to-text models: the target starts the decoder, so no leading
#: space (T5's SentencePiece adds its own word-start marker).
AGNEWS_SEQ2SEQ_LABEL_WORDS: tuple[str, ...] = ("World", "Sports", "Business", "Tech")
MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
MMLU_OPTIONS: tuple[str, ...] = (" A", " B", " C", " D")
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n{context}### Response:\n"


def _split_template(template: str) -> tuple[str, str]:
  if template.count("{text}") != 1:
    raise ValueError(f"template must contain '{{text}}' exactly once, got {template!r}")
  prefix, suffix = template.split("{text}")
  return prefix, suffix


def _bos(tokenizer: Tokenizer, add_bos: bool) -> list[int]:
  return [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []


def _fit(
    head: list[int], text: list[int], tail: list[int], target: list[int], max_len: int
) -> tuple[list[int], int, bool]:
  """head + text (left-truncated) + tail + target within max_len -> (seq, target_start, cut)."""
  room = max_len - len(head) - len(tail) - len(target)
  if room < 0:
    raise ValueError(
        f"max_len={max_len} is too small for the fixed prompt parts ({len(head)} + "
        f"{len(tail)} tokens) plus the target ({len(target)} tokens): raise max_len."
    )
  cut = len(text) > room
  kept = text[len(text) - room :] if room else []
  seq = head + kept + tail
  return seq + target, len(seq), cut


def label_word_ids(tokenizer: Tokenizer, label_words: Sequence[str]) -> list[list[int]]:
  """Token ids of each label word (encoded on its own, after the prompt).

  >>> from fedalign.data.tokenize import ByteTokenizer
  >>> label_word_ids(ByteTokenizer(), [" a"])
  [[35, 100]]
  """
  ids = tokenizer.encode(list(label_words))
  for w, i in zip(label_words, ids):
    if not i:
      raise ValueError(f"label word {w!r} encodes to no tokens")
  return ids


def single_token_ids(tokenizer: Tokenizer, label_words: Sequence[str]) -> np.ndarray:
  """(K,) ids of label words that are single tokens; ValueError if one is not.

  Multi-token label words are scored as sequences with :func:`format_label_word_choices`
  and ``multiple_choice_eval`` instead.
  """
  ids = label_word_ids(tokenizer, label_words)
  multi = [w for w, i in zip(label_words, ids) if len(i) != 1]
  if multi:
    raise ValueError(
        f"label words {multi} are not single tokens for this tokenizer: use "
        "format_label_word_choices + multiple_choice_eval, or train the BPE with "
        "added_tokens=label_words."
    )
  return np.array([i[0] for i in ids], dtype=np.int32)


def _check_labels(labels: Sequence[int], k: int, what: str) -> np.ndarray:
  y = np.asarray(labels, dtype=np.int64)
  if y.size and (y.min() < 0 or y.max() >= k):
    bad = y[(y < 0) | (y >= k)][0]
    raise ValueError(f"labels contain {bad}, outside 0..{k - 1} ({what})")
  return y.astype(np.int32)


def format_classification(
    texts: Sequence[str],
    labels: Sequence[int],
    tokenizer: Tokenizer,
    *,
    label_words: Sequence[str] = AGNEWS_LABEL_WORDS,
    template: str = AGNEWS_TEMPLATE,
    max_len: int = 64,
    add_bos: bool = True,
    mode: str = "label_word",
) -> Examples:
  """Formats a classification set for a causal LM (see the module docstring).

  Returns:
    ``tokens`` (N, max_len) int32, ``mask``, ``target_mask`` (N, max_len) bool,
    ``labels`` (N,) int32, ``last_index`` (N,) int32.
  """
  if mode not in ("label_word", "head"):
    raise ValueError(f"mode must be 'label_word' or 'head', got {mode!r}")
  if len(texts) != len(labels):
    raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
  y = _check_labels(labels, len(label_words), f"{len(label_words)} label words")
  prefix, suffix = _split_template(template)
  head = _bos(tokenizer, add_bos) + (tokenizer.encode([prefix])[0] if prefix else [])
  tail = tokenizer.encode([suffix])[0] if suffix else []
  words = label_word_ids(tokenizer, label_words)
  body = tokenizer.encode(list(texts))
  n = len(body)
  tokens = np.full((n, max_len), tokenizer.pad_id, dtype=np.int32)
  mask = np.zeros((n, max_len), dtype=bool)
  target = np.zeros((n, max_len), dtype=bool)
  last = np.zeros(n, dtype=np.int32)
  cut = 0
  for i in range(n):
    tgt = words[y[i]] if mode == "label_word" else []
    seq, start, c = _fit(head, body[i], tail, tgt, max_len)
    cut += c
    tokens[i, : len(seq)] = seq
    mask[i, : len(seq)] = True
    target[i, start : len(seq)] = True
    last[i] = start - 1
  if cut:
    log.info("format_classification: %d of %d texts truncated to max_len=%d", cut, n, max_len)
  return {"tokens": tokens, "mask": mask, "target_mask": target, "labels": y, "last_index": last}


def format_lm(
    texts: Sequence[str],
    labels: Sequence[int],
    tokenizer: Tokenizer,
    *,
    num_labels: int,
    max_len: int = 64,
    add_bos: bool = True,
) -> Examples:
  """Formats texts for next-token language modelling (``data.task = 'lm'``).

  Each row is BOS + the text's first ``max_len - 1`` tokens (cut from the right), with
  ``target_mask`` on every text token (token ``t`` is predicted from position ``t - 1``).
  ``labels`` (the topics, in ``[0, num_labels)``) are kept for partitioning and per-topic
  metrics; nothing in the tokens names them.

  >>> from fedalign.data.tokenize import ByteTokenizer
  >>> ex = format_lm(["Goal!", "a"], [1, 0], ByteTokenizer(), num_labels=4, max_len=4)
  >>> ex["target_mask"].sum(1).tolist(), ex["mask"].sum(1).tolist(), ex["labels"].tolist()
  ([3, 1], [4, 2], [1, 0])
  """
  y = _check_labels(labels, num_labels, f"{num_labels} labels")
  if len(texts) != len(y):
    raise ValueError(f"{len(texts)} texts but {len(y)} labels")
  head = _bos(tokenizer, add_bos)
  if max_len <= len(head):
    raise ValueError(f"max_len={max_len} leaves no room for text after BOS: raise max_len.")
  body = tokenizer.encode(list(texts))
  n = len(body)
  tokens = np.full((n, max_len), tokenizer.pad_id, dtype=np.int32)
  mask = np.zeros((n, max_len), dtype=bool)
  target = np.zeros((n, max_len), dtype=bool)
  room = max_len - len(head)
  cut = 0
  for i, b in enumerate(body):
    cut += len(b) > room
    seq = head + list(b[:room])
    tokens[i, : len(seq)] = seq
    mask[i, : len(seq)] = True
    target[i, len(head) : len(seq)] = True
  if cut:
    log.info("format_lm: %d of %d texts cut to max_len=%d", cut, n, max_len)
  return {"tokens": tokens, "mask": mask, "target_mask": target, "labels": y}


def seq2seq_label_candidates(
    tokenizer: Tokenizer, label_words: Sequence[str], *, add_eos: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """Decoder targets of the K label words: ``(ids (K, L) int32, mask (K, L) bool)``.

  Each label word is tokenized on its own, never truncated (multi-token words keep every
  token), followed by EOS when ``add_eos`` and the tokenizer has one, and right-padded with
  ``pad_id`` to the longest. These are exactly the targets
  :func:`format_seq2seq_classification` trains on.

  >>> from fedalign.data.tokenize import ByteTokenizer
  >>> ids, mask = seq2seq_label_candidates(ByteTokenizer(), ["a", "bc"])
  >>> ids.tolist(), mask.sum(-1).tolist()
  ([[100, 2, 0], [101, 102, 2]], [2, 3])
  """
  from fedalign.models.switch import pack_targets

  eos = tokenizer.eos_id if add_eos else None
  return pack_targets(label_word_ids(tokenizer, label_words), pad_id=tokenizer.pad_id, eos_id=eos)


def format_seq2seq_classification(
    texts: Sequence[str],
    labels: Sequence[int],
    tokenizer: Tokenizer,
    *,
    label_words: Sequence[str] = AGNEWS_SEQ2SEQ_LABEL_WORDS,
    template: str = AGNEWS_TEMPLATE,
    max_len: int = 64,
    target_len: int | None = None,
    add_eos: bool = True,
) -> Examples:
  """Formats a classification set for an encoder-decoder (text-to-text) model.

  Encoder input: ``template`` with ``{text}`` filled (the text truncated from its left when
  too long; the template's fixed parts are kept), then EOS when ``add_eos`` and the tokenizer
  has one (T5 inputs end with ``</s>``). No BOS. Decoder target: the label word's tokens
  (+ EOS), never truncated - a ``target_len`` too short for a label word is an error.

  Args:
    texts, labels: N examples, labels in ``0..len(label_words)-1``.
    tokenizer: any :class:`~fedalign.data.tokenize.Tokenizer`.
    label_words: the target text of each class.
    template: prompt with ``{text}`` once.
    max_len: encoder length T.
    target_len: decoder length L; None = the longest label word (+ EOS).
    add_eos: append EOS to the encoder input and to the target.

  Returns:
    ``tokens`` (N, T) int32, ``mask`` (N, T) bool, ``target_tokens`` (N, L) int32,
    ``target_mask`` (N, L) bool, ``labels`` (N,) int32.

  >>> from fedalign.data.tokenize import ByteTokenizer
  >>> ex = format_seq2seq_classification(["Goal!"], [1], ByteTokenizer(), max_len=16,
  ...                                    label_words=["World", "Sports"])
  >>> ex["tokens"].shape, ex["target_tokens"].shape, int(ex["target_mask"].sum())
  ((1, 16), (1, 7), 7)
  """
  if len(texts) != len(labels):
    raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
  y = _check_labels(labels, len(label_words), f"{len(label_words)} label words")
  cand, cand_mask = seq2seq_label_candidates(tokenizer, label_words, add_eos=add_eos)
  longest = int(cand_mask.sum(-1).max())
  if target_len is None:
    target_len = longest
  elif target_len < longest:
    word = label_words[int(np.argmax(cand_mask.sum(-1)))]
    raise ValueError(
        f"target_len={target_len} is too small for label word {word!r} ({longest} tokens "
        f"with EOS): label words are never truncated; raise target_len."
    )
  prefix, suffix = _split_template(template)
  head = tokenizer.encode([prefix])[0] if prefix else []
  tail = tokenizer.encode([suffix])[0] if suffix else []
  eos = [tokenizer.eos_id] if add_eos and tokenizer.eos_id is not None else []
  body = tokenizer.encode(list(texts))
  n = len(body)
  tokens = np.full((n, max_len), tokenizer.pad_id, dtype=np.int32)
  mask = np.zeros((n, max_len), dtype=bool)
  cut = 0
  for i in range(n):
    seq, _, c = _fit(head, body[i], tail, eos, max_len)
    cut += c
    tokens[i, : len(seq)] = seq
    mask[i, : len(seq)] = True
  if cut:
    log.info(
        "format_seq2seq_classification: %d of %d texts truncated to max_len=%d", cut, n, max_len
    )
  width = cand.shape[1]
  target = np.full((n, target_len), tokenizer.pad_id, dtype=np.int32)
  target_mask = np.zeros((n, target_len), dtype=bool)
  target[:, :width] = cand[y]
  target_mask[:, :width] = cand_mask[y]
  return {
      "tokens": tokens,
      "mask": mask,
      "target_tokens": target,
      "target_mask": target_mask,
      "labels": y,
  }


def format_multiple_choice(
    contexts: Sequence[str],
    options: Sequence[Sequence[str]],
    labels: Sequence[int],
    tokenizer: Tokenizer,
    *,
    max_len: int,
    add_bos: bool = True,
    prefixes: Sequence[str] | None = None,
    suffix: str = "",
) -> Examples:
  """Formats N questions with K options each as (N, K, max_len) scoring sequences.

  Sequence (n, k) = BOS + prefixes[n] + contexts[n] (left-truncated) + suffix + options[n][k];
  ``target_mask`` marks the option tokens. The context and each option are encoded
  separately, so an option's tokens are the same whatever precedes it.

  Returns:
    ``tokens``, ``mask``, ``target_mask`` (N, K, T); ``option_chars`` (N, K) float32 (length
    in characters of each option string, for ``acc_norm``); ``option_tokens`` (N, K) int32;
    ``labels`` (N,) int32.

  >>> from fedalign.data.tokenize import ByteTokenizer
  >>> mc = format_multiple_choice(["1+1="], [[" 2", " 3"]], [0], ByteTokenizer(), max_len=12)
  >>> mc["tokens"].shape, mc["option_chars"].tolist()
  ((1, 2, 12), [[2.0, 2.0]])
  """
  n = len(contexts)
  if len(options) != n or len(labels) != n:
    raise ValueError(f"{n} contexts, {len(options)} option lists, {len(labels)} labels")
  k = len(options[0]) if n else 0
  if any(len(o) != k for o in options):
    raise ValueError("every question must have the same number of options")
  y = _check_labels(labels, k, f"{k} options")
  bos = _bos(tokenizer, add_bos)
  ctx = tokenizer.encode(list(contexts))
  pre = tokenizer.encode(list(prefixes)) if prefixes is not None else [[] for _ in range(n)]
  tail = tokenizer.encode([suffix])[0] if suffix else []
  flat_opts = [o for opts in options for o in opts]
  opt_ids = tokenizer.encode(flat_opts)
  tokens = np.full((n, k, max_len), tokenizer.pad_id, dtype=np.int32)
  mask = np.zeros((n, k, max_len), dtype=bool)
  target = np.zeros((n, k, max_len), dtype=bool)
  chars = np.array([len(o) for o in flat_opts], dtype=np.float32).reshape(n, k)
  ntok = np.zeros((n, k), dtype=np.int32)
  cut_ctx = cut_opt = 0
  for i in range(n):
    head = bos + pre[i]
    for j in range(k):
      opt = opt_ids[i * k + j]
      if not opt:
        raise ValueError(f"option {j} of question {i} ({options[i][j]!r}) has no tokens")
      room = max_len - len(head) - len(tail) - 1
      if len(opt) > room:  # keep >= 1 context token; cut the option's end, and count it
        if room < 1:
          raise ValueError(
              f"max_len={max_len} leaves no room for options after the fixed prompt "
              f"parts ({len(head) + len(tail)} tokens): raise max_len."
          )
        opt = opt[:room]
        cut_opt += 1
      seq, start, c = _fit(head, ctx[i], tail, opt, max_len)
      cut_ctx += c and j == 0
      tokens[i, j, : len(seq)] = seq
      mask[i, j, : len(seq)] = True
      target[i, j, start : len(seq)] = True
      ntok[i, j] = len(opt)
  if cut_ctx:
    log.info(
        "format_multiple_choice: %d of %d contexts truncated (max_len=%d)", cut_ctx, n, max_len
    )
  if cut_opt:
    log.warning(
        "format_multiple_choice: %d option(s) longer than max_len=%d were cut at the end; "
        "raise max_len to score them whole",
        cut_opt,
        max_len,
    )
  return {
      "tokens": tokens,
      "mask": mask,
      "target_mask": target,
      "option_chars": chars,
      "option_tokens": ntok,
      "labels": y,
  }


def format_label_word_choices(
    texts: Sequence[str],
    labels: Sequence[int],
    tokenizer: Tokenizer,
    *,
    label_words: Sequence[str] = AGNEWS_LABEL_WORDS,
    template: str = AGNEWS_TEMPLATE,
    max_len: int = 64,
    add_bos: bool = True,
) -> Examples:
  """Classification as multiple choice: every label word scored after the prompt.

  Works for multi-token label words (scored as sequences). Same truncation as
  :func:`format_classification`.
  """
  prefix, suffix = _split_template(template)
  n = len(texts)
  return format_multiple_choice(
      list(texts),
      [list(label_words)] * n,
      labels,
      tokenizer,
      max_len=max_len,
      add_bos=add_bos,
      prefixes=[prefix] * n if prefix else None,
      suffix=suffix,
  )


def mmlu_question(record: dict, with_answer: bool = False) -> str:
  """One MMLU question block: question, ``A. ..`` to ``D. ..``, ``Answer:`` (+ `` X``).

  >>> mmlu_question({"question": "2+2?", "choices": ["1", "4", "3", "5"], "answer": 1}, True)
  '2+2?\\nA. 1\\nB. 4\\nC. 3\\nD. 5\\nAnswer: B'
  """
  lines = [record["question"].strip()]
  lines += [f"{letter}. {c}" for letter, c in zip("ABCD", record["choices"])]
  s = "\n".join(lines) + "\nAnswer:"
  if with_answer:
    s += " " + "ABCD"[int(record["answer"])]
  return s


def mmlu_prompt(record: dict, shots: Sequence[dict] = ()) -> tuple[str, str]:
  """``(header, body)`` of the standard MMLU prompt (Hendrycks et al.; lm-eval-harness).

  header = "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
  (underscores in the subject become spaces); body = the few-shot blocks with answers, each
  followed by a blank line, then the question block ending in "Answer:". Options scored:
  " A", " B", " C", " D".
  """
  header = MMLU_HEADER.format(subject=record["subject"].replace("_", " "))
  body = "".join(mmlu_question(s, True) + "\n\n" for s in shots) + mmlu_question(record)
  return header, body


def format_mmlu(
    records: Sequence[dict],
    tokenizer: Tokenizer,
    *,
    max_len: int = 512,
    num_shots: int = 0,
    dev_records: Sequence[dict] | None = None,
    add_bos: bool = True,
) -> Examples:
  """MMLU as (N, 4, max_len) multiple choice with the first ``num_shots`` dev examples of the
  same subject as few-shot examples. The header is never truncated; the body is truncated
  from the left (the oldest few-shot examples go first)."""
  shots_by_subject: dict[str, list[dict]] = {}
  if num_shots:
    if dev_records is None:
      raise ValueError("num_shots > 0 needs dev_records (the MMLU dev split)")
    for r in dev_records:
      shots_by_subject.setdefault(r["subject"], []).append(r)
  headers, bodies = [], []
  for r in records:
    shots = shots_by_subject.get(r["subject"], [])[:num_shots]
    if num_shots and len(shots) < num_shots:
      raise ValueError(
          f"dev_records has {len(shots)} examples of {r['subject']!r}, " f"num_shots={num_shots}"
      )
    h, b = mmlu_prompt(r, shots)
    headers.append(h)
    bodies.append(b)
  return format_multiple_choice(
      bodies,
      [list(MMLU_OPTIONS)] * len(records),
      [r["answer"] for r in records],
      tokenizer,
      max_len=max_len,
      add_bos=add_bos,
      prefixes=headers,
  )


def hellaswag_context(record: dict) -> str:
  """The scored context: ``"{activity_label}: {ctx}"`` (the lm-eval-harness query).

  >>> hellaswag_context({"activity_label": "Roofing", "ctx": "A man is on a roof. he"})
  'Roofing: A man is on a roof. he'
  """
  return f"{record['activity_label']}: {record['ctx']}"


def format_hellaswag(
    records: Sequence[dict], tokenizer: Tokenizer, *, max_len: int = 128, add_bos: bool = True
) -> Examples:
  """HellaSwag as (N, 4, max_len) continuation scoring: context + " " + ending (acc_norm)."""
  return format_multiple_choice(
      [hellaswag_context(r) for r in records],
      [[" " + e for e in r["endings"]] for r in records],
      [r["label"] for r in records],
      tokenizer,
      max_len=max_len,
      add_bos=add_bos,
  )


def format_instruction(
    records: Sequence[dict],
    tokenizer: Tokenizer,
    *,
    max_len: int = 256,
    add_bos: bool = True,
    add_eos: bool = True,
) -> Examples:
  """Instruction tuning (Dolly): Alpaca-style prompt, loss on the response (+ EOS).

  Prompt: ``"### Instruction:\\n{instruction}\\n\\n[### Context:\\n{context}\\n\\n]### Response:\\n"``.
  When too long the response is cut to at most half of ``max_len`` first, then the prompt is
  truncated from the left. ``labels`` holds the category index when records have an int
  ``category`` (else -1).
  """
  bos = _bos(tokenizer, add_bos)
  eos = [tokenizer.eos_id] if add_eos and tokenizer.eos_id is not None else []
  prompts = [
      INSTRUCTION_TEMPLATE.format(
          instruction=r["instruction"].strip(),
          context=f"### Context:\n{r['context'].strip()}\n\n" if r.get("context") else "",
      )
      for r in records
  ]
  p_ids = tokenizer.encode(prompts)
  r_ids = tokenizer.encode([r["response"].strip() for r in records])
  n = len(records)
  tokens = np.full((n, max_len), tokenizer.pad_id, dtype=np.int32)
  mask = np.zeros((n, max_len), dtype=bool)
  target = np.zeros((n, max_len), dtype=bool)
  last = np.zeros(n, dtype=np.int32)
  for i in range(n):
    resp = r_ids[i] + eos
    if len(bos) + len(p_ids[i]) + len(resp) > max_len:
      resp = resp[: max(1, min(len(resp), max_len // 2, max_len - len(bos) - len(p_ids[i])))]
    seq, start, _ = _fit(bos, p_ids[i], [], resp, max_len)
    tokens[i, : len(seq)] = seq
    mask[i, : len(seq)] = True
    target[i, start : len(seq)] = True
    last[i] = start - 1
  cats = [r.get("category", -1) for r in records]
  labels = np.array([c if isinstance(c, (int, np.integer)) else -1 for c in cats], np.int32)
  return {
      "tokens": tokens,
      "mask": mask,
      "target_mask": target,
      "labels": labels,
      "last_index": last,
  }

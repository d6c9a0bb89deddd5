"""Tokenizers with one small interface: ``encode(list[str]) -> list[list[int]]``.

* :class:`HFTokenizer` - a Hugging Face ``tokenizer.json`` (from a checkpoint directory, read
  offline with the ``tokenizers`` library). BOS/EOS/PAD come from ``tokenizer_config.json`` /
  ``special_tokens_map.json`` next to it when present, else from common token names.
* :func:`train_bpe` - a byte-level BPE trained with ``tokenizers`` on client training text only
  (never on test text), saved to / loaded from one JSON file (:meth:`HFTokenizer.from_file`).
* :class:`ByteTokenizer` - UTF-8 bytes + 3 (pad 0, bos 1, eos 2; vocab 259).

``encode`` never adds special tokens; the formatting functions add BOS themselves.

Example:
    >>> tok = ByteTokenizer()
    >>> tok.encode(["hi"]), tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id
    ([[107, 108]], 259, 0, 1, 2)
    >>> bpe = train_bpe(["the cat sat on the mat"] * 20, vocab_size=300)
    >>> bpe.decode(bpe.encode(["the mat"])[0])
    'the mat'
"""

from __future__ import annotations

import json
import pathlib
from typing import Protocol, Sequence, runtime_checkable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

PathLike = str | pathlib.Path

BPE_SPECIAL_TOKENS: tuple[str, str, str] = ("<pad>", "<bos>", "<eos>")
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
_EOS_NAMES = ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "[SEP]")
_PAD_NAMES = ("<pad>", "<|padding|>", "[PAD]", "<|pad|>")


@runtime_checkable
class Tokenizer(Protocol):
  """The tokenizer interface used by formatting and evaluation."""

  vocab_size: int
  pad_id: int
  bos_id: int | None
  eos_id: int | None

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    ...

  def decode(self, ids: Sequence[int]) -> str:
    """Text of a token id sequence (special tokens skipped)."""
    ...


class ByteTokenizer:
  """Trivial tokenizer: id = UTF-8 byte + 3; 0 = pad, 1 = bos, 2 = eos.

  >>> ByteTokenizer().decode([1, 107, 108, 2])
  'hi'
  """

  OFFSET = 3

  def __init__(self) -> None:
    self.vocab_size = 256 + self.OFFSET
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    if isinstance(texts, str):
      raise TypeError("encode takes a list of strings; wrap a single text in a list")
    return [[b + self.OFFSET for b in t.encode("utf-8")] for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) - self.OFFSET for i in ids if int(i) >= self.OFFSET).decode(
        "utf-8", errors="replace"
    )


def _token_name(v: object) -> str | None:
  if isinstance(v, dict):
    v = v.get("content")
  return v if isinstance(v, str) else None


class HFTokenizer:
  """A ``tokenizers.Tokenizer`` with pad/bos/eos ids (``tokenizer.json`` of a checkpoint).

  Args:
    tokenizer: the ``tokenizers.Tokenizer``.
    pad_id, bos_id, eos_id: special ids; ``bos_id``/``eos_id`` may be ``None`` (e.g. models
      without BOS). ``pad_id`` defaults to eos, then 0 - it is only ever masked out.
  """

  def __init__(
      self,
      tokenizer: tokenizers.Tokenizer,
      pad_id: int | None = None,
      bos_id: int | None = None,
      eos_id: int | None = None,
  ) -> None:
    self.tokenizer = tokenizer
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    if isinstance(texts, str):
      raise TypeError("encode takes a list of strings; wrap a single text in a list")
    return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def save(self, path: PathLike) -> pathlib.Path:
    """Writes ``tokenizer.json`` (to ``path``, or ``path/tokenizer.json`` for a directory)
    plus the special tokens in a ``tokenizer_config.json`` beside it."""
    path = pathlib.Path(path)
    if path.is_dir() or not path.suffix:
      path.mkdir(parents=True, exist_ok=True)
      path = path / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    self.tokenizer.save(str(path))
    cfg = {
        name: self.tokenizer.id_to_token(i)
        for name, i in (
            ("bos_token", self.bos_id),
            ("eos_token", self.eos_id),
            ("pad_token", self.pad_id),
        )
        if i is not None
    }
    (path.parent / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return path

  @classmethod
  def from_file(
      cls,
      path: PathLike,
      bos_token: str | None = None,
      eos_token: str | None = None,
      pad_token: str | None = None,
  ) -> "HFTokenizer":
    """Loads ``tokenizer.json`` (a file, or a checkpoint directory holding one), offline.

    Special tokens: explicit arguments, else ``tokenizer_config.json`` /
    ``special_tokens_map.json`` in the same directory (``null`` = none; no pad -> eos),
    else common names (``<s>``, ``</s>``, ``<|endoftext|>``, ``<pad>``...).

    Raises:
      FileNotFoundError: no tokenizer.json at ``path``.
    """
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / "tokenizer.json"
    if not path.is_file():
      raise FileNotFoundError(
          f"{path} not found: pass a tokenizer.json or a checkpoint directory holding "
          "one (download the checkpoint beforehand; nothing is fetched at run time)."
      )
    tok = tokenizers.Tokenizer.from_file(str(path))
    names: dict[str, str | None] = {}
    for cfg_name in ("special_tokens_map.json", "tokenizer_config.json"):
      cfg_path = path.parent / cfg_name
      if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        for key in ("bos_token", "eos_token", "pad_token"):
          if key in cfg:  # an explicit null means "none" (e.g. models without BOS)
            names[key] = _token_name(cfg[key])
    explicit = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
    for key, val in explicit.items():
      if val is not None:
        names[key] = val

    def lookup(key: str, candidates: Sequence[str]) -> int | None:
      if names.get(key) is not None:
        i = tok.token_to_id(names[key])
        if i is None:
          raise ValueError(f"{path}: {key} {names[key]!r} is not in the vocabulary")
        return i
      if key in names:  # configured as null
        return None
      for c in candidates:
        i = tok.token_to_id(c)
        if i is not None:
          return i
      return None

    return cls(
        tok,
        pad_id=lookup("pad_token", _PAD_NAMES),
        bos_id=lookup("bos_token", _BOS_NAMES),
        eos_id=lookup("eos_token", _EOS_NAMES),
    )


def train_bpe(
    texts: Sequence[str],
    vocab_size: int = 4096,
    path: PathLike | None = None,
    min_frequency: int = 2,
    added_tokens: Sequence[str] = (),
) -> HFTokenizer:
  """Trains a byte-level BPE (GPT-2 style) on ``texts`` (client training text only).

  Special tokens ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2. ``added_tokens`` (e.g. the
  AG News label words ``" World"``, ``" Sports"``...) become single tokens wherever they occur,
  which lets classification use the one-pass label-word scoring. Every byte is in the initial
  alphabet, so any text encodes without unknown tokens. Deterministic for a given input.
  Saved to ``path`` (``tokenizer.json`` + ``tokenizer_config.json``) when given; load it back
  with :meth:`HFTokenizer.from_file`.

  >>> tok = train_bpe(["low lower lowest"] * 10, vocab_size=270)
  >>> tok.pad_id, tok.bos_id, tok.eos_id
  (0, 1, 2)
  """
  if isinstance(texts, str):
    raise TypeError("texts must be a list of strings")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      min_frequency=min_frequency,
      special_tokens=list(BPE_SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(list(texts), trainer=trainer)
  if added_tokens:
    tok.add_tokens([tokenizers.AddedToken(w, normalized=False) for w in added_tokens])
  out = HFTokenizer(tok, pad_id=0, bos_id=1, eos_id=2)
  if path is not None:
    out.save(path)
  return out


def load_tokenizer(spec: str | PathLike) -> Tokenizer:
  """``"bytes"`` -> :class:`ByteTokenizer`; a path -> :meth:`HFTokenizer.from_file`.

  >>> load_tokenizer("bytes").vocab_size
  259
  """
  if str(spec) == "bytes":
    return ByteTokenizer()
  return HFTokenizer.from_file(spec)

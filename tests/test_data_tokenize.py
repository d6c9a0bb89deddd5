"""Tokenizers: bytes, trained byte-level BPE (save/load), HF tokenizer.json loading."""

import json

import pytest

from fedalign.data import tokenize as T
from fedalign.data.agnews import AGNEWS_LABEL_WORDS

TEXTS = [
    "The market rallied on Monday.",
    "Sports fans cheered the win.",
    "New chip speeds up phones.",
    "Leaders met in Geneva.",
] * 25


def test_byte_tokenizer():
  tok = T.ByteTokenizer()
  ids = tok.encode(["héllo", ""])
  assert ids[1] == [] and tok.decode(ids[0]) == "héllo" and min(ids[0]) >= 3
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
  assert isinstance(tok, T.Tokenizer)
  with pytest.raises(TypeError):
    tok.encode("not a list")


def test_bpe_train_save_load(tmp_path):
  tok = T.train_bpe(TEXTS, vocab_size=300, path=tmp_path / "bpe", added_tokens=AGNEWS_LABEL_WORDS)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert all(len(i) == 1 for i in tok.encode(list(AGNEWS_LABEL_WORDS)))
  unseen = "Zebra ünïcode 123!"
  assert tok.decode(tok.encode([unseen])[0]) == unseen  # byte-level: no unknowns
  loaded = T.HFTokenizer.from_file(tmp_path / "bpe")
  assert loaded.encode(TEXTS[:3] + [unseen]) == tok.encode(TEXTS[:3] + [unseen])
  assert (loaded.vocab_size, loaded.pad_id, loaded.bos_id, loaded.eos_id) == (
      tok.vocab_size,
      0,
      1,
      2,
  )
  assert isinstance(T.load_tokenizer(tmp_path / "bpe" / "tokenizer.json"), T.HFTokenizer)
  # deterministic training
  again = T.train_bpe(TEXTS, vocab_size=300, added_tokens=AGNEWS_LABEL_WORDS)
  assert again.encode(TEXTS[:4]) == tok.encode(TEXTS[:4])


def test_hf_checkpoint_dir_special_tokens(tmp_path):
  """A checkpoint-style dir: tokenizer.json + tokenizer_config.json naming the specials."""
  base = T.train_bpe(TEXTS, vocab_size=280)
  base.tokenizer.add_special_tokens(["<s>", "</s>"])
  base.tokenizer.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "pad_token": None})
  )
  tok = T.HFTokenizer.from_file(tmp_path)
  assert tok.bos_id == base.tokenizer.token_to_id("<s>")
  assert tok.eos_id == base.tokenizer.token_to_id("</s>")
  assert tok.pad_id == tok.eos_id  # pad null -> eos
  assert tok.encode(["x"]) == base.encode(["x"])
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    T.HFTokenizer.from_file(tmp_path / "missing")

"""Readers of the raw benchmark files (AG News, MMLU, HellaSwag, Dolly).

These plain-Python parsers are the single place where the file formats are understood. The
TFDS builders in :mod:`fedalign.data.builders` call them, :mod:`fedalign.data.make_embedded`
calls them, and fast tests call them directly to check row counts without building anything.

Every reader returns a :class:`ParseResult` ``(records, malformed)``: a list of plain dicts and
the number of malformed rows that were skipped (each one is also logged as a warning, so nothing
is dropped silently). Errors that make a file unusable raise:

* a missing file or directory -> ``FileNotFoundError`` naming it and where to get the data;
* a file whose columns / fields are not the expected ones -> ``ValueError`` naming the file,
  the columns found and the columns expected;
* a label outside the class set -> ``ValueError`` naming the file, row, column and value;
* a file without a single usable row, or one that is not UTF-8 text (binary, a damaged
  archive) -> ``ValueError`` naming it.

Example:
    >>> from fedalign.data.sources import read_ag_news_csv
    >>> import pathlib, tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "test.csv"
    >>> _ = p.write_text('"3","Title","Some description."\\n')
    >>> read_ag_news_csv(p).records[0]["label"]
    2
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import io
import json
import logging
import pathlib
import re
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

log = logging.getLogger(__name__)

PathLike = str | pathlib.Path

AG_NEWS_CLASSES: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")
MMLU_CHOICE_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
MMLU_HEADER: tuple[str, ...] = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
DOLLY_CATEGORIES: tuple[str, ...] = (
    "open_qa",
    "general_qa",
    "classification",
    "closed_qa",
    "brainstorming",
    "information_extraction",
    "summarization",
    "creative_writing",
)
DOLLY_FIELDS: tuple[str, ...] = ("instruction", "context", "response", "category")
HELLASWAG_FIELDS: tuple[str, ...] = ("ctx", "endings", "label")

# Where a user with internet gets the full files (never fetched by this library).
DOWNLOAD_INSTRUCTIONS: dict[str, str] = {
    "ag_news": (
        "Download ag_news_csv.tar.gz (the original release by Zhang et al. 2015; the URL used "
        "by TFDS's ag_news_subset is "
        "https://drive.google.com/uc?export=download&id=0Bz8a_Dbh9QhbUDNpeUdjb0wxRms) and "
        "extract train.csv (120,000 rows) and test.csv (7,600 rows) into the manual directory. "
        "Without train.csv the builder uses train_subset_5000_orig_format.csv and "
        "train_subset_5000_hf_format.csv (the 9,777-row subset shipped in shared/data/ag_news)."
    ),
    "mmlu": (
        "Download https://people.eecs.berkeley.edu/~hendrycks/data.tar (Hendrycks et al. 2021) "
        "and extract it so that the manual directory holds test/<subject>_test.csv, "
        "dev/<subject>_dev.csv and optionally val/<subject>_val.csv (the original header-less "
        "format with A-D answers and the header+0-3 format of shared/data/mmlu both work)."
    ),
    "hellaswag": (
        "Download https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"
        "hellaswag_val.jsonl (and optionally hellaswag_train.jsonl) into the manual directory. "
        "shared/data/hellaswag's hellaswag_val.jsonl.gz or hellaswag_val_full.txt.bz2 also work."
    ),
    "dolly": (
        "Download https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/"
        "databricks-dolly-15k.jsonl (or https://github.com/databrickslabs/dolly/raw/master/data/"
        "databricks-dolly-15k.jsonl) into the manual directory, or use the 10-client "
        "FederatedGPT-Shepherd partition of shared/data/dolly (shepherd_10clients/"
        "local_training_<i>.json + global_test.json)."
    ),
}


class ParseResult(NamedTuple):
  """Parsed rows of one file or split: ``records`` and the count of ``malformed`` rows skipped."""

  records: list[dict[str, Any]]
  malformed: int


class _Malformed:
  """Counts malformed rows of one file and logs a warning for them (first few shown)."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.count = 0
    self.examples: list[str] = []

  def add(self, where: str, why: str) -> None:
    self.count += 1
    if len(self.examples) < 5:
      self.examples.append(f"{where}: {why}")

  def report(self) -> int:
    if self.count:
      log.warning(
          "%s: skipped %d malformed row(s), e.g. %s",
          self.path,
          self.count,
          "; ".join(self.examples),
      )
    return self.count


def _missing(path: pathlib.Path, dataset: str, what: str = "file") -> FileNotFoundError:
  return FileNotFoundError(
      f"{what} {path} not found. {DOWNLOAD_INSTRUCTIONS[dataset]} "
      "Then pass that directory as manual_dir (nothing is downloaded at run time)."
  )


def _check_dir(path: PathLike, dataset: str) -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.is_dir():
    raise _missing(p, dataset, "data directory")
  return p


@contextlib.contextmanager
def _open_text(path: pathlib.Path) -> Iterator[io.TextIOBase]:
  """The file as UTF-8 text (``.gz`` / ``.bz2`` decompressed); a file that is not (binary,
  another encoding, a damaged archive) raises ValueError naming it, wherever the reader
  stopped."""
  if path.suffix == ".gz":
    f = gzip.open(path, "rt", encoding="utf-8", newline="")
  elif path.suffix == ".bz2":
    f = bz2.open(path, "rt", encoding="utf-8", newline="")
  else:
    f = open(path, encoding="utf-8", newline="")
  try:
    with f:
      yield f
  except (UnicodeDecodeError, EOFError, OSError, csv.Error) as e:
    if isinstance(e, OSError) and e.errno is not None:
      raise  # a real I/O error (permissions, disk): keep it
    if isinstance(e, csv.Error):
      raise ValueError(f"{path}: not readable as CSV ({e}).") from e
    raise ValueError(
        f"{path}: cannot be read as UTF-8 text ({type(e).__name__}: {e}); expected a text "
        "file (.gz / .bz2 compressed or plain). Is it the right file, undamaged?"
    ) from e


def _result(path: pathlib.Path, records: list[dict], bad: _Malformed, expected: str) -> ParseResult:
  """ParseResult of one file; a file without a single usable row raises ValueError."""
  malformed = bad.report()
  if not records:
    why = f"all {malformed} row(s) malformed (see the warning)" if malformed else "it is empty"
    raise ValueError(f"{path}: no usable rows: {why}; expected {expected}.")
  return ParseResult(records, malformed)


def normalize_whitespace(text: str) -> str:
  """Collapses runs of whitespace to one space and strips the ends (the dedup key).

  >>> normalize_whitespace("  a \\n b  ")
  'a b'
  """
  return re.sub(r"\s+", " ", text).strip()


# --------------------------------------------------------------------------------------------
# AG News
# --------------------------------------------------------------------------------------------


def read_ag_news_csv(path: PathLike, fmt: str = "orig") -> ParseResult:
  """Reads one AG News CSV file.

  Args:
    path: the CSV file.
    fmt: ``"orig"`` for the original release (no header; columns class index 1-4, title,
      description) or ``"hf"`` for the Hugging Face style (no header; columns text, label 0-3).

  Returns:
    ``ParseResult`` with records ``{"text", "label" (0-3), "title", "description", "row"}``;
    ``text`` is ``title + " " + description`` with whitespace collapsed (the HF convention),
    ``title``/``description`` are empty for the hf format.

  Example:
    >>> import pathlib, tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = p.write_text('"Some text",1\\n')
    >>> read_ag_news_csv(p, fmt="hf").records[0]["label"]
    1
  """
  path = pathlib.Path(path)
  if fmt not in ("orig", "hf"):
    raise ValueError(f"fmt must be 'orig' or 'hf', got {fmt!r}")
  if not path.is_file():
    raise _missing(path, "ag_news")
  ncols = 3 if fmt == "orig" else 2
  expected = "class index (1-4), title, description" if fmt == "orig" else "text, label (0-3)"
  label_col = 0 if fmt == "orig" else 1
  offset = 1 if fmt == "orig" else 0
  bad = _Malformed(path)
  records = []
  with _open_text(path) as f:
    for i, row in enumerate(csv.reader(f)):
      if i == 0 and len(row) != ncols:
        raise ValueError(
            f"{path}: first row has {len(row)} column(s), expected {ncols} "
            f"({expected}) for AG News fmt={fmt!r}. Check the file or pass the other fmt."
        )
      if not row:
        bad.add(f"row {i}", "empty line")
        continue
      if len(row) != ncols:
        bad.add(f"row {i}", f"{len(row)} columns instead of {ncols}")
        continue
      try:
        label = int(row[label_col].strip()) - offset
      except ValueError:
        bad.add(f"row {i}", f"label {row[label_col]!r} is not an integer")
        continue
      if not 0 <= label < len(AG_NEWS_CLASSES):
        lo, hi = offset, len(AG_NEWS_CLASSES) - 1 + offset
        raise ValueError(
            f"{path}: row {i}, column {label_col} ('{'class index' if fmt == 'orig' else 'label'}')"
            f" has label {row[label_col]!r}, outside the AG News class set {lo}-{hi} "
            f"for fmt={fmt!r}. Use fmt='hf' for 0-based labels, fmt='orig' for 1-based."
        )
      if fmt == "orig":
        title, desc = row[1], row[2]
        text = normalize_whitespace(title + " " + desc)
      else:
        title, desc = "", ""
        text = normalize_whitespace(row[0])
      if not text:
        bad.add(f"row {i}", "empty text")
        continue
      records.append({"text": text, "label": label, "title": title, "description": desc, "row": i})
  return _result(path, records, bad, f"CSV rows of {expected} (AG News fmt={fmt!r})")


AG_NEWS_TRAIN_SUBSETS: tuple[tuple[str, str], ...] = (
    ("train_subset_5000_orig_format.csv", "orig"),
    ("train_subset_5000_hf_format.csv", "hf"),
)


def read_ag_news(manual_dir: PathLike, split: str) -> ParseResult:
  """Reads the AG News ``"train"`` or ``"test"`` split from a manual directory.

  ``test`` is ``test.csv``. ``train`` is ``train.csv`` (the full 120,000 rows) when present,
  else the union of the two 5,000-row subsets of shared/data/ag_news, deduplicated on
  whitespace-normalised text (9,777 rows). Records get an ``id`` ``"<file>:<row>"``.

  Example:
    >>> read_ag_news("../shared/data/ag_news", "test")  # doctest: +SKIP
  """
  d = _check_dir(manual_dir, "ag_news")
  if split == "test":
    files = [("test.csv", "orig")]
  elif split == "train":
    files = [("train.csv", "orig")] if (d / "train.csv").is_file() else list(AG_NEWS_TRAIN_SUBSETS)
  else:
    raise ValueError(f"AG News split must be 'train' or 'test', got {split!r}")
  records, malformed, seen = [], 0, {}
  for name, fmt in files:
    res = read_ag_news_csv(d / name, fmt)
    malformed += res.malformed
    in_file = {}
    for r in res.records:
      key = r["text"]
      if key in seen:  # only rows already read from a previous file are duplicates
        if seen[key] != r["label"]:
          log.warning("%s row %d duplicates a row with another label", name, r["row"])
        continue
      in_file[key] = r["label"]
      records.append({"id": f"{name}:{r['row']}", "text": r["text"], "label": r["label"]})
    seen.update(in_file)
  return ParseResult(records, malformed)


# --------------------------------------------------------------------------------------------
# MMLU
# --------------------------------------------------------------------------------------------


def _mmlu_answer(value: str) -> int | None:
  v = value.strip()
  if v.upper() in MMLU_CHOICE_LETTERS:
    return MMLU_CHOICE_LETTERS.index(v.upper())
  try:
    return int(v)
  except ValueError:
    if len(v) == 1 and v.isalpha():
      return -1  # a letter outside A-D
    return None


def read_mmlu_csv(path: PathLike, subject: str | None = None) -> ParseResult:
  """Reads one MMLU CSV file (``<subject>_<split>.csv``).

  Accepts the header format ``question,choice0,choice1,choice2,choice3,answer`` (answer 0-3)
  and the original header-less release (6 columns, answer A-D).

  Returns records ``{"subject", "question", "choices" (4 str), "answer" (0-3), "row"}``.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise _missing(path, "mmlu")
  if subject is None:
    subject = re.sub(r"_(test|dev|val)$", "", path.stem)
  bad = _Malformed(path)
  records = []
  with _open_text(path) as f:
    for i, row in enumerate(csv.reader(f)):
      if i == 0:
        if len(row) != 6:
          raise ValueError(
              f"{path}: first row has {len(row)} column(s) {row[:8]!r}; expected the "
              f"header {','.join(MMLU_HEADER)} or 6 header-less columns "
              "(question, 4 choices, answer A-D)."
          )
        if row[0].strip().lower() == "question" or row[-1].strip().lower() == "answer":
          if tuple(c.strip().lower() for c in row) != MMLU_HEADER:
            raise ValueError(
                f"{path}: header {row!r} does not match the expected columns "
                f"{list(MMLU_HEADER)}."
            )
          continue
      if len(row) != 6:
        bad.add(f"row {i}", f"{len(row)} columns instead of 6")
        continue
      ans = _mmlu_answer(row[5])
      if ans is None:
        bad.add(f"row {i}", f"answer {row[5]!r} is not a letter or integer")
        continue
      if not 0 <= ans < 4:
        raise ValueError(
            f"{path}: row {i}, column 'answer' has {row[5]!r}, outside the class set "
            "0-3 / A-D. Fix the file (answers must index one of the 4 choices)."
        )
      if not row[0].strip():
        bad.add(f"row {i}", "empty question")
        continue
      records.append(
          {
              "subject": subject,
              "question": row[0],
              "choices": [row[1], row[2], row[3], row[4]],
              "answer": ans,
              "row": i,
          }
      )
  return _result(path, records, bad, "CSV rows: question, 4 choices, answer (MMLU)")


def read_mmlu(manual_dir: PathLike, split: str = "test") -> ParseResult:
  """Reads an MMLU split (``"test"``, ``"dev"`` or ``"validation"``) over all subjects.

  Files are ``<manual_dir>/<split>/<subject>_<split>.csv`` (``val`` for ``validation``),
  read in sorted subject order. Records get an ``id`` ``"<subject>:<row>"``.

  Example:
    >>> res = read_mmlu("../shared/data/mmlu", "test")  # doctest: +SKIP
    >>> len(res.records)  # doctest: +SKIP
    14042
  """
  d = _check_dir(manual_dir, "mmlu")
  short = {"test": "test", "dev": "dev", "validation": "val", "val": "val"}.get(split)
  if short is None:
    raise ValueError(f"MMLU split must be 'test', 'dev' or 'validation', got {split!r}")
  sub = d / short
  if not sub.is_dir():
    raise _missing(sub, "mmlu", "split directory")
  files = sorted(sub.glob(f"*_{short}.csv"))
  if not files:
    raise _missing(sub / f"<subject>_{short}.csv", "mmlu", "no file matching")
  records, malformed = [], 0
  for fp in files:
    res = read_mmlu_csv(fp, fp.name[: -len(f"_{short}.csv")])
    malformed += res.malformed
    for r in res.records:
      r["id"] = f"{r['subject']}:{r['row']}"
      records.append(r)
  return ParseResult(records, malformed)


# --------------------------------------------------------------------------------------------
# HellaSwag
# --------------------------------------------------------------------------------------------


def hellaswag_preprocess(text: str) -> str:
  """The lm-evaluation-harness clean-up of raw HellaSwag text (WikiHow markers, brackets).

  >>> hellaswag_preprocess("Do it. [title] Now [step] go")
  'Do it.. Now go'
  """
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  text = text.replace("  ", " ")
  return text


_HELLASWAG_FILES = {
    # split -> candidate file names, in order of preference
    "validation": ("hellaswag_val.jsonl", "hellaswag_val.jsonl.gz", "hellaswag_val_full.txt.bz2"),
    "train": ("hellaswag_train.jsonl", "hellaswag_train.jsonl.gz"),
}


def _hellaswag_record(obj: dict, i: int, path: pathlib.Path, bad: _Malformed) -> dict | None:
  if "ctx_a" in obj:  # official raw JSONL: apply the harness's preprocessing
    ctx = obj["ctx_a"] + " " + obj.get("ctx_b", "").capitalize()
    ctx = hellaswag_preprocess(ctx)
    label_name = hellaswag_preprocess(obj.get("activity_label", ""))
    endings = [hellaswag_preprocess(e) for e in obj.get("endings", [])]
  else:
    ctx = obj["ctx"]
    label_name = obj.get("activity_label", "")
    endings = obj["endings"]
  if not isinstance(endings, list) or len(endings) != 4:
    bad.add(f"row {i}", "endings is not a list of 4 strings")
    return None
  try:
    label = int(obj["label"])
  except (TypeError, ValueError):
    bad.add(f"row {i}", f"label {obj.get('label')!r} is not an integer")
    return None
  if not 0 <= label < 4:
    raise ValueError(
        f"{path}: row {i}, field 'label' is {obj['label']!r}, outside the class set 0-3 "
        "(index into the 4 endings). Fix the file."
    )
  return {
      "id": f"{path.name}:{i}",
      "row": int(obj.get("row", obj.get("ind", i))),
      "activity_label": label_name,
      "ctx": ctx,
      "endings": list(endings),
      "label": label,
  }


def read_hellaswag_file(path: PathLike) -> ParseResult:
  """Reads one HellaSwag file: official ``.jsonl``, derived ``.jsonl.gz`` or 6-line ``.txt.bz2``.

  Returns records ``{"id", "row", "activity_label", "ctx", "endings" (4), "label" (0-3)}``.
  For the official JSONL, ``ctx = ctx_a + " " + ctx_b.capitalize()`` and the
  lm-evaluation-harness preprocessing are applied; the shared files are already cleaned.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise _missing(path, "hellaswag")
  bad = _Malformed(path)
  records = []
  if path.name.endswith(".txt.bz2") or path.name.endswith(".txt"):
    with _open_text(path) as f:
      lines = f.read().split("\n")
    if lines and lines[-1] == "":
      lines = lines[:-1]
    if len(lines) % 6:
      bad.add("end of file", f"{len(lines) % 6} trailing line(s) of an incomplete example")
    for i in range(len(lines) // 6):
      head, label, *endings = lines[6 * i : 6 * i + 6]
      if ": " not in head:
        if i == 0:
          raise ValueError(
              f"{path}: first example line {head[:80]!r} is not '<activity_label>: "
              "<ctx>'; expected the 6-line format (header, label, 4 endings)."
          )
        bad.add(f"example {i}", "first line has no ': '")
        continue
      act, ctx = head.split(": ", 1)
      rec = _hellaswag_record(
          {"row": i, "activity_label": act, "ctx": ctx, "endings": endings, "label": label},
          i,
          path,
          bad,
      )
      if rec is not None:
        records.append(rec)
    return _result(path, records, bad, "HellaSwag examples of 6 lines (header, label, 4 endings)")
  with _open_text(path) as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        if i == 0:
          raise ValueError(f"{path}: line 1 is not JSON ({e}); expected JSON Lines.")
        bad.add(f"line {i + 1}", "invalid JSON")
        continue
      missing = (
          [k for k in HELLASWAG_FIELDS if k not in obj]
          if "ctx_a" not in obj
          else [k for k in ("ctx_a", "endings", "label") if k not in obj]
      )
      if missing:
        if i == 0:
          raise ValueError(
              f"{path}: first record has fields {sorted(obj)}; missing {missing}. "
              f"Expected fields {list(HELLASWAG_FIELDS)} (+ activity_label)."
          )
        bad.add(f"line {i + 1}", f"missing fields {missing}")
        continue
      rec = _hellaswag_record(obj, i, path, bad)
      if rec is not None:
        records.append(rec)
  return _result(path, records, bad, f"JSON Lines records with fields {list(HELLASWAG_FIELDS)}")


def find_hellaswag_file(manual_dir: PathLike, split: str = "validation") -> pathlib.Path:
  """Returns the preferred HellaSwag file for ``split`` in ``manual_dir``."""
  d = _check_dir(manual_dir, "hellaswag")
  if split not in _HELLASWAG_FILES:
    raise ValueError(f"HellaSwag split must be one of {list(_HELLASWAG_FILES)}, got {split!r}")
  for name in _HELLASWAG_FILES[split]:
    if (d / name).is_file():
      return d / name
  raise _missing(d / " or ".join(_HELLASWAG_FILES[split]), "hellaswag")


def read_hellaswag(manual_dir: PathLike, split: str = "validation") -> ParseResult:
  """Reads the HellaSwag ``split`` (``"validation"``, or ``"train"`` if present).

  Example:
    >>> len(read_hellaswag("../shared/data/hellaswag").records)  # doctest: +SKIP
    10042
  """
  return read_hellaswag_file(find_hellaswag_file(manual_dir, split))


# --------------------------------------------------------------------------------------------
# Dolly
# --------------------------------------------------------------------------------------------


def _dolly_records(objs: Iterable[dict], path: pathlib.Path, client: int) -> ParseResult:
  bad = _Malformed(path)
  records = []
  for i, obj in enumerate(objs):
    if not isinstance(obj, dict):
      if i == 0:
        raise ValueError(f"{path}: record 0 is not a JSON object; expected {DOLLY_FIELDS}")
      bad.add(f"record {i}", "not a JSON object")
      continue
    missing = [k for k in DOLLY_FIELDS if k not in obj]
    if missing:
      if i == 0:
        raise ValueError(
            f"{path}: first record has fields {sorted(obj)}; missing {missing}. "
            f"Expected fields {list(DOLLY_FIELDS)}."
        )
      bad.add(f"record {i}", f"missing fields {missing}")
      continue
    if obj["category"] not in DOLLY_CATEGORIES:
      raise ValueError(
          f"{path}: record {i}, field 'category' is {obj['category']!r}, outside the "
          f"class set {list(DOLLY_CATEGORIES)}. Fix the file."
      )
    if not str(obj["instruction"]).strip() or not str(obj["response"]).strip():
      bad.add(f"record {i}", "empty instruction or response")
      continue
    records.append(
        {
            "id": f"{path.name}:{i}",
            "instruction": str(obj["instruction"]),
            "context": str(obj["context"] or ""),
            "response": str(obj["response"]),
            "category": obj["category"],
            "client": client,
        }
    )
  return _result(path, records, bad, f"Dolly records with fields {list(DOLLY_FIELDS)}")


def read_dolly(manual_dir: PathLike, split: str = "train") -> ParseResult:
  """Reads Dolly-15k from ``manual_dir``.

  Layouts (first found wins):

  * ``databricks-dolly-15k.jsonl`` (the official release): split ``"train"`` only, 15,011
    records, ``client = -1``.
  * ``shepherd_10clients/local_training_<i>.json`` + ``global_test.json`` (or those files
    directly in ``manual_dir``): ``"train"`` = the 10 client files (14,931 records,
    ``client = i``), ``"test"`` = global_test.json (80 records, ``client = -1``).

  Records: ``{"id", "instruction", "context", "response", "category", "client"}``.
  """
  d = _check_dir(manual_dir, "dolly")
  official = d / "databricks-dolly-15k.jsonl"
  if official.is_file():
    if split != "train":
      raise ValueError(
          f"{official} has only the 'train' split; got split={split!r}. Use the "
          "shepherd_10clients layout for a test split, or partition 'train' yourself."
      )
    with _open_text(official) as f:
      objs = []
      bad_json = _Malformed(official)
      for i, line in enumerate(f):
        if not line.strip():
          continue
        try:
          objs.append(json.loads(line))
        except json.JSONDecodeError:
          bad_json.add(f"line {i + 1}", "invalid JSON")
    res = _dolly_records(objs, official, -1)
    return ParseResult(res.records, res.malformed + bad_json.report())
  sub = d / "shepherd_10clients" if (d / "shepherd_10clients").is_dir() else d
  if split == "train":
    files = sorted(sub.glob("local_training_*.json"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not files:
      raise _missing(d / "databricks-dolly-15k.jsonl", "dolly")
  elif split == "test":
    files = [sub / "global_test.json"]
    if not files[0].is_file():
      raise _missing(files[0], "dolly")
  else:
    raise ValueError(f"Dolly split must be 'train' or 'test', got {split!r}")
  records, malformed = [], 0
  for fp in files:
    client = int(fp.stem.rsplit("_", 1)[1]) if fp.stem.startswith("local_training_") else -1
    with _open_text(fp) as f:
      try:
        objs = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{fp}: not valid JSON ({e}); expected one JSON array.") from e
    if not isinstance(objs, list):
      raise ValueError(f"{fp}: expected a JSON array of records, got {type(objs).__name__}")
    res = _dolly_records(objs, fp, client)
    records += res.records
    malformed += res.malformed
  return ParseResult(records, malformed)


def dolly_splits(manual_dir: PathLike) -> list[str]:
  """The Dolly splits available in ``manual_dir`` (``["train"]`` or ``["train", "test"]``)."""
  d = _check_dir(manual_dir, "dolly")
  if (d / "databricks-dolly-15k.jsonl").is_file():
    return ["train"]
  return ["train", "test"]


def mmlu_splits(manual_dir: PathLike) -> list[str]:
  """The MMLU splits present in ``manual_dir`` (subset of test, dev, validation)."""
  d = _check_dir(manual_dir, "mmlu")
  out = [
      s
      for s, sub in (("test", "test"), ("dev", "dev"), ("validation", "val"))
      if (d / sub).is_dir()
  ]
  if not out:
    raise _missing(d / "test", "mmlu", "split directory")
  return out


def hellaswag_splits(manual_dir: PathLike) -> list[str]:
  """The HellaSwag splits with a file in ``manual_dir``."""
  d = _check_dir(manual_dir, "hellaswag")
  out = [s for s, names in _HELLASWAG_FILES.items() if any((d / n).is_file() for n in names)]
  if not out:
    raise _missing(d / "hellaswag_val.jsonl", "hellaswag")
  return out


def count_by(records: Sequence[dict], key: str) -> dict[Any, int]:
  """Counts records by ``key`` (sorted by key).

  >>> count_by([{"a": 1}, {"a": 0}, {"a": 1}], "a")
  {0: 1, 1: 2}
  """
  out: dict[Any, int] = {}
  for r in records:
    out[r[key]] = out.get(r[key], 0) + 1
  return dict(sorted(out.items()))

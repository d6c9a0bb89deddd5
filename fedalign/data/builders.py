"""TFDS dataset builders (array_record, TensorFlow-free) for AG News, MMLU, HellaSwag, Dolly.

Each builder reads local files from a *manual directory* (the TFDS manual-download
convention): nothing is downloaded at run time. ``MANUAL_DOWNLOAD_INSTRUCTIONS`` says where a
user with internet gets the full files; shared/data/<dataset> is a ready-made manual dir.

TensorFlow is not needed: with ``file_format="array_record"``, ``download_and_prepare`` writes
the examples with TFDS's numpy/array_record writer and ``as_data_source()`` (or
``tfds.data_source``) reads them back through ``ArrayRecordDataSource``. Only ``tfds.load`` /
``as_dataset`` / ``tfds.as_numpy`` need TF, and they are not used here. ``DatasetInfo`` is built
directly (``dataset_info_from_configs`` needs a package directory with metadata files).

The parsing is shared with :mod:`fedalign.data.sources`, so the fast tests check row counts
through the same code. The number of malformed rows skipped per split is stored in
``builder.info.metadata["malformed_rows"]``.

Example:
    >>> from fedalign.data import builders
    >>> b = builders.prepare("ag_news", manual_dir="../shared/data/ag_news",
    ...                      data_dir="/tmp/tfds")  # doctest: +SKIP
    >>> test = builders.load_records("ag_news", "test", manual_dir="../shared/data/ag_news",
    ...                              data_dir="/tmp/tfds")  # doctest: +SKIP
    >>> len(test), test[0]["label"]  # doctest: +SKIP
    (7600, 2)
    >>> import grain  # doctest: +SKIP
    >>> # random access + grain transforms, still without TensorFlow:
    >>> ds = grain.MapDataset.source(b.as_data_source()["test"]).map(decode_example)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import inspect
import json
import pathlib
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from fedalign.data import sources

PathLike = str | pathlib.Path

_CITATIONS = {
    "ag_news": "Zhang, Zhao, LeCun. Character-level Convolutional Networks for Text "
    "Classification. NIPS 2015.",
    "mmlu": "Hendrycks et al. Measuring Massive Multitask Language Understanding. ICLR 2021.",
    "hellaswag": "Zellers et al. HellaSwag: Can a Machine Really Finish Your Sentence? ACL 2019.",
    "dolly": "Conover et al. Free Dolly: Introducing the World's First Truly Open "
    "Instruction-Tuned LLM. Databricks, 2023.",
}


class _ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common part: splits are read by a ``sources`` reader; malformed counts go to metadata."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release (array_record, manual_dir)."}
  DATASET: str = ""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default probes `importlib_resources.abc.Traversable` for packages installed
    # in editable mode, and that backport is not a dependency here: use the file directly.
    return epath.Path(inspect.getfile(cls))

  def _features(self) -> tfds.features.FeaturesDict:
    raise NotImplementedError

  def _splits(self, manual_dir: pathlib.Path) -> list[str]:
    raise NotImplementedError

  def _read(self, manual_dir: pathlib.Path, split: str) -> sources.ParseResult:
    raise NotImplementedError

  def _to_example(self, record: dict) -> dict:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(self.__doc__ or "").strip().split("\n")[0],
        features=self._features(),
        citation=_CITATIONS[self.DATASET],
        disable_shuffling=True,  # keep file order: ids, client files and row order stable
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    out = {}
    malformed = {}
    for split in self._splits(manual_dir):
      res = self._read(manual_dir, split)
      malformed[split] = res.malformed
      out[split] = self._generate_examples(res.records)
    self.info.metadata["malformed_rows"] = malformed
    return out

  def _generate_examples(self, records: list[dict]):
    for r in records:
      yield r["id"], self._to_example(r)


class FedalignAgNews(_ManualBuilder):
  """AG News topic classification (4 classes), from a manual directory."""

  DATASET = "ag_news"
  MANUAL_DOWNLOAD_INSTRUCTIONS = sources.DOWNLOAD_INSTRUCTIONS["ag_news"]

  def _features(self):
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(sources.AG_NEWS_CLASSES)),
        }
    )

  def _splits(self, manual_dir):
    return ["train", "test"]

  def _read(self, manual_dir, split):
    return sources.read_ag_news(manual_dir, split)

  def _to_example(self, r):
    return {"id": r["id"], "text": r["text"], "label": r["label"]}


class FedalignMmlu(_ManualBuilder):
  """MMLU 4-way multiple choice over 57 subjects, from a manual directory."""

  DATASET = "mmlu"
  MANUAL_DOWNLOAD_INSTRUCTIONS = sources.DOWNLOAD_INSTRUCTIONS["mmlu"]

  def _features(self):
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "subject": tfds.features.Text(),
            "question": tfds.features.Text(),
            "choices": tfds.features.Sequence(tfds.features.Text(), length=4),
            "answer": tfds.features.ClassLabel(names=list(sources.MMLU_CHOICE_LETTERS)),
        }
    )

  def _splits(self, manual_dir):
    return sources.mmlu_splits(manual_dir)

  def _read(self, manual_dir, split):
    return sources.read_mmlu(manual_dir, split)

  def _to_example(self, r):
    return {k: r[k] for k in ("id", "subject", "question", "choices", "answer")}


class FedalignHellaswag(_ManualBuilder):
  """HellaSwag sentence completion (4 endings), from a manual directory."""

  DATASET = "hellaswag"
  MANUAL_DOWNLOAD_INSTRUCTIONS = sources.DOWNLOAD_INSTRUCTIONS["hellaswag"]

  def _features(self):
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "row": np.int32,
            "activity_label": tfds.features.Text(),
            "ctx": tfds.features.Text(),
            "endings": tfds.features.Sequence(tfds.features.Text(), length=4),
            "label": tfds.features.ClassLabel(num_classes=4),
        }
    )

  def _splits(self, manual_dir):
    return sources.hellaswag_splits(manual_dir)

  def _read(self, manual_dir, split):
    return sources.read_hellaswag(manual_dir, split)

  def _to_example(self, r):
    return {k: r[k] for k in ("id", "row", "activity_label", "ctx", "endings", "label")}


class FedalignDolly(_ManualBuilder):
  """databricks-dolly-15k instruction tuning (8 categories), from a manual directory."""

  DATASET = "dolly"
  MANUAL_DOWNLOAD_INSTRUCTIONS = sources.DOWNLOAD_INSTRUCTIONS["dolly"]

  def _features(self):
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "instruction": tfds.features.Text(),
            "context": tfds.features.Text(),
            "response": tfds.features.Text(),
            "category": tfds.features.ClassLabel(names=list(sources.DOLLY_CATEGORIES)),
            "client": np.int32,
        }
    )

  def _splits(self, manual_dir):
    return sources.dolly_splits(manual_dir)

  def _read(self, manual_dir, split):
    return sources.read_dolly(manual_dir, split)

  def _to_example(self, r):
    return {k: r[k] for k in ("id", "instruction", "context", "response", "category", "client")}


BUILDERS: dict[str, type[_ManualBuilder]] = {
    "ag_news": FedalignAgNews,
    "mmlu": FedalignMmlu,
    "hellaswag": FedalignHellaswag,
    "dolly": FedalignDolly,
}


def _builder_cls(dataset: str) -> type[_ManualBuilder]:
  if dataset not in BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(BUILDERS)}")
  return BUILDERS[dataset]


def prepare(dataset: str, manual_dir: PathLike, data_dir: PathLike) -> tfds.core.DatasetBuilder:
  """Builds ``dataset`` (array_record) into ``data_dir`` from ``manual_dir`` if not built yet.

  Args:
    dataset: one of ``"ag_news"``, ``"mmlu"``, ``"hellaswag"``, ``"dolly"``.
    manual_dir: directory with the raw files (e.g. ``../shared/data/mmlu``).
    data_dir: TFDS data directory to write to / read from.

  Returns:
    The prepared builder; ``builder.as_data_source()[split]`` gives random access.

  Raises:
    FileNotFoundError: ``manual_dir`` is missing or empty (message says where to get files).
  """
  cls = _builder_cls(dataset)
  manual = pathlib.Path(manual_dir)
  if not manual.is_dir() or not any(manual.iterdir()):
    raise FileNotFoundError(
        f"manual_dir {manual} for {dataset} is missing or empty. "
        f"{sources.DOWNLOAD_INSTRUCTIONS[dataset]}"
    )
  builder = cls(data_dir=str(data_dir), file_format="array_record")
  fingerprint = source_fingerprint(manual)
  record = pathlib.Path(str(builder.data_dir)) / SOURCES_RECORD
  if record.is_file():  # built before: from the files that are there now?
    built = json.loads(record.read_text())
    changed = sorted(k for k in set(built) | set(fingerprint) if built.get(k) != fingerprint.get(k))
    if changed:
      raise ValueError(
          f"{builder.data_dir} holds {dataset} built from other files than those now in "
          f"manual_dir {manual} (changed, added or removed: {', '.join(changed[:5])}"
          f"{', ...' if len(changed) > 5 else ''}): delete {builder.data_dir} to build it again "
          "from the current files (a run resumed in this workdir then trains on other data), "
          "or restore the files."
      )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  if not record.is_file():
    record.write_text(json.dumps(fingerprint, indent=0, sort_keys=True))
  return builder


SOURCES_RECORD = "fedalign_sources.json"  # beside the built files: what they were built from


def source_fingerprint(manual_dir: PathLike) -> dict[str, str]:
  """SHA-256 of every file under ``manual_dir``, by relative path: :func:`prepare` refuses a
  build made from other files (it would otherwise serve the old data).

  >>> import pathlib, tempfile
  >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "test.csv").write_text("1,a,b")
  >>> list(source_fingerprint(d))
  ['test.csv']
  """
  root = pathlib.Path(manual_dir)
  out = {}
  for path in sorted(p for p in root.rglob("*") if p.is_file()):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    out[path.relative_to(root).as_posix()] = digest.hexdigest()
  return out


def decode_example(example: dict) -> dict:
  """Turns a data-source example (bytes, numpy arrays) into plain Python (str, int, list).

  >>> decode_example({"text": b"hi", "label": np.int64(2), "endings": np.array([b"a"])})
  {'text': 'hi', 'label': 2, 'endings': ['a']}
  """

  def conv(v: Any) -> Any:
    if isinstance(v, bytes):
      return v.decode("utf-8")
    if isinstance(v, np.ndarray):
      return [conv(x) for x in v.tolist()] if v.ndim else conv(v.item())
    if isinstance(v, (list, tuple)):
      return [conv(x) for x in v]
    if isinstance(v, np.generic):
      return v.item()
    return v

  return {k: conv(v) for k, v in example.items()}


def records_from_source(source: Any, chunk: int = 4096) -> list[dict]:
  """Reads every example of a TFDS data source (``ArrayRecordDataSource``) as plain dicts."""
  n = len(source)
  out: list[dict] = []
  for start in range(0, n, chunk):
    idx = list(range(start, min(n, start + chunk)))
    try:
      items = source.__getitems__(idx)
    except (AttributeError, TypeError):  # no batch read (e.g. tfds.testing.mock_data)
      items = [source[i] for i in idx]
    out.extend(decode_example(x) for x in items)
  return out


def load_records(dataset: str, split: str, manual_dir: PathLike, data_dir: PathLike) -> list[dict]:
  """Prepares ``dataset`` if needed and returns ``split`` as a list of plain dicts.

  Example:
    >>> recs = load_records("mmlu", "dev", "../shared/data/mmlu", "/tmp/tfds")  # doctest: +SKIP
    >>> len(recs)  # doctest: +SKIP
    285
  """
  builder = prepare(dataset, manual_dir, data_dir)
  sources_by_split = builder.as_data_source()
  if split not in sources_by_split:
    raise ValueError(f"{dataset} has splits {sorted(sources_by_split)}; got split={split!r}")
  return records_from_source(sources_by_split[split])


def malformed_rows(builder: tfds.core.DatasetBuilder) -> dict[str, int]:
  """Malformed rows skipped per split when ``builder`` was prepared."""
  return dict(builder.info.metadata.get("malformed_rows", {}))

"""TFDS builders and raw readers: real files in ../shared/data, fake dirs, bad input."""

import gzip
import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fedalign.data import builders, sources

# ----------------------------------------------------------------------------- raw readers


def test_ag_news_raw_counts(shared_data):
  test = sources.read_ag_news(shared_data / "ag_news", "test")
  assert (len(test.records), test.malformed) == (7600, 0)
  assert sources.count_by(test.records, "label") == {0: 1900, 1: 1900, 2: 1900, 3: 1900}
  train = sources.read_ag_news(shared_data / "ag_news", "train")
  assert (len(train.records), train.malformed) == (9777, 0)  # 2 x 5,000 - 223 shared rows
  assert set(sources.count_by(train.records, "label")) == {0, 1, 2, 3}


def test_mmlu_raw_counts(shared_data):
  test = sources.read_mmlu(shared_data / "mmlu", "test")
  assert (len(test.records), test.malformed) == (14042, 0)
  subjects = sources.count_by(test.records, "subject")
  assert len(subjects) == 57 and subjects["professional_law"] == 1534
  assert sources.count_by(test.records, "answer") == {0: 3222, 1: 3462, 2: 3582, 3: 3776}
  first = test.records[0]
  assert first["subject"] == "abstract_algebra" and first["choices"] == ["0", "4", "2", "6"]
  assert first["answer"] == 1
  assert len(sources.read_mmlu(shared_data / "mmlu", "dev").records) == 285


def test_hellaswag_raw_counts_and_formats_agree(shared_data):
  d = shared_data / "hellaswag"
  a = sources.read_hellaswag_file(d / "hellaswag_val.jsonl.gz")
  b = sources.read_hellaswag_file(d / "hellaswag_val_full.txt.bz2")
  assert len(a.records) == len(b.records) == 10042 and a.malformed == b.malformed == 0
  assert sources.count_by(a.records, "label") == {0: 2515, 1: 2485, 2: 2584, 3: 2458}
  keys = ("activity_label", "ctx", "endings", "label", "row")
  assert all(all(x[k] == y[k] for k in keys) for x, y in zip(a.records, b.records))
  assert a.records[0]["ctx"] == "A man is sitting on a roof. he" and a.records[0]["label"] == 3


def test_dolly_raw_counts(shared_data):
  train = sources.read_dolly(shared_data / "dolly", "train")
  test = sources.read_dolly(shared_data / "dolly", "test")
  assert (len(train.records), len(test.records)) == (14931, 80)
  allc = sources.count_by(train.records + test.records, "category")
  assert sum(allc.values()) == 15011
  assert allc["open_qa"] == 3742 and allc["creative_writing"] == 709
  assert set(sources.count_by(train.records, "client")) == set(range(10))


# ----------------------------------------------------------------------------- TFDS builds


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.mark.parametrize(
    "dataset, split_counts, label_key, labels",
    [
        ("ag_news", {"train": 9777, "test": 7600}, "label", {0, 1, 2, 3}),
        ("mmlu", {"test": 14042, "dev": 285}, "answer", {0, 1, 2, 3}),
        ("hellaswag", {"validation": 10042}, "label", {0, 1, 2, 3}),
        ("dolly", {"train": 14931, "test": 80}, "category", set(range(8))),
    ],
)
def test_tfds_build_real_files(shared_data, tfds_dir, dataset, split_counts, label_key, labels):
  b = builders.prepare(dataset, shared_data / dataset, tfds_dir)
  assert b.info.file_format.value == "array_record"
  srcs = b.as_data_source()
  assert {s: len(srcs[s]) for s in srcs} == split_counts
  assert builders.malformed_rows(b) == {s: 0 for s in split_counts}
  split = next(iter(split_counts))
  recs = builders.records_from_source(srcs[split])
  assert {r[label_key] for r in recs} == labels
  if dataset == "ag_news":
    test = builders.records_from_source(srcs["test"])
    assert np.bincount([r["label"] for r in test]).tolist() == [1900] * 4
  if dataset == "mmlu":
    assert len({r["subject"] for r in recs}) == 57
  if dataset == "dolly":
    assert sum(split_counts.values()) == 15011


def test_tfds_data_source_by_name(shared_data, tfds_dir):
  builders.prepare("mmlu", shared_data / "mmlu", tfds_dir)  # reuses the build above
  ds = tfds.data_source("fedalign_mmlu", split="dev", data_dir=str(tfds_dir))
  rec = builders.decode_example(ds[0])
  assert len(ds) == 285 and rec["subject"] == "abstract_algebra" and len(rec["choices"]) == 4


def test_mock_data_without_tensorflow(tmp_path):
  """tfds.testing.mock_data works TF-free with as_data_source (random examples from code)."""
  with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
    b = builders.FedalignHellaswag(data_dir=str(tmp_path), file_format="array_record")
    src = b.as_data_source(split="validation")
    recs = builders.records_from_source(src)
  assert len(recs) == 7
  assert set(recs[0]) == {"id", "row", "activity_label", "ctx", "endings", "label"}
  assert len(recs[0]["endings"]) == 4 and isinstance(recs[0]["ctx"], str)


# ----------------------------------------------------------------------------- fake dirs


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return path


def test_fake_dirs_all_formats(tmp_path):
  """Small fake manual dirs in the *original* upstream formats build and read back."""
  ag = tmp_path / "ag"
  _write(ag / "train.csv", '"1","T1","D1"\n"2","T2","D2"\n"2","T2","D2"\n')
  _write(ag / "test.csv", '"4","T3","D3 \\ more"\n')
  mm = tmp_path / "mm"
  _write(mm / "test" / "anatomy_test.csv", 'Q1?,a,b,c,d,C\n"Q,2",a,b,c,d,A\n')
  _write(mm / "dev" / "anatomy_dev.csv", "Q0?,a,b,c,d,B\n")
  hs = tmp_path / "hs"
  raw = {
      "ind": 4,
      "activity_label": "Cooking",
      "ctx_a": "A man cooks.",
      "ctx_b": "he",
      "endings": ["stirs. [title] Add salt", "b", "c", "d"],
      "label": 2,
  }
  _write(hs / "hellaswag_val.jsonl", json.dumps(raw) + "\n")
  do = tmp_path / "do"
  rows = [{"instruction": "Hi?", "context": "", "response": "Hello.", "category": "open_qa"}]
  _write(do / "databricks-dolly-15k.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

  data_dir = tmp_path / "tfds"
  agr = builders.load_records("ag_news", "train", ag, data_dir)
  assert [r["label"] for r in agr] == [0, 1, 1]  # full train.csv: no dedup within a file
  assert builders.load_records("ag_news", "test", ag, data_dir)[0]["text"] == "T3 D3 \\ more"
  mmr = builders.load_records("mmlu", "test", mm, data_dir)
  assert [r["answer"] for r in mmr] == [2, 0] and mmr[1]["question"] == "Q,2"
  assert builders.load_records("mmlu", "dev", mm, data_dir)[0]["answer"] == 1
  (h,) = builders.load_records("hellaswag", "validation", hs, data_dir)
  assert h["ctx"] == "A man cooks. He" and h["endings"][0] == "stirs.. Add salt"
  assert (h["row"], h["label"]) == (4, 2)
  (d,) = builders.load_records("dolly", "train", do, data_dir)
  assert d["category"] == sources.DOLLY_CATEGORIES.index("open_qa") and d["client"] == -1


# ----------------------------------------------------------------------------- bad input


def test_missing_directory_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.*manual_dir"):
    sources.read_ag_news(tmp_path / "nope", "test")
  with pytest.raises(FileNotFoundError, match="hendrycks"):
    sources.read_mmlu(tmp_path, "test")
  with pytest.raises(FileNotFoundError, match="missing or empty"):
    builders.prepare("hellaswag", tmp_path / "nope", tmp_path / "tfds")
  (tmp_path / "x").mkdir()
  _write(tmp_path / "x" / "readme.txt", "nothing here")
  with pytest.raises(FileNotFoundError, match="hellaswag_val.jsonl"):
    builders.prepare("hellaswag", tmp_path / "x", tmp_path / "tfds")


def test_wrong_columns_errors(tmp_path):
  p = _write(tmp_path / "test.csv", '"1","only two"\n')
  with pytest.raises(ValueError, match=r"test\.csv.*2 column.*expected 3"):
    sources.read_ag_news_csv(p)
  p = _write(tmp_path / "t" / "law_test.csv", "question,a,b,c,d,answer\nQ,1,2,3,4,0\n")
  with pytest.raises(ValueError, match=r"law_test\.csv.*header.*choice0"):
    sources.read_mmlu_csv(p)
  p = _write(tmp_path / "h.jsonl", json.dumps({"context": "x", "endings": []}) + "\n")
  with pytest.raises(ValueError, match=r"h\.jsonl.*missing \['ctx'"):
    sources.read_hellaswag_file(p)
  d = tmp_path / "d"
  _write(d / "databricks-dolly-15k.jsonl", json.dumps({"instruction": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"databricks-dolly-15k\.jsonl.*missing.*response"):
    sources.read_dolly(d)


def test_labels_outside_class_set(tmp_path):
  p = _write(tmp_path / "test.csv", '"1","a","b"\n"5","c","d"\n')
  with pytest.raises(ValueError, match=r"test\.csv: row 1, column 0.*'5'.*class set 1-4"):
    sources.read_ag_news_csv(p)
  p = _write(tmp_path / "hf.csv", '"text",0\n"text",4\n')
  with pytest.raises(ValueError, match=r"hf\.csv.*'4'.*0-3"):
    sources.read_ag_news_csv(p, fmt="hf")
  p = _write(tmp_path / "m" / "x_test.csv", "Q,a,b,c,d,E\n")
  with pytest.raises(ValueError, match=r"x_test\.csv.*'answer'.*'E'"):
    sources.read_mmlu_csv(p)
  p = _write(tmp_path / "h.jsonl", json.dumps({"ctx": "c", "endings": list("abcd"), "label": 7}))
  with pytest.raises(ValueError, match=r"h\.jsonl.*'label'.*7"):
    sources.read_hellaswag_file(p)
  d = tmp_path / "d"
  rows = [{"instruction": "i", "context": "", "response": "r", "category": "poetry"}]
  _write(d / "databricks-dolly-15k.jsonl", json.dumps(rows[0]) + "\n")
  with pytest.raises(ValueError, match=r"'category'.*'poetry'"):
    sources.read_dolly(d)


def test_malformed_rows_counted_and_reported(tmp_path, caplog):
  ag = tmp_path / "ag"
  _write(ag / "test.csv", '"1","a","b"\n"2","only"\n"x","c","d"\n"3","e","f"\n"4","",""\n')
  with caplog.at_level(logging.WARNING):
    res = sources.read_ag_news(ag, "test")
  assert len(res.records) == 2 and res.malformed == 3
  assert "skipped 3 malformed row(s)" in caplog.text and "test.csv" in caplog.text
  _write(ag / "train.csv", '"1","a","b"\n')
  b = builders.prepare("ag_news", ag, tmp_path / "tfds")
  assert builders.malformed_rows(b) == {"train": 0, "test": 3}
  assert len(b.as_data_source()["test"]) == 2

  hs = tmp_path / "hs"
  good = {"ctx": "c", "endings": list("abcd"), "label": 1, "activity_label": "A"}
  bad = {"ctx": "c", "endings": ["a"], "label": 1}
  hs.mkdir()
  with gzip.open(hs / "hellaswag_val.jsonl.gz", "wt") as f:
    f.write(json.dumps(good) + "\n" + json.dumps(bad) + "\n{not json\n")
  res = sources.read_hellaswag(hs)
  assert len(res.records) == 1 and res.malformed == 2


def test_empty_undecodable_and_damaged_files_name_the_file(tmp_path):
  """A file without a usable row, a binary file and a broken archive each raise ValueError
  naming the file (they used to surface as TFDS's 'No examples were yielded', a bare
  UnicodeDecodeError, or an empty split found later by the partitioner)."""
  p = _write(tmp_path / "ag" / "test.csv", "")
  with pytest.raises(ValueError, match=r"ag/test\.csv: no usable rows: it is empty; expected CSV"):
    sources.read_ag_news_csv(p)
  _write(tmp_path / "ag" / "test.csv", '"1","only"\n\n"2","x"\n')
  with pytest.raises(ValueError, match=r"no usable rows: all 3 row\(s\) malformed"):
    sources.read_ag_news_csv(p, fmt="hf")
  p.write_bytes(bytes(range(256)) * 4)
  with pytest.raises(ValueError, match=r"test\.csv: cannot be read as UTF-8 text"):
    sources.read_ag_news_csv(p)
  m = _write(tmp_path / "mm" / "test" / "law_test.csv", "")
  with pytest.raises(ValueError, match=r"law_test\.csv: no usable rows.*MMLU"):
    sources.read_mmlu(tmp_path / "mm", "test")
  h = _write(tmp_path / "hs" / "hellaswag_val.jsonl", "\n")
  with pytest.raises(ValueError, match=r"hellaswag_val\.jsonl: no usable rows.*JSON Lines"):
    sources.read_hellaswag(tmp_path / "hs")
  h.unlink()
  (tmp_path / "hs" / "hellaswag_val.jsonl.gz").write_bytes(b"not gzip at all\n" * 8)
  with pytest.raises(ValueError, match=r"hellaswag_val\.jsonl\.gz: cannot be read as UTF-8"):
    sources.read_hellaswag(tmp_path / "hs")
  assert m.is_file()


def test_a_build_from_other_files_is_refused(tmp_path):
  """prepare() records what it built from; edited source files are not served from the old
  build (they were, silently) but refused with what to do."""
  ag = tmp_path / "ag"
  _write(ag / "train.csv", '"1","a","b"\n"2","c","d"\n')
  _write(ag / "test.csv", '"3","e","f"\n"4","g","h"\n')
  assert len(builders.load_records("ag_news", "test", ag, tmp_path / "tfds")) == 2
  assert len(builders.load_records("ag_news", "test", ag, tmp_path / "tfds")) == 2  # reused
  _write(ag / "test.csv", '"3","e","f"\n')
  with pytest.raises(ValueError, match=r"built from other files .* test\.csv\): delete .*1\.0\.0"):
    builders.load_records("ag_news", "test", ag, tmp_path / "tfds")
  _write(ag / "test.csv", '"3","e","f"\n"4","g","h"\n')  # restored: served again
  assert len(builders.load_records("ag_news", "test", ag, tmp_path / "tfds")) == 2
  assert builders.source_fingerprint(ag).keys() == {"test.csv", "train.csv"}

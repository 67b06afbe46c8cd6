"""The task registry, prompts, and data loading (real GLUE files and small synthetic ones)."""
import csv
import json

import datasets
import pytest

from jax_nlu_ppo.nlu import answer
from jax_nlu_ppo.nlu import data
from jax_nlu_ppo.nlu import tasks

GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "ax")

# Row counts from ../shared/data/README.md (and the official GLUE counts).
LOCAL_SPLITS = {
    ("cola", "train"): 8551, ("cola", "validation"): 1043,
    ("sst2", "train"): 67349, ("sst2", "validation"): 872,
    ("mrpc", "train"): 3668, ("mrpc", "validation"): 408,
    ("stsb", "train"): 5749, ("stsb", "validation"): 1500,
    ("rte", "train"): 2490, ("rte", "validation"): 277,
    ("wnli", "train"): 635, ("wnli", "validation"): 71,
    ("qnli", "validation"): 5463,
    ("mnli", "validation_matched"): 9815, ("mnli", "validation_mismatched"): 9832,
}
LMBFF = "subsets/lmbff_k-shot_16-42_"


def _synthetic_example(task, label=None):
  example = {c: f"some text for {c}" for c in task.input_columns}
  example["label"] = (2.4 if task.is_regression else 0) if label is None else label
  return example


# Registry and prompts (no data needed).

def test_registry_covers_glue():
  assert tuple(tasks.TASKS) == GLUE_TASKS
  with pytest.raises(KeyError, match="unknown task 'sst-2'.*sst2"):
    tasks.get_task("sst-2")
  for task in tasks.TASKS.values():
    assert task.is_regression == (task.name == "stsb")
    assert set(task.metrics) <= {"accuracy", "f1", "matthews_correlation", "pearson", "spearman"}
    rule = task.extraction_rule()
    assert not rule.lenient and task.extraction_rule(lenient=True).lenient
    for label in range(task.num_labels):  # each label word extracts to its own label
      got = answer.extract(f" {task.answer_word(label)} </Judgement>", rule)
      assert got.label == label


@pytest.mark.parametrize("name", GLUE_TASKS)
def test_paper_prompt(name):
  task = tasks.get_task(name)
  example = _synthetic_example(task)
  prompt = tasks.build_prompt(task, example, "paper")
  assert prompt.endswith("Assistant: <Judgement>")
  assert prompt.count("Assistant:") == 1 and "</Judgement>" in prompt  # in the answer form
  for column in task.input_columns:
    assert f"some text for {column}" in prompt
  shots = [_synthetic_example(task, label=l) for l in ((1.0, 3.25) if task.is_regression
                                                         else range(task.num_labels))]
  few = tasks.build_prompt(task, example, "paper", shots=shots)
  assert few.endswith(prompt.split("\n\n")[-1])
  assert few.count("Assistant:") == len(shots) + 1
  for shot in shots:
    assert f"Assistant: <Judgement> {task.answer_word(shot['label'])} </Judgement>" in few
  # The gold answer of a demonstration parses back to its label under the task's rule.
  demo = few.split("Assistant: <Judgement>")[1]
  assert answer.extract(demo, task.extraction_rule()).label == pytest.approx(shots[0]["label"])


@pytest.mark.parametrize("name", GLUE_TASKS)
def test_chat_prompt(name):
  task = tasks.get_task(name)
  shots = [_synthetic_example(task), _synthetic_example(task)]
  messages = tasks.build_prompt(task, _synthetic_example(task), "chat", shots=shots)
  roles = [m["role"] for m in messages]
  assert roles == ["system"] + ["user", "assistant"] * 3
  assert messages[-1]["content"] == "<Judgement>"
  assert messages[2]["content"].endswith("</Judgement>")
  assert all(isinstance(m["content"], str) and m["content"] for m in messages)


@pytest.mark.parametrize("name", GLUE_TASKS)
def test_plain_prompt(name):
  task = tasks.get_task(name)
  shots = [_synthetic_example(task), _synthetic_example(task)]
  messages = tasks.build_prompt(task, _synthetic_example(task), "plain", shots=shots)
  assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 2 + ["user"]
  assert "Judgement" not in " ".join(m["content"] for m in messages)
  assert messages[2]["content"] == task.answer_word(shots[0]["label"])
  # No closing tag in plain answers: the whole reply is read, even under the training rule.
  rule = task.extraction_rule(lenient=False, fmt="plain")
  assert rule.lenient
  assert answer.extract(messages[2]["content"], rule).label == pytest.approx(shots[0]["label"])
  if not task.is_regression:
    for word in task.label_words:
      assert word in messages[0]["content"]


def test_chat_prompt_renders_with_open_assistant_turn():
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(
      tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
  tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                       "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
  messages = tasks.build_prompt(tasks.get_task("rte"), _synthetic_example(tasks.get_task("rte")),
                                "chat")
  text = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
  assert text.endswith("<|assistant|><Judgement>")


def test_prompt_errors():
  task = tasks.get_task("mrpc")
  with pytest.raises(KeyError, match="no column 'sentence2'"):
    tasks.build_prompt(task, {"sentence1": "a"})
  with pytest.raises(ValueError, match="fmt must be"):
    tasks.build_prompt(task, _synthetic_example(task), "markdown")
  with pytest.raises(ValueError, match="unlabelled"):
    tasks.build_prompt(task, _synthetic_example(task), shots=[_synthetic_example(task, -1)])


# The real GLUE folder.

@pytest.mark.parametrize("name, split", sorted(LOCAL_SPLITS))
def test_glue_dir_rows_and_columns(glue_dir, name, split):
  task = tasks.get_task(name)
  ds, report = data.load_glue_dir(task, split, glue_dir)
  assert len(ds) == LOCAL_SPLITS[name, split]
  assert report.rows_read == report.rows_kept == len(ds) and not report.problems
  assert ds.column_names == [*task.input_columns, "label", "idx"]
  if task.is_regression:
    assert ds.features["label"] == datasets.Value("float32")
    assert 0.0 <= min(ds["label"]) and max(ds["label"]) <= 5.0
  else:
    assert ds.features["label"].names == list(task.label_names)
    assert set(ds["label"]) == set(range(task.num_labels))
  for column in task.input_columns:
    assert all(isinstance(t, str) and t for t in ds[column][:50])


def _raw_rows(path, header=True):
  with open(path, newline="", encoding="utf-8-sig") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  return rows[1:] if header else rows


def test_string_labels_follow_hub_convention(glue_dir):
  # RTE / QNLI: 0 = entailment, 1 = not_entailment; checked row by row against the raw file.
  for name, folder in (("rte", "RTE"), ("qnli", "QNLI")):
    ds, _ = data.load_glue_dir(name, "validation", glue_dir)
    raw = [r[-1] for r in _raw_rows(glue_dir / folder / "dev.tsv")]
    assert ds["label"] == [("entailment", "not_entailment").index(x) for x in raw]
  cola, _ = data.load_glue_dir("cola", "validation", glue_dir)
  raw = _raw_rows(glue_dir / "CoLA" / "dev.tsv", header=False)
  assert cola["label"] == [int(r[1]) for r in raw]
  assert cola["sentence"] == [r[3] for r in raw]


def test_quotes_and_bom_survive(glue_dir):
  mrpc, _ = data.load_glue_dir("mrpc", "validation", glue_dir)
  # Quoting disabled: quote characters stay in the text instead of merging rows.
  assert sum('"' in s for s in mrpc["sentence2"]) > 0
  raw = _raw_rows(glue_dir / "MRPC" / "dev.tsv")
  assert mrpc["sentence1"] == [r[3] for r in raw] and mrpc["label"] == [int(r[0]) for r in raw]


@pytest.mark.parametrize("name, split, count", [
    ("mnli", LMBFF + "train", 48), ("mnli", LMBFF + "dev_matched", 48),
    ("qnli", LMBFF + "train", 32), ("qnli", LMBFF + "dev", 32),
    ("qqp", LMBFF + "train", 32), ("qqp", LMBFF + "dev", 32),
])
def test_lmbff_subsets(glue_dir, name, split, count):
  task = tasks.get_task(name)
  ds, _ = data.load_glue_dir(task, split, glue_dir)
  assert len(ds) == count
  assert sorted(ds["label"]) == sorted(list(range(task.num_labels)) * 16)  # 16 per class
  assert ds.column_names == [*task.input_columns, "label", "idx"]


def test_glue_dir_missing_split(glue_dir):
  # The shared data has QQP's training sample but not its dev set.
  with pytest.raises(data.DataError, match="split 'validation'.*QQP"):
    data.load_glue_dir("qqp", "validation", glue_dir)


def test_prompts_on_real_rows(glue_dir):
  for name, split in (("cola", "validation"), ("stsb", "validation"),
                      ("mnli", "validation_matched")):
    task = tasks.get_task(name)
    train_split = "train" if name != "mnli" else LMBFF + "train"
    shots = data.load_glue_dir(task, train_split, glue_dir)[0].select(range(5))
    ds, _ = data.load_glue_dir(task, split, glue_dir)
    prompt = tasks.build_prompt(task, ds[0], "paper", shots=list(shots))
    assert prompt.count("Assistant:") == 6 and prompt.endswith("<Judgement>")


def test_load_config_shuffle_limit_shard(glue_dir):
  config = data.DataConfig(task="rte", split="validation", source="glue_dir",
                           path=str(glue_dir), shuffle_seed=3, limit=100)
  full, _ = data.load(config)
  again, _ = data.load(config)
  assert len(full) == 100 and full["idx"] == again["idx"]
  assert full["idx"] != list(range(100))
  shards = [list(data.load(config, num_shards=3, shard_index=i)[0]["idx"]) for i in range(3)]
  assert sum(shards, []) == full["idx"]
  with pytest.raises(ValueError, match="shard_index"):
    data.load(config, num_shards=2, shard_index=2)


# Local files with a column mapping, and bad input.

ROWS = [{"text": "fine", "target": "positive"}, {"text": "bad", "target": 0},
        {"text": "ok", "target": 1}]


def _check_sst2(ds, report):
  assert ds["sentence"] == ["fine", "bad", "ok"] and ds["label"] == [1, 0, 1]
  assert report.rows_skipped == 0


def test_local_formats_with_column_map(tmp_path):
  mapping = {"sentence": "text", "label": "target"}
  jsonl = tmp_path / "a.jsonl"
  jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
  _check_sst2(*data.load_file("sst2", jsonl, column_map=mapping))
  array = tmp_path / "a.json"
  array.write_text(json.dumps(ROWS))
  _check_sst2(*data.load_file("sst2", array, column_map=mapping))
  as_text = [{"text": r["text"], "target": str(r["target"])} for r in ROWS]
  tsv = tmp_path / "a.tsv"
  tsv.write_text("text\ttarget\n" + "".join(f'{r["text"]}\t{r["target"]}\n' for r in as_text))
  _check_sst2(*data.load_file("sst2", tsv, column_map=mapping))
  csv_path = tmp_path / "a.csv"
  datasets.Dataset.from_list(as_text).to_csv(str(csv_path), index=False)
  _check_sst2(*data.load_file("sst2", csv_path, column_map=mapping))
  parquet = tmp_path / "a.parquet"
  datasets.Dataset.from_list(as_text).to_parquet(str(parquet))
  _check_sst2(*data.load_file("sst2", parquet, column_map=mapping))
  saved = tmp_path / "saved"
  datasets.DatasetDict({"validation": datasets.Dataset.from_list(as_text)}).save_to_disk(str(saved))
  _check_sst2(*data.load_file("sst2", saved, split="validation", column_map=mapping))
  with pytest.raises(data.DataError, match="holds splits \\['validation'\\]"):
    data.load_file("sst2", saved, split="train", column_map=mapping)
  config = data.DataConfig(task="sst2", split="validation", source="file", path=str(jsonl),
                           column_map=mapping, limit=2)
  assert len(data.load(config)[0]) == 2


def test_bad_rows_are_reported_by_line(tmp_path):
  path = tmp_path / "rte.jsonl"
  lines = [
      json.dumps({"sentence1": "a", "sentence2": "b", "label": "entailment"}),
      json.dumps({"sentence1": "a", "label": 1}),                         # line 2: no sentence2
      json.dumps({"sentence1": "a", "sentence2": "b", "label": "maybe"}),  # line 3: unknown label
      "{not json",                                                         # line 4
      json.dumps({"sentence1": "a", "sentence2": "b", "label": 7}),        # line 5: out of range
      json.dumps({"sentence1": "a", "sentence2": "b", "label": 1}),
  ]
  path.write_text("\n".join(lines) + "\n")
  ds, report = data.load_file("rte", path)
  assert ds["label"] == [0, 1] and ds["idx"] == [0, 5]
  assert (report.rows_read, report.rows_kept, report.rows_skipped) == (6, 2, 4)
  assert str(report.problems[0]) == f"{path}, line 2: missing column 'sentence2' (for 'sentence2')"
  assert str(report.problems[1]).startswith(f"{path}, line 3: unknown label 'maybe'")
  assert str(report.problems[2]).startswith(f"{path}, line 4: not valid JSON")
  assert str(report.problems[3]).startswith(f"{path}, line 5: unknown label 7")
  assert "skipped 4" in report.summary()
  with pytest.raises(data.DataError, match=f"{path}, line 2: missing column"):
    data.load_file("rte", path, strict=True)


def test_tsv_field_count_and_test_split(tmp_path):
  path = tmp_path / "dev.tsv"
  path.write_text('index\tsentence1\tsentence2\tlabel\n0\ta "quoted\tb\t0\n1\tonly two\n')
  ds, report = data.load_file("wnli", path)
  assert ds["sentence1"] == ['a "quoted'] and report.rows_skipped == 1
  assert str(report.problems[0]).startswith(f"{path}, line 3: 2 fields where the header has 4")
  test = tmp_path / "test.tsv"
  test.write_text("index\tsentence1\tsentence2\n0\ta\tb\n")
  ds, _ = data.load_file("wnli", test, split="test")
  assert ds["label"] == [-1]
  with pytest.raises(data.DataError, match="missing column 'label'"):
    data.load_file("wnli", test, strict=True)


@pytest.mark.parametrize("suffix, content", [
    (".jsonl", ""), (".tsv", ""), (".csv", ""), (".jsonl", "\n\n"), (".tsv", "sentence\tlabel\n"),
])
def test_empty_file_names_it(tmp_path, suffix, content):
  path = tmp_path / f"empty{suffix}"
  path.write_text(content)
  with pytest.raises(data.DataError, match=f"{path}.*(empty|no data rows)"):
    data.load_file("sst2", path)


def test_file_errors(tmp_path):
  with pytest.raises(data.DataError, match="does not exist"):
    data.load_file("sst2", tmp_path / "nope.jsonl")
  bad = tmp_path / "a.txt"
  bad.write_text("x")
  with pytest.raises(data.DataError, match="unsupported file type '.txt'"):
    data.load_file("sst2", bad)
  rows = tmp_path / "all_bad.jsonl"
  rows.write_text(json.dumps({"sentence": "x", "label": 5}) + "\n")
  with pytest.raises(data.DataError, match="(?s)no usable rows.*line 1: unknown label 5"):
    data.load_file("sst2", rows)
  with pytest.raises(ValueError, match="column_map names \\['text'\\]"):
    data.load_file("sst2", rows, column_map={"text": "sentence"})
  with pytest.raises(ValueError, match="needs data.path"):
    data.DataConfig(task="sst2", source="file")
  with pytest.raises(KeyError, match="unknown task"):
    data.DataConfig(task="glue")


def test_data_locations_and_an_unreachable_hub(tmp_path, monkeypatch):
  """The `--data` forms eval and perplexity take; without internet, a hub read says how to read
  local data instead."""
  glue = tmp_path / "glue"
  (glue / "SST-2").mkdir(parents=True)
  rows = tmp_path / "rows.jsonl"
  rows.write_text(json.dumps({"sentence": "fine", "label": 1}) + "\n")
  sources = {location: data.data_config_for("sst2", location, "validation").source
             for location in (None, "hub", str(glue), str(rows))}
  assert sources == {None: "auto", "hub": "hub", str(glue): "glue_dir", str(rows): "file"}
  with pytest.raises(data.DataError, match="--data .*nowhere: no such file or folder"):
    data.data_config_for("sst2", str(tmp_path / "nowhere"), "validation")
  assert [tasks.default_eval_split(t) for t in ("sst2", "mnli", "ax")] == [
      "validation", "validation_matched", "test"]

  def offline(config, **_):
    raise ConnectionError("no network")
  monkeypatch.setattr(data, "load", offline)
  with pytest.raises(data.DataError, match="cannot reach the Hugging Face hub for sst2 .*--data"):
    data.load_rows(data.DataConfig(task="sst2", split="validation", source="hub"))

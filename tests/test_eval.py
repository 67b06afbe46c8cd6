"""Evaluation end to end: custom task files, k-shot prompts, mixtures, the `eval` command, and
every GLUE task available locally answered by the real 135M model."""
import json

import numpy as np
import pytest

from jax_nlu_ppo import cli
from jax_nlu_ppo.nlu import data
from jax_nlu_ppo.nlu import evaluate
from jax_nlu_ppo.nlu import task_files
from jax_nlu_ppo.nlu import tasks

REVIEWS_YAML = """
name: toy-reviews
instruction: Decide whether the review is positive or negative.
inputs:
  text: Review
template: "Customer review: {text}"
labels:
  neg: Negative
  pos: Positive
metrics: [accuracy, macro_f1]
data:
  files: {validation: reviews.jsonl, train: reviews.jsonl}
  columns: {text: review, label: sentiment}
"""

# Invented sentences (no dataset text in the repository); the model should get most right.
REVIEWS = [
    ("I loved every minute of it, a wonderful and moving film.", "pos"),
    ("Terrible acting and a boring, pointless story.", "neg"),
    ("A delightful, funny and warm movie that I would happily watch again.", "pos"),
    ("The worst film I have seen this year; a complete waste of time.", "neg"),
    ("Brilliant performances and a beautiful score.", "pos"),
    ("Dull, ugly and far too long.", "neg"),
]


@pytest.fixture
def review_task(tmp_path):
  (tmp_path / "reviews.yaml").write_text(REVIEWS_YAML)
  with open(tmp_path / "reviews.jsonl", "w") as f:
    for text, label in REVIEWS:
      f.write(json.dumps({"review": text, "sentiment": label}) + "\n")
    f.write(json.dumps({"review": "It was fine, I suppose.", "sentiment": "meh"}) + "\n")
    f.write(json.dumps({"sentiment": "pos"}) + "\n")
  return tmp_path / "reviews.yaml"


# Task files and data (no model).

def test_custom_task_file_loads_its_data(review_task):
  task = tasks.get_task(str(review_task))
  assert task.name == "toy-reviews" and task.label_words == ("Negative", "Positive")
  assert task.metrics == ("accuracy", "macro_f1") and task.splits == ("validation", "train")
  ds, report = data.load(data.DataConfig(task=str(review_task), split="validation",
                                         source="task"))
  assert [row["label"] for row in ds] == [1, 0, 1, 0, 1, 0]
  # The two bad rows are skipped, counted, and named by file and line.
  assert report.rows_read == 8 and report.rows_skipped == 2
  assert "reviews.jsonl, line 7: unknown label 'meh'" in str(report.problems[0])
  assert "line 8: missing column 'review'" in str(report.problems[1])
  with pytest.raises(data.DataError, match="strict=True"):
    data.load(data.DataConfig(task=str(review_task), split="validation", source="task",
                              strict=True))
  prompt = tasks.build_prompt(task, ds[0], "chat")
  assert prompt[1]["content"] == f"Customer review: {REVIEWS[0][0]}"
  assert "<Judgement> Negative or Positive </Judgement>" in prompt[0]["content"]
  # Custom label words match in any case by default.
  assert evaluate.score(task, [ds[0]], ["POSITIVE </Judgement>"]).metrics["accuracy"] == 1.0


@pytest.mark.parametrize("edit, message", [
    ({"colour": "red"}, "colour: unknown key"),
    ({"labels": None}, "labels: expected a mapping of at least two"),
    ({"labels": {0: "A", 1: "B", 2: "C"}, "metrics": ["f1"]}, "f1 is binary"),
    ({"metrics": ["bleu"]}, "unknown metric 'bleu'"),
    ({"metrics": ["pearson"]}, "do not suit a classification task"),
    ({"template": "{text} {title}"}, "template: names \\['title'\\]"),
    ({"name": "sst2"}, "a GLUE task's name"),
    ({"data": {"files": {"train": "x.jsonl"}, "columns": {"body": "x"}}},
     "data.columns: 'body' is not a task column"),
])
def test_bad_task_files_name_the_file_and_key(tmp_path, edit, message):
  import yaml
  values = yaml.safe_load(REVIEWS_YAML) | edit
  path = tmp_path / "bad.yaml"
  path.write_text(yaml.safe_dump(values))
  with pytest.raises(task_files.TaskFileError, match=message) as info:
    tasks.get_task(str(path))
  assert str(path) in str(info.value)


def test_shots_are_seeded_per_example():
  pool = [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(50)]
  pool.append({"sentence": "unlabelled", "label": -1, "idx": 50})
  ten = evaluate.draw_shots(pool, 4, seed=3, count=10)
  assert evaluate.draw_shots(pool, 4, seed=3, count=5) == ten[:5]   # a prefix sees the same
  assert evaluate.draw_shots(pool, 4, seed=4, count=10) != ten
  for shots in ten:
    assert len({s["idx"] for s in shots}) == 4 and all(s["label"] != -1 for s in shots)
  first = evaluate.draw_shots(pool, 5, seed=0, count=3, selection="first")
  assert all([s["idx"] for s in shots] == [0, 1, 2, 3, 4] for shots in first)
  with pytest.raises(ValueError, match="need 60 labelled"):
    evaluate.draw_shots(pool, 60, seed=0, count=1)


def test_mixture_follows_weights_and_tags_tasks():
  parts = [[{"x": f"a{i}"} for i in range(5)], [{"x": f"b{i}"} for i in range(100)]]
  mixed = data.mix(parts, [3.0, 1.0], seed=0, size=4000)
  share = np.mean([row["x"].startswith("a") for row in mixed])
  assert abs(share - 0.75) < 0.03
  a_rows = [row["x"] for row in mixed if row["x"].startswith("a")]
  assert a_rows[:7] == ["a0", "a1", "a2", "a3", "a4", "a0", "a1"]   # cycles in order
  assert data.mix(parts, [3.0, 1.0], seed=0, size=4000) == mixed


def test_mixture_of_glue_tasks(glue_dir):
  components = [data.MixtureComponent(data.DataConfig(task=t, split="validation",
                                                      source="glue_dir", path=str(glue_dir),
                                                      limit=20), w)
                for t, w in (("sst2", 1.0), ("rte", 1.0))]
  rows, reports = data.load_mixture(components, seed=0)
  assert len(rows) == 40 and len(reports) == 2
  assert {row["task"] for row in rows} == {"sst2", "rte"}
  assert all(("sentence" in row) == (row["task"] == "sst2") for row in rows)


def test_score_and_json(tmp_path):
  task = tasks.get_task("mrpc")
  examples = [{"sentence1": "a", "sentence2": "b", "label": g, "idx": i}
              for i, g in enumerate([1, 1, 0, 0])]
  result = evaluate.score(task, examples, ["Yes </Judgement>", "No", "Yes No", "No"])
  assert result.metrics["accuracy"] == 0.5 and result.metrics["unparsed_rate"] == 0.25
  assert result.metrics["f1"] == pytest.approx(2 / 3)
  path = tmp_path / "out" / "results.json"
  evaluate.write_json([result], path, {"model": "m"})
  out = json.loads(path.read_text())
  assert out["model"] == "m" and out["task"] == "mrpc" and out["n"] == 4
  assert out["confusion_matrix"]["counts"] == [[1, 0, 1], [1, 1, 0]]  # rows: gold
  assert [p["status"] for p in out["predictions"]] == ["parsed", "parsed", "unparsed", "parsed"]


def test_eval_results_record_the_data_rows_skipped(tmp_path):
  from tests import checkpoint_run
  rows = tmp_path / "dev.jsonl"
  good = [json.dumps(ex) for ex in checkpoint_run.EXAMPLES[:3]]
  rows.write_text("\n".join([good[0], '{"sentence": "x", "label": 7}', good[1], "{oops",
                             good[2]]) + "\n")
  results = evaluate.evaluate_tasks(["sst2"], evaluate.EvalConfig(max_new_tokens=3),
                                    checkpoint_run.tiny_lm, data=str(rows))
  evaluate.write_json(results, tmp_path / "results.json")
  out = json.loads((tmp_path / "results.json").read_text())
  assert out["n"] == 3
  assert out["data"]["rows_read"] == 5 and out["data"]["rows_skipped"] == 2
  skipped = out["data"]["skipped_rows"]
  assert [(row["file"], row["line"]) for row in skipped] == [(str(rows), 2), (str(rows), 4)]
  assert skipped[0]["reason"].startswith("unknown label 7")
  assert skipped[1]["reason"].startswith("not valid JSON")


# The real model.

# Each GLUE task with labelled data here, and the split it is scored on.
LOCAL_EVAL_SPLITS = {
    "cola": "validation", "sst2": "validation", "mrpc": "validation", "stsb": "validation",
    "qqp": "subsets/lmbff_k-shot_16-42_dev", "mnli": "validation_matched",
    "qnli": "validation", "rte": "validation", "wnli": "validation",
}


@pytest.fixture(scope="module")
def lm(smollm2_gguf):
  import jax_nlu_ppo
  return jax_nlu_ppo.load_pretrained("smollm2-135m-instruct", batch_size=4)


@pytest.mark.parametrize("name", LOCAL_EVAL_SPLITS)
def test_every_local_glue_task_evaluates(lm, glue_dir, name):
  task = tasks.get_task(name)
  ds, _ = data.load(data.DataConfig(task=name, split=LOCAL_EVAL_SPLITS[name],
                                    source="glue_dir", path=str(glue_dir), limit=4,
                                    shuffle_seed=0))
  result = evaluate.evaluate_model(lm, task, list(ds), evaluate.EvalConfig(max_new_tokens=8))
  out = result.to_json()
  assert out["n"] == 4 and len(out["predictions"]) == 4
  for metric in task.metrics:
    assert metric in out and (np.isnan(out[metric]) or -1 <= out[metric] <= 1)
  assert 0 <= out["unparsed_rate"] <= 1
  assert ("confusion_matrix" in out) == (not task.is_regression)


def test_too_long_prompts_are_skipped_and_listed(lm):
  task = tasks.get_task("sst2")
  examples = [{"sentence": "A fine film.", "label": 1, "idx": 0},
              {"sentence": "word " * (lm.config.max_position_embeddings + 10), "label": 0,
               "idx": 1}]
  result = evaluate.evaluate_model(lm, task, examples, evaluate.EvalConfig(max_new_tokens=4))
  assert len(result.predictions) == 1 and result.skipped[0]["idx"] == 1
  assert "exceeds the model's" in result.skipped[0]["reason"]


def test_eval_command_on_a_custom_task_and_glue_with_shots(review_task, glue_dir, tmp_path,
                                                           capsys, smollm2_gguf):
  out = tmp_path / "results.json"
  code = cli.main(["eval", "--task", str(review_task), "--task", "sst2", "--data", str(glue_dir),
                   "--limit", "6", "--shots", "2", "--max-new-tokens", "8", "--batch-size", "6",
                   "--output", str(out)])
  assert code == 0
  results = json.loads(out.read_text())
  assert results["model"] == "smollm2-135m-instruct"
  reviews, sst2 = results["tasks"]["toy-reviews"], results["tasks"]["sst2"]
  # --data names a GLUE folder; the custom task still reads the data its file names.
  assert reviews["n"] == 6 and reviews["shots"] == 2 and sst2["n"] == 6
  for result in (reviews, sst2):
    assert {"accuracy", "unparsed_rate", "n", "predictions", "confusion_matrix"} <= set(result)
  assert "macro_f1" in reviews
  assert "toy-reviews" in capsys.readouterr().out


def test_eval_command_errors_are_one_line(tmp_path, capsys):
  assert cli.main(["eval", "--task", "sst-2", "--data", str(tmp_path)]) == 2
  assert "unknown task 'sst-2'" in capsys.readouterr().err
  assert cli.main(["eval", "--task", "sst2", "--data", str(tmp_path / "nowhere")]) == 2
  assert "no such file or folder" in capsys.readouterr().err


def test_perplexity_command_on_a_task_column(glue_dir, tmp_path, capsys, smollm2_gguf):
  out = tmp_path / "ppl.json"
  assert cli.main(["perplexity", "--task", "sst2", "--data", str(glue_dir), "--limit", "8",
                   "--output", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["texts"] == 8 and result["tokens"] > 8 and result["perplexity"] > 1
  assert np.exp(result["nll_per_token"]) == pytest.approx(result["perplexity"], rel=1e-6)
  assert "sst2 validation column 'sentence'" in capsys.readouterr().out
  assert cli.main(["perplexity", "--text", str(tmp_path / "missing.txt")]) == 2
  assert "missing.txt does not exist" in capsys.readouterr().err


def test_every_command_explains_its_options(capsys):
  for command in ("eval", "train", "sft", "perplexity", "export", "report", "plan", "bench"):
    with pytest.raises(SystemExit) as info:
      cli.main([command, "--help"])
    assert info.value.code == 0
    assert "usage: jax-nlu-ppo " + command in capsys.readouterr().out

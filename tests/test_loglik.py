"""Log-likelihood scoring: per-choice log-probabilities against transformers on the same random
weights, rows for every prompt format with and without shots, custom tasks, STS-B refused, and
agreement with lm-evaluation-harness itself on the same prompts."""
import json

import numpy as np
import pytest
import torch

from jax_nlu_ppo.model import pretrained
from jax_nlu_ppo.nlu import answer
from jax_nlu_ppo.nlu import evaluate
from jax_nlu_ppo.nlu import loglik
from jax_nlu_ppo.nlu import tasks
from tests import tiny_hf
from tests.conftest import load_script
from tests.test_eval import REVIEWS, REVIEWS_YAML
from tests.test_ppo_core import tiny_chat_tokenizer

SENTENCES = ["a gorgeous, witty film", "dull and far too long", "the cast is superb",
             "a tedious mess", "warm, funny and smart", "flat characters"]
SST2 = tasks.get_task("sst2")
ROWS = [{"sentence": s, "label": i % 2, "idx": 10 + i} for i, s in enumerate(SENTENCES)]


def _vocabulary_texts(task, rows):
  texts = ["System User Assistant system user assistant", *task.label_words]
  for fmt in tasks.FORMATS:
    prompt = tasks.build_prompt(task, rows[0], fmt, rows[1:3])
    texts += [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
  return texts + [tasks.format_input(task, r) for r in rows]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random model in both frameworks: (our LanguageModel, the transformers model)."""
  folder = tmp_path_factory.mktemp("tiny")
  tokenizer = tiny_chat_tokenizer(_vocabulary_texts(SST2, ROWS))
  torch_model = tiny_hf.save_tiny(folder, vocab_size=len(tokenizer), max_position_embeddings=512)
  tokenizer.save_pretrained(folder)
  # Three rows a batch: several batches, a filled last one, and choices split across batches.
  return pretrained.load_pretrained(str(folder), batch_size=3), torch_model


def _reference(torch_model, rows):
  """sum_t log softmax(logits)[x_t] over each answer's tokens, one unpadded row at a time."""
  out = []
  for prompt, cont in rows:
    ids = torch.tensor([list(prompt) + list(cont)])
    with torch.no_grad():
      logp = torch.log_softmax(torch_model(input_ids=ids).logits[0].double(), -1)
    out.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont)))
  return np.array(out)


@pytest.mark.parametrize("fmt", tasks.FORMATS)
@pytest.mark.parametrize("shots", [0, 2])
def test_choice_logprobs_match_transformers(tiny, fmt, shots):
  lm, torch_model = tiny
  answers = loglik.answer_texts(SST2, fmt)
  choices = [loglik.choice_rows(lm.tokenizer, tasks.build_prompt(SST2, ex, fmt, ROWS[:shots]),
                                answers, fmt != "paper") for ex in ROWS]
  rows = [(c.prompt, a) for c in choices for a in c.answers]
  ours = loglik.score_rows(lm, rows)
  np.testing.assert_allclose(ours, _reference(torch_model, rows), rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("normalize", ["none", "tokens", "chars"])
def test_evaluate_model_chooses_the_most_likely_answer(tiny, normalize):
  lm, torch_model = tiny
  config = evaluate.EvalConfig(scoring="loglik", loglik_normalize=normalize, shots=1)
  result = evaluate.evaluate_model(lm, SST2, ROWS, config, shot_pool=ROWS)
  out = result.to_json()
  assert out["n"] == len(ROWS) and out["unparsed_rate"] == 0 and out["scoring"] == "loglik"
  assert [p["idx"] for p in out["predictions"]] == [r["idx"] for r in ROWS]
  shots = evaluate.draw_shots(ROWS, 1, 0, len(ROWS))
  answers = loglik.answer_texts(SST2, "chat")
  for p, ex, demos in zip(out["predictions"], ROWS, shots):
    c = loglik.choice_rows(lm.tokenizer, tasks.build_prompt(SST2, ex, "chat", demos), answers,
                           True)
    ref = _reference(torch_model, [(c.prompt, a) for a in c.answers])
    np.testing.assert_allclose(p["logprobs"], ref, rtol=1e-5, atol=2e-4)
    divisor = {"none": 1.0, "tokens": np.array([len(a) for a in c.answers]),
               "chars": np.array([len(a) for a in answers])}[normalize]
    assert p["prediction"] == int(np.argmax(ref / divisor)) and p["label"] == ex["label"]
    assert p["response"] == answers[p["prediction"]]
  assert out["accuracy"] == np.mean([p["prediction"] == p["label"] for p in out["predictions"]])


@pytest.mark.parametrize("fmt", tasks.FORMATS)
def test_every_format_rows_extend_the_prompt_and_parse_as_their_label(tiny, fmt):
  lm, _ = tiny
  chat = fmt != "paper"
  rule = SST2.extraction_rule(lenient=False, fmt=fmt)
  answers = loglik.answer_texts(SST2, fmt)
  for shots in (0, 2):
    prompt = tasks.build_prompt(SST2, ROWS[0], fmt, ROWS[1:1 + shots])
    rows = loglik.choice_rows(lm.tokenizer, prompt, answers, chat)
    assert rows.prompt == pretrained.render_prompt(lm.tokenizer, prompt, chat)
    for label, (text, cont) in enumerate(zip(answers, rows.answers)):
      # The answer is what the training rule (closing tag required) reads as this label.
      assert answer.extract(text, rule).label == label
      whole = pretrained.render_prompt(lm.tokenizer, loglik.with_answer(prompt, text), chat)
      assert whole == rows.prompt + cont and len(cont) >= 1


def test_custom_task(tiny, tmp_path):
  lm, _ = tiny
  (tmp_path / "reviews.yaml").write_text(REVIEWS_YAML)
  (tmp_path / "reviews.jsonl").write_text("".join(
      json.dumps({"review": text, "sentiment": label}) + "\n" for text, label in REVIEWS))
  config = evaluate.EvalConfig(scoring="loglik", prompt_format="plain")
  [result] = evaluate.evaluate_tasks([str(tmp_path / "reviews.yaml")], config, lambda: lm)
  out = result.to_json()
  assert out["n"] == len(REVIEWS) and out["unparsed_rate"] == 0
  assert out["answers"] == ["Negative", "Positive"] and "macro_f1" in out
  assert all(len(p["logprobs"]) == 2 and p["prediction"] in (0, 1) for p in out["predictions"])


def test_regression_task_refused_before_the_model_loads():
  def load():
    raise AssertionError("the model must not load")
  with pytest.raises(ValueError, match="stsb is a regression task"):
    evaluate.evaluate_tasks(["stsb"], evaluate.EvalConfig(scoring="loglik"), load,
                            data="/nonexistent")
  with pytest.raises(ValueError, match="scoring must be one of"):
    evaluate.EvalConfig(scoring="likelihood")
  with pytest.raises(ValueError, match="loglik_normalize"):
    evaluate.EvalConfig(loglik_normalize="bytes")


def test_training_config_key():
  from jax_nlu_ppo import config as config_lib
  from jax_nlu_ppo.nlu import data
  stsb = data.DataConfig(task="stsb", split="validation")
  with pytest.raises(config_lib.ConfigError, match="stsb is a regression task"):
    config_lib.TrainConfig(eval_data=stsb, eval_scoring="loglik")
  with pytest.raises(config_lib.ConfigError, match="eval_scoring must be one of"):
    config_lib.TrainConfig(eval_scoring="sample")
  assert config_lib.TrainConfig(eval_data=stsb).eval_scoring == "generate"


# lm-evaluation-harness itself, on the same prompts, rows and weights.



def test_agrees_with_lm_evaluation_harness(tmp_path, smollm2_gguf):
  """The harness's `hf` model on a tiny random model with SmolLM2's real (BPE) tokenizer, fed our
  rendered prompts and answers: the same choices and log-likelihoods in every format."""
  lm_eval = pytest.importorskip("lm_eval")
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager

  script = load_script("harness_agreement")   # the harness task config and prompt text it uses
  folder = tmp_path / "model"
  tokenizer = pretrained.load_tokenizer(pretrained.resolve(str(smollm2_gguf)))
  tiny_hf.save_tiny(folder, vocab_size=len(tokenizer), max_position_embeddings=1024,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
  tokenizer.save_pretrained(folder)
  lm = pretrained.load_pretrained(str(folder), batch_size=8)
  ours, names = {}, []
  for fmt in tasks.FORMATS:
    config = evaluate.EvalConfig(scoring="loglik", prompt_format=fmt, shots=1)
    ours[fmt] = evaluate.evaluate_model(lm, SST2, ROWS, config, shot_pool=ROWS)
    docs = []
    for ex, demos in zip(ROWS, evaluate.draw_shots(ROWS, 1, 0, len(ROWS))):
      prompt = tasks.build_prompt(SST2, ex, fmt, demos)
      docs.append({"prompt": script.prompt_text(tokenizer, prompt, fmt),
                   "choices": list(loglik.answer_texts(SST2, fmt)),
                   "label": ex["label"]})
    rows = tmp_path / f"{fmt}.jsonl"
    rows.write_text("".join(json.dumps(d) + "\n" for d in docs))
    names.append(f"ours_sst2_{fmt}")
    (tmp_path / f"{fmt}.yaml").write_text(script.HARNESS_TASK.format(
        name=names[-1], rows=rows, cache=tmp_path / "cache"))
  harness = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=8)
  out = lm_eval.simple_evaluate(model=harness, tasks=names, log_samples=True,
                                task_manager=TaskManager(include_path=str(tmp_path)))
  for fmt, name in zip(tasks.FORMATS, names):
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    theirs = np.array([[ll for ll, _ in s["filtered_resps"]] for s in samples])
    mine = np.array([p["logprobs"] for p in ours[fmt].predictions])
    if fmt == "plain":
      # The harness moves the prompt's trailing "\n" into every answer: a constant per row.
      theirs, mine = theirs - theirs[:, :1], mine - mine[:, :1]
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=2e-4)
    assert [p["prediction"] for p in ours[fmt].predictions] == list(theirs.argmax(1))
    assert out["results"][name]["acc,none"] == pytest.approx(ours[fmt].metrics["accuracy"])


def test_eval_command_refuses_stsb_loglik(capsys):
  from jax_nlu_ppo import cli
  assert cli.main(["eval", "--task", "sst2,stsb", "--scoring", "loglik", "--model",
                   "/nonexistent-model"]) == 2
  assert "stsb is a regression task" in capsys.readouterr().err

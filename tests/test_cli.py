"""The command line end to end on a tiny model, as a user runs it: train (with periodic
evaluation) -> eval -> export -> report, and the files each command leaves."""
import json
import pathlib
import re

import pytest
import yaml

from jax_nlu_ppo import cli
from jax_nlu_ppo.nlu import tasks
from tests import tiny_hf
from tests.test_ppo_core import tiny_chat_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SENTENCES = ["a gorgeous, witty film", "dull and far too long", "the cast is superb",
             "a tedious mess", "warm, funny and smart", "flat characters", "pure joy",
             "an hour too long"]


SST2_ROWS = [{"sentence": s, "label": i % 2, "idx": i} for i, s in enumerate(SENTENCES)]


def save_chat_model(folder, seed: int = 0):
  """A tiny Hugging Face model folder (random weights of `seed`) with a chat tokenizer over the
  SST-2 prompts of `SST2_ROWS`."""
  task = tasks.get_task("sst2")
  texts = [m["content"] for ex in SST2_ROWS for m in tasks.build_prompt(task, ex, "chat")]
  tokenizer = tiny_chat_tokenizer(texts + ["system user assistant", *task.label_words])
  tiny_hf.save_tiny(folder, seed=seed, vocab_size=len(tokenizer), max_position_embeddings=512)
  tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """A tiny Hugging Face model folder (weights and a chat tokenizer) and an SST-2-style file."""
  root = tmp_path_factory.mktemp("cli")
  model = root / "tiny-model"
  save_chat_model(model)
  data = root / "sst2.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in SST2_ROWS))
  return root, model, data


def test_train_eval_export_report(workspace, capsys):
  root, model, data = workspace
  run = root / "run"
  overrides = [f"model.name={model}", "data.source=file", f"data.path={data}",
               "eval_data.task=sst2", "eval_data.source=file", f"eval_data.path={data}",
               "eval_every=2", "steps=3", "rollout.batch_size=4", "rollout.min_new_tokens=3",
               "rollout.max_new_tokens=5", "ppo.minibatch_size=4", "ppo.ppo_epochs=1",
               "lora.rank=4", "lora.targets=[q_proj,v_proj]", "reward.lenient=true",
               "checkpoint.best_metric=eval/accuracy"]
  assert cli.main(["train", "--output-dir", str(run), "--set", *overrides]) == 0
  files = {p.name for p in run.iterdir()}
  assert {"config.yaml", "metrics.jsonl", "samples.jsonl", "tensorboard", "checkpoints",
          "eval"} <= files
  lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
  # The starting point (step 0), then steps 1-3; evaluations at 0, 2 (eval_every) and 3 (last).
  assert [x["iteration"] for x in lines] == [0, 1, 2, 3]
  assert [("eval/accuracy" in x) for x in lines] == [True, False, True, True]
  # Nothing recompiles after the first step, evaluations in between notwithstanding.
  assert [x.get("jit/compilations") for x in lines[2:]] == [0, 0]
  assert sorted(p.name for p in (run / "eval").iterdir()) == [
      "step_000000.json", "step_000002.json", "step_000003.json"]
  evaluated = json.loads((run / "eval" / "step_000003.json").read_text())
  assert evaluated["n"] == len(SENTENCES) and evaluated["accuracy"] == lines[-1]["eval/accuracy"]
  assert "3" in {p.name for p in (run / "checkpoints").iterdir()}

  results = root / "eval.json"
  assert cli.main(["eval", "--model", str(run), "--task", "sst2", "--data", str(data),
                   "--output", str(results)]) == 0
  scored = json.loads(results.read_text())
  # The run folder as a model is the trained policy: it scores what the last evaluation did.
  assert scored["accuracy"] == evaluated["accuracy"] and scored["n"] == len(SENTENCES)

  exported = root / "peft"
  assert cli.main(["export", str(run), "--output", str(exported), "--format", "peft"]) == 0
  assert {"adapter_config.json", "adapter_model.safetensors"} <= {
      p.name for p in exported.iterdir()}

  # A run started from the exported adapter (PPO after SFT, say) starts where this one ended:
  # its step-0 answers are the last evaluation's, its KL reference is that policy (KL 0 at the
  # first step), and its config.yaml records the adapter.
  after = root / "after"
  assert cli.main(["train", "--output-dir", str(after), "--init-adapter", str(exported),
                   "--set", *overrides, "steps=1"]) == 0
  start = json.loads((after / "eval" / "step_000000.json").read_text())
  assert [p["response"] for p in start["predictions"]] == [
      p["response"] for p in evaluated["predictions"]]
  first = json.loads((after / "metrics.jsonl").read_text().splitlines()[1])
  assert abs(first["objective/kl"]) < 1e-5
  assert yaml.safe_load((after / "config.yaml").read_text())["model"]["adapter"] == str(exported)
  # Reading that run back, or continuing it, needs its checkpoint only, not the adapter folder
  # it started from.
  exported.rename(root / "peft_moved")
  assert cli.main(["eval", "--model", str(after), "--task", "sst2", "--data", str(data),
                   "--output", str(root / "after.json")]) == 0
  assert cli.main(["train", "--output-dir", str(after), "--init-adapter", str(exported),
                   "--set", *overrides, "steps=2"]) == 0
  lines = [json.loads(x) for x in (after / "metrics.jsonl").read_text().splitlines()]
  assert [x["iteration"] for x in lines] == [0, 1, 2]
  # A fresh run from the moved folder is refused, naming it.
  capsys.readouterr()
  assert cli.main(["train", "--output-dir", str(root / "fresh"), "--init-adapter",
                   str(exported), "--set", *overrides]) == 2
  assert f"{exported / 'adapter_config.json'}: not found" in capsys.readouterr().err

  report = root / "report"
  assert cli.main(["report", str(run), "--output", str(report)]) == 0
  assert {p.name for p in report.iterdir()} == {"metrics.png", "report.md"}
  text = (report / "report.md").read_text()
  assert "| eval/accuracy |" in text and "| env/reward_mean |" in text
  # The eval/ score's first and last values carry their evaluations' bootstrap intervals.
  (first_lo, first_hi), (lo, hi) = (
      json.loads((run / "eval" / f"step_00000{s}.json").read_text())["intervals_95"]["accuracy"]
      for s in (0, 3))
  row = [x for x in text.split("## Final values")[0].splitlines()
         if x.startswith("| eval/accuracy |")][0]
  assert f"[{first_lo:.3f}, {first_hi:.3f}] |" in row and row.endswith(f"[{lo:.3f}, {hi:.3f}] |")
  capsys.readouterr()


def test_shipped_sft_configs_load():
  from jax_nlu_ppo import config as config_lib
  from jax_nlu_ppo.rl import sft
  for name in ("sst2_cpu", "llama2_7b_sst2"):
    config = config_lib.load_config(ROOT / f"configs/sft/{name}.yaml", cls=sft.SFTConfig)
    assert config.data.task == config.eval_data.task == "sst2"
  paper = config_lib.load_config(ROOT / "configs/paper/sst2.yaml")
  assert (config.lora, config.prompt_format, config.epochs) == (
      paper.lora, paper.rollout.prompt_format, paper.epochs)


def test_cpu_comparison_configs_give_sft_and_ppo_the_same_examples():
  """docs/results.md's budgets: per task, SFT and PPO see as many training examples and are
  scored on the same dev rows."""
  from jax_nlu_ppo import config as config_lib
  from jax_nlu_ppo.rl import sft
  for task, examples in (("sst2", 480), ("rte", 320), ("mrpc", 320)):
    ppo = config_lib.load_config(ROOT / f"configs/demo/{task}_cpu.yaml")
    tuned = config_lib.load_config(ROOT / f"configs/sft/{task}_cpu.yaml", cls=sft.SFTConfig)
    assert ppo.data.task == tuned.data.task == ppo.eval_data.task == task
    assert ppo.eval_data == tuned.eval_data
    assert (ppo.steps * ppo.rollout.batch_size * ppo.ppo.group_size
            == tuned.steps * tuned.batch_size == examples)


def test_config_errors_come_before_any_model_load(workspace, capsys):
  root, _, data = workspace
  # A model that does not exist: had it been looked for, the error would name it instead.
  base = ["model.name=/nonexistent/model", "data.source=file", f"data.path={data}"]
  for extra, message in [(["lora.rnak=4"], "unknown config key lora.rnak"),
                         (["ppo.minibatch_size=3"], r"ppo.minibatch_size \(3\) must divide"),
                         (["eval_every=-1"], "eval_every must be >= 0"),
                         (["checkpoint.best_metric=eval/accuracy"], "needs eval_data"),
                         (["data.source=glue_dir", f"data.path={root}/nowhere"],
                          "GLUE folder .*nowhere not found"),
                         (["mesh.data=3"], "mesh .* cannot use 1 devices"),
                         (["reward.function=/nowhere/rewards.py:brevity"],
                          "reward.function .*: no such file /nowhere/rewards.py")]:
    assert cli.main(["train", "--set", *base, *extra]) == 2
    err = capsys.readouterr().err
    assert "nonexistent" not in err, err
    assert err.count("\n") == 1 and re.search(message, err), err

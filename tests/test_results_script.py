"""scripts/results.sh's plan of commands, run against a stand-in `jax-nlu-ppo` that records its
arguments and leaves run folders shaped like the real ones (the commands themselves are tested
on their own): which runs each seed trains, what an evaluation call asks for, and that a run
stopped before its last step is continued, not counted as done."""
import pathlib
import textwrap

from tests.conftest import run_with_stand_in

ROOT = pathlib.Path(__file__).resolve().parents[1]

STAND_IN = textwrap.dedent("""\
    if command == "eval":
      pathlib.Path(value("--output")).write_text(json.dumps({"evaluations": []}))
    elif command == "perplexity":
      pathlib.Path(value("--output")).write_text(json.dumps({"perplexity": 9.0}))
    elif command in ("train", "sft"):
      run = pathlib.Path(value("--output-dir"))
      steps = 15 if "half" in value("--config") or "after" in value("--config") else 30
      (run / "checkpoints" / "5").mkdir(parents=True, exist_ok=True)
      (run / "config.yaml").write_text(f"steps: {steps}\\n")
      if run.name != os.environ.get("STOPPED", ""):
        (run / "checkpoints" / str(steps)).mkdir()
    elif command == "export":
      out = pathlib.Path(value("--output"))
      out.mkdir(parents=True)
      (out / "adapter_config.json").write_text("{}")
    """)


def _results(tmp_path, seeds, stopped="", tables=("main",), **seed_lists):
  return run_with_stand_in(tmp_path, "results.sh", STAND_IN, tables, OUT=str(tmp_path / "out"),
                           SEEDS=seeds, STOPPED=stopped, DATA="/data", **seed_lists)


def _value(call, flag):
  return call[call.index(flag) + 1]


def test_main_table_trains_each_seed_then_scores_it(tmp_path):
  calls = _results(tmp_path, "0 1", stopped="grpo_seed1")
  out = tmp_path / "out" / "main"
  trained = [(c[0], pathlib.Path(_value(c, "--output-dir")).name, _value(c, "--config"))
             for c in calls if c[0] in ("train", "sft")]
  for seed in (0, 1):
    assert [t for t in trained if t[1].endswith(str(seed))] == [
        ("sft", f"sft_seed{seed}", "configs/results/sft/sst2.yaml"),
        ("train", f"ppo_seed{seed}", "configs/results/ppo/sst2.yaml"),
        ("train", f"grpo_seed{seed}", "configs/results/ppo/sst2_grpo.yaml"),
        ("sft", f"sft_half_seed{seed}", "configs/results/sft/sst2_half.yaml"),
        ("train", f"sft_ppo_seed{seed}", "configs/results/ppo/sst2_after_sft.yaml")]
  after = [c for c in calls if c[0] == "train" and "after_sft" in _value(c, "--config")]
  assert _value(after[1], "--init-adapter") == f"{out}/sft_half_seed1/peft"
  assert _value(after[1], "--set") == "seed=1"
  # Seed 1's evaluations: its finished runs (not the stopped GRPO run) and the base model,
  # zero-shot and 4-shot with shot seed 1, on the dev set and the two out-of-domain files.
  evals = [c for c in calls if c[0] == "eval"]
  assert len(evals) == 8 and all("--skip-done" in c for c in evals)
  dev, dev4, ood, ood4 = evals[4:]
  models = [c[i + 1] for c in [dev] for i, x in enumerate(c) if x == "--model"]
  assert models == ["smollm2-135m-instruct", f"{out}/sft_seed1", f"{out}/ppo_seed1",
                    f"{out}/sft_ppo_seed1"]
  assert _value(dev, "--data") == "/data/glue" and _value(dev, "--output") == f"{out}/eval_dev.json"
  assert (_value(dev4, "--shots"), _value(dev4, "--shot-seed")) == ("4", "1")
  assert [ood[i + 1] for i, x in enumerate(ood) if x == "--data"] == [
      "/data/ood/financial_phrasebank_allagree.jsonl", "/data/ood/tweeteval_sentiment_test.jsonl"]
  assert _value(ood, "--limit") == "500" and _value(ood4, "--shot-data") == "/data/glue"
  assert not (out / "grpo_seed1" / "done").exists() and (out / "grpo_seed0" / "done").exists()
  # Called again: only the stopped run trains (it continues from its checkpoint).
  again = _results(tmp_path, "0 1")
  assert [pathlib.Path(_value(c, "--output-dir")).name for c in again
          if c[0] in ("train", "sft")] == ["grpo_seed1"]


def test_other_tables_train_their_configs_and_score_their_data(tmp_path):
  # The tables themselves are tested in test_seed_tables.py (each import of it takes seconds).
  calls = _results(tmp_path, "0", tables=("ablations", "budget", "tasks", "multitask"),
                   ABLATION_SEEDS="0", STAGES="train eval")
  trained = [_value(c, "--config") for c in calls if c[0] in ("train", "sft")]
  assert trained == [
      "configs/results/ppo/sst2.yaml",     # the main PPO run, the ablations' reference row
      *(f"configs/results/ppo/sst2_{n}.yaml" for n in ("kl0", "kl0.2", "kl_adaptive", "clip0.1",
                                                        "clip0.4")),
      "configs/results/sft/sst2_budget.yaml", "configs/results/ppo/sst2_budget.yaml",
      "configs/results/sft/sst2_first160.yaml", "configs/results/ppo/sst2_budget_after_sft.yaml",
      *(f"configs/results/{m}/{t}.yaml" for t in ("qnli", "qqp", "mnli") for m in ("sft", "ppo")),
      "configs/results/ppo/multitask.yaml", "configs/results/ppo/multitask_per_task.yaml"]
  for config in trained:     # every config the script names exists
    assert (ROOT / config).is_file(), config
  main_ppo = [c for c in calls if c[0] == "train" and _value(c, "--config").endswith("/sst2.yaml")]
  assert _value(main_ppo[0], "--output-dir") == str(tmp_path / "out" / "main" / "ppo_seed0")
  after = [c for c in calls if c[0] == "train" and "after_sft" in _value(c, "--config")]
  assert _value(after[0], "--init-adapter") == str(
      tmp_path / "out" / "budget" / "sft_first160_seed0" / "peft")
  perplexity = [pathlib.Path(_value(c, "--output")).name for c in calls if c[0] == "perplexity"]
  assert perplexity == ["perplexity_base.json"] + [
      f"perplexity_{n}_seed0.json" for n in ("kl0", "kl0.2", "kl_adaptive", "clip0.1", "clip0.4",
                                             "main_ppo")]
  evals = {tuple(c[c.index("--task") + 1:c.index("--task") + 2]): c for c in calls
           if c[0] == "eval"}
  qqp = evals[("qqp",)]
  assert (_value(qqp, "--split"), _value(qqp, "--offset"), _value(qqp, "--limit")) == (
      "train", "8999", "500")
  assert _value(evals[("mnli",)], "--split") == "validation_matched"
  nli = [c for c in calls if c[0] == "eval" and _value(c, "--task") == "rte"]
  assert len(nli) == 2 and all(c.count("--data") == 2 for c in nli)   # QNLI and MNLI models
  multitask = [c for c in calls if c[0] == "eval" and c.count("--task") == 3]
  assert len(multitask) == 1 and multitask[0].count("--model") == 2


def test_tasks_table_takes_a_subset_of_its_tasks(tmp_path):
  calls = _results(tmp_path, "0", tables=("tasks",), STAGES="train", TASKS="qqp")
  assert [_value(c, "--config") for c in calls] == ["configs/results/sft/qqp.yaml",
                                                    "configs/results/ppo/qqp.yaml"]

"""scripts/seed_tables.py on results files laid out as `jax-nlu-ppo eval --skip-done` writes
them for scripts/results.sh."""
import json

import numpy as np
from scipy import stats

from tests.conftest import load_script

N = 40


def _entry(model, set_name, correct, shots=0, shot_seed=0, unparsed=0.0):
  predictions = [{"idx": i, "label": i % 2, "prediction": i % 2 if ok else 1 - i % 2}
                 for i, ok in enumerate(correct)]
  return {"model": model, "set": set_name, "unparsed_rate": unparsed,
          "cell": {"shots": shots, "shot_seed": shot_seed}, "predictions": predictions}


def test_main_table_means_seed_intervals_and_paired_differences(tmp_path):
  module = load_script("seed_tables")
  rng = np.random.default_rng(0)
  sft = (rng.random((3, N)) < 0.6)
  ppo = (rng.random((3, N)) < 0.8)
  base = (rng.random(N) < 0.3)
  dev, ood = "sst2 validation", "sst2 tweeteval_sentiment_test.jsonl"
  entries = [_entry("smollm2-135m-instruct", dev, base, unparsed=0.5)]
  entries += [_entry(f"runs/main/sft_seed{s}", dev, sft[s]) for s in range(3)]
  entries += [_entry(f"runs/main/ppo_seed{s}", dev, ppo[s]) for s in range(3)]
  (tmp_path / "main").mkdir()
  (tmp_path / "main" / "eval_dev.json").write_text(json.dumps({"evaluations": entries}))
  (tmp_path / "main" / "eval_ood.json").write_text(json.dumps({"evaluations": [
      _entry(f"runs/main/ppo_seed{s}", ood, ppo[s][::-1]) for s in range(2)]}))
  text, cells, _ = module.main_tables(tmp_path)
  main_table = text.split("Transfer")[0]
  rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in main_table.splitlines()
          if line.startswith("| ") and "---" not in line}
  # PPO's dev cell: mean, Student-t over the 3 seeds (NumPy/SciPy by hand), min..max.
  accs = ppo.mean(axis=1)
  half = stats.t.ppf(0.975, 2) * accs.std(ddof=1) / np.sqrt(3)
  assert rows["PPO"][1] == (f"{accs.mean():.3f} [{accs.mean() - half:.3f}, "
                            f"{accs.mean() + half:.3f}] ({accs.min():.3f}..{accs.max():.3f}) n=3")
  # PPO minus SFT: per-sentence seed means differenced, bootstrapped over the sentences.
  d = ppo.mean(axis=0) - sft.mean(axis=0)
  draws = np.random.default_rng(0).integers(0, N, size=(10_000, N))
  lo, hi = np.percentile(d[draws].mean(axis=1), [2.5, 97.5])
  assert rows["PPO"][3] == f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]" and rows["PPO"][4] == "-"
  # Over the sentences: the seeds' mean per sentence, bootstrapped.
  lo, hi = np.percentile(ppo.mean(axis=0)[draws].mean(axis=1), [2.5, 97.5])
  assert rows["PPO"][2] == f"[{lo:.3f}, {hi:.3f}]"
  assert rows["zero-shot"][1] == f"{base.mean():.3f} n=1" and rows["zero-shot"][6] == "50% |"
  # The transfer table has PPO (two seeds) on TweetEval and nothing to compare it with.
  transfer = [line for line in text.splitlines() if line.startswith("| PPO |")][-1]
  assert transfer.split(" | ")[1].endswith("n=2") and transfer.split(" | ")[2] == "-"
  module.plot(cells, list(cells.order), str(tmp_path / "main.png"))
  assert (tmp_path / "main.png").stat().st_size > 0


def test_models_scored_on_other_examples_are_refused(tmp_path):
  module = load_script("seed_tables")
  (tmp_path / "main").mkdir()
  entries = [_entry("runs/main/sft_seed0", "sst2 validation", [True] * N),
             _entry("runs/main/ppo_seed0", "sst2 validation", [True] * (N - 1))]
  (tmp_path / "main" / "eval_dev.json").write_text(json.dumps({"evaluations": entries}))
  try:
    module.main_tables(tmp_path)
  except ValueError as e:
    assert "ppo_seed0 on sst2 validation: scored other examples" in str(e)
  else:
    raise AssertionError("no error")


def _run_folder(path, lines, config="rollout:\n  batch_size: 16\n"):
  path.mkdir(parents=True)
  (path / "config.yaml").write_text(config)
  (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_ablations_table_reads_accuracy_perplexity_and_final_kl(tmp_path):
  module = load_script("seed_tables")
  rng = np.random.default_rng(1)
  dev = "sst2 validation"
  entries = []
  (tmp_path / "ablations").mkdir()
  for name, root in (("ppo", tmp_path / "main"), ("kl0", tmp_path / "ablations")):
    for seed in (0, 1):
      run = root / f"{name}_seed{seed}"
      kls = rng.random(8) * 3
      _run_folder(run, [{"iteration": i + 1, "objective/kl": float(k), "objective/entropy": 1.0}
                        for i, k in enumerate(kls)])
      entries.append(_entry(str(run), dev, rng.random(N) < 0.7))
      (tmp_path / "ablations" / f"perplexity_{'main_ppo' if name == 'ppo' else name}"
       f"_seed{seed}.json").write_text(json.dumps({"perplexity": 300.0 + 10 * seed}))
  (tmp_path / "ablations" / "perplexity_base.json").write_text(json.dumps({"perplexity": 250.0}))
  (tmp_path / "ablations" / "eval_dev.json").write_text(json.dumps({"evaluations": entries}))
  text = module.ablations_table(tmp_path)
  row = [line for line in text.splitlines() if line.startswith("| KL 0 |")][0].split(" | ")
  kl_finals = []
  for seed in (0, 1):
    lines = [json.loads(x) for x in
             (tmp_path / "ablations" / f"kl0_seed{seed}" / "metrics.jsonl").read_text().splitlines()]
    kl_finals.append(np.mean([x["objective/kl"] for x in lines][-5:]))
  assert row[3] == "305.00 (300.00..310.00) (+22.0%)"
  assert row[4] == f"{np.mean(kl_finals):.2f} ({min(kl_finals):.2f}..{max(kl_finals):.2f})"
  assert "(base 250.00)" in text and row[1].endswith(" n=2")
  assert module.main(["seed_tables", "ablations", str(tmp_path), "--plot",
                      str(tmp_path / "ablations.png")]) == 0
  assert (tmp_path / "ablations.png").stat().st_size > 0


def _body_rows(text):
  """A markdown table's rows below its header, as lists of cells."""
  return [line.strip("| ").split(" | ") for line in text.splitlines()
          if line.startswith("| ") and "---" not in line][1:]


def _bootstrap(d):
  """95% bootstrap interval of a per-example mean, by hand (10,000 draws, seed 0)."""
  draws = np.random.default_rng(0).integers(0, len(d), size=(10_000, len(d)))
  return np.percentile(d[draws].mean(axis=1), [2.5, 97.5])


def test_budget_curve_counts_examples_per_step_and_pairs_each_point(tmp_path):
  module = load_script("seed_tables")
  rng = np.random.default_rng(2)
  # PPO: 16 prompts an iteration, scored at iterations 0, 15, 30 (0, 240, 480 examples), two
  # seeds; SFT: 8 rows a step, scored at steps 30 and 60 (240 and 480), one seed.
  ppo = {(s, it): (rng.random(N) < p).astype(float) for s in (0, 1)
         for it, p in ((0, 0.2), (15, 0.5), (30, 0.8))}
  sft = {(0, st): (rng.random(N) < p).astype(float) for st, p in ((30, 0.6), (60, 0.7))}
  # SFT then PPO: PPO from an SFT adapter on the rows after its 240, scored at its iterations 0
  # and 15 (240 and 480 examples in all), one seed.
  sft_ppo = {(0, it): (rng.random(N) < p).astype(float) for it, p in ((0, 0.6), (15, 0.9))}
  after_sft = "model:\n  adapter: sft/peft\ndata:\n  offset: 240\nrollout:\n  batch_size: 16\n"
  for method, correct, config in (("ppo", ppo, "rollout:\n  batch_size: 16\n"),
                                  ("sft", sft, "batch_size: 8\n"),
                                  ("sft_ppo", sft_ppo, after_sft)):
    for (seed, step), right in correct.items():
      run = tmp_path / "budget" / f"{method}_seed{seed}"
      (run / "eval").mkdir(parents=True, exist_ok=True)
      (run / "config.yaml").write_text(config)
      result = {"task": "sst2", **_entry(str(run), "sst2", right)}
      (run / "eval" / f"step_{step:06d}.json").write_text(json.dumps(result))
  points = module.budget_cells(tmp_path)
  assert sorted(points) == [0, 240, 480]
  text = module.budget_table(tmp_path)
  rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")
          for line in text.splitlines() if line.startswith("| ") and "---" not in line}
  header = rows.pop("examples")
  assert header == ["examples", "SFT", "SFT over the sentences", "SFT minus at 480", "PPO",
                    "PPO over the sentences", "PPO minus at 480", "SFT then PPO",
                    "SFT then PPO over the sentences", "SFT then PPO minus at 480",
                    "PPO minus SFT", "SFT then PPO minus PPO"]
  # PPO at 480: the mean of two seeds, Student-t over them, min..max.
  accs = np.array([ppo[0, 30].mean(), ppo[1, 30].mean()])
  half = stats.t.ppf(0.975, 1) * accs.std(ddof=1) / np.sqrt(2)
  lo, hi = max(accs.mean() - half, 0.0), min(accs.mean() + half, 1.0)
  assert rows["480"][4] == (f"{accs.mean():.3f} [{lo:.3f}, {hi:.3f}] "
                            f"({accs.min():.3f}..{accs.max():.3f}) n=2")
  # PPO at 240 against PPO at 480, paired by sentence over the seeds' means.
  d = (ppo[0, 15] + ppo[1, 15]) / 2 - (ppo[0, 30] + ppo[1, 30]) / 2
  assert rows["240"][6] == "{:+.3f} [{:+.3f}, {:+.3f}]".format(d.mean(), *_bootstrap(d))
  assert rows["480"][6] == "-" and rows["0"][1] == "-"
  # PPO minus SFT at 240: SFT's one seed at step 30 (8 rows a step).
  d = (ppo[0, 15] + ppo[1, 15]) / 2 - sft[0, 30]
  assert rows["240"][10] == "{:+.3f} [{:+.3f}, {:+.3f}]".format(d.mean(), *_bootstrap(d))
  assert rows["240"][1] == f"{sft[0, 30].mean():.3f} n=1"
  # SFT then PPO counts its SFT part's 240 rows: its start is the 240 point, and at 480 it is
  # paired with PPO's two seeds.
  assert rows["240"][7] == f"{sft_ppo[0, 0].mean():.3f} n=1" and rows["0"][7] == "-"
  d = sft_ppo[0, 15] - (ppo[0, 30] + ppo[1, 30]) / 2
  assert rows["480"][11] == "{:+.3f} [{:+.3f}, {:+.3f}]".format(d.mean(), *_bootstrap(d))
  module.plot_budget(points, str(tmp_path / "budget.png"))
  assert (tmp_path / "budget.png").stat().st_size > 0


def test_tasks_table_against_the_best_constant_answer(tmp_path):
  module = load_script("seed_tables")
  rng = np.random.default_rng(3)
  labels = (rng.random(N) < 0.7).astype(int)  # label 1 is the most common
  answers = {"smollm2-135m-instruct": np.ones(N, int),  # collapsed to one answer
             "runs/tasks/qnli_sft_seed0": np.where(rng.random(N) < 0.6, labels, 1 - labels),
             "runs/tasks/qnli_ppo_seed0": np.where(rng.random(N) < 0.8, labels, 1 - labels)}

  def entry(model, set_name):
    return {"model": model, "set": set_name, "unparsed_rate": 0.0, "cell": {"shots": 0},
            "predictions": [{"idx": i, "label": int(labels[i]),
                             "prediction": int(answers[model][i])} for i in range(N)]}

  (tmp_path / "tasks").mkdir()
  (tmp_path / "tasks" / "eval_dev.json").write_text(json.dumps({"evaluations": [
      entry(m, "qnli validation") for m in answers]}))
  # The base model is scored on the out-of-domain set once per NLI task: one row.
  (tmp_path / "tasks" / "eval_ood.json").write_text(json.dumps({"evaluations": [
      entry("smollm2-135m-instruct", "rte sick_test.jsonl"),
      entry("smollm2-135m-instruct", "rte sick_test.jsonl")]}))
  text = module.tasks_table(tmp_path)
  rows = _body_rows(text)
  assert [r[:2] for r in rows] == [[f"qnli validation ({N})", "smollm2-135m-instruct"],
                                   [f"qnli validation ({N})", "qnli_sft_seed0"],
                                   [f"qnli validation ({N})", "qnli_ppo_seed0"],
                                   [f"rte sick_test.jsonl ({N})", "smollm2-135m-instruct"]]
  constant = (labels == 1).astype(float)
  ppo = (answers["runs/tasks/qnli_ppo_seed0"] == labels).astype(float)
  assert rows[2][2] == "{:.3f} [{:.3f}, {:.3f}]".format(ppo.mean(), *_bootstrap(ppo))
  assert rows[2][3] == f"{constant.mean():.3f}"
  d = ppo - constant
  assert rows[2][4] == "{:+.3f} [{:+.3f}, {:+.3f}]".format(d.mean(), *_bootstrap(d))
  # The collapsed base model gives the constant answer: no difference, its answer 100% of the time.
  assert rows[0][4] == "+0.000 [+0.000, +0.000]" and rows[0][5] == "1 (100%)"
  sft = (answers["runs/tasks/qnli_sft_seed0"] == labels).astype(float)
  d = ppo - sft
  assert ("qnli on qnli validation: {:+.3f} [{:+.3f}, {:+.3f}]".format(d.mean(), *_bootstrap(d))
          in text)
  module.plot_tasks(tmp_path, str(tmp_path / "tasks.png"))
  assert (tmp_path / "tasks.png").stat().st_size > 0


def test_multitask_table_against_the_constant_and_per_task_whitening_against_shared(tmp_path):
  module = load_script("seed_tables")
  rng = np.random.default_rng(5)
  labels = {"sst2 validation": rng.integers(0, 2, N), "rte validation": rng.integers(0, 2, N)}
  answers = {("multitask", "sst2 validation"): rng.integers(0, 2, N),
             ("multitask_per_task", "sst2 validation"): rng.integers(0, 2, N),
             ("multitask", "rte validation"): np.zeros(N, int),  # collapsed to one answer
             ("multitask_per_task", "rte validation"): rng.integers(0, 2, N)}
  evaluations = [{"model": f"runs/multitask/{m}_seed0", "set": s, "unparsed_rate": 0.0,
                  "cell": {"shots": 0},
                  "predictions": [{"idx": i, "label": int(labels[s][i]),
                                   "prediction": int(answers[m, s][i])} for i in range(N)]}
                 for m, s in answers]  # interleaved sets, as one eval call per model writes them
  (tmp_path / "multitask").mkdir()
  (tmp_path / "multitask" / "eval_dev.json").write_text(json.dumps({"evaluations": evaluations}))
  assert module.main(["seed_tables", "multitask", str(tmp_path), "--plot",
                      str(tmp_path / "multitask.png")]) == 0
  assert (tmp_path / "multitask.png").stat().st_size > 0
  text = module.multitask_table(tmp_path)
  rows = _body_rows(text)
  assert [r[:2] for r in rows] == [[f"sst2 validation ({N})", "multitask_seed0"],
                                   [f"sst2 validation ({N})", "multitask_per_task_seed0"],
                                   [f"rte validation ({N})", "multitask_seed0"],
                                   [f"rte validation ({N})", "multitask_per_task_seed0"]]
  rte = labels["rte validation"]
  constant = (rte == np.argmax(np.bincount(rte))).astype(float)
  assert rows[2][3] == f"{constant.mean():.3f}" and rows[2][5] == "0 (100%)"
  per_task = (answers["multitask_per_task", "rte validation"] == rte).astype(float)
  shared = (answers["multitask", "rte validation"] == rte).astype(float)
  d = per_task - constant
  assert rows[3][4] == "{:+.3f} [{:+.3f}, {:+.3f}]".format(d.mean(), *_bootstrap(d))
  d = per_task - shared
  assert ("rte validation: {:+.3f} [{:+.3f}, {:+.3f}].".format(d.mean(), *_bootstrap(d))
          in text.splitlines()[-1])

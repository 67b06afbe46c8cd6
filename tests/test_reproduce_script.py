"""scripts/reproduce.sh's plan of commands, run against a stand-in `jax-nlu-ppo` that records its
arguments and writes result files shaped like the real ones (the real commands are each tested
on their own; this checks what the script asks of them, and in which order)."""
import pathlib
import textwrap

from tests.conftest import run_with_stand_in

ROOT = pathlib.Path(__file__).resolve().parents[1]

STAND_IN = textwrap.dedent("""\
    if command in ("eval", "perplexity"):
      result = {"accuracy": 0.5, "unparsed_rate": 0.0} if command == "eval" else {"perplexity": 9.0}
      pathlib.Path(value("--output")).write_text(json.dumps(result))
    elif command in ("train", "sft"):
      run = pathlib.Path(value("--output-dir"))
      run.mkdir(parents=True, exist_ok=True)
      (run / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "eval/accuracy": 0.7}) + "\\n")
    elif command == "report":
      pathlib.Path(value("--output")).mkdir(parents=True, exist_ok=True)
    """)


def _reproduce(tmp_path: pathlib.Path, seeds: str, *tasks: str) -> list[list[str]]:
  """The stand-in's calls of one `SEEDS=seeds scripts/reproduce.sh tasks...` (CPU backend)."""
  return run_with_stand_in(tmp_path, "reproduce.sh", STAND_IN, tasks, OUT=str(tmp_path / "out"),
                           SEEDS=seeds, JAX_PLATFORMS="cpu")


def test_a_later_seed_adds_runs_and_skips_finished_evaluations(tmp_path):
  out = tmp_path / "out"
  first = _reproduce(tmp_path, "0", "sst2")
  assert [c[0] for c in first] == ["eval", "eval", "perplexity", "sft", "train", "perplexity",
                                   "perplexity", "report"]
  assert first[0][first[0].index("--shots") + 1] == "0"
  assert first[3][first[3].index("--config") + 1] == "configs/sft/sst2_cpu.yaml"
  assert first[4][first[4].index("--config") + 1] == "configs/demo/sst2_cpu.yaml"
  assert "seed=0" in first[4]

  second = _reproduce(tmp_path, "1", "sst2")
  # The zero-/4-shot scores and the base perplexity exist: only the new seed's runs are made.
  assert [c[0] for c in second] == ["sft", "train", "perplexity", "perplexity", "report"]
  assert second[1][second[1].index("--output-dir") + 1] == f"{out}/sst2/ppo_seed1"
  # The report covers every seed's runs, not only the ones this call made.
  assert sorted(second[-1][1:-2]) == [f"{out}/sst2/{run}" for run in
                                      ("ppo_seed0", "ppo_seed1", "sft_seed0", "sft_seed1")]
  labels = [line.split("\t")[0] for line in (out / "wall_times.tsv").read_text().splitlines()]
  assert labels.count("sst2 PPO seed 0") == labels.count("sst2 PPO seed 1") == 1
  assert "sst2 0-shot" in labels and "sst2 perplexity sft seed 1" in labels


def test_multitask_is_trained_once_per_seed_then_scored_on_every_task(tmp_path):
  calls = _reproduce(tmp_path, "0", "multitask")
  train, *scored = calls
  assert train[train.index("--config") + 1] == "configs/demo/multitask_cpu.yaml"
  assert "eval_data=null" in train
  assert [c[c.index("--task") + 1] for c in scored] == ["sst2", "rte", "mrpc"]
  assert all(c[0] == "eval" and c[c.index("--limit") + 1] == "200" for c in scored)

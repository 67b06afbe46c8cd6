"""The `jax-nlu-ppo` command (also `python -m jax_nlu_ppo`).

    jax-nlu-ppo eval --model smollm2-135m-instruct --task sst2 --data ../shared/data/glue \\
        --split validation --shots 4 --limit 200 --output results.json
    jax-nlu-ppo train --config configs/demo/sst2_cpu.yaml --set ppo.kl.init_coef=0.1
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time
from typing import Any, Sequence

log = logging.getLogger("jax_nlu_ppo")

# The evaluation split of each GLUE task (`nyu-mll/glue` names; AX has only its test split).
DEFAULT_EVAL_SPLIT = {"mnli": "validation_matched", "ax": "test"}


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  # Our progress at INFO; other libraries (JAX's backend probing, datasets) only when they warn.
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S")
  log.setLevel(logging.INFO)
  from jax_nlu_ppo import config as config_lib
  from jax_nlu_ppo import data as data_lib
  from jax_nlu_ppo import task_files
  try:
    return args.run(args)
  except (config_lib.ConfigError, data_lib.DataError, task_files.TaskFileError, KeyError,
          ValueError, FileNotFoundError) as e:
    # The library's errors already name the file, row or option: one line, no traceback.
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"jax-nlu-ppo {args.command}: error: {message}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jax-nlu-ppo",
      description="PPO with LoRA for natural-language understanding on LLaMA-family models.")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  ev = commands.add_parser(
      "eval", help="zero-shot / k-shot evaluation of a model on GLUE or custom tasks",
      description="Generate answers (greedy), extract the labels, score with each task's "
      "official metric, and write the metrics, unparsed rate, confusion matrix and "
      "per-example predictions as JSON.")
  ev.add_argument("--model", default="smollm2-135m-instruct",
                  help="embedded model name, Hugging Face folder, .gguf file or hub id "
                  "(default: %(default)s)")
  ev.add_argument("--gguf-file", help="with a folder or hub id: which GGUF file in it to read")
  ev.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="parameter and activation dtype (default: %(default)s)")
  ev.add_argument("--task", action="append", required=True, metavar="TASK",
                  help="a GLUE task (nyu-mll/glue config name: cola, sst2, mrpc, stsb, qqp, "
                  "mnli, qnli, rte, wnli, ax) or a custom task YAML file; repeat or separate "
                  "with commas for several tasks")
  ev.add_argument("--data", default=None,
                  help="where the data is: 'hub' (nyu-mll/glue, needs internet), a local GLUE "
                  "folder in the original TSV layout, or a data file (csv/tsv/json/jsonl/"
                  "parquet or a save_to_disk folder). Default: a custom task's own data, "
                  "else 'hub'")
  ev.add_argument("--split", default=None,
                  help="split to score (default: validation; validation_matched for mnli, "
                  "test for ax). With a GLUE folder, other names pick a file in the task's "
                  "folder, e.g. subsets/lmbff_k-shot_16-42_dev")
  ev.add_argument("--limit", type=int, default=None,
                  help="score only the first N examples (after --shuffle-seed)")
  ev.add_argument("--shuffle-seed", type=int, default=None,
                  help="shuffle the split with this seed before --limit (default: file order)")
  ev.add_argument("--shots", type=int, default=0,
                  help="demonstrations per prompt, drawn from the shot split (default: 0)")
  ev.add_argument("--shot-split", default="train",
                  help="split the demonstrations come from (default: %(default)s)")
  ev.add_argument("--shot-data", default=None,
                  help="where the demonstrations are, if not where --data is (same forms)")
  ev.add_argument("--shot-seed", type=int, default=0,
                  help="seed of the demonstration draw (default: %(default)s)")
  ev.add_argument("--shot-selection", default="random", choices=("random", "first"),
                  help="random: demonstrations drawn per example; first: the shot split's "
                  "first rows for every prompt, as the paper's 5-shot baseline "
                  "(default: %(default)s)")
  ev.add_argument("--format", default="chat", choices=("chat", "paper"),
                  help="prompt format: the tokenizer's chat template, or the paper's plain "
                  "text (default: %(default)s)")
  ev.add_argument("--max-new-tokens", type=int, default=32,
                  help="answer length limit (default: %(default)s)")
  ev.add_argument("--strict-parsing", action="store_true",
                  help="the training rule: no </Judgement> means unparsed (default: lenient, "
                  "the whole answer is searched when the tag is missing)")
  ev.add_argument("--random-fallback", action="store_true",
                  help="replace unparsed answers by a random label (the paper's test-server "
                  "submissions); by default unparsed answers count as wrong")
  ev.add_argument("--batch-size", type=int, default=32,
                  help="prompts per generation batch (default: %(default)s)")
  ev.add_argument("--strict-data", action="store_true",
                  help="stop at the first bad data row instead of skipping and counting it")
  ev.add_argument("--output", default=None, help="write the results JSON here")
  ev.set_defaults(run=run_eval)

  tr = commands.add_parser(
      "train", help="PPO training from a YAML config",
      description="PPO with LoRA on a frozen base: rollout, reward, experience, updates. "
      "Metrics go to OUTPUT_DIR/metrics.jsonl when output_dir is set.")
  _config_arguments(tr)
  tr.set_defaults(run=run_train)
  return parser


def _config_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", default=None,
                      help="YAML config (see configs/); defaults apply to what it leaves out")
  parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                      help="dotted overrides, e.g. --set ppo.kl.target=6 lora.rank=16")
  parser.add_argument("--output-dir", default=None,
                      help="the run folder (overrides output_dir in the config)")


# ------------------------------------------------------------------------------------------------
# eval

def _data_config(task_spec: str, data: str | None, split: str, limit: int | None,
                 shuffle_seed: int | None, strict: bool):
  from jax_nlu_ppo import data as data_lib
  from jax_nlu_ppo import tasks as tasks_lib
  task = tasks_lib.get_task(task_spec)
  common = dict(task=task_spec, split=split, limit=limit, shuffle_seed=shuffle_seed,
                strict=strict)
  if data is None:
    source = "task" if task.data is not None else "hub"
    return data_lib.DataConfig(source=source, **common)
  if data == "hub":
    return data_lib.DataConfig(source="hub", **common)
  path = pathlib.Path(data)
  if not path.exists():
    raise data_lib.DataError(f"--data {data}: no such file or folder (give 'hub', a GLUE "
                             "folder or a data file)")
  glue_folder = path.is_dir() and any((path / f).is_dir()
                                      for f in data_lib.GLUE_FOLDERS.values())
  if not glue_folder:
    return data_lib.DataConfig(source="file", path=str(path), **common)
  if task.name in data_lib.GLUE_FOLDERS:
    return data_lib.DataConfig(source="glue_dir", path=str(path), **common)
  # A GLUE folder given for GLUE tasks evaluated beside a custom task: it reads its own data.
  if task.data is not None:
    return data_lib.DataConfig(source="task", **common)
  raise data_lib.DataError(f"--data {data} is a GLUE folder; custom task {task.name} needs a "
                           "data file (or a data section in its task file)")


def _load_rows(config) -> list[dict[str, Any]]:
  from jax_nlu_ppo import data as data_lib
  try:
    ds, report = data_lib.load(config)
  except ConnectionError as e:
    raise data_lib.DataError(
        f"cannot reach the Hugging Face hub for {config.task} ({e}); pass --data with a local "
        "GLUE folder (e.g. ../shared/data/glue) or a data file") from None
  if report.rows_skipped:
    log.warning(report.summary())
  return list(ds)


def _progress(label: str):
  """A progress bar on a terminal, a log line per batch otherwise."""
  from tqdm import tqdm
  if sys.stderr.isatty():
    bar = tqdm(desc=label, unit="ex", leave=False)

    def update(done: int, total: int) -> None:
      bar.total = total
      bar.update(done - bar.n)
      if done >= total:
        bar.close()
    return update
  start = time.perf_counter()

  def log_line(done: int, total: int) -> None:
    rate = done / max(time.perf_counter() - start, 1e-9)
    log.info("%s: %d/%d examples (%.1f ex/s)", label, done, total, rate)
  return log_line


def run_eval(args) -> int:
  from jax_nlu_ppo import evaluate as evaluate_lib
  from jax_nlu_ppo import pretrained
  from jax_nlu_ppo import tasks as tasks_lib

  specs = [t.strip() for item in args.task for t in item.split(",") if t.strip()]
  tasks = [tasks_lib.get_task(spec) for spec in specs]   # fail on a bad name before loading
  config = evaluate_lib.EvalConfig(
      shots=args.shots, shot_seed=args.shot_seed, shot_selection=args.shot_selection,
      prompt_format=args.format,
      max_new_tokens=args.max_new_tokens, lenient=not args.strict_parsing,
      random_fallback=args.random_fallback)
  if args.output:
    _check_writable(pathlib.Path(args.output))
  lm = pretrained.load_pretrained(args.model, args.dtype, args.gguf_file,
                                  batch_size=args.batch_size)
  results = []
  for spec, task in zip(specs, tasks):
    split = args.split or DEFAULT_EVAL_SPLIT.get(task.name, "validation")
    examples = _load_rows(_data_config(spec, args.data, split, args.limit, args.shuffle_seed,
                                       args.strict_data))
    pool = []
    if args.shots:
      pool = _load_rows(_data_config(spec, args.shot_data or args.data, args.shot_split, None,
                                     None, args.strict_data))
    start = time.perf_counter()
    result = evaluate_lib.evaluate_model(lm, task, examples, config, shot_pool=pool,
                                         progress=_progress(f"{task.name} {split}"))
    result.settings.update(split=split, seconds=round(time.perf_counter() - start, 2))
    log.info(result.summary())
    results.append(result)
  _print_table(results)
  if args.output:
    evaluate_lib.write_json(results, args.output, {"model": args.model, "dtype": args.dtype})
    log.info("wrote %s", args.output)
  return 0


def _check_writable(path: pathlib.Path) -> None:
  """Fail before hours of work, not after: the output folder must be creatable and writable."""
  folder = path.parent
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".{path.name}.probe"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"--output {path}: cannot write there ({e.strerror})") from None


def _print_table(results) -> None:
  print(f"{'task':<10} {'n':>6} {'unparsed':>9}  metrics")
  for r in results:
    shown = "  ".join(f"{k} {v:.4f}" for k, v in r.metrics.items()
                      if k not in ("count", "unparsed_rate"))
    print(f"{r.task:<10} {len(r.predictions):>6} {r.metrics['unparsed_rate']:>9.3f}  {shown}")


# ------------------------------------------------------------------------------------------------
# train

def _load_config(args, cls):
  from jax_nlu_ppo import config as config_lib
  overrides = list(args.set)
  if args.output_dir:
    overrides.append(f"output_dir={args.output_dir}")
  return config_lib.load_config(args.config, overrides, cls=cls)


def run_train(args) -> int:
  from jax_nlu_ppo import config as config_lib
  from jax_nlu_ppo import trainer as trainer_lib
  config = _load_config(args, config_lib.TrainConfig)
  trainer = trainer_lib.PPOTrainer(config)
  trainer.train(on_step=lambda m: log.info(trainer_lib.format_metrics(m)))
  return 0


if __name__ == "__main__":
  sys.exit(main())

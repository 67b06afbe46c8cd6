"""The `jax-nlu-ppo` command (also `python -m jax_nlu_ppo`).

    jax-nlu-ppo eval --model smollm2-135m-instruct --task sst2 --data ../shared/data/glue \\
        --split validation --shots 4 --limit 200 --output results.json
    jax-nlu-ppo train --config configs/demo/sst2_cpu.yaml --set ppo.kl.init_coef=0.1
    jax-nlu-ppo sft --config configs/sft/sst2_cpu.yaml --output-dir runs/sft_sst2
    jax-nlu-ppo reward-model --config configs/reward_model/sst2_cpu.yaml --output-dir runs/rm
    jax-nlu-ppo perplexity --task sst2 --data ../shared/data/glue --limit 200
    jax-nlu-ppo report runs/ppo_sst2 runs/sft_sst2 --output reports/sst2

Each command parses its options and calls one library function; what the command shows while it
runs (progress bars or log lines, tables) and the files it writes stay here.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Sequence

from jax_nlu_ppo.model.llama_config import MODEL_PRESETS

# Commands import the library when they run: `--help` and a light command skip datasets, orbax
# and torch.

log = logging.getLogger("jax_nlu_ppo")


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  # Our progress at INFO; other libraries (JAX's backend probing, datasets) only when they warn.
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S")
  log.setLevel(logging.INFO)
  from jax_nlu_ppo import checkpoint as checkpoint_lib
  from jax_nlu_ppo import compiles
  from jax_nlu_ppo import config as config_lib
  from jax_nlu_ppo.nlu import data as data_lib
  from jax_nlu_ppo import run_lock
  from jax_nlu_ppo.nlu import task_files
  from jax_nlu_ppo.rl import run_loop
  try:
    compiles.configure_cache(args.compile_cache)
    return args.run(args)
  except (config_lib.ConfigError, data_lib.DataError, task_files.TaskFileError, KeyError,
          ValueError, FileNotFoundError, checkpoint_lib.CheckpointReadError,
          checkpoint_lib.CheckpointWriteError,
          run_loop.RunawayLossError, run_lock.RunFolderError) as e:
    # The library's errors already name the file, row or option: one line, no traceback.
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"jax-nlu-ppo {args.command}: error: {message}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jax-nlu-ppo",
      description="PPO with LoRA for natural-language understanding on LLaMA-family models.")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for add_parser in (_add_eval_parser, _add_train_parser, _add_sft_parser,
                     _add_reward_model_parser, _add_perplexity_parser, _add_export_parser,
                     _add_report_parser,
                     _add_plan_parser, _add_bench_parser):
    add_parser(commands)
  for command in commands.choices.values():
    command.add_argument(
        "--compile-cache", default=None, metavar="DIR",
        help="keep compiled programs in DIR so that the next run with the same shapes skips "
        "compiling; 'off' to compile afresh (default: $JAX_NLU_PPO_COMPILE_CACHE, else "
        "$JAX_COMPILATION_CACHE_DIR, else a folder under ~/.cache/jax_nlu_ppo)")
  return parser


def _distributed_arguments(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group(
      "several processes", "Run the same command on every host. Cloud TPU pod slices (and SLURM "
      "/ Open MPI jobs) are joined automatically; elsewhere give all three.")
  group.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                     help="process 0's address, the same on every process")
  group.add_argument("--num-processes", type=int, default=None, help="how many processes")
  group.add_argument("--process-id", type=int, default=None, help="this process's id, 0..N-1")


DEFAULT_MODEL = "smollm2-135m-instruct"


def _model_arguments(parser: argparse.ArgumentParser, several: bool = False) -> None:
  what = ("embedded model name, Hugging Face folder, .gguf file, hub id, or a run folder / "
          "checkpoint of train or sft")
  if several:
    parser.add_argument("--model", action="append", default=None,
                        help=f"{what}; repeat for several, each scored on every task and data "
                        f"set (default: {DEFAULT_MODEL})")
  else:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"{what} (default: %(default)s)")
  parser.add_argument("--gguf-file",
                      help="with a folder or hub id: which GGUF file in it to read")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="parameter and activation dtype (default: %(default)s)")


def _config_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", default=None,
                      help="YAML config (see configs/); defaults apply to what it leaves out")
  parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                      help="dotted overrides, e.g. --set ppo.kl.target=6 lora.rank=16")
  parser.add_argument("--output-dir", default=None,
                      help="the run folder (overrides output_dir in the config); a folder "
                      "holding checkpoints continues from the latest one")
  parser.add_argument("--init-adapter", default=None, metavar="PEFT_DIR",
                      help="start from this PEFT adapter (e.g. exported after SFT): the "
                      "config's model.adapter; its LoRA settings must match the config's, and "
                      "it becomes the KL reference")


def _load_config(args, cls):
  from jax_nlu_ppo import config as config_lib
  overrides = list(args.set)
  if args.output_dir:
    overrides.append(f"output_dir={args.output_dir}")
  if args.init_adapter:
    overrides.append(f"model.adapter={args.init_adapter}")
  return config_lib.load_config(args.config, overrides, cls=cls)


def _model_loader(args, batch_size: int = 32, batch_tokens: int | None = None):
  """Loads --model when called, once the command has read its data: a bad path fails first."""
  return lambda: _load_model(args, args.model, batch_size, batch_tokens)


def _load_model(args, model: str, batch_size: int = 32, batch_tokens: int | None = None):
  from jax_nlu_ppo.runs import reader
  lm = reader.load_model(model, args.dtype, args.gguf_file, batch_size)
  lm.batch_tokens = batch_tokens
  return lm


# ------------------------------------------------------------------------------------------------
# eval

def _add_eval_parser(commands) -> None:
  ev = commands.add_parser(
      "eval", help="zero-shot / k-shot evaluation of a model on GLUE or custom tasks",
      description="Generate answers (greedy), extract the labels, score with each task's "
      "official metric, and write the metrics, unparsed rate, confusion matrix and "
      "per-example predictions as JSON. Several models (--model) or data sets (--data) in one "
      "call write one results file and one table, a row per model and set.")
  _model_arguments(ev, several=True)
  ev.add_argument("--task", action="append", required=True, metavar="TASK",
                  help="a GLUE task (nyu-mll/glue config name: cola, sst2, mrpc, stsb, qqp, "
                  "mnli, qnli, rte, wnli, ax) or a custom task YAML file; repeat or separate "
                  "with commas for several tasks")
  ev.add_argument("--data", action="append", default=None,
                  help="where the data is: 'hub' (nyu-mll/glue, needs internet), a local GLUE "
                  "folder in the original TSV layout, or a data file (csv/tsv/json/jsonl/"
                  "parquet or a save_to_disk folder); repeat to score each task on several. "
                  "Default: a custom task's own data, else the GLUE folder "
                  "../shared/data/glue if there, else 'hub'")
  ev.add_argument("--split", default=None,
                  help="split to score (default: validation; validation_matched for mnli, "
                  "test for ax). With a GLUE folder, other names pick a file in the task's "
                  "folder, e.g. subsets/lmbff_k-shot_16-42_dev")
  ev.add_argument("--limit", type=int, default=None,
                  help="score only the first N examples (after --shuffle-seed)")
  ev.add_argument("--shuffle-seed", type=int, default=None,
                  help="shuffle the split with this seed before --limit (default: file order)")
  ev.add_argument("--offset", type=int, default=0,
                  help="drop the first N examples (after --shuffle-seed, before --limit): rows "
                  "a training run with the same shuffle seed did not read, e.g. held-out "
                  "training rows of a task without a labelled dev set (default: 0)")
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
  ev.add_argument("--format", default="chat", choices=("chat", "paper", "plain"),
                  help="prompt format: chat (the paper's <Judgement> answer in the tokenizer's "
                  "chat template), paper (the paper's plain-text prompt) or plain (chat, asking "
                  "for the bare label word) (default: %(default)s)")
  ev.add_argument("--max-new-tokens", type=int, default=32,
                  help="answer length limit (default: %(default)s)")
  ev.add_argument("--scoring", default="generate", choices=("generate", "loglik"),
                  help="generate: greedy answers, parsed; loglik: the label whose answer "
                  "(e.g. ' Positive </Judgement>') is most likely after the prompt, as "
                  "lm-evaluation-harness scores choices (default: %(default)s)")
  ev.add_argument("--loglik-normalize", default="none", choices=("none", "tokens", "chars"),
                  help="with --scoring loglik, divide each answer's log-likelihood by nothing "
                  "(the harness's acc), its tokens, or its characters (acc_norm) "
                  "(default: %(default)s)")
  ev.add_argument("--strict-parsing", action="store_true",
                  help="the training rule: no </Judgement> means unparsed (default: lenient, "
                  "the whole answer is searched when the tag is missing)")
  ev.add_argument("--random-fallback", action="store_true",
                  help="replace unparsed answers by a random label (the paper's test-server "
                  "submissions); by default unparsed answers count as wrong")
  ev.add_argument("--batch-size", type=int, default=32,
                  help="prompts per generation batch (default: %(default)s)")
  ev.add_argument("--batch-tokens", type=int, default=None,
                  help="padded tokens (prompt + answer) per batch: prompts are sorted by "
                  "length and long ones go in smaller batches (default: 256 x --batch-size)")
  ev.add_argument("--strict-data", action="store_true",
                  help="stop at the first bad data row instead of skipping and counting it")
  ev.add_argument("--output", default=None, help="write the results JSON here")
  ev.add_argument("--table", default=None,
                  help="also write the table of every model and set here, as markdown")
  ev.add_argument("--skip-done", action="store_true",
                  help="keep the evaluations already in --output (a results file of several) "
                  "whose model, set and settings this call would score again, and the others "
                  "there; score only the rest")
  ev.set_defaults(run=run_eval)


def run_eval(args) -> int:
  from jax_nlu_ppo import storage
  from jax_nlu_ppo.nlu import eval_grid
  from jax_nlu_ppo.nlu import evaluate as evaluate_lib
  specs = [t.strip() for item in args.task for t in item.split(",") if t.strip()]
  models, data = args.model or [DEFAULT_MODEL], args.data or [None]
  config = evaluate_lib.EvalConfig(
      shots=args.shots, shot_seed=args.shot_seed, shot_selection=args.shot_selection,
      prompt_format=args.format,
      max_new_tokens=args.max_new_tokens, lenient=not args.strict_parsing,
      random_fallback=args.random_fallback, scoring=args.scoring,
      loglik_normalize=args.loglik_normalize)
  sets = evaluate_lib.read_sets(
      specs, config, data=data, split=args.split, limit=args.limit,
      shuffle_seed=args.shuffle_seed, offset=args.offset, strict_data=args.strict_data,
      shot_data=args.shot_data,
      shot_split=args.shot_split)
  if args.table:
    evaluate_lib.check_writable(args.table)
  if len(models) == 1 and len(data) == 1 and not args.skip_done:
    # One model on its tasks: the results file of one evaluation (or of its tasks).
    if args.output:
      evaluate_lib.check_writable(args.output)
    results = evaluate_lib.evaluate_sets(
        _load_model(args, models[0], args.batch_size, args.batch_tokens), sets, config,
        _progress)
    entries = [eval_grid.as_entry(models[0], s, r) for s, r in zip(sets, results)]
    if args.output:
      evaluate_lib.write_json(results, args.output, {"model": models[0], "dtype": args.dtype})
  else:
    entries = eval_grid.evaluate_grid(
        models, sets, config,
        lambda name: _load_model(args, name, args.batch_size, args.batch_tokens),
        output=args.output, skip_done=args.skip_done, progress=_progress)
  if args.output:
    log.info("wrote %s", args.output)
  text = eval_grid.table(entries)
  print(text)
  if args.table:
    storage.write_text(args.table, text + "\n")
    log.info("wrote %s", args.table)
  return 0


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


# ------------------------------------------------------------------------------------------------
# train and sft

def _add_train_parser(commands) -> None:
  tr = commands.add_parser(
      "train", help="PPO training from a YAML config",
      description="PPO with LoRA on a frozen base: rollout, reward, experience, updates. "
      "Metrics go to OUTPUT_DIR/metrics.jsonl when output_dir is set.")
  _config_arguments(tr)
  _distributed_arguments(tr)
  tr.set_defaults(run=run_train)


def _add_sft_parser(commands) -> None:
  sf = commands.add_parser(
      "sft", help="supervised fine-tuning (the paper's SFT baseline) from a YAML config",
      description="LoRA on a frozen base, cross-entropy on the gold answer's tokens only, with "
      "the same prompts as PPO (see configs/sft/). Metrics go to OUTPUT_DIR/metrics.jsonl.")
  _config_arguments(sf)
  sf.set_defaults(run=run_sft)


def _add_reward_model_parser(commands) -> None:
  rm = commands.add_parser(
      "reward-model", help="train a reward model (the paper's section 3.8) from a YAML config",
      description="LoRA and a scalar head on a frozen base, trained to score the gold answer "
      "of labelled rows above the wrong ones (Bradley-Terry; see configs/reward_model/). "
      "Held-out pairwise accuracy and AUC go to OUTPUT_DIR/metrics.jsonl; PPO then scores its "
      "rollouts with it through reward.model=OUTPUT_DIR, and `export` writes it as a "
      "LlamaForSequenceClassification.")
  _config_arguments(rm)
  rm.set_defaults(run=run_reward_model)


# The progress bar's postfix: label -> metric key, shown where the step's metrics have it (the
# first three are PPO's, then SFT's and the reward model's losses; all report tokens/per_s).
STEP_POSTFIX = {"reward": "env/reward_mean", "acc": "env/accuracy", "kl": "objective/kl",
                "loss": "sft/loss", "rm_loss": "rm/loss", "pair_acc": "rm/accuracy",
                "tok/s": "tokens/per_s"}


def _step_progress(trainer, format_metrics):
  """The `on_step` of train and sft: a progress bar on a terminal, else a log line per step.
  Returns it and the bar (None without a terminal) to close."""
  if not sys.stderr.isatty():
    return lambda m: log.info(format_metrics(m)), None
  from tqdm import tqdm
  bar = tqdm(desc="train", unit="step", total=trainer.total_steps, initial=trainer.iteration,
             dynamic_ncols=True)

  def update(m) -> None:
    bar.set_postfix({label: f"{m[key]:.3g}" for label, key in STEP_POSTFIX.items() if key in m},
                    refresh=False)
    bar.update()
  return update, bar


def _run_trainer(trainer, format_metrics) -> int:
  import contextlib
  from tqdm.contrib.logging import logging_redirect_tqdm
  steps = trainer.total_steps
  on_step, bar = _step_progress(trainer, format_metrics)
  # Warnings while the bar is up (a stop signal, checkpoint notes) print above it, not through it.
  with logging_redirect_tqdm() if bar is not None else contextlib.nullcontext():
    try:
      trainer.train(on_step=on_step)
    finally:
      if bar is not None:
        bar.close()
  if trainer.iteration < steps:
    log.warning("stopped at step %d of %d (a stop signal); the checkpoint is saved, and the same "
                "command continues the run", trainer.iteration, steps)
  return 0


def run_train(args) -> int:
  from jax_nlu_ppo import config as config_lib
  from jax_nlu_ppo import distributed
  from jax_nlu_ppo.rl import trainer as trainer_lib
  config = _load_config(args, config_lib.TrainConfig)
  # After the config is known good, before anything touches a device.
  distributed.initialize(distributed.DistributedConfig(
      args.coordinator_address, args.num_processes, args.process_id))
  trainer = trainer_lib.PPOTrainer(config)
  return _run_trainer(trainer, trainer_lib.format_metrics)


def run_sft(args) -> int:
  from jax_nlu_ppo.rl import sft
  return _run_supervised(args, sft.SFTConfig, sft.SFTTrainer, sft.format_metrics)


def run_reward_model(args) -> int:
  from jax_nlu_ppo.rl import reward_model
  return _run_supervised(args, reward_model.RewardModelConfig, reward_model.RewardModelTrainer,
                         reward_model.format_metrics)


def _run_supervised(args, config_cls, trainer_cls, format_metrics) -> int:
  """sft and reward-model: a config, the trainer's loop."""
  trainer = trainer_cls(_load_config(args, config_cls))
  return _run_trainer(trainer, format_metrics)


# ------------------------------------------------------------------------------------------------
# perplexity

def _add_perplexity_parser(commands) -> None:
  pp = commands.add_parser(
      "perplexity", help="perplexity of a model on a text file or a dataset column",
      description="Corpus perplexity exp(total NLL / predicted tokens) of a model on held-out "
      "text: one text a line of --text, or a column of a task's split.")
  _model_arguments(pp)
  source = pp.add_mutually_exclusive_group(required=True)
  source.add_argument("--text", help="a UTF-8 text file, one text a line")
  source.add_argument("--task", help="a GLUE task or custom task YAML whose split's text to use")
  pp.add_argument("--data", default=None, help="with --task: where the data is (as for eval)")
  pp.add_argument("--split", default=None, help="with --task: the split (default: as for eval)")
  pp.add_argument("--column", default=None,
                  help="with --task: the text column (default: the task's first input)")
  pp.add_argument("--limit", type=int, default=None, help="use the first N texts")
  pp.add_argument("--max-length", type=int, default=None,
                  help="truncate texts to this many tokens (default: the model's context)")
  pp.add_argument("--batch-size", type=int, default=32,
                  help="texts per forward pass (default: %(default)s)")
  pp.add_argument("--output", default=None, help="write the result JSON here")
  pp.set_defaults(run=run_perplexity)


def run_perplexity(args) -> int:
  import json
  from jax_nlu_ppo.nlu import perplexity as perplexity_lib
  result, source = perplexity_lib.perplexity_of_source(
      _model_loader(args), text_file=args.text, task=args.task, data=args.data,
      split=args.split, column=args.column, limit=args.limit, max_length=args.max_length,
      batch_size=args.batch_size, output=args.output)
  print(f"perplexity {result.perplexity:.4f} over {result.tokens} predicted tokens of "
        f"{len(result.tokens_per_text)} texts ({source}); {result.truncated} truncated")
  if args.output:
    out = {"model": args.model, "source": source, **result.to_json()}
    from jax_nlu_ppo import storage
    storage.write_text(args.output, json.dumps(out, indent=1))
  return 0


# ------------------------------------------------------------------------------------------------
# export

def _add_export_parser(commands) -> None:
  ex = commands.add_parser(
      "export", help="write a run's model as a Hugging Face folder (merged) or PEFT adapter",
      description="merged: the adapters folded into the base (W + B A * scale), a folder "
      "transformers.AutoModelForCausalLM.from_pretrained loads; peft: adapter_config.json + "
      "adapter_model.safetensors for peft.PeftModel.from_pretrained on the base (plus our "
      "value_head.safetensors). A reward-model run exports merged, as a "
      "LlamaForSequenceClassification. The run's config names the base and the LoRA settings.")
  ex.add_argument("run_path", metavar="RUN_DIR_OR_CHECKPOINT",
                  help="a run folder (its latest good checkpoint) or RUN/checkpoints/<step>")
  ex.add_argument("--output", required=True, help="the folder to write")
  ex.add_argument("--format", default="merged", choices=("merged", "peft"),
                  help="merged weights or a PEFT adapter (default: %(default)s)")
  ex.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="dtype of the written weights (default: %(default)s)")
  ex.add_argument("--max-shard-size", default="5GB",
                  help="merged: largest safetensors shard (default: %(default)s)")
  ex.add_argument("--overwrite", action="store_true",
                  help="replace a non-empty output folder (only once the new one is complete)")
  ex.set_defaults(run=run_export)


def run_export(args) -> int:
  from jax_nlu_ppo.runs import export
  start = time.perf_counter()
  out, step = export.export_run(args.run_path, args.output, args.format, args.dtype,
                                args.max_shard_size, args.overwrite)
  print(f"wrote {args.format} {args.dtype} export of step {step} to {out} "
        f"({time.perf_counter() - start:.1f}s)")
  return 0


# ------------------------------------------------------------------------------------------------
# report

def _add_report_parser(commands) -> None:
  rp = commands.add_parser(
      "report", help="plots and a Markdown summary of one or more runs' metrics",
      description="Reads each RUN folder's metrics.jsonl (and config.yaml for its label) and "
      "writes OUTPUT/metrics.png, the runs overlaid metric by metric, and OUTPUT/report.md, "
      "each run's steps and first/last values.")
  rp.add_argument("runs", nargs="+", metavar="RUN", help="a train or sft output_dir")
  rp.add_argument("--output", required=True, help="the folder to write")
  rp.add_argument("--group-seeds", action="store_true",
                  help="draw runs whose configs differ only in `seed` as one curve: their mean, "
                  "in a band from the lowest to the highest seed")
  rp.set_defaults(run=run_report)


def run_report(args) -> int:
  from jax_nlu_ppo.tools import report
  path = report.write_report(args.runs, args.output, args.group_seeds)
  print(f"wrote {path} and {path.with_name(report.PLOT_FILE)}")
  return 0


# ------------------------------------------------------------------------------------------------
# plan

def _add_plan_parser(commands) -> None:
  pl = commands.add_parser(
      "plan", help="per-device memory of a PPO run on a mesh, without loading the weights",
      description="Builds the run's policy as shapes only, splits it by the mesh rules, and "
      "compiles the rollout and update steps for the mesh on fake CPU devices to read XLA's "
      "memory analysis. Prints a table of GiB per device: weights, adapters, reference, "
      "optimizer state, KV cache, the steps' temporaries, and whether it fits.")
  _config_arguments(pl)
  pl.add_argument("--model-config", default=None, metavar="PRESET_OR_CONFIG_JSON",
                  help="the model's shape: a preset (" + ", ".join(MODEL_PRESETS) + ") or a "
                  "config.json; default: the preset matching model.name, else model.name's "
                  "own config")
  pl.add_argument("--devices", type=int, default=None,
                  help="devices to plan for (default: the product of the config's mesh sizes; "
                  "needed when an axis is -1)")
  pl.add_argument("--prompt-len", type=int, default=256,
                  help="padded prompt length in tokens (default: %(default)s)")
  pl.add_argument("--device-memory-gib", type=float, default=None,
                  help="memory per device, to say whether the run fits (e.g. 16 for TPU v5e, "
                  "32 for v4, 95 for v5p, 80 for an A100/H100 80GB)")
  pl.add_argument("--no-compile", action="store_true",
                  help="only the exact parts (weights, adapters, optimizer, KV cache): seconds")
  pl.add_argument("--output", default=None, help="also write the plan as JSON here")
  pl.set_defaults(run=run_plan)


def run_plan(args) -> int:
  import json
  from jax_nlu_ppo import config as config_lib
  from jax_nlu_ppo.tools import memory_plan
  config = _load_config(args, config_lib.TrainConfig)
  result = memory_plan.plan_from_config(
      config, args.model_config, args.devices, args.prompt_len,
      compile_steps=not args.no_compile, device_memory_gib=args.device_memory_gib,
      progress=log.info)
  print(result.table())
  if args.output:
    from jax_nlu_ppo import storage
    storage.write_text(args.output, json.dumps(result.to_dict(), indent=2) + "\n")
  return 0


# ------------------------------------------------------------------------------------------------
# bench

def _add_bench_parser(commands) -> None:
  bn = commands.add_parser(
      "bench", help="time one PPO iteration phase by phase, beside the PyTorch stack",
      description="The trainer's jitted rollout, experience and update on a fixed workload "
      "(default: the embedded model, 32 x 64-token SST-2 prompts, 16 new tokens, LoRA r8, "
      "minibatch 8), the machine's matmul ceiling and each phase's MFU, compilations after the "
      "first iteration, and the same iteration in transformers + peft and a TRL GRPOTrainer "
      "step (needs torch, peft, trl: pip install -e '.[bench]').")
  bn.add_argument("--model", default="smollm2-135m-instruct",
                  help="model to load (default: %(default)s)")
  bn.add_argument("--preset", default=None, choices=MODEL_PRESETS,
                  help="random weights of a preset's shape instead of --model (both stacks get "
                  "the same weights; no TRL step, which needs a tokenizer)")
  bn.add_argument("--tokenizer", default=None,
                  help="with --preset: the tokenizer that renders --prompts task (a folder of "
                  "tokenizer files, or a model name, folder or .gguf)")
  bn.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  bn.add_argument("--batch", type=int, default=32, help="prompts (default: %(default)s)")
  bn.add_argument("--prompt-len", type=int, default=64,
                  help="tokens of SST-2 text per prompt (default: %(default)s)")
  bn.add_argument("--prompts", default="text", choices=("text", "task"),
                  help="text: --prompt-len tokens of SST-2 text a row; task: the trainer's SST-2 "
                  "prompts (chat format, 74-115 tokens, left-padded), whose shared first tokens "
                  "ours runs once (default: %(default)s)")
  bn.add_argument("--no-shared-prefix", action="store_true",
                  help="run every prompt whole, shared first tokens included (for comparison)")
  bn.add_argument("--sort", action="store_true",
                  help="sort the prompts by length, the shorter half skipping half the columns "
                  "(the trainer's rollout.sort_by_length)")
  bn.add_argument("--new-tokens", type=int, default=16, help="(default: %(default)s)")
  bn.add_argument("--minibatch", type=int, default=8, help="(default: %(default)s)")
  bn.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
  bn.add_argument("--remat", default="none", choices=("none", "full", "dots"),
                  help="rematerialisation in the update, as the trainer's remat option "
                  "(default: %(default)s)")
  bn.add_argument("--iterations", type=int, default=3,
                  help="timed iterations after the first (default: %(default)s)")
  bn.add_argument("--no-torch", action="store_true", help="ours only")
  bn.add_argument("--no-trl", action="store_true", help="skip the TRL GRPOTrainer step")
  bn.add_argument("--trl-steps", type=int, default=2,
                  help="timed TRL steps after the first (default: %(default)s)")
  bn.add_argument("--output", default=None, help="write the figures as JSON here")
  bn.add_argument("--profile", default=None, metavar="DIR",
                  help="trace one more iteration into DIR (for Perfetto or TensorBoard) and "
                  "print its longest XLA ops, each with the JAX operation it came from")
  bn.set_defaults(run=run_bench)


def run_bench(args) -> int:
  from jax_nlu_ppo.tools import bench
  workload = bench.Workload(args.batch, args.prompt_len, args.new_tokens, args.minibatch,
                            args.rank, args.dtype, args.remat, args.prompts,
                            not args.no_shared_prefix, args.sort)
  bench.run(args.model, args.preset, workload, args.iterations, torch_side=not args.no_torch,
            trl=not args.no_trl, trl_steps=args.trl_steps, output=args.output,
            profile=args.profile, progress=log.info, tokenizer=args.tokenizer)
  return 0


if __name__ == "__main__":
  sys.exit(main())

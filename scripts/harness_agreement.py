"""Our log-likelihood scoring against lm-evaluation-harness on the same model, prompts and rows.

    python scripts/harness_agreement.py --glue-dir ../shared/data/glue --output runs/harness

Writes the model (default: the embedded SmolLM2-135M-Instruct GGUF, dequantised by
transformers) as a Hugging Face folder, then for each task's dev set: the harness's `hf` model
on a task config of our own (our rendered prompts as `doc_to_text`, each label's answer as
`doc_to_choice`), and `evaluate_model` with `scoring="loglik"` (what `jax-nlu-ppo eval
--scoring loglik` runs) on the same rows; and, for the cost, our `generate` scoring on the first
`--generate-limit` rows. Prints a Markdown table (docs/benchmarks.md) and writes the details,
disagreements included, to `<output>/agreement.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jax_nlu_ppo.model import pretrained  # noqa: E402
from jax_nlu_ppo.nlu import data as data_lib  # noqa: E402
from jax_nlu_ppo.nlu import evaluate as evaluate_lib  # noqa: E402
from jax_nlu_ppo.nlu import loglik  # noqa: E402
from jax_nlu_ppo.nlu import tasks as tasks_lib  # noqa: E402

HARNESS_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rows}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_hf_model(model: str, folder: pathlib.Path) -> None:
  """The model as a transformers folder (weights and tokenizer), once."""
  if (folder / "config.json").exists():
    return
  import transformers
  checkpoint = pretrained.resolve(model)
  kwargs = {"gguf_file": checkpoint.gguf_file} if checkpoint.gguf_file else {}
  hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint.tokenizer_dir, **kwargs)
  # A GGUF-loaded model refuses save_pretrained: copy its (dequantised) float32 weights out.
  config = hf.config
  if hasattr(config, "quantization_config"):
    del config.quantization_config
  plain = transformers.AutoModelForCausalLM.from_config(config, dtype="float32")
  plain.load_state_dict(hf.state_dict())
  plain.save_pretrained(folder)
  transformers.AutoTokenizer.from_pretrained(checkpoint.tokenizer_dir, **kwargs).save_pretrained(
      folder)


def prompt_text(tokenizer, prompt, fmt: str) -> str:
  """The prompt as the text `render_prompt` tokenizes (the chat template's, for chat formats)."""
  if fmt == "paper":
    return prompt
  return tokenizer.apply_chat_template(prompt, tokenize=False,
                                       add_generation_prompt=fmt == "plain",
                                       continue_final_message=fmt == "chat")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default=pretrained.DEFAULT_MODEL)
  parser.add_argument("--glue-dir", default="../shared/data/glue")
  parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc", "sst2"])
  parser.add_argument("--format", default="chat", choices=tasks_lib.FORMATS)
  parser.add_argument("--limit", type=int, default=None, help="dev rows per task (default: all)")
  parser.add_argument("--generate-limit", type=int, default=64,
                      help="rows per task timed with generate scoring (0: none)")
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--output", default="runs/harness")
  args = parser.parse_args()
  out = pathlib.Path(args.output)
  out.mkdir(parents=True, exist_ok=True)

  write_hf_model(args.model, out / "hf_model")
  lm = pretrained.load_pretrained(args.model, batch_size=args.batch_size)
  import lm_eval
  import torch
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager
  torch.set_num_threads(os.cpu_count() or 1)
  harness = HFLM(pretrained=str(out / "hf_model"), device="cpu", dtype="float32",
                 batch_size=args.batch_size)
  config = evaluate_lib.EvalConfig(scoring="loglik", prompt_format=args.format)
  table, details = [], {}
  for name in args.tasks:
    task = tasks_lib.get_task(name)
    rows, _ = data_lib.load(data_lib.DataConfig(task=name, split="validation",
                                                source="glue_dir", path=args.glue_dir,
                                                limit=args.limit))
    rows = list(rows)
    answers = loglik.answer_texts(task, args.format)
    docs = [{"prompt": prompt_text(lm.tokenizer, tasks_lib.build_prompt(task, ex, args.format),
                                   args.format),
             "choices": list(answers), "label": ex["label"]} for ex in rows]
    data_file = out / f"{name}_{args.format}.jsonl"
    data_file.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / f"{name}_{args.format}.yaml").write_text(HARNESS_TASK.format(
        name=f"ours_{name}_{args.format}", rows=data_file, cache=out / "datasets_cache"))

    start = time.perf_counter()
    harnessed = lm_eval.simple_evaluate(
        model=harness, tasks=[f"ours_{name}_{args.format}"], log_samples=True,
        task_manager=TaskManager(include_path=str(out)))
    harness_s = time.perf_counter() - start
    samples = sorted(harnessed["samples"][f"ours_{name}_{args.format}"],
                     key=lambda s: s["doc_id"])
    theirs = [[ll for ll, _ in s["filtered_resps"]] for s in samples]

    start = time.perf_counter()
    ours = evaluate_lib.evaluate_model(lm, task, rows, config)
    loglik_s = time.perf_counter() - start
    generate_s = generate_acc = None
    if args.generate_limit:
      start = time.perf_counter()
      generated = evaluate_lib.evaluate_model(lm, task, rows[:args.generate_limit],
                                              evaluate_lib.EvalConfig(prompt_format=args.format))
      generate_s = (time.perf_counter() - start) / len(generated.predictions)
      generate_acc = generated.metrics["accuracy"]

    mine = [p["prediction"] for p in ours.predictions]
    chosen = [max(range(len(ll)), key=ll.__getitem__) for ll in theirs]
    agree = sum(a == b for a, b in zip(mine, chosen)) / len(rows)
    gaps = [abs(x - y) for p, ll in zip(ours.predictions, theirs)
            for x, y in zip(p["logprobs"], ll)]
    harness_acc = harnessed["results"][f"ours_{name}_{args.format}"]["acc,none"]
    our_acc = ours.metrics["accuracy"]
    table.append((name, len(rows), 100 * agree, 100 * our_acc, 100 * harness_acc,
                  100 * (our_acc - harness_acc), loglik_s / len(rows), harness_s / len(rows),
                  generate_s, max(gaps)))
    details[name] = {
        "n": len(rows), "agreement": agree, "accuracy": our_acc, "harness_accuracy": harness_acc,
        "generate_accuracy_first_rows": generate_acc, "max_abs_loglik_gap": max(gaps),
        "seconds": {"loglik": loglik_s, "harness": harness_s,
                    "generate_per_example": generate_s},
        "disagreements": [{"idx": ex.get("idx", i), "ours": p["logprobs"], "harness": ll,
                           "label": ex["label"]}
                          for i, (ex, p, ll, c) in enumerate(zip(rows, ours.predictions, theirs,
                                                                 chosen))
                          if p["prediction"] != c]}
    # Written after each task, so a long run's finished tasks are kept.
    (out / "agreement.json").write_text(json.dumps(details, indent=1))
    (out / "table.md").write_text(markdown(table))
    print(markdown(table), flush=True)


def markdown(table) -> str:
  lines = ["| task | n | agreement (%) | our acc | lm-eval acc | diff (points) | "
           "s/example loglik (ours) | s/example lm-eval | s/example generate (ours) | "
           "max abs loglik gap |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for name, n, agree, ours_acc, theirs_acc, diff, ll_s, h_s, gen_s, gap in table:
    gen = f"{gen_s:.3f}" if gen_s is not None else "-"
    lines.append(f"| {name} | {n} | {agree:.2f} | {ours_acc:.2f} | {theirs_acc:.2f} | "
                 f"{diff:+.2f} | {ll_s:.3f} | {h_s:.3f} | {gen} | {gap:.1e} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()

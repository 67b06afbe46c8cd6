"""A trained reward model exported as a sequence classifier scores as ours, in transformers.

    python scripts/reward_model_parity.py runs/reward_model/rm_seed0 --rows 64

Exports the run (`export_run`: a `LlamaForSequenceClassification` folder), loads it with
`transformers.AutoModelForSequenceClassification`, and scores each of the first ROWS dev rows'
answers ("Positive" / "Negative" after the chat prompt) there, left-padded in batches of 16:
the same token ids as ours (the largest difference is printed), and the same texts tokenized
whole by the exported tokenizer, as a TRL user would (how often the ranking agrees).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jax_nlu_ppo.nlu import data as data_lib  # noqa: E402
from jax_nlu_ppo.nlu import tasks as tasks_lib  # noqa: E402
from jax_nlu_ppo.rl import reward_model as rm  # noqa: E402
from jax_nlu_ppo.runs import export, reader  # noqa: E402


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run", help="a reward-model run folder")
  parser.add_argument("--rows", type=int, default=64, help="dev rows to score")
  args = parser.parse_args(argv)

  import torch
  import transformers

  run = reader.load_run(args.run)
  trainer = run.trainer
  dev = data_lib.DataConfig(task=run.config.data.task, split="validation", source="glue_dir",
                            path=str(ROOT.parent / "shared/data/glue"), limit=args.rows)
  examples = list(data_lib.load(dev)[0])
  task = tasks_lib.get_task(run.config.data.task)
  rows = [rm.encode_candidates(trainer.tokenizer, task, ex, run.config.prompt_format,
                               trainer.lm.eos_ids()) for ex in examples]
  ours = trainer.scores(rows)
  with tempfile.TemporaryDirectory() as folder:
    out, _ = export.export_run(args.run, f"{folder}/rm")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  pad = model.config.pad_token_id
  seqs = [prompt + answer for prompt, answers, _ in rows for answer in answers]
  texts = [tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"]
           for ids in seqs]

  def hf_scores(all_ids):
    out = []
    for begin in range(0, len(all_ids), 16):
      ids = all_ids[begin:begin + 16]
      width = max(map(len, ids))
      batch = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
      mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
      with torch.no_grad():
        out += model(input_ids=batch, attention_mask=mask).logits[:, 0].tolist()
    return np.asarray(out).reshape(ours.shape)

  same_ids, from_text = hf_scores(seqs), hf_scores(texts)
  result = {"rows": len(rows), "max_abs_diff": float(np.abs(same_ids - ours).max()),
            "score_range": [float(ours.min()), float(ours.max())],
            "texts_retokenized_differently": sum(a != b for a, b in zip(seqs, texts)),
            "ranking_agrees_from_text": float((from_text.argmax(1) == ours.argmax(1)).mean()),
            "pad_token_id": pad, "eos_token_id": model.config.eos_token_id}
  print(result)
  return result


if __name__ == "__main__":
  main()

"""The benchmark's workload: its sizes and its prompts, shared by both stacks (`bench`, `bench_torch`)."""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from jax_nlu_ppo.model import pretrained
from jax_nlu_ppo.nlu import data, tasks

# Beside this checkout (../shared/data), or from where the command runs.
SST2_DEV = [pathlib.Path(__file__).resolve().parents[3] / "shared/data/glue/SST-2/dev.tsv",
            pathlib.Path("../shared/data/glue/SST-2/dev.tsv")]
PHASES = ("rollout", "experience", "update", "iteration")


@dataclasses.dataclass(frozen=True)
class Workload:
  batch: int = 32
  prompt_len: int = 64
  new_tokens: int = 16
  minibatch: int = 8
  rank: int = 8
  dtype: str = "float32"
  remat: str = "none"       # the trainer's `remat` option, for the update
  prompts: str = "text"     # "text": `prompt_len` tokens of SST-2 text a row; "task": see `bench`
  shared_prefix: bool = True  # ours runs the prompts' shared first tokens once
  sort_by_length: bool = False  # ours sorts rows by length; the shorter half skips padding

  def __post_init__(self):
    if self.prompts not in ("text", "task"):
      raise ValueError(f"prompts must be 'text' or 'task', got {self.prompts!r}")


def _sst2_dev() -> pathlib.Path | None:
  return next((path for path in SST2_DEV if path.exists()), None)


def prompt_rows(tokenizer, w: Workload, vocab_size: int) -> list[list[int]]:
  """The workload's prompts as token ids, unpadded."""
  if w.prompts == "text":
    return [list(row) for row in prompt_ids(tokenizer, w.batch, w.prompt_len, vocab_size)]
  dev = _sst2_dev()
  if tokenizer is None or dev is None:
    raise ValueError("prompts='task' needs the model's tokenizer (not a --preset) and the "
                     f"SST-2 dev set at {SST2_DEV[0]}")
  rows, _ = data.load_glue_dir("sst2", "validation", dev.parents[1])
  task = tasks.get_task("sst2")
  return [pretrained.render_prompt(tokenizer, tasks.build_prompt(task, rows[i], "chat"), True)
          for i in range(w.batch)]


def prompt_ids(tokenizer, batch: int, length: int, vocab_size: int) -> np.ndarray:
  """`batch` rows of exactly `length` real tokens of SST-2 dev text (random ids without it or
  without a tokenizer)."""
  dev = _sst2_dev()
  if tokenizer is not None and dev is not None:
    lines = dev.read_text().splitlines()[1:]
    ids = tokenizer(" ".join(line.split("\t")[0] for line in lines))["input_ids"]
    return np.asarray(ids[:batch * length], np.int32).reshape(batch, length)
  print(f"(random token ids: {'no tokenizer' if tokenizer is None else 'no SST-2 dev text'})")
  return np.random.default_rng(0).integers(100, vocab_size, (batch, length), dtype=np.int32)

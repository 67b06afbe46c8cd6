"""Answer extraction from generated text, and the scalar reward PPO optimises (host side).

The paper's training rule (arXiv 2410.11020, public code RL4GLUE): the answer is the text before
`</Judgement>` (no closing tag = unparsed); a classification answer must name exactly one label
word, as a whole word; an STS-B answer is the first number in it. The reward is +1 correct,
-1 wrong, -3 unparsed; for STS-B `2.5 - |pred - gold|`, and -2.5 when no number is found.

Evaluation may use a lenient rule (the whole response when the tag is missing). An unparsed
answer stays unparsed (label None) unless `fallback="random"` is asked for explicitly, which is
what the paper did for its GLUE test-server submissions.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import random
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

Label = int | float

CLOSING_TAG = "</Judgement>"

# An optional sign, then `3`, `3.5`, `3.` or `.5`: "4/5" reads as 4 (the first number), as in
# the paper; "3-4" reads as 3.
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


@dataclasses.dataclass(frozen=True)
class ExtractionRule:
  """How a response turns into a label.

  `label_words[i]` holds the word(s) that name integer label `i`; a plain string is one word.
  With `regression=True` the label words are ignored and the first number is the answer;
  `value_range` is only used to draw a random fallback for regression.
  """
  label_words: tuple[str | tuple[str, ...], ...] = ()
  case_sensitive: bool = True
  closing_tag: str = CLOSING_TAG
  lenient: bool = False
  regression: bool = False
  value_range: tuple[float, float] = (0.0, 5.0)

  def __post_init__(self):
    words = tuple((w,) if isinstance(w, str) else tuple(w) for w in self.label_words)
    object.__setattr__(self, "label_words", words)
    if self.regression:
      return
    if len(words) < 2:
      raise ValueError(f"ExtractionRule needs label words for at least two labels, got {words!r}")
    seen: dict[str, int] = {}
    for label, alternatives in enumerate(words):
      if not alternatives or any(not w.strip() for w in alternatives):
        raise ValueError(f"ExtractionRule: label {label} has an empty label word: {words!r}")
      for word in alternatives:
        key = word if self.case_sensitive else word.lower()
        if seen.setdefault(key, label) != label:
          raise ValueError(
              f"ExtractionRule: label word {word!r} names both label {seen[key]} and {label}")

  def with_lenient(self, lenient: bool = True) -> ExtractionRule:
    return dataclasses.replace(self, lenient=lenient)

  @property
  def num_labels(self) -> int:
    return len(self.label_words)

  @functools.cached_property
  def _patterns(self) -> tuple[re.Pattern[str], ...]:
    # Word boundaries keep "No" out of "Not"/"Nothing" and "entailment" out of "not_entailment".
    flags = 0 if self.case_sensitive else re.IGNORECASE
    return tuple(
        re.compile(r"\b(?:" + "|".join(re.escape(w) for w in alternatives) + r")\b", flags)
        for alternatives in self.label_words)


Status = Literal["parsed", "unparsed", "fallback"]


@dataclasses.dataclass(frozen=True)
class Extraction:
  """What a response says: `label` is None when unparsed; `answer` is the text searched."""
  label: Label | None
  answer: str
  status: Status

  @property
  def parsed(self) -> bool:
    return self.status == "parsed"


def answer_text(response: str, rule: ExtractionRule) -> str | None:
  """The text before the closing tag; the whole response if lenient; None if there is none."""
  head, tag, _ = response.partition(rule.closing_tag)
  if tag:
    return head
  return response if rule.lenient else None


def _find_label(answer: str, rule: ExtractionRule) -> int | None:
  found = {label for label, pattern in enumerate(rule._patterns) if pattern.search(answer)}
  return found.pop() if len(found) == 1 else None


def _find_number(answer: str) -> float | None:
  match = _NUMBER.search(answer)
  return float(match.group()) if match else None


def extract(
    response: str,
    rule: ExtractionRule,
    *,
    fallback: Literal["random"] | None = None,
    rng: random.Random | np.random.Generator | None = None,
) -> Extraction:
  """Reads one response under `rule`.

  Regression answers are reported raw (not clamped to `value_range`). With `fallback="random"`
  an unparsed answer becomes a uniformly drawn label (or a uniform value in `value_range`), and
  `status` says "fallback"; a seeded `rng` is required so that evaluations are repeatable.
  """
  if fallback not in (None, "random"):
    raise ValueError(f"extract: fallback must be None or 'random', got {fallback!r}")
  if fallback and rng is None:
    raise ValueError(
        "extract: fallback='random' needs a seeded rng (random.Random or numpy Generator)")
  answer = answer_text(response, rule)
  label: Label | None = None
  if answer is not None:
    label = _find_number(answer) if rule.regression else _find_label(answer, rule)
  if label is not None:
    return Extraction(label=label, answer=answer, status="parsed")
  if fallback is None:
    return Extraction(label=None, answer=answer or "", status="unparsed")
  return Extraction(label=_draw(rule, rng), answer=answer or "", status="fallback")


def _draw(rule: ExtractionRule, rng: random.Random | np.random.Generator) -> Label:
  low, high = rule.value_range
  if isinstance(rng, np.random.Generator):
    return float(rng.uniform(low, high)) if rule.regression else int(rng.integers(rule.num_labels))
  return rng.uniform(low, high) if rule.regression else rng.randrange(rule.num_labels)


def extract_all(
    responses: Sequence[str],
    rule: ExtractionRule,
    *,
    fallback: Literal["random"] | None = None,
    rng: random.Random | np.random.Generator | None = None,
) -> list[Extraction]:
  return [extract(r, rule, fallback=fallback, rng=rng) for r in responses]


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Reward values; the defaults are the paper's.

  Classification: `correct`, `wrong`, `unparsed`, with correct > wrong >= unparsed so that
  answering in the required form always pays. Regression (STS-B):
  `regression_max - |pred - gold|` on the raw prediction, `regression_unparsed` when no number.
  """
  correct: float = 1.0
  wrong: float = -1.0
  unparsed: float = -3.0
  regression_max: float = 2.5
  regression_unparsed: float = -2.5
  # The paper rewards only answers that close the tag. A small model rarely does at first, and
  # an all-unparsed batch has no reward signal; `lenient` reads the whole response instead
  # (the evaluation rule).
  lenient: bool = False
  # "text": `extract` on the decoded answer (host, exactly evaluation's rule); "token": the
  # same rule on the generated ids inside jit (`token_reward.py`; not for STS-B).
  extractor: str = "text"
  # A reward of your own, "package.module:name" or "path/to/file.py:name" (rl/reward_fn.py),
  # and a learned reward model, the run folder of `jax-nlu-ppo reward-model`
  # (rl/reward_model.py): each row's reward is label_weight * the label reward
  # + function_weight * the function's value + model_weight * the model's score.
  function: str | None = None
  function_weight: float = 1.0
  model: str | None = None
  model_weight: float = 1.0
  label_weight: float = 1.0

  def __post_init__(self):
    if self.extractor not in ("text", "token"):
      raise ValueError(f"reward.extractor must be 'text' or 'token', got {self.extractor!r}")
    for name in ("function_weight", "model_weight", "label_weight"):
      if not math.isfinite(getattr(self, name)):
        raise ValueError(f"reward.{name} must be a finite number, got {getattr(self, name)}")
    if self.function is not None and (":" not in self.function
                                      or not all(self.function.rpartition(":")[::2])):
      raise ValueError(f"reward.function must be 'package.module:name' or "
                       f"'path/to/file.py:name', got {self.function!r}")
    if self.function is None and self.model is None and self.label_weight == 0:
      raise ValueError("reward.label_weight=0 leaves no reward; name a reward.function or a "
                       "reward.model")
    if not self.correct > self.wrong >= self.unparsed:
      raise ValueError(
          "RewardConfig needs correct > wrong >= unparsed, got "
          f"correct={self.correct}, wrong={self.wrong}, unparsed={self.unparsed}")


def reward(pred: Label | None, gold: Label, *, regression: bool,
           config: RewardConfig = RewardConfig()) -> float:
  """The reward of one prediction (None = unparsed) against the gold label."""
  if regression:
    if pred is None:
      return config.regression_unparsed
    return config.regression_max - abs(float(pred) - float(gold))
  if pred is None:
    return config.unparsed
  return config.correct if int(pred) == int(gold) else config.wrong


def response_rewards(
    responses: Sequence[str],
    golds: Sequence[Label],
    rule: ExtractionRule,
    config: RewardConfig = RewardConfig(),
) -> np.ndarray:
  """Rewards of a batch of responses, shape [batch], float32. Never uses a random fallback."""
  if len(responses) != len(golds):
    raise ValueError(f"response_rewards: {len(responses)} responses but {len(golds)} gold labels")
  rewards_b = [
      reward(extract(r, rule).label, g, regression=rule.regression, config=config)
      for r, g in zip(responses, golds)
  ]
  return np.asarray(rewards_b, dtype=np.float32)

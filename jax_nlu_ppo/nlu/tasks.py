"""The GLUE tasks: their inputs, labels, answer words, metrics, and the prompts built from them.

Tasks are keyed by the `nyu-mll/glue` config names and use its column names and integer label
convention, so a row from the hub, a local GLUE folder or a user's file reads the same way.

Three prompt formats:

* "paper": plain text as in arXiv 2410.11020: an instruction, the input, the required answer
  form, and a final `Assistant: <Judgement>` that the model continues (" Yes </Judgement>...").
* "chat": a list of messages for an instruct model's chat template. The last message is an
  assistant turn already holding "<Judgement>"; render it with
  `tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)` so the
  turn is left open, and the reply is read with the same extraction rule as the paper format.
* "plain": chat messages asking for the bare label word (or number), with no tags: the way
  instruct models are usually prompted. The whole reply is searched (no closing tag to find).

Demonstrations (k-shot) are earlier user/assistant turns whose answer is the gold label word.

Beyond GLUE, a task can be defined in a YAML file (see `task_files`); `get_task` accepts such a
file's path wherever a task name is taken.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from jax_nlu_ppo.nlu import answer
from jax_nlu_ppo.nlu import task_files

OPEN_TAG = "<Judgement>"
CLOSE_TAG = answer.CLOSING_TAG

Format = Literal["paper", "chat", "plain"]
FORMATS: tuple[str, ...] = typing.get_args(Format)


def uses_chat_template(fmt: str) -> bool:
  """Whether prompts of this format are chat messages (rendered by the tokenizer's template)."""
  if fmt not in FORMATS:
    raise ValueError(f"prompt format must be one of {', '.join(FORMATS)}, got {fmt!r}")
  return fmt != "paper"
ChatMessage = dict[str, str]


@dataclasses.dataclass(frozen=True)
class Task:
  """One GLUE task.

  `label_names` are the hub's class names, `label_words[i]` the word the model answers for
  integer label i (both empty for the regression task STS-B). `input_titles[j]` is how input
  column `input_columns[j]` is introduced in the prompt.
  """
  name: str
  input_columns: tuple[str, ...]
  input_titles: tuple[str, ...]
  instruction: str
  metrics: tuple[str, ...]
  splits: tuple[str, ...]
  label_names: tuple[str, ...] = ()
  label_words: tuple[str, ...] = ()
  is_regression: bool = False
  case_sensitive: bool = True
  # STS-B's gold scores lie in 0..5; used for the answer form and a random fallback.
  value_range: tuple[float, float] = (0.0, 5.0)
  # Custom tasks: the values the label column holds, one per label (e.g. "pos", "neg", or "1");
  # empty for GLUE, whose rows hold the label's index or name.
  label_values: tuple[str, ...] = ()
  # Custom tasks: how the inputs are shown, a `str.format` template over the input columns
  # (None: one "Title: text" line per column).
  input_template: str | None = None
  # Custom tasks: where their data lives, None for GLUE.
  data: task_files.TaskData | None = None

  def __post_init__(self):
    if len(self.input_titles) != len(self.input_columns):
      raise ValueError(f"task {self.name}: {len(self.input_columns)} input columns but "
                       f"{len(self.input_titles)} titles")
    if not self.is_regression and len(self.label_words) != len(self.label_names):
      raise ValueError(f"task {self.name}: {len(self.label_names)} labels but "
                       f"{len(self.label_words)} label words")
    if self.label_values and len(self.label_values) != len(self.label_names):
      raise ValueError(f"task {self.name}: {len(self.label_names)} labels but "
                       f"{len(self.label_values)} label values")

  @property
  def num_labels(self) -> int:
    return len(self.label_names)

  def extraction_rule(self, lenient: bool = False, fmt: Format = "paper") -> answer.ExtractionRule:
    """The paper's rule (`lenient=False`, for rewards) or the evaluation rule (`lenient=True`).

    Answers to "plain" prompts carry no closing tag, so they are always read whole.
    """
    return answer.ExtractionRule(
        label_words=self.label_words, case_sensitive=self.case_sensitive, closing_tag=CLOSE_TAG,
        lenient=lenient or fmt == "plain", regression=self.is_regression,
        value_range=self.value_range)

  def answer_word(self, label: int | float) -> str:
    """The text a correct answer holds for a gold label (a label word, or the score)."""
    if self.is_regression:
      return f"{float(label):.2f}".rstrip("0").rstrip(".")
    if not 0 <= int(label) < self.num_labels:
      raise ValueError(f"task {self.name}: label {label!r} is not in 0..{self.num_labels - 1} "
                       f"({list(self.label_names)}); an unlabelled (test) row cannot be a shot")
    return self.label_words[int(label)]

  def answer_form(self) -> str:
    if self.is_regression:
      low, high = self.value_range
      choices = f"a number from {low:g} to {high:g}"
    else:
      choices = " or ".join(self.label_words)
    return (f"Give your answer as {OPEN_TAG} {choices} {CLOSE_TAG}, "
            "then a one-sentence reason as <Analysis> ... </Analysis>.")

  def system_prompt(self) -> str:
    return f"{self.instruction} {self.answer_form()}"

  def plain_system_prompt(self) -> str:
    if self.is_regression:
      low, high = self.value_range
      return f"{self.instruction} Answer with just a number from {low:g} to {high:g}."
    words = list(self.label_words)
    choices = ", ".join(words[:-1]) + f" or {words[-1]}"
    return f"{self.instruction} Answer with just one word: {choices}."


_YES_NO = ("Yes", "No")
_NO_YES = ("No", "Yes")
_NLI_NAMES = ("entailment", "neutral", "contradiction")
_NLI_INSTRUCTION = (
    "Decide how the premise relates to the hypothesis: entailment if the premise makes the "
    "hypothesis true, contradiction if it makes it false, neutral otherwise.")

TASKS: dict[str, Task] = {t.name: t for t in (
    Task(
        name="cola", input_columns=("sentence",), input_titles=("Sentence",),
        instruction="Decide whether the sentence is grammatically acceptable English.",
        label_names=("unacceptable", "acceptable"), label_words=_NO_YES,
        metrics=("matthews_correlation",), splits=("train", "validation", "test")),
    Task(
        name="sst2", input_columns=("sentence",), input_titles=("Sentence",),
        instruction="Decide whether the sentiment of the movie-review sentence is positive or "
        "negative.",
        label_names=("negative", "positive"), label_words=("Negative", "Positive"),
        metrics=("accuracy",), splits=("train", "validation", "test")),
    Task(
        name="mrpc", input_columns=("sentence1", "sentence2"),
        input_titles=("Sentence 1", "Sentence 2"),
        instruction="Decide whether the two sentences say the same thing (are paraphrases).",
        label_names=("not_equivalent", "equivalent"), label_words=_NO_YES,
        metrics=("f1", "accuracy"), splits=("train", "validation", "test")),
    Task(
        name="stsb", input_columns=("sentence1", "sentence2"),
        input_titles=("Sentence 1", "Sentence 2"),
        instruction="Rate how similar in meaning the two sentences are, from 0 (unrelated) to "
        "5 (the same meaning).",
        is_regression=True, metrics=("pearson", "spearman"),
        splits=("train", "validation", "test")),
    Task(
        name="qqp", input_columns=("question1", "question2"),
        input_titles=("Question 1", "Question 2"),
        instruction="Decide whether the two questions ask the same thing.",
        label_names=("not_duplicate", "duplicate"), label_words=_NO_YES,
        metrics=("f1", "accuracy"), splits=("train", "validation", "test")),
    Task(
        name="mnli", input_columns=("premise", "hypothesis"),
        input_titles=("Premise", "Hypothesis"), instruction=_NLI_INSTRUCTION,
        label_names=_NLI_NAMES, label_words=_NLI_NAMES, case_sensitive=False,
        metrics=("accuracy",),
        splits=("train", "validation_matched", "validation_mismatched", "test_matched",
                "test_mismatched")),
    Task(
        name="qnli", input_columns=("question", "sentence"),
        input_titles=("Question", "Sentence"),
        instruction="Decide whether the sentence contains the answer to the question.",
        label_names=("entailment", "not_entailment"), label_words=_YES_NO,
        metrics=("accuracy",), splits=("train", "validation", "test")),
    Task(
        name="rte", input_columns=("sentence1", "sentence2"),
        input_titles=("Text", "Hypothesis"),
        instruction="Decide whether the text implies that the hypothesis is true.",
        label_names=("entailment", "not_entailment"), label_words=_YES_NO,
        metrics=("accuracy",), splits=("train", "validation", "test")),
    Task(
        name="wnli", input_columns=("sentence1", "sentence2"),
        input_titles=("Text", "Hypothesis"),
        instruction="Decide whether the text implies that the hypothesis is true; the "
        "hypothesis replaces a pronoun of the text with one possible referent.",
        label_names=("not_entailment", "entailment"), label_words=_NO_YES,
        metrics=("accuracy",), splits=("train", "validation", "test")),
    # The diagnostic set: MNLI-style pairs, test split only, scored (by the GLUE server) with
    # Matthews correlation.
    Task(
        name="ax", input_columns=("premise", "hypothesis"),
        input_titles=("Premise", "Hypothesis"), instruction=_NLI_INSTRUCTION,
        label_names=_NLI_NAMES, label_words=_NLI_NAMES, case_sensitive=False,
        metrics=("matthews_correlation",), splits=("test",)),
)}


def get_task(name: str | Task) -> Task:
  """A GLUE task by its `nyu-mll/glue` config name, or a custom task from a YAML file's path."""
  if isinstance(name, Task):
    return name
  if name in TASKS:
    return TASKS[name]
  if name.endswith((".yaml", ".yml")):
    return Task(**task_files.load_task(name, glue_names=TASKS))
  raise KeyError(f"unknown task {name!r}; known tasks (nyu-mll/glue config names): "
                 f"{', '.join(TASKS)}, or the path of a task YAML file") from None


# The evaluation split of each GLUE task (`nyu-mll/glue` names; AX has only its test split).
_EVAL_SPLITS = {"mnli": "validation_matched", "ax": "test"}


def default_eval_split(task_name: str) -> str:
  """The split a task is scored on when none is named: validation, except for MNLI and AX."""
  return _EVAL_SPLITS.get(task_name, "validation")


def check_scoring(task: str | Task, scoring: str) -> None:
  """Log-likelihood scoring chooses among label words: a regression task is refused."""
  task = get_task(task)
  if scoring == "loglik" and task.is_regression:
    raise ValueError(f"task {task.name} is a regression task (a score, no label words to "
                     "choose from); evaluate it with scoring 'generate', not 'loglik'")


def format_input(task: Task, example: Mapping[str, Any]) -> str:
  """The example's inputs: the task's template, or one "Title: text" line per input column."""
  missing = [c for c in task.input_columns if c not in example]
  if missing:
    raise KeyError(f"task {task.name}: example has no column {missing[0]!r} (it has "
                   f"{sorted(example)}); normalise the data with jax_nlu_ppo.nlu.data first")
  if task.input_template is not None:
    return task.input_template.format(
        **{c: str(example[c]).strip() for c in task.input_columns}).strip()
  return "\n".join(f"{title}: {str(example[column]).strip()}"
                   for column, title in zip(task.input_columns, task.input_titles))


def _gold_answer(task: Task, example: Mapping[str, Any]) -> str:
  if "label" not in example:
    raise KeyError(f"task {task.name}: a demonstration needs a 'label', got {sorted(example)}")
  return f"{OPEN_TAG} {task.answer_word(example['label'])} {CLOSE_TAG}"


def build_prompt(
    task: Task,
    example: Mapping[str, Any],
    fmt: Format = "paper",
    shots: Sequence[Mapping[str, Any]] = (),
) -> str | list[ChatMessage]:
  """The prompt for `example`, with `shots` as solved demonstrations before it.

  "paper" returns one string ending in "Assistant: <Judgement>"; "chat" returns chat messages
  whose last (assistant) message is "<Judgement>" (see the module docstring for rendering);
  "plain" returns chat messages ending with the user's turn.
  """
  if fmt == "paper":
    parts = [f"System: {task.system_prompt()}"]
    for shot in shots:
      parts.append(f"User: {format_input(task, shot)}\nAssistant: {_gold_answer(task, shot)}")
    parts.append(f"User: {format_input(task, example)}\nAssistant: {OPEN_TAG}")
    return "\n\n".join(parts)
  if fmt == "chat":
    messages = [{"role": "system", "content": task.system_prompt()}]
    for shot in shots:
      messages.append({"role": "user", "content": format_input(task, shot)})
      messages.append({"role": "assistant", "content": _gold_answer(task, shot)})
    messages.append({"role": "user", "content": format_input(task, example)})
    messages.append({"role": "assistant", "content": OPEN_TAG})
    return messages
  if fmt == "plain":
    messages = [{"role": "system", "content": task.plain_system_prompt()}]
    for shot in shots:
      messages.append({"role": "user", "content": format_input(task, shot)})
      messages.append({"role": "assistant", "content": task.answer_word(shot["label"])})
    messages.append({"role": "user", "content": format_input(task, example)})
    return messages
  raise ValueError(f"build_prompt: fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")

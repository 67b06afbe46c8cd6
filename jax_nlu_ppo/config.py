"""Run configuration: typed frozen dataclasses, read from YAML, overridden by dotted keys.

    config = load_config("configs/paper/sst2.yaml", ["ppo.kl.target=6", "lora.rank=16"])

Unknown keys and values of the wrong type are errors that name the key (and the file, or the
override that set it) and what would do, raised before any model is loaded or any function
compiled.
"""
from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from typing import Any

import yaml

from jax_nlu_ppo.nlu import answer
from jax_nlu_ppo import checkpoint as checkpoint_lib
from jax_nlu_ppo.nlu import data as data_lib
from jax_nlu_ppo.nlu import evaluate as evaluate_lib
from jax_nlu_ppo.model import lora as lora_lib
from jax_nlu_ppo.model import decoder as model_lib
from jax_nlu_ppo.model import kernels as kernels_lib
from jax_nlu_ppo.rl import ppo as ppo_lib
from jax_nlu_ppo import sharding as sharding_lib
from jax_nlu_ppo import tracking
from jax_nlu_ppo.nlu import tasks as tasks_lib


class ConfigError(ValueError):
  """A config key or value that cannot be used; the message names it, and `key` holds it where
  one key is to blame (so that an override, not the file, is named when it set the key)."""

  def __init__(self, message: str, key: str | None = None):
    super().__init__(message)
    self.key = key


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  name: str = "smollm2-135m-instruct"   # embedded name, HF folder, .gguf file or hub id
  dtype: str = "float32"
  gguf_file: str | None = None
  kernels: str = "auto"                 # the decoder's backend paths (model/kernels.py)
  # A PEFT adapter folder the run starts from (one exported after SFT, say); a PPO run's KL
  # reference is then that adapted policy, not the base.
  adapter: str | None = None

  def __post_init__(self):
    if self.kernels not in kernels_lib.CHOICES:
      raise ConfigError(f"model.kernels must be one of {', '.join(kernels_lib.CHOICES)}, "
                        f"got {self.kernels!r}")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """How prompts are answered during training. The length is drawn per batch (the paper's)."""
  batch_size: int = 16              # prompts per PPO iteration (x group_size samples)
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_new_tokens: int = 12
  max_new_tokens: int = 31
  # "chat" (the paper's tagged answer in the tokenizer's chat template), "paper" (its plain-text
  # prompt) or "plain" (chat, the bare label word, no tags).
  prompt_format: str = "chat"
  # Run the first tokens every prompt of a batch shares (the task's instructions and
  # demonstrations) once per step instead of once per row; the outputs are the same.
  shared_prefix: bool = True
  # Sort each batch shard's prompts by length, so that its shorter half skips the half of the
  # columns it does not need (rollout, experience, and minibatches that take half from each);
  # the outputs are the same, only the order of the rows changes. Off by default: it pays on
  # compute-bound devices with many rows a shard and prompts of very different lengths, and
  # costs time where a step is bound by kernel launches (README, PPO section).
  sort_by_length: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model: ModelConfig = ModelConfig()
  lora: lora_lib.LoraConfig = lora_lib.LoraConfig()
  ppo: ppo_lib.PPOConfig = ppo_lib.PPOConfig()
  optimizer: ppo_lib.OptimizerConfig = ppo_lib.OptimizerConfig()
  rollout: RolloutConfig = RolloutConfig()
  reward: answer.RewardConfig = answer.RewardConfig()
  data: data_lib.DataConfig = data_lib.DataConfig(task="sst2", shuffle_seed=0)
  # Several tasks at once: weighted components replace `data` (each row keeps its task's
  # prompt, extraction rule and reward).
  mixture: tuple[data_lib.MixtureComponent, ...] = ()
  eval_data: data_lib.DataConfig | None = None
  value_dropout: float = 0.1
  critic_lora: bool = False         # the critic gets its own adapters (a second forward)
  steps: int = 100
  epochs: float | None = None       # passes over the training set; when set, replaces `steps`
  seed: int = 0
  eval_every: int = 0               # 0: evaluate only before and after training
  # The step-0 evaluation is the base model's (zero-shot) score: off when that is known already.
  eval_before: bool = True
  # How eval_data is scored: "generate" (greedy answers, parsed) or "loglik" (the most likely
  # label answer, as lm-evaluation-harness scores choices; nlu/loglik.py).
  eval_scoring: str = "generate"
  output_dir: str | None = None     # metrics.jsonl and checkpoints/; a run there continues
  logging: tracking.LoggingConfig = tracking.LoggingConfig()   # W&B beside TensorBoard
  checkpoint: checkpoint_lib.CheckpointConfig = checkpoint_lib.CheckpointConfig()
  # This many iterations in a row with every update skipped (non-finite loss) stop the run;
  # 0: never.
  max_skipped_steps: int = 3
  mesh: sharding_lib.MeshConfig = sharding_lib.MeshConfig()
  # Rematerialise each decoder layer in the update's backward pass: "none", "full" (recompute
  # everything, least memory) or "dots" (keep matmul outputs without a batch axis).
  remat: str = "none"

  def __post_init__(self):
    check_eval(self.eval_data, self.eval_every, self.checkpoint, self.eval_scoring)
    check_max_skipped(self.max_skipped_steps)
    r, p = self.rollout, self.ppo
    if self.remat not in model_lib.REMAT_POLICIES:
      raise ConfigError(f"remat must be one of {', '.join(model_lib.REMAT_POLICIES)}, "
                        f"got {self.remat!r}")
    if not 1 <= r.min_new_tokens <= r.max_new_tokens:
      raise ConfigError(f"rollout.min_new_tokens ({r.min_new_tokens}) must be in "
                        f"1..rollout.max_new_tokens ({r.max_new_tokens})")
    for task in self.train_tasks:
      if self.reward.extractor == "token" and tasks_lib.get_task(task).is_regression:
        raise ConfigError(f"reward.extractor=token cannot read {task}'s numbers; "
                          "use reward.extractor=text")
    if self.epochs is not None and self.epochs <= 0:
      raise ConfigError(f"epochs must be > 0, got {self.epochs}")
    samples = r.batch_size * p.group_size
    if samples % p.minibatch_size:
      raise ConfigError(f"ppo.minibatch_size ({p.minibatch_size}) must divide the samples per "
                        f"iteration, rollout.batch_size x ppo.group_size = {samples}")
    if r.prompt_format not in tasks_lib.FORMATS:
      raise ConfigError(f"rollout.prompt_format must be one of {', '.join(tasks_lib.FORMATS)}, "
                        f"got {r.prompt_format!r}")

  @property
  def train_tasks(self) -> tuple[str, ...]:
    """The task (name or task-file path) of every training source."""
    if self.mixture:
      return tuple(component.data.task for component in self.mixture)
    return (self.data.task,)


def check_max_skipped(max_skipped_steps: int) -> None:
  if max_skipped_steps < 0:
    raise ConfigError(f"max_skipped_steps must be >= 0 (0: never stop), got {max_skipped_steps}")


def check_eval(eval_data, eval_every: int, checkpoint: checkpoint_lib.CheckpointConfig,
               scoring: str = "generate") -> None:
  """The periodic-evaluation settings shared by the PPO and SFT configs."""
  if scoring not in evaluate_lib.SCORINGS:
    raise ConfigError(f"eval_scoring must be one of {', '.join(evaluate_lib.SCORINGS)}, got "
                      f"{scoring!r}")
  if eval_data is not None and scoring == "loglik":
    try:
      tasks_lib.check_scoring(eval_data.task, scoring)
    except ValueError as e:
      raise ConfigError(f"eval_scoring: {e}") from None
  if eval_every < 0:
    raise ConfigError(f"eval_every must be >= 0 (0: only before and after), got {eval_every}")
  if eval_data is not None and eval_data.label_noise:
    raise ConfigError("eval_data.label_noise must be 0: evaluation scores against gold labels")
  best = checkpoint.best_metric
  if best and best.startswith(checkpoint_lib.EVAL_PREFIX) and eval_data is None:
    raise ConfigError(f"checkpoint.best_metric {best!r} needs eval_data (the set it is "
                      "measured on)")


def _check_type(value: Any, hint: Any, key: str, default: Any = None) -> Any:
  """`value` converted to `hint` where that is lossless (int -> float, list -> tuple, "1e-5" ->
  float: YAML 1.1 reads a float without a dot as text); errors say what would do."""
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    options = typing.get_args(hint)
    if value is None and type(None) in options:
      return None
    errors = []
    for option in options:
      if option is type(None):
        continue
      try:
        return _check_type(value, option, key, default)
      except ConfigError as e:
        errors.append(e)
    if not errors:
      raise ConfigError(f"{key}: bad value {value!r}", key)
    if type(None) in options and errors[0].key == key:
      raise ConfigError(f"{errors[0]}, or null", key)
    raise errors[0]
  if origin is typing.Literal:
    choices = typing.get_args(hint)
    if value not in choices:
      raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}",
                        key)
    return value
  if dataclasses.is_dataclass(hint):
    if isinstance(value, hint):
      return value
    if not isinstance(value, dict):
      fields = ", ".join(f.name for f in dataclasses.fields(hint))
      raise ConfigError(f"{key}: expected a mapping of {hint.__name__} fields, got {value!r}; "
                        f"set its fields one by one ({key}.FIELD=VALUE), of {fields}", key)
    return from_dict(hint, value, key)
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}: expected a list, got {value!r}; write it in brackets, e.g. "
                        f"[{value}]", key)
    item = typing.get_args(hint)[0]
    return tuple(_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value))
  if origin in (dict, typing.Mapping) or hint is typing.Mapping or origin is not None and (
      getattr(origin, "__name__", "") == "Mapping"):
    if not isinstance(value, dict):
      raise ConfigError(f"{key}: expected a mapping, got {value!r}; write it in braces, e.g. "
                        "{name: value}", key)
    return dict(value)
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint is float and isinstance(value, str):
    try:
      return float(value)
    except ValueError:
      pass
  if hint in (int, float, str, bool):
    if type(value) is not hint:
      raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}; "
                        f"give {_looks_like(hint, default)}", key)
    return value
  if hint is typing.Any:
    return value
  raise ConfigError(f"{key}: unsupported type {hint}", key)


def _looks_like(hint: type, default: Any) -> str:
  """What a value of `hint` looks like, the field's default as the example."""
  example = f" such as {default}" if type(default) is hint else ""
  return {int: f"a whole number{example}", float: f"a number{example}", bool: "true or false",
          str: "text (quoted if it would read as a number, true/false or null)"}[hint]


def from_dict(cls, values: dict[str, Any], prefix: str = ""):
  """Builds dataclass `cls` from a nested dict; unknown keys and wrong types name the key."""
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    where = f"{prefix}." if prefix else ""
    raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})",
                      f"{where}{unknown[0]}")
  defaults = {f.name: f.default for f in dataclasses.fields(cls)
              if f.default is not dataclasses.MISSING}
  kwargs = {}
  for name, value in values.items():
    key = f"{prefix}.{name}" if prefix else name
    default = defaults.get(name)
    if dataclasses.is_dataclass(default) and isinstance(value, dict):
      # A section given in part keeps the default's other fields (`data.split=validation`
      # keeps the default task and folder).
      value = _deep_merged(to_dict(default), value)
    kwargs[name] = _check_type(value, hints[name], key, default)
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (ValueError, TypeError, KeyError) as e:
    raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(config) -> dict[str, Any]:
  """The config as plain YAML-able data (the resolved config a run folder keeps)."""
  def convert(x):
    if dataclasses.is_dataclass(x):
      return {f.name: convert(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, tuple):
      return [convert(v) for v in x]
    if isinstance(x, dict):
      return {k: convert(v) for k, v in x.items()}
    return x
  return convert(config)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  for part in parents:
    node = tree.get(part)
    if node is None:
      node = tree[part] = {}
    elif not isinstance(node, dict):
      raise ConfigError(f"override {dotted}: {part} is not a section")
    tree = node
  tree[leaf] = value


def load_config(path: str | pathlib.Path | None = None, overrides: list[str] = (),
                cls=TrainConfig):
  """Defaults <- YAML file (its `base:` chain first) <- `key.sub=value` overrides."""
  values: dict[str, Any] = {}
  if path is not None:
    values = _read_yaml(pathlib.Path(path))
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, raw = item.split("=", 1)
    _set_dotted(values, dotted.strip(), yaml.safe_load(raw))
  try:
    return from_dict(cls, values)
  except ConfigError as e:
    # A key an override set is the override's fault, not the file's.
    override = _override_setting(e.key, overrides)
    if override is not None:
      raise ConfigError(f"{e} (from the override {override})", e.key) from None
    raise ConfigError(f"{path}: {e}" if path else str(e), e.key) from None


def _override_setting(key: str | None, overrides: list[str]) -> str | None:
  """The last of `overrides` that set `key` or a section holding it, if any."""
  for item in reversed(overrides if key is not None else []):
    dotted = item.split("=", 1)[0].strip()
    if key == dotted or key.startswith((f"{dotted}.", f"{dotted}[")):
      return item
  return None


def _read_yaml(path: pathlib.Path) -> dict[str, Any]:
  if not path.exists():
    raise ConfigError(f"{path}: config file not found")
  try:
    values = yaml.safe_load(path.read_text()) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"{path}: not valid YAML ({e})") from None
  if not isinstance(values, dict):
    raise ConfigError(f"{path}: the top level must be a mapping of sections")
  base = values.pop("base", None)
  if base is None:
    return values
  # One base file, or a list merged in order (e.g. a task's settings, then a machine's mesh).
  merged: dict[str, Any] = {}
  for name in [base] if isinstance(base, str) else base:
    _deep_update(merged, _read_yaml(path.parent / name))
  _deep_update(merged, values)
  return merged


def _deep_merged(target: dict, source: dict) -> dict:
  _deep_update(target, source)
  return target


def _deep_update(target: dict, source: dict) -> None:
  for key, value in source.items():
    if isinstance(value, dict) and isinstance(target.get(key), dict):
      _deep_update(target[key], value)
    else:
      target[key] = value

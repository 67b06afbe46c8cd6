"""Trained adapters out to the Hugging Face world (`rl/peft_adapter.py` reads PEFT folders back).

Two export formats:
  * merged: a plain transformers model folder (`config.json`, safetensors, generation config,
    tokenizer) with every adapter folded into its kernel, W' = W + scale B A; a reward model's
    is a `LlamaForSequenceClassification` (`export_reward_model`);
  * peft: `adapter_config.json` + `adapter_model.safetensors` that
    `peft.PeftModel.from_pretrained(base, folder)` applies to the unchanged base, plus our
    `value_head.safetensors` (the critic: value head and any critic adapters, in our layout) so
    that nothing trained is lost.

Both stream: one tensor (one layer's slice of a stacked parameter) is read, merged, cast,
written and dropped at a time. Both write into a temporary sibling folder that replaces the
output only when complete, so a failed export never leaves a half-written folder behind.

`export_run` does either for a run folder or checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid

import jax
import ml_dtypes
from huggingface_hub import split_state_dict_into_shards_factory
import numpy as np
from flax import nnx

from jax_nlu_ppo import storage
from jax_nlu_ppo.model import lora as lora_lib
from jax_nlu_ppo.model import weights as weights_lib
from jax_nlu_ppo.model.llama_config import LlamaConfig
from jax_nlu_ppo.rl import peft_adapter
from jax_nlu_ppo.rl import reward_model
from jax_nlu_ppo.runs import reader

log = logging.getLogger(__name__)

_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class ExportError(ValueError):
  """An export's output folder cannot be used as asked."""


# ----------------------------------------------------------------------------------------------
# Export.

def export_merged(lm, trainable, lora: lora_lib.LoraConfig | None, output: str, *,
                  dtype: str = "float32", max_shard_size: int | str = "5GB",
                  overwrite: bool = False) -> str:
  """Writes `lm` with `trainable`'s adapters folded in as a transformers model folder.

  Args:
    lm: the loaded base (`pretrained.LanguageModel`); never modified. A GGUF base is written
      dequantised, in Hugging Face names and layouts.
    trainable: the policy's trainable state (`policy.split`) or its pure dict; None exports
      the base as it is.
    lora: the adapters' config (for the targets and scale alpha/r, or alpha/sqrt(r) for rsLoRA).
    output: the folder to create; refused if it exists and is not empty, unless `overwrite`.
    dtype: "float32" or "bfloat16" for the written tensors (merging is done in float32).
    max_shard_size: bytes (or "5GB"-style) per safetensors file; more than one file gets a
      `model.safetensors.index.json`, as transformers writes it.
  Returns:
    The absolute path of the written folder.
  """
  params = nnx.to_pure_dict(lm.params)
  if trainable is not None:
    params = _with_folded_adapters(params, _pure(trainable), lora)
  return _write_model(lm, weights_lib.hf_tensors(lm.config, params), lm.config.to_hf(), output,
                      dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                      what="merged")


def export_reward_model(lm, trainable, lora: lora_lib.LoraConfig, output: str, *,
                        dtype: str = "float32", max_shard_size: int | str = "5GB",
                        overwrite: bool = False) -> str:
  """Writes a reward model (`rl/reward_model.py`) as a transformers
  `LlamaForSequenceClassification` folder (one label): the adapters folded in as for
  `export_merged`, no LM head, and the head's kernel as `score.weight`.

  transformers scores a row at its last token that is not `pad_token_id` (the config keeps the
  model's), which is our score's token when a row ends with its answer or with the answer and
  EOS, and the pad token is the EOS. Arguments as for `export_merged`.
  """
  pure = _pure(trainable)
  head = pure["value_head"]
  if float(np.abs(np.asarray(jax.device_get(head["bias"])))) != 0.0:
    raise ExportError("the reward model's head has a bias; a sequence classifier's score layer "
                      "has none (was this trained as a reward model?)")
  params = _with_folded_adapters(nnx.to_pure_dict(lm.params), pure, lora)
  tensors = [t for t in weights_lib.hf_tensors(lm.config, params) if t.name != "lm_head.weight"]
  kernel = head["kernel"]
  tensors.append(weights_lib.HFTensor(
      "score.weight", (1, kernel.shape[0]),
      lambda: np.asarray(jax.device_get(kernel), np.float32)[None, :]))
  hf = lm.config.to_hf()
  hf |= {"architectures": [hf["architectures"][0].replace("ForCausalLM",
                                                          "ForSequenceClassification")],
         "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
         "problem_type": "regression"}
  return _write_model(lm, tensors, hf, output, dtype=dtype, max_shard_size=max_shard_size,
                      overwrite=overwrite, what="reward-model")


def _write_model(lm, tensors: list[weights_lib.HFTensor], hf_config: dict, output: str, *,
                 dtype: str, max_shard_size: int | str, overwrite: bool, what: str) -> str:
  """A transformers model folder of `tensors`: weights, config, generation config, tokenizer."""
  np_dtype = _np_dtype(dtype)
  start = time.perf_counter()
  with _staging(output, overwrite) as folder:
    _write_sharded(folder, tensors, np_dtype, max_shard_size)
    _write_json(os.path.join(folder, "config.json"),
                hf_config | {"dtype": dtype, "torch_dtype": dtype})
    _write_generation_config(folder, lm.config)
    if lm.tokenizer is not None:
      lm.tokenizer.save_pretrained(folder)
    else:
      log.warning("the model has no tokenizer; %s will hold weights and config only", output)
  log.info("exported a %s %s model to %s in %.1fs", what, dtype, output,
           time.perf_counter() - start)
  return str(storage.absolute(output))


def export_peft(lm, trainable, lora: lora_lib.LoraConfig, output: str, *,
                base_model_name_or_path: str | None = None, dtype: str = "float32",
                overwrite: bool = False) -> str:
  """Writes the adapters as a PEFT LoRA folder, and the critic beside them.

  `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), output)` then
  computes what our adapted policy computes. `value_head.safetensors` is ours (PEFT ignores
  it): the value head and, with `critic_lora`, the critic's adapters, read back by
  `peft_adapter.load_peft_adapter`. Arguments as for `export_merged`; `base_model_name_or_path` is recorded
  in `adapter_config.json` for users and the hub.
  """
  np_dtype = _np_dtype(dtype)
  start = time.perf_counter()
  pure = _pure(trainable)
  _check_adapters(pure, lora)
  adapter_tensors = weights_lib.hf_tensors(lm.config, pure,
                                           peft_adapter.adapter_specs(lm.config, lora.targets))
  critic_tensors = weights_lib.hf_tensors(lm.config, pure, peft_adapter.critic_specs(pure))
  with _staging(output, overwrite) as folder:
    weights_lib.write_safetensors(os.path.join(folder, peft_adapter.ADAPTER_WEIGHTS),
                                  adapter_tensors, np_dtype, {"format": "pt"})
    weights_lib.write_safetensors(os.path.join(folder, peft_adapter.VALUE_HEAD_WEIGHTS),
                                  critic_tensors, np.float32, {"format": "jax_nlu_ppo"})
    _write_json(os.path.join(folder, peft_adapter.ADAPTER_CONFIG),
                _peft_config(lora, base_model_name_or_path))
  log.info("exported PEFT adapters (%s) to %s in %.1fs", dtype, output,
           time.perf_counter() - start)
  return str(storage.absolute(output))


def export_run(run_path: str, output: str, fmt: str = "merged", dtype: str = "float32",
               max_shard_size: str = "5GB", overwrite: bool = False) -> tuple[str, int]:
  """The run at `run_path` (a run folder: its latest good step; or a step folder) written as
  `fmt`, "merged" or "peft": (the folder written, the step)."""
  run = reader.load_run(run_path)
  log.info("read %s at step %d", run_path, run.step)
  if isinstance(run.config, reward_model.RewardModelConfig):
    if fmt != "merged":
      raise ExportError(f"{run_path} is a reward model: it exports merged, as a sequence "
                        "classifier (--format merged)")
    out = export_reward_model(run.lm, run.trainable, run.config.lora, output, dtype=dtype,
                              max_shard_size=max_shard_size, overwrite=overwrite)
  elif fmt == "merged":
    out = export_merged(run.lm, run.trainable, run.config.lora, output, dtype=dtype,
                        max_shard_size=max_shard_size, overwrite=overwrite)
  else:
    out = export_peft(run.lm, run.trainable, run.config.lora, output,
                      base_model_name_or_path=run.config.model.name, dtype=dtype,
                      overwrite=overwrite)
  return out, run.step


class _FoldedKernel:
  """A stacked kernel that folds its adapter in (float32) as each layer's slice is read."""

  def __init__(self, kernel, adapter, scale: float):
    self.kernel, self.a, self.b, self.scale = kernel, adapter["a"], adapter["b"], scale
    self.shape = kernel.shape

  def __getitem__(self, layer: int):
    return lora_lib.folded_kernel(self.kernel[layer], self.a[layer], self.b[layer], self.scale)


def _with_folded_adapters(params, pure_trainable, lora: lora_lib.LoraConfig):
  """A structural copy of the base's pure dict whose target kernels fold their adapters in."""
  if lora is None:
    raise ExportError("exporting a trainable state needs the LoRA config it was trained with")
  _check_adapters(pure_trainable, lora)
  params = jax.tree.map(lambda x: x, params)  # new dicts, the same (shared, unmodified) arrays
  for target in lora.targets:
    proj = params["layers"][lora_lib.BLOCKS[target]][target]
    adapter = pure_trainable["llama"]["layers"][lora_lib.BLOCKS[target]][target]["adapter"]
    proj["kernel"] = _FoldedKernel(proj["kernel"], adapter, lora.scale)
  return params


def _check_adapters(pure_trainable, lora: lora_lib.LoraConfig):
  layers = pure_trainable.get("llama", {}).get("layers", {})
  for target in lora_lib.ALL_TARGETS:
    adapter = layers.get(lora_lib.BLOCKS[target], {}).get(target, {}).get("adapter")
    if (adapter is not None) != (target in lora.targets):
      present = [t for t in lora_lib.ALL_TARGETS
                 if "adapter" in layers.get(lora_lib.BLOCKS[t], {}).get(t, {})]
      raise ExportError(f"the trainable state has adapters on {present} but the LoRA config "
                        f"targets {list(lora.targets)}; pass the config the run trained with")
    if adapter is not None and adapter["a"].shape[-1] != lora.rank:
      raise ExportError(f"the {target} adapter has rank {adapter['a'].shape[-1]} but the LoRA "
                        f"config says rank={lora.rank}; pass the config the run trained with")


def _pure(trainable):
  return nnx.to_pure_dict(trainable) if isinstance(trainable, nnx.State) else trainable


def _np_dtype(dtype: str) -> np.dtype:
  if dtype not in _DTYPES:
    raise ValueError(f"export dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
  return _DTYPES[dtype]


def _write_sharded(folder: str, tensors: list[weights_lib.HFTensor], dtype: np.dtype,
                   max_shard_size: int | str):
  """`model.safetensors`, or shards and their index, split as transformers splits them."""
  by_name = {t.name: t for t in tensors}
  split = split_state_dict_into_shards_factory(
      by_name, get_storage_size=lambda t: int(np.prod(t.shape)) * dtype.itemsize,
      filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
  for filename, names in split.filename_to_tensors.items():
    weights_lib.write_safetensors(os.path.join(folder, filename), [by_name[n] for n in names],
                                  dtype, {"format": "pt"})
  if split.is_sharded:
    _write_json(os.path.join(folder, "model.safetensors.index.json"),
                {"metadata": split.metadata, "weight_map": split.tensor_to_filename})


def _write_generation_config(folder: str, config: LlamaConfig):
  from transformers import GenerationConfig  # pylint: disable=import-outside-toplevel
  eos = list(config.eos_token_ids)
  GenerationConfig(bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id,
                   eos_token_id=eos[0] if len(eos) == 1 else eos or None
                   ).save_pretrained(folder)


def _peft_config(lora: lora_lib.LoraConfig, base: str | None) -> dict:
  alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
      "r": lora.rank, "lora_alpha": alpha, "lora_dropout": lora.dropout,
      "use_rslora": lora.rslora, "target_modules": list(lora.targets), "bias": "none",
      "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
      "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
      "init_lora_weights": True, "inference_mode": True,
  }


def _write_json(path: str, obj):
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


def _check_output(output: str, overwrite: bool) -> None:
  """`output` (local or in a bucket) must be a new or empty folder, unless `overwrite`."""
  dest = storage.path(output)
  if dest.exists() and not dest.is_dir():
    raise ExportError(f"{output}: exists and is not a folder")
  if dest.is_dir() and any(dest.iterdir()) and not overwrite:
    raise ExportError(f"{output}: folder exists and is not empty; choose a new folder or pass "
                      "overwrite=True (--overwrite) to replace it")


@contextlib.contextmanager
def _staging(output: str, overwrite: bool):
  """A new sibling folder to write into; it replaces `output` only once the body succeeds."""
  if storage.is_remote(output):
    with _upload_staging(output, overwrite) as folder:
      yield folder
    return
  output = os.path.abspath(output)
  _check_output(output, overwrite)
  parent, name = os.path.split(output)
  staging = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.partial")
  try:
    os.makedirs(parent, exist_ok=True)
    os.mkdir(staging)
  except OSError as e:
    raise ExportError(f"{output}: cannot write there ({e.strerror or e}: "
                      f"{e.filename or parent})") from None
  try:
    yield staging
    backup = None
    if os.path.exists(output):
      backup = f"{staging}.old"
      os.rename(output, backup)
    try:
      os.rename(staging, output)
    except OSError:
      if backup:
        os.rename(backup, output)
      raise
    if backup:
      shutil.rmtree(backup)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


@contextlib.contextmanager
def _upload_staging(output: str, overwrite: bool):
  """A local temporary folder to write into, uploaded to `output` in a bucket once the body
  succeeds. A bucket has no rename: an upload cut short leaves part of the folder there."""
  _check_output(output, overwrite)
  dest = storage.path(output)
  reason = storage.unwritable(dest / "config.json")
  if reason is not None:
    raise ExportError(f"{output}: cannot write there ({reason})")
  with tempfile.TemporaryDirectory(prefix="jax_nlu_ppo_export.") as folder:
    yield folder
    if dest.is_dir():
      dest.rmtree()
    storage.copy_tree(folder, dest)

"""Hugging Face export against transformers and peft in torch, on tiny random models.

A merged folder must load in `AutoModelForCausalLM` and a PEFT folder in `PeftModel` with the
logits of our adapted policy (float32: within 1e-5 of the largest logit), both must read back
into our model exactly, and bad output folders or mismatched adapters must fail with the path
or tensor named.
"""
import functools
import json
import os

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

import jax_nlu_ppo
from jax_nlu_ppo.runs import export
from jax_nlu_ppo.model import lora as lora_lib
from jax_nlu_ppo.model import decoder as model_lib
from jax_nlu_ppo.rl import policy as policy_lib
from jax_nlu_ppo.rl import peft_adapter
from jax_nlu_ppo.model import weights as weights_lib
from tests import tiny_hf
from tests.test_model_parity import max_rel_diff
from tests.test_ppo_core import assert_trees_equal, randomized

# Each case pairs an architecture with adapters that exercise its layouts: head-split q/k/v and
# o_proj kernels under GQA and MHA, tied and untied embeddings, biases, rsLoRA and plain scale.
CASES = {
    "gqa_tied_rslora_all_targets": (
        dict(num_key_value_heads=2, tie_word_embeddings=True),
        lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.0, rslora=True)),
    "mha_untied_biases": (
        dict(num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True,
             mlp_bias=True),
        lora_lib.LoraConfig(rank=2, alpha=16.0, targets=("q_proj", "o_proj", "down_proj"))),
    "qwen2_gqa": (
        dict(model_type="qwen2", num_key_value_heads=1, tie_word_embeddings=True),
        lora_lib.LoraConfig(rank=3, alpha=6.0, targets=("k_proj", "v_proj", "gate_proj",
                                                        "up_proj"), rslora=True)),
}


@functools.partial(jax.jit, static_argnums=0)
def _adapted_logits(graphdef, trainable, base, ids_bt, mask_bt):
  llama = policy_lib.with_trainable(graphdef, base, trainable).llama
  return model_lib.forward_logits(llama, ids_bt, mask_bt)


class Adapted:
  """A tiny HF checkpoint, our model loaded from it, and trained-looking adapters on top."""

  def __init__(self, folder, lora, model_type="llama", b_scale=0.3, **overrides):
    self.base_folder = str(folder)
    tiny_hf.save_tiny(folder, model_type=model_type, **overrides)
    self.lm = jax_nlu_ppo.load_pretrained(self.base_folder)
    self.lora = lora
    llama = nnx.merge(self.lm.graphdef, self.lm.params)
    policy = policy_lib.make_policy(llama, lora, value_dropout=0.0, seed=1)
    self.graphdef, trainable, self.base = policy_lib.split(policy)
    self.trainable = randomized(trainable, seed=2, scale=b_scale)
    self.ids, self.mask = tiny_hf.left_padded_batch(self.lm.config.vocab_size, batch=3,
                                                    length=20)
    self.logits = np.asarray(_adapted_logits(self.graphdef, self.trainable, self.base,
                                             self.ids, self.mask))

  def torch_base(self):
    return transformers.AutoModelForCausalLM.from_pretrained(self.base_folder,
                                                             dtype=torch.float32).eval()

  def rel(self, logits):
    return max_rel_diff(np.asarray(logits), self.logits, self.mask)


def _case(tmp_path, name, b_scale=0.3) -> Adapted:
  overrides, lora = CASES[name]
  overrides = dict(overrides)
  return Adapted(tmp_path / "base", lora, overrides.pop("model_type", "llama"), b_scale,
                 **overrides)


@pytest.mark.parametrize("name", list(CASES))
def test_exports_reproduce_the_adapted_model(tmp_path, name):
  adapted = _case(tmp_path, name)
  base_before = jax.tree.map(np.array, nnx.to_pure_dict(adapted.lm.params))
  # Not vacuous: the adapters move the logits well beyond the tolerance.
  assert adapted.rel(adapted.lm.logits(adapted.ids, adapted.mask)) > 1e-2

  merged = export.export_merged(adapted.lm, adapted.trainable, adapted.lora,
                                str(tmp_path / "merged"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
  assert hf.config.tie_word_embeddings == adapted.lm.config.tie_word_embeddings
  assert adapted.rel(tiny_hf.torch_logits(hf, adapted.ids, adapted.mask)) <= 1e-5
  reloaded = jax_nlu_ppo.load_pretrained(merged)
  assert reloaded.config == adapted.lm.config
  assert adapted.rel(reloaded.logits(adapted.ids, adapted.mask)) <= 1e-5

  folder = export.export_peft(adapted.lm, adapted.trainable, adapted.lora,
                              str(tmp_path / "peft"), base_model_name_or_path="tiny")
  with_adapter = peft.PeftModel.from_pretrained(adapted.torch_base(), folder).eval()
  assert adapted.rel(tiny_hf.torch_logits(with_adapter, adapted.ids, adapted.mask)) <= 1e-5
  lora, trainable = peft_adapter.load_peft_adapter(folder, adapted.lm)
  assert lora == adapted.lora
  assert_trees_equal(trainable, adapted.trainable)

  # Exporting never touched the shared base.
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(nnx.to_pure_dict(
      adapted.lm.params))):
    np.testing.assert_array_equal(a, np.asarray(b))


def _header(path):
  return weights_lib._SafetensorsFile(str(path)).entries  # pylint: disable=protected-access


def test_bfloat16_and_sharded_exports(tmp_path):
  # Adapters about as large as the base's own weights: larger ones make the tiny random model
  # chaotic enough that any bfloat16 rounding moves its logits by several percent.
  adapted = _case(tmp_path, "gqa_tied_rslora_all_targets", b_scale=0.02)
  assert adapted.rel(adapted.lm.logits(adapted.ids, adapted.mask)) > 1e-2
  merged16 = tmp_path / "merged16"
  export.export_merged(adapted.lm, adapted.trainable, adapted.lora, str(merged16),
                       dtype="bfloat16")
  assert {e["dtype"] for e in _header(merged16 / "model.safetensors").values()} == {"BF16"}
  assert json.loads((merged16 / "config.json").read_text())["dtype"] == "bfloat16"
  hf16 = transformers.AutoModelForCausalLM.from_pretrained(merged16, dtype=torch.float32)
  # The same tensors as torch's own (round-to-nearest-even) cast of the float32 export.
  merged32 = export.export_merged(adapted.lm, adapted.trainable, adapted.lora,
                                  str(tmp_path / "merged32"))
  hf32 = transformers.AutoModelForCausalLM.from_pretrained(merged32, dtype=torch.float32)
  for (name, p16), p32 in zip(hf16.state_dict().items(), hf32.state_dict().values()):
    assert torch.equal(p16, p32.to(torch.bfloat16).float()), name
  # bfloat16 weights (8 significant bits) with float32 activations, over two layers.
  assert adapted.rel(tiny_hf.torch_logits(hf16.eval(), adapted.ids, adapted.mask)) <= 1e-2

  peft16 = tmp_path / "peft16"
  export.export_peft(adapted.lm, adapted.trainable, adapted.lora, str(peft16), dtype="bfloat16")
  assert {e["dtype"] for e in _header(peft16 / peft_adapter.ADAPTER_WEIGHTS).values()} == {"BF16"}
  with_adapter = peft.PeftModel.from_pretrained(adapted.torch_base(), str(peft16)).eval()
  assert adapted.rel(tiny_hf.torch_logits(with_adapter, adapted.ids, adapted.mask)) <= 1e-2
  _, trainable = peft_adapter.load_peft_adapter(str(peft16), adapted.lm)
  b = nnx.to_pure_dict(trainable)["llama"]["layers"]["mlp"]["up_proj"]["adapter"]["b"]
  b_ref = nnx.to_pure_dict(adapted.trainable)["llama"]["layers"]["mlp"]["up_proj"]["adapter"]["b"]
  np.testing.assert_allclose(b, b_ref, rtol=2 ** -8)

  sharded = tmp_path / "sharded"
  export.export_merged(adapted.lm, adapted.trainable, adapted.lora, str(sharded),
                       max_shard_size="30KB")
  index = json.loads((sharded / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  assert not (sharded / "model.safetensors").exists()
  hf = transformers.AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).eval()
  assert adapted.rel(tiny_hf.torch_logits(hf, adapted.ids, adapted.mask)) <= 1e-5
  reloaded = jax_nlu_ppo.load_pretrained(str(sharded))
  assert adapted.rel(reloaded.logits(adapted.ids, adapted.mask)) <= 1e-5


def test_adapter_trained_by_peft_in_torch_loads(tmp_path):
  tiny_hf.save_tiny(tmp_path / "base", num_key_value_heads=2)
  lm = jax_nlu_ppo.load_pretrained(str(tmp_path / "base"))
  torch_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
  config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=True,
                           target_modules=["v_proj", "q_proj", "down_proj"], task_type="CAUSAL_LM")
  model = peft.get_peft_model(torch_base, config)
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.3)
  model.save_pretrained(tmp_path / "adapter")

  lora, trainable = peft_adapter.load_peft_adapter(str(tmp_path / "adapter"), lm)
  assert lora == lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.0, rslora=True,
                                     targets=("q_proj", "v_proj", "down_proj"))
  value_head = nnx.to_pure_dict(trainable)["value_head"]
  assert not np.any(value_head["kernel"])  # no value_head.safetensors: a fresh critic
  graphdef, _, base = policy_lib.split(policy_lib.make_policy(
      nnx.merge(lm.graphdef, lm.params), lora, value_dropout=0.0, seed=0))
  ids, mask = tiny_hf.left_padded_batch(lm.config.vocab_size, batch=3, length=16)
  ours = np.asarray(_adapted_logits(graphdef, trainable, base, ids, mask))
  ref = tiny_hf.torch_logits(model.eval(), ids, mask)
  assert max_rel_diff(ours, ref, mask) <= 1e-5
  assert max_rel_diff(lm.logits(ids, mask), ref, mask) > 1e-2


def test_critic_adapters_round_trip(tmp_path):
  tiny_hf.save_tiny(tmp_path / "base")
  lm = jax_nlu_ppo.load_pretrained(str(tmp_path / "base"))
  lora = lora_lib.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "up_proj"))
  policy = policy_lib.make_policy(nnx.merge(lm.graphdef, lm.params), lora, 0.0, seed=1,
                                  critic_lora=True)
  trainable = randomized(policy_lib.split(policy)[1], seed=3)
  export.export_peft(lm, trainable, lora, str(tmp_path / "peft"))
  _, loaded = peft_adapter.load_peft_adapter(str(tmp_path / "peft"), lm)
  assert_trees_equal(loaded, trainable)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """One adapted tiny model and its PEFT export, shared by the error tests."""
  tmp = tmp_path_factory.mktemp("small")
  adapted = Adapted(tmp / "base", lora_lib.LoraConfig(rank=2, alpha=4.0,
                                                      targets=("q_proj", "o_proj")))
  export.export_peft(adapted.lm, adapted.trainable, adapted.lora, str(tmp / "peft"))
  return adapted, tmp / "peft"


def _edited_adapter(src, dst, **changes):
  os.makedirs(dst)
  for name in os.listdir(src):
    data = (src / name).read_bytes()
    if name == peft_adapter.ADAPTER_CONFIG:
      data = json.dumps(json.loads(data) | changes).encode()
    (dst / name).write_bytes(data)
  return str(dst)


@pytest.mark.parametrize("changes, message", [
    (dict(r=4), r"lora_A.weight' has shape \(2, 64\) but this model expects \(4, 64\) \(r=4"),
    (dict(target_modules=["q_proj", "o_proj", "up_proj"]),
     r"'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight' is missing"),
    (dict(target_modules=["o_proj"]),
     r"'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' is not an adapter"),
    (dict(target_modules=["q_proj", "lm_head"]), r"target_modules \['lm_head'\] cannot be"),
    (dict(use_dora=True), r"use_dora=True is not supported"),
])
def test_mismatched_adapter_is_refused_naming_the_tensor(small, tmp_path, changes, message):
  adapted, folder = small
  edited = _edited_adapter(folder, tmp_path / "edited", **changes)
  with pytest.raises(peft_adapter.AdapterError, match=message):
    peft_adapter.load_peft_adapter(edited, adapted.lm)


def test_adapter_of_another_model_is_refused(small, tmp_path):
  adapted, folder = small
  tiny_hf.save_tiny(tmp_path / "wide", hidden_size=32)
  wide = jax_nlu_ppo.load_pretrained(str(tmp_path / "wide"))
  with pytest.raises(peft_adapter.AdapterError, match=r"q_proj.lora_A.weight' has shape \(2, 64\) but "
                     r"this model expects \(2, 32\)"):
    peft_adapter.load_peft_adapter(str(folder), wide)
  with pytest.raises(peft_adapter.AdapterError, match="adapter_config.json: not found"):
    peft_adapter.load_peft_adapter(str(tmp_path), adapted.lm)


def test_export_with_the_wrong_lora_config_is_refused(small, tmp_path):
  adapted, _ = small
  for wrong in (lora_lib.LoraConfig(rank=4, targets=("q_proj", "o_proj")),
                lora_lib.LoraConfig(rank=2, targets=("q_proj",))):
    with pytest.raises(export.ExportError, match="pass the config the run trained with"):
      export.export_peft(adapted.lm, adapted.trainable, wrong, str(tmp_path / "out"))
  assert not os.listdir(tmp_path)


def test_output_folder_is_never_half_written(small, tmp_path, monkeypatch):
  adapted, _ = small
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  with pytest.raises(export.ExportError, match=f"{out}: folder exists and is not empty"):
    export.export_merged(adapted.lm, adapted.trainable, adapted.lora, str(out))
  assert os.listdir(out) == ["keep.txt"]

  # A failure while writing leaves the old folder as it was and no partial folder beside it.
  def fail(*args):
    raise RuntimeError("disk full")
  monkeypatch.setattr(export, "_write_generation_config", fail)
  with pytest.raises(RuntimeError, match="disk full"):
    export.export_merged(adapted.lm, adapted.trainable, adapted.lora, str(out), overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["keep.txt"]
  monkeypatch.undo()

  export.export_merged(adapted.lm, adapted.trainable, adapted.lora, str(out), overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["out"]
  assert "keep.txt" not in os.listdir(out) and (out / "config.json").exists()


def test_unwritable_output_is_refused_naming_the_path(small, tmp_path):
  adapted, _ = small
  (tmp_path / "a_file").write_text("")
  with pytest.raises(export.ExportError, match="a_file/out: cannot write there"):
    export.export_peft(adapted.lm, adapted.trainable, adapted.lora,
                       str(tmp_path / "a_file" / "out"))
  with pytest.raises(export.ExportError, match="a_file: exists and is not a folder"):
    export.export_merged(adapted.lm, adapted.trainable, adapted.lora, str(tmp_path / "a_file"))
  with pytest.raises(ValueError, match="export dtype must be one of"):
    export.export_merged(adapted.lm, None, None, str(tmp_path / "x"), dtype="float16")


# ----------------------------------------------------------------------------------------------
# The real 135M model
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gguf_model_exports_dequantised_with_its_tokenizer(smollm2_gguf, tmp_path):
  lm = jax_nlu_ppo.load_pretrained("smollm2-135m-instruct")
  lora = lora_lib.LoraConfig(rank=8, alpha=16.0, dropout=0.0, rslora=True)
  policy = policy_lib.make_policy(nnx.merge(lm.graphdef, lm.params), lora, 0.0, seed=1)
  graphdef, trainable, base = policy_lib.split(policy)
  trainable = randomized(trainable, seed=0, scale=0.02)
  folder = export.export_merged(lm, trainable, lora, str(tmp_path / "merged"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  ids, mask = lm.encode(["Is the sky blue?", "Classify the sentiment: I loved this movie."])
  assert tokenizer.chat_template == lm.tokenizer.chat_template
  text = "Classify the sentiment: I loved this movie."
  assert tokenizer(text)["input_ids"] == lm.tokenizer(text)["input_ids"]
  ours = np.asarray(_adapted_logits(graphdef, trainable, base, ids, mask))
  ref = tiny_hf.torch_logits(hf, ids, mask)
  assert max_rel_diff(ours, ref, mask) <= 1e-4
  assert max_rel_diff(lm.logits(ids, mask), ref, mask) > 1e-3

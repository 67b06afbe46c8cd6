"""Bad checkpoints give one clear error naming the file and the tensor."""
import json

import pytest

import jax_nlu_ppo
from tests import tiny_hf


def test_missing_path():
  with pytest.raises(FileNotFoundError, match="no/such/folder"):
    jax_nlu_ppo.load_pretrained("./no/such/folder")


def test_missing_gguf_file(tmp_path):
  with pytest.raises(jax_nlu_ppo.CheckpointError, match="missing.gguf: file not found"):
    jax_nlu_ppo.load_pretrained(str(tmp_path / "missing.gguf"))


def test_folder_without_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    jax_nlu_ppo.load_pretrained(str(tmp_path))


def test_folder_without_weights(tmp_path):
  tiny_hf.save_tiny(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(jax_nlu_ppo.CheckpointError, match="no model.safetensors"):
    jax_nlu_ppo.load_pretrained(str(tmp_path))


def _edit_config(folder, **changes):
  path = folder / "config.json"
  config = json.loads(path.read_text()) | changes
  path.write_text(json.dumps(config))


def test_mistral_sliding_window_is_rejected(tmp_path):
  tiny_hf.save_tiny(tmp_path)
  _edit_config(tmp_path, model_type="mistral", sliding_window=4096)
  with pytest.raises(jax_nlu_ppo.UnsupportedModelError, match=r"config.json.*'mistral'"):
    jax_nlu_ppo.load_pretrained(str(tmp_path))
  _edit_config(tmp_path, model_type="llama", sliding_window=4096)
  with pytest.raises(jax_nlu_ppo.UnsupportedModelError, match="sliding-window"):
    jax_nlu_ppo.load_pretrained(str(tmp_path))


def test_unknown_rope_type_is_rejected(tmp_path):
  tiny_hf.save_tiny(tmp_path)
  _edit_config(tmp_path, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
  with pytest.raises(jax_nlu_ppo.UnsupportedModelError, match="'yarn'"):
    jax_nlu_ppo.load_pretrained(str(tmp_path))


def test_vocab_mismatch_names_file_and_tensor(tmp_path):
  tiny_hf.save_tiny(tmp_path)
  _edit_config(tmp_path, vocab_size=200)
  with pytest.raises(jax_nlu_ppo.CheckpointError) as err:
    jax_nlu_ppo.load_pretrained(str(tmp_path))
  message = str(err.value)
  assert "model.safetensors" in message
  assert "'model.embed_tokens.weight'" in message
  assert "(160, 64)" in message and "(200, 64)" in message and "vocab_size=200" in message


def test_missing_tensor_is_named(tmp_path):
  tiny_hf.save_tiny(tmp_path, tie_word_embeddings=True)
  _edit_config(tmp_path, tie_word_embeddings=False)
  with pytest.raises(jax_nlu_ppo.CheckpointError, match="'lm_head.weight' is missing"):
    jax_nlu_ppo.load_pretrained(str(tmp_path))


def test_truncated_file_is_reported(tmp_path):
  tiny_hf.save_tiny(tmp_path)
  weights = tmp_path / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:-1000])
  with pytest.raises(jax_nlu_ppo.CheckpointError, match="model.safetensors.*truncated"):
    jax_nlu_ppo.load_pretrained(str(tmp_path))


def test_bad_dtype_option():
  with pytest.raises(ValueError, match="float16"):
    jax_nlu_ppo.load_pretrained("smollm2-135m-instruct", dtype="float16")

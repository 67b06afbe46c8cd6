"""Bad input at the edge (issue 25, item 7): a task and data that disagree, a model file cut
short, a tokenizer larger than the embedding, a PEFT adapter of another base or rank, and
`--set` values of the wrong type. Each gives one error naming the file or key and the fix,
before anything compiles (and, where the config alone tells, before the model loads)."""
import json
import re

import pytest

import jax_nlu_ppo
from jax_nlu_ppo import cli
from jax_nlu_ppo import compiles
from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo.model import lora as lora_lib
from jax_nlu_ppo.model import weights as weights_lib
from jax_nlu_ppo.rl import policy as policy_lib
from jax_nlu_ppo.rl import peft_adapter
from jax_nlu_ppo.runs import export
from tests import tiny_hf
from tests.test_cli import ROOT
from tests.test_ppo_core import randomized, tiny_chat_tokenizer

# Had the model been looked for, the error would name it instead.
NO_MODEL = "model.name=/nonexistent/model"


def _cli_error(capsys, *argv) -> str:
  """The one-line error of a command that must stop before compiling anything."""
  before = compiles.count()
  assert cli.main(list(argv)) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "nonexistent" not in err, err
  assert compiles.count() == before
  return err


@pytest.mark.parametrize("layout", ["file", "glue_dir", "file_strict"])
def test_task_and_data_columns_disagree(tmp_path, capsys, layout):
  """`data.task: rte` on SST-2's columns: one message with the file's and the task's columns,
  not one line per row (nor, with strict, advice to drop strict)."""
  rows = [{"sentence": s, "label": i % 2} for i, s in enumerate(["a fine film", "dull", "fun"])]
  if layout == "glue_dir":
    (tmp_path / "RTE").mkdir()
    path = tmp_path / "RTE" / "train.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n"
                                                  for r in rows))
    data = ["data.source=glue_dir", f"data.path={tmp_path}"]
  else:
    path = tmp_path / "sst2.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ["data.source=file", f"data.path={path}", f"data.strict={layout == 'file_strict'}"]
  err = _cli_error(capsys, "train", "--set", NO_MODEL, "data.task=rte", *data)
  assert f"error: {path}: missing columns 'sentence1' and 'sentence2', inputs of task rte" in err
  assert "the file's columns: sentence, label" in err
  assert "holds rte data (data.task, --task)" in err and "data.column_map" in err
  assert "strict" not in err and "line" not in err


def test_truncated_gguf_says_so(smollm2_gguf, tmp_path):
  """A GGUF cut in its header or in its tensors; gguf's own error is a numpy reshape."""
  data = smollm2_gguf.read_bytes()
  for size in (500_000, 10_000_000):  # the header (tokenizer) ends near 3 MB
    cut = tmp_path / f"cut_{size}.gguf"
    cut.write_bytes(data[:size])
    before = compiles.count()
    with pytest.raises(weights_lib.CheckpointError) as err:
      jax_nlu_ppo.load_pretrained(str(cut))
    message = str(err.value)
    assert message.startswith(f"{cut}: not a readable GGUF file"), message
    assert f"do not fit in its {size} bytes: truncated" in message and "fetch it again" in message
    assert compiles.count() == before
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"not a model at all")
  with pytest.raises(weights_lib.CheckpointError, match="junk.gguf: not a readable") as err:
    jax_nlu_ppo.load_pretrained(str(junk))
  assert str(err.value) == f"{junk}: not a readable GGUF file (GGUF magic invalid)"


def test_safetensors_cut_in_its_header(tmp_path):
  """tests/test_load_errors.py cuts the tensors; a cut in the JSON header said only 'not valid
  safetensors (Unterminated string...)'."""
  tiny_hf.save_tiny(tmp_path)
  weights = tmp_path / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:100])
  with pytest.raises(weights_lib.CheckpointError) as err:
    jax_nlu_ppo.load_pretrained(str(tmp_path))
  assert re.fullmatch(rf"{weights}: the file ends at 100 bytes, before its header of \d+ bytes "
                      r"does: it was truncated \(.*\); fetch it again", str(err.value))


def test_tokenizer_with_more_tokens_than_embedding_rows(tmp_path, monkeypatch):
  """Ids past the embedding gave NaN logits, silently; now the load stops before the weights."""
  tokenizer = tiny_chat_tokenizer([" ".join(f"w{i}" for i in range(300))])
  assert len(tokenizer) == 305
  tiny_hf.save_tiny(tmp_path)                                   # 160 embedding rows
  tokenizer.save_pretrained(tmp_path)

  def read_weights(*_, **__):
    raise AssertionError("the weights were read before the tokenizer was checked")
  monkeypatch.setattr(weights_lib, "load_params", read_weights)
  before = compiles.count()
  with pytest.raises(jax_nlu_ppo.CheckpointError) as err:
    jax_nlu_ppo.load_pretrained(str(tmp_path))
  message = str(err.value)
  assert message.startswith(f"{tmp_path}: the tokenizer has 305 tokens but the weights' "
                            f"embedding has 160 rows (vocab_size in {tmp_path / 'config.json'})")
  assert "use the tokenizer saved with these weights" in message
  assert "resize_token_embeddings(305)" in message
  assert compiles.count() == before
  monkeypatch.undo()
  # Fewer tokens than rows (an embedding padded to a round size) is fine.
  tiny_hf.save_tiny(tmp_path, vocab_size=320)
  assert len(jax_nlu_ppo.load_pretrained(str(tmp_path)).tokenizer) == 305


def test_init_adapter_of_another_rank_stops_before_the_model_loads(tmp_path, capsys):
  adapter = tmp_path / "adapter"
  adapter.mkdir()
  (adapter / "adapter_config.json").write_text(json.dumps({
      "peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
      "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "some/base"}))
  lora = ["lora.alpha=8", "lora.dropout=0", "lora.targets=[q_proj,v_proj]"]
  err = _cli_error(capsys, "train", "--init-adapter", str(adapter), "--set", NO_MODEL,
                   "lora.rank=8", *lora)
  assert (f"error: model.adapter {adapter / 'adapter_config.json'}: the adapter has "
          "lora.rank=4, the config lora.rank=8; set the config's lora section to the adapter's "
          "(--set lora.rank=4)") in err
  # The fix it names is enough: the run gets as far as the (missing) model.
  assert cli.main(["train", "--init-adapter", str(adapter), "--set", NO_MODEL, "lora.rank=4",
                   *lora]) == 2
  assert "'/nonexistent/model': no such file" in capsys.readouterr().err


def test_adapter_of_another_base_is_named_before_anything_compiles(tmp_path):
  tiny_hf.save_tiny(tmp_path / "base")
  tiny_hf.save_tiny(tmp_path / "wide", hidden_size=32)
  base = jax_nlu_ppo.load_pretrained(str(tmp_path / "base"))
  lora = lora_lib.LoraConfig(rank=2, alpha=4.0, dropout=0.0, targets=("q_proj", "v_proj"))
  policy = policy_lib.make_policy(base.model, lora, 0.0, seed=0)
  trainable = randomized(policy_lib.split(policy)[1], seed=1)
  export.export_peft(base, trainable, lora, str(tmp_path / "peft"),
                     base_model_name_or_path=str(tmp_path / "base"))
  wide = jax_nlu_ppo.load_pretrained(str(tmp_path / "wide"))
  before = compiles.count()
  with pytest.raises(peft_adapter.AdapterError) as err:
    peft_adapter.load_peft_adapter(str(tmp_path / "peft"), wide)
  message = str(err.value)
  assert message.startswith(f"{tmp_path / 'peft' / 'adapter_model.safetensors'}: tensor ")
  assert "has shape (2, 64) but this model expects (2, 32)" in message
  assert (f"made for another base model (adapter_config.json names '{tmp_path / 'base'}'): run "
          "on that base (model.name)") in message
  assert compiles.count() == before
  # A rank edited in adapter_config.json is not blamed on the base.
  config = tmp_path / "peft" / "adapter_config.json"
  config.write_text(json.dumps(json.loads(config.read_text()) | {"r": 4}))
  with pytest.raises(peft_adapter.AdapterError,
                     match=r"\(2, 64\) but this model expects \(4, 64\)") as err:
    peft_adapter.load_peft_adapter(str(tmp_path / "peft"), base)
  assert "another base" not in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("lora.rank=abc", "lora.rank: expected int, got str 'abc'; give a whole number such as 16"),
    ("ppo.kl.init_coef=[1]", r"ppo.kl.init_coef: expected float, got list \[1\]; give a number "
     r"such as 0.2"),
    ("rollout.batch_size=1.5", "rollout.batch_size: expected int, got float 1.5; give a whole "
     "number"),
    ("lora.targets=q_proj", r"lora.targets: expected a list, got 'q_proj'; write it in brackets, "
     r"e.g. \[q_proj\]"),
    ("ppo.kl=5", r"ppo.kl: expected a mapping .*; set its fields one by one "
     r"\(ppo.kl.FIELD=VALUE\)"),
    ("data.limit=ten", "data.limit: expected int, got str 'ten'; give a whole number, or null"),
])
def test_set_values_of_the_wrong_type(capsys, override, message):
  """The override is named, not the config file, which holds no such value."""
  config = ROOT / "configs/demo/sst2_cpu.yaml"
  err = _cli_error(capsys, "train", "--config", str(config), "--set", NO_MODEL, override)
  assert re.search(f"error: {message}.* \\(from the override {re.escape(override)}\\)$", err), err
  assert "sst2_cpu.yaml" not in err


def test_config_file_values_still_name_the_file(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("lora:\n  rank: abc\n")
  with pytest.raises(config_lib.ConfigError, match=f"^{bad}: lora.rank: expected int"):
    config_lib.load_config(bad, [NO_MODEL])
  # YAML 1.1 reads 1e-5 (no dot) as text; a float field takes it as the number it means.
  config = config_lib.load_config(None, ["optimizer.learning_rate=1e-5"])
  assert config.optimizer.learning_rate == 1e-5

"""`data.source: auto`: the demo config finds a GLUE folder beside the clone, else the hub, and
names both when neither can be had. The hub is a local dataset repository laid out as
`nyu-mll/glue` is (parquet files per config, declared in its README): no network."""
import logging

import pandas as pd
import pytest

from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo.nlu import data as data_lib
from tests.conftest import ROOT

ROWS = [("a warm and witty film", 1), ("dull , slow and far too long", 0),
        ("the cast is superb", 1)]


def glue_folder(root):
  folder = root / "shared" / "data" / "glue" / "SST-2"
  folder.mkdir(parents=True)
  for name in ("train.tsv", "dev.tsv"):
    (folder / name).write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in ROWS))


def hub_repo(folder):
  """A dataset repository in nyu-mll/glue's layout: sst2/<split>-00000-of-00001.parquet."""
  (folder / "sst2").mkdir(parents=True)
  frame = pd.DataFrame({"sentence": [s for s, _ in ROWS], "label": [y for _, y in ROWS],
                        "idx": range(len(ROWS))})
  for split in ("train", "validation"):
    frame.to_parquet(folder / "sst2" / f"{split}-00000-of-00001.parquet")
  (folder / "README.md").write_text(
      "---\nconfigs:\n- config_name: sst2\n  data_files:\n"
      "  - split: train\n    path: sst2/train-*.parquet\n"
      "  - split: validation\n    path: sst2/validation-*.parquet\n---\n")
  return folder


def demo_data(name: str) -> data_lib.DataConfig:
  config = config_lib.load_config(str(ROOT / "configs" / "demo" / "sst2_cpu.yaml"))
  return getattr(config, name)


@pytest.mark.parametrize("name", ["data", "eval_data"])
def test_the_demo_reads_a_glue_folder_beside_the_clone(tmp_path, monkeypatch, caplog, name):
  glue_folder(tmp_path)
  (tmp_path / "clone").mkdir()
  monkeypatch.chdir(tmp_path / "clone")
  monkeypatch.setattr(data_lib, "HUB_NAME", str(tmp_path / "no-hub"))  # never reached
  config = demo_data(name)
  assert config.source == "auto"
  with caplog.at_level(logging.INFO, logger=data_lib.__name__):
    ds, _ = data_lib.load(config)
  assert sorted(ds["sentence"]) == sorted(s for s, _ in ROWS)[:len(ds)]
  assert "the local GLUE folder ../shared/data/glue (data.source auto)" in caplog.text


def test_without_a_glue_folder_the_demo_reads_the_hub(tmp_path, monkeypatch, caplog):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(data_lib, "HUB_NAME", str(hub_repo(tmp_path / "glue-repo")))
  with caplog.at_level(logging.INFO, logger=data_lib.__name__):
    ds, _ = data_lib.load(demo_data("eval_data"))
  assert len(ds) == len(ROWS) and set(ds["label"]) == {0, 1}
  assert f"the hub's {tmp_path / 'glue-repo'} (no GLUE folder at ../shared/data/glue" in caplog.text


def test_neither_a_folder_nor_the_hub_names_both(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(data_lib, "load_hub", _unreachable)
  with pytest.raises(data_lib.DataError) as e:
    data_lib.load(demo_data("data"))
  message = str(e.value)
  assert str(tmp_path.parent / "shared" / "data" / "glue") in message
  assert "nyu-mll/glue cannot be read (ConnectionError: Couldn't reach" in message
  assert "data.path=FOLDER" in message


def _unreachable(*args, **kwargs):
  # What `datasets` raises offline (measured: after its retries, "Couldn't reach ... on the Hub").
  raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")


def test_a_path_given_as_a_file_and_a_custom_task_s_own_data(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  data_file = tmp_path / "rows.jsonl"
  data_file.write_text("".join(f'{{"sentence": "{s}", "label": {y}}}\n' for s, y in ROWS))
  resolved = data_lib.resolve_source(data_lib.DataConfig(task="sst2", path=str(data_file)))
  assert (resolved.source, resolved.path) == ("file", str(data_file))
  with pytest.raises(data_lib.DataError, match="no such file or folder"):
    data_lib.resolve_source(data_lib.DataConfig(task="sst2", path=str(tmp_path / "nope")))
  # Explicit sources are left as they are.
  explicit = data_lib.DataConfig(task="sst2", source="hub")
  assert data_lib.resolve_source(explicit) is explicit

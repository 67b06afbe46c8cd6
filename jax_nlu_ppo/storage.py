"""Run folders on local disk or in Google Cloud Storage (`gs://bucket/run`), through one path type.

Every run folder, checkpoint and output file is an `etils.epath.Path`, as Orbax's are: a local path
goes to the OS, a `gs://` one to gcsfs. `is_remote` alone tells the two apart, for what a bucket does
differently: no rename, no append, no hard link; but an object's upload is atomic, and can be made
conditional on no object having the name.

An emulator or a private endpoint is named by `STORAGE_EMULATOR_HOST` (gcsfs and
google-cloud-storage read it); at import this module passes it on to TensorStore, which writes
Orbax's arrays, as `TENSORSTORE_GCS_HTTP_URL`.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable

import fsspec
from etils import epath

Path = epath.Path
PathLike = str | os.PathLike


def use_endpoint(environ=os.environ) -> None:
  """Points TensorStore and gcsfs at `STORAGE_EMULATOR_HOST` when it is set (settings the user
  gave win)."""
  host = environ.get("STORAGE_EMULATOR_HOST")
  if not host:
    return
  environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host if "://" in host else f"http://{host}")
  # An emulator serves the JSON API only: gcsfs's gRPC probe of a bucket's layout waits a minute.
  environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


# Before TensorStore or gcsfs first reads its settings.
use_endpoint()
# Other hosts and later runs write the same folder: a cached listing would miss their files.
fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False


def is_remote(p: PathLike) -> bool:
  """Whether `p` is in object storage (`gs://...`) rather than on a local disk."""
  return "://" in os.fspath(p)


def path(p: PathLike) -> Path:
  return epath.Path(p)


def absolute(p: PathLike) -> Path:
  """`p` with a local path made absolute (as Orbax wants it); a URL is absolute already."""
  return path(p) if is_remote(p) else path(p).absolute()


def mkdir(p: PathLike) -> None:
  """Creates the folder `p` and its parents; a bucket has no folders, so there nothing is done."""
  if not is_remote(p):
    path(p).mkdir(parents=True, exist_ok=True)


def write_text(p: PathLike, text: str) -> None:
  """Writes `p` whole or not at all: locally through a temporary file renamed over it; an
  object's upload is atomic by itself."""
  p = path(p)
  mkdir(p.parent)
  if is_remote(p):
    p.write_text(text)
    return
  tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
  tmp.write_text(text)
  tmp.replace(p)


def write_json(p: PathLike, obj: Any, **dump_options) -> None:
  write_text(p, json.dumps(obj, **dump_options) + "\n")


def append_jsonl(p: PathLike, rows: Iterable[dict[str, Any]]) -> None:
  """Adds a JSON line per row to `p` (created if missing)."""
  p = path(p)
  text = "".join(json.dumps(row) + "\n" for row in rows)
  if is_remote(p):
    # An object cannot grow: it is read and uploaded again whole (a run's logs are KBs to MBs).
    p.write_text((p.read_text() if p.exists() else "") + text)
    return
  with p.open("a") as f:
    f.write(text)


def create_new(p: PathLike, text: str) -> None:
  """Writes `p` only if nothing has its name (else `FileExistsError`), never half-written:
  locally a whole temporary file hard-linked to the name, in a bucket an upload on the
  precondition that no object exists (`ifGenerationMatch=0`)."""
  p = path(p)
  if is_remote(p):
    fs, key = fsspec.core.url_to_fs(os.fspath(p))
    fs.pipe_file(key, text.encode(), mode="create")
    return
  tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
  tmp.write_text(text)
  try:
    os.link(tmp, p)
  finally:
    tmp.unlink(missing_ok=True)


def touch(p: PathLike) -> None:
  """Moves `p`'s modification time to now (`FileNotFoundError` if it is gone)."""
  p = path(p)
  if is_remote(p):
    p.write_bytes(p.read_bytes())     # an object's time is its upload's
  else:
    os.utime(p)


def mtime(p: PathLike) -> float:
  return float(path(p).stat().mtime)


def unwritable(p: PathLike) -> str | None:
  """Why the folder that `p` goes in cannot be created or written (the system's reason), else
  None: a probe file beside `p` is written and removed."""
  p = path(p)
  probe = p.parent / f".{p.name}.probe"
  try:
    mkdir(p.parent)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    return e.strerror or f"{type(e).__name__}: {e}"
  except Exception as e:  # pylint: disable=broad-except
    if not is_remote(p):
      raise
    # gcsfs raises its own HttpError for some refusals (a 403 of a bucket's policy).
    return f"{type(e).__name__}: {e}"
  return None


def files_under(folder: PathLike) -> list[Path]:
  """Every file under `folder`, at any depth, sorted (epath refuses `rglob` patterns, and its
  `walk` in a bucket drops the `gs://`)."""
  files = []
  for p in path(folder).iterdir():
    files += files_under(p) if p.is_dir() else [p]
  return sorted(files)


def copy_tree(src: PathLike, dst: PathLike) -> None:
  """Copies the files under folder `src` to the same names under `dst` (either side may be in
  a bucket)."""
  src, dst = path(src), path(dst)
  for file in files_under(src):
    target = dst / file.relative_to(src)
    mkdir(target.parent)
    with file.open("rb") as r, target.open("wb") as w:
      shutil.copyfileobj(r, w, 1 << 24)     # streamed: merged weights may be gigabytes


def move(src: PathLike, dst: PathLike) -> None:
  """Moves the folder `src` to `dst`: a rename on disk; in a bucket, which has no rename (and no
  folder to rename into), a copy of each object then the removal of the originals."""
  if is_remote(src):
    copy_tree(src, dst)
    path(src).rmtree()
  else:
    path(src).rename(dst)

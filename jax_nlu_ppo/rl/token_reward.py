"""Answer extraction and reward on generated token ids, jittable: the device twin of `answer.py`.

The reward has to run inside a jitted PPO step, on ids, without decoding on the host. Matching
label words as fixed token sequences breaks on ordinary output: BPE merges the tag's ">" with
what follows (">.", ">\\n"), and sampling can spell a word with non-canonical tokens
(" Neg" "ative"). So the ids are expanded on device into the UTF-8 bytes they decode to, through
a [vocab, max_token_bytes] table built once from the tokenizer, and the paper's rule
(arXiv 2410.11020) runs on those bytes as `answer.extract` runs on the decoded text:

  answer = bytes before the first closing tag (strict: no tag -> unparsed; lenient: all bytes)
  label  = the one label with a word found in answer as a whole word (`\\b word \\b`);
           no label or two different labels -> unparsed (-1)

Whole words follow Python's `re`: a character is a word character iff `str.isalnum()` or "_",
and the characters next to a match are decoded from UTF-8 on device to decide.

Known differences from the text extractor, all rare in English output: a case-insensitive rule
folds ASCII letters only (`re.IGNORECASE` also takes "K" Kelvin, long "ſ", "İ" and "ı" for
k, s, i, i); regression rules (STS-B) are not supported (use `answer.response_rewards`).
"""
from __future__ import annotations

import functools
import re

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jax_nlu_ppo.nlu import answer
from jax_nlu_ppo.nlu import tasks as tasks_lib

# Fills the byte buffer past a response's end: equal to no pattern byte, and no UTF-8 byte.
_NO_BYTE = 256
_SENTENCEPIECE_SPACE = "\u2581"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Round-trip probes for the byte table: ASCII, accents, typographic quotes, CJK, an emoji.
_PROBES = ("naïve “quoted” café — 日本語 😀\n\ttabs_and 123.", " Not sure.\n\nOK")


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
  """GPT-2's byte-level BPE alphabet, char -> byte: printable bytes stand for themselves, the
  rest are shifted to code points from 256 (so a space reads "Ġ", a newline "Ċ")."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  shifted = [b for b in range(256) if b not in printable]
  alphabet = {chr(b): b for b in printable}
  alphabet.update({chr(256 + i): b for i, b in enumerate(shifted)})
  return alphabet


def token_bytes(tokenizer) -> list[bytes]:
  """The bytes each id decodes to (b"" for special tokens, as `skip_special_tokens` drops them).

  Supports byte-level BPE vocabularies (GPT-2, LLaMA-3, SmolLM2, Qwen) and SentencePiece-style
  ones ("▁" for a space, "<0xNN>" byte fallback: LLaMA-2, TinyLlama).
  """
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    raise ValueError(f"token-level rewards need a fast (tokenizers) tokenizer, got "
                     f"{type(tokenizer).__name__}; use answer.response_rewards on decoded text")
  decoder = repr(backend.decoder)
  added = tokenizer.added_tokens_decoder
  special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
  size = max(len(tokenizer), max(added, default=-1) + 1)
  pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
  if "ByteLevel" in decoder:
    alphabet = _byte_level_alphabet()
    piece_bytes = lambda piece: bytes(alphabet[c] for c in piece)
  elif _SENTENCEPIECE_SPACE in decoder or "Metaspace" in decoder:
    byte_fallback = "ByteFallback" in decoder

    def piece_bytes(piece: str) -> bytes:
      match = _BYTE_FALLBACK.fullmatch(piece) if byte_fallback else None
      if match:
        return bytes([int(match.group(1), 16)])
      return piece.replace(_SENTENCEPIECE_SPACE, " ").encode()
  else:
    raise ValueError(f"token-level rewards support byte-level BPE and SentencePiece "
                     f"vocabularies; this tokenizer's decoder is {decoder}. Use "
                     "answer.response_rewards on decoded text instead")
  table = []
  for i, piece in enumerate(pieces):
    if i in special or piece is None:
      table.append(b"")
    elif i in added:
      table.append(added[i].content.encode())
    else:
      try:
        table.append(piece_bytes(piece))
      except KeyError:
        raise ValueError(f"token {i} ({piece!r}) is not spelled in the byte-level alphabet; use "
                         "answer.response_rewards on decoded text") from None
  return table


def _check_round_trip(tokenizer, table: list[bytes], texts) -> None:
  for text in texts:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ours = b"".join(table[i] for i in ids).decode("utf-8", "replace")
    theirs = tokenizer.decode(ids, skip_special_tokens=True)
    # SentencePiece decoders drop the text's first leading space; no match depends on it.
    if theirs not in (ours, ours.removeprefix(" ")):
      raise ValueError(f"token byte table does not reproduce tokenizer.decode on {text!r} "
                       f"({ours!r} != {theirs!r}); token-level rewards cannot be used with "
                       "this tokenizer, use answer.response_rewards on decoded text")


@functools.cache
def _word_codepoints() -> np.ndarray:
  """Which code points `re` counts as `\\w` (isalnum or "_"), up to the last one that is."""
  table = np.fromiter((chr(c).isalnum() for c in range(0x110000)), bool, 0x110000)
  table[ord("_")] = True
  return table[:np.flatnonzero(table)[-1] + 1]


def _is_word(char: str) -> bool:
  return re.match(r"\w", char) is not None


def _padded(rows: list[bytes]) -> np.ndarray:
  out = np.full((len(rows), max(map(len, rows))), -1, np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = list(row)
  return out


def _as_rule(task_or_rule) -> answer.ExtractionRule:
  if isinstance(task_or_rule, str):
    task_or_rule = tasks_lib.get_task(task_or_rule)
  if isinstance(task_or_rule, tasks_lib.Task):
    return task_or_rule.extraction_rule()
  return task_or_rule


@flax.struct.dataclass
class TokenMatcher:
  """A classification rule compiled for one tokenizer; a pytree, pass it into `jax.jit`.

  Byte tables hold -1 in padding. `words_pm` rows are the label words (lowercased when the rule
  ignores case), `word_label_p` the label each one names.
  """
  bytes_vl: jax.Array        # uint8 [vocab, max token bytes]: what each id decodes to
  length_v: jax.Array        # int32 [vocab]: how many of those bytes are real
  eos_v: jax.Array           # bool [vocab]: ids that end a response
  word_c: jax.Array          # bool [code points]: `\w` in Python's `re`
  tag_m: jax.Array           # int32 [tag bytes]: the closing tag
  words_pm: jax.Array        # int32 [words, max word bytes]
  word_len_p: jax.Array      # int32 [words]
  word_label_p: jax.Array    # int32 [words]
  starts_word_p: jax.Array   # bool [words]: first char is `\w` (so `\b` wants a non-word before)
  ends_word_p: jax.Array     # bool [words]: last char is `\w`
  num_labels: int = flax.struct.field(pytree_node=False)
  case_sensitive: bool = flax.struct.field(pytree_node=False)

  @classmethod
  def build(cls, task_or_rule: tasks_lib.Task | answer.ExtractionRule | str, tokenizer,
            eos_ids: tuple[int, ...] | None = None) -> TokenMatcher:
    """Compiles a task's (or rule's) label words and closing tag for `tokenizer`'s ids.

    `eos_ids` end a response (default: the tokenizer's EOS); pass `LanguageModel.eos_ids()`.
    The rule's own `lenient` is ignored: `token_labels` takes it per call.
    """
    rule = _as_rule(task_or_rule)
    if rule.regression:
      raise ValueError("token-level rewards support classification tasks only; a regression "
                       "rule (STS-B) reads a number: use answer.response_rewards on decoded text")
    words = [(label, w) for label, alts in enumerate(rule.label_words) for w in alts]
    if not rule.case_sensitive and not all(w.isascii() for _, w in words):
      raise ValueError(f"case-insensitive token matching folds ASCII only; label words "
                       f"{rule.label_words!r} are not all ASCII")
    table = token_bytes(tokenizer)
    _check_round_trip(tokenizer, table, (rule.closing_tag, *(w for _, w in words), *_PROBES))
    if eos_ids is None:
      eos_ids = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    eos_v = np.zeros(len(table), bool)
    eos_v[[i for i in eos_ids if i < len(table)]] = True
    spelled = [w if rule.case_sensitive else w.lower() for _, w in words]
    return cls(
        bytes_vl=jnp.asarray(np.maximum(_padded(table), 0).astype(np.uint8)),
        length_v=jnp.asarray([len(t) for t in table], jnp.int32),
        eos_v=jnp.asarray(eos_v),
        word_c=jnp.asarray(_word_codepoints()),
        tag_m=jnp.asarray(list(rule.closing_tag.encode()), jnp.int32),
        words_pm=jnp.asarray(_padded([w.encode() for w in spelled])),
        word_len_p=jnp.asarray([len(w.encode()) for w in spelled], jnp.int32),
        word_label_p=jnp.asarray([label for label, _ in words], jnp.int32),
        starts_word_p=jnp.asarray([_is_word(w[0]) for _, w in words]),
        ends_word_p=jnp.asarray([_is_word(w[-1]) for _, w in words]),
        num_labels=rule.num_labels, case_sensitive=rule.case_sensitive)


def response_bytes(matcher: TokenMatcher, tokens_br: jax.Array,
                   mask_br: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each row's text as bytes [B, R * max token bytes] (256 past the end), and its length.

  A row's text is its masked-in tokens before its first EOS, as `decode_responses` reads it.
  """
  b, n = tokens_br.shape
  max_bytes = matcher.bytes_vl.shape[1]
  eos_br = jnp.take(matcher.eos_v, tokens_br, mode="fill", fill_value=False)
  live_br = mask_br.astype(bool) & (jnp.cumsum(eos_br, axis=1) == 0)
  length_br = jnp.where(live_br, jnp.take(matcher.length_v, tokens_br, mode="fill",
                                          fill_value=0), 0)
  start_br = jnp.cumsum(length_br, axis=1) - length_br
  bytes_bnl = jnp.take(matcher.bytes_vl, tokens_br, axis=0, mode="fill", fill_value=0)
  offset_bnl = jnp.arange(max_bytes)[None, None, :]
  # Each token's bytes go right after the previous token's; unused slots land in a spill
  # column that is cut off.
  size = n * max_bytes
  target_bnl = jnp.where(offset_bnl < length_br[..., None], start_br[..., None] + offset_bnl,
                         size)
  text_bk = jnp.full((b, size + 1), _NO_BYTE, jnp.int32)
  text_bk = text_bk.at[jnp.arange(b)[:, None, None], target_bnl].set(bytes_bnl.astype(jnp.int32))
  return text_bk[:, :size], length_br.sum(axis=1)


def _occurrences(text_bk: jax.Array, patterns_pm: jax.Array, length_p: jax.Array) -> jax.Array:
  """hit_bpk: pattern p's bytes start at byte k of row b (sliding window over all offsets)."""
  k, m = text_bk.shape[1], patterns_pm.shape[1]
  padded_bk = jnp.pad(text_bk, ((0, 0), (0, m)), constant_values=_NO_BYTE)
  hit_bpk = jnp.ones((text_bk.shape[0], patterns_pm.shape[0], k), bool)
  for j in range(m):  # over pattern bytes (a dozen), not over the sequence
    same_bpk = padded_bk[:, None, j:j + k] == patterns_pm[None, :, j, None]
    hit_bpk &= same_bpk | (j >= length_p)[None, :, None]
  return hit_bpk


def _word_chars(word_c: jax.Array, text_bk: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(word_bk, before_bk): a `\\w` char starts at byte k; the char ending at byte k-1 is `\\w`.

  Decodes UTF-8 at every offset; a byte that starts no valid sequence is, as in Python's
  `errors="replace"`, a U+FFFD, which is not a word character.
  """
  k = text_bk.shape[1]
  padded_bk = jnp.pad(text_bk, ((0, 0), (0, 3)), constant_values=_NO_BYTE)
  b0, b1, b2, b3 = (padded_bk[:, i:i + k] for i in range(4))
  cont = lambda x: (x >= 0x80) & (x < 0xC0)
  low = lambda x: x & 0x3F
  one = b0 < 0x80
  two = (b0 >= 0xC2) & (b0 <= 0xDF) & cont(b1)
  # The second-byte limits reject overlong forms, surrogates and code points past U+10FFFF.
  three = ((b0 >= 0xE0) & (b0 <= 0xEF) & cont(b1) & cont(b2)
           & ((b0 != 0xE0) | (b1 >= 0xA0)) & ((b0 != 0xED) | (b1 < 0xA0)))
  four = ((b0 >= 0xF0) & (b0 <= 0xF4) & cont(b1) & cont(b2) & cont(b3)
          & ((b0 != 0xF0) | (b1 >= 0x90)) & ((b0 != 0xF4) | (b1 < 0x90)))
  kinds = [one, two, three, four]
  codepoint_bk = jnp.select(kinds, [
      b0, (b0 & 0x1F) << 6 | low(b1), (b0 & 0x0F) << 12 | low(b1) << 6 | low(b2),
      (b0 & 0x07) << 18 | low(b1) << 12 | low(b2) << 6 | low(b3)], 0)
  size_bk = jnp.select(kinds, [1, 2, 3, 4], 0)
  word_bk = (size_bk > 0) & jnp.take(word_c, codepoint_bk, mode="fill", fill_value=False)
  size_pad, word_pad = (jnp.pad(x, ((0, 0), (4, 0))) for x in (size_bk, word_bk))
  before_bk = jnp.zeros_like(word_bk)
  for j in range(1, 5):  # a char of j bytes that ends at k-1 starts at k-j
    before_bk |= (size_pad[:, 4 - j:4 - j + k] == j) & word_pad[:, 4 - j:4 - j + k]
  return word_bk, before_bk


@functools.partial(jax.jit, static_argnames="lenient")
def token_labels(matcher: TokenMatcher, tokens_br: jax.Array, mask_br: jax.Array,
                 lenient: bool) -> jax.Array:
  """label_b (int32): the label each response names, -1 when unparsed; `answer.extract`'s rule.

  `tokens_br` are generated ids, `mask_br` true on the response's tokens (a `Generation`'s
  fields); tokens after the first EOS are ignored as well.
  """
  text_bk, length_b = response_bytes(matcher, tokens_br, mask_br)
  k = text_bk.shape[1]
  tag_m = matcher.tag_m
  tag_bk = _occurrences(text_bk, tag_m[None], jnp.asarray([tag_m.shape[0]]))[:, 0]
  has_tag_b = tag_bk.any(axis=1)
  end_b = jnp.where(has_tag_b, jnp.argmax(tag_bk, axis=1), length_b)
  answered_b = has_tag_b | lenient

  search_bk = text_bk
  if not matcher.case_sensitive:
    search_bk = jnp.where((text_bk >= ord("A")) & (text_bk <= ord("Z")), text_bk + 32, text_bk)
  hit_bpk = _occurrences(search_bk, matcher.words_pm, matcher.word_len_p)
  word_bk, before_bk = _word_chars(matcher.word_c, text_bk)
  stop_bpk = jnp.arange(k)[None, None, :] + matcher.word_len_p[None, :, None]
  inside_bpk = stop_bpk <= end_b[:, None, None]
  # `\b` at both ends: the word's edge char and its neighbour differ in `\w`-ness; past the
  # answer's end there is no neighbour.
  after_bpk = jnp.take_along_axis(jnp.pad(word_bk, ((0, 0), (0, 1)))[:, None, :],
                                  jnp.minimum(stop_bpk, k), axis=2)
  after_bpk &= stop_bpk < end_b[:, None, None]
  whole_bpk = ((before_bk[:, None, :] != matcher.starts_word_p[None, :, None])
               & (after_bpk != matcher.ends_word_p[None, :, None]))
  found_bp = (hit_bpk & inside_bpk & whole_bpk).any(axis=2)
  names_pl = matcher.word_label_p[:, None] == jnp.arange(matcher.num_labels)[None, :]
  found_bl = (found_bp[:, :, None] & names_pl[None]).any(axis=1)
  single_b = answered_b & (found_bl.sum(axis=1) == 1)
  return jnp.where(single_b, jnp.argmax(found_bl, axis=1), -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "lenient"))
def token_rewards(matcher: TokenMatcher, tokens_br: jax.Array, mask_br: jax.Array,
                  gold_b: jax.Array, config: answer.RewardConfig = answer.RewardConfig(),
                  lenient: bool | None = None) -> jax.Array:
  """rewards_b (float32): `correct` / `wrong` / `unparsed` from `config`, as `answer.reward`.

  `lenient=None` follows `config.lenient`.
  """
  lenient = config.lenient if lenient is None else lenient
  label_b = token_labels(matcher, tokens_br, mask_br, lenient)
  rewards_b = jnp.where(label_b == gold_b, config.correct, config.wrong)
  return jnp.where(label_b < 0, config.unparsed, rewards_b).astype(jnp.float32)

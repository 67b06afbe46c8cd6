"""Token-level extraction (`token_reward`) against the text extractor (`answer.extract`).

The reference is always `answer.extract` on `tokenizer.decode` of the same ids, so a row's
expected label is never written by hand.
"""
import random
import types

import jax
import numpy as np
import pytest
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

import jax_nlu_ppo
from jax_nlu_ppo.nlu import answer, data, tasks
from jax_nlu_ppo.model import pretrained
from jax_nlu_ppo.rl.token_reward import TokenMatcher, token_labels, token_rewards

TAG = answer.CLOSING_TAG
TASKS = ("sst2", "rte", "mnli", "cola")
# Look-alikes and neighbours that `\b` must tell apart from the label words.
NOISE = ("the", "sure", "I think", "Not", "Nothing", "Nope", "Yesterday", "Positively",
         "Negatives", "not_entailment", "entailments", "neutrality", "contradictions", ".", ",",
         "!", "“", "”", "_", "1", "é", "—", "\n", ">", "<Judgement>", "</Judgement",
         "</judgement>", TAG, " " + TAG, TAG + ".", TAG + "\n", "日本", "😀")


@pytest.fixture(scope="module")
def lm(smollm2_gguf):
  return jax_nlu_ppo.load_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tokenizer(lm):
  return lm.tokenizer


def sentencepiece_tokenizer():
  """A tiny LLaMA-2-style tokenizer: "▁" for spaces, <0xNN> byte fallback, leading space strip."""
  specials = ["<unk>", "<s>", "</s>"]
  merges = [("N", "o"), ("Y", "e"), ("Ye", "s"), ("▁", "No"), ("▁", "Yes"), ("<", "/")]
  pieces = (specials + [f"<0x{b:02X}>" for b in range(256)] + ["▁"]
            + [chr(c) for c in range(33, 127)] + [a + b for a, b in merges])
  tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges,
                             byte_fallback=True, unk_token="<unk>"))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                         normalizers.Replace(" ", "▁")])
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                              bos_token="<s>", eos_token="</s>")


def handwritten(task):
  first, second = task.label_words[0], task.label_words[-1]
  return [
      f"<Judgement> {first} </Judgement>", second, f"{first} or {second} {TAG}",
      f"Not sure {TAG}", f"{second.lower()}{TAG}", f" {first}.{TAG} {second}", f"“{second}”",
      f"{second}s {TAG}", f"x_{first} {TAG}", f"{first}1 {TAG}", f"{first}é {TAG}",
      f"{second.upper()} {TAG}", "", f"{TAG} {first}", f"{first}\n{TAG}", f"({second}){TAG}.",
      f"{first}</Judgement", f"{second} and {second} {TAG}\n<Analysis>"]


def random_response(rng, task):
  variants = {v for w in task.label_words for v in (w, w.lower(), w.upper(), w.capitalize())}
  fragments = sorted(variants) + list(NOISE)
  parts = [rng.choice(fragments) for _ in range(rng.randint(1, 7))]
  return "".join(rng.choice(("", " ", " ", "\n")) + p for p in parts)


def token_ids(tok, text, rng):
  """The text's ids; half the time cut at random points and each piece encoded alone, which
  gives the non-canonical token boundaries sampling can produce (mid-word, mid-tag)."""
  if rng.random() < 0.5 or len(text) < 2:
    return tok.encode(text, add_special_tokens=False)
  cuts = sorted(rng.sample(range(1, len(text)), min(3, len(text) - 1)))
  pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
  return [i for piece in pieces for i in tok.encode(piece, add_special_tokens=False)]


def right_padded(rows, width, filler):
  """(ids, mask) with `filler` ids after each row: a matcher that read past the mask would
  find a label and a closing tag there."""
  tokens = np.resize(np.asarray(filler, np.int32), (len(rows), width)).copy()
  mask = np.zeros((len(rows), width), bool)
  for i, row in enumerate(rows):
    assert len(row) <= width, len(row)
    tokens[i, :len(row)] = row
    mask[i, :len(row)] = True
  return tokens, mask


def text_labels(texts, rule):
  return np.array([-1 if (label := answer.extract(t, rule).label) is None else label
                   for t in texts])


def assert_agrees(tok, task, rows, width=64, eos_ids=None):
  """Token labels equal text labels on the decoded rows, strict and lenient; returns the
  strict and lenient text labels."""
  matcher = TokenMatcher.build(task, tok, eos_ids)
  filler = tok.encode(f" {task.label_words[0]} {TAG}", add_special_tokens=False)
  tokens, mask = right_padded(rows, width, filler)
  texts = [tok.decode(r, skip_special_tokens=True) for r in rows]
  expected = []
  for lenient in (False, True):
    want = text_labels(texts, task.extraction_rule(lenient))
    got = np.asarray(token_labels(matcher, tokens, mask, lenient))
    wrong = [(texts[i], int(got[i]), int(want[i])) for i in np.flatnonzero(got != want)]
    assert not wrong, f"{task.name} lenient={lenient}: (text, token label, text label) {wrong}"
    expected.append(want)
  return expected


@pytest.mark.slow
@pytest.mark.parametrize("name", TASKS)
def test_handwritten_and_random_responses_agree_with_text_extractor(tokenizer, name):
  task = tasks.get_task(name)
  rng = random.Random(name)
  texts = handwritten(task) + [random_response(rng, task) for _ in range(300)]
  for text in texts[:len(handwritten(task))]:
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
  strict, lenient = assert_agrees(tokenizer, task, [token_ids(tokenizer, t, rng) for t in texts])
  # The cases are only informative if every outcome occurs.
  for labels in (strict, lenient):
    assert set(labels) == set(range(-1, task.num_labels)), labels
  assert (strict != lenient).any()


@pytest.mark.slow
def test_tokens_after_eos_are_ignored(tokenizer):
  task = tasks.get_task("sst2")
  eos = tokenizer.eos_token_id
  encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
  heads = [" Negative", f" Negative {TAG}", " Not sure", ""]
  tails = [f" Positive {TAG}", f" {TAG}", " Negative"]
  rows = [encode(h) + [eos] + encode(t) for h in heads for t in tails]
  matcher = TokenMatcher.build(task, tokenizer, (eos,))
  tokens, mask = right_padded(rows, 16, [eos])
  texts = [tokenizer.decode(encode(h)) for h in heads for _ in tails]
  for lenient in (False, True):
    want = text_labels(texts, task.extraction_rule(lenient))
    np.testing.assert_array_equal(token_labels(matcher, tokens, mask, lenient), want)


@pytest.mark.slow
@pytest.mark.parametrize("lenient", [False, True])
def test_rewards_match_answer_rewards_under_an_outer_jit(tokenizer, lenient):
  task = tasks.get_task("mnli")
  rng = random.Random(1)
  texts = [random_response(rng, task) for _ in range(64)]
  golds = np.array([rng.randrange(task.num_labels) for _ in texts])
  config = answer.RewardConfig(correct=2.0, wrong=-0.5, unparsed=-4.0, lenient=lenient)
  matcher = TokenMatcher.build(task, tokenizer)
  tokens, mask = right_padded([tokenizer.encode(t, add_special_tokens=False) for t in texts],
                              48, [0])
  step = jax.jit(lambda m, t, k, g: token_rewards(m, t, k, g, config))
  got = step(matcher, tokens, mask, golds)
  want = answer.response_rewards(texts, golds, task.extraction_rule(lenient), config)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  assert len(set(want.tolist())) == 3


def test_sentencepiece_vocabulary_agrees_with_text_extractor():
  tok = sentencepiece_tokenizer()
  rng = random.Random(0)
  for name in ("rte", "sst2"):
    task = tasks.get_task(name)
    texts = handwritten(task) + [random_response(rng, task) for _ in range(100)]
    assert_agrees(tok, task, [token_ids(tok, t, rng) for t in texts], width=160)


def test_unsupported_inputs_raise():
  tok = sentencepiece_tokenizer()
  with pytest.raises(ValueError, match="response_rewards"):
    TokenMatcher.build("stsb", tok)
  word_level = Tokenizer(models.WordLevel({"Yes": 0, "No": 1, "[UNK]": 2}, unk_token="[UNK]"))
  word_level.decoder = decoders.WordPiece()
  with pytest.raises(ValueError, match="decoder"):
    TokenMatcher.build("rte", transformers.PreTrainedTokenizerFast(tokenizer_object=word_level))


def cut_short(gen, rng):
  """Each sampled row with its mask ending at a random point: real text, truncated."""
  mask_br = np.array(gen.mask_br)
  for row in mask_br:
    row[rng.randint(0, len(row)):] = False
  return types.SimpleNamespace(tokens_br=np.asarray(gen.tokens_br), mask_br=mask_br)


def splice(gen, eos_ids, inserts, rng):
  """Sampled row `i % batch` with the id sequences `inserts[i]` put, in order, at random points
  of its response (before its EOS): real model text on both sides of what is inserted."""
  tokens_br, mask_br = np.asarray(gen.tokens_br), np.asarray(gen.mask_br)
  rows, masks = [], []
  for i, pieces in enumerate(inserts):
    row, keep = tokens_br[i % len(tokens_br)], mask_br[i % len(tokens_br)]
    live = int(sum(k and t not in eos_ids for t, k in zip(row, keep)))
    cuts = sorted(rng.randint(0, live) for _ in pieces)
    new_row, new_keep, start = [], [], 0
    for cut, piece in zip(cuts, pieces):
      new_row += [*row[start:cut], *piece]
      new_keep += [*keep[start:cut], *[True] * len(piece)]
      start = cut
    rows.append([*new_row, *row[start:]])
    masks.append([*new_keep, *keep[start:]])
  tokens, mask = right_padded(rows, max(map(len, rows)), [0])
  for i, keep in enumerate(masks):
    mask[i, :len(keep)] = keep
  return types.SimpleNamespace(tokens_br=tokens, mask_br=mask)


def tag_spellings(tok):
  """The closing tag as ids: canonical, after a space, merged with a following "." (">."),
  and one token per character."""
  encode = lambda text: tok.encode(text, add_special_tokens=False)
  spellings = [encode(TAG), encode(" " + TAG), encode(TAG + "."),
               [tok.convert_tokens_to_ids(c) for c in TAG]]
  assert len({tuple(s) for s in spellings}) == 4 and len(spellings[3]) == len(TAG)
  return spellings


def stacked(batches):
  """One batch of rows from several, right-padded (mask False) to the widest."""
  width = max(b.tokens_br.shape[1] for b in batches)
  pad = lambda x: np.pad(np.asarray(x), ((0, 0), (0, width - x.shape[1])))
  return types.SimpleNamespace(tokens_br=np.concatenate([pad(b.tokens_br) for b in batches]),
                               mask_br=np.concatenate([pad(b.mask_br) for b in batches]))


@pytest.mark.slow
def test_real_sst2_generations_agree_with_text_extractor(lm, glue_dir):
  sst2 = tasks.get_task("sst2")
  ds, _ = data.load(data.DataConfig(task="sst2", source="glue_dir", path=str(glue_dir),
                                    split="validation", limit=16, shuffle_seed=0))
  prompts = [tasks.build_prompt(sst2, ex, "chat") for ex in ds]
  ids, mask = pretrained.encode_prompts(lm.tokenizer, prompts, chat=True)
  # 16 prompts: the prefill dominates, ~0.5 s a prompt on 2 busy CPU cores.
  gen = lm.generate_ids(ids, mask, 32, jax_nlu_ppo.SamplingConfig(temperature=1.0), seed=0)
  eos_ids = lm.eos_ids()
  rng = random.Random(0)
  # The 135M model rarely closes the tag or names a label word; these parts put them, with
  # several spellings, into its real text.
  tags = tag_spellings(lm.tokenizer)
  words = sorted({f"{space}{v}" for name in ("sst2", "rte", "mnli")
                  for w in tasks.get_task(name).label_words
                  for v in (w, w.lower(), w.upper()) for space in ("", " ")})
  encode = lambda text: lm.tokenizer.encode(text, add_special_tokens=False)
  with_words = [rng.sample([encode(rng.choice(words)), rng.choice(tags)], 2)
                for _ in range(4 * len(ids))]
  parts = {"sampled": gen, "cut short": cut_short(gen, rng),
           "tag spliced": splice(gen, eos_ids, [[t] for t in tags for _ in ids], rng),
           "word + tag spliced": splice(gen, eos_ids, with_words, rng)}
  batch = stacked(list(parts.values()))
  part_b = np.repeat(list(parts), [len(p.tokens_br) for p in parts.values()])
  gold_b = np.resize(np.asarray(ds["label"]), len(part_b))
  texts = pretrained.decode_responses(lm.tokenizer, batch, eos_ids)
  parsed = dict.fromkeys([(part, lenient) for part in parts for lenient in (False, True)], 0)
  # The same model text read with each task's rule: Yes/No (and Not, Nothing, ...) and the
  # case-insensitive NLI words occur in it too.
  for task in (sst2, tasks.get_task("rte"), tasks.get_task("mnli")):
    matcher = TokenMatcher.build(task, lm.tokenizer, eos_ids)
    for lenient in (False, True):
      want = text_labels(texts, task.extraction_rule(lenient))
      got = np.asarray(token_labels(matcher, batch.tokens_br, batch.mask_br, lenient))
      for part in parts:
        rows = part_b == part
        parsed[part, lenient] += int((want[rows] >= 0).sum())
        print(f"{task.name} {part} lenient={lenient}: agreement "
              f"{np.mean(got[rows] == want[rows]):.3f} on {rows.sum()} rows, "
              f"{(want[rows] >= 0).sum()} parsed")
      wrong = [(texts[i], int(got[i]), int(want[i])) for i in np.flatnonzero(got != want)]
      assert not wrong, f"{task.name} lenient={lenient}: (text, token, text label) {wrong}"
  for lenient in (False, True):
    rewards = token_rewards(TokenMatcher.build(sst2, lm.tokenizer, eos_ids), batch.tokens_br,
                            batch.mask_br, gold_b, lenient=lenient)
    want = answer.response_rewards(texts, gold_b, sst2.extraction_rule(lenient))
    np.testing.assert_array_equal(rewards, want)
  # The strict rule must have met parsed answers in real text, not only unparsed rows.
  assert parsed["word + tag spliced", False] > 0 and parsed["sampled", True] > 0, parsed

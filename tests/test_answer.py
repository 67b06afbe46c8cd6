"""Answer extraction and reward on the outputs a policy actually produces, tricky ones included."""
import random

import numpy as np
import pytest

from jax_nlu_ppo.nlu import answer
from jax_nlu_ppo.nlu import tasks

YES_NO = answer.ExtractionRule(label_words=("Yes", "No"))  # label 0 = Yes, as in RTE / QNLI
SENTIMENT = answer.ExtractionRule(label_words=("Negative", "Positive"))
NLI = answer.ExtractionRule(label_words=("entailment", "neutral", "contradiction"),
                            case_sensitive=False)
SCORE = answer.ExtractionRule(regression=True)


@pytest.mark.parametrize("response, label", [
    (" Yes </Judgement>\n<Analysis> The text says so. </Analysis>", 0),
    (" No </Judgement>", 1),
    ("Yes.</Judgement>", 0),
    ("(No)</Judgement>", 1),
    ("**Yes**, clearly </Judgement>", 0),
    ("Yes, yes! </Judgement>", 0),          # the same label twice is still one label
    ("<Judgement> No </Judgement>", 1),     # a re-opened tag is harmless
    ("Yes </Judgement> No </Judgement>", 0),  # only the text before the first tag counts
    (" Yes </Judgement> but really No", 0),
])
def test_binary_parsed(response, label):
  got = answer.extract(response, YES_NO)
  assert got.parsed and got.label == label


@pytest.mark.parametrize("response", [
    " Yes or No </Judgement>",       # two different labels
    "No, Yes </Judgement>",
    " yes </Judgement>",             # binary label words are case-sensitive in the paper's rule
    " YES </Judgement>",
    " Yesterday </Judgement>",       # whole words only
    " Nothing to say </Judgement>",
    " Not sure </Judgement>",
    "</Judgement>",
    "",
    " Yes",                          # no closing tag: unparsed under the training rule
    " Yes </judgement>",             # the tag is case-sensitive too
])
def test_binary_unparsed(response):
  got = answer.extract(response, YES_NO)
  assert got.label is None and got.status == "unparsed" and not got.parsed


def test_lenient_uses_whole_response_when_tag_missing():
  lenient = YES_NO.with_lenient()
  assert answer.extract(" Yes, because ...", YES_NO).label is None
  assert answer.extract(" Yes, because ...", lenient).label == 0
  # With the tag present, lenient still reads only the text before it.
  assert answer.extract(" No </Judgement> Yes", lenient).label == 1
  assert answer.extract(" Yes and No", lenient).label is None
  assert answer.extract("", lenient).label is None


def test_sentiment_and_nli_words():
  assert answer.extract("Positive</Judgement>", SENTIMENT).label == 1
  assert answer.extract("Negative!</Judgement>", SENTIMENT).label == 0
  assert answer.extract("positive</Judgement>", SENTIMENT).label is None
  assert answer.extract(" Entailment.</Judgement>", NLI).label == 0
  assert answer.extract(" NEUTRAL </Judgement>", NLI).label == 1
  assert answer.extract(" contradiction </Judgement>", NLI).label == 2
  assert answer.extract(" neutral, maybe contradiction </Judgement>", NLI).label is None
  # "not_entailment" is one word, so it does not name entailment.
  assert answer.extract(" not_entailment </Judgement>", NLI).label is None
  assert answer.extract(" neutrality </Judgement>", NLI).label is None


def test_alternative_words_per_label():
  rule = answer.ExtractionRule(label_words=(("Yes", "True"), ("No", "False")))
  assert answer.extract("True</Judgement>", rule).label == 0
  assert answer.extract("Yes, True</Judgement>", rule).label == 0
  assert answer.extract("True or False</Judgement>", rule).label is None


@pytest.mark.parametrize("response, value", [
    (" 3.5 </Judgement>", 3.5),
    (" 4/5 </Judgement>", 4.0),        # the first number, as in the paper; not 0.8
    ("Score: 2 </Judgement>", 2.0),
    (" .5 </Judgement>", 0.5),
    (" 3. </Judgement>", 3.0),
    (" about 3-4 </Judgement>", 3.0),
    (" 7.25 </Judgement>", 7.25),      # reported raw, not clamped to 0..5
    (" -1 </Judgement>", -1.0),
])
def test_regression_numbers(response, value):
  got = answer.extract(response, SCORE)
  assert got.parsed and got.label == pytest.approx(value)


@pytest.mark.parametrize("response", [" very similar </Judgement>", "</Judgement>", "", " 4.0"])
def test_regression_unparsed(response):
  assert answer.extract(response, SCORE).label is None


def test_random_fallback_is_explicit_and_seeded():
  with pytest.raises(ValueError, match="seeded rng"):
    answer.extract("?", YES_NO, fallback="random")
  draws = [answer.extract("?", NLI, fallback="random", rng=random.Random(0)).label
           for _ in range(3)]
  assert len(set(draws)) == 1 and draws[0] in (0, 1, 2)
  rng = np.random.default_rng(0)
  got = [answer.extract("?", NLI, fallback="random", rng=rng) for _ in range(200)]
  assert all(g.status == "fallback" and not g.parsed for g in got)
  assert {g.label for g in got} == {0, 1, 2}
  score = answer.extract("none", SCORE, fallback="random", rng=rng)
  assert score.status == "fallback" and 0.0 <= score.label <= 5.0
  # A parsed answer is never replaced.
  assert answer.extract("Yes</Judgement>", YES_NO, fallback="random", rng=rng).status == "parsed"


def test_rule_validation():
  with pytest.raises(ValueError, match="at least two"):
    answer.ExtractionRule(label_words=("Yes",))
  with pytest.raises(ValueError, match="names both"):
    answer.ExtractionRule(label_words=("Yes", "yes"), case_sensitive=False)


def test_reward_values():
  config = answer.RewardConfig()
  assert answer.reward(1, 1, regression=False) == 1.0
  assert answer.reward(0, 1, regression=False) == -1.0
  assert answer.reward(None, 1, regression=False) == -3.0
  assert answer.reward(3.5, 4.0, regression=True) == pytest.approx(2.0)
  assert answer.reward(9.0, 4.0, regression=True) == pytest.approx(-2.5)
  assert answer.reward(None, 4.0, regression=True, config=config) == -2.5
  custom = answer.RewardConfig(correct=2.0, wrong=0.0, unparsed=0.0)
  assert answer.reward(None, 0, regression=False, config=custom) == 0.0
  with pytest.raises(ValueError, match="correct > wrong >= unparsed"):
    answer.RewardConfig(correct=1.0, wrong=-1.0, unparsed=0.0)


def test_response_rewards_use_task_rule():
  rte = tasks.get_task("rte")  # 0 = entailment = "Yes"
  responses = [" Yes </Judgement>", " No </Judgement>", " Yes", " Yes No </Judgement>"]
  got = answer.response_rewards(responses, [0, 0, 0, 0], rte.extraction_rule())
  np.testing.assert_array_equal(got, np.array([1.0, -1.0, -3.0, -3.0], dtype=np.float32))
  assert got.dtype == np.float32
  stsb = tasks.get_task("stsb")
  got = answer.response_rewards([" 3.5 </Judgement>", " ? </Judgement>"], [4.0, 4.0],
                                stsb.extraction_rule())
  np.testing.assert_allclose(got, [2.0, -2.5])
  with pytest.raises(ValueError, match="2 responses but 1"):
    answer.response_rewards(["a", "b"], [0], rte.extraction_rule())

"""Tests for spacer_jax.rewards: the SpaceR reference code's values (docs/spacer_recipe.md,
"Rewards", test vectors), every fix switch both ways, equivalence of the linear-time parsers with
the reference regexes, the jnp kernels against plain Python ports of the reference scorers, and a hypothesis fuzz test with adversarial completions."""

import dataclasses
import math
import re

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from spacer_jax import grpo
from spacer_jax import rewards
from spacer_jax import text_metrics

MC, NUM = "multiple choice", "numerical"
GT_MAP = {"chair": [[1, 1], [6, 5]], "table": [[0, 0]]}        # the test vectors' GT map
PERFECT_MAP = "<map>{'chair': [[1,1],[6,5]], 'table': [[0,0]]}</map>"
F32 = lambda x: float(np.float32(x))


def cfg(**kw):
  return dataclasses.replace(rewards.DEFAULT, **kw)


# ------------------------------------------------------------------------------------------------
# Section 8 vectors.
# ------------------------------------------------------------------------------------------------
def test_mra_thresholds_vector_1():
  assert list(rewards.MRA_THRESHOLDS) == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85,
                                          0.8999999999999999, 0.95]


@pytest.mark.parametrize("pred,gt,expected", [
    (4.5, 5.0, 0.9), (5.5, 5.0, 0.9), (110, 100, 0.9),                       # vector 2
    (5, 5, 1.0), (4, 5, 0.6), (7.5, 5, 0.1), (3, 2, 0.1), (2, 5, 0.0), (1.9, 2, 1.0),   # 3
    (3, 0, 0.0),               # ZeroDivisionError in the reference -> reward 0
    (100, -5, 1.0),            # negative gt: negative relative error always passes
])
def test_mra_vectors_2_3(pred, gt, expected):
  assert rewards.mra(pred, gt) == expected     # exact: float64 on the host


def test_mra_arrays_in_arrays_out():
  out = rewards.mra(np.array([4.5, 4.0]), np.array([5.0, 5.0]))
  assert isinstance(out, np.ndarray) and out.tolist() == [0.9, 0.6]


@pytest.mark.parametrize("text,expected", [
    ("about 3.5 meters", "3.5"), ("It is a 3 meter gap", "1"), ("3 chairs and one table", "1"),
    ("three or two", "2"), ("twenty-one", "1"), ("-2.5", "2.5"), ("1,234", "1"), ("none", "None"),
    ("between 4 and 5", "4")])
def test_fuzzy_number_vector_4(text, expected):
  assert rewards.fuzzy_number(text) == expected
  assert rewards.parse_number(text) == (None if expected == "None" else float(expected))


def test_parse_number_arrays():
  out = rewards.parse_number(["3.5", "none"])
  assert out[0] == 3.5 and np.isnan(out[1])


@pytest.mark.parametrize("text,expected", [
    ("<think>a</think>\n<answer>B</answer>", 1.0), (" <think>a</think><answer>B</answer>", 0.0),
    ("<think>a</think><answer>B</answer>\n", 0.0),
    ("<map>{}</map><think>a</think><answer>B</answer>", 0.0),
    ("<think>a<map>{'chair': [[1, 2]]}</map></think><answer>B</answer>", 1.0),
    ("<think>a</think>text<answer>B</answer>", 0.0), ("<think></think><answer></answer>", 1.0)])
def test_format_vector_5(text, expected):
  assert rewards.format_reward(text) == expected


def test_format_arrays():
  out = rewards.format_reward(["<think></think><answer></answer>", "x"])
  assert out.dtype == np.float32 and out.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("text,cats,expected", [
    ('{"chair": [[1,2],[3,4]], "table": [[5,5]]}', ["chair", "table", "sofa"],
     {"chair": [[1, 2], [3, 4]], "table": [[5, 5]]}),                                    # 6
    ('{"chair": [1, 2]}', ["chair"], {}),                                                 # 7
    ('{"chair": (1, 2)}', ["chair"], {"chair": [[1, 2]]}),
    ('{"chair": "3, 4"}', ["chair"], {"chair": [[3, 4]]}),
    ('{"Chair": [[1,2]], "\'sofa\'": [[2,2]]}', ["chair", "sofa"],                        # 8
     {"chair": [[1, 2]], "sofa": [[2, 2]]}),
    ("{chair: [[1,2]]}", ["chair"], {"chair": [[1, 2]]}),
    ('{"sofa": [[2.7, 3.2]], "tv": [[-0.5, 9.9]]}', ["sofa", "tv"],                       # 9
     {"sofa": [[2, 3]], "tv": [[0, 9]]}),
    # Further parsing rules (docs/spacer_recipe.md, "Rewards").
    ("", ["chair"], {}), ("{'chair': [[1, 2]]}", [], {}),
    ('str{{"chair": [[1, 2]]}}', ["chair"], {"chair": [[1, 2]]}),
    ('{"chair": [[[1, 2]]], "table": [["<3", "4>"]]}', ["chair", "table"],
     {"chair": [[1, 2]], "table": [[3, 4]]}),
    ('{"chair": [[1, 2]], "CHAIR": [[3, 4]]}', ["chair"], {"chair": [[1, 2], [3, 4]]}),
    ('{"chair": [[True, 2]]}', ["chair"], {"chair": [[1, 2]]}),
    ("[1, 2]", ["chair"], {}),
    ("chair at (1, 2) and (3, 4) 5; table 7 8", ["chair", "table"],
     {"chair": [[1, 2], [3, 4]], "table": [[7, 8]]}),
    ("armchair 1 2 chair 3 4", ["chair", "armchair"], {"armchair": [[1, 2]], "chair": [[3, 4]]}),
    ("office chair 1 2", ["chair", "office chair"], {"office chair": [[1, 2]]}),
    ("chairs 1 2", ["chair"], {}),            # (?![a-zA-Z]) after the name
    ("{'chair': [[1, 2]]", ["chair"], {"chair": [[1, 2]]}),      # not a literal -> positional
])
def test_parse_map_vectors_6_to_9(text, cats, expected):
  assert rewards.parse_map(text, cats) == expected


@pytest.mark.parametrize("pred,gt,expected", [
    ({"chair": [[1, 2]]}, {"chair": [[1, 2]]}, 1.0),                                      # 12
    ({"chair": [[0, 0]]}, {"chair": [[3, 4]]}, 0.6464466094067263),
    ({"chair": [[0, 0]]}, {"chair": [[9, 9]]}, 0.10000000000000009),
    ({"chair": [[1, 1]], "sofa": [[2, 2]]}, {"chair": [[1, 1]]}, 1.0),                    # 15
    ({}, {"chair": [[1, 1]]}, 0.0), ({}, {}, 1.0),
    ({"chair": [[10, 10]]}, {"chair": [[0, 0]]}, 0.0),       # exactly the diagonal: 0, not 1e-8
])
def test_map_score_vectors_12_15(pred, gt, expected):
  assert rewards.map_score(pred, gt) == pytest.approx(expected, rel=2e-7, abs=1e-7)


def test_map_score_empty_gt_raises_like_reference():
  with pytest.raises(TypeError):
    rewards.map_score({"chair": [[1, 1]]}, {"chair": []})
  assert rewards.map_score({"chair": [[1, 1]]}, {"chair": []},
                           config=cfg(use_empty_gt_map_fix=True)) == 0.0
  out = rewards.map_score([{"chair": [[1, 1]]}, {}], [{"chair": []}, {"chair": [[1, 1]]}])
  assert np.isnan(out[0]) and out[1] == 0.0


def _acc(completion, solution, ptype, maps=GT_MAP, **kw):
  return rewards.accuracy_reward(completion, solution, ptype, maps, config=cfg(**kw))


@pytest.mark.parametrize("completion,solution,ptype,maps,expected", [
    ("<think>hm</think><answer> B </answer>", "<answer>B</answer>", MC, GT_MAP, 1.0),    # 16
    ("<think>hm</think><answer>B.</answer>", "<answer>B</answer>", MC, GT_MAP, 0.0),
    ("<think>x</think><answer>4.5</answer>", "<answer>5.0</answer>", NUM, GT_MAP, 0.9),   # 19
    ("<answer>about 4.5 meters</answer>", "<answer>5.0</answer>", NUM, GT_MAP, 0.9),
    ("<answer>a 4.5 m gap</answer>", "<answer>5.0</answer>", NUM, GT_MAP, 0.0),
    (PERFECT_MAP + "<answer>4.5</answer>", "<answer>5.0</answer>", NUM, GT_MAP, 1.9),
    (PERFECT_MAP + "<answer>3</answer>", "<answer>5.0</answer>", NUM, GT_MAP, 0.3),
    ("<answer>4.5</answer>", "<answer>0</answer>", NUM, GT_MAP, 0.0),
    ("4.5", "<answer>5.0</answer>", NUM, GT_MAP, 0.0),
    ("…<answer>12</answer>", "<answer>10</answer>", "regression", None, 0.79999999992),   # 20
    ("…<answer>a x c</answer>", "<answer>a b c</answer>", "OCR", None, 0.6666666666666667),
    ("<map>{'chair': [[1,1]]}</map><answer>B</answer>", "<answer>B</answer>", MC, None, 0.0),  # 21
    # More accuracy and map-bonus rules (docs/spacer_recipe.md, "Rewards").
    ("<answer>B</answer>" + PERFECT_MAP, "<answer>B</answer>", MC, GT_MAP, 2.0),
    ("<answer>C</answer>" + PERFECT_MAP, "<answer>B</answer>", MC, GT_MAP, 0.0),
    ("<answer>B</answer><map>{'chair': [1, 1]}</map>", "<answer>B</answer>", MC, GT_MAP, 0.0),
    ("<answer>B</answer><map></map>", "<answer>B</answer>", MC, GT_MAP, 0.0),
    ("<answer>B</answer><map>", "<answer>B</answer>", MC, GT_MAP, 1.0),
    ("<answer>b</answer>", "<answer>B</answer>", MC, GT_MAP, 0.0),
    ("<answer>1,000</answer>", "<answer>1000</answer>", "regression", None, 1.0),
    ("<answer>abc</answer>", "<answer>10</answer>", "regression", None, 0.0),
    ("<answer>a b c d e</answer>", "<answer>a b</answer>", "OCR", None, 0.0),
    ("<answer>x</answer>", "<answer>x</answer>", "other", None, 0.0),
])
def test_accuracy_vectors_16_to_21(completion, solution, ptype, maps, expected):
  assert _acc(completion, solution, ptype, maps) == pytest.approx(expected, rel=1e-6)


def test_accuracy_reward_arrays():
  out = rewards.accuracy_reward(["<answer>B</answer>", "<answer>4.5</answer>"],
                                ["<answer>B</answer>", "<answer>5</answer>"], [MC, NUM],
                                [None, None])
  assert out.dtype == np.float32 and out.shape == (2,)
  np.testing.assert_allclose(out, [1.0, 0.9], rtol=1e-6)


def test_group_vector_22_and_advantages_24():
  acc = [1.75, 1, 0, 0, 1, 0, 1, 0]
  fmt = [1, 1, 1, 0, 1, 1, 0, 1]
  lengths = [400, 200, 350, 600, 512, 330, 321, 1024]
  out = rewards.combine(acc, fmt, lengths, 8, shuffled_accuracy=[[1, 0, 0, 1]])
  np.testing.assert_allclose(out["total"], [3.25, 2.3, 1.0, 0.0, 2.5, 1.0, 1.5, 1.0], rtol=1e-6)
  assert float(out["temporal_flag"][0]) == 1.0
  adv = grpo.compute_advantages(out["total"], 8)
  np.testing.assert_allclose(adv, [1.606544, 0.698757, -0.543478, -1.499043, 0.889870, -0.543478,
                                   -0.065695, -0.543478], atol=1e-6)
  assert np.all(np.asarray(grpo.compute_advantages(np.full(8, 2.3), 8)) == 0)


def test_temporal_refused_and_not_applicable():
  acc = [1, 0, 0, 0]
  refused = rewards.combine(acc, [0] * 4, [0] * 4, 4, shuffled_accuracy=[[1, 1]])
  assert refused["temporal"].tolist() == [0] * 4 and float(refused["temporal_flag"][0]) == 0.0
  image = rewards.combine(acc, [0] * 4, [0] * 4, 4, shuffled_accuracy=[[0, 0]], is_video=[False])
  assert image["temporal"].tolist() == [0] * 4 and float(image["temporal_flag"][0]) == 0.5
  # Only one "correct" completion: no length bonus even at 400 tokens.
  single = rewards.combine(acc, [0] * 4, [400] * 4, 4)
  assert single["length"].tolist() == [0] * 4


@pytest.mark.parametrize("logp,ref,expected", [
    (-1, -1.5, 0.106531), (-1.5, -1, 0.148721), (-1, -1, 0.0), (-20, -1, 22015.465795),
    (-1, -20, 9.000045)])
def test_k3_vector_25(logp, ref, expected):
  assert grpo.kl_k3(logp, ref) == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Fix switches: each test checks the original behaviour and the fixed one.
# ------------------------------------------------------------------------------------------------
def test_switch_article_fix():
  sol = "<answer>5.0</answer>"
  assert _acc("<answer>a 4.5 m gap</answer>", sol, NUM) == 0.0
  assert _acc("<answer>a 4.5 m gap</answer>", sol, NUM, use_article_fix=True) == pytest.approx(0.9)
  assert rewards.parse_number("an apple", cfg(use_article_fix=True)) is None


@pytest.mark.parametrize("text,original,fixed", [
    ("3 chairs and one table", 1.0, 3.0), ("twenty-one", 1.0, 21.0), ("forty two", 2.0, 42.0),
    ("-2.5", 2.5, -2.5), ("zero", 0.0, 0.0), ("no idea", None, None),
    ("1,234", 1.0, 1234.0), ("three or two", 2.0, 3.0), ("about 3.5 m", 3.5, 3.5)])
def test_switch_first_number_fix(text, original, fixed):
  assert rewards.parse_number(text) == original
  assert rewards.parse_number(text, cfg(use_first_number_fix=True)) == fixed


def test_switch_zero_map_fix():
  bad_map = "<answer>B</answer><map>{'chair': [1, 1]}</map>"     # flat pair -> parses to {}
  assert _acc(bad_map, "<answer>B</answer>", MC) == 0.0
  assert _acc(bad_map, "<answer>B</answer>", MC, use_zero_map_fix=True) == 1.0


def test_switch_non_sr_map_fix():
  c = "<map>{'chair': [[1,1]]}</map><answer>B</answer>"
  assert _acc(c, "<answer>B</answer>", MC, None) == 0.0
  assert _acc(c, "<answer>B</answer>", MC, None, use_non_sr_map_fix=True) == 1.0


def test_switch_empty_gt_map_fix():
  empty_gt = {"chair": []}
  with_point = "<answer>B</answer><map>{'chair': [[1, 1]]}</map>"
  nothing = "<answer>B</answer><map>{'sofa': [[1, 1]]}</map>"
  assert _acc(with_point, "<answer>B</answer>", MC, empty_gt) == 0.0     # TypeError in reference
  assert _acc(nothing, "<answer>B</answer>", MC, empty_gt) == 2.0        # free bonus
  fixed = dict(use_empty_gt_map_fix=True)
  assert _acc(with_point, "<answer>B</answer>", MC, empty_gt, **fixed) == 0.0   # score 0 -> erased
  assert _acc(with_point, "<answer>B</answer>", MC, empty_gt, use_zero_map_fix=True,
              **fixed) == 1.0
  assert _acc(nothing, "<answer>B</answer>", MC, empty_gt, **fixed) == 2.0


def test_switch_nan_fix():
  for ans in ("nan", "NaN"):
    c = f"<answer>{ans}</answer>"
    assert _acc(c, "<answer>10</answer>", "regression", None) == 1.0
    assert _acc(c, "<answer>10</answer>", "regression", None, use_nan_fix=True) == 0.0
  assert _acc("<answer>inf</answer>", "<answer>10</answer>", "regression", None) == 0.0


def test_switch_overflow_fix():
  sol = "<answer>B</answer>"
  # Positional parser: a 400-digit coordinate raises OverflowError -> accuracy 0.
  positional = "<answer>B</answer><map>chair " + "9" * 400 + " 1, 1 1 table 0 0</map>"
  assert _acc(positional, sol, MC) == 0.0
  with pytest.raises(OverflowError):
    rewards.parse_map("chair " + "9" * 400 + " 1", ["chair"])
  fixed = _acc(positional, sol, MC, use_overflow_fix=True)
  assert fixed == pytest.approx(1 + (0.5 * 2 + 1) / 3, rel=1e-6)   # chair [1,1] of 2, table [0,0]
  # Dict parser: inf raises inside the literal branch -> silent positional fallback.
  text = "{'chair': [[1e999, 1], [1, 1]], 'table': [[0, 0]]}"
  # (the positional parser reads "1e999, 1], [1, 1" as the numbers 1 999 1 1 1)
  assert rewards.parse_map(text, ["chair", "table"]) == {"chair": [[1, 999], [1, 1]],
                                                         "table": [[0, 0]]}
  assert rewards.parse_map(text, ["chair", "table"], cfg(use_overflow_fix=True)) == {
      "chair": [[1, 1]], "table": [[0, 0]]}
  # Scorer: a huge int coordinate makes math.sqrt overflow -> accuracy 0.
  huge = "<answer>B</answer><map>{'chair': [[" + "9" * 200 + ", 1], [1, 1]]}</map>"
  assert _acc(huge, sol, MC) == 0.0
  assert _acc(huge, sol, MC, use_overflow_fix=True) == pytest.approx(1 + 0.5 * 2 / 3, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Linear-time parsers equal the reference regexes; jnp kernels equal Python ports of the reference.
# ------------------------------------------------------------------------------------------------
@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(st.lists(st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "<map>",
                                            "</map>", " ", "\n", "\u00a0", "a", "<", ">", "/"]),
                           max_size=14).map("".join))
def test_linear_parsers_match_regexes(text):
  full = re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", text, re.DOTALL)
  assert rewards.format_reward(text) == (1.0 if full else 0.0)
  for tag, fn in (("answer", rewards.extract_answer), ("map", rewards.extract_map)):
    m = re.search(rf"<{tag}>\s*(.*?)\s*</{tag}>", text, re.DOTALL)
    assert fn(text) == (m.group(1).strip() if m else "")


def _reference_map_score(pred, gt, n=10):
  """Plain port of calculate_prediction_score, float64; None where it raises."""
  cats = set(pred) | set(gt)
  if not cats:
    return 1.0
  num = den = 0
  for c in cats:
    p, g = pred.get(c, []), gt.get(c, [])
    den += len(g)
    if not p or not g:
      continue
    pairs = sorted((math.sqrt((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2), i, j)
                   for i, a in enumerate(p) for j, b in enumerate(g))
    used_i, used_j, total = set(), set(), 0.0
    for d, i, j in pairs:
      if i not in used_i and j not in used_j:
        total += max(0.0, 1.0 - d / (n * math.sqrt(2.0)))
        used_i.add(i)
        used_j.add(j)
    num += total / max(len(p), len(g)) * len(g)
  if den == 0:
    return None if pred else 1.0
  return num / den


_points = st.lists(st.lists(st.integers(-3, 14), min_size=2, max_size=2), max_size=7)
_maps = st.dictionaries(st.sampled_from(["chair", "table", "sofa"]), _points, max_size=3)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.lists(st.tuples(_maps, _maps), min_size=1, max_size=6))
def test_map_score_kernel_matches_reference(pairs):
  out = rewards.map_score([p for p, _ in pairs], [g for _, g in pairs])
  for (p, g), got in zip(pairs, out):
    want = _reference_map_score(p, g)
    if want is None:
      assert np.isnan(got)
    else:
      assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_map_pruning_keeps_result_with_many_predictions():
  rng = np.random.default_rng(0)
  pred = {"chair": rng.integers(-2, 12, (300, 2)).tolist()}
  gt = {"chair": [[1, 1], [5, 5], [8, 2]]}
  assert rewards.map_score(pred, gt) == pytest.approx(_reference_map_score(pred, gt), rel=1e-6)


def _reference_wer_acc(ref, hyp):
  r, h = ref.split(), hyp.split()
  d = [[i + j if i * j == 0 else 0 for j in range(len(h) + 1)] for i in range(len(r) + 1)]
  for i in range(1, len(r) + 1):
    for j in range(1, len(h) + 1):
      d[i][j] = d[i - 1][j - 1] if r[i - 1] == h[j - 1] else 1 + min(
          d[i - 1][j], d[i][j - 1], d[i - 1][j - 1])
  return max(0.0, min(1.0, 1 - d[len(r)][len(h)] / max(1, len(r))))


_sentences = st.lists(st.sampled_from(["a", "b", "c", "dd", "E"]), max_size=8).map(" ".join)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.lists(st.tuples(_sentences, _sentences), min_size=1, max_size=5))
def test_wer_kernel_matches_reference(pairs):
  got = text_metrics.wer_accuracy([r for r, _ in pairs], [h for _, h in pairs])
  want = [_reference_wer_acc(r, h) for r, h in pairs]
  assert got.dtype == np.float64 and got.tolist() == want  # bit for bit


def _reference_rouge(ref, hyp):
  """ROUGE-1/2/L F mean as rouge_score computes it, on our tokeniser."""
  t, p = text_metrics.rouge_tokens(ref), text_metrics.rouge_tokens(hyp)

  def f(hit, nt, np_):
    pr, rc = hit / max(np_, 1), hit / max(nt, 1)
    return 2 * pr * rc / (pr + rc) if pr + rc > 0 else 0.0

  def ngram_f(n):
    grams = lambda s: [tuple(s[i:i + n]) for i in range(len(s) - n + 1)]
    tg, pg = grams(t), grams(p)
    hit = sum(min(tg.count(x), pg.count(x)) for x in set(tg))
    return f(hit, len(tg), len(pg))

  lcs = [[0] * (len(p) + 1) for _ in range(len(t) + 1)]
  for i in range(1, len(t) + 1):
    for j in range(1, len(p) + 1):
      lcs[i][j] = lcs[i - 1][j - 1] + 1 if t[i - 1] == p[j - 1] else max(lcs[i - 1][j],
                                                                          lcs[i][j - 1])
  rl = f(lcs[-1][-1], len(t), len(p)) if t and p else 0.0
  return (ngram_f(1) + ngram_f(2) + rl) / 3


_rouge_words = st.lists(st.sampled_from(["the", "cat", "cats", "sat", "sitting", "on", "mat", "A",
                                         "relational", "Hopping,"]), max_size=8).map(" ".join)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.lists(st.tuples(_rouge_words, _rouge_words), min_size=1, max_size=5))
def test_rouge_kernel_matches_reference(pairs):
  got = text_metrics.rouge_f([r for r, _ in pairs], [h for _, h in pairs])
  want = [max(0.0, min(1.0, _reference_rouge(r, h))) for r, h in pairs]
  assert got.dtype == np.float64 and got.tolist() == want  # bit for bit


@pytest.mark.parametrize("word,stem", [
    ("caresses", "caress"), ("ponies", "poni"), ("cats", "cat"), ("agreed", "agre"),
    ("plastered", "plaster"), ("motoring", "motor"), ("hopping", "hop"), ("filing", "file"),
    ("happy", "happi"), ("relational", "relat"), ("conditional", "condit"),
    ("generalization", "gener"), ("hopefulness", "hope"), ("electrical", "electr"),
    ("adjustment", "adjust"), ("adoption", "adopt"), ("controll", "control"), ("rate", "rate"),
    # NLTK_EXTENSIONS (rouge_score's stemmer), where it departs from Porter (1980):
    ("ties", "tie"), ("dying", "die"), ("skies", "sky"), ("spied", "spi"), ("died", "die"),
    ("enjoy", "enjoy"), ("radically", "radic"), ("analogies", "analog"), ("geology", "geolog"),
    ("hopefully", "hope"), ("news", "news")])
def test_porter_stemmer(word, stem):
  """Values as nltk's PorterStemmer() gives them (checked on 92,794 words, no difference)."""
  assert text_metrics.porter_stem(word) == stem


def test_rouge_free_form_value():
  # rouge_score 0.1.2 gives 0.6946387... for this pair (checked against the package by hand).
  got = _acc("<answer>the cats are sitting on the mat</answer>",
             "<answer>a cat sits on the mat</answer>", "free-form", None)
  assert got == pytest.approx(0.694638694638, rel=1e-6)


# (ground truth, completion's answer, problem type, the reference's accuracy in float64). The
# reference stores rewards as float32 and its bonuses test `accuracy > 0.1` in float32, so an
# accuracy that is 0.1 after that rounding gets neither the temporal nor the length bonus.
THRESHOLD_CASES = [
    ("a b c d e f g h i j", "a x x x x x x x x x", "OCR", 0.09999999999999998),   # 1 - 9/10
    ("a b c d e f g h i j", "a b x x x x x x x x", "OCR", 0.19999999999999996),   # 1 - 8/10
    ("a b c", "a x c", "OCR", 0.6666666666666667),                                # vector 20
    ("a b c d e f g h i j", "x", "OCR", 0.0),
    ("one two three four five", "one six seven eight nine", "free-form", 0.13333333333333336),
    ("the cat sat on the mat", "the dog", "free-form", 0.16666666666666666),
    ("one two three four five six seven eight nine ten", "one x", "free-form", 0.11111111111111112),
]


@pytest.mark.parametrize("gt,answer,ptype,want", THRESHOLD_CASES)
def test_text_scores_exactly_as_the_reference(gt, answer, ptype, want):
  fn = text_metrics.wer_accuracy if ptype == "OCR" else text_metrics.rouge_f
  assert fn([gt], [answer]).tolist() == [want]
  ref = _reference_wer_acc(gt, answer) if ptype == "OCR" else _reference_rouge(gt, answer)
  assert ref == want


def test_ocr_accuracy_at_the_bonus_threshold_gets_the_references_totals():
  """Issue 14's example: 9 substitutions of 10 words. In float32 1 - 9/10 is 0.10000002 (> 0.1:
  +0.3 temporal, +0.2 length); the reference's float64 0.09999999999999998 is 0.1 as a float32
  reward, which is not above 0.1: no bonus."""
  completion = "<think>t</think><answer>a x x x x x x x x x</answer>"
  examples = {"solution": ["<answer>a b c d e f g h i j</answer>"], "problem_type": ["OCR"],
              "cognitive_map": [None], "data_type": ["video"]}
  comps, _ = rewards.compute_rewards([completion] * 2, examples, [400, 400], 2,
                                     shuffled_accuracy=[[0.0]])
  acc = np.float32(0.09999999999999998)
  assert acc == np.float32(0.1)
  assert comps["accuracy"].tolist() == [acc] * 2
  assert comps["temporal"].tolist() == [0.0, 0.0] and comps["length"].tolist() == [0.0, 0.0]
  assert comps["total"].tolist() == [acc + np.float32(1.0)] * 2
  # One more matching word (accuracy 0.2) earns both bonuses.
  better = "<think>t</think><answer>a b x x x x x x x x</answer>"
  comps, _ = rewards.compute_rewards([better] * 2, examples, [400, 400], 2,
                                     shuffled_accuracy=[[0.0]])
  np.testing.assert_allclose(comps["total"], [0.2 + 0.3 + 1.0 + 0.2] * 2, rtol=1e-6)


def test_map_overflow_boundary_is_pythons_int_to_float():
  """math.sqrt(int) converts to float: up to 2**1024 - 2**970 (exclusive) that rounds to the
  largest float and the pair scores 0; from there on it raises and the reference's accuracy is 0."""
  boundary = 2 ** 1024 - 2 ** 970
  below = math.isqrt(boundary - 1)           # below**2 > largest float, still converts
  assert below ** 2 > 1.7976931348623157e308 and (below + 1) ** 2 >= boundary
  gt = {"chair": [[1, 1], [6, 5]], "table": [[0, 0]]}
  sol = "<answer>B</answer>"
  for dx, want in ((below, 1 + _reference_map_score({"chair": [[1 + below, 1], [1, 1]]}, gt)),
                   (below + 1, 0.0)):
    text = f"<answer>B</answer><map>{{'chair': [[{1 + dx}, 1], [1, 1]]}}</map>"
    assert _acc(text, sol, MC, gt) == pytest.approx(want, rel=1e-6)
  assert 1 + _reference_map_score({"chair": [[1 + below, 1], [1, 1]]}, gt) == pytest.approx(
      1 + 0.5 * 2 / 3)
  with pytest.raises(OverflowError):
    _reference_map_score({"chair": [[2 + below, 1]]}, gt)
  assert rewards.map_score({"chair": [[1 + below, 1]]}, gt) == 0.0
  with pytest.raises(OverflowError):
    rewards.map_score({"chair": [[2 + below, 1]]}, gt)


# ------------------------------------------------------------------------------------------------
# Completion mask and problem type: what the reference's trainer does around the reward functions.
# ------------------------------------------------------------------------------------------------
IM_END, ENDOFTEXT = 7, 3


def _tokens(lengths, stops, width=600):
  toks = np.full((len(lengths), width), ENDOFTEXT, np.int32)   # the sampler pads with <|endoftext|>
  for r, (n, stop) in enumerate(zip(lengths, stops)):
    toks[r, :n - 1] = 11
    if stop is not None:
      toks[r, n - 1] = stop
  return toks


@pytest.mark.parametrize("lengths,stops,want", [
    # <|im_end|> ends the mask; <|endoftext|> keeps the group's width (its longest completion).
    ([400, 100, 450, 300], [IM_END, ENDOFTEXT, IM_END, ENDOFTEXT], [400, 450, 450, 450]),
    ([50, 60, 70, 80], [IM_END] * 4, [50, 60, 70, 80]),
    ([600, 10, 20, 30], [None, ENDOFTEXT, IM_END, IM_END], [600, 600, 20, 30]),  # cut off at 600
    ([5, 9], [ENDOFTEXT, ENDOFTEXT], [9, 9]),
])
def test_mask_lengths_recognise_only_im_end(lengths, stops, want):
  from spacer_jax import rollout
  g = len(lengths)
  two_groups = rollout.mask_lengths(_tokens(lengths * 2, stops * 2), lengths * 2, g, IM_END)
  assert two_groups.tolist() == want * 2


def test_length_bonus_on_the_references_mask_lengths_and_the_fix():
  from spacer_jax import rollout
  lengths, stops = [400, 100, 450, 300], [IM_END, ENDOFTEXT, IM_END, ENDOFTEXT]
  extended = rollout.mask_lengths(_tokens(lengths, stops), lengths, 4, IM_END)
  examples = {"solution": ["<answer>B</answer>"], "problem_type": [MC], "cognitive_map": [None]}
  done = ["<think>t</think><answer>B</answer>"] * 4
  comps, _ = rewards.compute_rewards(done, examples, extended, 4)
  assert comps["length"].tolist() == [F32(0.2)] * 4    # 100 and 300 count as 450
  assert comps["total"].tolist() == [F32(2.2)] * 4
  comps, _ = rewards.compute_rewards(done, examples, lengths, 4,
                                     config=cfg(use_stop_token_mask_fix=True))
  assert comps["length"].tolist() == [F32(0.2), 0.0, F32(0.2), 0.0]


def test_problem_type_is_each_prompts_own():
  """The reference takes the type of a reward call's first element; its calls hold one prompt,
  so a batch of B prompts scores exactly as B separate calls (not all as the first's type)."""
  completions = ["<think>t</think><answer>B</answer>", "<think>t</think><answer>4.5</answer>",
                 "<think>t</think><answer>a x c</answer>", "<think>t</think><answer>12</answer>"]
  sols = ["<answer>B</answer>", "<answer>5</answer>", "<answer>a b c</answer>", "<answer>10</answer>"]
  types = [MC, NUM, "OCR", "regression"]
  together, _ = rewards.compute_rewards(completions, {"solution": sols, "problem_type": types,
                                                      "cognitive_map": [None] * 4}, [10] * 4, 1)
  alone = [rewards.compute_rewards([c], {"solution": [s], "problem_type": [t],
                                         "cognitive_map": [None]}, [10], 1)[0]["accuracy"][0]
           for c, s, t in zip(completions, sols, types)]
  assert together["accuracy"].tolist() == alone == [1.0, F32(0.9), F32(2 / 3), F32(0.79999999992)]


# ------------------------------------------------------------------------------------------------
# Batch entry point.
# ------------------------------------------------------------------------------------------------
def test_compute_rewards_batch():
  completions = [
      "<think>t</think><answer>B</answer>",
      "<think>t" + PERFECT_MAP + "</think><answer>B</answer>",
      "<think>t</think><answer>C</answer>",
      "no tags at all",
      "<think>t</think><answer>4.5</answer>",
      "<think>t</think><answer>5</answer>",
      "<answer>a 5</answer>",
      "<think>t<map>{'chair': [[1,1]]}</map></think><answer>5</answer>",
  ]
  examples = {"solution": ["<answer>B</answer>", "<answer>5.0</answer>"],
              "problem_type": [MC, NUM], "cognitive_map": [GT_MAP, None],
              "data_type": ["video", "image"], "id": [7, 8]}
  comps, counts = rewards.compute_rewards(completions, examples, [400, 400, 10, 10] * 2, 4,
                                          shuffled_accuracy=[[0, 0], [0, 0]])
  for v in comps.values():
    assert v.dtype == np.float32 and v.shape == (8,)
  np.testing.assert_allclose(comps["accuracy"], [1, 2, 0, 0, 0.9, 1, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(comps["format"], [1, 1, 1, 0, 1, 1, 0, 1])
  np.testing.assert_allclose(comps["temporal"], [0.3, 0.3, 0, 0, 0, 0, 0, 0], atol=1e-7)
  np.testing.assert_allclose(comps["length"], [0.2, 0.2, 0, 0, 0.2, 0.2, 0, 0], atol=1e-7)
  np.testing.assert_allclose(comps["total"], [2.5, 3.5, 1, 0, 2.1, 2.2, 0, 1], rtol=1e-6)
  assert counts["no_answer"] == 1 and counts["no_format"] == 2
  assert counts["map_without_gt_map"] == 1 and counts["map_scored"] == 1


def test_compute_rewards_rejects_bad_shapes():
  with pytest.raises(ValueError, match="multiple of group_size"):
    rewards.compute_rewards(["a"] * 3, {"solution": ["x"], "problem_type": [MC],
                                        "cognitive_map": [None]}, [1, 1, 1], 2)
  with pytest.raises(ValueError, match="'solution'"):
    rewards.compute_rewards(["a"] * 4, {"solution": ["x"] * 3, "problem_type": [MC] * 2,
                                        "cognitive_map": [None] * 2}, [1] * 4, 2)
  with pytest.raises(ValueError, match="ground-truth cognitive map"):
    rewards.accuracy_reward("<answer>B</answer><map>{}</map>", "<answer>B</answer>", MC,
                            {"chair": [[0.5, 1]]})


# ------------------------------------------------------------------------------------------------
# Fuzz: random and adversarial completions never raise and stay finite and in range.
# ------------------------------------------------------------------------------------------------
_PIECES = ["<think>", "</think>", "<answer>", "</answer>", "<map>", "</map>", "{", "}", "[", "]",
           "(", ")", ",", ":", "'chair'", "table", "sofa", " ", "\n", "-", ".", "1", "42", "1e999",
           "nan", "inf", "a", "an", "one", "twenty", "B", "str{", "\\", "'", '"', "9" * 320,
           "\u00a0", "é", "٣"]


def _adversarial():
  big = "9" * 5000
  return st.sampled_from([
      "<think>" * 20000 + "</think>" * 20000 + "<answer>" * 20000,
      ("<think></think><answer></answer>" * 40000)[:1_000_000],
      "<answer>" + " " * 1_000_000,
      "<answer>" + "1" * 1_000_000 + "</answer>",
      "<answer>B</answer><map>{" + "[" * 50000 + "1, 2" + "]" * 50000 + "}</map>",
      "<answer>B</answer><map>{'chair': " + "[" * 90 + "1, 2" + "]" * 90 + "}</map>",
      "<answer>B</answer><map>{'chair': [[" + big + ", 1]]}</map>",
      "<answer>B</answer><map>{'chair': [[1" + "e9" * 10 + ", 1]]}</map>",
      "<answer>B</answer><map>" + "chair 1 2 " * 100_000 + "</map>",
      "<answer>B</answer><map>{'chair': [" + "[1, 2], " * 60_000 + "]}</map>",
      "<answer>5</answer><map>{'chair': [[1, 2]]" + "}" * 1000 + "</map>",
      "<answer>" + "a " * 400_000 + "</answer>",
      "<answer>B</answer><map>" + "{'chair': [[1, 2]]," * 20000 + "</map>",
  ])


@hypothesis.settings(max_examples=26, deadline=30_000,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(text=_adversarial(), ptype=st.sampled_from([MC, NUM, "OCR", "free-form"]),
                  fixes=st.booleans())
def test_fuzz_adversarial_completions(text, ptype, fixes):
  """Each hostile input (1 MB strings, deep nesting, huge numbers) scores within the deadline."""
  config = rewards.RewardConfig(use_overflow_fix=True, use_zero_map_fix=True) if fixes else None
  comps, _ = rewards.compute_rewards([text, "<answer>B</answer>"], {
      "solution": [_SOLUTIONS[ptype]], "problem_type": [ptype], "cognitive_map": [GT_MAP]},
      [1, 1], 2, config=config or rewards.DEFAULT)
  total = comps["total"]
  assert np.all(np.isfinite(total)) and np.all((total >= 0) & (total <= 3.5))


_completion = st.one_of(st.lists(st.sampled_from(_PIECES), max_size=40).map("".join),
                        st.text(max_size=200), _adversarial())
_SOLUTIONS = {MC: "<answer>B</answer>", NUM: "<answer>5</answer>", "OCR": "<answer>a b c</answer>",
              "free-form": "<answer>the cat sat</answer>", "regression": "<answer>10</answer>",
              "other": "<answer>x</answer>"}


@hypothesis.settings(max_examples=30, deadline=30_000,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow,
                                            hypothesis.HealthCheck.data_too_large])
@hypothesis.given(completions=st.lists(_completion, min_size=2, max_size=2),
                  ptype=st.sampled_from(sorted(_SOLUTIONS)),
                  gt_map=st.sampled_from([GT_MAP, None, {}, {"chair": []}]),
                  fixes=st.booleans())
def test_fuzz_rewards_finite_in_range(completions, ptype, gt_map, fixes):
  config = cfg(**{f.name: True for f in dataclasses.fields(rewards.RewardConfig)
                  if f.name.startswith("use_")}) if fixes else rewards.DEFAULT
  examples = {"solution": [_SOLUTIONS[ptype]], "problem_type": [ptype], "cognitive_map": [gt_map]}
  comps, counts = rewards.compute_rewards(completions, examples, [400, 100], 2,
                                          shuffled_accuracy=[[0.5]], config=config)
  for name, v in comps.items():
    assert np.all(np.isfinite(v)), name
  assert np.all((comps["accuracy"] >= 0) & (comps["accuracy"] <= 2))
  assert np.all((comps["total"] >= 0) & (comps["total"] <= 3.5))
  assert all(isinstance(c, int) and c >= 0 for c in counts.values())


def test_cogmap_draw(tmp_path):
  """The rollout inspector's map panels: cell centres, colours by ground-truth category order,
  off-grid points counted, empty maps said."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from spacer_jax import cogmap  # pylint: disable=g-import-not-at-top
  gt = {"chair": [[1, 2], [3, 4]], "table": [[5, 5]]}
  pred = rewards.parse_map('{"table": [[6, 5]], "chair": [[40, 1]]}', list(gt))
  fig, (a, b, c) = plt.subplots(1, 3)
  cogmap.draw(a, gt, list(gt), title="gt")
  cogmap.draw(b, pred, list(gt), title="pred")
  cogmap.draw(c, {}, list(gt), title="none")
  np.testing.assert_array_equal(a.collections[0].get_offsets(), [[1.5, 2.5], [3.5, 4.5]])
  assert b.get_title() == "pred (1 off the grid)" and c.get_title() == "none (empty)"
  # table is the second GT category in both panels: same colour.
  np.testing.assert_array_equal(a.collections[1].get_facecolor(), b.collections[0].get_facecolor())
  fig.savefig(tmp_path / "maps.png")
  plt.close(fig)

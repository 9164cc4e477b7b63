"""SpaceR rewards: host parsing of completions, vectorised jnp scoring over the B*G completions.

Reproduces SG-RLVR.py `accuracy_reward` / `format_reward`, extract_map.py `extract_map_data` /
`calculate_prediction_score` and the reward arithmetic of SG_RLVR_trainer.py (temporal and length
bonus) at OuyangKun10/SpaceR b623af5 (docs/spacer_recipe.md, "Rewards"), quirks included. Each
fix of a reference bug (docs/spacer_recipe.md, "Reward quirks") sits behind a `RewardConfig.use_*`
switch that defaults to the original behaviour.

Split: everything that reads text runs on the host (tag extraction, number parsing, the map
literal parser, word/ROUGE tokenisation into integer ids) and hands over arrays; the scoring (map
greedy matching, the edit-distance / n-gram / LCS dynamic programmes, the map-bonus logic, temporal
and length bonuses, totals) is jnp over [B*G]. Every per-completion accuracy is computed as the
reference computes it, in float64, and then stored as float32, as the reference stores its rewards
(a float32 tensor); the bonuses then compare float32 values with 0.1 as the reference does. So the
MRA threshold test (`1 - 0.8999999999999999 = 0.10000000000000009`, so a relative error of exactly
0.1 passes; float32 cannot tell 0.1 from 0.10000001), the regression score (`(|p-g| + 1e-9) /
(|g| + 1e-9)`, whose 1e-9 vanishes in float32) and the OCR / free-form ratios (from the kernels'
exact integer counts, text_metrics.py: `1 - 9/10` must be 0.09999999999999998, not float32's
0.10000002, which would cross the bonus threshold) are vectorised NumPy float64 on the host.

Map parsing and scoring live in cogmap.py, WER and ROUGE in text_metrics.py; this module holds the
public API, the config, number parsing and the batch assembly.

Where the original raises inside the reward (caught by its blanket `except: reward = 0`), this
module detects the same condition explicitly, scores 0 and counts it; there is no broad try/except.

Deviations:
* Problem type per prompt. SG-RLVR.py reads `problem_type` of the first element of each reward call
  and scores every completion of the call as that type. Its calls hold one prompt's completions
  (one prompt per device), so that is each prompt's own type; `compute_rewards` scores B prompts at
  once and uses each completion's own type, which is the same scoring. Reproducing "the first
  element" literally would score a whole multi-prompt batch as its first prompt's type, which the
  reference never does at its batch size.
Deviations outside what the reference can produce on sane input:
* Map scores are float32 (differences from the float64 reference are ~1e-7; the map bonus is only
  added to accuracies >= 0.6, far from any threshold). ROUGE uses our own port of NLTK's Porter
  stemmer (text_metrics.py), so neither nltk nor rouge_score is needed.
* A map string longer than `RewardConfig.max_literal_chars` (100k) or with brackets nested deeper
  than `max_literal_depth` (100) is treated as "not a literal" (the reference would evaluate it);
  the positional fallback then reads it as usual.
* Ground-truth map coordinates must be integers within +-4096 (ValueError otherwise); predicted
  coordinates are clipped to +-8192 before scoring, which cannot change a score (such points are far
  beyond the grid diagonal and are matched after every scoring pair).
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from spacer_jax import cogmap
from spacer_jax import text_metrics

PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
MC, NUM, OCR, FREE, REG, OTHER = range(6)
_TYPE_ID = {name: i for i, name in enumerate(PROBLEM_TYPES)}


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Reward switches. Defaults reproduce SpaceR.

  Each `use_*` fix is a numbered row of docs/spacer_recipe.md, "Reward quirks" (numbers below).
  """
  # Quirk 4a: the articles "a"/"an" are number words worth 1 ("a 4.5 m gap" -> 1). Fix: drop them.
  use_article_fix: bool = False
  # Quirk 4b: number words are tried in dictionary order before digits, signs and thousands
  # separators are lost. Fix: the first number mentioned in the text, with its sign and
  # thousands separators.
  use_first_number_fix: bool = False
  # Quirk 5: a correct answer whose <map> scores 0 gets accuracy 0. Fix: accuracy is kept, no bonus.
  use_zero_map_fix: bool = False
  # Quirk 6: <map> tags on a sample without a cognitive map raise KeyError -> 0. Fix: no map bonus.
  use_non_sr_map_fix: bool = False
  # Quirk 7: empty GT map: an empty parse scores 1.0, a non-empty one raises TypeError -> 0.
  # Fix: 0.0 if the prediction has any point, else 1.0 (the scorer's evident intent).
  use_empty_gt_map_fix: bool = False
  # Quirk 10, regression: the reference clamps with Python min/max, which turn a NaN relative
  # error ("nan" as the answer) into a full score of 1.0. Fix: NaN scores 0.
  use_nan_fix: bool = False
  # Quirk 11: map coordinates that overflow a float (e.g. 1e400 or a 400-digit number) raise
  # OverflowError in the reference: in a dict literal it silently falls back to the positional
  # parser, in the positional parser or in the scorer it zeroes the whole accuracy. Fix: such a
  # pair is invalid.
  use_overflow_fix: bool = False
  # Completion mask: the reference ends a completion's mask at its first <|im_end|> only, so a
  # completion that stopped on <|endoftext|> (Qwen2.5-VL's other EOS, also its pad token) keeps the
  # padded width of its group (the longest completion of the prompt) for the loss mask and the
  # length bonus, pad tokens included. Fix: every completion ends at its own stop token.
  # (rollout.mask_lengths applies it; the rewards see the resulting lengths.)
  use_stop_token_mask_fix: bool = False
  grid_size: int = 10
  temporal_alpha: float = 0.3        # SG_RLVR_trainer.py: + 0.3 ...
  temporal_mu: float = 0.8           # ... if mean(acc) >= 0.8 * mean(shuffled acc)
  bonus_threshold: float = 0.1       # "correct" for temporal and length bonus: acc > 0.1
  length_bonus: float = 0.2
  length_range: tuple[int, int] = (320, 512)
  # Safety limits of the map literal parser (see module docstring).
  max_literal_chars: int = 100_000
  max_literal_depth: int = 100


DEFAULT = RewardConfig()

# ------------------------------------------------------------------------------------------------
# Host: tag extraction and format.
# ------------------------------------------------------------------------------------------------
_WS = re.compile(r"\s*")


def find_tag(text: str, tag: str) -> str | None:
  """First match of `<tag>\\s*(.*?)\\s*</tag>` (DOTALL), stripped; None if none. Linear time.

  The regex itself backtracks quadratically on hostile input (many opening tags and no closing
  one); this computes the same match: the leftmost opening tag that has a closing tag after it is
  the first opening tag, and the lazy group ends at the first closing tag after it. The evaluator's
  SpaceR-Eval extraction uses it too.
  """
  opening, closing = f"<{tag}>", f"</{tag}>"
  a = text.find(opening)
  if a < 0:
    return None
  c = text.find(closing, a + len(opening))
  if c < 0:
    return None
  return text[a + len(opening):c].strip()


def _extract_tag(text: str, tag: str) -> str:
  """find_tag, with "" where there is no match (what the training rewards compare)."""
  content = find_tag(text, tag)
  return "" if content is None else content


def extract_answer(text: str) -> str:
  """`<answer>...</answer>` content as SG-RLVR.py `extract_answer` returns it."""
  return _extract_tag(text, "answer")


def extract_map(text: str) -> str:
  """`<map>...</map>` content as SG-RLVR.py `compute_map_score.extract_map` returns it."""
  return _extract_tag(text, "map")


def _format_ok(text: str) -> bool:
  """re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", text, DOTALL), in linear time.

  A full match exists iff the text starts with <think>, ends with </answer>, and some </think>
  (after the opening tag) is followed by whitespace only and then an <answer> that ends before the
  final </answer>. The regex engine needs quadratic time for texts with many such tags.
  """
  n = len(text)
  if not (text.startswith("<think>") and text.endswith("</answer>")):
    return False
  last_answer_start = n - len("</answer>") - len("<answer>")
  p = text.find("</think>", len("<think>"))
  while p >= 0:
    r = _WS.match(text, p + len("</think>")).end()
    if r > last_answer_start:
      return False
    if text.startswith("<answer>", r):
      return True
    p = text.find("</think>", p + 1)
  return False


def _as_text_list(completions):
  if isinstance(completions, str):
    return [completions], True
  return list(completions), False


def format_reward(completions):
  """1.0 iff the whole completion is `<think>...</think>\\s*<answer>...</answer>` (re.fullmatch).

  Nothing may precede `<think>` or follow `</answer>`, not even whitespace.

  Args:
    completions: a string or a sequence of strings.
  Returns:
    a float for a string, else float32[N].
  """
  texts, scalar = _as_text_list(completions)
  out = np.array([_format_ok(t) for t in texts], np.float32)
  return float(out[0]) if scalar else out


# ------------------------------------------------------------------------------------------------
# Host: numbers.
# ------------------------------------------------------------------------------------------------
_NUMBER_WORDS = (
    ("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"), ("five", "5"), ("six", "6"),
    ("seven", "7"), ("eight", "8"), ("nine", "9"), ("ten", "10"), ("eleven", "11"),
    ("twelve", "12"),
    ("thirteen", "13"), ("fourteen", "14"), ("fifteen", "15"), ("sixteen", "16"),
    ("seventeen", "17"), ("eighteen", "18"), ("nineteen", "19"), ("twenty", "20"),
    ("thirty", "30"), ("forty", "40"), ("fifty", "50"), ("sixty", "60"), ("seventy", "70"),
    ("eighty", "80"), ("ninety", "90"), ("zero", "0"), ("a", "1"), ("an", "1"))
_WORD_RES = tuple((re.compile(r"\b" + w + r"\b"), d) for w, d in _NUMBER_WORDS)
_DIGITS = re.compile(r"\d+(\.\d+)?")
_TENS = "twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety"
_UNITS = "one|two|three|four|five|six|seven|eight|nine"
_FIRST_NUMBER = re.compile(
    r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?"
    rf"|\b(?:{_TENS})[- ](?:{_UNITS})\b"
    r"|\b(?:" + "|".join(w for w, _ in _NUMBER_WORDS[:-2]) + r")\b")
_WORD_VALUE = dict(_NUMBER_WORDS)


def _number_text(s: str) -> str:
  """Digits for a match of _FIRST_NUMBER: "1,234" -> "1234", "twenty-one" -> "21", "six" -> "6"."""
  parts = re.split(r"[- ]", s) if s[0].isalpha() else [s]
  if len(parts) == 2:
    return str(int(_WORD_VALUE[parts[0]]) + int(_WORD_VALUE[parts[1]]))
  return _WORD_VALUE.get(s, s.replace(",", ""))


def fuzzy_number(text: str, config: RewardConfig = DEFAULT) -> str:
  """SG-RLVR.py `fuzzy_matching`: the number string the reference reads from an answer.

  Number words (in a fixed order, "a"/"an" included) win over digits; then the first unsigned
  `\\d+(\\.\\d+)?` (docs/spacer_recipe.md, "Rewards", fuzzy_number).

  Returns "None" where it finds nothing, as the reference does.
  """
  t = text.strip().lower()
  if config.use_first_number_fix:
    m = _FIRST_NUMBER.search(t)
    if not m:
      return "None"
    return _number_text(m.group(0))
  words = _WORD_RES[:-2] if config.use_article_fix else _WORD_RES
  for pattern, digit in words:
    if pattern.search(t):
      return digit
  m = _DIGITS.search(t)
  return m.group(0) if m else "None"


def parse_number(text, config: RewardConfig = DEFAULT):
  """The fuzzy number parser of the numerical reward: float, or None where the reference gets none.

  Args:
    text: an answer string (or a sequence of them).
  Returns:
    float or None for a string; for a sequence, float64[N] with NaN where None.
  """
  if isinstance(text, str):
    return cogmap.float_or_none(fuzzy_number(text, config))
  vals = [parse_number(t, config) for t in text]
  return np.array([np.nan if v is None else v for v in vals], np.float64)


# MRA thresholds: numpy.linspace(0.5, 0.95, int((0.95 - 0.5) / 0.05 + 2)) as SG-RLVR.py
# `mean_relative_accuracy` builds them (10 points; 0.9 is 0.8999999999999999).
MRA_THRESHOLDS = np.linspace(.5, .95, int((.95 - .5) / .05 + 2))


def _mra_f64(pred, gt):
  """float64 MRA; NaN where the reference raises (gt == 0 -> ZeroDivisionError)."""
  pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    rel = np.abs(pred - gt) / gt
  hits = rel[..., None] <= 1 - MRA_THRESHOLDS
  return np.where(gt == 0, np.nan, hits.mean(-1))


def mra(pred, gt):
  """Mean relative accuracy, VSI-Bench's definition as coded (float64 thresholds, `<=`).

  docs/spacer_recipe.md, "Rewards" (MRA) shows why float32 or a strict `<` would change scores.

  `gt == 0` raises ZeroDivisionError in the reference; here it gives 0.0 (the reward it ends in).
  Args:
    pred, gt: floats or arrays (broadcast).
  Returns:
    a float for scalar inputs, else float64 array.
  """
  out = np.nan_to_num(_mra_f64(pred, gt), nan=0.0)
  return float(out) if np.ndim(out) == 0 else out


def _regression_f64(pred, gt, use_nan_fix):
  """SG-RLVR.py regression branch on float64 arrays (no NaN inputs for missing values)."""
  with np.errstate(invalid="ignore", over="ignore"):
    rel = (np.abs(pred - gt) + 1e-9) / (np.abs(gt) + 1e-9)
  # Python max(0.0, nan) is 0.0, so the reference scores a NaN relative error as 1 - 0 = 1.
  rel = np.where(np.isnan(rel), 1.0 if use_nan_fix else 0.0, rel)
  return 1.0 - np.clip(rel, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# Cognitive map (parsing and scoring live in cogmap.py).
# ------------------------------------------------------------------------------------------------
def parse_map(text, categories, config: RewardConfig = DEFAULT):
  """Parse a `<map>` body into {lowercase category: [[x, y], ...]} (extract_map.py).

  The rules are in docs/spacer_recipe.md, "Rewards" (parsing a map).

  Args:
    text: the extracted map string (may be empty).
    categories: the ground-truth category names.
  Returns:
    the dict. Raises OverflowError where the reference does (a coordinate beyond float range in
    the positional fallback) unless `config.use_overflow_fix`.
  """
  result, overflow = cogmap.parse(text, categories, config)
  if overflow:
    raise OverflowError(f"map coordinate overflows a float in {text[:80]!r}")
  return result


def map_score(pred_map, gt_map, grid_size: int = 10, config: RewardConfig = DEFAULT):
  """calculate_prediction_score(pred, gt, N): greedy (not Hungarian) matching on the N x N grid.

  Args:
    pred_map, gt_map: dicts category -> list of [x, y] (or equal-length sequences of such dicts).
  Returns:
    a float for dicts, float32[N] for sequences. Where the reference raises (empty GT map with a
    non-empty prediction, a coordinate overflowing a float) this raises TypeError / OverflowError
    for dicts and gives NaN in arrays, unless the matching fix is on.
  """
  scalar = isinstance(pred_map, dict)
  preds, gts = ([pred_map], [gt_map]) if scalar else (list(pred_map), list(gt_map))
  cfg = dataclasses.replace(config, grid_size=grid_size)
  for p in preds:
    for k, v in p.items():
      if any(not isinstance(c, int) for xy in v for c in xy):
        raise ValueError(f"map_score: predicted coordinates must be ints (parse_map output), got "
                         f"{k!r}: {v!r}")
  items = [cogmap.MapItem({k: list(v) for k, v in p.items()}, dict(g)) for p, g in zip(preds, gts)]
  score, error = cogmap.scores(items, cfg, [f"#{i}" for i in range(len(items))])
  if scalar:
    if error[0]:
      raise (TypeError if not any(gts[0].values()) else OverflowError)(
          "the reference scorer raises on this map")
    return float(score[0])
  return np.where(error, np.nan, score).astype(np.float32)



# ------------------------------------------------------------------------------------------------
# Accuracy reward (SG-RLVR.py `accuracy_reward`).
# ------------------------------------------------------------------------------------------------
COUNTERS = ("no_answer", "unparsed_number", "unparsed_gt", "gt_zero", "map_scored",
            "map_without_gt_map", "map_overflow", "map_empty_gt", "map_zero", "unknown_type")


def _type_id(name):
  return _TYPE_ID.get(name, OTHER)


def _accuracy(completions, solutions, problem_types, cognitive_maps, config, where):
  """Accuracy components for N completions: dict of float32[N] arrays and counters."""
  n = len(completions)
  ptype = np.array([_type_id(t) for t in problem_types], np.int32)
  answers = [extract_answer(c) for c in completions]
  gts = [extract_answer(s) for s in solutions]
  counts = dict.fromkeys(COUNTERS, 0)
  counts["no_answer"] = sum(1 for c in completions if "<answer>" not in c or "</answer>" not in c)
  counts["unknown_type"] = int((ptype == OTHER).sum())
  base = np.zeros(n, np.float32)

  # Multiple choice: exact string match.
  mc_hit = np.array([a.strip() == g.strip() for a, g in zip(answers, gts)]) & (ptype == MC)
  base = np.where(ptype == MC, mc_hit.astype(np.float32), base)

  # Numerical: fuzzy number vs float(gt), MRA in float64 (see module docstring).
  num_idx = np.flatnonzero(ptype == NUM)
  num_acc = np.zeros(n, np.float64)
  if len(num_idx):
    g = [cogmap.float_or_none(gts[i]) for i in num_idx]
    p = [parse_number(answers[i], config) for i in num_idx]
    counts["unparsed_gt"] += sum(v is None for v in g)
    counts["unparsed_number"] += sum(v is None for v in p)
    ok = np.array([a is not None and b is not None for a, b in zip(g, p)])
    gf = np.array([np.nan if v is None else v for v in g], np.float64)
    pf = np.array([np.nan if v is None else v for v in p], np.float64)
    m = _mra_f64(pf, gf)
    counts["gt_zero"] += int((ok & (gf == 0)).sum())
    num_acc[num_idx] = np.where(ok & ~np.isnan(m), m, 0.0)
    base[num_idx] = num_acc[num_idx]

  # Regression: float(s.replace(",", "")) on both sides, relative error in float64.
  reg_idx = np.flatnonzero(ptype == REG)
  if len(reg_idx):
    g = [cogmap.float_or_none(gts[i].replace(",", "")) for i in reg_idx]
    p = [cogmap.float_or_none(answers[i].replace(",", "")) for i in reg_idx]
    counts["unparsed_gt"] += sum(v is None for v in g)
    counts["unparsed_number"] += sum(v is None for v in p)
    ok = np.array([a is not None and b is not None for a, b in zip(g, p)])
    gf = np.array([0.0 if v is None else v for v in g], np.float64)
    pf = np.array([0.0 if v is None else v for v in p], np.float64)
    base[reg_idx] = np.where(ok, _regression_f64(pf, gf, config.use_nan_fix), 0.0)

  # OCR and free-form: token ids on the host, dynamic programmes in jnp.
  for t, fn in ((OCR, text_metrics.wer_accuracy), (FREE, text_metrics.rouge_f)):
    idx = np.flatnonzero(ptype == t)
    if len(idx):
      base[idx] = np.asarray(fn([gts[i] for i in idx], [answers[i] for i in idx]))

  # Map bonus: correct MC answer or numerical MRA > 0.5, and "<map>" and "</map>" anywhere.
  has_tags = np.array(["<map>" in c and "</map>" in c for c in completions], bool)
  eligible = has_tags & (mc_hit | ((ptype == NUM) & (num_acc > 0.5)))
  no_gt = np.array([m is None for m in cognitive_maps], bool)
  counts["map_without_gt_map"] = int((eligible & no_gt).sum())
  error = eligible & no_gt & (not config.use_non_sr_map_fix)
  scored = eligible & ~no_gt
  idx = np.flatnonzero(scored)
  items, overflow = [], np.zeros(len(idx), bool)
  for k, i in enumerate(idx):
    gt_map = cognitive_maps[i]
    pred, overflow[k] = cogmap.parse(extract_map(completions[i]), list(gt_map.keys()), config)
    items.append(cogmap.MapItem(pred, gt_map))
  score = np.zeros(n, np.float32)
  s, s_err = cogmap.scores(items, config, [where[i] for i in idx])
  s_err = s_err | overflow
  score[idx] = np.where(s_err, 0.0, s)
  error[idx] |= s_err
  counts["map_scored"] = len(idx)
  counts["map_overflow"] = int(overflow.sum())
  counts["map_empty_gt"] = int(sum(1 for i in idx if not any(cognitive_maps[i].values())))
  counts["map_zero"] = int((scored & (score <= 0) & ~error).sum())

  acc = jnp.asarray(base)
  s_j = jnp.asarray(score)
  kept = acc if config.use_zero_map_fix else jnp.zeros_like(acc)
  acc = jnp.where(jnp.asarray(scored), jnp.where(s_j > 0, acc + s_j, kept), acc)
  acc = jnp.where(jnp.asarray(error), 0.0, acc)
  comps = {"accuracy": acc, "accuracy_base": jnp.asarray(base), "map": s_j,
           "map_scored": jnp.asarray(scored, jnp.float32)}
  return comps, counts


def accuracy_reward(completions, solutions, problem_types, cognitive_maps=None,
                    config: RewardConfig = DEFAULT):
  """SpaceR's accuracy reward incl. the map bonus, one value per completion.

  Args:
    completions: completion text (str) or a sequence of them.
    solutions: the `solution` field(s), e.g. "<answer>B</answer>".
    problem_types: "multiple choice" | "numerical" | "OCR" | "free-form" | "regression" (others 0).
    cognitive_maps: the GT map dict of each sample's video, or None where it has none.
  Returns:
    a float for a string completion, else float32[N] in [0, 2].
  """
  texts, scalar = _as_text_list(completions)
  if scalar:
    solutions, problem_types, cognitive_maps = [solutions], [problem_types], [cognitive_maps]
  if cognitive_maps is None:
    cognitive_maps = [None] * len(texts)
  if not len(texts) == len(solutions) == len(problem_types) == len(cognitive_maps):
    raise ValueError(f"accuracy_reward: {len(texts)} completions but {len(solutions)} solutions, "
                     f"{len(problem_types)} problem types, {len(cognitive_maps)} maps")
  comps, _ = _accuracy(texts, list(solutions), list(problem_types), list(cognitive_maps), config,
                       [f"completion {i}" for i in range(len(texts))])
  out = np.asarray(comps["accuracy"], np.float32)
  return float(out[0]) if scalar else out


# ------------------------------------------------------------------------------------------------
# Batch entry point: format + accuracy + temporal + length bonus (SG_RLVR_trainer.py).
# ------------------------------------------------------------------------------------------------
def combine(accuracy, format_scores, completion_lengths, group_size, shuffled_accuracy=None,
            is_video=None, config: RewardConfig = DEFAULT):
  """Temporal bonus, length bonus and total from per-completion accuracy and format.

  docs/spacer_recipe.md, "Rewards" (temporal bonus, length bonus, total).

  Args:
    accuracy: float[B*G] accuracy rewards incl. map bonus.
    format_scores: float[B*G].
    completion_lengths: int[B*G].
    group_size: G.
    shuffled_accuracy: None or float[B, S] (or [B*S]) accuracy of the shuffled-frame completions.
    is_video: bool[B]; the temporal test only runs for video prompts (default: all video).
  Returns:
    dict of float32[B*G] arrays: "temporal", "length", "total", "temporal_flag" (1 bonus granted,
    0 refused, 0.5 not applicable, as the reference logs it).
  """
  acc = jnp.asarray(accuracy, jnp.float32).reshape(-1)
  b = acc.shape[0] // group_size
  if shuffled_accuracy is None:
    shuffled, temporal_on = jnp.zeros((b, 1), jnp.float32), jnp.zeros(b, bool)
  else:
    shuffled = jnp.asarray(np.asarray(shuffled_accuracy, np.float32).reshape(b, -1))
    temporal_on = jnp.ones(b, bool) if is_video is None else jnp.asarray(is_video, bool)
  lengths = jnp.asarray(np.asarray(completion_lengths, np.int32).reshape(-1))
  if lengths.shape[0] != acc.shape[0]:
    raise ValueError(f"completion_lengths has {lengths.shape[0]} entries, expected {acc.shape[0]}")
  out = _bonuses(acc, jnp.asarray(format_scores, jnp.float32).reshape(-1), lengths, shuffled,
                 temporal_on, group_size=group_size, config=config)
  return dict(zip(("temporal", "length", "total", "temporal_flag"), out))


@functools.partial(jax.jit, static_argnames=("group_size", "config"))
def _bonuses(acc, fmt, lengths, shuffled, temporal_on, group_size, config):
  """Temporal and length bonuses and the total, per group of G. All [B*G] except shuffled [B, S]."""
  a = acc.reshape(-1, group_size)
  correct = a > config.bonus_threshold
  # Temporal (T-GRPO): + alpha to every "correct" completion if the ordered-frame accuracy mean is
  # at least mu times the shuffled-frame mean. Both means include map bonuses (quirk 8).
  passed = a.mean(1) >= config.temporal_mu * shuffled.mean(1)
  flag = temporal_on & passed
  temporal = jnp.where(flag[:, None] & correct, config.temporal_alpha, 0.0)
  # Length: +0.2 for "correct" completions of 320..512 tokens when more than one is correct; uses
  # the accuracy before the temporal bonus (rewards_per_func[:, 0]).
  lo, hi = config.length_range
  lens = lengths.reshape(-1, group_size)
  length = jnp.where((correct.sum(1) > 1)[:, None] & correct & (lens >= lo) & (lens <= hi),
                     config.length_bonus, 0.0)
  total = a + temporal + fmt.reshape(-1, group_size) + length
  metric = jnp.where(temporal_on, flag.astype(jnp.float32), 0.5)
  return (temporal.reshape(-1), length.reshape(-1), total.reshape(-1),
          jnp.repeat(metric, group_size))


def _per_completion(values, n_prompts, group_size, name):
  values = list(values)
  if len(values) == n_prompts * group_size:
    return values
  if len(values) == n_prompts:
    return [v for v in values for _ in range(group_size)]
  raise ValueError(f"examples[{name!r}] has {len(values)} entries; expected {n_prompts} (one per "
                   f"prompt) or {n_prompts * group_size} (one per completion)")


def compute_rewards(completions, examples, completion_lengths, group_size,
                    shuffled_accuracy=None, config: RewardConfig = DEFAULT):
  """All reward components of one rollout batch of B prompts x G completions.

  total = accuracy (with map and temporal bonus) + format + length bonus, in [0, 3.5].

  Args:
    completions: B*G decoded completions (special tokens skipped), grouped by prompt.
    examples: dict with "solution", "problem_type", "cognitive_map" (dict or None) and optionally
      "data_type" ("video" | "image") and "id"; each a list with one entry per prompt or per
      completion.
    completion_lengths: int[B*G] completion tokens up to and including the first <|im_end|>.
    group_size: G.
    shuffled_accuracy: None (no temporal bonus), or float[B, S] / float[B*S] accuracy rewards of the
      shuffled-frame completions (from `accuracy_reward`); only groups with data_type "video" use
      it.
  Returns:
    (components, counters): components maps "format", "accuracy" (incl. map bonus), "accuracy_base",
    "map", "map_scored", "temporal", "length", "temporal_flag" and "total" to float32[B*G] NumPy
    arrays (total in [0, 3.5]); counters maps each name in COUNTERS to an int.
  """
  texts = list(completions)
  if len(texts) % group_size:
    raise ValueError(f"{len(texts)} completions is not a multiple of group_size={group_size}")
  b = len(texts) // group_size
  per = lambda k, default=None: _per_completion(
      examples[k] if k in examples else [default] * b, b, group_size, k)
  sols, types, maps = per("solution"), per("problem_type"), per("cognitive_map")
  data_type = per("data_type", "video")
  ids = per("id", None)
  where = [f"example {ids[i]!r} completion {i}" if ids[i] is not None else f"completion {i}"
           for i in range(len(texts))]
  comps, counts = _accuracy(texts, sols, types, maps, config, where)
  fmt = jnp.asarray(format_reward(texts))
  is_video = [data_type[i * group_size] == "video" for i in range(b)]
  comps.update(format=fmt, **combine(comps["accuracy"], fmt, completion_lengths, group_size,
                                     shuffled_accuracy, is_video, config))
  counts["no_format"] = int((np.asarray(fmt) == 0).sum())
  return {k: np.asarray(v, np.float32) for k, v in comps.items()}, counts


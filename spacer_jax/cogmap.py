"""Cognitive maps: parsing of the model's <map> text and the greedy-matching map score.

Reproduces extract_map.py (`extract_map_data`, `calculate_prediction_score`) of OuyangKun10/SpaceR
b623af5 (docs/spacer_recipe.md, "Rewards"). Parsing is host Python (literal parser with
size/depth/node limits, never eval; positional fallback); scoring packs the maps into padded int32
arrays and runs the greedy matching as one jitted jnp kernel over all maps of a batch. The public
entry points are rewards.parse_map and rewards.map_score; the `config` arguments here are
rewards.RewardConfig.

Exactness: squared distances are exact int32 (predictions clipped to +-8192, GT limited to +-4096),
so the greedy order, including ties broken by (prediction index, GT index), is the reference's; a
pair at or beyond the grid diagonal scores exactly 0; the score itself is float32.
"""

import ast
import dataclasses
import functools
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from spacer_jax import text_metrics


def float_or_none(text: str):
  """Python `float(text)` (accepts "1_0", " 2e3", "nan", "inf"); None where it raises."""
  try:
    return float(text)
  except ValueError:
    return None


_OVERFLOW = "overflow"     # sentinel: the reference raises OverflowError here
_PAIR_NUM = re.compile(r"-?\d+(?:\.\d+)?")
_PAIR_CLEAN = re.compile(r"^[<\[(]*(-?\d+(?:\.\d+)?)[>\])]*$")
_KEY_CLEAN = re.compile(r"^[^\w\s]*([\w\s]+)[^\w\s]*$")


def _pair(x, config):
  """`_parse_and_validate_coord_pair`: [int, int], None (invalid) or _OVERFLOW."""
  if isinstance(x, (list, tuple)):
    if len(x) == 2:
      elems = list(x)
    elif len(x) == 1 and isinstance(x[0], (list, tuple)) and len(x[0]) == 2:
      elems = list(x[0])
    else:
      return None
  elif isinstance(x, str):
    nums = _PAIR_NUM.findall(x)
    if len(nums) < 2:
      return None
    elems = nums[:2]
  else:
    return None
  values = []
  for e in elems:
    if isinstance(e, (int, float)):     # bool is an int, as in the reference
      values.append(e)
    elif isinstance(e, str):
      s = e.strip()
      m = _PAIR_CLEAN.match(s)
      v = float_or_none(m.group(1) if m else s)
      if v is None:
        return None
      values.append(v)
    else:
      return None
  out = []
  for v in values:      # int() in order: int(nan) -> ValueError (invalid), int(inf) -> Overflow
    if isinstance(v, float) and math.isnan(v):
      return None
    if isinstance(v, float) and math.isinf(v):
      return None if config.use_overflow_fix else _OVERFLOW
    out.append(int(v))
  return out


def _pair_list(v, config):
  """`_parse_and_validate_coord_list`: (list of pairs, overflow flag)."""
  items = v if isinstance(v, list) else [v]
  pairs = []
  for item in items:
    p = _pair(item, config)
    if p is _OVERFLOW:
      return [], True
    if p is not None:
      pairs.append(p)
  return pairs, False


_NON_BRACKET = re.compile(r"[^()\[\]{}]+")


def _safe_literal(text: str, config):
  """ast.literal_eval with size and nesting limits; (value, ok). Never evaluates code.

  The length limit also bounds the number of AST nodes (each takes at least one character, plus
  one context node), so memory and time are linear in max_literal_chars.
  """
  if len(text) > config.max_literal_chars:
    return None, False
  # Bracket depth, brackets inside strings included: over-counting only rejects more.
  brackets = np.frombuffer(_NON_BRACKET.sub("", text).encode("ascii"), np.uint8)
  if len(brackets) > config.max_literal_depth:
    opening = (brackets == ord("(")) | (brackets == ord("[")) | (brackets == ord("{"))
    if np.cumsum(np.where(opening, 1, -1)).max() > config.max_literal_depth:
      return None, False
  try:
    with warnings.catch_warnings():      # model output is full of "invalid decimal literal" etc.
      warnings.simplefilter("ignore", SyntaxWarning)
      warnings.simplefilter("ignore", DeprecationWarning)
      tree = ast.parse(text, mode="eval")
  except (SyntaxError, ValueError, MemoryError, RecursionError):
    return None, False
  try:
    return ast.literal_eval(tree), True
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    return None, False


def parse(text: str, categories, config):
  """extract_map_data: (dict lowercase category -> [[x, y], ...], overflow flag).

  Args:
    text: the extracted <map> body.
    categories: GT category names (insertion order matters for ties, as in the reference).
    config: a rewards.RewardConfig (use_overflow_fix and the max_literal_* limits are read).
  Returns:
    (map, overflow): overflow is True where the reference raises OverflowError out of the parser.
  """
  if not isinstance(text, str) or not text:
    return {}, False
  names = [c for c in categories if isinstance(c, str) and c]
  oset = {c.lower() for c in names}
  if not oset:
    return {}, False
  st = text.strip()
  cand = st
  if st.startswith("str{") and st.endswith("}"):
    inner = st[4:-1].strip()
    if inner.startswith("{") and inner.endswith("}"):
      cand = inner
  if cand.startswith("{") and cand.endswith("}"):
    value, ok = _safe_literal(cand, config)
    if ok and isinstance(value, dict):
      result, overflow = {}, False
      for key, v in value.items():
        k = str(key).lower().strip()
        m = _KEY_CLEAN.match(k)
        if m:
          k = m.group(1).strip()
        if k not in oset:
          continue
        pairs, overflow = _pair_list(v, config)
        if overflow:
          break
        if pairs:
          result.setdefault(k, []).extend(pairs)
      # The reference processes the dict inside its literal_eval try-block, so an OverflowError
      # while reading the values silently falls back to the positional parser.
      if not overflow:
        return result, False
  return _parse_positional(st, names, config)


def _parse_positional(st, names, config):
  """`_extract_from_string_robustly`: category names, then the numbers up to the next name."""
  occ = []
  for name in names:
    pattern = re.compile(r"(?<![a-zA-Z])" + re.escape(name) + r"(?![a-zA-Z])", re.IGNORECASE)
    occ.extend((m.start(), m.end(), name.lower()) for m in pattern.finditer(st))
  if not occ:
    return {}, False
  occ.sort(key=lambda o: (o[0], -o[1]))
  kept = [occ[0]]
  for o in occ[1:]:
    last = kept[-1]
    if o[0] < last[1]:
      if o[1] > last[1]:
        kept[-1] = o
    else:
      kept.append(o)
  # The reference also tracks "processed regions", but kept occurrences never overlap, so regions
  # [end_i, start_{i+1}) never do either and that adjustment never fires.
  result = {}
  for i, (_, end, name) in enumerate(kept):
    stop = kept[i + 1][0] if i + 1 < len(kept) else len(st)
    if end >= stop:
      continue
    nums = _PAIR_NUM.findall(st, end, stop)
    for j in range(0, len(nums) - 1, 2):
      p = _pair((nums[j], nums[j + 1]), config)
      if p is _OVERFLOW:      # uncaught in the reference: the whole accuracy reward becomes 0
        return {}, True
      if p is not None:
        result.setdefault(name, []).append(p)
  return result, False


_GT_LIMIT = 4096
_PRED_CLIP = 8192          # |dx|, |dy| <= 16384 -> d^2 <= 2^29 fits int32 exactly
# The smallest integer Python's int -> float conversion (inside math.sqrt) rejects: it rounds to the
# nearest float, and below this halfway point to 2**1024 that is the largest finite float.
_SQRT_OVERFLOW = 2 ** 1024 - 2 ** 970


def _gt_ok(v) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(v) and v == int(v) and abs(v) <= _GT_LIMIT


def _gt_points(points, where):
  """GT points as int64[K, 2]; ValueError naming the record unless integers within +-4096."""
  if not all(isinstance(xy, (list, tuple)) and len(xy) == 2 and _gt_ok(xy[0]) and _gt_ok(xy[1])
             for xy in points):
    raise ValueError(f"ground-truth cognitive map {where}: coordinates must be [x, y] integers "
                     f"within +-{_GT_LIMIT}, got {points!r}")
  return np.array(points, np.int64).reshape(-1, 2)


def _prune(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """Keep the predictions greedy matching can use: the len(gt) nearest to each GT point.

  A pair (i, j) is accepted only while fewer than len(gt) predictions are used, so i must be among
  the len(gt) nearest to j in (distance, index) order. Dropping the others leaves the result
  unchanged and bounds the work by len(gt)^2 however many points the model emits.
  """
  if len(pred) <= len(gt):
    return pred
  d2 = ((pred[:, None, :] - gt[None, :, :]) ** 2).sum(-1)           # [P, K], exact int64
  near = np.argsort(d2, axis=0, kind="stable")[:len(gt)]              # [K, K]
  return pred[np.unique(near)]


@dataclasses.dataclass
class MapItem:
  """One prediction/GT pair to score."""
  pred: dict        # category -> list of [int, int]
  gt: dict          # category -> list of [x, y]


def _overflows(pred, gt) -> bool:
  """True where the reference's math.sqrt((px-gx)**2 + (py-gy)**2) raises OverflowError.

  A squared distance between the largest float and _SQRT_OVERFLOW converts (to the largest float)
  and that pair simply scores 0, as in the reference.
  """
  if not any(abs(int(v)) > 10 ** 150 for xy in pred for v in xy):
    return False
  return any((int(px) - int(gx)) ** 2 + (int(py) - int(gy)) ** 2 >= _SQRT_OVERFLOW
             for px, py in pred for gx, gy in gt)


def _pack(items, where):
  """Pack maps into padded int32 arrays; host flags for the cases the jnp kernel does not cover."""
  cells = []          # per item: list of (clipped + pruned predictions, true count, GT points)
  overflow = np.zeros(len(items), bool)
  for idx, it in enumerate(items):
    row = []
    for c in sorted(set(it.pred) | set(it.gt)):
      g = _gt_points(it.gt.get(c, []), f"{where[idx]} category {c!r}")
      p = list(it.pred.get(c, []))
      if p and len(g):
        overflow[idx] |= _overflows(p, g)
      pc = np.array([[max(min(int(v), _PRED_CLIP), -_PRED_CLIP) for v in xy] for xy in p],
                    np.int64).reshape(-1, 2)
      row.append((_prune(pc, g) if len(g) else pc, len(p), g))
    cells.append(row)
  n = text_metrics.bucket(len(items), 8)        # rows past len(items) are empty padding
  c_max = text_metrics.bucket(max(len(row) for row in cells))
  p_max = text_metrics.bucket(max([len(pc) for row in cells for pc, _, _ in row] + [1]))
  k_max = text_metrics.bucket(max([len(g) for row in cells for _, _, g in row] + [1]))
  pred_xy = np.zeros((n, c_max, p_max, 2), np.int32)
  pred_ok = np.zeros((n, c_max, p_max), bool)
  pred_n = np.zeros((n, c_max), np.int32)
  gt_xy = np.zeros((n, c_max, k_max, 2), np.int32)
  gt_ok = np.zeros((n, c_max, k_max), bool)
  gt_n = np.zeros((n, c_max), np.int32)
  for i, row in enumerate(cells):
    for j, (pc, p_true, g) in enumerate(row):
      pred_xy[i, j, :len(pc)], pred_ok[i, j, :len(pc)], pred_n[i, j] = pc, True, p_true
      gt_xy[i, j, :len(g)], gt_ok[i, j, :len(g)], gt_n[i, j] = g, True, len(g)
  pred_keys = np.array([len(it.pred) > 0 for it in items])
  pred_points = np.array([any(len(v) for v in it.pred.values()) for it in items])
  return (pred_xy, pred_ok, pred_n, gt_xy, gt_ok, gt_n), pred_keys, pred_points, overflow


@functools.partial(jax.jit, static_argnames="grid_size")
def _kernel(pred_xy, pred_ok, pred_n, gt_xy, gt_ok, gt_n, grid_size):
  """Greedy matching per (item, category); returns (num, den) of the weighted score. [N] each."""
  d = pred_xy[:, :, :, None, :] - gt_xy[:, :, None, :, :]              # [N,C,P,K,2] int32
  d2 = (d * d).sum(-1)                                                   # [N,C,P,K], exact
  big = jnp.iinfo(jnp.int32).max
  valid = pred_ok[..., :, None] & gt_ok[..., None, :]
  p, k = d2.shape[-2:]
  diag = grid_size * math.sqrt(2.0)
  # A pair at distance >= the grid diagonal scores exactly 0 in float64; decide that on the exact
  # integer d^2 so float32 rounding cannot turn it into a tiny positive score.
  # 1 - d/D written as (D^2 - d^2) / (D (D + d)): the numerator is an exact integer, which avoids
  # float32 cancellation (1 - 0.9 loses ~7 bits).
  d2f = d2.astype(jnp.float32)
  near = 2 * grid_size * grid_size - d2
  point = jnp.where(near <= 0, 0.0, near.astype(jnp.float32) / (diag * (diag + jnp.sqrt(d2f))))

  def step(carry, _):
    avail, total = carry
    masked = jnp.where(avail, d2, big).reshape(d2.shape[:-2] + (p * k,))
    flat = jnp.argmin(masked, axis=-1)           # first minimum: ties by (pred index, gt index)
    ok = jnp.take_along_axis(masked, flat[..., None], -1)[..., 0] < big
    i, j = flat // k, flat % k
    got = jnp.take_along_axis(point.reshape(masked.shape), flat[..., None], -1)[..., 0]
    total = total + jnp.where(ok, got, 0.0)
    used_i = jax.nn.one_hot(i, p, dtype=jnp.bool_) & ok[..., None]
    used_j = jax.nn.one_hot(j, k, dtype=jnp.bool_) & ok[..., None]
    avail = avail & ~used_i[..., :, None] & ~used_j[..., None, :]
    return (avail, total), None

  (_, total), _ = jax.lax.scan(step, (valid, jnp.zeros(d2.shape[:-2], jnp.float32)), None,
                               length=min(p, k))
  denom = jnp.maximum(pred_n, gt_n)
  acc_c = jnp.where((pred_n > 0) & (gt_n > 0), total / jnp.maximum(denom, 1), 0.0)
  num = (acc_c * gt_n).sum(-1)
  return num, gt_n.sum(-1)


def scores(items, config, where):
  """Scores of a list of MapItem: (float32[N] score, bool[N] error: the reference raises)."""
  if not items:
    return np.zeros(0, np.float32), np.zeros(0, bool)
  arrays, pred_keys, pred_points, overflow = _pack(items, where)
  num, den = _kernel(*(jnp.asarray(a) for a in arrays), grid_size=config.grid_size)
  num, den = np.asarray(num)[:len(items)], np.asarray(den)[:len(items)]
  if config.use_empty_gt_map_fix:
    empty_value = np.where(pred_points, 0.0, 1.0)
    empty_error = np.zeros(len(items), bool)
  else:
    empty_value = np.ones(len(items))
    empty_error = pred_keys       # `any(response.values() and ...)` -> TypeError
  score = np.where(den > 0, num / np.maximum(den, 1), empty_value).astype(np.float32)
  error = np.where(den > 0, False, empty_error)
  if not config.use_overflow_fix:
    error = error | overflow
  return np.where(error, 0.0, score).astype(np.float32), error


def draw(ax, cmap, categories, grid_size=10, title=""):
  """Draws a cognitive map {category: [[x, y], ...]} on its grid_size x grid_size grid (matplotlib).

  Each point is drawn at the centre of its cell, coloured by the category's position in
  `categories` (so a prediction and its ground truth drawn with the same list match), with the
  category's first letters beside it. Points off the grid are counted in the title. Host only.

  Args:
    ax: a matplotlib Axes.
    cmap: the map (parse_map output, or a ground-truth map).
    categories: the category order that fixes the colours (e.g. the ground-truth keys).
    grid_size: cells per side (SpaceR: 10).
    title: the Axes title; "(empty)" or the count of off-grid points is appended when it applies.
  """
  order = {c.lower(): i for i, c in enumerate(categories)}
  off = 0
  for cat, points in cmap.items():
    color = f"C{order.get(cat.lower(), len(order)) % 10}"
    inside = [(x, y) for x, y in points if 0 <= x < grid_size and 0 <= y < grid_size]
    off += len(points) - len(inside)
    if inside:
      xs, ys = np.array(inside, np.float64).T + 0.5
      ax.scatter(xs, ys, color=color, s=40, label=cat, zorder=3)
      for x, y in zip(xs, ys):
        ax.annotate(cat[:3], (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6)
  ax.set(xlim=(0, grid_size), ylim=(0, grid_size), aspect="equal",
         xticks=range(0, grid_size + 1, 2), yticks=range(0, grid_size + 1, 2))
  ax.grid(True, lw=0.3)
  ax.tick_params(labelsize=6)
  if not any(cmap.values()):
    title += " (empty)"
  elif off:
    title += f" ({off} off the grid)"
  ax.set_title(title, fontsize=7)

"""Questions of every VSI-Bench / SR-91k task type, answered exactly from a synthetic scene.

Each generator takes (scene, first_frames, config, rng) and returns a Question or None when the
scene cannot support that task (too few single-instance categories, an ambiguous geometry...).
Wording follows VSI-Bench / SR-91k (docs/spacer_recipe.md, "Data"). Questions about one object
("the chair") only use categories with a single instance in the room, as VSI-Bench does, and only
objects that are visible in some frame; counting only asks about categories whose every instance is
visible. Multiple-choice options are shuffled and written "A. ..."; numerical answers are rounded
(distances and areas to 0.1, sizes to whole centimetres).

Host-only NumPy code.
"""

import dataclasses
import itertools
import math
from collections.abc import Callable

import numpy as np

from spacer_jax.data.synthetic import scene as scene_lib

MULTIPLE_CHOICE = "multiple choice"
NUMERICAL = "numerical"

DIRECTION_SUFFIX = ("Directions refer to the quadrants of a Cartesian plane (assuming I am at the origin and "
                    "facing along the positive y-axis).")


@dataclasses.dataclass(frozen=True)
class Question:
  """One question: VSI task name, problem text (no options), options ("A. ..."), answer text."""
  question_type: str
  problem: str
  options: tuple[str, ...]
  answer: str  # option letter for multiple choice, number text for numerical

  @property
  def problem_type(self) -> str:
    return MULTIPLE_CHOICE if self.options else NUMERICAL


def _letters(n: int) -> list[str]:
  return [chr(ord("A") + i) for i in range(n)]


def _multiple_choice(question_type: str, problem: str, correct: str, distractors: list[str],
                     rng: np.random.Generator) -> Question:
  """Shuffles the correct option among the distractors and labels them A., B., ..."""
  choices = [correct] + list(distractors)
  order = rng.permutation(len(choices))
  shuffled = [choices[i] for i in order]
  letters = _letters(len(shuffled))
  options = tuple(f"{l}. {c}" for l, c in zip(letters, shuffled))
  return Question(question_type, problem, options, letters[shuffled.index(correct)])


def _singletons(scene: scene_lib.Scene, first_frames: list[int | None]) -> list[int]:
  """Indices of visible objects whose category has exactly one instance in the room."""
  counts = scene.counts()
  return [i for i, o in enumerate(scene.objects) if counts[o.category] == 1 and first_frames[i] is not None]


def _fmt1(x: float) -> str:
  return f"{round(x, 1):.1f}"


def object_counting(scene, first_frames, config, rng):
  """Only categories whose every instance shows up in some frame: the answer is in the video."""
  del config
  counts = scene.counts()
  hidden = {o.category for o, f in zip(scene.objects, first_frames) if f is None}
  cats = sorted(set(counts) - hidden)
  if not cats:
    return None
  cat = cats[int(rng.integers(len(cats)))]
  return Question("object_counting", f"How many {cat}(s) are in this room?", (), str(counts[cat]))


def object_abs_distance(scene, first_frames, config, rng):
  del config
  single = _singletons(scene, first_frames)
  if len(single) < 2:
    return None
  i, j = (single[k] for k in rng.choice(len(single), 2, replace=False))
  a, b = scene.objects[i], scene.objects[j]
  dist = scene_lib.box_distance(a, b)
  if round(dist, 1) <= 0:  # MRA divides by the answer
    return None
  problem = (f"Measuring from the closest point of each object, what is the direct distance between the "
             f"{a.category} and the {b.category} (in meters)?")
  return Question("object_abs_distance", problem, (), _fmt1(dist))


def object_size_estimation(scene, first_frames, config, rng):
  del config
  single = _singletons(scene, first_frames)
  if not single:
    return None
  o = scene.objects[single[int(rng.integers(len(single)))]]
  problem = (f"What is the length of the longest dimension (length, width, or height) of the {o.category}, "
             f"measured in centimeters?")
  return Question("object_size_estimation", problem, (), str(int(round(max(o.size) * 100))))


def room_size_estimation(scene, first_frames, config, rng):
  del first_frames, config, rng
  w, d, _ = scene.room
  problem = ("What is the size of this room (in square meters)? If multiple rooms are shown, estimate the "
             "size of the combined space.")
  return Question("room_size_estimation", problem, (), _fmt1(w * d))


def object_rel_distance(scene, first_frames, config, rng):
  single = _singletons(scene, first_frames)
  if len(single) < 5:
    return None
  target = single[int(rng.integers(len(single)))]
  others = [i for i in single if i != target]
  picked = [others[k] for k in rng.choice(len(others), 4, replace=False)]
  dists = sorted((scene_lib.box_distance(scene.objects[target], scene.objects[i]), i) for i in picked)
  if dists[1][0] - dists[0][0] < config.distance_margin:
    return None
  names = [scene.objects[i].category for _, i in dists]
  problem = (f"Measuring from the closest point of each object, which of the following objects is the "
             f"closest to the {scene.objects[target].category}?")
  return _multiple_choice("object_rel_distance", problem, names[0], names[1:], rng)


def _direction_angle(scene, a: int, b: int, c: int) -> float:
  """Signed angle (degrees, counter-clockwise = left) of c seen from a while facing b, in (-180, 180]."""
  pa, pb, pc = (np.array(scene.objects[k].center) for k in (a, b, c))
  fwd, rel = pb - pa, pc - pa
  return math.degrees(math.atan2(fwd[0] * rel[1] - fwd[1] * rel[0], fwd[0] * rel[0] + fwd[1] * rel[1]))


def _direction_label(level: str, angle: float, margin: float) -> str | None:
  """Answer label for a rel-direction question, or None when the angle is within margin of a boundary."""
  a = abs(angle)
  if level == "easy":
    if margin <= a <= 180 - margin:
      return "left" if angle > 0 else "right"
  elif level == "medium":
    if 45 + margin <= a <= 135 - margin:
      return "left" if angle > 0 else "right"
    if a >= 135 + margin:
      return "back"
  else:
    if margin <= a <= 90 - margin:
      return "front-left" if angle > 0 else "front-right"
    if 90 + margin <= a <= 180 - margin:
      return "back-left" if angle > 0 else "back-right"
  return None


_DIRECTION_LABELS = {"easy": ["left", "right"], "medium": ["left", "right", "back"],
                     "hard": ["front-left", "front-right", "back-left", "back-right"]}


def _rel_direction(level: str):
  def generate(scene, first_frames, config, rng):
    # Balance the answers: draw a label uniformly among those the room can produce, then a triple.
    by_label: dict[str, list[tuple[int, int, int]]] = {}
    for a, b, c in itertools.permutations(_singletons(scene, first_frames), 3):
      label = _direction_label(level, _direction_angle(scene, a, b, c), config.direction_margin_deg)
      if label is not None:
        by_label.setdefault(label, []).append((a, b, c))
    if not by_label:
      return None
    label = sorted(by_label)[int(rng.integers(len(by_label)))]
    a, b, c = by_label[label][int(rng.integers(len(by_label[label])))]
    na, nb, nc = (scene.objects[k].category for k in (a, b, c))
    if level == "easy":
      problem = f"If I am standing by the {na} and facing the {nb}, is the {nc} to the left or the right of the {nb}?"
    elif level == "medium":
      problem = (f"If I am standing by the {na} and facing the {nb}, is the {nc} to my left, right, or back? "
                 f"An object is to my back if I would have to turn at least 135 degrees in order to face it.")
    else:
      problem = (f"If I am standing by the {na} and facing the {nb}, is the {nc} to my front-left, "
                 f"front-right, back-left, or back-right? {DIRECTION_SUFFIX}")
    distractors = [l for l in _DIRECTION_LABELS[level] if l != label]
    return _multiple_choice(f"object_rel_direction_{level}", problem, label, distractors, rng)
  return generate


def obj_appearance_order(scene, first_frames, config, rng):
  """Categories ordered by the first frame in which any of their instances is visible."""
  first: dict[str, int] = {}
  for o, f in zip(scene.objects, first_frames):
    if f is not None:
      first[o.category] = min(f, first.get(o.category, f))
  # Ties would make the order ambiguous: draw k distinct first frames, then one category for each.
  k = config.order_length
  by_frame: dict[int, list[str]] = {}
  for c in sorted(first):
    by_frame.setdefault(first[c], []).append(c)
  frames = sorted(by_frame)
  if len(frames) < k:
    return None
  picked = []
  for f in sorted(rng.choice(len(frames), k, replace=False)):
    group = by_frame[frames[int(f)]]
    picked.append(group[int(rng.integers(len(group)))])
  picked = [picked[i] for i in rng.permutation(k)]
  correct = sorted(picked, key=lambda c: first[c])
  perms = [list(p) for p in itertools.permutations(correct) if list(p) != correct]
  n_wrong = min(3, len(perms))
  wrong = [perms[i] for i in rng.choice(len(perms), n_wrong, replace=False)]
  problem = (f"What will be the first-time appearance order of the following categories in the video: "
             f"{', '.join(picked)}?")
  return _multiple_choice("obj_appearance_order", problem, ", ".join(correct), [", ".join(p) for p in wrong], rng)


GENERATORS: dict[str, Callable] = {
    "object_counting": object_counting,
    "object_abs_distance": object_abs_distance,
    "object_size_estimation": object_size_estimation,
    "room_size_estimation": room_size_estimation,
    "object_rel_distance": object_rel_distance,
    "object_rel_direction_easy": _rel_direction("easy"),
    "object_rel_direction_medium": _rel_direction("medium"),
    "object_rel_direction_hard": _rel_direction("hard"),
    "obj_appearance_order": obj_appearance_order,
}


def scene_questions(scene: scene_lib.Scene, first_frames: list[int | None], config: scene_lib.SyntheticConfig,
                    rng: np.random.Generator, num_questions: int) -> list[Question]:
  """Draws up to num_questions distinct questions, one task per slot drawn by config.task_weights.

  A slot whose task the scene cannot support (or that only repeats earlier questions) after 5 tries
  stays empty rather than falling back to another task, so the task mix follows the weights among
  the scenes that support each task instead of drifting to the always-possible tasks (counting).
  """
  tasks = [t for t, _ in config.task_weights]
  weights = np.array([w for _, w in config.task_weights], np.float64)
  weights /= weights.sum()
  out: list[Question] = []
  seen = set()
  for _ in range(num_questions):
    task = tasks[int(rng.choice(len(tasks), p=weights))]
    for _ in range(5):
      q = GENERATORS[task](scene, first_frames, config, rng)
      if q is not None and q.problem not in seen:
        seen.add(q.problem)
        out.append(q)
        break
  return out


def spacer_record(q: Question, problem_id: int, path: str) -> dict:
  """SpaceR-151k training record (docs/spacer_recipe.md, "Data"); path relative to the data root."""
  return {
      "problem_id": problem_id,
      "problem": q.problem,
      "data_type": "video",
      "problem_type": q.problem_type,
      "options": list(q.options),
      "process": "",
      "solution": f"<answer>{q.answer}</answer>",
      "path": path,
      "data_source": "SR_dataset",
  }


def vsibench_record(q: Question, record_id: int, dataset: str, scene_name: str) -> dict:
  """VSI-Bench record (docs/spacer_recipe.md, "VSI-Bench"); options None for numerical questions."""
  return {
      "id": record_id,
      "dataset": dataset,
      "scene_name": scene_name,
      "question_type": q.question_type,
      "question": q.problem,
      "options": list(q.options) if q.options else None,
      "ground_truth": q.answer,
  }

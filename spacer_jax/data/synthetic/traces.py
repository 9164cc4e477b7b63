"""Templated reasoning traces for the synthetic questions (SFT warm start of the demo).

`sft_completion` turns a question, its answer and the scene's ground-truth cognitive map into a
completion in the shape SG-RLVR rewards: `<think>… <map>{…}</map> …</think><answer>X</answer>`.
The map sits inside <think> because the format reward accepts nothing outside the think and answer
blocks (docs/spacer_recipe.md, "Prompts"); it is the Python `str()` of the dict, like the prompt's
example, so the map parser reads it. The sentence for each
task restates the facts the answer rests on, read from the question text and the chosen option.

Host-only code.
"""

import re
from collections.abc import Sequence

# What each question's text names, in the order the sentence uses it (wording of questions.py).
_NAMES = {
    "object_counting": r"How many (.+)\(s\) are in this room\?",
    "object_abs_distance": r"between the (.+) and the (.+) \(in meters\)",
    "object_size_estimation": r"of the (.+), measured in centimeters",
    "object_rel_distance": r"closest to the (.+)\?$",
    "object_rel_direction_easy": r"standing by the (.+) and facing the (.+), is the (.+?) to ",
    "object_rel_direction_medium": r"standing by the (.+) and facing the (.+), is the (.+?) to ",
    "object_rel_direction_hard": r"standing by the (.+) and facing the (.+), is the (.+?) to ",
}

_SENTENCES = {
    "object_counting": "Counting every {0} across the frames, I find {answer} of them.",
    "object_abs_distance": "Between the closest points of the {0} and the {1} there are about {answer} meters.",
    "object_size_estimation": "The longest side of the {0} is about {answer} centimeters.",
    "room_size_estimation": "The floor of the room covers about {answer} square meters.",
    "object_rel_distance": "Of the listed objects, the {label} is the closest to the {0}.",
    "object_rel_direction_easy": "Standing by the {0} and facing the {1}, the {2} is to the {label} of the {1}.",
    "object_rel_direction_medium": "Standing by the {0} and facing the {1}, the {2} is to my {label}.",
    "object_rel_direction_hard": "Standing by the {0} and facing the {1}, the {2} is to my {label}.",
    "obj_appearance_order": "In the video they first appear in this order: {label}.",
}


def sft_completion(question_type: str, problem: str, options: Sequence[str], answer: str,
                   cognitive_map: dict[str, list[list[int]]]) -> str:
  """The target completion for one question.

  Args:
    question_type: VSI-Bench task name (annotation/question_types.jsonl, or the held-out record).
    problem: the question text (`problem` field; without options).
    options: the "A. ..." options ([] for numerical questions).
    answer: the answer text (option letter or number), i.e. the `solution` without its tags.
    cognitive_map: the video's ground-truth map (annotation/cognitive_map.jsonl).
  Returns:
    "<think>...<map>{...}</map>...</think><answer>{answer}</answer>".
  Raises:
    ValueError: unknown question type, a problem text the task's wording does not match, or an
      answer letter that names no option.
  """
  if question_type not in _SENTENCES:
    raise ValueError(f"sft_completion: unknown question_type {question_type!r}")
  names: tuple[str, ...] = ()
  if question_type in _NAMES:
    m = re.search(_NAMES[question_type], problem)
    if m is None:
      raise ValueError(f"sft_completion: {question_type} question not in the generator's wording: {problem!r}")
    names = m.groups()
  label = ""
  if options:
    by_letter = {o.split(". ", 1)[0]: o.split(". ", 1)[1] for o in options}
    if answer not in by_letter:
      raise ValueError(f"sft_completion: answer {answer!r} is not one of the options {list(options)}")
    label = by_letter[answer]
  fact = _SENTENCES[question_type].format(*names, answer=answer, label=label)
  think = (f"Let me think. The room holds {', '.join(cognitive_map)}. Let me place each of them on a "
           f"10x10 grid: <map>{cognitive_map}</map> {fact} So the answer is {answer}.")
  return f"<think>{think}</think><answer>{answer}</answer>"


def sft_process(question_type: str, problem: str, options: Sequence[str], solution: str,
                cognitive_map: dict[str, list[list[int]]]) -> str:
  """The record's `process` field: `sft_completion` without its final `solution`.

  SFT on `process + solution` (configs' sft_target="process") then trains on the whole completion.

  Args:
    question_type, problem, options, cognitive_map: as for `sft_completion`.
    solution: the record's solution, "<answer>X</answer>".
  """
  if not (solution.startswith("<answer>") and solution.endswith("</answer>")):
    raise ValueError(f"sft_process: solution {solution!r} is not <answer>...</answer>")
  answer = solution[len("<answer>"):-len("</answer>")]
  full = sft_completion(question_type, problem, options, answer, cognitive_map)
  if not full.endswith(solution):
    raise ValueError(f"sft_process: the trace does not end with the solution {solution!r}")
  return full[:-len(solution)]

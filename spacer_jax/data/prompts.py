"""Prompt strings and prompt tokenisation (host only).

Owns the exact text SpaceR feeds to Qwen2.5-VL (docs/spacer_recipe.md, "Prompts";
docs/qwen2_5_vl.md, "Preprocessing"):
  * the Qwen2.5-VL chat template with its default system prompt,
  * SpaceR's QUESTION_TEMPLATE / COGMAP_TEMPLATE and the per-problem-type TYPE_TEMPLATE suffixes,
  * the two VSI-Bench evaluation prompts (SpaceR-Eval's and the official lmms-eval one,
    docs/spacer_recipe.md, "VSI-Bench"),
and the token-level steps after it: expanding each vision placeholder into t*h*w/4 pad tokens and
left-padding a batch to a small set of length buckets so that jitted shapes stay static.

Prompts are never truncated: one that does not fit the largest bucket raises PromptTooLongError naming
the record, because cutting it could split a vision span (the placeholder count must equal the number
of vision features; docs/qwen2_5_vl.md, "Text decoder and M-RoPE").
"""

from collections.abc import Sequence

import numpy as np

# --------------------------------------------------------------------------------------------------
# Exact strings (docs/spacer_recipe.md, "Prompts"). Line breaks inside the literals are "\n"; the
# long sentences are split only for line length, the concatenation is the quoted text byte for byte.

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

_THINK_BODY = (
    "Please think about this question as if you were a human pondering deeply. Engage in an internal "
    "dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it "
    "down', etc, or other natural language thought expressions It's encouraged to include "
    "self-reflection or verification in the reasoning process."
)

QUESTION_TEMPLATE = (
    "Question: {Question}\n" + _THINK_BODY + " Provide your detailed reasoning between the <think> "
    "</think> tags, and then give your final answer between the <answer> </answer> tags."
)

COGMAP_TEMPLATE = (
    "Question: {Question}\n" + _THINK_BODY + "\nIf generating a cognitive map for the video can help "
    "you answer the question, you could follow the below steps to generate a cognitive map in <map> "
    "</map> tags\n[Steps] Identify specific objects within the **video scene**, understand the spatial "
    "arrangement of the scene, and estimate the center point of each object, assuming the entire scene "
    "is represented by a 10x10 grid. These information should be summarized in <map> </map> tags.\n"
    "[Rule]1. We provide the categories to care about in this scene: {object_list}. Focus ONLY on these "
    "categories for the entire video scene.\n2. Estimate the center location of each instance within "
    "the provided categories, assuming the entire scene is represented by a 10x10 grid, considering the "
    "information from all frames.\n3. If a category contains multiple instances across all frames, "
    "include all of them.\nPresent the map using dict format. Here is an example: <map>{map_example}"
    "</map>.\nIf you generate a cognitive map, please put it in <map> </map> tags. Provide your detailed "
    "reasoning process between the <think> </think> tags, and then give your final answer between the "
    "<answer> </answer> tags."
)

# str() of the example dict in SG-RLVR.py, i.e. Python's repr spacing.
MAP_EXAMPLE = str({"table": [[0, 3], [5, 7]], "chair": [[9, 3]], "window": [[6, 5]]})

TYPE_TEMPLATE = {
    "multiple choice": (
        " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> "
        "</answer> tags."
    ),
    "numerical": " Please provide the numerical value (e.g., 42 or 3.1) within the <answer> </answer> tags.",
    "OCR": (
        " Please transcribe text from the image/video clearly and provide your text answer within the "
        "<answer> </answer> tags."
    ),
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": (
        " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags."
    ),
}
PROBLEM_TYPES = tuple(TYPE_TEMPLATE)

# data_source value that marks SR-91k items, which get the cognitive-map template
# (docs/spacer_recipe.md, "Data").
SR_DATA_SOURCE = "SR_dataset"

# VSI-Bench (docs/spacer_recipe.md, "VSI-Bench"): SpaceR-Eval's fixed category list and the two
# answer families.
VSI_CATEGORIES = (
    "ceiling light", "trash can", "bed", "heater", "closet", "pillow", "backpack", "chair",
    "refrigerator", "tv", "nightstand", "keyboard", "computer tower", "coat hanger", "table",
    "trash bin", "whiteboard", "monitor", "sofa", "clock", "computer mouse", "radiator", "telephone",
)
VSI_MCA_TYPES = (
    "object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard",
    "object_rel_distance", "route_planning", "obj_appearance_order",
)
VSI_NA_TYPES = (
    "object_abs_distance", "object_counting", "object_size_estimation", "room_size_estimation",
)
VSI_OFFICIAL_PRE_PROMPT = "These are frames of a video."
VSI_OFFICIAL_MCA_POST_PROMPT = "Answer with the option's letter from the given choices directly."
VSI_OFFICIAL_NA_POST_PROMPT = "Please answer the question using a single word or phrase."
# SpaceR-Eval's non-thinking "default" prompt type (all its benchmarks): "Question: {Question}\n", then
# "\n" and one of these.
EVAL_DEFAULT_PRE_PROMPT = "Question: {Question}\n"
EVAL_DEFAULT_MCA_POST_PROMPT = "Answer with the option's letter from the given choices directly."
EVAL_DEFAULT_NA_POST_PROMPT = "Please answer the question using a numerical value (e.g., 42 or 3.1)."

# Chat-template special strings (Qwen2.5 tokenizer added tokens; docs/qwen2_5_vl.md,
# "Configurations").
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"

# The Jinja chat template of every Qwen2.5-VL Instruct checkpoint (its chat_template.json), which
# `chat_text` renders without Jinja; written next to exported checkpoints whose tokenizer has none
# (docs/qwen2_5_vl.md, "Preprocessing").
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Default length buckets for left padding (static shapes; a recompile per bucket, not per prompt).
DEFAULT_BUCKETS = (256, 512, 1024, 2048, 4096)


class PromptTooLongError(ValueError):
  """A tokenised prompt (vision tokens included) does not fit the largest length bucket."""

  def __init__(self, record_id, length, max_length):
    self.record_id, self.length, self.max_length = record_id, length, max_length
    super().__init__(
        f"record {record_id!r}: prompt has {length} tokens (vision tokens included) but the largest "
        f"length bucket is {max_length}; prompts are never truncated (that could cut a vision span). "
        "Raise the bucket sizes or lower the frame/pixel budget."
    )


# --------------------------------------------------------------------------------------------------
# Text.


def question_text(problem: str, problem_type: str, options: Sequence[str] | None) -> str:
  """SG-RLVR's question string: MC options appended with no separator before them."""
  if problem_type == "multiple choice":
    return problem + "Options:\n" + "".join(opt + "\n" for opt in (options or ()))
  return problem


def spacer_prompt(
    problem: str,
    problem_type: str,
    options: Sequence[str] | None = None,
    data_source: str | None = None,
    categories: Sequence[str] | None = None,
) -> str:
  """The user text of one SpaceR-151k training record (docs/spacer_recipe.md, "Prompts").

  Args:
    problem: the record's question (options not included).
    problem_type: one of PROBLEM_TYPES; selects the suffix.
    options: option strings ("A. radiator", ...) for multiple choice.
    data_source: "SR_dataset" selects COGMAP_TEMPLATE, anything else QUESTION_TEMPLATE.
    categories: the scene's category list (cognitive-map keys in insertion order); required for SR
      items, shown as Python's str() of the list.

  Returns:
    TEMPLATE.format(...) + TYPE_TEMPLATE[problem_type].
  """
  if problem_type not in TYPE_TEMPLATE:
    raise ValueError(f"unknown problem_type {problem_type!r}; expected one of {PROBLEM_TYPES}")
  q = question_text(problem, problem_type, options)
  if data_source == SR_DATA_SOURCE:
    if categories is None:
      raise ValueError("an SR_dataset record needs its scene's category list (cognitive-map keys)")
    body = COGMAP_TEMPLATE.format(
        Question=q, object_list=str(list(categories)), map_example=MAP_EXAMPLE
    )
  else:
    body = QUESTION_TEMPLATE.format(Question=q)
  return body + TYPE_TEMPLATE[problem_type]


def vsibench_prompt(
    question: str,
    question_type: str,
    options: Sequence[str] | None = None,
    style: str = "spacer",
    categories: Sequence[str] = VSI_CATEGORIES,
) -> str:
  """VSI-Bench user text (docs/spacer_recipe.md, "VSI-Bench").

  Args:
    question, question_type, options: fields of the official release.
    style: "spacer" (SpaceR-Eval: COGMAP_TEMPLATE with a fixed 23-category list, then "\\n" + suffix),
      "spacer_default" (SpaceR-Eval's non-thinking prompt: "Question: ...\\n", "\\n", a direct-answer
      instruction) or "official" (lmms-eval's thinking-in-space prompt).
    categories: category list for the spacer style (SpaceR-Eval's fixed list by default).
  """
  is_mca = question_type in VSI_MCA_TYPES
  if not is_mca and question_type not in VSI_NA_TYPES:
    raise ValueError(f"unknown VSI-Bench question_type {question_type!r}")
  if style == "official":
    if is_mca:
      opts = "Options:\n" + "\n".join(options or ())
      return "\n".join([VSI_OFFICIAL_PRE_PROMPT, question, opts, VSI_OFFICIAL_MCA_POST_PROMPT])
    return VSI_OFFICIAL_PRE_PROMPT + "\n" + question + "\n" + VSI_OFFICIAL_NA_POST_PROMPT
  q = question + ("\nOptions:\n" + "\n".join(options) if options else "")
  if style == "spacer_default":
    return (EVAL_DEFAULT_PRE_PROMPT.format(Question=q) + "\n"
            + (EVAL_DEFAULT_MCA_POST_PROMPT if is_mca else EVAL_DEFAULT_NA_POST_PROMPT))
  if style != "spacer":
    raise ValueError(f"unknown VSI-Bench prompt style {style!r} (use 'spacer', 'spacer_default' or"
                     " 'official')")
  body = COGMAP_TEMPLATE.format(Question=q, object_list=str(list(categories)), map_example=MAP_EXAMPLE)
  return body + "\n" + TYPE_TEMPLATE["multiple choice" if is_mca else "numerical"]


def chat_text(
    prompt: str,
    media: str | None = "video",
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    add_generation_prompt: bool = True,
) -> str:
  """Renders the Qwen2.5-VL chat template for one user turn (docs/qwen2_5_vl.md, "Preprocessing").

  The media placeholder comes first, then the text with no separator, as SpaceR builds its message.

  Args:
    prompt: user text.
    media: "video", "image", None (text only), or a sequence of them for several media items in
      one turn (SPAR-Bench's images), each rendered as its own vision span, in order.
    system_prompt: system message (the template's default, which SpaceR gets because its message
      list has no system turn); None drops the system turn, which the template itself never does.
    add_generation_prompt: append "<|im_start|>assistant\\n".
  """
  parts = []
  if system_prompt is not None:
    parts.append(f"{IM_START}system\n{system_prompt}{IM_END}\n")
  parts.append(f"{IM_START}user\n")
  for item in ([] if media is None else [media] if isinstance(media, str) else list(media)):
    if item == "video":
      parts.append(VISION_START + VIDEO_PAD + VISION_END)
    elif item == "image":
      parts.append(VISION_START + IMAGE_PAD + VISION_END)
    else:
      raise ValueError(f"media must be 'video', 'image' or None, got {media!r}")
  parts.append(f"{prompt}{IM_END}\n")
  if add_generation_prompt:
    parts.append(f"{IM_START}assistant\n")
  return "".join(parts)


# --------------------------------------------------------------------------------------------------
# Tokens.


def num_vision_tokens(grid_thw, merge_size: int = 2) -> int:
  """Placeholder tokens for one image/video: t*h*w / merge_size**2 (one per merged patch block)."""
  t, h, w = (int(x) for x in np.asarray(grid_thw).reshape(3))
  if h % merge_size or w % merge_size:
    raise ValueError(f"grid_thw {(t, h, w)} is not divisible by spatial merge size {merge_size}")
  return t * h * w // (merge_size * merge_size)


def expand_vision_tokens(
    ids: Sequence[int],
    *,
    image_token_id: int,
    video_token_id: int,
    image_grid_thw: Sequence | None = None,
    video_grid_thw: Sequence | None = None,
    merge_size: int = 2,
    record_id=None,
) -> np.ndarray:
  """Replaces the k-th image (video) pad token by num_vision_tokens(grid_thw[k]) copies of it.

  Equivalent to the HF processor's string-level expansion (added tokens are atomic in the tokenizer),
  done on ids so that a 1,040-token video span costs one np.repeat.

  Returns:
    int32[L'] expanded ids.
  """
  ids = np.asarray(ids, dtype=np.int32)
  grids = {image_token_id: list(image_grid_thw or ()), video_token_id: list(video_grid_thw or ())}
  repeats = np.ones(ids.shape, np.int64)
  for tok, grid_list in grids.items():
    pos = np.flatnonzero(ids == tok)
    if len(pos) != len(grid_list):
      kind = "image" if tok == image_token_id else "video"
      raise ValueError(
          f"record {record_id!r}: prompt has {len(pos)} {kind} placeholder(s) but {len(grid_list)} "
          f"{kind} grid(s) were given"
      )
    for p, g in zip(pos, grid_list):
      repeats[p] = num_vision_tokens(g, merge_size)
  return np.repeat(ids, repeats).astype(np.int32)


def choose_bucket(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS, record_id=None) -> int:
  """Smallest bucket >= length; PromptTooLongError (naming record_id) when none fits."""
  for b in sorted(buckets):
    if length <= b:
      return int(b)
  raise PromptTooLongError(record_id, length, max(buckets))


def left_pad(
    seqs: Sequence[Sequence[int]],
    pad_token_id: int,
    length: int | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    record_ids: Sequence | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token sequences to one static length.

  Args:
    seqs: B token-id sequences.
    pad_token_id: id written into the padding.
    length: target length; when None, the smallest bucket that holds the longest sequence.
    buckets: allowed lengths when `length` is None.
    record_ids: B ids used in the error message of a too-long sequence.

  Returns:
    input_ids int32[B, L], attention_mask int32[B, L] (1 on real tokens, 0 on the left padding).
  """
  record_ids = list(record_ids) if record_ids is not None else list(range(len(seqs)))
  lengths = [len(s) for s in seqs]
  if length is None:
    i = int(np.argmax(lengths)) if lengths else 0
    length = choose_bucket(lengths[i] if lengths else 0, buckets, record_ids[i] if lengths else None)
  input_ids = np.full((len(seqs), length), pad_token_id, np.int32)
  attention_mask = np.zeros((len(seqs), length), np.int32)
  for b, (s, n) in enumerate(zip(seqs, lengths)):
    if n > length:
      raise PromptTooLongError(record_ids[b], n, length)
    if n:
      input_ids[b, length - n:] = np.asarray(s, np.int32)
      attention_mask[b, length - n:] = 1
  return input_ids, attention_mask


def encode_prompt(
    tokenizer,
    prompt: str,
    media: str | None = "video",
    *,
    image_grid_thw: Sequence | None = None,
    video_grid_thw: Sequence | None = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    max_length: int | None = None,
    merge_size: int = 2,
    record_id=None,
) -> np.ndarray:
  """Chat-templates, tokenises and expands one prompt.

  Args:
    tokenizer: a spacer_jax.data.tokenizer.Tokenizer (encode() plus the special token ids).
    prompt: user text (spacer_prompt / vsibench_prompt output).
    media: "video", "image" or None.
    image_grid_thw / video_grid_thw: one grid per placeholder (the media's grid_thw).
    system_prompt: as in chat_text.
    max_length: when given, a longer result raises PromptTooLongError (never truncated).
    merge_size: vision spatial merge size (2 for Qwen2.5-VL).
    record_id: named in errors.

  Returns:
    int32[L] ids with every placeholder expanded to its vision-token count.
  """
  ids = tokenizer.encode(chat_text(prompt, media, system_prompt))
  ids = expand_vision_tokens(
      ids,
      image_token_id=tokenizer.image_token_id,
      video_token_id=tokenizer.video_token_id,
      image_grid_thw=image_grid_thw,
      video_grid_thw=video_grid_thw,
      merge_size=merge_size,
      record_id=record_id,
  )
  if max_length is not None and len(ids) > max_length:
    raise PromptTooLongError(record_id, len(ids), max_length)
  return ids

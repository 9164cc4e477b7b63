"""Prompt strings (SpaceR's and the chat template, byte for byte), placeholder expansion, bucketing."""

import jinja2
import numpy as np
import pytest

from spacer_jax.data import prompts
from spacer_jax.data import tokenizer as tokenizer_lib

# SpaceR's strings as its reference code has them, written out independently of prompts.py's line
# splitting.
QUESTION_TEMPLATE_SPEC = "Question: {Question}\nPlease think about this question as if you were a human pondering deeply. Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or other natural language thought expressions It's encouraged to include self-reflection or verification in the reasoning process. Provide your detailed reasoning between the <think> </think> tags, and then give your final answer between the <answer> </answer> tags."  # noqa: E501
COGMAP_TEMPLATE_SPEC = "Question: {Question}\nPlease think about this question as if you were a human pondering deeply. Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or other natural language thought expressions It's encouraged to include self-reflection or verification in the reasoning process.\nIf generating a cognitive map for the video can help you answer the question, you could follow the below steps to generate a cognitive map in <map> </map> tags\n[Steps] Identify specific objects within the **video scene**, understand the spatial arrangement of the scene, and estimate the center point of each object, assuming the entire scene is represented by a 10x10 grid. These information should be summarized in <map> </map> tags.\n[Rule]1. We provide the categories to care about in this scene: {object_list}. Focus ONLY on these categories for the entire video scene.\n2. Estimate the center location of each instance within the provided categories, assuming the entire scene is represented by a 10x10 grid, considering the information from all frames.\n3. If a category contains multiple instances across all frames, include all of them.\nPresent the map using dict format. Here is an example: <map>{map_example}</map>.\nIf you generate a cognitive map, please put it in <map> </map> tags. Provide your detailed reasoning process between the <think> </think> tags, and then give your final answer between the <answer> </answer> tags."  # noqa: E501
MC_SUFFIX = " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags."
NUM_SUFFIX = " Please provide the numerical value (e.g., 42 or 3.1) within the <answer> </answer> tags."

# Qwen2.5-VL chat_template.json of the Instruct checkpoints, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or "
    "'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def test_templates_match_spec_text():
  assert prompts.QUESTION_TEMPLATE == QUESTION_TEMPLATE_SPEC
  assert prompts.COGMAP_TEMPLATE == COGMAP_TEMPLATE_SPEC
  assert prompts.MAP_EXAMPLE == "{'table': [[0, 3], [5, 7]], 'chair': [[9, 3]], 'window': [[6, 5]]}"
  assert prompts.TYPE_TEMPLATE["multiple choice"] == MC_SUFFIX
  assert prompts.TYPE_TEMPLATE["numerical"] == NUM_SUFFIX
  assert prompts.TYPE_TEMPLATE["regression"].endswith("(e.g., 42 or 3.14) within the <answer> </answer> tags.")
  assert all(s.startswith(" Please") for s in prompts.TYPE_TEMPLATE.values())
  assert set(prompts.TYPE_TEMPLATE) == {"multiple choice", "numerical", "OCR", "free-form", "regression"}


def test_spacer_prompt_sr_multiple_choice():
  p = prompts.spacer_prompt(
      "Measuring from the closest point of each object, which of the following objects is the closest to the fire alarm?",
      "multiple choice",
      ["A. radiator", "B. smoke detector", "C. wardrobe closet", "D. dresser"],
      "SR_dataset",
      ["desk", "shelf", "bed", "fire alarm"],
  )
  assert p.startswith(
      "Question: Measuring from the closest point of each object, which of the following objects is the closest "
      "to the fire alarm?Options:\nA. radiator\nB. smoke detector\nC. wardrobe closet\nD. dresser\n\nPlease think"
  )
  assert "in this scene: ['desk', 'shelf', 'bed', 'fire alarm']. Focus ONLY" in p
  assert p.endswith("final answer between the <answer> </answer> tags." + MC_SUFFIX)
  q = ("Measuring from the closest point of each object, which of the following objects is the closest to the fire "
       "alarm?Options:\nA. radiator\nB. smoke detector\nC. wardrobe closet\nD. dresser\n")
  assert p == COGMAP_TEMPLATE_SPEC.format(Question=q, object_list="['desk', 'shelf', 'bed', 'fire alarm']",
                                          map_example=prompts.MAP_EXAMPLE) + MC_SUFFIX


def test_spacer_prompt_template_choice():
  plain = prompts.spacer_prompt("How many desk(s) are in this room?", "numerical", None, "LLaVA-Video")
  assert plain == QUESTION_TEMPLATE_SPEC.format(Question="How many desk(s) are in this room?") + NUM_SUFFIX
  sr = prompts.spacer_prompt("How many desk(s) are in this room?", "numerical", None, "SR_dataset", ["desk"])
  assert "<map>" in sr and "['desk']" in sr and sr.endswith(NUM_SUFFIX)
  with pytest.raises(ValueError, match="category list"):
    prompts.spacer_prompt("q", "numerical", None, "SR_dataset", None)
  with pytest.raises(ValueError, match="unknown problem_type"):
    prompts.spacer_prompt("q", "yes/no", None, None)


@pytest.mark.parametrize("media", ["video", "image", None])
def test_chat_text_matches_qwen_chat_template(media):
  text = "How many chairs?\nOptions:\nA. 1"
  content = ([{"type": media}] if media else []) + [{"type": "text", "text": text}]
  env = jinja2.Environment(keep_trailing_newline=True)
  want = env.from_string(CHAT_TEMPLATE).render(
      messages=[{"role": "user", "content": content}], add_generation_prompt=True, add_vision_id=False)
  assert prompts.chat_text(text, media) == want


def test_chat_text_spec_example():
  assert prompts.chat_text("What happens in this video?") == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
      "<|vision_start|><|video_pad|><|vision_end|>What happens in this video?<|im_end|>\n<|im_start|>assistant\n")


def test_vsibench_official_prompts():
  opts = ["A. left", "B. right", "C. back"]
  assert prompts.vsibench_prompt("Where is the sofa?", "object_rel_direction_easy", opts, style="official") == (
      "These are frames of a video.\nWhere is the sofa?\nOptions:\nA. left\nB. right\nC. back\n"
      "Answer with the option's letter from the given choices directly.")
  assert prompts.vsibench_prompt("How many chairs?", "object_counting", None, style="official") == (
      "These are frames of a video.\nHow many chairs?\nPlease answer the question using a single word or phrase.")


def test_vsibench_spacer_prompts():
  opts = ["A. left", "B. right"]
  p = prompts.vsibench_prompt("Where is the sofa?", "route_planning", opts)
  q = "Where is the sofa?\nOptions:\nA. left\nB. right"
  cats = str(list(prompts.VSI_CATEGORIES))
  assert p == COGMAP_TEMPLATE_SPEC.format(Question=q, object_list=cats, map_example=prompts.MAP_EXAMPLE) + "\n" + MC_SUFFIX
  assert len(prompts.VSI_CATEGORIES) == 23 and cats.startswith("['ceiling light', 'trash can', 'bed'")
  na = prompts.vsibench_prompt("How big is the room?", "room_size_estimation", [])
  assert na.startswith("Question: How big is the room?\nPlease think") and na.endswith("tags.\n" + NUM_SUFFIX)
  with pytest.raises(ValueError, match="question_type"):
    prompts.vsibench_prompt("q", "object_color", None)


def test_num_vision_tokens_and_expansion():
  assert prompts.num_vision_tokens([8, 20, 26]) == 1040  # 16 frames at 280x364: 8*20*26/4
  ids = [5, 90, 7, 91, 6, 90, 8]  # two "image" placeholders (90) and one "video" (91)
  out = prompts.expand_vision_tokens(ids, image_token_id=90, video_token_id=91,
                                     image_grid_thw=[[1, 2, 2], [1, 4, 6]], video_grid_thw=[[2, 2, 4]])
  want = [5] + [90] * 1 + [7] + [91] * 4 + [6] + [90] * 6 + [8]
  np.testing.assert_array_equal(out, want)
  assert out.dtype == np.int32
  with pytest.raises(ValueError, match="record 'r7'.*1 video placeholder"):
    prompts.expand_vision_tokens(ids, image_token_id=90, video_token_id=91, image_grid_thw=[[1, 2, 2]] * 2,
                                 record_id="r7")


def test_left_pad_buckets():
  ids, mask = prompts.left_pad([[1, 2, 3], [4]], pad_token_id=0, buckets=(2, 4, 8))
  np.testing.assert_array_equal(ids, [[0, 1, 2, 3], [0, 0, 0, 4]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  ids, _ = prompts.left_pad([[1, 2, 3]], pad_token_id=9, length=6)
  np.testing.assert_array_equal(ids, [[9, 9, 9, 1, 2, 3]])
  assert prompts.choose_bucket(5, (4, 8, 16)) == 8
  with pytest.raises(prompts.PromptTooLongError, match="record 'b'.*9 tokens.*largest length bucket is 8"):
    prompts.left_pad([[1], list(range(9))], pad_token_id=0, buckets=(4, 8), record_ids=["a", "b"])


@pytest.fixture(scope="module")
def offline_tok():
  return tokenizer_lib.build_offline_tokenizer()


def test_encode_prompt_expands_video_span(offline_tok):
  tok = offline_tok
  ids = prompts.encode_prompt(tok, "How many chairs?", "video", video_grid_thw=[[2, 4, 6]])
  assert (ids == tok.video_token_id).sum() == 12
  start = int(np.flatnonzero(ids == tok.vision_start_token_id)[0])
  assert np.all(ids[start + 1:start + 13] == tok.video_token_id) and ids[start + 13] == tok.vision_end_token_id
  assert ids[0] == tok.im_start_id
  assert tok.decode(ids, skip_special_tokens=False) == prompts.chat_text("How many chairs?").replace(
      "<|video_pad|>", "<|video_pad|>" * 12)
  with pytest.raises(prompts.PromptTooLongError, match="record 'x1'"):
    prompts.encode_prompt(tok, "How many chairs?", "video", video_grid_thw=[[8, 20, 26]], max_length=512,
                          record_id="x1")
  img = prompts.encode_prompt(tok, "Where?", "image", image_grid_thw=[[1, 2, 2]])
  assert (img == tok.image_token_id).sum() == 1 and (img == tok.video_token_id).sum() == 0

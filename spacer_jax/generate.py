"""Answer one question about a video (and/or an image) with a Qwen2.5-VL checkpoint, streaming the text.

  python -m spacer_jax.generate --model_dir DIR --video clip.mp4 --question "How many chairs?" \
      [--image img.png] [--problem_type numerical] [--max_new_tokens 1024] [--temperature 0.0]

DIR is a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files) or a train.py
workdir (model_config.json + ckpt/, or that ckpt/ directory): its latest orbax step's policy params are
restored by `spacer_jax.modeling.load_model` (`--step` picks another) and the tokenizer is the run's
tokenizer/ directory, the tokenizer_dir / model.hf_dir recorded in its config.json, or `--tokenizer_dir`.
A LoRA run's adapters come merged into the weights; `--adapter DIR` applies a peft adapter directory.
The data path
is the training pipeline's: frames are sampled and resized as SpaceR does (spacer_jax.data.video), the
question is wrapped in SpaceR's prompt template and the Qwen chat template (spacer_jax.data.prompts;
`--raw_prompt` sends the question as the user text unchanged), and the answer is decoded by the jitted
KV-cache sampler (spacer_jax.sampling) in chunks of `--chunk` tokens, each printed as soon as it exists.
"""

import os
import pathlib
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags

from spacer_jax import modeling
from spacer_jax import sampling
from spacer_jax.data import prompts
from spacer_jax.data import tokenizer as tokenizer_lib
from spacer_jax.data import video as video_lib


def check_media(path, flag) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{flag} {path}: no such file")
  if os.path.isdir(path):
    raise IsADirectoryError(f"{flag} {path}: is a directory, expected a file")
  return str(path)


def load_media(video=None, image=None):
  """Decodes and preprocesses the media exactly as the training pipeline does -> sampling kwargs.
  Raises video.MediaError naming the file when it is not a readable video/image."""
  vision = {}
  if video is not None:
    v = video_lib.load_video(video)
    vision.update(pixel_values_videos=v.pixel_values, video_grid_thw=np.asarray(v.grid_thw)[None],
                  second_per_grid_ts=np.asarray([v.second_per_grid_t], np.float32))
  if image is not None:
    im = video_lib.preprocess_image(image)
    vision.update(pixel_values=im.pixel_values, image_grid_thw=np.asarray(im.grid_thw)[None])
  return vision


def build_inputs(tok, cfg, question, vision, *, video=False, image=False,
                 problem_type="free-form", raw_prompt=False,
                 system_prompt=prompts.DEFAULT_SYSTEM_PROMPT):
  """Prompt text -> input_ids int32[1, L] with the placeholders expanded for `vision`'s grids."""
  user = question if raw_prompt else prompts.spacer_prompt(question, problem_type)
  media = "video" if video else ("image" if image else None)
  text = prompts.chat_text(user, media, system_prompt)
  if video and image:
    # Image first, then the video, both before the text (the order of HF's multi-media messages).
    vid = prompts.VISION_START + prompts.VIDEO_PAD + prompts.VISION_END
    img = prompts.VISION_START + prompts.IMAGE_PAD + prompts.VISION_END
    text = text.replace(vid, img + vid, 1)
  ids = prompts.expand_vision_tokens(
      tok.encode(text), image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
      image_grid_thw=[g for g in vision.get("image_grid_thw", [])],
      video_grid_thw=[g for g in vision.get("video_grid_thw", [])],
      merge_size=cfg.spatial_merge_size, record_id="--question")
  return ids[None].astype(np.int32)


class _Printer:
  """Streams decoded text: re-decodes the prefix and prints only the new suffix (a BPE piece can
  complete a multi-byte character only after the next token)."""

  def __init__(self, tok, stop_ids, out=None):
    self.tok, self.stop_ids, self.out = tok, set(stop_ids), out or sys.stdout
    self.ids, self.text, self.stopped = [], "", False

  def __call__(self, new_tokens, done):
    for t in new_tokens[0].tolist():
      if self.stopped:
        break
      if t in self.stop_ids:
        self.stopped = True
        break
      self.ids.append(t)
    text = self.tok.decode(self.ids)
    if not text.endswith("\ufffd"):
      self.out.write(text[len(self.text):])
      self.out.flush()
      self.text = text


def define_flags(fv=flags.FLAGS):
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("model_dir", None, "Hugging Face checkpoint directory, or a train.py workdir "
                      "(orbax checkpoint)", flag_values=fv)
  flags.DEFINE_integer("step", None, "train.py workdir: checkpoint step (default: latest)",
                       flag_values=fv)
  flags.DEFINE_string("adapter", None, "a peft LoRA adapter directory to apply to --model_dir "
                      "(adapter_config.json + adapter_model.safetensors)", flag_values=fv)
  flags.DEFINE_string("tokenizer_dir", None, "tokenizer files (default: the checkpoint's own, see "
                      "above)", flag_values=fv)
  flags.DEFINE_string("video", None, "video file (mp4, ...)", flag_values=fv)
  flags.DEFINE_string("image", None, "image file (png, jpg, ...)", flag_values=fv)
  flags.DEFINE_string("question", None, "the question", flag_values=fv)
  flags.DEFINE_enum("problem_type", "free-form", prompts.PROBLEM_TYPES, "SpaceR's answer format "
                    "instruction for the question", flag_values=fv)
  flags.DEFINE_bool("raw_prompt", False, "send the question without SpaceR's template",
                    flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 1024, "longest answer", flag_values=fv)
  flags.DEFINE_float("temperature", 0.0, "0 = greedy", flag_values=fv)
  flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass", flag_values=fv)
  flags.DEFINE_integer("top_k", 0, "top-k sampling (0 = off)", flag_values=fv)
  flags.DEFINE_float("repetition_penalty", 1.0, "transformers' repetition penalty (SpaceR-Eval "
                     "decodes with 1.05)", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=fv)
  flags.DEFINE_integer("chunk", 8, "tokens decoded between prints", flag_values=fv)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute and weights dtype",
                    flag_values=fv)
  flags.mark_flags_as_required(["model_dir", "question"], flag_values=fv)


# Bad input the command line reports as "error: ..." (exit status 2) instead of a traceback.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, video_lib.MediaError,
               ValueError)


def main(argv, fv=flags.FLAGS):
  """Answers --question (see `answer`); returns the text."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  return answer(fv)


def answer(fv):
  """The command line's work on parsed flags (see the module docstring)."""
  model_dir = pathlib.Path(fv.model_dir)
  modeling.source_kind(model_dir)  # a clear error when it is neither checkpoint kind
  video = check_media(fv.video, "--video") if fv.video else None
  image = check_media(fv.image, "--image") if fv.image else None
  if fv.max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens must be >= 1, got {fv.max_new_tokens}")

  vision = load_media(video, image)  # before the (slow) model load: a bad file fails fast
  tok = tokenizer_lib.load_tokenizer(modeling.tokenizer_dir(model_dir, fv.tokenizer_dir))
  t0 = time.perf_counter()
  model = modeling.load_model(model_dir, dtype=fv.dtype, step=fv.step, adapter=fv.adapter)
  cfg = model.config
  ids = build_inputs(tok, cfg, fv.question, vision, video=video is not None,
                     image=image is not None, problem_type=fv.problem_type,
                     raw_prompt=fv.raw_prompt)
  print(f"[model {model_dir.name} loaded in {time.perf_counter() - t0:.1f} s; prompt {ids.shape[1]} "
        f"tokens]", file=sys.stderr)
  extra = [i for i in (tok.eos_token_id, tok.endoftext_id) if i is not None]
  vision_pad = tok.token_to_id("<|vision_pad|>")
  sampler = sampling.Sampler(model, temperature=fv.temperature, top_k=fv.top_k,
                             top_p=fv.top_p, extra_stop_ids=extra,
                             repetition_penalty=fv.repetition_penalty,
                             extra_forbidden_ids=() if vision_pad is None else (vision_pad,))
  printer = _Printer(tok, sampler.scfg.stop_ids)
  t0 = time.perf_counter()
  out = sampler(ids, np.ones_like(ids), max_new_tokens=fv.max_new_tokens,
                rng=jax.random.key(fv.seed), callback=printer, chunk=fv.chunk, **vision)
  n = int(out.lengths[0])
  print()
  print(f"[{n} tokens in {time.perf_counter() - t0:.1f} s, including compilation]", file=sys.stderr)
  return printer.text


if __name__ == "__main__":
  from spacer_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, define_flags, __doc__, user_errors=USER_ERRORS)

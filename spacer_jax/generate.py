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

import argparse
import os
import pathlib
import sys
import time

import jax
import numpy as np

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


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model_dir", required=True,
                 help="Hugging Face checkpoint directory, or a train.py workdir (orbax checkpoint)")
  p.add_argument("--step", type=int, default=None, help="train.py workdir: checkpoint step "
                 "(default: latest)")
  p.add_argument("--adapter", default=None,
                 help="a peft LoRA adapter directory to apply to --model_dir (adapter_config.json + "
                 "adapter_model.safetensors)")
  p.add_argument("--tokenizer_dir", default=None,
                 help="tokenizer files (default: the checkpoint's own, see above)")
  p.add_argument("--video", default=None, help="video file (mp4, ...)")
  p.add_argument("--image", default=None, help="image file (png, jpg, ...)")
  p.add_argument("--question", required=True)
  p.add_argument("--problem_type", default="free-form", choices=prompts.PROBLEM_TYPES)
  p.add_argument("--raw_prompt", action="store_true", help="send the question without SpaceR's template")
  p.add_argument("--max_new_tokens", type=int, default=1024)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--repetition_penalty", type=float, default=1.0,
                 help="transformers' repetition penalty (SpaceR-Eval decodes with 1.05)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--chunk", type=int, default=8, help="tokens decoded between prints")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = p.parse_args(argv)

  model_dir = pathlib.Path(args.model_dir)
  modeling.source_kind(model_dir)  # a clear error when it is neither checkpoint kind
  video = check_media(args.video, "--video") if args.video else None
  image = check_media(args.image, "--image") if args.image else None
  if args.max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")

  vision = load_media(video, image)  # before the (slow) model load: a bad file fails fast
  tok = tokenizer_lib.load_tokenizer(modeling.tokenizer_dir(model_dir, args.tokenizer_dir))
  t0 = time.perf_counter()
  model = modeling.load_model(model_dir, dtype=args.dtype, step=args.step, adapter=args.adapter)
  cfg = model.config
  ids = build_inputs(tok, cfg, args.question, vision, video=video is not None,
                     image=image is not None, problem_type=args.problem_type,
                     raw_prompt=args.raw_prompt)
  print(f"[model {model_dir.name} loaded in {time.perf_counter() - t0:.1f} s; prompt {ids.shape[1]} "
        f"tokens]", file=sys.stderr)
  extra = [i for i in (tok.eos_token_id, tok.endoftext_id) if i is not None]
  vision_pad = tok.token_to_id("<|vision_pad|>")
  sampler = sampling.Sampler(model, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, extra_stop_ids=extra,
                             repetition_penalty=args.repetition_penalty,
                             extra_forbidden_ids=() if vision_pad is None else (vision_pad,))
  printer = _Printer(tok, sampler.scfg.stop_ids)
  t0 = time.perf_counter()
  out = sampler(ids, np.ones_like(ids), max_new_tokens=args.max_new_tokens,
                rng=jax.random.key(args.seed), callback=printer, chunk=args.chunk, **vision)
  n = int(out.lengths[0])
  print()
  print(f"[{n} tokens in {time.perf_counter() - t0:.1f} s, including compilation]", file=sys.stderr)
  return printer.text


if __name__ == "__main__":
  try:
    main()
  except (FileNotFoundError, NotADirectoryError, IsADirectoryError, video_lib.MediaError,
          ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

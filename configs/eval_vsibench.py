r"""VSI-Bench evaluation (spec spacer.md section 7), run by `python -m spacer_jax.evaluate`.

SpaceR-Eval protocol (the numbers SpaceR reports, 45.6 Avg for SpaceR-7B; think/answer COGMAP
prompt, tag extraction, fuzzy numbers, up to 1024 new tokens):

  python -m spacer_jax.evaluate --config=configs/eval_vsibench.py \
      --config.model_dir=/ckpt/SpaceR-7B --config.data_dir=/data/VSI_bench --workdir=/tmp/vsi_spacer

Official VSI-Bench protocol (direct answer, first-word parsing, 16 new tokens):

  python -m spacer_jax.evaluate --config=configs/eval_vsibench.py:protocol=official \
      --config.model_dir=/ckpt/Qwen2.5-VL-7B-Instruct --config.data_dir=/data/VSI_bench \
      --workdir=/tmp/vsi_official

Demo checkpoint on the synthetic held-out split (after `python -m spacer_jax.train
--config=configs/sgrlvr.py:demo --workdir=/tmp/demo`):

  python -m spacer_jax.evaluate --config=configs/eval_vsibench.py:demo,demo_workdir=/tmp/demo \
      --workdir=/tmp/demo/eval

data_dir layout: one annotation file (test-00000-of-00001.parquet, or *.jsonl/*.json) and the videos
at {data_dir}/{dataset}/{scene_name}.mp4. Outputs in --workdir: predictions.jsonl (resumable: rerun
the same command after a kill), metrics.json, table.md (the paper's columns).

Arguments after the colon: protocol=spacer|official, demo (flag), demo_workdir=DIR.
Frames: the spacer protocol reproduces SpaceR-Eval's (up to 32 at 1 fps, long side 448 with the
reference's width/height swap: 640x480 -> 336x448, 3,072 visual tokens); set
--config.video.swap_hw=False for the intended aspect-preserving resize, or
--config.video.sampler=pipeline for the training video path (used by the official protocol).
"""

import ml_collections

from spacer_jax import config_lib
from spacer_jax.data import synthetic

# Where train.py leaves things in a demo workdir: model_config.json + ckpt/ at the top (the evaluator
# restores the latest step's params), the offline tokenizer, and the synthetic dataset whose
# held-out split (synthetic.dataset_paths(root).eval_root) is in VSI-Bench format.
DEMO_TOKENIZER_SUBDIR = "tokenizer"
DEMO_SYNTHETIC_SUBDIR = "data/synthetic"  # train.py's default config.data.synthetic_root


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, protocol="spacer", demo=False, demo_workdir="")
  if arg.protocol not in ("spacer", "official"):
    raise ValueError(f"protocol={arg.protocol!r}: use spacer or official")
  c = ml_collections.ConfigDict()
  c.model_dir = ""        # HF checkpoint (config.json + safetensors) or trainer checkpoint dir.
  c.tokenizer_dir = ""    # default: model_dir.
  c.data_dir = ""         # VSI-Bench directory.
  c.protocol = arg.protocol
  c.max_new_tokens = 1024 if arg.protocol == "spacer" else 16
  # SpaceR-Eval's greedy decoding carries Qwen2.5-VL's generation_config repetition penalty
  # (spec 7.1).
  c.repetition_penalty = 1.05 if arg.protocol == "spacer" else 1.0
  c.batch_size = 8        # global; a multiple of the device count shards rows over devices.
  c.dtype = "bfloat16"
  c.cache_dtype = ""      # "" = dtype.
  c.mesh = "fsdp"         # config_lib.MESH_PRESETS / SHARDING_PRESETS key.
  c.prompt_buckets = (512, 1024, 2048, 4096, 8192)
  # spacer_eval: SpaceR-Eval's frames (<= 32 at 1 fps, long side 448 with its width/height swap,
  # then qwen-vl-utils' image budget 3,136..200,704 pixels). pipeline: the training video path.
  c.video = ml_collections.ConfigDict(dict(
      sampler="spacer_eval" if arg.protocol == "spacer" else "pipeline",
      fps=1.0, min_frames=4, max_frames=32, max_side=448, swap_hw=True,
      min_pixels=4 * 28 * 28, max_pixels=448 * 336 if arg.protocol == "official" else 256 * 28 * 28,
  ))
  c.name = ""             # table row label; default: basename of model_dir.
  c.allow_missing_videos = True
  c.max_items = 0         # 0 = all questions.
  c.num_workers = 2       # video decoding threads.
  c.progress = True

  if arg.demo:
    if not arg.demo_workdir:
      raise ValueError("the demo evaluation needs demo_workdir=DIR (the demo's --workdir)")
    c.model_dir = arg.demo_workdir
    c.tokenizer_dir = f"{arg.demo_workdir}/{DEMO_TOKENIZER_SUBDIR}"
    c.data_dir = synthetic.dataset_paths(f"{arg.demo_workdir}/{DEMO_SYNTHETIC_SUBDIR}").eval_root
    c.max_new_tokens = 128 if arg.protocol == "spacer" else 16
    c.repetition_penalty = 1.0  # as the trainer's in-run evaluation
    c.batch_size = 8
    c.dtype = "float32"
    c.prompt_buckets = (256, 512, 1024, 2048)
    # SyntheticConfig.demo(): 4 frames of 56x56 at 2 fps; keep every frame at full size.
    c.video = ml_collections.ConfigDict(dict(
        sampler="pipeline", fps=2.0, min_frames=4, max_frames=4, max_side=448, swap_hw=True,
        min_pixels=56 * 56, max_pixels=56 * 56))
    c.name = "demo"
  return c

r"""VSI-Bench evaluation (docs/spacer_recipe.md, "VSI-Bench"), run by `python -m spacer_jax.evaluate`.

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

SpaceR-Eval's non-thinking "default" mode (direct-answer prompt, 128 new tokens):
configs/eval_vsibench.py:protocol=spacer_default.

Arguments after the colon: protocol=spacer|spacer_default|official, aggregation=code|readme (the same
for VSI-Bench), demo (flag), demo_workdir=DIR, benchmark=NAME (any other benchmark, see
configs/eval_stibench.py etc.).
Frames: the spacer protocol reproduces SpaceR-Eval's (up to 32 at 1 fps, long side 448 with the
reference's width/height swap: 640x480 -> 336x448, 3,072 visual tokens); set
--config.video.swap_hw=False for the intended aspect-preserving resize, or
--config.video.sampler=pipeline for the training video path (used by the official protocol).
"""

from spacer_jax import config_lib


def get_config(arg=None):
  return config_lib.eval_config(arg, benchmark="vsibench")

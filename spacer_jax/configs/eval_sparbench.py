r"""SPAR-Bench (multi-image) evaluation, run by `python -m spacer_jax.evaluate` (SpaceR-Eval's protocol).

  python -m spacer_jax.evaluate --config=configs/eval_sparbench.py \
      --config.model_dir=/ckpt/SpaceR-7B --config.data_dir=/data/SPAR-Bench --workdir=/tmp/spar

data_dir layout: data/test-0000k-of-00004.parquet (images inline). Table: Avg, Low, Middle, High, each
img_type, the 20 tasks. aggregation=code (default) drops view_change_infer from Middle as SpaceR-Eval
does; aggregation=readme keeps it. Images: --config.image.min_pixels / max_pixels (3,136 .. 200,704).

Arguments after the colon: protocol=spacer|spacer_default (thinking, 1024 new tokens | direct answer,
128 new tokens), aggregation=code|readme. Outputs in --workdir: predictions.jsonl (resumable: rerun the
same command after a kill), metrics.json, table.md (the paper's columns). The same run from any eval
config: configs/eval_vsibench.py:benchmark=sparbench.
"""

from spacer_jax import config_lib


def get_config(arg=None):
  return config_lib.eval_config(arg, benchmark="sparbench")

r"""LongVideoBench evaluation, run by `python -m spacer_jax.evaluate` (SpaceR-Eval's protocol).

  python -m spacer_jax.evaluate --config=configs/eval_longvideobench.py \
      --config.model_dir=/ckpt/SpaceR-7B --config.data_dir=/data/LongVideoBench --workdir=/tmp/lvb

data_dir layout: lvb_val.json and videos/{video_id}.mp4. Table: Overall, Perception, Relation, the
question categories.

Arguments after the colon: protocol=spacer|spacer_default (thinking, 1024 new tokens | direct answer,
128 new tokens), aggregation=code|readme. Outputs in --workdir: predictions.jsonl (resumable: rerun the
same command after a kill), metrics.json, table.md (the paper's columns). The same run from any eval
config: configs/eval_vsibench.py:benchmark=longvideobench.
"""

from spacer_jax import config_lib


def get_config(arg=None):
  return config_lib.eval_config(arg, benchmark="longvideobench")

r"""TempCompass evaluation, run by `python -m spacer_jax.evaluate` (SpaceR-Eval's protocol).

  python -m spacer_jax.evaluate --config=configs/eval_tempcompass.py \
      --config.model_dir=/ckpt/SpaceR-7B --config.data_dir=/data/TempCompass --workdir=/tmp/tempcompass

data_dir layout: eval_tempcompass.json (Video-R1's evaluation file) and videos/{video_id}.mp4. Table:
Overall and per problem type.

Arguments after the colon: protocol=spacer|spacer_default (thinking, 1024 new tokens | direct answer,
128 new tokens), aggregation=code|readme. Outputs in --workdir: predictions.jsonl (resumable: rerun the
same command after a kill), metrics.json, table.md (the paper's columns). The same run from any eval
config: configs/eval_vsibench.py:benchmark=tempcompass.
"""

from spacer_jax import config_lib


def get_config(arg=None):
  return config_lib.eval_config(arg, benchmark="tempcompass")

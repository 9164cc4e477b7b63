r"""Video-MME (without subtitles) evaluation, run by `python -m spacer_jax.evaluate` (SpaceR-Eval's protocol).

  python -m spacer_jax.evaluate --config=configs/eval_videomme.py \
      --config.model_dir=/ckpt/SpaceR-7B --config.data_dir=/data/Video-MME --workdir=/tmp/videomme

data_dir layout: videomme/test-00000-of-00001.parquet and data/{videoID}.mp4. Table: Overall, Short,
Medium, Long, the 12 task types.

Arguments after the colon: protocol=spacer|spacer_default (thinking, 1024 new tokens | direct answer,
128 new tokens), aggregation=code|readme. Outputs in --workdir: predictions.jsonl (resumable: rerun the
same command after a kill), metrics.json, table.md (the paper's columns). The same run from any eval
config: configs/eval_vsibench.py:benchmark=videomme.
"""

from spacer_jax import config_lib


def get_config(arg=None):
  return config_lib.eval_config(arg, benchmark="videomme")

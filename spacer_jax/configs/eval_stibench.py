r"""STI-Bench evaluation, run by `python -m spacer_jax.evaluate` (SpaceR-Eval's protocol).

  python -m spacer_jax.evaluate --config=configs/eval_stibench.py \
      --config.model_dir=/ckpt/SpaceR-7B --config.data_dir=/data/STI-Bench --workdir=/tmp/sti

data_dir layout: qa.parquet and video/{Video}. Table: the 8 tasks, Overall, SR_sub. aggregation=code
(default) is SpaceR-Eval's (SR_sub, the mean of the six SR task means, enters Overall as a ninth term);
aggregation=readme is the README tables' (Overall = mean of the 8 tasks, SR_sub = accuracy over the SR
questions).

Arguments after the colon: protocol=spacer|spacer_default (thinking, 1024 new tokens | direct answer,
128 new tokens), aggregation=code|readme. Outputs in --workdir: predictions.jsonl (resumable: rerun the
same command after a kill), metrics.json, table.md (the paper's columns). The same run from any eval
config: configs/eval_vsibench.py:benchmark=stibench.
"""

from spacer_jax import config_lib


def get_config(arg=None):
  return config_lib.eval_config(arg, benchmark="stibench")

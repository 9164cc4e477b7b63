"""SFT baseline ("SpaceR SFT"): cross-entropy on the solution completions of SpaceR-151k.

Run sheet
  Command (8x H100/H200, one host):
    python -m spacer_jax.train --config=configs/sft.py --workdir=runs/sft \
      --config.model.hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct \
      --config.data.annotations=/data/SpaceR-151k/SpaceR-151k.jsonl \
      --config.data.media_root=/data/SpaceR-151k
  Arguments: size=3b|7b|32b|72b, frames=16, sharding=fsdp|fsdp_tp, lora=RANK and
    lora_targets=text|vision|merger|all|text+vision (LoRA; README "LoRA"),
    smoke (tiny model on CPU),
    target=solution|process (train on `solution` as the reference does, or on the `process` CoT
    trace followed by the solution).
  Recipe (docs/spacer_recipe.md, "Hyper-parameters"): global batch 16 (8 GPUs x 1 x grad-accum 2),
  lr 1e-6, linear decay, no warmup, weight decay 0, clip 5, bf16, one epoch = ceil(151,310 / 16) = 9,457 steps. The loss covers the
  assistant completion only (the reference also trains on the system/user text; we do not reproduce that
  collator quirk), and the prompt is the RL prompt of the data pipeline without the map instructions
  (the reference SFT script words the question slightly differently).
  target=process trains on SpaceR-151k's `process` field (Video-R1 `<think>` traces, carried by
  the pipeline and the TFDS builder >= 1.1.0); rows without a trace train on the solution alone,
  logged as sft/empty_process_frac.
  TPU: v5p-8 for 3B and 7B (as configs/sgrlvr.py; plan with python -m spacer_jax.plan
    --config=configs/sft.py:size=7b --topology=v5p-8).
  Expected: the loss drops within the first hundred steps (answers are a few tokens); VSI-Bench below
  SG-RLVR.
"""

from spacer_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="7b", frames=16, sharding="", lora=0, lora_targets="text",
                           target="solution", smoke=False)
  if a.target not in ("solution", "process"):
    raise ValueError(f"configs/sft.py: target must be solution|process, got {a.target!r}")
  c = config_lib.base_config(a.size, a.frames, a.sharding, a.lora, a.lora_targets)
  c.mode = "sft"
  c.total_steps = 9457
  c.sft_target = a.target
  c.data.batch_size = 16
  c.data.use_cogmap_prompt = False
  c.grad_accum_steps = 2
  c.optim.schedule = "linear"
  c.optim.wd = 0.0
  return config_lib.smoke(c) if a.smoke else c

"""Plain GRPO baseline on SpaceR-151k: no cognitive-map prompt or reward, no temporal/length bonus.

Run sheet
  Command (8x H100/H200, one host):
    python -m spacer_jax.train --config=configs/grpo.py --workdir=runs/grpo \
      --config.model.hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct \
      --config.data.annotations=/data/SpaceR-151k/SpaceR-151k.jsonl \
      --config.data.media_root=/data/SpaceR-151k
  Arguments: size=3b|7b|32b|72b, frames=16, sharding=fsdp|fsdp_tp, lora=RANK and
    lora_targets=text|vision|merger|all|text+vision (LoRA instead of full fine-tuning; README "LoRA"),
    smoke (tiny model on CPU).
  Same optimiser, sampling and KL as configs/sgrlvr.py; rewards = accuracy (MC exact match, numerical
  MRA) + format. This is the ablation that isolates SG-RLVR's map reward (docs/spacer_recipe.md, "GRPO objective").
  Expected: accuracy below SG-RLVR on the spatial tasks at equal steps.
"""

from spacer_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="7b", frames=16, sharding="", lora=0, lora_targets="text",
                           smoke=False)
  c = config_lib.base_config(a.size, a.frames, a.sharding, a.lora, a.lora_targets)
  c.data.use_cogmap_prompt = False
  c.data.cognitive_maps = ""
  c.rewards.use_map = False
  c.rewards.use_non_sr_map_fix = True  # Without maps, <map> tags in an answer are simply ignored.
  c.rewards.use_temporal = False
  c.rewards.use_length = False
  return config_lib.smoke(c) if a.smoke else c


def sweep(add):
  for beta in (0.0, 0.04):
    add(**{"grpo.beta": beta})

"""SG-RLVR (SpaceR): GRPO with map-imagination, temporal and length rewards on SpaceR-151k.

Run sheet
  Command (8x H100/H200 80 GB, one host):
    python -m spacer_jax.train --config=configs/sgrlvr.py --workdir=runs/sgrlvr \
      --config.model.hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct \
      --config.data.annotations=/data/SpaceR-151k/SpaceR-151k.jsonl \
      --config.data.media_root=/data/SpaceR-151k \
      --config.data.cognitive_maps=/data/SpaceR-151k/annotation/cognitive_map.jsonl
  Arguments (after the colon, comma separated):
    size=3b|7b|32b|72b   model size; picks the default checkpoint dir /ckpt/Qwen2.5-VL-{SIZE}-Instruct
                         and, for 32b/72b, the FSDP+TP preset.
    frames=16            max frames per video (SpaceR: 16).
    sharding=fsdp|fsdp_tp
    smoke                tiny model, synthetic data, 2 steps on CPU (< 1 minute).
  Recipe (spec spacer.md sections 5-6): 8 prompts x G=8 completions per step, T=1.0, top-p 0.95,
    top-k 50, 1024 new tokens, beta 0.04 k3 KL, AdamW lr 1e-6 cosine to 0 without warmup, weight decay
    0.01, clip 5.0, bf16 compute with fp32 master weights and optimizer state, one epoch = 18,914 steps.
  Expected: format reward rises to ~1 within the first few hundred steps; accuracy reward (incl. map
    bonus) climbs slowly; VSI-Bench average 45.6 for the released 7B checkpoint (paper abstract).
  Hardware/runtime: the PyTorch reference used 8 GPUs with ZeRO-3; one step is dominated by the
    64 x 1024-token rollout.
"""

from spacer_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="7b", frames=16, sharding="", smoke=False)
  c = config_lib.base_config(a.size, a.frames, a.sharding)
  # SG-RLVR = the base recipe as is: cognitive-map prompt and map reward, temporal and length bonuses.
  return config_lib.smoke(c) if a.smoke else c


def sweep(add):
  for lr in (5e-7, 1e-6, 2e-6):
    add(**{"optim.lr": lr})

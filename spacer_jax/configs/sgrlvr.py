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
    lora=RANK            LoRA adapters of this rank instead of full fine-tuning (0 = off; README
                         "LoRA": alpha, dropout, peft export); a larger config.optim.lr is usual.
    lora_targets=text    the adapted layers: text, vision, merger, all, or a '+' of them
                         (config_lib.LORA_TARGETS; e.g. text+vision).
    smoke                tiny model, synthetic data, 2 steps on CPU (< 1 minute).
    demo                 the CPU demo (README's first command): synthetic data, tiny random-init model,
                         SFT warm-up on templated think/map/answer traces, then SG-RLVR; writes
                         demo_curve.png, demo_metrics.json and a summary ending with a verdict
                         (spacer_jax/demo.py; settings from experiments/2026-12-04_demo_robust).
  Recipe (docs/spacer_recipe.md, "GRPO objective" and "Hyper-parameters"): 8 prompts x G=8
    completions per step, T=1.0, top-p 0.95, top-k 50, 1024 new tokens, beta 0.04 k3 KL, AdamW lr
    1e-6 cosine to 0 without warmup, weight decay 0.01, clip 5.0, bf16 compute with fp32 master
    weights and optimizer state, one epoch = 18,914 steps.
  Expected: format reward rises to ~1 within the first few hundred steps; accuracy reward (incl. map
    bonus) climbs slowly; VSI-Bench average 45.6 for the released 7B checkpoint (paper abstract).
  Hardware/runtime: the PyTorch reference used 8 GPUs with ZeRO-3; one step is dominated by the
    64 x 1024-token rollout.
  Run sheet (7B, the defaults: mesh (data 1, fsdp -1, tensor 1), data.batch_size 8 prompts x G = 8
    = 64 rollout rows, grad_accum_steps 1, bf16 compute, fp32 master weights and Adam moments, bf16
    reference policy, remat on):
    8 GPUs, one host:  one process, the command above; fsdp = 8 (params, optimizer and the 64 rows
                       split 8 ways: 1 prompt x 8 samples per GPU). Install with ".[cuda12]".
    v5p-8 TPU VM:      one host with 4 chips: one process, the same command; fsdp = 4 (2 prompts x 8
                       samples per chip). Install with ".[tpu]".
    more hosts:        the same command on every host with --distributed=on (TPU slices) or under
                       srun (scripts/slurm_sgrlvr.sbatch); batch_size must divide by the number of
                       processes (README, "Accelerators and multi-host runs").
    32B / 72B:         size=32b / size=72b: FSDP + 2-way tensor parallelism and 4 micro-batches
                       (grad_accum_steps 4, their preset; 72B also scans its decoder layers);
                       planned to fit a v5p-32 (16 chips, 86.9 GiB per chip) / a v5p-64 (32 chips,
                       58.1 GiB) with `python -m spacer_jax.plan` (README "Will it fit?").
    LoRA on 16 GB v5e chips (`lora=16`, planned with `python -m spacer_jax.plan`, README "Will it
    fit?"): 7B on a v5e-8 with --config.grad_accum_steps=4 (14.5 of 15.75 GiB per chip); 3B on one
    v5e chip (Colab) with --config.data.batch_size=1 --config.grad_accum_steps=8 (9.1 GiB).
    Memory per device, step time, rollout tokens/s and MFU for these shapes: not measured here (no
    GPU or TPU was available); the planner's fit figures are the reference for whether a shape fits.
"""

from spacer_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="7b", frames=16, sharding="", lora=0, lora_targets="text",
                           smoke=False, demo=False)
  c = config_lib.base_config(a.size, a.frames, a.sharding, a.lora, a.lora_targets)
  # SG-RLVR = the base recipe as is: cognitive-map prompt and map reward, temporal and length bonuses.
  if a.demo:
    return demo(c)
  return config_lib.smoke(c) if a.smoke else c


def demo(c):
  """The CPU demo: the recipe at demo scale (experiments/2026-12-04_demo_robust/README.md)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = config_lib.smoke(c)
  c.sft_warmup_steps = 300  # SFT on templated traces, then GRPO for the remaining steps.
  c.sft_target = "process"  # process = the trace's <think>...</think>, then the solution.
  c.total_steps = 350
  c.ckpt_every_steps = 50  # Divides sft_warmup_steps: the held-out evaluation reads the SFT checkpoint.
  c.keep_ckpts = 10
  c.rollout_log_every_steps = 10
  c.model.tiny_overrides = ml_collections.ConfigDict(dict(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, mrope_section=(4, 2, 2), vision_depth=2, vision_hidden_size=32,
      vision_num_heads=2, vision_intermediate_size=64, fullatt_block_indexes=(1,)))
  # 4 frames of 84x84 (2 temporal x 3x3 merged = 18 video tokens); every frame at full size.
  c.data.synthetic = ml_collections.ConfigDict(dict(
      num_scenes=256, num_eval_scenes=32, questions_per_scene=10, height=84, width=84))
  c.data.max_frames = 4
  c.data.video_min_pixels = c.data.video_max_pixels = 84 * 84
  # Demo prompts are 448-515 tokens (COGMAP template + 18 video tokens): ~10% of batches use the
  # 1024 bucket, so each jitted function compiles once per bucket (2).
  c.data.prompt_buckets = (512, 1024)
  c.data.batch_size = 4  # Prompts per step (SFT rows; GRPO rows = 4 x G).
  c.grpo.num_generations = 4
  # No KL term: the reference policy is the model before training (here the random init, not the SFT
  # checkpoint), and k3 towards it pushed every sampled token down (KL ~5.4 nats per token).
  c.grpo.beta = 0.0
  c.sampling.max_new_tokens = 176  # Templated traces + <|im_end|>: 108-182 tokens, 99% <= 167.
  # SpaceR rewards 320-512-token correct answers out of 1024; the demo brackets its trace lengths.
  c.rewards.length_range = (120, 176)
  # SFT: cosine 6e-3 -> 0 over its 300 steps (a settled checkpoint); GRPO: its own cosine 6e-4 -> 0.
  c.optim.lr = 6e-3
  c.optim.rl_lr = 6e-4
  # Held-out evaluation of the SFT and final checkpoints: 4 completions per question sampled as the
  # rollouts are (the verdict), and greedy decoding (reported; a 0.3M-parameter model's greedy
  # output loops and flips between nearby checkpoints).
  c.demo = ml_collections.ConfigDict(dict(eval_max_items=0, eval_batch_size=32, eval_samples=4,
                                          eval_greedy=True))
  c.post_train = "spacer_jax.demo:finish"  # held-out evaluation, plot and summary after training
  return c


def sweep(add):
  for lr in (5e-7, 1e-6, 2e-6):
    add(**{"optim.lr": lr})

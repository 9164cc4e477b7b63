"""The SpaceR ablation: SG-RLVR against its components removed, one arm each (spacer_jax.sweep).

Run sheet
  Command (the demo scale on CPU; 7 arms x 3 seeds = 21 demo runs):
    python -m spacer_jax.sweep --config=configs/ablation.py --seeds=3 --baseline=sgrlvr \
      --out=experiments/YYYY-MM-DD_ablation --parallel=2
  Arguments (after the colon): those of configs/sgrlvr.py, default `demo` (the CPU demo recipe);
    e.g. `configs/ablation.py:smoke` (2 tiny steps per arm, to try the command) or
    `configs/ablation.py:size=7b` (the same arms on the real recipe; set its data and checkpoint
    paths with --config.x=... after the sweep's own flags, they apply to every arm).
  Arms (`sweep` below; each arm is the base config plus these overrides):
    sgrlvr        the recipe as is: map prompt and reward, temporal and length bonuses (the demo
                  recipe has no KL term, beta 0; the full recipe has beta 0.04).
    grpo          plain GRPO: no cognitive-map prompt or reward, no temporal or length bonus; the
                  same switches as configs/grpo.py (a test checks they match).
    no_temporal   without the shuffled-frame temporal bonus (and without its G/2 extra samples).
    no_length     without the length bonus.
    kl            the KL penalty at the paper's strength, beta 0.04 (k3 towards the initial model),
                  where the base recipe has none (the demo); on a base recipe that already has a
                  KL term (the full recipe) this arm is `beta0` instead: no KL term, no reference.
    sft_only      SFT for all total_steps (mode=sft), same steps, data and schedule, no RL: does RL
                  add anything over more SFT? The demo's held-out evaluation still scores the
                  checkpoint at sft_warmup_steps (the other arms' RL start) and the last one.
    drgrpo        Dr. GRPO: advantages not divided by the group std, and the loss summed over tokens
                  and divided by (rows x max completion length). Chosen over clip-higher: with one
                  optimizer step per rollout batch (num_iterations = 1) the PPO ratio is identically
                  1, so clipping, and clip-higher with it, never binds.
  Expected: SpaceR reports SG-RLVR (map reward) above plain GRPO on VSI-Bench; the direction of each
    component at demo scale is what the sweep measures (some differences may not be detectable).
  Cost: each arm is one demo run (see the README's demo section), but arms that change only RL
    settings (no_temporal, no_length, kl/beta0, drgrpo) start from the sgrlvr run's SFT checkpoint
    of their seed (spacer_jax.sweep shares the SFT phase): they cost the RL phase only. grpo (other
    prompts) and sft_only (another schedule) are full runs.
"""

import os

from spacer_jax import config_lib

_SGRLVR = config_lib.load_config_module(os.path.join(os.path.dirname(__file__), "sgrlvr.py"))

# Plain GRPO = the switches configs/grpo.py sets on top of the shared recipe.
PLAIN_GRPO = {"data.use_cogmap_prompt": False, "rewards.use_map": False,
              "rewards.use_non_sr_map_fix": True, "rewards.use_temporal": False,
              "rewards.use_length": False}


def get_config(arg=None):
  return _SGRLVR.get_config(arg or "demo")


# The KL strength SpaceR trains with (k3 estimator towards the initial model).
PAPER_BETA = 0.04


def sweep(add, config=None):
  """The arms; `config` is the base config (spacer_jax.sweep passes it): the KL arm toggles beta."""
  add(name="sgrlvr")
  add(name="grpo", **PLAIN_GRPO)
  add(name="no_temporal", **{"rewards.use_temporal": False})
  add(name="no_length", **{"rewards.use_length": False})
  if config is not None and config.grpo.beta > 0:
    add(name="beta0", **{"grpo.beta": 0.0})
  else:
    add(name="kl", **{"grpo.beta": PAPER_BETA})
  add(name="sft_only", mode="sft")
  add(name="drgrpo", **{"grpo.reward_scaling": "none",
                        "grpo.loss_agg": "seq_mean_token_sum_norm"})

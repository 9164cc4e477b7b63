"""GRPO train-step benchmark: spacer_jax vs transformers (torch) on the same weights and machine.

One GRPO step = reference log-probs (forward, no grad) + policy forward/backward + GRPO loss (k3 KL,
beta 0.04) + AdamW update, on G=8 completions of 128 tokens after one 16-frame video prompt, with a
~50M-parameter Qwen2.5-VL config saved with save_hf and loaded by both frameworks.

  ours:   train.token_logps (reference) + train.train_step (jitted, donated state): the vision tower
          and the prompt run once per prompt and are reused by the 8 completions.
  theirs: what the PyTorch SpaceR/Video-R1 trainer does: the prompt inputs, pixel values included,
          repeated G times; `model(...)` for the reference under no_grad, then for the policy; loss
          as SG_RLVR_trainer.py; backward; torch.optim.AdamW step.
Timings are interleaved (ours, theirs, ...); medians after one
warm-up (compiling) call. Both in float32. The printed loss of both steps should agree (same
weights, same positions via text_after_vision="hf5").

  python experiments/bench_train_step.py                    # ~50M params, 16 frames, G=8 x 128
  python experiments/bench_train_step.py --repeats=5 --size=112

Measured 2026-11-26 on the 2-core machine (jax 0.10.2, torch 2.13 with its default 2 threads):
  nothing else running (load 1.4): ours 9.28 s, theirs 11.22 s (medians of 3) -> 1.21x
  machine saturated by other jobs: ours 24.7 s, theirs 69.7 s -> 2.8x, an artifact: torch's 2-thread
  OpenMP collapses when another process holds a core, so interleaving does not make load hit both alike.
On an idle CPU the step is close to parity: sharing the vision tower and prompt across the G rows saves
work, and XLA:CPU's backward is slower than torch's (docs/performance.md, "Training step": fp32
forward+backward 4.2-4.6 s vs 3.6-3.7 s for the text model alone).
"""

import argparse
import functools
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from spacer_jax import grpo, optim, rollout, sampling, train, tree_utils
from spacer_jax.models import qwen2_5_vl


def _parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--size", type=int, default=112, help="frame height = width in pixels (x28)")
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--vision_hidden", type=int, default=384)
  p.add_argument("--vision_depth", type=int, default=8)
  p.add_argument("--generations", type=int, default=8)
  p.add_argument("--completion", type=int, default=128)
  p.add_argument("--text_tokens", type=int, default=48)
  p.add_argument("--repeats", type=int, default=3)
  return p.parse_args()


def _config(a):
  v = a.vocab
  return qwen2_5_vl.tiny(
      vocab_size=v, hidden_size=a.hidden, intermediate_size=3 * a.hidden,
      num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=2,
      mrope_section=(8, 12, 12), vision_depth=a.vision_depth, vision_hidden_size=a.vision_hidden,
      vision_num_heads=a.vision_hidden // 64, vision_intermediate_size=8 * a.vision_hidden // 3,
      window_size=112, fullatt_block_indexes=(a.vision_depth // 2 - 1, a.vision_depth - 1),
      tie_word_embeddings=True, image_token_id=v - 6, video_token_id=v - 5,
      vision_start_token_id=v - 4, vision_end_token_id=v - 3, bos_token_id=v - 2,
      eos_token_id=(v - 1,), pad_token_id=v - 2, text_after_vision="hf5")


def main():
  a = _parse()
  cfg = _config(a)
  g, tc = a.generations, a.completion
  rng = np.random.default_rng(0)
  grid = np.array([[a.frames // 2, a.size // 14, a.size // 14]])
  n_vid = int(grid.prod()) // 4
  half = a.text_tokens // 2
  prompt = np.concatenate([rng.integers(0, cfg.vocab_size - 8, half), [cfg.vision_start_token_id],
                           np.full(n_vid, cfg.video_token_id), [cfg.vision_end_token_id],
                           rng.integers(0, cfg.vocab_size - 8, half)])[None].astype(np.int64)
  mask = np.ones_like(prompt, bool)
  pixels = rng.normal(size=(int(grid.prod()), 1176)).astype(np.float32)
  completions = rng.integers(0, cfg.vocab_size - 8, (g, tc)).astype(np.int32)
  lengths = rng.integers(tc // 2, tc + 1, g)
  advantages = rng.normal(size=g).astype(np.float32)

  # -- ours ---------------------------------------------------------------------------------------
  model = qwen2_5_vl.Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))
  graphdef, flat, paths = tree_utils.split_model(model)
  n_params = tree_utils.param_count(flat)
  sampler = sampling.Sampler(model)
  prepared = sampler.prepare(prompt, mask, pixel_values_videos=pixels, video_grid_thw=grid,
                             second_per_grid_ts=np.ones(1))
  tb = rollout.assemble(prepared, completions, lengths, g)
  tb["advantages"] = advantages
  tb = jax.device_put(tb)
  keys = optim.trainable_keys(flat)
  tx, _ = optim.make_optimizer({k: flat[k] for k in keys}, lr=1e-6, total_steps=100)
  logps_fn = jax.jit(functools.partial(train.token_logps, graphdef=graphdef, paths=paths))
  step_fn = jax.jit(functools.partial(train.train_step, graphdef=graphdef, paths=paths, tx=tx,
                                      trainable_keys=tuple(keys), mode="grpo",
                                      grpo_config=grpo.GRPOConfig()), donate_argnums=(0,))
  ref_params = jax.tree.map(jnp.copy, flat)
  state = {"step": jnp.zeros((), jnp.int32), "params": jax.tree.map(jnp.copy, flat),
           "opt_state": tx.init({k: flat[k] for k in keys}), "rng": jax.random.PRNGKey(0)}

  def ours():
    nonlocal state
    ref = logps_fn(ref_params, tb)
    state, m = step_fn(state, tb, ref)
    return float(jax.block_until_ready(m["loss"]))

  # -- theirs -------------------------------------------------------------------------------------
  with tempfile.TemporaryDirectory() as d:
    qwen2_5_vl.save_hf(model, d)
    policy = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        d, dtype=torch.float32, attn_implementation="sdpa")
    ref_model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        d, dtype=torch.float32, attn_implementation="sdpa")
  ref_model.eval()
  policy.train()
  opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.01)
  tp = prompt.shape[1]
  ids_t = torch.from_numpy(np.concatenate([np.repeat(prompt, g, 0), completions], 1))
  cmask = torch.from_numpy((np.arange(tc)[None] < lengths[:, None]).astype(np.int64))
  attn_t = torch.cat([torch.ones(g, tp, dtype=torch.int64), cmask], 1)
  # The reference trainer repeats the prompt inputs, pixel values included, G times.
  pix_t = torch.from_numpy(np.tile(pixels, (g, 1)))
  grid_t = torch.from_numpy(np.repeat(grid, g, 0))
  adv_t = torch.from_numpy(advantages)[:, None]

  def logps_torch(m):
    logits = m(input_ids=ids_t, attention_mask=attn_t, pixel_values_videos=pix_t,
               video_grid_thw=grid_t).logits[:, tp - 1:-1].float()
    return torch.gather(logits.log_softmax(-1), 2, ids_t[:, tp:, None].long())[..., 0]

  def theirs():
    with torch.no_grad():
      ref = logps_torch(ref_model)
    logp = logps_torch(policy)
    x = torch.clamp(ref - logp, -10, 10)
    kl = torch.exp(x) - x - 1
    per_token = -(torch.exp(logp - logp.detach()) * adv_t - 0.04 * kl)
    loss = ((per_token * cmask).sum(1) / cmask.sum(1)).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 5.0)
    opt.step()
    return float(loss.detach())

  print(f"config: {n_params / 1e6:.1f}M params, {a.frames} frames {a.size}x{a.size} "
        f"({n_vid} visual tokens), prompt {tp} tokens, G={g} x {tc} completion tokens; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  t0 = time.perf_counter()
  l_ours = ours()
  print(f"ours: first call (compile) {time.perf_counter() - t0:.1f}s, loss {l_ours:.6f}")
  t0 = time.perf_counter()
  l_theirs = theirs()
  print(f"theirs: first call {time.perf_counter() - t0:.1f}s, loss {l_theirs:.6f} "
        f"(|diff| {abs(l_ours - l_theirs):.2e})")
  t_ours, t_theirs = [], []
  for _ in range(a.repeats):
    t0 = time.perf_counter()
    ours()
    t_ours.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    theirs()
    t_theirs.append(time.perf_counter() - t0)
  mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
  print(f"ours   (spacer_jax, jitted): median {mo:.2f}s  {['%.2f' % t for t in t_ours]}")
  print(f"theirs (transformers/torch): median {mt:.2f}s  {['%.2f' % t for t in t_theirs]}")
  print(f"ratio theirs/ours = {mt / mo:.2f}x")


if __name__ == "__main__":
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  main()

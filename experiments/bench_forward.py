"""Forward-pass benchmark: spacer_jax Qwen2.5-VL vs transformers on the same weights and machine.

A randomly initialised small config (set by flags) is saved with save_hf, loaded into both
frameworks, and run on one 16-frame video prompt (vision tower + text decoder, fp32 logits).
The timings are interleaved (ours, theirs, ours, ...); medians are printed with the ratio. Our
time is the convenience `model(...)` call, so it includes the host-side index code (get_rope_index,
window indices), as HF's forward does; the jitted device part alone is printed too. The first
(compiling) call is excluded.

  python experiments/bench_forward.py                       # defaults: small config, 16 frames
  python experiments/bench_forward.py --frames=16 --size=224 --hidden=512 --layers=8 --repeats=5

Measured 2026-11-26 on the 2-core machine (defaults), idle (load 1.6): ours 65.9 ms, transformers
64.9 ms -> 0.99x (another idle run 0.85x); the forward is at parity on CPU. With other jobs holding
a core an earlier run gave 405 ms vs 4,885 ms (12.1x): torch's 2-thread OpenMP collapses under
contention, so that ratio says nothing about the code.
"""

import argparse
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

from spacer_jax.models import positions
from spacer_jax.models import qwen2_5_vl


def _parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--size", type=int, default=168, help="frame height = width in pixels (x28)")
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--vision_hidden", type=int, default=128)
  p.add_argument("--vision_depth", type=int, default=4)
  p.add_argument("--text_tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=5)
  return p.parse_args()


def main():
  a = _parse()
  cfg = qwen2_5_vl.tiny(
      vocab_size=1024, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
      num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=2,
      mrope_section=(8, 12, 12), vision_depth=a.vision_depth, vision_hidden_size=a.vision_hidden,
      vision_num_heads=a.vision_hidden // 64, vision_intermediate_size=4 * a.vision_hidden,
      window_size=112, fullatt_block_indexes=(a.vision_depth - 1,),
      image_token_id=1000, video_token_id=1001, vision_start_token_id=1002,
      vision_end_token_id=1003, bos_token_id=1004, eos_token_id=(1005,), pad_token_id=1004,
      text_after_vision="hf5")  # same positions as transformers 5.x
  grid = np.array([[a.frames // 2, a.size // 14, a.size // 14]])
  n_vid = int(grid.prod()) // 4
  rng = np.random.default_rng(0)
  half = a.text_tokens // 2
  ids = np.concatenate([rng.integers(0, 1000, half), [cfg.vision_start_token_id],
                        np.full(n_vid, cfg.video_token_id), [cfg.vision_end_token_id],
                        rng.integers(0, 1000, half)])[None]
  pix = rng.normal(size=(int(grid.prod()), 1176)).astype(np.float32)
  seconds = np.array([1.0], np.float32)

  with tempfile.TemporaryDirectory() as d:
    qwen2_5_vl.save_hf(qwen2_5_vl.init_model(cfg, seed=0), d)
    ours = qwen2_5_vl.load_hf(d, dtype=jnp.float32, text_after_vision="hf5")
    theirs = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        d, attn_implementation="sdpa").eval()

  kw = dict(pixel_values_videos=pix, video_grid_thw=grid, second_per_grid_ts=seconds)
  t_kw = dict(input_ids=torch.as_tensor(ids), pixel_values_videos=torch.as_tensor(pix),
              video_grid_thw=torch.as_tensor(grid), second_per_grid_ts=torch.as_tensor(seconds),
              mm_token_type_ids=torch.as_tensor((ids == cfg.video_token_id) * 2))

  def run_ours():
    return np.asarray(jax.block_until_ready(ours(ids, **kw)))

  def run_theirs():
    with torch.no_grad():
      return theirs(**t_kw).logits.numpy()

  # Device part only: index arrays prepared once on the host.
  vis = qwen2_5_vl.prepare_vision_inputs(cfg, grid)
  pos, _ = positions.get_rope_index(ids, None, None, grid, seconds,
                                    image_token_id=cfg.image_token_id,
                                    video_token_id=cfg.video_token_id, text_after_vision="hf5")
  graphdef, state = nnx.split(ours)

  @jax.jit
  def device_forward(state, ids, pos, pix, vis):
    model = nnx.merge(graphdef, state)
    feats = model.get_vision_features(pix, vis)
    hidden, _ = model.forward_embeds(model.embed(ids, video_features=feats), pos,
                                     jnp.ones(ids.shape, bool))
    return model.logits(hidden)

  def run_device():
    return jax.block_until_ready(device_forward(state, ids, pos.astype(np.int32), pix, vis))

  diff = np.abs(run_ours() - run_theirs()).max()  # also the compile / warm-up call
  run_device()
  times = {"ours": [], "transformers": [], "ours_device": []}
  for _ in range(a.repeats):
    for name, fn in (("ours", run_ours), ("transformers", run_theirs),
                     ("ours_device", run_device)):
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f"backend={jax.default_backend()} devices={jax.device_count()} cpus={os.cpu_count()} "
        f"torch_threads={torch.get_num_threads()}")
  print(f"config: hidden={a.hidden} layers={a.layers} vision_hidden={a.vision_hidden} "
        f"vision_depth={a.vision_depth}; video {a.frames} frames {a.size}x{a.size} -> "
        f"{int(grid.prod())} patches, {n_vid} video tokens, sequence {ids.shape[1]}")
  print(f"max |logits diff| vs transformers: {diff:.2e}")
  for k, v in med.items():
    print(f"{k:>13}: median {v * 1e3:8.1f} ms over {a.repeats} (min {min(times[k]) * 1e3:.1f})")
  print(f"ratio transformers / ours = {med['transformers'] / med['ours']:.2f}x "
        f"(device part only: {med['transformers'] / med['ours_device']:.2f}x)")


if __name__ == "__main__":
  main()

"""What multi-process support costs a single-process run (8 simulated CPU devices, one process).

Two changes reach the single-process path:

  pixels   the sampler and the trainer now place the pixel rows sharded over the batch axes (in a
           multi-process job each process's block then stays on its own devices) where they used to
           be replicated on every device. Timed in one process, interleaved: one GRPO rollout
           (prefill + decode, G samples) and one train step (reference log-probs + train_step) with
           the pixels sharded (new) and replicated (old), on the same weights and batch.
  gloo     a one-process CPU run with several devices joins a one-process jax.distributed runtime,
           so XLA's CPU collectives go through gloo (the order a multi-process CPU job sums in; runs
           are then bit-equal across process layouts). The collectives are fixed when the backend
           starts, so this part alternates child processes: `--distributed=auto` (gloo) and
           `--distributed=off` (XLA's in-process collectives), each timing the new rollout and step.

Prints medians and new/old ratios (> 1 = the change is slower). A CPU-only measurement: on GPUs and
TPUs the collectives are NCCL / ICI whatever the process layout, and a pixel all-gather moves ~19 MB
per SpaceR prompt over the interconnect.

  python experiments/bench_multihost.py                  # both parts
  python experiments/bench_multihost.py --part=pixels --repeats=7

Measured 2026-12-04 on the shared 2-core machine (load average 8-14 from other jobs; interleaved, so
load hits both sides alike), 7.0M-parameter model, 8 prompts x (8 frames of 112x112:
2,048 pixel rows) x G=4 x 32 tokens, 8 CPU devices:
  pixels (--repeats=5):  rollout 2441.7 ms sharded vs 2454.0 ms replicated -> 0.995
                         step    8072.6 ms sharded vs 8314.6 ms replicated -> 0.971
                         (no measurable cost: the per-pair ratios straddle 1)
  gloo (--repeats=3 --children=2):
                         rollout 10766.8 ms gloo vs 2496.7 ms in-process -> 4.31
                         step    22664.9 ms gloo vs 15815.8 ms in-process -> 1.43
  The rollout's decode loop runs collectives at every token, and gloo sends them through localhost
  TCP where XLA's in-process collectives copy memory: a one-process CPU run with simulated
  devices pays this for layout-independent numbers; --distributed=off opts out. One CPU device (the
  demo, the CLI tests) and GPUs/TPUs are not affected.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

if "--child" not in sys.argv:
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--part", choices=("pixels", "gloo", "both"), default="both")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--children", type=int, default=3, help="child processes per collectives mode")
  p.add_argument("--prompts", type=int, default=8)
  p.add_argument("--generations", type=int, default=4)
  p.add_argument("--completion", type=int, default=32)
  p.add_argument("--frames", type=int, default=8)
  p.add_argument("--size", type=int, default=112)
  p.add_argument("--child", choices=("auto", "off"), default=None, help=argparse.SUPPRESS)
  return p.parse_args()


def _setup(a, jax, np):
  """A ~10M-parameter model on an 8-device FSDP mesh, a prepared batch of `prompts` videos and
  the jitted rollout / train step (the trainer's own functions)."""
  from spacer_jax import config_lib, grpo, modeling, rollout, sampling, sharding, train
  from spacer_jax.models import qwen2_5_vl
  v = 4096
  cfg = qwen2_5_vl.tiny(
      vocab_size=v, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, mrope_section=(8, 12, 12), vision_depth=4,
      vision_hidden_size=192, vision_num_heads=3, vision_intermediate_size=512, window_size=112,
      fullatt_block_indexes=(1, 3), tie_word_embeddings=True, image_token_id=v - 6,
      video_token_id=v - 5, vision_start_token_id=v - 4, vision_end_token_id=v - 3,
      bos_token_id=v - 2, eos_token_id=(v - 1,), pad_token_id=v - 2)
  mesh = sharding.make_mesh(config_lib.MESH_FSDP)
  rules = config_lib.FSDP_RULES
  abstract = modeling.abstract_model(cfg, mesh=mesh, rules=rules)
  params = modeling.load_params(modeling.RANDOM, abstract)
  rng = np.random.default_rng(0)
  grid = np.array([a.frames // 2, a.size // 14, a.size // 14])
  n_vid = int(grid.prod()) // 4
  prompt = np.concatenate([rng.integers(0, v - 8, 24), [cfg.vision_start_token_id],
                           np.full(n_vid, cfg.video_token_id), [cfg.vision_end_token_id],
                           rng.integers(0, v - 8, 24)]).astype(np.int32)
  b = a.prompts
  ids = np.tile(prompt, (b, 1))
  pixels = rng.normal(size=(b * int(grid.prod()), 1176)).astype(np.float32)
  vision = dict(pixel_values_videos=pixels, video_grid_thw=np.tile(grid, (b, 1)),
                second_per_grid_ts=np.ones(b, np.float32))
  sampler = sampling.Sampler(abstract.merge(params), temperature=1.0, top_k=50, mesh=mesh,
                             vision_budget="auto", stop_ids=())
  prepared = sampler.prepare(ids, np.ones_like(ids, bool), **vision)
  phases = train.Phases("grpo", 100, 0, a.generations, 1)
  config = config_lib.base_config("7b")
  setup = train.make_train_setup(config, abstract, phases)
  state = train.init_state(params, setup, 0)
  ref_params = jax.tree.map(lambda x: x.copy(), params)
  logps_fn = train.make_logps_fn(abstract, 1)
  fns = {}

  def rollout_fn():
    state_s = sampler.prefill(prepared, max_new_tokens=a.completion, num_samples=a.generations,
                              rng=jax.random.key(1), params=abstract.state(state["params"]))
    state_s = sampler.decode(state_s, params=abstract.state(state["params"]))
    return np.asarray(state_s.tokens), np.asarray(state_s.lengths)

  tokens, lengths = rollout_fn()
  tb = rollout.assemble(prepared, tokens, lengths, a.generations)
  tb["advantages"] = rng.normal(size=len(tokens)).astype(np.float32)

  def step_fn(replicate_pixels):
    nonlocal state
    shardings = train.batch_shardings(tb, mesh, rules)
    if replicate_pixels:
      shardings["pixel_values_videos"] = sharding.replicated(mesh)
    batch = jax.device_put(tb, shardings)
    ref = logps_fn(ref_params, batch)
    key = bool(replicate_pixels)
    if key not in fns:
      fns[key] = train.make_train_step(
          abstract, setup, mode="grpo", grpo_config=grpo.GRPOConfig(), num_micro=1,
          batch_shardings_=shardings, ref_shardings=ref.sharding)
    state, m = fns[key](state, batch, ref)
    return float(jax.block_until_ready(m["loss"]))

  replicated = sampling.Sampler(abstract.merge(params), temperature=1.0, top_k=50, mesh=mesh,
                                vision_budget="auto", stop_ids=())
  replicated._pixel_sharding = lambda rows: sharding.replicated(mesh)  # pylint: disable=protected-access

  def rollout_old():
    state_s = replicated.prefill(prepared, max_new_tokens=a.completion,
                                 num_samples=a.generations, rng=jax.random.key(1),
                                 params=abstract.state(state["params"]))
    state_s = replicated.decode(state_s, params=abstract.state(state["params"]))
    return np.asarray(state_s.tokens)

  n = int(abstract.param_count)
  return dict(rollout_new=rollout_fn, rollout_old=rollout_old,
              step_new=functools.partial(step_fn, False), step_old=functools.partial(step_fn, True),
              params=n, pixels=pixels.shape)


def _time(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _pixels_part(a):
  import jax
  import numpy as np
  s = _setup(a, jax, np)
  print(f"model {s['params'] / 1e6:.1f}M params, pixels {s['pixels']}, {a.prompts} prompts x "
        f"G={a.generations} x {a.completion} tokens, {jax.device_count()} CPU devices")
  for name in ("rollout", "step"):
    new, old = s[f"{name}_new"], s[f"{name}_old"]
    new(), old()  # compile
    t_new, t_old = [], []
    for _ in range(a.repeats):
      t_new.append(_time(new))
      t_old.append(_time(old))
    mn, mo = statistics.median(t_new), statistics.median(t_old)
    print(f"{name:8s} pixels sharded {mn * 1e3:8.1f} ms  replicated {mo * 1e3:8.1f} ms  "
          f"ratio {mn / mo:.3f}  (per-pair ratios {[round(x / y, 3) for x, y in zip(t_new, t_old)]})")


def _child(a):
  from spacer_jax import distributed
  distributed.initialize(mode=a.child)
  import jax
  import numpy as np
  s = _setup(a, jax, np)
  s["rollout_new"](), s["step_new"]()  # compile
  out = {"rollout": [_time(s["rollout_new"]) for _ in range(a.repeats)],
         "step": [_time(s["step_new"]) for _ in range(a.repeats)]}
  print("RESULT " + json.dumps(out))


def _gloo_part(a):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  results = {"auto": {"rollout": [], "step": []}, "off": {"rollout": [], "step": []}}
  for _ in range(a.children):
    for mode in ("auto", "off"):
      args = [sys.executable, __file__, f"--child={mode}", f"--repeats={a.repeats}",
              f"--prompts={a.prompts}", f"--generations={a.generations}",
              f"--completion={a.completion}", f"--frames={a.frames}", f"--size={a.size}"]
      out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
      res = json.loads(out.split("RESULT ", 1)[1])
      for k in res:
        results[mode][k].append(statistics.median(res[k]))
  for k in ("rollout", "step"):
    g, o = statistics.median(results["auto"][k]), statistics.median(results["off"][k])
    print(f"{k:8s} gloo {g * 1e3:8.1f} ms  in-process {o * 1e3:8.1f} ms  ratio {g / o:.3f}  "
          f"(child medians gloo {[round(x * 1e3) for x in results['auto'][k]]}, "
          f"in-process {[round(x * 1e3) for x in results['off'][k]]})")


def main():
  a = _parse()
  if a.child:
    return _child(a)
  print("load average", os.getloadavg())
  if a.part in ("pixels", "both"):
    _pixels_part(a)
  if a.part in ("gloo", "both"):
    _gloo_part(a)
  print("load average", os.getloadavg())


if __name__ == "__main__":
  main()

"""One-GPU check of the 3B recipe with random weights: rollout decode vs the HBM bound, train MFU,
planner memory vs the real peak.

  python experiments/2026-12-04_h200/gpu_check.py --out=DIR            # real 3B shapes, one GPU
  python experiments/2026-12-04_h200/gpu_check.py --out=DIR --tiny     # tiny model, CPU, < 2 min

Everything goes through the project's own code: `modeling.abstract_model` / `load_params("random")`,
`train.make_train_setup` / `init_state` / `make_train_step` / `make_logps_fn`, `rollout.assemble`,
`sampling.Sampler` (prefill once per prompt, KV-cache decode loop), `configs/sgrlvr.py:size=3b` for
the recipe settings (bf16 compute, fp32 master weights and Adam moments, bf16 reference policy, G=8,
T=1.0 / top-p 0.95 / top-k 50). The architecture is `qwen2_5_vl.qwen2p5_vl_3b()` (the HF config of
Qwen2.5-VL-3B-Instruct; no checkpoint is read). Prompts are what the data pipeline makes of a
480x640 (ScanNet) clip at the recipe's 16 frames and 128*28*28 pixels per frame, plus a text
allowance, left-padded to the recipe's prompt bucket.

Sections (each guarded; the JSON is rewritten after each, so a timeout keeps what was measured):
  decode_bf16  rollout of 8 prompts x G=8 = 64 rows, max_new_tokens fixed (no stop ids), params
               cast to bf16: tokens/s vs the HBM bound. Bound per decode step = bytes that must be
               read (text weights once, incl. the tied head; the prompt k/v once per prompt; the
               generated k/v at the current length) / bandwidth, summed over the steps.
  train        one GRPO train step (train.make_train_step, the recipe's shapes per GPU: 1 prompt x
               G=8 rows x (prompt bucket + 1024) tokens; --train_prompts / --grad_accum change it),
               AOT-compiled once; memory_analysis (the planner's figure: argument + output + temp -
               alias) vs memory_stats peak after running it; XLA cost_analysis FLOPs and the
               analytic 6*N*tokens (+ causal attention, vision) model FLOPs; MFU vs the spec and
               the measured bf16 peak.
  ref_logps    the reference policy's log-probs (bf16 params) on the same batch: the other half of
               the train phase; phase MFU.
  decode_fp32  the rollout as the trainer runs it today: the fp32 master weights go to the sampler.
Results: {out}/gpu_check.json and {out}/gpu_check.log.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GIB = 1024 ** 3


def _parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--tiny", action="store_true", help="tiny model and shapes (CPU smoke test)")
  p.add_argument("--sections", default="decode_bf16,train,ref_logps,decode_fp32")
  p.add_argument("--decode_prompts", type=int, default=8)
  p.add_argument("--generations", type=int, default=0, help="G (0 = the config's, 8)")
  p.add_argument("--new_tokens", type=int, default=256, help="decode steps (no early stop)")
  p.add_argument("--decode_reps", type=int, default=3)
  p.add_argument("--text_tokens", type=int, default=512, help="text tokens per prompt besides video")
  p.add_argument("--video_hw", default="480,640", help="source clip height,width")
  p.add_argument("--train_prompts", type=int, default=1, help="prompts per train step (x G rows)")
  p.add_argument("--completion", type=int, default=0, help="completion tokens (0 = config's, 1024)")
  p.add_argument("--grad_accum", type=int, default=1)
  p.add_argument("--train_steps", type=int, default=3, help="timed steps after the compiling one")
  p.add_argument("--peak_flops", type=float, default=989e12, help="spec dense bf16 FLOP/s")
  p.add_argument("--measured_flops", type=float, default=790e12, help="measured bf16 matmul FLOP/s")
  p.add_argument("--hbm_bw", type=float, default=4.8e12, help="spec HBM bytes/s")
  p.add_argument("--measured_bw", type=float, default=4.3e12, help="measured device copy bytes/s")
  p.add_argument("--check_carried", default="",
                 help="a --target directory of carried wheels (e.g. /tmp/site): before jax starts, "
                      "a CPU subprocess checks that its flax/optax work with this jax; if not, they "
                      "are moved aside and the machine's own versions are used (recorded)")
  return p.parse_args()


ARGS = _parse()
os.makedirs(ARGS.out, exist_ok=True)
JSON_PATH = os.path.join(ARGS.out, "gpu_check.json")
LOG_PATH = os.path.join(ARGS.out, "gpu_check.log")
RESULTS = {"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "sections": {}}
T_START = time.perf_counter()


def log(msg):
  line = f"[{time.perf_counter() - T_START:7.1f}s] {msg}"
  print(line, flush=True)
  with open(LOG_PATH, "a") as f:
    f.write(line + "\n")


def save():
  RESULTS["elapsed_s"] = round(time.perf_counter() - T_START, 1)
  tmp = JSON_PATH + ".tmp"
  with open(tmp, "w") as f:
    json.dump(RESULTS, f, indent=1, default=str)
  os.replace(tmp, JSON_PATH)


# ------------------------------------------------------------------------------------------------
# Carried wheels: keep them only if they work with this jax (checked on CPU, before jax starts here).
_PROBE = """
import jax, jax.numpy as jnp, flax, optax
from flax import nnx
m = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
g, s = nnx.split(m)
y = jax.jit(lambda s, x: nnx.merge(g, s)(x))(s, jnp.ones((1, 3)))
a = nnx.eval_shape(lambda: nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
tx = optax.adamw(1e-3)
p = {"w": jnp.ones((2,))}
u, _ = jax.jit(tx.update)(p, tx.init(p), p)
from spacer_jax import train, sampling, modeling, config_lib
print("probe ok: jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)
"""


def check_carried(site):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = {}
  for attempt in ("carried", "device"):
    r = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       timeout=180)
    out[attempt] = (r.stdout + r.stderr).strip()[-2000:]
    if r.returncode == 0:
      out["using"] = attempt
      return out
    if attempt == "carried":  # move the carried flax/optax aside, fall back to the machine's
      for name in os.listdir(site):
        if name.split("-")[0] in ("flax", "optax") and (
            name in ("flax", "optax") or name.endswith(".dist-info")):
          os.rename(os.path.join(site, name), os.path.join(site, name + ".disabled"))
  out["using"] = "failed"
  return out


if ARGS.check_carried:
  RESULTS["carried_check"] = check_carried(ARGS.check_carried)
  save()

# ------------------------------------------------------------------------------------------------
import jax  # noqa: E402  (after the environment and the carried-wheel check)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from spacer_jax import config_lib, modeling, rollout, sampling, sharding, train  # noqa: E402
from spacer_jax.models import qwen2_5_vl  # noqa: E402


def section(name):
  """Decorator: runs a section, records its dict or its error, saves the JSON."""
  def wrap(fn):
    def run(*a, **k):
      if name not in ARGS.sections.split(","):
        return None
      log(f"== {name}")
      rec = RESULTS["sections"].setdefault(name, {})
      t0 = time.perf_counter()
      try:
        out = fn(rec, *a, **k)
        rec["ok"] = True
        return out
      except Exception as e:  # pylint: disable=broad-except
        rec["ok"] = False
        rec["error"] = f"{type(e).__name__}: {e}"[:4000]
        rec["traceback"] = traceback.format_exc()[-6000:]
        log(f"{name} FAILED: {type(e).__name__}: {str(e)[:2000]}")
        return None
      finally:
        rec["section_s"] = round(time.perf_counter() - t0, 1)
        rec["memory"] = memory()
        save()
    return run
  return wrap


def memory():
  try:
    s = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (CPU backends may not have it)
    s = {}
  return {k: int(s[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit",
                                  "largest_alloc_size", "num_allocs") if k in s}


def nbytes(tree):
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def timed(fn, reps):
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return ts


# ------------------------------------------------------------------------------------------------
# The recipe, its model and its prompts.


def smart_resize(h, w, factor, min_pixels, max_pixels):
  """qwen-vl-utils' smart_resize (the data pipeline's frame size)."""
  hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
  if hb * wb > max_pixels:
    beta = math.sqrt(h * w / max_pixels)
    hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
  elif hb * wb < min_pixels:
    beta = math.sqrt(min_pixels / (h * w))
    hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
  return hb, wb


def fast_random_params(abstract):
  """N(0, 0.02) weights (norm scales 1), one small jitted draw per distinct shape: timing and memory
  do not depend on the values. (modeling.load_params(RANDOM) took 300 s for the 3B model on the
  H200 in the first run of this script, which left no time for the measurements.)"""
  fns, out = {}, {}
  for i, (k, s) in enumerate(sorted(abstract.params.items())):
    key = (s.shape, str(s.dtype), str(s.sharding), "norm" in k and k.endswith("weight"))
    if key not in fns:
      ones = key[3]
      fns[key] = jax.jit(
          lambda seed, shape=s.shape, dtype=s.dtype, ones=ones: (
              jnp.ones(shape, dtype) if ones else
              (0.02 * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(dtype)),
          out_shardings=s.sharding)
    out[k] = fns[key](i)
  return out


def setup_recipe():
  cfg_mod = config_lib.load_config_module(os.path.join(
      os.path.dirname(__file__), "..", "..", "spacer_jax", "configs", "sgrlvr.py"))
  config = cfg_mod.get_config("size=3b")
  config.grad_accum_steps = ARGS.grad_accum
  if ARGS.generations:
    config.grpo.num_generations = ARGS.generations
  if ARGS.completion:
    config.sampling.max_new_tokens = ARGS.completion
  common = dict(use_remat=bool(config.model.use_remat),
                text_after_vision=config.model.text_after_vision)
  if ARGS.tiny:
    cfg = qwen2_5_vl.tiny(**common)
    config.sampling.max_new_tokens = ARGS.completion or 8
    frames, hw, text_tokens, buckets = 4, (56, 56), 16, (64, 128)
  else:
    cfg = qwen2_5_vl.qwen2p5_vl_3b(**common)
    frames = int(config.data.max_frames)
    hw = smart_resize(*(int(x) for x in ARGS.video_hw.split(",")),
                      cfg.patch_size * cfg.spatial_merge_size, config.data.video_min_pixels,
                      config.data.video_max_pixels)
    text_tokens, buckets = ARGS.text_tokens, tuple(config.data.prompt_buckets)
  grid = (-(-frames // cfg.temporal_patch_size), hw[0] // cfg.patch_size, hw[1] // cfg.patch_size)
  vid_tokens = math.prod(grid) // cfg.spatial_merge_size ** 2
  n_prompt = vid_tokens + 2 + text_tokens
  bucket = min(b for b in buckets if b >= n_prompt)
  mesh = sharding.make_mesh(config.mesh)
  rules = config_lib.sharding_rules(config)
  abstract = modeling.abstract_model(cfg, dtype=config.model.dtype,
                                     param_dtype=config.model.param_dtype, mesh=mesh, rules=rules)
  shapes = dict(video_grid=grid, frame_hw=hw, video_tokens=vid_tokens, text_tokens=text_tokens,
                prompt_tokens=n_prompt, prompt_bucket=bucket,
                generations=int(config.grpo.num_generations),
                completion=int(config.sampling.max_new_tokens))
  return config, cfg, mesh, rules, abstract, shapes


def prompts(cfg, shapes, b, seed=0):
  """b left-padded prompts (random text ids around one video span) and their video inputs."""
  rng = np.random.default_rng(seed)
  hi = min(cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.bos_token_id,
           cfg.pad_token_id, *cfg.eos_token_id)
  tp, n, half = shapes["prompt_bucket"], shapes["prompt_tokens"], shapes["text_tokens"] // 2
  ids = np.full((b, tp), cfg.pad_token_id, np.int32)
  mask = np.zeros((b, tp), np.int32)
  for i in range(b):
    text = rng.integers(1, hi, shapes["text_tokens"])
    row = np.concatenate([text[:half], [cfg.vision_start_token_id],
                          np.full(shapes["video_tokens"], cfg.video_token_id),
                          [cfg.vision_end_token_id], text[half:]])
    ids[i, tp - n:] = row
    mask[i, tp - n:] = 1
  grid = np.tile(np.asarray(shapes["video_grid"], np.int64), (b, 1))
  patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
  pixels = rng.normal(size=(b * math.prod(shapes["video_grid"]), patch_dim)).astype(np.float32)
  vision = dict(pixel_values_videos=pixels, video_grid_thw=grid,
                second_per_grid_ts=np.ones(b, np.float32))
  return ids, mask, vision


def make_sampler(abstract_like, config, mesh):
  # The trainer's sampler, except stop_ids=(): every row decodes all max_new_tokens.
  return sampling.Sampler(
      abstract_like.merge(), temperature=config.sampling.temperature, top_k=config.sampling.top_k,
      top_p=config.sampling.top_p, mesh=mesh, cache_dtype=abstract_like.dtype,
      vision_budget="auto", stop_ids=())


# ------------------------------------------------------------------------------------------------
# FLOPs and bytes by hand.


def _is_layer_matrix(k, v):
  return k.startswith("model.layers.") and len(v.shape) == 2


def analytic(cfg, abstract, *, rows, prompts_, tp, tc, patches_per_prompt, train):
  """Model FLOPs (matmuls only) of the train step (train=True: forward + backward = 3x forward)
  or of the reference forward: every row runs its prompt + completion through the decoder, the head
  only on the completion, the vision tower once per prompt. Causal attention = half of T^2."""
  n_layers = sum(math.prod(v.shape) for k, v in abstract.params.items() if _is_layer_matrix(k, v))
  n_vis = sum(math.prod(v.shape) for k, v in abstract.params.items()
              if k.startswith("visual.") and len(v.shape) >= 2)
  t = tp + tc
  attn_dim = cfg.num_attention_heads * cfg.head_dim
  fwd = dict(
      decoder=2.0 * n_layers * rows * t,
      attention=2.0 * 2 * cfg.num_hidden_layers * rows * t * t * attn_dim / 2,
      head=2.0 * cfg.hidden_size * cfg.vocab_size * rows * tc,
      vision=2.0 * n_vis * prompts_ * patches_per_prompt)
  mult = 3.0 if train else 1.0
  out = {k: v * mult for k, v in fwd.items()}
  out["total"] = sum(out.values())
  out["six_n_tokens"] = 6.0 * n_layers * rows * t if train else 2.0 * n_layers * rows * t
  out["decoder_matrix_params"] = n_layers
  out["vision_matrix_params"] = n_vis
  return out


def decode_bytes(cfg, abstract_like, *, prompts_, g, tp, n_new, cache_itemsize):
  """Bytes one rollout's decode steps must read: text weights once per step (a tied embedding is the
  head, read whole; an untied one is only gathered), the prompt k/v once per prompt, and each row's
  generated k/v at its current length."""
  w = 0
  for k, v in abstract_like.params.items():
    if k.startswith("visual."):
      continue
    if k == "model.embed_tokens.weight" and not cfg.tie_word_embeddings:
      continue
    w += math.prod(v.shape) * v.dtype.itemsize
  per_token_kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * cache_itemsize
  prefix = prompts_ * tp * per_token_kv
  rows = prompts_ * g
  # Step s (0-based) attends to the s tokens generated before it plus its own.
  suffix_total = rows * per_token_kv * sum(s + 1 for s in range(n_new))
  total = n_new * (w + prefix) + suffix_total
  return dict(weights_per_step=w, prefix_kv_per_step=prefix,
              suffix_kv_mean_per_step=suffix_total / n_new, total=total,
              # what the static-shape loop touches: the whole preallocated suffix every step
              suffix_kv_static_per_step=rows * per_token_kv * n_new)


# ------------------------------------------------------------------------------------------------
# Sections.


def decode(rec, params, abstract_like, config, cfg, mesh, shapes, label):
  b, g, n = ARGS.decode_prompts, shapes["generations"], ARGS.new_tokens
  if ARGS.tiny:
    b, n = min(b, 2), min(n, 8)
  ids, mask, vision = prompts(cfg, shapes, b)
  sampler = make_sampler(abstract_like, config, mesh)
  state_params = abstract_like.state(params)
  key = jax.random.key(0)
  with jax.set_mesh(mesh):
    prepared = sampler.prepare(ids, mask, **vision)
    times = {}

    def once():
      t0 = time.perf_counter()
      st = sampler.prefill(prepared, max_new_tokens=n, num_samples=g, rng=key, params=state_params)
      jax.block_until_ready(st.logits)
      t1 = time.perf_counter()
      st = sampler.decode(st, params=state_params)
      toks = jax.block_until_ready(st.tokens)
      t2 = time.perf_counter()
      times.setdefault("prefill", []).append(t1 - t0)
      times.setdefault("decode", []).append(t2 - t1)
      return st, toks

    t0 = time.perf_counter()
    st, toks = once()
    first = time.perf_counter() - t0
    log(f"{label}: first call (compile + run) {first:.1f}s")
    steps = int(st.step)
    del st
    times.clear()
    for _ in range(ARGS.decode_reps):
      once()
  rows = b * g
  pre, dec = statistics.median(times["prefill"]), statistics.median(times["decode"])
  cache_itemsize = jnp.dtype(abstract_like.dtype).itemsize
  by = decode_bytes(cfg, abstract_like, prompts_=b, g=g, tp=ids.shape[1], n_new=n,
                    cache_itemsize=cache_itemsize)
  tok_s = rows * n / dec
  rec.update(
      label=label, param_dtype=str(abstract_like.param_dtype), cache_dtype=str(abstract_like.dtype),
      prompts=b, generations=g, rows=rows, prompt_bucket=int(ids.shape[1]),
      prompt_tokens=shapes["prompt_tokens"], video_grid=shapes["video_grid"],
      new_tokens=n, steps_done=steps, distinct_tokens=int(np.unique(np.asarray(toks)).size),
      sampling=dict(temperature=config.sampling.temperature, top_k=config.sampling.top_k,
                    top_p=config.sampling.top_p),
      first_call_s=first, compile_s_estimate=first - pre - dec,
      prefill_s=pre, decode_s=dec, prefill_s_all=times["prefill"], decode_s_all=times["decode"],
      decode_step_ms=1e3 * dec / n, tokens_per_s=tok_s, bytes=by)
  for name, bw in (("spec", ARGS.hbm_bw), ("measured_copy", ARGS.measured_bw)):
    bound_s = by["total"] / bw
    rec[f"bound_{name}"] = dict(bandwidth=bw, step_ms=1e3 * bound_s / n,
                                tokens_per_s=rows * n / bound_s, ratio=tok_s / (rows * n / bound_s))
  if abstract_like.param_dtype != abstract_like.dtype:
    # The same rollout against the bytes it would read with weights in the compute dtype.
    ideal = decode_bytes(cfg, abstract_like.with_param_dtype(abstract_like.dtype), prompts_=b, g=g,
                         tp=ids.shape[1], n_new=n, cache_itemsize=cache_itemsize)
    bound_s = ideal["total"] / ARGS.hbm_bw
    rec["bound_spec_compute_dtype_weights"] = dict(
        tokens_per_s=rows * n / bound_s, ratio=tok_s / (rows * n / bound_s))
  log(f"{label}: {rows} rows x {n} tokens (prompt bucket {ids.shape[1]}): prefill {pre:.3f}s, "
      f"decode {dec:.3f}s = {1e3 * dec / n:.2f} ms/step, {tok_s:,.0f} tok/s; bound "
      f"{rec['bound_spec']['tokens_per_s']:,.0f} tok/s at {ARGS.hbm_bw / 1e12:.1f} TB/s -> ratio "
      f"{rec['bound_spec']['ratio']:.2f} ({rec['bound_measured_copy']['ratio']:.2f} vs "
      f"{ARGS.measured_bw / 1e12:.1f} TB/s); weights {by['weights_per_step'] / GIB:.2f} GiB/step")


def cost_flops(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {k: float(cost[k]) for k in ("flops", "bytes accessed", "transcendentals",
                                      "optimal_seconds") if k in cost}


def mem_analysis(compiled):
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias",
                                                           "generated_code")
         if hasattr(m, f"{k}_size_in_bytes")}
  out["planner_peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  if getattr(m, "peak_memory_in_bytes", None):
    out["xla_peak_memory"] = int(m.peak_memory_in_bytes)
  return out


def train_section(rec, ctx):
  config, cfg, mesh, rules, abstract, shapes = ctx["recipe"]
  b, g, tc = ARGS.train_prompts, shapes["generations"], shapes["completion"]
  rows = b * g
  phases = train.make_phases(config)
  grpo_config = config_lib.make_grpo_config(config)
  setup = train.make_train_setup(config, abstract, phases)
  ids, mask, vision = prompts(cfg, shapes, b, seed=1)
  rng = np.random.default_rng(2)
  hi = min(cfg.image_token_id, cfg.vision_start_token_id, cfg.bos_token_id, cfg.pad_token_id)
  with jax.set_mesh(mesh):
    prepared = make_sampler(abstract, config, mesh).prepare(ids, mask, **vision)
    tb = rollout.assemble(prepared, rng.integers(1, hi, (rows, tc)).astype(np.int32),
                          np.full(rows, tc, np.int32), g)
    tb["advantages"] = rng.normal(size=rows).astype(np.float32)
    tb.pop("sampler_logps", None)
    tb = jax.device_put(tb, train.batch_shardings(tb, mesh, rules))
    ref = jax.device_put(jnp.full((rows, tc), -3.0, jnp.float32),
                         sharding.batch_shardings(jax.ShapeDtypeStruct((rows, tc), jnp.float32),
                                                  mesh, rules))
    ctx["tb"], ctx["ref"] = tb, ref
    state = train.init_state(ctx.pop("params"), setup, config.seed)
    jax.block_until_ready(state)
    shard_of = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
    step_fn = train.make_train_step(abstract, setup, mode="grpo", grpo_config=grpo_config,
                                    num_micro=ARGS.grad_accum, batch_shardings_=shard_of(tb),
                                    ref_shardings=shard_of(ref))
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, tb, ref).compile()
    rec["compile_s"] = time.perf_counter() - t0
    rec["memory_analysis"] = mem_analysis(compiled)
    rec["cost_analysis"] = cost_flops(compiled)
    rec["live_before"] = memory()
    rec["live_arrays_bytes_before"] = int(sum(a.nbytes for a in jax.live_arrays()))
    rec["state_bytes"], rec["batch_bytes"] = nbytes(state), nbytes(tb) + nbytes(ref)
    log(f"train_step compiled in {rec['compile_s']:.1f}s; planner peak "
        f"{rec['memory_analysis'].get('planner_peak', 0) / GIB:.2f} GiB "
        f"(args {rec['memory_analysis'].get('argument', 0) / GIB:.2f}, temp "
        f"{rec['memory_analysis'].get('temp', 0) / GIB:.2f}); in use before "
        f"{rec['live_before'].get('bytes_in_use', 0) / GIB:.2f} GiB, peak so far "
        f"{rec['live_before'].get('peak_bytes_in_use', 0) / GIB:.2f} GiB")
    save()
    t0 = time.perf_counter()
    state, m = compiled(state, tb, ref)
    jax.block_until_ready((state, m))
    rec["first_run_s"] = time.perf_counter() - t0
    rec["live_after"] = memory()
    rec["loss"] = float(m["loss"])
    ma, before, after = rec["memory_analysis"], rec["live_before"], rec["live_after"]
    if "peak_bytes_in_use" in after and ma:
      rec["real_peak_bytes"] = after["peak_bytes_in_use"]
      rec["peak_set_by_train_step"] = after["peak_bytes_in_use"] > before.get("peak_bytes_in_use", 0)
      # Buffers alive during the step that are not its arguments (should be ~0: nothing else kept).
      rec["resident_not_arguments"] = before.get("bytes_in_use", 0) - ma["argument"]
      rec["real_over_planner"] = after["peak_bytes_in_use"] / ma["planner_peak"]
      log(f"memory: real peak {after['peak_bytes_in_use'] / GIB:.2f} GiB vs planner "
          f"{ma['planner_peak'] / GIB:.2f} GiB -> ratio {rec['real_over_planner']:.3f} (peak set by "
          f"the train step: {rec['peak_set_by_train_step']}; resident non-argument bytes "
          f"{rec['resident_not_arguments'] / GIB:.2f} GiB)")
    save()

    def one():
      nonlocal state
      state, mm = compiled(state, tb, ref)
      jax.block_until_ready((state, mm))

    ts = timed(one, ARGS.train_steps)
    ctx["state"] = state
  step_s = statistics.median(ts)
  patches = math.prod(shapes["video_grid"])
  an = analytic(cfg, abstract, rows=rows, prompts_=b, tp=shapes["prompt_bucket"], tc=tc,
                patches_per_prompt=patches, train=True)
  xla = rec["cost_analysis"].get("flops", float("nan"))
  tokens = rows * (shapes["prompt_bucket"] + tc)
  rec.update(prompts=b, rows=rows, prompt_bucket=shapes["prompt_bucket"],
             prompt_tokens=shapes["prompt_tokens"], completion=tc, grad_accum=ARGS.grad_accum,
             use_remat=bool(cfg.use_remat), tokens=tokens, step_s=step_s, step_s_all=ts,
             tokens_per_s=tokens / step_s, analytic_flops=an,
             mfu_xla_spec=xla / step_s / ARGS.peak_flops,
             mfu_xla_measured=xla / step_s / ARGS.measured_flops,
             mfu_model_spec=an["total"] / step_s / ARGS.peak_flops,
             mfu_model_measured=an["total"] / step_s / ARGS.measured_flops,
             xla_over_model_flops=xla / an["total"])
  if ARGS.grad_accum > 1:
    rec["note"] = ("cost_analysis counts the micro-batch scan body once: XLA FLOPs cover one "
                   "micro-batch's rows plus the vision/optimizer parts; use the analytic MFU")
  log(f"train_step: {rows} rows x {shapes['prompt_bucket']}+{tc} tokens, median {step_s:.3f}s "
      f"({ts}); XLA {xla / 1e12:.1f} TFLOP -> MFU {rec['mfu_xla_spec']:.1%} of spec, "
      f"{rec['mfu_xla_measured']:.1%} of measured; model {an['total'] / 1e12:.1f} TFLOP -> MFU "
      f"{rec['mfu_model_spec']:.1%} / {rec['mfu_model_measured']:.1%}")


def ref_section(rec, ctx):
  config, cfg, mesh, rules, abstract, shapes = ctx["recipe"]
  tb, state = ctx["tb"], ctx["state"]
  ref_abstract = abstract.with_param_dtype(config.model.ref_param_dtype)
  with jax.set_mesh(mesh):
    ref_params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(ref_abstract.param_dtype), p),
                         out_shardings=ref_abstract.shardings)(state["params"])
    t0 = time.perf_counter()
    try:
      compiled = train.make_logps_fn(ref_abstract, ARGS.grad_accum).lower(ref_params, tb).compile()
    except Exception as e:  # pylint: disable=broad-except
      # A train.py whose token_logps merges the model outside its scan cannot trace nnx.remat
      # (TraceContextError). Without a gradient remat changes nothing: retry without it.
      if not cfg.use_remat or "TraceContextError" not in type(e).__name__:
        raise
      rec["remat_off_fallback"] = f"{type(e).__name__}: {str(e)[:300]}"
      log("ref_logps: token_logps cannot trace remat here (train.py without the scan-body merge); "
          "compiling the reference forward with use_remat=False (same computation, no gradient)")
      no_remat = modeling.abstract_model(
          dataclasses.replace(cfg, use_remat=False), dtype=abstract.dtype,
          param_dtype=ref_abstract.param_dtype, mesh=mesh, rules=rules)
      compiled = train.make_logps_fn(no_remat, ARGS.grad_accum).lower(ref_params, tb).compile()
    rec["compile_s"] = time.perf_counter() - t0
    rec["cost_analysis"] = cost_flops(compiled)
    rec["memory_analysis"] = mem_analysis(compiled)
    jax.block_until_ready(compiled(ref_params, tb))
    ts = timed(lambda: jax.block_until_ready(compiled(ref_params, tb)), ARGS.train_steps)
  b, g, tc = ARGS.train_prompts, shapes["generations"], shapes["completion"]
  an = analytic(cfg, abstract, rows=b * g, prompts_=b, tp=shapes["prompt_bucket"], tc=tc,
                patches_per_prompt=math.prod(shapes["video_grid"]), train=False)
  s = statistics.median(ts)
  xla = rec["cost_analysis"].get("flops", float("nan"))
  rec.update(s=s, s_all=ts, analytic_flops=an, mfu_xla_spec=xla / s / ARGS.peak_flops,
             mfu_model_spec=an["total"] / s / ARGS.peak_flops)
  tr = RESULTS["sections"].get("train", {})
  if tr.get("ok"):
    tot_s = tr["step_s"] + s
    rec["phase"] = dict(
        seconds=tot_s,
        mfu_model_spec=(tr["analytic_flops"]["total"] + an["total"]) / tot_s / ARGS.peak_flops,
        mfu_model_measured=(tr["analytic_flops"]["total"] + an["total"]) / tot_s
        / ARGS.measured_flops,
        mfu_xla_spec=(tr["cost_analysis"].get("flops", float("nan")) + xla) / tot_s
        / ARGS.peak_flops)
  log(f"ref_logps: compile {rec['compile_s']:.1f}s, median {s:.3f}s, model MFU "
      f"{rec['mfu_model_spec']:.1%}" + (f"; train phase (ref + step) model MFU "
                                        f"{rec['phase']['mfu_model_spec']:.1%}" if "phase" in rec
                                        else ""))


def main():
  dev = jax.devices()[0]
  RESULTS["env"] = dict(
      jax=jax.__version__, flax=__import__("flax").__version__,
      optax=__import__("optax").__version__, python=sys.version.split()[0],
      platform=dev.platform, device_kind=getattr(dev, "device_kind", ""),
      device_count=jax.device_count(), tiny=ARGS.tiny,
      mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
      xla_flags=os.environ.get("XLA_FLAGS", ""), memory=memory())
  log(f"jax {jax.__version__} flax {RESULTS['env']['flax']} on {dev.platform} "
      f"{RESULTS['env']['device_kind']} x{jax.device_count()}")
  save()
  ctx = {}
  t0 = time.perf_counter()
  ctx["recipe"] = setup_recipe()
  config, cfg, mesh, rules, abstract, shapes = ctx["recipe"]
  RESULTS["recipe"] = dict(shapes=shapes, param_count=abstract.param_count,
                           dtype=str(abstract.dtype), param_dtype=str(abstract.param_dtype),
                           ref_param_dtype=config.model.ref_param_dtype,
                           use_remat=bool(cfg.use_remat), mesh=dict(mesh.shape))
  params = fast_random_params(abstract)
  jax.block_until_ready(params)
  RESULTS["recipe"]["init_s"] = time.perf_counter() - t0
  RESULTS["recipe"]["memory_after_init"] = memory()
  log(f"{abstract.param_count / 1e9:.3f}B params ({abstract.param_dtype}) initialised in "
      f"{RESULTS['recipe']['init_s']:.1f}s; shapes {shapes}")
  save()

  @section("decode_bf16")
  def decode_bf16(rec):
    ab16 = abstract.with_param_dtype(config.model.dtype)
    with jax.set_mesh(mesh):
      p16 = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(ab16.param_dtype), p),
                    out_shardings=ab16.shardings)(params)
    decode(rec, p16, ab16, config, cfg, mesh, shapes, "decode_bf16")

  decode_bf16()
  ctx["params"] = params
  del params
  section("train")(train_section)(ctx)
  section("ref_logps")(ref_section)(ctx)
  for k in ("tb", "ref"):
    ctx.pop(k, None)

  @section("decode_fp32")
  def decode_fp32(rec):
    p = ctx["state"]["params"] if "state" in ctx else ctx.get("params")
    if p is None or any(x.is_deleted() for x in jax.tree.leaves(p)):  # donated by a failed step
      p = fast_random_params(abstract)
    decode(rec, p, abstract, config, cfg, mesh, shapes, "decode_fp32 (the trainer's rollout)")

  decode_fp32()
  RESULTS["done"] = True
  save()
  log(f"done; {JSON_PATH}")


if __name__ == "__main__":
  try:
    main()
  except Exception as e:  # pylint: disable=broad-except
    RESULTS["fatal"] = traceback.format_exc()[-6000:]
    save()
    log(f"FATAL {type(e).__name__}: {e}")
    raise

"""Will the recipe fit? Compile one training step for a TPU slice on any host, before launching it.

  python -m spacer_jax.plan --config=configs/sgrlvr.py:size=7b --topology=v5p-8 [--json=plan.json]

With libtpu installed (requirements-test.txt pins it), XLA compiles for TPU without a TPU:
`jax.experimental.topologies.get_topology_desc` gives abstract TPU devices of a slice, a mesh over
them takes the config's mesh and sharding rules, and every jitted function that one step of
`spacer_jax.train` runs is lowered with `ShapeDtypeStruct` arguments carrying the trainer's
shardings, then compiled by the real TPU compiler. Nothing is allocated and no weight is read (the
parameters come from `nnx.eval_shape`). `--topology=local` compiles for the devices present instead.

The functions, with the recipe's shapes (B prompts, G samples, prompt bucket Tp including the video
tokens of the config's frame settings, Tc = max_new_tokens, the micro-batches of grad_accum_steps):
  vision_encoder   the vision tower on B prompts' patches (part of prefill and train_step; shown
                   alone to see its share)
  prefill, decode  sampling.py's jitted prompt prefill and decode loop (the rollout)
  ref_logps        train.token_logps on the reference weights (beta > 0)
  old_logps        train.token_logps on the policy weights (num_iterations > 1)
  train_step       train.train_step (train_step_sft too when an SFT warm-up precedes GRPO)

Per function it prints XLA's per-device argument / output / temp / alias bytes, generated code, the
compiled peak, FLOPs and XLA's estimated time, and the compile time. The step's peak is the largest
of (a function's peak + the buffers that live through the step without being its arguments: the
optimizer state during the rollout, the reference weights during train_step, ...), compared with
the chip's HBM for the verdict. On a TPU slice that HBM is what the TPU compiler allows a program
on the chip (`compiler_hbm_bytes`; 95.74 GiB on v5p), and each function is compiled with the
budget the step leaves it (that HBM less the buffers resident beside its arguments), so the
compiler cannot plan on memory the reference weights or the optimizer state hold.

How to read the estimates. XLA's cost analysis counts the body of a loop once. The planner counts
the matmul FLOPs of each function's jaxpr with scan lengths multiplied ("model FLOPs") and scales
XLA's FLOPs and estimated time of train_step / token_logps by the same ratio. The decode loop's
trip count is not static: its figures are one decode step (one token for each of the R rows), and
the rollout estimate is Tc such steps, each bounded below by the step's bytes over the HBM
bandwidth and its FLOPs over the peak. XLA's estimated time is an ideal-overlap roofline, so the
step time is a lower bound and the MFU (model FLOPs of the train phase / (devices x peak x
estimated train time)) an upper bound. docs/performance.md records what was measured against it.
"""

import dataclasses
import json
import math
import os
import re
import sys
import time

if __name__ == "__main__" and not any(a in ("--topology=local", "--topology", "local")
                                      for a in sys.argv[1:]):
  # A TPU topology is compiled for without touching a local accelerator: keep the first
  # `import jax` on CPU (with libtpu installed, jax would otherwise probe for TPU chips).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from spacer_jax import cli, config_lib, sharding, train, tree_utils

GIB = 2.0 ** 30


# ------------------------------------------------------------------------------------------------
# Chips and slices.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: HBM bytes, dense bf16 peak FLOP/s, HBM bandwidth bytes/s.

  `cores_in_name`: Cloud TPU slice names count TensorCores for v4/v5p (2 per chip: v5p-8 is 4
  chips) and chips for v5e/v6e (v5e-8 is 8 chips).
  """
  name: str
  hbm_bytes: float
  peak_flops: float
  hbm_bandwidth: float
  cores_in_name: int = 1
  topology_prefix: str = ""
  chip_config: str | None = None


# Public figures, per chip. For TPU slices the HBM a program may use is what the TPU compiler
# allows (`compiler_hbm_bytes`: v5p 95.74 GiB, v5e 15.75 GiB, v6e 31.25 GiB with libtpu 0.0.42);
# the capacities below, as printed by the vendor with GB read as 1e9 bytes, are the fallback.
#   v4:   cloud.google.com/tpu/docs/v4     (32 GiB HBM2, 275 TFLOP/s bf16, 1,200 GB/s)
#   v5e:  cloud.google.com/tpu/docs/v5e    (16 GB HBM2, 197 TFLOP/s bf16, 819 GB/s)
#   v5p:  cloud.google.com/tpu/docs/v5p    (95 GB HBM2e, 459 TFLOP/s bf16, 2,765 GB/s)
#   v6e:  cloud.google.com/tpu/docs/v6e    (32 GB HBM, 918 TFLOP/s bf16, 1,640 GB/s)
#   H100: nvidia.com/en-us/data-center/h100 (SXM: 80 GB HBM3, 989 TFLOP/s dense bf16, 3.35 TB/s)
#   H200: nvidia.com/en-us/data-center/h200 (SXM: 141 GB HBM3e, 989 TFLOP/s dense bf16, 4.8 TB/s)
CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1200e9, 2, "v4", "megacore"),
    "v5e": Chip("TPU v5e", 16e9, 197e12, 819e9, 1, "v5e"),
    "v5p": Chip("TPU v5p", 95e9, 459e12, 2765e9, 2, "v5p"),
    "v6e": Chip("TPU v6e", 32e9, 918e12, 1640e9, 1, "v6e"),
    "h100": Chip("NVIDIA H100", 80e9, 989e12, 3350e9),
    "h200": Chip("NVIDIA H200", 141e9, 989e12, 4800e9),
}

# Chips -> physical topology of the slice (Cloud TPU's standard shapes; 3-D torus for v4/v5p,
# 2-D for v5e/v6e). Slices of more than 4 chips span several hosts; XLA compiles for all of them.
_TOPOLOGY_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
                256: "4x8x8", 512: "8x8x8"}
_TOPOLOGY_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
                256: "16x16"}


@dataclasses.dataclass
class Target:
  """What to compile for: devices (abstract TPU devices or the local ones) and their chip."""
  name: str
  platform: str
  devices: list
  chip: Chip | None


def tpu_target(topology):
  """`v5p-8`-style Cloud TPU slice name -> Target over abstract TPU devices (needs libtpu)."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", topology)
  if not m:
    raise ValueError(f"--topology={topology!r}: expected local or a Cloud TPU slice name such as "
                     f"v4-8, v5e-8, v5p-8, v6e-8, v5p-32 (generations: v4, v5e, v5p, v6e)")
  chip = CHIPS[m.group(1)]
  n = int(m.group(2))
  chips = n // chip.cores_in_name
  shapes = _TOPOLOGY_3D if chip.cores_in_name == 2 else _TOPOLOGY_2D
  if n % chip.cores_in_name or chips not in shapes:
    names = sorted(f"{m.group(1)}-{c * chip.cores_in_name}" for c in shapes)
    raise ValueError(f"--topology={topology!r}: unknown slice size; known: {', '.join(names)}")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # Only a compiler is loaded, no chip is claimed: let several planners (or a test run beside one)
  # load libtpu at once instead of failing on its single-process lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  kw = {"chip_config_name": chip.chip_config} if chip.chip_config else {}
  if chips == 1:  # one chip (v5e-1, v6e-1: Colab's TPU runtimes): a host of one chip, not of four
    kw["chips_per_host_bounds"] = (1, 1, 1)
  try:
    desc = topologies.get_topology_desc(
        topology_name=f"{chip.topology_prefix}:{shapes[chips]}", platform="tpu", **kw)
  except Exception as e:  # libtpu missing or too old: say how to get it.
    raise RuntimeError(f"cannot describe TPU topology {topology!r} ({e}); install libtpu with "
                       "`pip install -r requirements-test.txt` (jax[tpu] at the pinned jax)") from e
  usable = compiler_hbm_bytes(desc.devices[0])
  if usable:
    chip = dataclasses.replace(chip, hbm_bytes=usable)
  return Target(topology, "tpu", list(desc.devices), chip)


_COMPILER_HBM = {}


def compiler_hbm_bytes(device):
  """The HBM per chip the TPU compiler lets a program use on `device`'s kind (bytes), or None.

  XLA:TPU compiles every program against this limit (it is what a real chip's runtime offers:
  "exceeds available HBM (95.74G)" on a v5p) and says it only when a program exceeds it, so a
  small program that cannot fit any chip is compiled once per kind and the figure read from the
  refusal. Vendor pages print rounder capacities ("95 GB" for v5p), which the planner used before
  and which left a v5p's last 7 GiB unused.
  """
  kind = device.device_kind
  if kind not in _COMPILER_HBM:
    mesh = jax.sharding.Mesh(np.array([device]), ("x",))
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # A sort cannot be fused into its input: the 160 GB outer product must be materialised.
    probe = jax.jit(lambda x: jnp.sort(jnp.outer(x, x), axis=0)[0], in_shardings=one,
                    out_shardings=one)
    try:
      probe.lower(jax.ShapeDtypeStruct((200_000,), jnp.float32, sharding=one)).compile()
      _COMPILER_HBM[kind] = None
    except Exception as e:  # pylint: disable=broad-except
      _COMPILER_HBM[kind] = _out_of_memory_sizes(str(e))[1]
  return _COMPILER_HBM[kind]


def _chip_of_kind(kind):
  kind = kind.lower()
  for needle, key in (("h200", "h200"), ("h100", "h100"), ("tpu v6", "v6e"), ("tpu v5 lite", "v5e"),
                      ("tpu v5e", "v5e"), ("tpu v5", "v5p"), ("tpu v4", "v4")):
    if needle in kind:
      return CHIPS[key]
  return None


def local_target():
  """The devices present. HBM: the backend's usable limit where it reports one (GPU, TPU), else
  the chip table; peak FLOP/s and bandwidth from the chip table (unknown on CPU: no MFU)."""
  devices = jax.devices()
  chip = _chip_of_kind(devices[0].device_kind)
  stats = devices[0].memory_stats() or {}
  if chip is None:
    # XLA:CPU: no HBM; the limit is this host's memory shared by the (simulated) devices.
    limit = stats.get("bytes_limit") or (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                         / len(devices))
    chip = Chip(devices[0].device_kind, float(limit), float("nan"), float("nan"))
  elif stats.get("bytes_limit"):
    chip = dataclasses.replace(chip, hbm_bytes=float(stats["bytes_limit"]))
  return Target("local", devices[0].platform, devices, chip)


# ------------------------------------------------------------------------------------------------
# FLOPs from the jaxpr (XLA's cost analysis counts a loop body once).
# ------------------------------------------------------------------------------------------------
def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, jax.extend.core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jax.extend.core.Jaxpr):
        yield x


def matmul_flops(jaxpr, scan_trips=True):
  """2 * M * N * K summed over every dot_general of `jaxpr` (global, not per device).

  Scan bodies count `length` times when scan_trips (once otherwise, as XLA does); while-loop bodies
  count once (their trip count is not static); cond counts its most expensive branch.
  """
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      k = math.prod(eqn.invars[0].aval.shape[d] for d in lc)
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * k
    elif name == "cond":
      total += max(matmul_flops(b.jaxpr, scan_trips) for b in eqn.params["branches"])
    elif name == "while":
      total += matmul_flops(eqn.params["body_jaxpr"].jaxpr, scan_trips)
    else:
      trips = eqn.params["length"] if name == "scan" and scan_trips else 1
      total += trips * sum(matmul_flops(j, scan_trips) for j in _sub_jaxprs(eqn))
  return total


# ------------------------------------------------------------------------------------------------
# The recipe's shapes and host batches.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shapes:
  """The recipe's static shapes for one step."""
  prompts: int            # B
  generations: int        # G (1 for SFT)
  prompt_bucket: int      # Tp
  completion: int         # Tc
  micro_batches: int      # grad_accum_steps
  video_grid: tuple       # (t, h, w) patches of one clip
  video_tokens: int       # per prompt
  text_tokens: int        # per prompt (allowance)
  patches_per_prompt: int  # pixel rows reserved per prompt (pipeline.patch_budgets)

  @property
  def rows(self):
    return self.prompts * self.generations


def recipe_shapes(config, cfg, *, text_tokens, video_hw, phase):
  """Shapes the data pipeline and rollout produce for this config (host arithmetic only).

  The clip is a `video_hw` source video (ScanNet's 480x640 by default) at the config's frame
  settings and pixel budget: `video.smart_resize` gives its frame size, `max_frames` its length.
  """
  from spacer_jax.data import pipeline, prompts, video  # pylint: disable=g-import-not-at-top
  dcfg = config_lib.make_data_config(config, temporal=False)
  pv, _ = pipeline.patch_budgets(dcfg)
  frames = dcfg.max_frames
  cap = video.video_max_pixels(frames, dcfg.video_min_pixels, dcfg.video_max_pixels,
                               dcfg.video_total_pixels)
  h, w = video.smart_resize(video_hw[0], video_hw[1], video.IMAGE_FACTOR, dcfg.video_min_pixels,
                            int(cap))
  grid = (-(-frames // cfg.temporal_patch_size), h // cfg.patch_size, w // cfg.patch_size)
  if math.prod(grid) > pv:
    raise ValueError(f"a {video_hw} clip needs {math.prod(grid)} patches > budget {pv}")
  tokens = math.prod(grid) // cfg.spatial_merge_size ** 2
  bucket = prompts.choose_bucket(tokens + text_tokens, tuple(config.data.prompt_buckets))
  g = 1 if phase == "sft" else int(config.grpo.num_generations)
  return Shapes(prompts=dcfg.batch_size, generations=g, prompt_bucket=bucket,
                completion=int(config.sampling.max_new_tokens),
                micro_batches=int(config.grad_accum_steps), video_grid=grid, video_tokens=tokens,
                text_tokens=text_tokens, patches_per_prompt=pv)


def host_batches(cfg, shapes, sampler, pixels=None):
  """The sampler's prepared prompt batch and the TrainBatch, built by the trainer's own host code
  (sampler.prepare under vision_budget="auto", rollout.assemble) from placeholder token ids.

  Pixels are the data pipeline's: B * patches_per_prompt rows, the clips' real rows first (zeros
  by default, as a zero-stride view: nothing is allocated).
  """
  from spacer_jax import rollout  # pylint: disable=g-import-not-at-top
  b, tp = shapes.prompts, shapes.prompt_bucket
  span = [cfg.vision_start_token_id] + [cfg.video_token_id] * shapes.video_tokens + [
      cfg.vision_end_token_id]
  n = min(len(span) + shapes.text_tokens, tp)
  text_id = 1  # any ordinary token
  row = np.full(tp, cfg.pad_token_id, np.int32)
  row[tp - n:] = text_id
  row[tp - n + 1:tp - n + 1 + len(span)] = span
  ids = np.tile(row, (b, 1))
  mask = np.zeros((b, tp), np.int32)
  mask[:, tp - n:] = 1
  grid = np.tile(np.asarray(shapes.video_grid, np.int64), (b, 1))
  patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
  if pixels is None:
    pixels = np.broadcast_to(np.float32(0), (b * shapes.patches_per_prompt, patch_dim))
  prepared = sampler.prepare(ids, mask, pixel_values_videos=pixels, video_grid_thw=grid,
                             second_per_grid_ts=np.ones(b, np.float32))
  r, tc = shapes.rows, shapes.completion
  tb = rollout.assemble(prepared, np.zeros((r, tc), np.int32), np.full(r, tc, np.int32),
                        shapes.generations)
  tb["advantages"] = np.zeros(r, np.float32)
  return prepared, tb


def _sds(x, s):
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)


def abstract_batch(tree, shardings):
  """ShapeDtypeStructs of a host batch on `shardings` (a matching tree)."""
  return jax.tree.map(_sds, tree, shardings)


# ------------------------------------------------------------------------------------------------
# Compile and measure.
# ------------------------------------------------------------------------------------------------
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def out_of_memory_bytes(message, argument_bytes):
  """Per-device bytes a program needs, from the TPU compiler's out-of-memory error, else None.

  Two forms (XLA prints binary units): "Ran out of memory in memory space hbm. Used 99.5G of
  95.74G hbm" (the whole program) and "the total memory required for HLO temporaries (40.00G)
  exceeds available HBM". Whether the second counts the arguments is not stated, so the larger of
  it and the arguments is taken: a lower bound of the peak either way.
  """
  if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
    return None
  need, _, whole_program = _out_of_memory_sizes(message)
  if need is None:
    return None
  return int(need) if whole_program else max(int(need), int(argument_bytes))


_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"  # "95.74G", "1000.00M" (binary units)


def _out_of_memory_sizes(message):
  """(bytes needed, bytes available, whether the first is the whole program's) in the TPU
  compiler's out-of-memory message; None for what it does not say."""
  nbytes = lambda m, i: float(m.group(i)) * _UNITS[m.group(i + 1)]  # noqa: E731
  m = re.search(r"Used " + _SIZE + r" of " + _SIZE + r" hbm", message)
  if m:
    return nbytes(m, 1), nbytes(m, 3), True
  need = re.search(r"required for HLO temporaries \(" + _SIZE + r"\)", message)
  avail = re.search(r"available HBM \(" + _SIZE + r"\)", message)
  return (nbytes(need, 1) if need else None), (nbytes(avail, 1) if avail else None), False


def compile_function(jitted, args, *, loop_scaled=True, hlo_path=None, hbm_budget=None):
  """Traces, lowers and compiles `jitted(*args)`; returns (compiled, figures dict).

  When the TPU compiler rejects the program for its HBM, returns (None, figures) with the bytes
  the compiler asked for as `peak_bytes` (a lower bound), its message as `out_of_memory` and no
  memory breakdown or cost.

  loop_scaled: scale XLA's FLOPs / bytes / time by the jaxpr's (scan lengths multiplied) / (scan
  bodies once) matmul-FLOP ratio, so a micro-batch scan counts every micro-batch.
  hlo_path: also write the optimized HLO text there.
  hbm_budget: bytes per device the program may use (XLA:TPU's xla_tpu_max_hbm_size_mib): the
    chip's HBM less what stays resident beside the program's arguments (the reference weights
    during train_step, the optimizer state during the rollout). Without it the compiler plans
    against the whole chip and may spend memory that the step's other buffers hold (it trades
    free memory for speed: 75.6 GiB of temporaries where it can do with less when told).
  """
  t0 = time.perf_counter()
  traced = jitted.trace(*args)
  lowered = traced.lower()
  options = None if hbm_budget is None else train.hbm_budget_options(hbm_budget)
  try:
    compiled = lowered.compile(compiler_options=options)
  except Exception as e:  # pylint: disable=broad-except
    need = out_of_memory_bytes(str(e), tree_utils.bytes_per_device(args))
    if need is None:
      raise
    # The TPU compiler refuses a program that cannot fit its HBM: the step does not fit, by at
    # least what the compiler says it needs.
    model_flops = matmul_flops(traced.jaxpr.jaxpr)
    # The rest of the message lists the program's largest allocations (shape, op, source line):
    # where the memory goes.
    logging.warning("the TPU compiler rejected the program:\n%s", str(e).strip()[:20000])
    return None, dict(
        argument_bytes=tree_utils.bytes_per_device(args), output_bytes=None, temp_bytes=None,
        alias_bytes=None, generated_code_bytes=None, peak_bytes=need, flops=float("nan"),
        bytes_accessed=float("nan"), estimated_seconds=float("nan"),
        model_flops=float(model_flops), loop_scale=float("nan"),
        compile_seconds=time.perf_counter() - t0,
        out_of_memory=str(e).strip().splitlines()[0][:500])
  seconds = time.perf_counter() - t0
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(compiled.as_text())
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
    cost = cost[0] if cost else {}
  model_flops = matmul_flops(traced.jaxpr.jaxpr)
  once = matmul_flops(traced.jaxpr.jaxpr, scan_trips=False)
  scale = model_flops / once if loop_scaled and once else 1.0
  peak = getattr(mem, "peak_memory_in_bytes", 0) or (
      mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
      + mem.temp_size_in_bytes)
  fig = dict(
      argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
      generated_code_bytes=int(mem.generated_code_size_in_bytes), peak_bytes=int(peak),
      flops=float(cost.get("flops", float("nan"))) * scale,
      bytes_accessed=float(cost.get("bytes accessed", float("nan"))) * scale,
      # XLA reports -1 where its cost model has no estimate.
      estimated_seconds=(float(cost["optimal_seconds"]) * scale
                         if cost.get("optimal_seconds", -1) >= 0 else float("nan")),
      model_flops=float(model_flops), loop_scale=float(scale), compile_seconds=seconds)
  return compiled, fig


def _jit_vision(abstract):
  """The vision tower alone, jitted: (fn(visual params, pixels, vis) -> features, the abstract
  visual params on their shardings)."""
  graphdef, vparams, paths = tree_utils.split_model(abstract.merge().visual)
  vparams = {k: abstract.params["visual." + k] for k in vparams}

  def vision_encoder(vparams, pixels, vis):
    return tree_utils.merge_model(graphdef, vparams, paths)(pixels, vis)
  return jax.jit(vision_encoder), vparams


def plan(config, target, *, text_tokens=512, video_hw=(480, 640), workdir=None,
         functions=None, hlo_dir=None, log=print):
  """Compiles one step of `config` for `target`; returns the report dict (see --json).

  Everything is built by the trainer's own functions (train.make_abstract_model,
  make_train_setup, batch_shardings, make_train_step, make_logps_fn; the sampler's prefill_fn /
  decode_fn), on abstract values: nothing is allocated and no weight is read.

  functions: names to compile (default all); hlo_dir: write each optimized HLO there;
  workdir: where the tiny test model's offline tokenizer is built (real sizes need none).
  """
  from spacer_jax import sampling  # pylint: disable=g-import-not-at-top
  workdir = workdir or os.path.join(os.path.expanduser("~"), ".cache", "spacer_jax_plan")
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
  t_start = time.perf_counter()
  # The trainer's own checks, less the data and checkpoint paths this host need not have.
  config_lib.validate(config, num_devices=len(target.devices), check_paths=False)
  phases = train.make_phases(config)
  phase = "grpo" if phases.rl_steps > 0 else "sft"
  use_ref = phase == "grpo" and config.grpo.beta > 0
  mu = phases.num_iterations
  mesh = sharding.make_mesh(config.mesh, devices=target.devices)
  rules = config_lib.sharding_rules(config)
  repl = sharding.replicated(mesh)
  # The tiny test model takes its token ids from the offline tokenizer; real sizes need no
  # tokenizer or checkpoint here (train.make_model_config with tokenizer=None).
  tokenizer = None
  if config.model.variant:
    os.makedirs(workdir, exist_ok=True)
    tokenizer = train.make_tokenizer(config, workdir)
  setup = train.make_train_setup(config, train.make_abstract_model(config, tokenizer, mesh),
                                 phases)
  abstract = setup.abstract  # the policy (with its LoRA adapters, if any)
  cfg = abstract.config
  shapes = recipe_shapes(config, cfg, text_tokens=text_tokens, video_hw=video_hw, phase=phase)
  grpo_cfg = config_lib.make_grpo_config(config)
  sampler = sampling.Sampler(
      abstract.merge(), temperature=config.sampling.temperature, top_k=config.sampling.top_k,
      top_p=config.sampling.top_p, mesh=mesh, cache_dtype=abstract.dtype, vision_budget="auto",
      stop_ids=sampling.default_stop_ids(cfg))
  prepared, tb = host_batches(cfg, shapes, sampler)
  num_micro = shapes.micro_batches
  state = setup.abstract_state
  # The reference policy (beta > 0): the policy's own frozen params plus a second copy of the
  # trained ones (setup.ref_loaded_keys, in ref_param_dtype), which stays resident all run.
  loaded = ({k: setup.reference.params[k] for k in setup.ref_loaded_keys} if use_ref else {})
  ref_params = setup.ref_params(state["params"], loaded) if use_ref else None
  resident = train.resident_bytes(setup, state, loaded)  # what the trainer budgets with
  report = dict(
      topology=target.name, platform=target.platform, num_devices=len(target.devices),
      device_kind=target.devices[0].device_kind, mesh=dict(mesh.shape),
      hbm_bytes_per_device=float(target.chip.hbm_bytes), chip=dataclasses.asdict(target.chip),
      param_count=abstract.param_count,
      trainable_param_count=tree_utils.param_count(
          {k: abstract.params[k] for k in setup.trainable_keys}),
      shapes=dict(dataclasses.asdict(shapes), rows=shapes.rows), phase=phase,
      resident_bytes={k: resident[k] for k in ("state", "optimizer", "ref_params")},
      functions={})
  log(f"plan: {target.name} ({len(target.devices)} x {target.devices[0].device_kind}), mesh "
      f"{dict(mesh.shape)}, {report['param_count']:,} params; B={shapes.prompts} "
      f"G={shapes.generations} Tp={shapes.prompt_bucket} ({shapes.video_tokens} video + "
      f"<= {shapes.text_tokens} text tokens) Tc={shapes.completion} micro-batches={num_micro}")

  wanted = lambda name: functions is None or name in functions  # noqa: E731
  # Residents that are not arguments of a function still occupy HBM while it runs.
  extra = {}

  def measure(name, fn, args, resident, loop_scaled=True):
    hlo = os.path.join(hlo_dir, f"{name}.hlo.txt") if hlo_dir else None
    # The TPU compiler plans within what the step leaves the function (see compile_function).
    budget = target.chip.hbm_bytes - (resident or 0) if target.platform == "tpu" else None
    compiled, fig = compile_function(fn, args, loop_scaled=loop_scaled, hlo_path=hlo,
                                     hbm_budget=budget)
    report["functions"][name] = fig
    extra[name] = resident
    if compiled is None:
      log(f"{name}: does not fit, needs at least {fig['peak_bytes'] / GIB:.2f} GiB per device "
          f"({fig['out_of_memory']})")
    else:
      log(f"{name}: compiled in {fig['compile_seconds']:.1f} s, peak "
          f"{fig['peak_bytes'] / GIB:.2f} GiB per device")
    return compiled

  # Traced like the trainer's loop: under the mesh and the logical rules that layers.constrain
  # resolves the activation constraints with.
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    if wanted("vision_encoder"):
      fn, vparams = _jit_vision(abstract)
      vis_batch = (prepared["pixel_values_videos"], prepared["video_vis"])
      shard = sampler.batch_shardings(prepared) or jax.tree.map(lambda _: repl, prepared)
      vis_shard = (shard["pixel_values_videos"], shard["video_vis"])
      # Part of prefill and train_step, not a phase of its own: no step peak.
      measure("vision_encoder", fn, (vparams, *abstract_batch(vis_batch, vis_shard)), None)
    params_state = abstract.state(state["params"])
    if phase == "grpo" and (wanted("prefill") or wanted("decode")):
      shard = sampler.batch_shardings(prepared) or jax.tree.map(lambda _: repl, prepared)
      batch = abstract_batch(prepared, shard)
      rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)
      prefill = sampler.prefill_fn(shapes.prompts, max_new_tokens=shapes.completion,
                                   num_samples=shapes.generations)
      compiled = measure("prefill", prefill, (params_state, batch, rng),
                         resident["policy_passes"])
      if wanted("decode") and compiled is None:
        log("decode: not compiled (its state is the output of a prefill that does not fit)")
      elif wanted("decode"):
        out = jax.eval_shape(prefill, params_state, batch, rng)
        sstate = jax.tree.map(_sds, out, compiled.output_shardings)
        until = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
        del compiled
        measure("decode", sampler.decode_fn(), (params_state, sstate, until),
                resident["policy_passes"], loop_scaled=False)
    tbs = abstract_batch(tb, train.batch_shardings(tb, mesh, rules))
    logps_fn = train.make_logps_fn(abstract, num_micro)
    # The trainer hands train_step the log-probs' arrays as they come out of token_logps.
    logps_struct = jax.ShapeDtypeStruct(
        tb["completion_ids"].shape, jnp.float32,
        sharding=sharding.batch_sharding(mesh, rules, tb["completion_ids"].shape))
    ref_struct = None
    if use_ref:
      ref_struct = logps_struct
      if wanted("ref_logps"):
        compiled = measure("ref_logps", train.make_logps_fn(setup.reference, num_micro),
                           (ref_params, tbs), resident["ref_logps"])
        if compiled is not None:
          ref_struct = _sds(logps_struct, compiled.output_shardings)
        del compiled
    if phase == "grpo" and mu > 1:
      tbs["old_logps"] = ref_struct or logps_struct
      if wanted("old_logps"):
        measure("old_logps", logps_fn, (state["params"], tbs), resident["policy_passes"])
    for ph in [phase] + (["sft"] if phase == "grpo" and phases.sft_steps else []):
      name = "train_step" if ph == phase else f"train_step_{ph}"
      if not wanted(name):
        continue
      if ph != phase:  # the SFT warm-up batch: G = 1, no reference, no old log-probs
        _, tb_ph = host_batches(cfg, dataclasses.replace(shapes, generations=1), sampler)
        tbs_ph, ref_ph = abstract_batch(tb_ph, train.batch_shardings(tb_ph, mesh, rules)), None
      else:
        tbs_ph, ref_ph = tbs, ref_struct
      shard_of = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
      step = train.make_train_step(abstract, setup, mode=ph, grpo_config=grpo_cfg,
                                   num_micro=num_micro, batch_shardings_=shard_of(tbs_ph),
                                   ref_shardings=shard_of(ref_ph))
      measure(name, step, (state, tbs_ph, ref_ph), resident["train_step"])

  _summarise(report, extra, target.chip, shapes, use_ref)
  report["plan_seconds"] = time.perf_counter() - t_start
  return report


def _summarise(report, extra, chip, shapes, use_ref):
  """Step peak, verdict, timing, MFU and rollout throughput from the per-function figures."""
  fns = report["functions"]
  for name, f in fns.items():
    f["step_peak_bytes"] = None if extra.get(name) is None else f["peak_bytes"] + extra[name]
    f["estimate"] = "xla"
    if not np.isfinite(f["estimated_seconds"]):  # XLA had no estimate: the roofline instead
      f["estimated_seconds"] = max(f["flops"] / chip.peak_flops,
                                   f["bytes_accessed"] / chip.hbm_bandwidth)
      f["estimate"] = "roofline"
  peaks = {n: f["step_peak_bytes"] for n, f in fns.items() if f["step_peak_bytes"] is not None}
  worst = max(peaks, key=peaks.get) if peaks else None
  hbm = chip.hbm_bytes
  report["step_peak_bytes"] = peaks[worst] if worst else None
  report["step_peak_function"] = worst
  oom = [n for n, f in fns.items() if f.get("out_of_memory")]
  report["out_of_memory"] = oom  # rejected by the compiler: their peaks are lower bounds
  report["fits"] = bool(worst is not None and peaks[worst] <= hbm and not oom)
  report["headroom_bytes"] = hbm - peaks[worst] if worst else None
  # Time: rollout = prefill + Tc decode steps; train = reference / old log-probs + train_step.
  est = {}
  if "decode" in fns:
    d = fns["decode"]
    step_s = max(d["bytes_accessed"] / chip.hbm_bandwidth, d["flops"] / chip.peak_flops,
                 d["estimated_seconds"])
    d["decode_step_seconds"] = step_s
    d["tokens_per_second"] = shapes.rows / step_s
    report["rollout_tokens_per_second"] = d["tokens_per_second"]
    est["rollout"] = fns.get("prefill", {}).get("estimated_seconds", 0.0) + shapes.completion * step_s
  train_names = [n for n in ("ref_logps", "old_logps", "train_step") if n in fns]
  if train_names:
    est["train"] = sum(fns[n]["estimated_seconds"] for n in train_names)
    flops = sum(fns[n]["model_flops"] for n in train_names)
    report["train_model_flops"] = flops
    report["mfu_estimate"] = flops / (report["num_devices"] * chip.peak_flops * est["train"])
  report["estimated_seconds"] = est
  report["step_seconds_estimate"] = sum(est.values()) if est else None


# ------------------------------------------------------------------------------------------------
# Report.
# ------------------------------------------------------------------------------------------------
def advice(report, config):
  """What to change when the step does not fit (largest lever first), as config overrides."""
  out = []
  worst = report["step_peak_function"] or ""
  if worst.startswith("train_step") or worst in ("ref_logps", "old_logps"):
    out.append(f"more micro-batches: --config.grad_accum_steps={2 * int(config.grad_accum_steps)} "
               "(activations and logits scale with rows per micro-batch)")
    if not config.model.use_remat:
      out.append("rematerialise each layer: --config.model.use_remat=True")
    if not config.model.freeze_vision:
      out.append("freeze the vision tower: --config.model.freeze_vision=True (no vision gradients "
                 "or Adam moments)")
  if worst in ("prefill", "decode"):
    out.append("fewer prompts per step (--config.data.batch_size) or a shorter completion "
               "(--config.sampling.max_new_tokens): the KV cache scales with both")
  opt = report["resident_bytes"]["optimizer"]
  if opt > 0.25 * report["hbm_bytes_per_device"]:
    out.append(f"the optimizer state alone is {opt / GIB:.1f} GiB per device: shard it over more "
               "devices (a larger slice), or keep Adam's moments in bf16 (optax's mu_dtype; "
               "not a config key yet)")
  out.append("a larger slice (the mesh presets put the extra devices on fsdp)")
  if not int(config.lora.rank):
    out.append("LoRA adapters instead of full fine-tuning: --config.lora.rank=16 (no optimizer "
               "state for the base model; with beta > 0 no second copy of the weights)")
  return out


def format_report(report, config=None):
  """The human-readable tables."""
  hbm = report["hbm_bytes_per_device"]
  g = lambda b: "-" if b is None else f"{b / GIB:8.2f}"  # noqa: E731
  lines = [f"topology {report['topology']} ({report['platform']}, {report['num_devices']} x "
           f"{report['device_kind']}), mesh {report['mesh']}, HBM {hbm / GIB:.2f} GiB per device",
           f"{report['param_count']:,} parameters ({report['trainable_param_count']:,} trainable); "
           f"resident per device: state {g(report['resident_bytes']['state']).strip()} GiB "
           f"(optimizer {g(report['resident_bytes']['optimizer']).strip()}), reference "
           f"{g(report['resident_bytes']['ref_params']).strip()} GiB", "",
           f"{'function':18s} {'args':>8s} {'output':>8s} {'temp':>8s} {'alias':>8s} {'code':>8s} "
           f"{'peak':>8s} {'in step':>8s} {'HBM':>8s} {'TFLOP':>9s} {'est. s':>8s} {'compile s':>9s}"
           "   (GiB per device)"]
  for name, f in report["functions"].items():
    lines.append(
        f"{name:18s} {g(f['argument_bytes'])} {g(f['output_bytes'])} {g(f['temp_bytes'])} "
        f"{g(f['alias_bytes'])} {g(f['generated_code_bytes'])} {g(f['peak_bytes'])} "
        f"{g(f['step_peak_bytes'])} {g(hbm)} {f['flops'] / 1e12:9.3f} "
        f"{f['estimated_seconds']:8.4f} {f['compile_seconds']:9.1f}")
  lines.append("(decode: one step of the loop, one token per row; TFLOP per device; 'in step' = "
               "peak + the step's other resident buffers)")
  peak = report["step_peak_bytes"]
  if peak is not None:
    lines.append("")
    lines.append(f"step peak {peak / GIB:.2f} GiB per device ({report['step_peak_function']}) vs "
                 f"HBM {hbm / GIB:.2f} GiB")
    for name in report.get("out_of_memory", ()):
      lines.append(f"{name}: rejected by the compiler: {report['functions'][name]['out_of_memory']}")
    if report["fits"]:
      lines.append(f"verdict: FITS with {report['headroom_bytes'] / GIB:.2f} GiB to spare")
    else:
      least = "at least " if report.get("out_of_memory") else ""
      over = max(-report["headroom_bytes"], 0.0)
      lines.append(f"verdict: DOES NOT FIT by {least}{over / GIB:.2f} GiB; change:")
      lines.extend(f"  - {a}" for a in (advice(report, config) if config is not None else []))
  est = report.get("estimated_seconds") or {}
  if est and np.isfinite(report["step_seconds_estimate"]):
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in est.items())
    lines.append(f"step time estimate (XLA, ideal overlap, lower bound): "
                 f"{report['step_seconds_estimate']:.2f} s ({parts})")
  if report.get("mfu_estimate") is not None and np.isfinite(report["mfu_estimate"]):
    lines.append(f"train-phase MFU estimate (upper bound): {100 * report['mfu_estimate']:.1f}% "
                 f"({report['train_model_flops'] / 1e15:.2f} PFLOP of matmuls per step)")
  if np.isfinite(report.get("rollout_tokens_per_second") or float("nan")):
    d = report["functions"]["decode"]
    lines.append(f"rollout: {d['bytes_accessed'] / GIB:.2f} GiB read per decode step per device "
                 f"-> {report['rollout_tokens_per_second']:,.0f} tokens/s for the slice "
                 f"({d['decode_step_seconds'] * 1e3:.1f} ms per step, {report['shapes']['rows']} rows)")
  return "\n".join(lines)


def to_json(report):
  return {k: v for k, v in report.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def main(argv):
  del argv
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("--config is required")
  topology = flags.FLAGS.topology
  target = local_target() if topology == "local" else tpu_target(topology)
  hw = tuple(int(x) for x in flags.FLAGS.video_hw.split(","))
  try:
    report = plan(config, target, text_tokens=flags.FLAGS.text_tokens, video_hw=hw,
                  functions=flags.FLAGS.functions, hlo_dir=flags.FLAGS.hlo_dir, log=logging.info)
  except config_lib.ConfigError as e:  # every problem in one message, without a traceback
    raise SystemExit(f"error: {e}") from None
  print(format_report(report, config))
  if flags.FLAGS.json:
    with open(flags.FLAGS.json, "w") as f:
      json.dump(to_json(report), f, indent=2)


def define_flags(fv=flags.FLAGS):
  """The planner's flags, defined only when run as a program (as train.py's): --config is the
  trainer's (the same files, packaged configs, arguments and --config.x=... overrides)."""
  config_flags.DEFINE_config_file("config", None, "Training config, as for train.py "
                                  "(configs/sgrlvr.py[:args] or sgrlvr:size=7b).",
                                  lock_config=True, flag_values=fv)
  flags.DEFINE_string("topology", "local", "Cloud TPU slice name (v4-8, v5e-1, v5e-8, v5p-8, v6e-8, "
                      "v5p-32, ...) or local (the devices present).", flag_values=fv)
  flags.DEFINE_string("json", None, "Write the report as JSON to this file.", flag_values=fv)
  flags.DEFINE_integer("text_tokens", 512, "Text tokens per prompt besides the video span (an "
                       "SG-RLVR cognitive-map multiple-choice prompt with 16 categories is 501 "
                       "Qwen2.5 tokens with the chat template).", flag_values=fv)
  flags.DEFINE_string("video_hw", "480,640", "Source video frame height,width (ScanNet's 480x640) "
                      "resized with the config's pixel budget.", flag_values=fv)
  flags.DEFINE_list("functions", None, "Only these functions (default: all).", flag_values=fv)
  flags.DEFINE_string("hlo_dir", None, "Write each function's optimized HLO text here.",
                      flag_values=fv)


if __name__ == "__main__":
  cli.run(main, define_flags, __doc__)

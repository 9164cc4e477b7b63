"""The planner (spacer_jax.plan): TPU compile of the smoke recipe on this CPU host, the local plan
against a real step, and libtpu leaving the first `import jax` on CPU."""

import importlib.metadata
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from spacer_jax import config_lib, modeling, plan, sampling, sharding, train
from spacer_jax.configs import sgrlvr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _libtpu():
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None


needs_libtpu = pytest.mark.skipif(_libtpu() is None,
                                  reason="libtpu not installed (pip install -r requirements-test.txt)")


def _smoke(**overrides):
  c = sgrlvr.get_config("smoke")
  # Short prompts: the planner's mechanics, not the smoke recipe's 1024-token bucket.
  c.data.prompt_buckets = (64,)
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


@needs_libtpu
def test_first_import_of_jax_stays_on_cpu_with_libtpu_installed():
  """A bare `import jax` on a host without TPU chips: CPU backend, no hang (no JAX_PLATFORMS)."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  out = subprocess.run(
      [sys.executable, "-c", "import jax; print(jax.default_backend(), jax.devices()[0].platform)"],
      env=env, capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.split() == ["cpu", "cpu"], out.stderr[-2000:]


# The fields the issue's --json promises (per function too).
REPORT_FIELDS = ("topology", "platform", "num_devices", "hbm_bytes_per_device", "fits", "param_count",
                 "step_peak_bytes", "step_peak_function", "mfu_estimate", "functions")
FUNCTION_FIELDS = ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes",
                   "flops", "estimated_seconds", "compile_seconds")


@needs_libtpu
def test_tpu_plan_of_the_tiny_train_step(tmp_path):
  """v5p-8 (4 chips of 95 GB): the tiny recipe's train_step compiles for TPU on this CPU host;
  shapes, mesh, JSON fields and the verdict line."""
  config = _smoke()
  report = plan.plan(config, plan.tpu_target("v5p-8"), text_tokens=24, workdir=str(tmp_path),
                     functions=("train_step",), log=lambda *_: None)
  assert jax.default_backend() == "cpu"  # the abstract TPU devices never became local ones
  assert report["platform"] == "tpu" and report["num_devices"] == 4
  assert report["device_kind"].startswith("TPU v5")
  assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  # The HBM the TPU compiler allows a v5p program (not the vendor's rounder "95 GB").
  v5p = plan.tpu_target("v5p-8").devices[0]
  assert report["hbm_bytes_per_device"] == plan.compiler_hbm_bytes(v5p)
  s = report["shapes"]
  assert (s["prompts"], s["generations"], s["prompt_bucket"], s["completion"]) == (2, 2, 64, 8)
  back = json.loads(json.dumps(plan.to_json(report)))
  assert all(k in back for k in REPORT_FIELDS), sorted(back)
  step = back["functions"]["train_step"]
  assert all(isinstance(step[k], (int, float)) for k in FUNCTION_FIELDS), step
  # Donated state: the output state aliases the input state, and the peak holds the arguments.
  assert step["alias_bytes"] > 0 and step["peak_bytes"] >= step["argument_bytes"]
  # Only train_step compiled: its extra resident is the reference's copy of the trained params
  # (beta > 0 in the smoke recipe; without LoRA that is every param).
  assert back["step_peak_function"] == "train_step"
  assert back["step_peak_bytes"] == step["peak_bytes"] + report["resident_bytes"]["ref_params"]
  assert report["resident_bytes"]["ref_params"] > 0
  assert back["fits"] and 0 < back["mfu_estimate"] < 1
  assert back["param_count"] == report["trainable_param_count"] > 0
  text = plan.format_report(report, config)
  assert "verdict: FITS with" in text and "DOES NOT FIT" not in text


@needs_libtpu
def test_tpu_plan_of_a_step_that_does_not_fit(tmp_path):
  """A 5.1B-parameter variant of the tiny model (wide MLPs, 6 layers) on a v5e-4 (16 GB chips):
  fp32 params + Adam moments alone are 14.3 GiB per chip. The TPU compiler rejects the step for
  its HBM; the plan says so, by at least how much, and what to change."""
  config = _smoke()
  config.model.tiny_overrides = ml_collections.ConfigDict(dict(
      hidden_size=3584, intermediate_size=75776, num_hidden_layers=6,
      mrope_section=(192, 128, 128)))
  report = plan.plan(config, plan.tpu_target("v5e-4"), text_tokens=24, workdir=str(tmp_path),
                     functions=("train_step",), log=lambda *_: None)
  step = report["functions"]["train_step"]
  assert report["out_of_memory"] == ["train_step"] and "HBM" in step["out_of_memory"]
  assert not report["fits"] and report["param_count"] > 5e9
  assert step["peak_bytes"] >= step["argument_bytes"] > report["hbm_bytes_per_device"] * 0.9
  text = plan.format_report(report, config)
  over = -report["headroom_bytes"] / plan.GIB
  assert f"verdict: DOES NOT FIT by at least {over:.2f} GiB; change:" in text
  assert "train_step: rejected by the compiler: RESOURCE_EXHAUSTED" in text
  assert "--config.grad_accum_steps=2" in text and "--config.model.use_remat=True" in text
  assert "--config.lora.rank=16" in text and "optimizer state alone" in text


@needs_libtpu
def test_hbm_per_chip_is_what_the_tpu_compiler_allows():
  """The planner's HBM per chip is the limit the TPU compiler checks programs against (what a
  real chip's runtime offers), read from the compiler; figures for the pinned libtpu."""
  gib = 2 ** 30
  for topology, usable in (("v5p-8", 95.74), ("v5e-8", 15.75), ("v6e-8", 31.25)):
    target = plan.tpu_target(topology)
    assert abs(target.chip.hbm_bytes / gib - usable) < 0.005, (topology, target.chip.hbm_bytes)
    assert target.chip.hbm_bytes > 0.9 * plan.CHIPS[topology.split("-")[0]].hbm_bytes


@needs_libtpu
def test_compile_budget_binds_the_tpu_compiler():
  """compile_function(hbm_budget=B) makes the TPU compiler plan within B bytes: a program that
  fits the chip is refused under a smaller budget (the planner passes the chip's HBM less the
  step's other resident buffers), and the refusal is reported, not raised."""
  device = plan.tpu_target("v5e-1").devices[0]
  one = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array([device]), ("x",)),
                                   jax.sharding.PartitionSpec())
  fn = jax.jit(lambda x: jnp.sort(jnp.outer(x, x), axis=0)[0], in_shardings=one,
               out_shardings=one)
  x = jax.ShapeDtypeStruct((8192,), jnp.float32, sharding=one)  # a 256 MiB temporary
  compiled, fig = plan.compile_function(fn, (x,))
  assert compiled is not None and fig["temp_bytes"] >= 8192 * 8192 * 4
  compiled, fig = plan.compile_function(fn, (x,), hbm_budget=64 * 2 ** 20)
  assert compiled is None and "RESOURCE_EXHAUSTED" in fig["out_of_memory"]
  assert fig["peak_bytes"] >= 8192 * 8192 * 4
  # The trainer's route (train.make_train_step / make_logps_fn on a TPU): the same options on the
  # jit reach the compiler.
  budgeted = jax.jit(lambda x: jnp.sort(jnp.outer(x, x), axis=0)[0], in_shardings=one,
                     out_shardings=one, compiler_options=train.hbm_budget_options(64 * 2 ** 20))
  with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
    budgeted.lower(x).compile()


def test_tpu_budget_options_leave_the_residents_out(monkeypatch):
  """On a TPU the trainer compiles within the chip's usable HBM less the resident bytes; other
  backends get no options."""
  assert train.tpu_budget_options(1) is None  # CPU

  class FakeTpu:
    platform = "tpu"

    def memory_stats(self):
      return {"bytes_limit": 16 * 2 ** 30}

  monkeypatch.setattr(jax, "local_devices", lambda: [FakeTpu()])
  assert train.tpu_budget_options(4 * 2 ** 30) == {"xla_tpu_max_hbm_size_mib": str(12 * 1024)}


def test_out_of_memory_messages():
  msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
         "hbm. Used 99.50G of 95.74G hbm. Exceeded hbm capacity by 3.76G.")
  assert plan.out_of_memory_bytes(msg, 0) == int(99.5 * 2 ** 30)
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (40.00G) exceeds available HBM (15.75G).")
  assert plan.out_of_memory_bytes(msg, 0) == 40 * 2 ** 30
  assert plan.out_of_memory_bytes(msg, 50 * 2 ** 30) == 50 * 2 ** 30
  assert plan.out_of_memory_bytes("INVALID_ARGUMENT: bad shape", 0) is None


def test_plan_command_writes_the_json(tmp_path):
  """python -m spacer_jax.plan with the trainer's --config.x overrides and --topology=local (the
  vision encoder alone: the command's flags, config and --json, not another compile test)."""
  out = tmp_path / "plan.json"
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "HOME": str(tmp_path)}
  run = subprocess.run(
      [sys.executable, "-m", "spacer_jax.plan", "--config=configs/sgrlvr.py:smoke",
       "--config.data.prompt_buckets=(64,)", "--config.data.batch_size=4", "--topology=local",
       "--text_tokens=24", "--functions=vision_encoder", f"--json={out}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["topology"] == "local" and report["platform"] == "cpu"
  assert report["shapes"]["prompts"] == 4 and set(report["functions"]) == {"vision_encoder"}
  assert report["functions"]["vision_encoder"]["peak_bytes"] > 0
  assert "vision_encoder" in run.stdout and "topology local (cpu" in run.stdout


@needs_libtpu
@pytest.mark.slow
def test_tpu_plan_of_the_smoke_recipe(tmp_path):
  """v5p-8 (4 chips): every function compiles for TPU; shapes, residents and the verdict agree.
  With the real recipe's remat (token_logps once failed to trace with it)."""
  config = _smoke(**{"model.use_remat": True})
  report = plan.plan(config, plan.tpu_target("v5p-8"), text_tokens=24, workdir=str(tmp_path),
                     log=lambda *_: None)
  assert report["platform"] == "tpu" and report["num_devices"] == 4
  assert set(report["functions"]) == {"vision_encoder", "prefill", "decode", "ref_logps",
                                      "train_step"}
  step = report["functions"]["train_step"]
  assert step["alias_bytes"] > 0 and step["peak_bytes"] >= step["argument_bytes"]
  assert report["fits"] and report["step_peak_bytes"] <= report["hbm_bytes_per_device"]
  assert report["rollout_tokens_per_second"] > 0 and 0 < report["mfu_estimate"] < 1
  text = plan.format_report(report, config)
  assert "verdict: FITS" in text and "rollout:" in text


@needs_libtpu
def test_tpu_plan_of_a_lora_step_on_one_chip(tmp_path):
  """v5e-1 (one chip, as Colab's TPU runtime has): with LoRA only the adapters are trained and held
  in the optimizer, and the reference log-probs run on the base with no second copy of weights."""
  config = _smoke()
  config.lora.rank = 4
  report = plan.plan(config, plan.tpu_target("v5e-1"), text_tokens=24, workdir=str(tmp_path),
                     functions=("ref_logps", "train_step"), log=lambda *_: None)
  assert report["num_devices"] == 1 and report["device_kind"].startswith("TPU v5 lite")
  assert report["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
  assert report["resident_bytes"]["ref_params"] == 0
  assert 0 < report["trainable_param_count"] < report["param_count"] / 5
  assert set(report["functions"]) == {"ref_logps", "train_step"} and report["fits"]
  assert "--config.lora.rank" not in plan.format_report(report, config)


def test_slice_names():
  with pytest.raises(ValueError, match="v5p-8"):
    plan.tpu_target("v5p-7")
  with pytest.raises(ValueError, match="Cloud TPU slice name"):
    plan.tpu_target("a100-8")
  with pytest.raises(ValueError, match="v5e-1, "):
    plan.tpu_target("v5e-2")


def test_bad_config_is_rejected_before_compiling(tmp_path):
  """The trainer's config checks run first (not the paths: no data or checkpoint on this host)."""
  config = _smoke(**{"grpo.num_generations": 1})
  with pytest.raises(config_lib.ConfigError, match="grpo.num_generations"):
    plan.plan(config, plan.local_target(), workdir=str(tmp_path), log=lambda *_: None)


def test_published_size_without_a_checkpoint():
  """A real size plans from the directory name alone (nothing is read)."""
  config = sgrlvr.get_config("size=7b")
  assert not os.path.exists(os.path.join(config.model.hf_dir, "config.json"))
  cfg = train.make_model_config(config, None)
  assert (cfg.hidden_size, cfg.num_hidden_layers) == (3584, 28)
  with pytest.raises(FileNotFoundError, match="no published Qwen2.5-VL size"):
    modeling.published_config("/ckpt/my-model")


def test_matmul_flops_counts_scan_trips():
  def f(x, w):
    return jax.lax.scan(lambda c, xi: (c + (xi @ w).sum(), None), 0.0, x)[0]
  jaxpr = jax.make_jaxpr(f)(jnp.zeros((5, 3, 4)), jnp.zeros((4, 6))).jaxpr
  assert plan.matmul_flops(jaxpr) == 5 * 2 * 3 * 4 * 6
  assert plan.matmul_flops(jaxpr, scan_trips=False) == 2 * 3 * 4 * 6


def test_local_plan_matches_the_compiled_step_and_a_real_run(tmp_path):
  """`local` on the 8 simulated CPU devices. The planner's train_step is compiled from abstract
  arguments; here the trainer's step is built by the same train.make_* functions, compiled and run
  on real arrays of the same recipe.

  Compared: (1) the planner's memory figures with the real executable's memory_analysis (same
  program, same shardings, so they are equal); (2) the bytes that stay allocated after a real step
  (jax.live_arrays on device 0: new state, batch, reference log-probs, metrics) with the plan's
  argument + output - alias bytes. XLA:CPU reports no device memory statistics, so the temporaries
  inside the step (the rest of the peak) cannot be observed on this host.
  """
  config = _smoke()
  report = plan.plan(config, plan.local_target(), text_tokens=24, workdir=str(tmp_path),
                     log=lambda *_: None, functions=("train_step",))
  assert report["platform"] == "cpu" and report["num_devices"] == jax.device_count()
  fig = report["functions"]["train_step"]

  mesh = sharding.make_mesh(config.mesh)
  rules = config_lib.sharding_rules(config)
  phases = train.make_phases(config)
  tokenizer = train.make_tokenizer(config, str(tmp_path))
  setup = train.make_train_setup(config, train.make_abstract_model(config, tokenizer, mesh), phases)
  abstract = setup.abstract
  shapes = plan.recipe_shapes(config, abstract.config, text_tokens=24, video_hw=(480, 640),
                              phase="grpo")
  sampler = sampling.Sampler(abstract.merge(), mesh=mesh, vision_budget="auto")
  _, tb = plan.host_batches(abstract.config, shapes, sampler)
  tb["pixel_values_videos"] = np.zeros(tb["pixel_values_videos"].shape, np.float32)
  assert phases.num_iterations == 1  # (else the plan's batch also holds old_logps)
  with jax.set_mesh(mesh):
    tb = jax.device_put(tb, train.batch_shardings(tb, mesh, rules))
    state = train.init_state(modeling.load_params(modeling.RANDOM, abstract, seed=0), setup, 0)
    ref = jax.device_put(np.zeros(tb["completion_ids"].shape, np.float32),
                         sharding.batch_sharding(mesh, rules, tb["completion_ids"].shape))
  shard_of = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
  step = train.make_train_step(abstract, setup, mode="grpo",
                               grpo_config=config_lib.make_grpo_config(config),
                               num_micro=int(config.grad_accum_steps),
                               batch_shardings_=shard_of(tb), ref_shardings=shard_of(ref))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    compiled = step.lower(state, tb, ref).compile()
  mem = compiled.memory_analysis()
  assert fig["argument_bytes"] == mem.argument_size_in_bytes
  assert fig["output_bytes"] == mem.output_size_in_bytes
  assert fig["alias_bytes"] == mem.alias_size_in_bytes
  assert fig["peak_bytes"] == mem.peak_memory_in_bytes

  old_state = state
  state, metrics = compiled(state, tb, ref)
  jax.block_until_ready((state, metrics))
  assert all(x.is_deleted() for x in jax.tree.leaves(old_state["params"]))  # donated
  dev = jax.devices()[0]
  leaves = jax.tree.leaves((state, tb, ref, metrics))
  live = sum(s.data.nbytes for a in leaves for s in a.addressable_shards if s.device == dev)
  expected = fig["argument_bytes"] + fig["output_bytes"] - fig["alias_bytes"]
  # XLA sizes each buffer rounded up to its alignment (64 bytes on CPU): scalars count 64.
  assert 0 <= expected - live <= 64 * len(leaves), (live, expected)

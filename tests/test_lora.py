"""LoRA: the adapted Linear, the abstract model with adapters, the GRPO step that trains only the
adapters against the frozen base as reference, merging, and peft files read by peft itself."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ATOL_LAYER, ATOL_MODEL, two_video_prompts
from spacer_jax import config_lib, lora, modeling, rollout, sampling, sharding, train
from spacer_jax.models import layers, qwen2_5_vl

TEXT = config_lib.LORA_TARGETS["text"]
ALL = config_lib.LORA_TARGETS["all"]


# ------------------------------------------------------------------------------------------------
# The layer and the abstract model.


def test_linear_with_adapters_is_base_plus_scaled_low_rank_update():
  rngs = nnx.Rngs(0)
  lin = layers.Linear(7, 5, use_bias=True, axes=("heads", "embed"), rngs=rngs)
  x = np.random.default_rng(0).normal(size=(2, 3, 7)).astype(np.float32)
  base = np.asarray(lin(x))
  lin.add_lora(3, scale=2.5, dropout=0.5, rngs=rngs)
  a = np.asarray(lin.lora_A.weight[...])
  assert a.shape == (3, 7) and lin.lora_B.weight[...].shape == (5, 3)
  assert np.abs(a).max() <= 1 / np.sqrt(7)  # peft's kaiming_uniform(a=sqrt(5)) bound
  np.testing.assert_array_equal(np.asarray(lin(x)), base)  # B = 0: the base layer
  b = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
  lin.lora_B.weight.set_value(jnp.asarray(b))
  want = base + 2.5 * x @ a.T @ b.T
  # No dropout outside a train step's lora_dropout context (sampling, evaluation, log-probs).
  np.testing.assert_allclose(np.asarray(lin(x)), want, atol=ATOL_LAYER)
  with layers.lora_dropout(jax.random.PRNGKey(0)):
    dropped = np.asarray(lin(x))
  assert not np.allclose(dropped, want, atol=1e-3)
  with layers.lora_dropout(jax.random.PRNGKey(0)):
    np.testing.assert_array_equal(np.asarray(lin(x)), dropped)  # keyed: reproducible


def test_abstract_model_with_adapters():
  cfg = qwen2_5_vl.tiny()
  cfg_lora = lora.LoraConfig(rank=4, alpha=8.0, targets=ALL, base_param_dtype="bfloat16",
                             train_also=(r"^model\.norm\.",))
  mesh = sharding.make_mesh([("data", 1), ("fsdp", 4), ("tensor", 2)])
  plain = modeling.abstract_model(cfg, mesh=mesh, rules=config_lib.FSDP_TP_RULES)
  a = modeling.abstract_model(cfg, mesh=mesh, rules=config_lib.FSDP_TP_RULES, lora=cfg_lora)
  adapters = [k for k in a.params if lora.is_adapter_key(k)]
  # 7 per decoder layer, 5 per vision block, 2 in the merger; each an A and a B.
  assert len(adapters) == 2 * (7 * cfg.num_hidden_layers + 5 * cfg.vision_depth + 2)
  assert set(a.params) - set(adapters) == set(plain.params)
  assert a.base.params.keys() == plain.params.keys() and a.base.graphdef == plain.graphdef
  # Base weights keep their shardings; A is sharded like the layer's input, B like its output.
  for k in plain.params:
    assert a.params[k].sharding == plain.params[k].sharding, k
  q = "model.layers.1.self_attn.q_proj"
  assert a.logical[q + ".lora_A.weight"] == (None, "embed")
  assert a.logical[q + ".lora_B.weight"] == ("heads", None)
  assert a.params[q + ".lora_A.weight"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert a.params[q + ".lora_B.weight"].sharding.spec == jax.sharding.PartitionSpec("tensor")
  # Frozen base in base_param_dtype; adapters and train_also in param_dtype.
  assert {str(a.params[k].dtype) for k in adapters} == {"float32"}
  assert a.params["model.norm.weight"].dtype == jnp.float32
  assert a.params[q + ".weight"].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match=r"embed_tokens.*match no Linear layer"):
    modeling.abstract_model(cfg, lora=lora.LoraConfig(rank=2, alpha=2.0, targets=(r"embed_tokens",)))


def test_merge_lora_equals_adapters_and_keeps_shardings():
  cfg = qwen2_5_vl.tiny()
  mesh = sharding.make_mesh(config_lib.MESH_FSDP)
  a = modeling.abstract_model(cfg, mesh=mesh, rules=config_lib.FSDP_RULES,
                              lora=lora.LoraConfig(rank=3, alpha=6.0, targets=ALL))
  params = _with_random_b(modeling.load_params(modeling.RANDOM, a, seed=1))
  merged = lora.merge_lora(params, a.lora)
  assert merged.keys() == a.base.params.keys()
  for k, v in merged.items():
    assert v.sharding == a.params[k].sharding and v.dtype == a.params[k].dtype, k
  ids = np.random.default_rng(0).integers(0, 100, (2, 9))
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(np.asarray(a.base.merge(merged)(ids)),
                               np.asarray(a.merge(params)(ids)), atol=ATOL_MODEL)


def _with_random_b(params, std=0.05, seed=0):
  """Adapters that change the model (fresh ones have B = 0)."""
  rng = np.random.default_rng(seed)
  return {k: (v + std * rng.standard_normal(v.shape).astype(np.float32)
              if k.endswith(".lora_B.weight") else v) for k, v in params.items()}


# ------------------------------------------------------------------------------------------------
# The GRPO step: only adapters move; the reference is the base model, exactly.


def _config(**lora_overrides):
  from spacer_jax.configs import sgrlvr  # pylint: disable=g-import-not-at-top
  c = sgrlvr.get_config("smoke,lora=4")
  c.grpo.beta = 0.04
  for k, v in lora_overrides.items():
    c.lora[k] = v
  return c


def _batch(cfg, g=2):
  """A TrainBatch of 2 video prompts x G completions (random tokens: no sampler compile)."""
  rng = np.random.default_rng(0)
  ids, mask, pv, grid = two_video_prompts(cfg, rng)
  prepared = sampling.Sampler(qwen2_5_vl.init_model(cfg)).prepare(
      ids, mask, pixel_values_videos=pv, video_grid_thw=grid, second_per_grid_ts=np.ones(2))
  tokens = rng.integers(0, 100, (2 * g, 6))
  tb = rollout.assemble(prepared, tokens, np.array([6, 3, 5, 2]), g)
  tb["advantages"] = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
  return tb


def _grpo_step(config, devices):
  """One GRPO step through make_train_setup / make_train_step on `devices`; returns what the
  acceptance checks need."""
  cfg = qwen2_5_vl.tiny()
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  rules = config_lib.sharding_rules(config)
  phases = train.make_phases(config)
  setup = train.make_train_setup(
      config, modeling.abstract_model(cfg, mesh=mesh, rules=rules), phases)
  params = _with_random_b(modeling.load_params(modeling.RANDOM, setup.abstract, seed=0))
  params = jax.device_put(params, setup.abstract.shardings)
  state = train.init_state(params, setup, 0)
  with jax.set_mesh(mesh):
    tb = _batch(cfg)
    tb = jax.device_put(tb, train.batch_shardings(tb, mesh, rules))
    ref_fn = train.make_logps_fn(setup.reference, 1)
    ref = ref_fn(setup.ref_params(state["params"], {}), tb)
    policy = train.make_logps_fn(setup.abstract, 1)(state["params"], tb)
    # The base model as a user has it: no LoRA at all, the same base weights.
    base = modeling.abstract_model(cfg, mesh=mesh, rules=rules)
    base_logps = train.make_logps_fn(base, 1)(
        modeling.load_params(modeling.RANDOM, base, seed=0), tb)
    before = jax.tree.map(np.asarray, state["params"])
    step = train.make_train_step(
        setup.abstract, setup, mode="grpo", grpo_config=config_lib.make_grpo_config(config),
        num_micro=1, batch_shardings_=jax.tree.map(lambda x: x.sharding, tb),
        ref_shardings=ref.sharding)
    new_state, metrics = step(state, tb, ref)
    ref_after = ref_fn(setup.ref_params(new_state["params"], {}), tb)
  return dict(setup=setup, before=before, after=jax.tree.map(np.asarray, new_state["params"]),
              metrics=jax.device_get(metrics), ref=np.asarray(ref), ref_after=np.asarray(ref_after),
              policy=np.asarray(policy), base=np.asarray(base_logps), tb=tb)


@pytest.fixture(scope="module")
def one_device_step():
  return _grpo_step(_config(), jax.devices()[:1])


def test_grpo_step_trains_only_adapters_against_the_base_as_reference(one_device_step):
  r = one_device_step
  setup = r["setup"]
  assert setup.trainable_keys == tuple(sorted(k for k in setup.abstract.params
                                              if lora.is_adapter_key(k)))
  assert all(k.startswith("model.layers.") for k in setup.trainable_keys)  # text targets only
  # The optimizer holds the adapters only; the reference is the base, shared: nothing is loaded.
  opt_leaves = jax.tree.leaves(setup.abstract_state["opt_state"])
  assert sum(x.size for x in opt_leaves) <= 2 * sum(
      setup.abstract.params[k].size for k in setup.trainable_keys) + 16
  assert setup.ref_loaded_keys == () and set(setup.ref_shared_keys) == set(setup.abstract.base.params)
  # Reference log-probs are the base model's, exactly (before and after the step); the policy's
  # differ (B != 0).
  mask = r["tb"]["completion_mask"] > 0
  np.testing.assert_array_equal(r["ref"], r["base"])
  np.testing.assert_array_equal(r["ref_after"], r["base"])
  assert np.abs(r["policy"] - r["ref"])[mask].max() > 1e-4
  assert r["metrics"]["kl"] > 0 and r["metrics"]["skipped"] == 0
  changed = {k for k in r["before"] if not np.array_equal(r["before"][k], r["after"][k])}
  assert changed and changed <= set(setup.trainable_keys)
  assert any(k.endswith("lora_A.weight") for k in changed)


def test_grpo_step_with_lora_on_8_devices_equals_1_device(one_device_step):
  r1, r8 = one_device_step, _grpo_step(_config(), jax.devices()[:8])
  a = r8["setup"].abstract.params["model.layers.0.self_attn.q_proj.lora_A.weight"]
  assert a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  np.testing.assert_array_equal(r8["ref"], r8["base"])
  np.testing.assert_allclose(r8["metrics"]["loss"], r1["metrics"]["loss"], rtol=1e-5, atol=1e-7)
  for k in r1["setup"].trainable_keys:
    np.testing.assert_allclose(r8["after"][k], r1["after"][k], atol=1e-6, err_msg=k)


def test_train_also_reference_keeps_the_initial_copy():
  """A parameter trained in full next to the adapters is loaded once more for the reference (the
  policy's copy moves); every other base parameter is shared."""
  config = _config(train_also=(r"^model\.norm\.",))
  cfg = qwen2_5_vl.tiny()
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  abstract = modeling.abstract_model(cfg, mesh=mesh, rules=config_lib.sharding_rules(config))
  setup = train.make_train_setup(config, abstract, train.make_phases(config))
  assert "model.norm.weight" in setup.trainable_keys
  assert setup.ref_loaded_keys == ("model.norm.weight",)
  assert "model.norm.weight" not in setup.ref_shared_keys


# ------------------------------------------------------------------------------------------------
# peft files, read by peft on the transformers model.


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
  from test_qwen2_5_vl import make_hf_model  # pylint: disable=g-import-not-at-top
  pytest.importorskip("torch")
  cfg = qwen2_5_vl.tiny()
  path = tmp_path_factory.mktemp("lora_base")
  make_hf_model(cfg).save_pretrained(path)
  return cfg, str(path)


def _image_inputs(cfg):
  """One image + text prompt (the vision adapters matter): ids, pixels, grid, HF's token types."""
  rng = np.random.default_rng(3)
  grid = np.array([[1, 4, 6]])
  n = int(grid.prod()) // cfg.spatial_merge_size ** 2
  ids = np.array([[5, 6, cfg.vision_start_token_id] + [cfg.image_token_id] * n
                  + [cfg.vision_end_token_id, 7, 8, 9]])
  pv = rng.normal(size=(int(grid.prod()), 3 * 2 * 14 * 14)).astype(np.float32)
  return ids, pv, grid


def _hf_logits(model, ids, pv, grid):
  import torch  # pylint: disable=g-import-not-at-top
  types = (ids == qwen2_5_vl.tiny().image_token_id).astype(np.int64)  # transformers 5 rope index
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pv),
                 image_grid_thw=torch.as_tensor(grid),
                 mm_token_type_ids=torch.as_tensor(types)).logits.float().numpy()


@pytest.mark.hf
def test_peft_export_loads_in_peft_with_the_same_logits(hf_base, tmp_path):
  pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  import transformers  # pylint: disable=g-import-not-at-top
  cfg, base_dir = hf_base
  cfg_lora = lora.LoraConfig(rank=4, alpha=8.0, targets=ALL, train_also=(r"^model\.norm\.",))
  abstract = modeling.abstract_model(modeling.model_config(base_dir), lora=cfg_lora)
  params = _with_random_b(modeling.load_params(base_dir, abstract, seed=2), std=0.2)
  params["model.norm.weight"] = params["model.norm.weight"] * 1.5  # a module trained in full
  out = str(tmp_path / "adapter")
  lora.save_peft(params, abstract, out, base_model_name_or_path=base_dir)
  meta = json.loads(open(os.path.join(out, "adapter_config.json")).read())
  assert meta["r"] == 4 and meta["modules_to_save"] == ["model.language_model.norm"]
  assert "model.visual.merger.mlp.0" in meta["target_modules"]

  ids, pv, grid = _image_inputs(cfg)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(abstract.merge(params)(ids, pixel_values=pv, image_grid_thw=grid))
  hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir).float().eval()
  hf.config._attn_implementation = "eager"
  plain = _hf_logits(hf, ids, pv, grid)
  theirs = _hf_logits(peft.PeftModel.from_pretrained(hf, out).eval(), ids, pv, grid)
  assert np.abs(theirs - plain).max() > 1e-2  # the adapter changes the model
  np.testing.assert_allclose(ours, theirs, atol=ATOL_MODEL, rtol=0)

  # Import: the directory back into the Flax model, alone (load_model) or as a trainer would.
  back = lora.load_peft(out, abstract)
  assert back.keys() == set(lora.trainable_keys(params, cfg_lora))
  for k, v in back.items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(params[k]), err_msg=k)
  model = modeling.load_model(base_dir, adapter=out)
  assert model.model.layers[0].self_attn.q_proj.lora_A is not None
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(np.asarray(model(ids, pixel_values=pv, image_grid_thw=grid)),
                               theirs, atol=ATOL_MODEL, rtol=0)

  # Merged weights through the HF export are a plain checkpoint with the same logits.
  merged_dir = str(tmp_path / "merged")
  qwen2_5_vl.save_hf(abstract.base.merge(lora.merge_lora(params, cfg_lora)), merged_dir)
  merged = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(merged_dir).float().eval()
  merged.config._attn_implementation = "eager"
  got = _hf_logits(merged, ids, pv, grid)
  np.testing.assert_allclose(got, theirs, atol=ATOL_MODEL, rtol=0)


def test_load_peft_rejects_a_mismatched_adapter(hf_base, tmp_path):
  _, base_dir = hf_base
  cfg = modeling.model_config(base_dir)
  a = modeling.abstract_model(cfg, lora=lora.LoraConfig(rank=2, alpha=4.0, targets=TEXT))
  lora.save_peft(modeling.load_params(base_dir, a), a, str(tmp_path / "ad"))
  other = modeling.abstract_model(cfg, lora=lora.LoraConfig(rank=2, alpha=4.0, targets=ALL))
  with pytest.raises(ValueError, match=r"missing \(34\)"):
    lora.load_peft(str(tmp_path / "ad"), other)
  with pytest.raises(ValueError, match="rank 3"):
    lora.load_peft(str(tmp_path / "ad"), modeling.abstract_model(
        cfg, lora=lora.LoraConfig(rank=3, alpha=4.0, targets=TEXT)))
  cfg_peft = lora.config_from_peft(str(tmp_path / "ad"))
  assert (cfg_peft.rank, cfg_peft.alpha) == (2, 4.0)
  assert modeling.abstract_model(cfg, lora=cfg_peft).params.keys() == a.params.keys()


# ------------------------------------------------------------------------------------------------
# The trainer: SFT then SG-RLVR with LoRA, checkpoints, resume, export, the workdir as a model.


@pytest.mark.slow  # ~40 s idle: its own compiles of the sampler and steps for the LoRA graph
def test_train_and_evaluate_with_lora_sft_grpo_resume_and_export(tmp_path):
  from test_train import _smoke_config  # pylint: disable=g-import-not-at-top
  shared = tmp_path / "shared"
  targets = TEXT + (r"^visual\.blocks\.\d+\.attn\.qkv$",)
  config = _smoke_config(shared, sft_warmup_steps=1, sft_target="process", export_hf_subdir="hf",
                         **{"lora.rank": 4, "lora.targets": targets, "lora.dropout": 0.1})
  wd = tmp_path / "run"
  state, _ = train.train_and_evaluate(config, str(wd))
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["phase_sft"]) for r in rows] == [(1, 1.0), (2, 0.0)]
  assert rows[1]["compiles/token_logps_ref"] == 1 and "train/kl" in rows[1]
  assert json.loads((wd / "lora_config.json").read_text())["rank"] == 4
  # Only the adapters moved from the initial weights (the same random init, adapters fresh).
  abstract = modeling.abstract_model(modeling.model_config(wd), lora=modeling.run_lora_config(wd))
  init = modeling.load_params(modeling.RANDOM, abstract, seed=config.seed)
  moved = {k for k in init
           if not np.array_equal(np.asarray(init[k]), np.asarray(state["params"][k]))}
  assert moved and all(lora.is_adapter_key(k) for k in moved)
  assert any(k.startswith("visual.") for k in moved)
  # The final adapters in peft format; the merged weights as a plain HF checkpoint.
  assert (wd / "adapter" / "adapter_model.safetensors").is_file()
  assert lora.peft_keys(str(wd / "adapter")) == sorted(k for k in init if lora.is_adapter_key(k))
  ids = np.random.default_rng(0).integers(0, 100, (1, 7))
  with_adapters = np.asarray(abstract.merge(modeling.load_params(wd, abstract))(ids))
  merged_hf = np.asarray(modeling.load_model(str(wd / "hf"))(ids))
  np.testing.assert_allclose(merged_hf, with_adapters, atol=ATOL_MODEL)
  # The workdir read as a plain model (evaluate, generate, convert): adapters merged on load.
  np.testing.assert_allclose(np.asarray(modeling.load_model(wd)(ids)), with_adapters,
                             atol=ATOL_MODEL)
  # Rerunning with more steps resumes from ckpt/2: adapters and their optimizer state.
  config.total_steps = 3
  state3, _ = train.train_and_evaluate(config, str(wd))
  assert int(state3["step"]) == 3
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3]

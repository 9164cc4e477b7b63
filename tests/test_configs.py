"""Every config in spacer_jax/configs/ loads with each documented argument and with :smoke."""

import glob
import importlib.util
import json
import os

import pytest

from spacer_jax import cli, config_lib

CONFIG_DIR = cli.CONFIG_DIR
ARGS = {
    "sgrlvr.py": ["", "size=3b", "size=7b", "size=32b", "size=72b", "frames=32", "sharding=fsdp_tp",
                  "size=72b,sharding=fsdp", "smoke", "size=3b,smoke", "demo", "size=3b,lora=16",
                  "demo,lora=8", "smoke,lora=4,lora_targets=text+vision"],
    "grpo.py": ["", "size=3b", "size=72b", "frames=8", "sharding=fsdp_tp", "smoke", "lora=16,smoke"],
    "sft.py": ["", "size=3b", "size=72b", "target=process", "sharding=fsdp_tp", "smoke",
               "target=process,smoke", "lora=16"],
    "ablation.py": ["demo", "smoke"],  # "" is the demo recipe too (the sweep's arms live in sweep())
}
# Configs read by other entry points (spacer_jax.evaluate): they only have to load.
OTHER_ARGS = {
    "eval_vsibench.py": ["", "protocol=official", "protocol=spacer_default",
                         "demo,demo_workdir=/tmp/demo", "benchmark=stibench,aggregation=readme"],
    "eval_stibench.py": ["", "protocol=spacer_default", "aggregation=readme"],
    "eval_sparbench.py": ["", "protocol=spacer_default", "aggregation=readme"],
    "eval_videomme.py": ["", "protocol=spacer_default"],
    "eval_tempcompass.py": ["", "protocol=spacer_default"],
    "eval_longvideobench.py": ["", "protocol=spacer_default"],
}


def _load(name):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(CONFIG_DIR, name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_every_config_file_is_covered():
  files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                 if not p.endswith("__init__.py"))
  missing = set(files) - set(ARGS) - set(OTHER_ARGS)
  assert not missing, f"add the documented arguments of {missing} to ARGS"


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in OTHER_ARGS.items() for a in args])
def test_other_config_loads(name, arg):
  json.loads(_load(name).get_config(arg).to_json())


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in ARGS.items() for a in args])
def test_config_loads(name, arg):
  c = _load(name).get_config(arg)
  assert c.mode in ("grpo", "sft")
  json.loads(c.to_json())  # config.json is written from this
  assert {n for n, _ in c.mesh} == set(config_lib.MESH_AXES)
  rule_names = {n for n, _ in c.sharding_rules}
  assert {"batch", "embed", "heads", "vocab", "vision_embed"} <= rule_names
  if "smoke" in arg:
    assert c.model.variant == "tiny" and c.total_steps == 2 and c.data.source == "synthetic"
    assert c.grpo.num_generations == 2 and c.sampling.max_new_tokens == 8
  elif "demo" in arg:
    assert c.model.variant == "tiny" and c.data.source == "synthetic"
    assert 0 < c.sft_warmup_steps < c.total_steps and c.sft_warmup_steps % c.ckpt_every_steps == 0
  else:
    assert c.model.hf_dir and c.data.annotations and c.model.variant == ""
  if "size=72b" in arg and "sharding=fsdp" not in arg:
    assert dict(c.mesh)["tensor"] == 2
  assert c.lora.rank == (int(arg.split("lora=")[1].split(",")[0]) if "lora=" in arg else 0)
  lora = config_lib.make_lora_config(c)
  assert (lora is None) == (c.lora.rank == 0)
  if "lora_targets=text+vision" in arg:
    assert c.lora.targets == config_lib.LORA_TARGETS["text"] + config_lib.LORA_TARGETS["vision"]


def test_recipe_values():
  c = _load("sgrlvr.py").get_config("")
  assert (c.grpo.num_generations, c.grpo.beta, c.optim.lr, c.optim.wd, c.optim.grad_clip) == (
      8, 0.04, 1e-6, 0.01, 5.0)
  assert c.rewards.use_map and c.rewards.use_temporal and c.rewards.use_length
  assert c.optim.schedule == "cosine" and c.optim.warmup_steps == 0
  assert (c.sampling.temperature, c.sampling.top_p, c.sampling.top_k) == (1.0, 0.95, 50)
  g = _load("grpo.py").get_config("")
  assert not (g.rewards.use_map or g.rewards.use_temporal or g.rewards.use_length)
  assert not g.data.use_cogmap_prompt
  s = _load("sft.py").get_config("")
  assert s.mode == "sft" and s.optim.schedule == "linear" and s.optim.wd == 0.0
  e = _load("eval_vsibench.py")
  assert e.get_config("").repetition_penalty == 1.05  # SpaceR-Eval (docs/spacer_recipe.md, "Evaluation")
  assert e.get_config("protocol=official").repetition_penalty == 1.0
  assert e.get_config("demo,demo_workdir=/tmp/x").repetition_penalty == 1.0
  d = e.get_config("protocol=spacer_default")  # SpaceR-Eval's non-thinking mode
  assert (d.max_new_tokens, d.repetition_penalty, d.video.sampler) == (128, 1.05, "spacer_eval")
  sti = _load("eval_stibench.py").get_config("aggregation=readme")
  assert (sti.benchmark, sti.aggregation, sti.max_new_tokens) == ("stibench", "readme", 1024)
  assert _load("eval_sparbench.py").get_config("").image.max_pixels == 256 * 28 * 28


@pytest.mark.parametrize("arg", ["benchmark=mmlu", "protocol=official,benchmark=stibench",
                                 "protocol=thinking", "aggregation=paper",
                                 "benchmark=stibench,demo,demo_workdir=/tmp/x"])
def test_bad_eval_arguments_raise(arg):
  with pytest.raises(ValueError):
    _load("eval_vsibench.py").get_config(arg)


@pytest.mark.parametrize("arg", ["szie=7b", "size", "size=9b", "smoke=maybe",
                                 "lora=4,lora_targets=text+audio"])
def test_bad_arguments_raise(arg):
  with pytest.raises(ValueError):
    _load("sgrlvr.py").get_config(arg)


def test_parse_arg_types():
  a = config_lib.parse_arg("size=72b,frames=32,smoke,lr=2e-6", size="7b", frames=16, smoke=False,
                           lr=1e-6)
  assert (a.size, a.frames, a.smoke, a.lr) == ("72b", 32, True, 2e-6)
  assert config_lib.parse_arg(None, x=1).x == 1
  assert config_lib.parse_arg("smoke=false", smoke=True).smoke is False


# ------------------------------------------------------------------------------------------------
# config_lib.validate: what train.py refuses at start-up.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,arg", [(n, a) for n, args in ARGS.items() for a in args])
def test_documented_configs_validate(name, arg):
  """Smoke and demo configs are fine as they are; the real recipes only lack their paths here."""
  found = config_lib.problems(_load(name).get_config(arg), num_devices=8)
  if "smoke" in arg or "demo" in arg:
    assert found == []
  else:
    assert found and all("does not exist" in p or "has no config.json" in p for p in found), found


def _smoke(**overrides):
  c = _load("sgrlvr.py").get_config("smoke")
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.mark.parametrize("overrides,problem", [
    ({"data.batch_size": 0}, "config.data.batch_size = 0: must be an integer >= 1"),
    ({"data.batch_size": -2}, "config.data.batch_size = -2"),
    ({"grpo.num_generations": 1}, "config.grpo.num_generations = 1: must be an integer >= 2"),
    ({"grpo.num_generations": 0}, "config.grpo.num_generations = 0"),
    ({"total_steps": 0}, "config.total_steps = 0"),
    ({"sampling.max_new_tokens": 0}, "config.sampling.max_new_tokens = 0"),
    ({"data.prompt_buckets": ()}, "config.data.prompt_buckets = ()"),
    ({"data.prompt_buckets": (2048, 1024)}, "config.data.prompt_buckets = (2048, 1024)"),
    ({"optim.lr": -1e-6}, "config.optim.lr = -1e-06: must be >= 0"),
    ({"grpo.beta": -0.1}, "config.grpo.beta = -0.1"),
    ({"sampling.temperature": 0.0}, "config.sampling.temperature = 0.0: must be > 0"),
    ({"sft_warmup_steps": 3}, "config.sft_warmup_steps = 3: is more than total_steps = 2"),
    ({"mode": "ppo"}, "config.mode = 'ppo'"),
    ({"grad_accum_steps": 3}, "config.grad_accum_steps = 3: does not divide data.batch_size x "
                              "grpo.num_generations = 2 x 2"),
    ({"grad_accum_steps": 0}, "config.grad_accum_steps = 0"),
    ({"grpo.loss_agg": "mean"}, "config.grpo.loss_agg = 'mean'"),
    ({"optim.schedule": "cosin"}, "config.optim.schedule = 'cosin'"),
    ({"optim.freeze": ("visual[",)}, "config.optim.freeze = ('visual[',): entry 0"),
    ({"data.source": "vsibench"}, "config.data.source = 'vsibench'"),
    ({"data.video_min_pixels": 10 ** 9}, "config.data.video_min_pixels = 1000000000: is more than"),
    ({"model.variant": "small"}, "config.model.variant = 'small'"),
    ({"mesh": [["data", 1], ["fsdp", 3], ["tensor", 1]]}, "config.mesh = [['data', 1], ['fsdp', 3], "
                                                          "['tensor', 1]]: does not fit the 8 devices"),
    ({"eval.every_steps": 1, "data.source": "spacer", "data.annotations": __file__,
      "data.media_root": "."}, "config.eval.data_dir = '': must be set"),
    ({"resume": "/nonexistent/run"}, "config.resume = '/nonexistent/run': does not exist"),
    ({"lora.rank": -1}, "config.lora.rank = -1: must be an integer >= 0"),
    ({"lora.rank": 4, "lora.dropout": 1.0}, "config.lora.dropout = 1.0: must be in [0, 1)"),
    ({"lora.rank": 4, "lora.targets": ()}, "config.lora.targets = (): must name at least one"),
    ({"lora.rank": 4, "lora.train_also": ("lm_head(",)}, "config.lora.train_also = ('lm_head(',): "
                                                         "entry 0"),
    ({"lora.rank": 4, "lora.adapter_dir": "/nonexistent/adapter"},
     "config.lora.adapter_dir = '/nonexistent/adapter': does not exist"),
])
def test_validate_names_the_field(overrides, problem):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(_smoke(**overrides), num_devices=8)
  assert any(p.startswith(problem) for p in e.value.problems), e.value.problems
  assert problem in str(e.value)


def test_validate_reports_every_problem_at_once(tmp_path):
  c = _smoke(**{"data.batch_size": 0, "grpo.num_generations": 1, "data.source": "spacer",
                "data.annotations": str(tmp_path / "a.jsonl"), "data.media_root": str(tmp_path / "m"),
                "model.variant": "", "model.hf_dir": str(tmp_path)})
  found = config_lib.problems(c)
  assert [p.split(" = ")[0] for p in found] == [
      "config.data.batch_size", "config.data.annotations", "config.data.media_root",
      "config.model.hf_dir", "config.grpo.num_generations"]
  assert "has no config.json" in found[3]
  # SFT-only runs need no generations; GRPO settings are only checked where GRPO runs.
  assert config_lib.problems(_smoke(**{"mode": "sft", "grpo.num_generations": 1,
                                       "sampling.temperature": 0.0})) == []
  assert config_lib.problems(_smoke(**{"sft_warmup_steps": 2, "grpo.num_generations": 0})) == []

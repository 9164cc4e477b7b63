"""Every config in configs/ loads with each documented argument and with :smoke."""

import glob
import importlib.util
import json
import os

import pytest

from spacer_jax import config_lib

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
ARGS = {
    "sgrlvr.py": ["", "size=3b", "size=7b", "size=32b", "size=72b", "frames=32", "sharding=fsdp_tp",
                  "size=72b,sharding=fsdp", "smoke", "size=3b,smoke", "demo", "size=3b,lora=16",
                  "demo,lora=8"],
    "grpo.py": ["", "size=3b", "size=72b", "frames=8", "sharding=fsdp_tp", "smoke", "lora=16,smoke"],
    "sft.py": ["", "size=3b", "size=72b", "target=process", "sharding=fsdp_tp", "smoke",
               "target=process,smoke", "lora=16"],
}
# Configs read by other entry points (spacer_jax.evaluate): they only have to load.
OTHER_ARGS = {
    "eval_vsibench.py": ["", "protocol=official", "demo,demo_workdir=/tmp/demo"],
}


def _load(name):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(CONFIG_DIR, name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_every_config_file_is_covered():
  files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")))
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
  assert e.get_config("").repetition_penalty == 1.05  # SpaceR-Eval (spec 7.1)
  assert e.get_config("protocol=official").repetition_penalty == 1.0
  assert e.get_config("demo,demo_workdir=/tmp/x").repetition_penalty == 1.0


@pytest.mark.parametrize("arg", ["szie=7b", "size", "size=9b", "smoke=maybe"])
def test_bad_arguments_raise(arg):
  with pytest.raises(ValueError):
    _load("sgrlvr.py").get_config(arg)


def test_parse_arg_types():
  a = config_lib.parse_arg("size=72b,frames=32,smoke,lr=2e-6", size="7b", frames=16, smoke=False,
                           lr=1e-6)
  assert (a.size, a.frames, a.smoke, a.lr) == ("72b", 32, True, 2e-6)
  assert config_lib.parse_arg(None, x=1).x == 1
  assert config_lib.parse_arg("smoke=false", smoke=True).smoke is False

"""spacer_jax.sweep: arms and their checks, the ablation preset, the statistics, the record, and an
end-to-end sweep of real smoke runs (2 arms x 2 seeds) with its resume behaviour."""

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
from scipy import stats

from spacer_jax import config_lib, demo, grpo, sweep, train
from spacer_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "spacer_jax", "configs")
SMOKE = os.path.join(CONFIGS, "sgrlvr.py") + ":smoke"
ABLATION = os.path.join(CONFIGS, "ablation.py")


# ------------------------------------------------------------------------------------------------
# Arms.
# ------------------------------------------------------------------------------------------------
def test_parse_arm_and_seeds():
  arm = sweep.parse_arm("lb:--config.rewards.length_range=(100, 150),--config.grpo.beta=0.0")
  assert arm.name == "lb"
  assert arm.overrides == ["--config.rewards.length_range=(100, 150)", "--config.grpo.beta=0.0"]
  assert sweep.parse_arm("base:").overrides == []
  for bad in ("no_colon", "bad name:", "x:--lr=1", "x:config.lr=1"):
    with pytest.raises(ValueError):
      sweep.parse_arm(bad)
  assert sweep.parse_seeds("3") == [1, 2, 3]
  assert sweep.parse_seeds("4,9") == [4, 9]
  assert sweep.parse_seeds("7,") == [7]
  with pytest.raises(ValueError):
    sweep.parse_seeds("0")
  with pytest.raises(ValueError):
    sweep.parse_seeds("1,1")


def test_override_flags_round_trip_through_config_flags():
  values = {"rewards.length_range": (100, 150), "grpo.beta": 0.0, "mode": "sft",
            "rewards.use_map": False, "config.total_steps": 7}
  flags = [sweep.override_flag(k, v) for k, v in values.items()]
  c = sweep.resolve_config(SMOKE, flags, "test")
  assert (tuple(c.rewards.length_range), c.grpo.beta, c.mode, c.rewards.use_map, c.total_steps) == (
      (100, 150), 0.0, "sft", False, 7)


@pytest.mark.parametrize("flag,match", [
    ("--config.grpo.betta=0.1", "arm x: --config.grpo.betta"),  # no such field
    ("--config.grpo.beta=0.04", "does not change grpo.beta"),  # no-op: the arm would lie
    ("--config.seed=3", "seeds come from --seeds"),
    ("--config.total_steps=abc", "arm x"),  # bad value
])
def test_plan_rejects_bad_overrides(flag, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    sweep.plan(SMOKE, [sweep.Arm("x", [flag])], [1], str(tmp_path))


def test_plan_shares_data_and_cache(tmp_path):
  arms = [sweep.Arm("a", []), sweep.Arm("b", ["--config.grpo.beta=0.0"])]
  flats, runs = sweep.plan(SMOKE, arms, [1, 2], str(tmp_path), ["--config.total_steps=3"],
                           jax_cache_dir="/cache")
  assert [(r.arm, r.seed) for r in runs] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
  roots = {f for r in runs for f in r.argv if f.startswith("--config.data.synthetic_root=")}
  assert len(roots) == 1  # one dataset for every arm and seed
  assert all("--config.jax_cache_dir=/cache" in r.argv and r.argv[-1] == f"--config.seed={r.seed}"
             and r.total_steps == 3 for r in runs)
  assert sweep.config_diff(flats["a"], flats["b"]) == {"grpo.beta": [0.04, 0.0]}
  with pytest.raises(ValueError, match="unique"):
    sweep.plan(SMOKE, [sweep.Arm("a", []), sweep.Arm("a", [])], [1], str(tmp_path))
  with pytest.raises(ValueError, match="seeds come from --seeds"):
    sweep.plan(SMOKE, arms, [1], str(tmp_path), ["--config.seed=4"])


# ------------------------------------------------------------------------------------------------
# The ablation preset.
# ------------------------------------------------------------------------------------------------
EXPECTED_ABLATION = {
    "sgrlvr": {},
    "grpo": {"data.use_cogmap_prompt": False, "rewards.use_map": False,
             "rewards.use_non_sr_map_fix": True, "rewards.use_temporal": False,
             "rewards.use_length": False},
    "no_temporal": {"rewards.use_temporal": False},
    "no_length": {"rewards.use_length": False},
    "kl": {"grpo.beta": 0.04},
    "sft_only": {"mode": "sft"},
    "drgrpo": {"grpo.reward_scaling": "none", "grpo.loss_agg": "seq_mean_token_sum_norm"},
}


@pytest.fixture(scope="module")
def ablation_plan(tmp_path_factory):
  arms = sweep.sweep_arms(ABLATION, config=sweep.resolve_config(ABLATION, [], "test"))
  flats, runs = sweep.plan(ABLATION, arms, [1, 2, 3], str(tmp_path_factory.mktemp("abl")))
  return arms, flats, runs


def test_ablation_arms_change_what_they_claim(ablation_plan):
  arms, flats, runs = ablation_plan
  assert [a.name for a in arms] == list(EXPECTED_ABLATION)
  assert len(runs) == 7 * 3
  demo_cfg = config_lib.load_config_module(os.path.join(CONFIGS, "sgrlvr.py")).get_config("demo")
  assert flats["sgrlvr"] == sweep.flatten(demo_cfg)  # the baseline arm is the demo recipe
  for name, expected in EXPECTED_ABLATION.items():
    diff = sweep.config_diff(flats["sgrlvr"], flats[name])
    assert {k: v[1] for k, v in diff.items()} == expected, name


def test_plain_grpo_arm_is_configs_grpo():
  """The grpo arm sets exactly what configs/grpo.py changes in the shared recipe, except where the
  map file is read from (the maps are never scored without the map reward)."""
  sgrlvr, plain = (config_lib.load_config_module(os.path.join(CONFIGS, n)).get_config("")
                   for n in ("sgrlvr.py", "grpo.py"))
  diff = sweep.config_diff(sweep.flatten(sgrlvr), sweep.flatten(plain))
  assert diff.pop("data.cognitive_maps")[1] == ""
  ablation = config_lib.load_config_module(ABLATION)
  assert {k: v[1] for k, v in diff.items()} == ablation.PLAIN_GRPO == EXPECTED_ABLATION["grpo"]


def _cfg(flats, name):
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  for k, v in flats[name].items():
    node = c
    for part in k.split(".")[:-1]:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[k.split(".")[-1]] = v
  return c


def test_ablation_arms_reach_the_trainer(ablation_plan):
  """What train.py derives from each arm's config: reward weights, GRPO objective, the phases."""
  _, flats, _ = ablation_plan
  base_rc = config_lib.make_reward_config(_cfg(flats, "sgrlvr"))
  assert base_rc.length_bonus > 0
  assert config_lib.make_reward_config(_cfg(flats, "no_length")).length_bonus == 0.0
  g = flats["drgrpo"]
  cfg = grpo.GRPOConfig(beta=g["grpo.beta"], loss_agg=g["grpo.loss_agg"],
                        reward_scaling=g["grpo.reward_scaling"])
  assert cfg.loss_agg == "seq_mean_token_sum_norm" and cfg.reward_scaling == "none"
  adv = np.asarray(grpo.compute_advantages(np.array([0.0, 1.0, 1.0, 1.0]), 4, cfg.reward_scaling))
  np.testing.assert_allclose(adv, [-0.75, 0.25, 0.25, 0.25])  # not divided by the group std
  for name, f in flats.items():
    # train.py: sft_steps = total_steps if mode == "sft" else sft_warmup_steps; the reference model
    # and the temporal samples exist only with RL steps.
    sft_steps = f["total_steps"] if f["mode"] == "sft" else f["sft_warmup_steps"]
    rl_steps = f["total_steps"] - sft_steps
    assert (rl_steps == 0) == (name == "sft_only"), name
    assert (rl_steps > 0 and f["grpo.beta"] > 0) == (name == "kl"), name  # the demo: beta 0
    assert (rl_steps > 0 and f["rewards.use_temporal"]) == (
        name not in ("sft_only", "no_temporal", "grpo")), name
    # demo.finish scores the checkpoint at sft_warmup_steps (same step in every arm) and the last.
    assert f["sft_warmup_steps"] % f["ckpt_every_steps"] == 0
    assert f["keep_ckpts"] >= f["total_steps"] // f["ckpt_every_steps"]


def test_kl_arm_follows_the_base_config():
  """The KL arm adds the paper's beta where the base has none (the demo), removes it where the base
  has one (the full recipe); without the config the function still gives the demo's arms."""
  full = sweep.sweep_arms(ABLATION, config=sweep.resolve_config(ABLATION + ":size=7b", [], "t"))
  assert [(a.name, a.overrides) for a in full if "beta" in a.name or a.name == "kl"] == [
      ("beta0", ["--config.grpo.beta=0.0"])]
  assert [a.name for a in sweep.sweep_arms(ABLATION)] == list(EXPECTED_ABLATION)


def test_ablation_shares_the_sft_phase(ablation_plan, tmp_path):
  """Arms that change only grpo.*/rewards.* start from sgrlvr's SFT checkpoint of their seed."""
  _, flats, runs = ablation_plan
  runs = [sweep.Run(r.arm, r.seed, r.run_dir, r.argv, r.total_steps) for r in runs]  # a fresh copy
  why = sweep.share_sft(runs, flats, "sgrlvr")
  assert {a for a, w in why.items() if not w} == {"no_temporal", "no_length", "kl", "drgrpo"}
  assert "data.use_cogmap_prompt" in why["grpo"] and "mode" in why["sft_only"]
  for r in runs:
    shared = r.arm in ("no_temporal", "no_length", "kl", "drgrpo")
    assert (r.sft_from is not None) == shared, r.arm
    if shared:
      assert (r.sft_from.arm, r.sft_from.seed, r.sft_steps) == ("sgrlvr", r.seed, 300)
  smoke = {k: flats["sgrlvr"][k] for k in flats["sgrlvr"]} | {"sft_warmup_steps": 0}
  assert "no SFT warm-up" in sweep.sft_shareable(smoke, smoke | {"grpo.beta": 0.1})
  odd = flats["sgrlvr"] | {"ckpt_every_steps": 7}
  assert "no checkpoint" in sweep.sft_shareable(odd, odd | {"grpo.beta": 0.1})


def test_seed_from_sft_copies_the_phase(tmp_path):
  """The arm's workdir gets the checkpoint at sft_steps and the rows up to it, nothing later."""
  base = sweep.Run("b", 1, str(tmp_path / "b"), [], 6)
  for step in (2, 4, 6):
    os.makedirs(tmp_path / "b" / "ckpt" / str(step) / "state")
  (tmp_path / "b" / "ckpt" / "4" / "state" / "x").write_text("w4")
  os.makedirs(tmp_path / "b" / "tokenizer")
  (tmp_path / "b" / "tokenizer" / "tokenizer.json").write_text("{}")
  for name in ("metrics.jsonl", "rollouts.jsonl"):
    (tmp_path / "b" / name).write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 7)))
  arm = sweep.Run("a", 1, str(tmp_path / "a"), ["--config.grpo.beta=0.1"], 6, base, 4)
  sweep.claim(arm, "m")
  sweep.seed_from_sft(arm)
  assert sorted(os.listdir(tmp_path / "a" / "ckpt")) == ["4"] and sweep.latest_step(arm.run_dir) == 4
  assert (tmp_path / "a" / "ckpt" / "4" / "state" / "x").read_text() == "w4"
  assert sweep.run_status(arm) == "partial"
  for name in ("metrics.jsonl", "rollouts.jsonl"):
    rows = (tmp_path / "a" / name).read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]
  assert (tmp_path / "a" / "tokenizer" / "tokenizer.json").exists()
  rec = json.loads((tmp_path / "a" / sweep.RUN_FILE).read_text())
  assert rec["sft_from"] == {"run_dir": base.run_dir, "step": 4}
  gone = sweep.Run("c", 1, str(tmp_path / "c"), [], 6, sweep.Run("b", 1, str(tmp_path / "x"), [], 6),
                   4)
  sweep.claim(gone, "m")
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 4"):
    sweep.seed_from_sft(gone)


def test_adopt_checks_the_config(tmp_path):
  _, runs = sweep.plan(SMOKE, [sweep.Arm("a", [])], [3], str(tmp_path / "runs"))
  src = tmp_path / "demo_seed_3"
  os.makedirs(src)
  cfg = sweep.resolve_config(SMOKE, [*runs[0].argv[1:]], "t")
  cfg.jax_cache_dir = "/elsewhere"  # does not change what a run computes
  cfg.data.synthetic_root = "/other/data"  # the same deterministic dataset elsewhere
  older = json.loads(cfg.to_json())
  del older["lora"]  # a run made before the code had LoRA
  (src / "config.json").write_text(json.dumps(older))
  (src / sweep.RESULTS_FILE).write_text("{}")
  (src / "demo_time.json").write_text(json.dumps({"total_wall_s": 90.0}))
  sweep.adopt(runs[0], str(src), "m")
  assert sweep.run_status(runs[0]) == "done"
  rec = sweep.claim(runs[0], "m")  # the sweep sees it as its own run
  assert rec["adopted_from"] == str(src) and rec["attempts"][0]["wall_s"] == 90.0
  assert "lora.rank" in rec["fields_newer_than_the_run"]
  cfg.grpo.beta = 0.5
  (src / "config.json").write_text(cfg.to_json())
  other = sweep.Run("a", 3, str(tmp_path / "other"), runs[0].argv, runs[0].total_steps)
  with pytest.raises(ValueError, match="grpo.beta: arm 0.04, run 0.5"):
    sweep.adopt(other, str(src), "m")


def test_claim_accepts_a_moved_config_file_with_the_same_config(tmp_path):
  """A run made from another clone (the config file at another path) is the same run when its
  config.json matches; run.json then takes the new flags. A changed field is still refused."""
  moved = tmp_path / "old_clone" / "configs"
  os.makedirs(moved)
  for name in os.listdir(CONFIGS):
    if name.endswith(".py"):
      shutil.copy(os.path.join(CONFIGS, name), moved / name)
  old_arg = str(moved / "sgrlvr.py") + ":smoke"
  _, (old,) = sweep.plan(old_arg, [sweep.Arm("a", [])], [3], str(tmp_path / "runs"))
  sweep.claim(old, "m")
  _, (new,) = sweep.plan(SMOKE, [sweep.Arm("a", [])], [3], str(tmp_path / "runs"))
  assert new.argv != old.argv
  fresh = sweep.Run("a", 3, str(tmp_path / "fresh"), old.argv, old.total_steps)
  sweep.claim(fresh, "m")
  assert sweep.claim(dataclasses.replace(fresh, argv=new.argv), "m")["argv"] == new.argv  # never started
  cfg = sweep.resolve_config(old_arg, old.argv[1:], "t")
  (tmp_path / "runs" / "a" / "seed_3" / "config.json").write_text(cfg.to_json())
  with pytest.raises(ValueError, match="made by other flags"):
    sweep.claim(new, "another.module")
  rec = sweep.claim(new, "m")
  assert rec["argv"] == new.argv and rec["earlier_argv"] == [old.argv]
  assert sweep.claim(new, "m")["argv"] == new.argv  # written to run.json
  _, (changed,) = sweep.plan(SMOKE, [sweep.Arm("b", ["--config.grpo.beta=0.5"])], [3],
                             str(tmp_path / "runs"))
  changed = sweep.Run("a", 3, new.run_dir, changed.argv, changed.total_steps)
  with pytest.raises(ValueError, match="grpo.beta: now 0.5"):
    sweep.claim(changed, "m")


def test_packaged_config_by_its_short_name(tmp_path, monkeypatch):
  """`--config=configs/ablation.py` names the packaged config from any directory, as for train.py."""
  monkeypatch.chdir(tmp_path)
  lines = []
  assert sweep.main(["--config=configs/ablation.py:smoke", f"--out={tmp_path / 'exp'}", "--seeds=1",
                     "--dry_run"], printer=lines.append) == 0
  assert lines[0].startswith("7 arms x 1 seeds = 7 runs"), lines[0]
  assert any(os.path.join("spacer_jax", "configs", "ablation.py:smoke") in ln for ln in lines)


def test_plain_grpo_prompts_in_training_and_heldout(tmp_path):
  """Plain GRPO trains and is evaluated on the prompt without map instructions."""
  c = config_lib.load_config_module(os.path.join(CONFIGS, "sgrlvr.py")).get_config("demo")
  c.data.synthetic.update(num_scenes=1, num_eval_scenes=1, questions_per_scene=4, height=56,
                          width=56)
  records, _ = train.load_records(c, str(tmp_path))
  paths = demo.synthetic_paths(c, str(tmp_path))
  held, _ = demo.heldout_records(paths, str(tmp_path / "h.jsonl"))
  assert all("<map>" in r.prompt for r in records + held)
  c.data.use_cogmap_prompt = False
  plain, _ = train.load_records(c, str(tmp_path))
  held_plain, _ = demo.heldout_records(paths, str(tmp_path / "h2.jsonl"), use_cogmap_prompt=False)
  for r in plain + held_plain:
    assert "<map>" not in r.prompt and r.cognitive_map  # the maps stay, only the prompt changes
  assert [r.prompt for r in held_plain] == [r.prompt for r in sources.without_map_prompt(held)]


# ------------------------------------------------------------------------------------------------
# Statistics and the record.
# ------------------------------------------------------------------------------------------------
def test_compare_matches_scipy():
  base = {1: 0.10, 2: 0.20, 3: 0.15}
  arm = {1: 0.18, 2: 0.30, 3: 0.24}
  c = sweep.compare(base, arm)
  ref = stats.ttest_rel(list(arm.values()), list(base.values())).confidence_interval(0.95)
  assert c["test"] == "paired t" and c["df"] == 2
  np.testing.assert_allclose(c["ci"], [ref.low, ref.high], rtol=1e-12)
  assert c["diff"] == pytest.approx(0.09) and c["excludes_zero"]
  assert not sweep.compare(base, {1: 0.18, 2: 0.31, 3: 0.19})["excludes_zero"]  # 3 seeds: t = 4.3
  other = {4: 0.30, 5: 0.10, 6: 0.22, 7: 0.41}  # other seeds: Welch
  w = sweep.compare(base, other)
  ref = stats.ttest_ind(list(other.values()), list(base.values()),
                        equal_var=False).confidence_interval(0.95)
  assert w["test"] == "Welch t"
  np.testing.assert_allclose(w["ci"], [ref.low, ref.high], rtol=1e-12)
  assert not w["excludes_zero"]
  assert math.isnan(sweep.compare({1: 0.1}, {2: 0.2})["ci"][0])


def _fake_run(run_dir, arm, seed, acc, tasks, grpo_rewards, sft_steps=4):
  """A finished run's files as train.py + demo.finish write them (numbers chosen by the test)."""
  os.makedirs(run_dir)
  rows = [{"step": s, "phase_sft": 1.0, "train/loss": 1.0, "time/step_s": 0.5}
          for s in range(1, sft_steps + 1)]
  rows += [{"step": sft_steps + i + 1, "phase_sft": 0.0, "time/step_s": 2.0,
            **{f"reward/{c}": v for c, v in r.items()}} for i, r in enumerate(grpo_rewards)]
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  heldout = {"final": {"step": len(rows), "accuracy_base": acc, "accuracy": acc, "map": 0.5,
                       "format": 0.9, "per_task": tasks, "num": 10}}
  if sft_steps:
    heldout["sft"] = {"step": sft_steps, "accuracy_base": 0.05, "accuracy": 0.05, "map": 0.4,
                      "format": 0.8, "per_task": tasks, "num": 10}
  with open(os.path.join(run_dir, sweep.RESULTS_FILE), "w") as f:
    json.dump({"heldout": heldout}, f)
  with open(os.path.join(run_dir, sweep.RUN_FILE), "w") as f:
    json.dump({"arm": arm, "seed": seed, "module": "m", "argv": [],
               "attempts": [{"stage": "train", "wall_s": 60.0 * seed, "returncode": 0}]}, f)


def test_record_from_finished_runs(tmp_path):
  arms = [sweep.Arm("rl", []), sweep.Arm("sft", ["--config.mode=sft"])]
  runs = []
  for a, accs in (("rl", (0.2, 0.3, 0.4)), ("sft", (0.1, 0.1, 0.25))):
    for seed, acc in zip((1, 2, 3), accs):
      d = str(tmp_path / "runs" / a / f"seed_{seed}")
      # 10 GRPO steps for rl (last 20% = the last 2), none for sft.
      rewards = [{"accuracy_base": s / 10 + seed, "format": 1.0} for s in range(10 * (a == "rl"))]
      _fake_run(d, a, seed, acc, {"object_counting": acc, "room_size_estimation": acc / 2}, rewards,
                sft_steps=4 if a == "rl" else 14)
      runs.append(sweep.Run(a, seed, d, [], 14))
  record = {"config": "c.py", "seeds": [1, 2, 3], "baseline": "rl",
            "invocations": [{"command": "python -m spacer_jax.sweep ...", "git_commit": "abc"}]}
  res = sweep.write_record(str(tmp_path), runs, arms, record)
  rl = res["arms"]["rl"]
  assert rl["seeds"]["2"]["rollout/accuracy_base"] == pytest.approx(np.mean([2.8, 2.9]))
  assert rl["seeds"]["3"]["wall_s"] == 180.0 and rl["seeds"]["1"]["train_s"] == 22.0
  ms = rl["mean_se"]["heldout/accuracy"]
  assert ms["mean"] == pytest.approx(0.3) and ms["se"] == pytest.approx(0.1 / math.sqrt(3))
  assert "rollout/accuracy_base" not in res["arms"]["sft"]["mean_se"]
  c = res["comparison"]["sft"]["heldout/accuracy"]
  assert c["test"] == "paired t" and c["diff"] == pytest.approx(-0.15)
  assert set(res["comparison"]["sft"]) >= {"heldout/accuracy", "heldout/object_counting"}
  md = (tmp_path / "results.md").read_text()
  for text in ("| rl | 3 | 0.300 ± 0.058 |", "room_size_estimation", "no GRPO steps",
               "| sft | accuracy | -0.150 |", "paired t (2.0)", "`python -m spacer_jax.sweep ...`"):
    assert text in md, text
  for png in ("curves.png", "per_task.png"):
    assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((tmp_path / "results.json").read_text())["baseline"] == "rl"


# ------------------------------------------------------------------------------------------------
# End to end: real smoke runs through spacer_jax.train and demo.finish.
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_end_to_end_and_resume(tmp_path, monkeypatch):
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device per run
  out = tmp_path / "exp"
  argv = [f"--config={SMOKE}", f"--out={out}", "--seeds=2", "--arm=base:",
          "--arm=beta0:--config.grpo.beta=0.0", "--parallel=2", "--config.use_progress_bar=False",
          "--config.use_tensorboard=False", "--config.ckpt_every_steps=1"]
  lines = []
  assert sweep.main(argv, printer=lines.append) == 0, lines
  res = json.loads((out / "results.json").read_text())
  assert sorted(res["arms"]) == ["base", "beta0"]
  for arm in res["arms"].values():
    assert sorted(arm["seeds"]) == ["1", "2"]
    for v in arm["seeds"].values():
      assert v["heldout_questions"] > 0 and 0.0 <= v["heldout/accuracy"] <= 1.0
      assert {"rollout/format", "rollout/total", "wall_s"} <= set(v)
  assert "heldout/accuracy" in res["comparison"]["beta0"]
  rec = json.loads((out / "sweep.json").read_text())
  assert rec["arms"][1]["diff_vs_baseline"] == {"grpo.beta": [0.04, 0.0]}
  runs = out / "runs"
  assert (runs / ".gitignore").read_text().rstrip().endswith("*")
  run_json = lambda a, s: json.loads((runs / a / f"seed_{s}" / sweep.RUN_FILE).read_text())  # noqa
  attempts = {(a, s): len(run_json(a, s)["attempts"]) for a in ("base", "beta0") for s in (1, 2)}
  assert all(n == 2 for n in attempts.values()), attempts  # train, then demo.finish

  # The same command again: every run is finished, nothing runs.
  lines.clear()
  assert sweep.main(argv, printer=lines.append) == 0
  assert "4 of 4 runs already finished" in lines[0]
  assert {(a, s): len(run_json(a, s)["attempts"]) for a, s in attempts} == attempts

  # A run killed after its checkpoint at step 1: it resumes there, the others are left alone.
  victim = runs / "beta0" / "seed_2"
  shutil.rmtree(victim / "ckpt" / "2")
  os.remove(victim / sweep.RESULTS_FILE)
  lines.clear()
  assert sweep.main(argv, printer=lines.append) == 0, lines
  assert any("beta0 seed 2: training resumes after step 1" in ln for ln in lines), lines
  assert "state from workdir; training steps 2..2" in (victim / "sweep.log").read_text()
  assert [a["stage"] for a in run_json("beta0", 2)["attempts"]] == ["train", "finish"] * 2
  assert len(run_json("base", 1)["attempts"]) == 2

  # Other flags for an existing run directory are an error, not a silent mix.
  with pytest.raises(ValueError, match="was made by other flags"):
    sweep.main([*argv[:4], "--arm=beta0:--config.grpo.beta=0.01", *argv[5:]], printer=lines.append)


@pytest.mark.slow
def test_shared_sft_phase_equals_a_run_from_scratch(tmp_path):
  """The claim sweep's SFT sharing rests on: an arm that changes only RL settings, started from the
  baseline run's SFT checkpoint, gives bit for bit the metrics and weights of the same arm trained
  from scratch (here an arm that also drops the temporal samples from the data and the reference
  model, the largest RL-only change)."""
  common = ["--config.use_progress_bar=False", "--config.use_tensorboard=False",
            "--config.sft_warmup_steps=2", "--config.total_steps=4", "--config.ckpt_every_steps=2",
            "--config.sft_target=process", f"--config.data.synthetic_root={tmp_path / 'data'}"]
  arms = [sweep.Arm("base", []),
          sweep.Arm("arm", ["--config.grpo.beta=0.0", "--config.rewards.use_temporal=False"])]
  flats, runs = sweep.plan(SMOKE, arms, [1], str(tmp_path / "runs"), common)
  base, arm = runs
  assert not sweep.share_sft(runs, flats, "base")["arm"] and arm.sft_from is base

  def train_run(run, workdir):
    config = sweep.resolve_config(run.argv[0].split("=", 1)[1], run.argv[1:], "test")
    state, _ = train.train_and_evaluate(config, str(workdir))
    rows = [{k: v for k, v in json.loads(line).items()  # all but timings and memory
             if not k.startswith(("time/", "memory/", "compiles/")) and "per_s" not in k}
            for line in open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()]
    return rows, {k: np.asarray(v) for k, v in state["params"].items()}

  base_rows, _ = train_run(base, base.run_dir)
  scratch_rows, scratch_params = train_run(arm, str(tmp_path / "scratch"))
  sweep.claim(arm, "spacer_jax.train")
  sweep.seed_from_sft(arm)
  shared_rows, shared_params = train_run(arm, arm.run_dir)
  assert [r["step"] for r in shared_rows] == [1, 2, 3, 4]
  assert shared_rows == scratch_rows
  assert base_rows[:2] == scratch_rows[:2] and base_rows[2:] != scratch_rows[2:]
  assert shared_params.keys() == scratch_params.keys()
  for k, v in scratch_params.items():
    np.testing.assert_array_equal(shared_params[k], v, err_msg=k)

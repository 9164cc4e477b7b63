"""The trainer in process: the jitted step, one rollout, and whole runs through train_and_evaluate.

Default-run tests (the CLI runs, SIGTERM and resume-equals-uninterrupted are in test_train_smoke.py,
as subprocesses, mostly slow). The in-process runs use the 8 simulated CPU devices of conftest, so
the smoke recipe's FSDP mesh really shards.
"""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from conftest import two_video_prompts, write_tiny_hf_checkpoint
from spacer_jax import config_lib, grpo, modeling, rollout, sampling, train, tree_utils
from spacer_jax.data import pipeline, sources, synthetic
from spacer_jax.data import tokenizer as tokenizer_lib
from spacer_jax.models import qwen2_5_vl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke_config(shared, **overrides):
  from spacer_jax.configs import sgrlvr  # pylint: disable=g-import-not-at-top
  c = sgrlvr.get_config("smoke")
  c.use_progress_bar = False
  c.use_tensorboard = False
  c.data.synthetic_root = str(shared / "synthetic")
  c.jax_cache_dir = str(shared / "xla")  # identical programs compile once per test session
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  return tmp_path_factory.mktemp("train_shared")


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, shared):
  """2 GRPO steps of the smoke recipe from a tiny checkpoint written by transformers' save_pretrained
  (tokenizer and chat template beside it), on the 8-device FSDP mesh, through train_and_evaluate."""
  hf_dir = tmp_path_factory.mktemp("tiny_hf")
  write_tiny_hf_checkpoint(str(hf_dir), tokenizer="offline")
  wd = tmp_path_factory.mktemp("hf_run") / "run"
  overrides = {"model.variant": "", "model.hf_dir": str(hf_dir), "optim.decay_steps": 3}
  state, interrupted = train.train_and_evaluate(_smoke_config(shared, **overrides), wd)
  return dict(hf_dir=hf_dir, workdir=wd, state=state, interrupted=interrupted, overrides=overrides)


def test_train_from_hf_checkpoint(hf_run):
  wd, state = hf_run["workdir"], hf_run["state"]
  assert not hf_run["interrupted"] and int(state["step"]) == 2
  rows = _metrics(wd)
  assert [r["step"] for r in rows] == [1, 2] and "train/kl" in rows[0]
  assert (wd / "ckpt" / "2").is_dir()
  # The workdir is self-contained: the checkpoint's architecture and tokenizer sit beside ckpt/.
  hf_config = json.loads((hf_run["hf_dir"] / "config.json").read_text())
  run_config = json.loads((wd / "model_config.json").read_text())
  assert run_config["text_config"]["vocab_size"] == hf_config["text_config"]["vocab_size"]
  assert "chat_template" in json.loads((wd / "tokenizer" / "tokenizer_config.json").read_text())
  # The weights start from the checkpoint (the reference policy is it), moved, and sit on the mesh.
  start = tree_utils.split_model(modeling.load_model(hf_run["hf_dir"]))[1]
  assert abs(rows[0]["train/kl"]) < 1e-6  # step 1: policy == reference == the checkpoint
  key = "model.layers.0.mlp.up_proj.weight"
  assert not np.array_equal(np.asarray(start[key]), np.asarray(state["params"][key]))
  emb = state["params"]["model.embed_tokens.weight"]
  assert emb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_resume_from_hf_checkpoint_run(hf_run, shared):
  """Rerunning the command with more steps continues from ckpt/2 (not from the HF weights)."""
  wd = hf_run["workdir"]
  state, _ = train.train_and_evaluate(
      _smoke_config(shared, total_steps=3, **hf_run["overrides"]), wd)
  assert int(state["step"]) == 3 and [r["step"] for r in _metrics(wd)] == [1, 2, 3]


def test_evaluate_and_generate_from_the_workdir(hf_run, shared, tmp_path, capsys):
  from spacer_jax import cli, evaluate, generate  # pylint: disable=g-import-not-at-top
  from spacer_jax.configs import eval_vsibench  # pylint: disable=g-import-not-at-top
  c = eval_vsibench.get_config("protocol=official")
  c.model_dir, c.dtype, c.progress, c.max_items, c.batch_size = str(hf_run["workdir"]), "float32", \
      False, 4, 4
  c.data_dir = synthetic.dataset_paths(str(shared / "synthetic")).eval_root
  c.video.max_frames, c.video.min_pixels, c.video.max_pixels = 4, 56 * 56, 56 * 56
  result = evaluate.evaluate(c, str(tmp_path / "eval"))
  assert result["num_scored"] == 4 and (tmp_path / "eval" / "table.md").is_file()
  video = next(pathlib.Path(c.data_dir).rglob("*.mp4"))
  text = cli.call(generate, ["--model_dir", str(hf_run["workdir"]), "--video", str(video),
                             "--question", "How many chairs are in this room?",
                             "--max_new_tokens", "3"])
  assert isinstance(text, str) and "tokens in" in capsys.readouterr().err


@pytest.mark.slow
def test_train_and_evaluate_sft_then_grpo(tmp_path, shared):
  """The tiny random-init model: one SFT step on the synthetic traces, then one GRPO step."""
  wd = tmp_path / "run"
  config = _smoke_config(shared, sft_warmup_steps=1, sft_target="process")
  state, _ = train.train_and_evaluate(config, str(wd))
  rows = _metrics(wd)
  assert [(r["step"], r["phase_sft"]) for r in rows] == [(1, 1.0), (2, 0.0)]
  assert rows[0]["sft/empty_process_frac"] == 0.0  # every synthetic record carries its trace
  assert "reward/total" in rows[1] and rows[1]["compiles/train_step_grpo"] == 1
  assert int(state["step"]) == 2 and (wd / "ckpt" / "2").is_dir()
  # A finished run says so instead of training again.
  state, _ = train.train_and_evaluate(config, str(wd))
  assert int(state["step"]) == 2 and len(_metrics(wd)) == 2


def test_rollout_run_scores_and_packs_a_grpo_batch(shared):
  """rollout.run on a real pipeline batch: G samples per prompt (+ G/2 on shuffled frames for the
  temporal bonus), rewards, group advantages, and a TrainBatch whose rows belong to their prompts."""
  config = _smoke_config(shared)
  tok = tokenizer_lib.build_offline_tokenizer()
  paths = synthetic.generate_dataset(config.data.synthetic_root, synthetic.SyntheticConfig.demo(
      **config.data.synthetic.to_dict()), progress=False)
  records = sources.load_spacer(paths.train_jsonl, media_root=paths.root,
                                cognitive_map_path=paths.cognitive_map)
  batch = next(pipeline.make_iterator(records, tok, config_lib.make_data_config(config, True)))
  ids = tok.special_ids()
  ids["eos_token_id"] = (ids["eos_token_id"],)
  model = qwen2_5_vl.init_model(qwen2_5_vl.tiny(**ids), seed=0, init_std=0.2)
  sampler = sampling.Sampler(model, temperature=1.0, vision_budget="auto",
                             stop_ids=(tok.eos_token_id, tok.pad_token_id))
  g, b = 4, len(batch["input_ids"])
  kw = dict(tokenizer=tok, num_generations=g, max_new_tokens=6, rng=jax.random.PRNGKey(3),
            reward_config=config_lib.make_reward_config(config))
  tb, metrics, samples = rollout.run(sampler, sampler.params, batch, **kw)
  assert tb["completion_ids"].shape == (b * g, 6) and tb["prompt_ids"].shape[0] == b
  np.testing.assert_array_equal(tb["prompt_index"], np.repeat(np.arange(b), g))
  assert len(samples) == b * g and [s["sample"] for s in samples[:g]] == list(range(g))
  totals = np.array([s["reward_total"] for s in samples], np.float32)
  np.testing.assert_allclose(tb["advantages"], grpo.compute_advantages(totals, g), atol=1e-6)
  np.testing.assert_allclose(tb["advantages"].reshape(b, g).sum(1), 0.0, atol=1e-5)
  assert "reward/shuffled_accuracy" in metrics and metrics["rollout/tokens"] == \
      int(tb["completion_mask"].sum())
  for s, row in zip(samples, tb["completion_mask"]):
    assert s["length"] == int(row.sum())
  # A fixed rng gives the same batch.
  again, _, _ = rollout.run(sampler, sampler.params, batch, **kw)
  np.testing.assert_array_equal(again["completion_ids"], tb["completion_ids"])


@pytest.fixture(scope="module")
def tiny_step():
  import functools

  import optax

  cfg = qwen2_5_vl.tiny()
  model = qwen2_5_vl.init_model(cfg)  # host init: no XLA random-number program to compile
  graphdef, flat, paths = tree_utils.split_model(model)
  rng = np.random.default_rng(0)
  ids, mask, pv, grid = two_video_prompts(cfg, rng)
  sampler = sampling.Sampler(model, temperature=1.0)
  prepared = sampler.prepare(ids, mask, pixel_values_videos=pv, video_grid_thw=grid,
                             second_per_grid_ts=np.ones(2))
  g = 2
  st = sampler.decode(sampler.prefill(prepared, max_new_tokens=6, num_samples=g,
                                      rng=jax.random.PRNGKey(1),
                                      params=tree_utils.to_state(flat, paths)),
                      params=tree_utils.to_state(flat, paths))
  tokens, logps, lengths = map(np.asarray, (st.tokens, st.logprobs, st.lengths))
  lengths = np.minimum(lengths, [6, 3, 5, 2])  # ragged masks
  tb = rollout.assemble(prepared, tokens, lengths, g)
  tb["advantages"] = np.array([1.0, -1.0, 0.5, -0.5], np.float32)

  def make(mode="grpo", num_micro=1, freeze=(), beta=0.04, loss_agg="seq_mean_token_mean"):
    keys = tuple(k for k in sorted(flat) if not any(__import__("re").search(p, k) for p in freeze))
    tx = optax.sgd(1.0)
    fn = jax.jit(functools.partial(train.train_step, graphdef=graphdef, paths=paths, tx=tx,
                                   trainable_keys=keys, mode=mode,
                                   grpo_config=grpo.GRPOConfig(beta=beta, loss_agg=loss_agg),
                                   num_micro=num_micro))
    state = {"step": jax.numpy.zeros((), "int32"), "params": dict(flat),
             "opt_state": tx.init({k: flat[k] for k in keys}), "rng": jax.random.PRNGKey(0)}
    return fn, state

  logps_fn = jax.jit(functools.partial(train.token_logps, graphdef=graphdef, paths=paths))
  return dict(flat=flat, tb=tb, sampler_logps=logps, make=make, logps_fn=logps_fn)


def test_trainer_logps_equal_sampler_logps(tiny_step):
  tb = tiny_step["tb"]
  lp = np.asarray(tiny_step["logps_fn"](tiny_step["flat"], tb))
  m = tb["completion_mask"] > 0
  np.testing.assert_allclose(lp[m], tiny_step["sampler_logps"][m], atol=1e-5)


def test_token_logps_with_remat_equal_without(tiny_step):
  """The recipe remats every layer (model.use_remat): the reference log-probs must still trace (the
  model is merged inside the micro-batch scan) and equal the plain forward."""
  import functools
  cfg = qwen2_5_vl.tiny(use_remat=True)
  graphdef, _, paths = tree_utils.split_model(qwen2_5_vl.Qwen2_5_VL(cfg, rngs=__import__(
      "flax").nnx.Rngs(0)))
  fn = jax.jit(functools.partial(train.token_logps, graphdef=graphdef, paths=paths, num_micro=2))
  tb = tiny_step["tb"]
  np.testing.assert_allclose(np.asarray(fn(tiny_step["flat"], tb)),
                             np.asarray(tiny_step["logps_fn"](tiny_step["flat"], tb)), atol=1e-6)


@pytest.mark.parametrize("mode,loss_agg", [
    pytest.param("grpo", "seq_mean_token_mean", marks=pytest.mark.slow), ("grpo", "token_mean"),
    pytest.param("grpo", "seq_mean_token_sum_norm", marks=pytest.mark.slow), ("sft", None)])
def test_grad_accumulation_scan_equals_one_batch(tiny_step, mode, loss_agg):
  ref = tiny_step["logps_fn"](tiny_step["flat"], tiny_step["tb"]) - 0.1 if mode == "grpo" else None
  kw = dict(mode=mode, loss_agg=loss_agg or "seq_mean_token_mean")
  f1, s1 = tiny_step["make"](num_micro=1, **kw)
  f2, s2 = tiny_step["make"](num_micro=2, **kw)
  a, ma = f1(s1, tiny_step["tb"], ref)
  b, mb = f2(s2, tiny_step["tb"], ref)
  # Micro-batches hold 9 and 7 completion tokens (ragged masks): per-sequence aggregations average
  # exactly, token means (SFT, token_mean) only with the token-share weights of train_step.
  # (The GRPO loss is ~2e-4 here because the advantages sum to 0: compare absolutely.)
  np.testing.assert_allclose(float(mb["loss"]), float(ma["loss"]), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(float(mb["grad_norm"]), float(ma["grad_norm"]), rtol=1e-5)
  for k in a["params"]:  # SGD with lr 1: parameter change = gradient
    np.testing.assert_allclose(np.asarray(b["params"][k]), np.asarray(a["params"][k]), atol=1e-6,
                               err_msg=k)


def test_nonfinite_gradient_skips_update_and_frozen_vision_stays(tiny_step):
  flat, tb = tiny_step["flat"], dict(tiny_step["tb"])
  ref = tiny_step["logps_fn"](flat, tb)
  f, s = tiny_step["make"](freeze=(r"^visual\.",))
  out, m = f(s, tb, ref)
  assert float(m["skipped"]) == 0.0 and int(out["step"]) == 1
  changed = {k for k in flat if not np.array_equal(np.asarray(out["params"][k]), np.asarray(flat[k]))}
  assert changed and not any(k.startswith("visual.") for k in changed)
  assert "model.layers.0.self_attn.q_proj.weight" in changed
  tb["advantages"] = np.array([np.nan, 1.0, 0.0, 0.0], np.float32)
  f, s = tiny_step["make"]()
  out, m = f(s, tb, ref)
  assert float(m["skipped"]) == 1.0 and int(out["step"]) == 1
  for k in flat:
    np.testing.assert_array_equal(np.asarray(out["params"][k]), np.asarray(flat[k]))


def test_sft_loss_is_token_mean_nll(tiny_step):
  flat, tb = tiny_step["flat"], tiny_step["tb"]
  lp = np.asarray(tiny_step["logps_fn"](flat, tb))
  f, s = tiny_step["make"](mode="sft")
  _, m = f(s, tb, None)
  mask = tb["completion_mask"]
  np.testing.assert_allclose(float(m["loss"]), -(lp * mask).sum() / mask.sum(), rtol=1e-5)

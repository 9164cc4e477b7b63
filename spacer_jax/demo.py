"""The CPU demo: train.py's run on synthetic data, then a held-out evaluation, a plot and a summary.

    python -m spacer_jax.train --config=configs/sgrlvr.py:demo --workdir=DIR
    python -m spacer_jax.demo --workdir=DIR          (the same; --config defaults to the demo's)

run the real trainer (`train.train_and_evaluate`) on the synthetic dataset (generated on first use)
with a tiny random-init Qwen2.5-VL and the project's offline tokenizer: `config.sft_warmup_steps` SFT
steps on the templated think/map/answer traces that the synthetic generator writes into each
record's `process` field, then SG-RLVR. The trainer knows nothing about the demo: the demo config
names `finish` as its `post_train` step, which train.py's main calls after training.

`finish` evaluates the checkpoints at the end of SFT and at the last step on the held-out split
(through the same pipeline, sampler and rewards, SpaceR-151k prompt format; `config.demo.eval_samples`
completions per question sampled as the rollouts are, and greedy decoding if `eval_greedy`), writes
{workdir}/demo_metrics.json and {workdir}/demo_curve.png, and prints a summary whose last line is the
verdict: learned or did not learn, against ACCURACY_MARGIN (also in demo_metrics.json, which holds
only numbers that a rerun reproduces bit for bit).

Held-out accuracy uses the training prompt format on purpose: the held-out split's VSI-Bench prompt
(`configs/eval_vsibench.py:demo`) lists SpaceR-Eval's 23 fixed categories, which a 0.5M-parameter
model trained for minutes on the per-scene list has never seen.

Host code (the sampler does the device work).
"""

import dataclasses
import importlib.util
import json
import os
import time

import numpy as np

# The GRPO-step window compared by the learning check: first and last 20% of the RL steps.
WINDOW_FRAC = 0.2
# The verdict "learned" (experiments/2026-12-04_demo_robust/README.md, "The margin"): held-out answer
# accuracy after RL at least ACCURACY_MARGIN above the SFT checkpoint's, and held-out format after RL
# not below the SFT checkpoint's (both scored on config.demo.eval_samples sampled completions per
# question). 0.04 is ~2 standard errors of the difference of two 744-completion scores at accuracy
# ~0.15 (sqrt(2 * 0.15 * 0.85 / 744) = 0.019).
ACCURACY_MARGIN = 0.04


# ------------------------------------------------------------------------------------------------
# Synthetic data.
# ------------------------------------------------------------------------------------------------
def synthetic_config(config):
  """The SyntheticConfig train.py generates (SyntheticConfig.demo + config.data.synthetic)."""
  from spacer_jax.data import synthetic
  return synthetic.SyntheticConfig.demo(**config.data.synthetic.to_dict())


def synthetic_paths(config, workdir, generate=True):
  """SyntheticPaths of the run's dataset (train.py's default root), generated if missing."""
  from spacer_jax import train
  from spacer_jax.data import synthetic
  root = train.synthetic_root(config, workdir)
  if generate:
    return synthetic.generate_dataset(root, synthetic_config(config), progress=False)
  return synthetic.dataset_paths(root)


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------------
# Held-out evaluation.
# ------------------------------------------------------------------------------------------------
def heldout_records(paths, out_jsonl, use_cogmap_prompt=True):
  """The held-out split as SpaceR-151k records (training prompt format) -> (records, question types).

  Writes `out_jsonl` (SpaceR schema, video paths relative to the held-out VSI root) and reads it back
  with sources.load_spacer, so the records go through exactly the training loader (and, with
  use_cogmap_prompt=False, get plain GRPO's prompt as training does).
  """
  from spacer_jax.data import sources
  rows = _read_jsonl(paths.eval_jsonl)
  os.makedirs(os.path.dirname(out_jsonl), exist_ok=True)
  with open(out_jsonl, "w") as f:
    for r in rows:
      f.write(json.dumps({
          "problem_id": r["id"], "problem": r["question"], "data_type": "video",
          "problem_type": "multiple choice" if r["options"] else "numerical",
          "options": list(r["options"] or []), "process": "",
          "solution": f"<answer>{r['ground_truth']}</answer>",
          "path": f"{r['dataset']}/{r['scene_name']}.mp4", "data_source": "SR_dataset"}) + "\n")
  records = sources.load_spacer(out_jsonl, media_root=paths.eval_root,
                                cognitive_map_path=paths.eval_cognitive_map, strict=True)
  if not use_cogmap_prompt:
    records = sources.without_map_prompt(records)
  return records, {str(r["id"]): r["question_type"] for r in rows}


def evaluate_params(model, *, tokenizer, records, question_types, data_config, reward_config,
                    max_new_tokens, batch_size=16, num_samples=0, temperature=1.0, top_k=0,
                    top_p=1.0):
  """Held-out scores of one set of weights (fractions in [0, 1]).

  Greedy decoding (num_samples=0), or the mean over `num_samples` completions per question drawn as
  the rollouts are (temperature, top_k, top_p): the policy RL trains, scored on unseen scenes. The
  draws use fixed keys (one per batch), so two checkpoints are compared on the same random numbers
  and a rerun gives the same scores.

  Args:
    model: qwen2_5_vl.Qwen2_5_VL with the weights to score.
    tokenizer: data.tokenizer.Tokenizer.
    records: heldout_records(...)[0]; question_types: {id: VSI question_type}.
    data_config: the run's pipeline.DataConfig (shuffle, temporal and batching are replaced).
    reward_config: rewards.RewardConfig.
    max_new_tokens: completion budget.
    batch_size: prompts per sampler call.
    num_samples: completions per question (0 = one greedy completion).
    temperature, top_k, top_p: the sampler's settings when num_samples > 0.

  Returns:
    {"accuracy", "accuracy_base", "map", "format": means over scored completions, "per_task":
     {question_type: accuracy_base}, "num": questions scored, "samples": completions}.
  """
  import jax
  from spacer_jax import rewards as rewards_lib
  from spacer_jax import rollout, sampling
  from spacer_jax.data import pipeline
  k = max(int(num_samples), 1)
  decoding = dict(temperature=temperature, top_k=top_k, top_p=top_p) if num_samples else \
      dict(temperature=0.0)
  sampler = sampling.Sampler(model, vision_budget="auto",
                             stop_ids=(tokenizer.eos_token_id, tokenizer.pad_token_id), **decoding)
  dc = dataclasses.replace(data_config, batch_size=batch_size, temporal=False, shuffle=False,
                           num_epochs=1, drop_remainder=False, num_workers=0, prefetch_batches=0)
  comps = {c: [] for c in ("accuracy", "accuracy_base", "map", "format")}
  kinds, samples = [], []
  # Full batches only (the sampler rejects empty padding rows, and one shape means one compile): the
  # list is padded with repeats of its records (cyclically: there may be fewer than a batch), which
  # are not scored.
  n = len(records)
  padded = [records[i % n] for i in range(n + (-n) % batch_size)]
  seen = 0
  for index, batch in enumerate(pipeline.make_iterator(padded, tokenizer, dc, seed=0)):
    vision = {}
    if rollout.present(batch, "pixel_values_videos", "video_grid_thw"):
      vision = dict(pixel_values_videos=batch["pixel_values_videos"],
                    video_grid_thw=batch["video_grid_thw"],
                    second_per_grid_ts=batch["second_per_grid_ts"])
    out = sampler(batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                  num_samples=k, rng=jax.random.fold_in(jax.random.key(0), index), **vision)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)  # k rows per prompt
    texts = tokenizer.decode_batch([t[:m] for t, m in zip(tokens, lengths)],
                                   skip_special_tokens=True)
    valid = np.asarray(batch["valid"], bool) & (seen + np.arange(len(batch["id"])) < n)
    seen += len(batch["id"])
    ex = {"solution": [s or "<answer>0</answer>" for s in batch["solution"]],
          "problem_type": [p or "numerical" for p in batch["problem_type"]],
          "cognitive_map": list(batch["cognitive_map"]), "id": list(batch["id"])}
    c, _ = rewards_lib.compute_rewards(texts, ex, lengths, k, None, config=reward_config)
    rows = np.repeat(valid, k)
    for key in comps:
      comps[key].append(c[key][rows])
    kinds += [question_types[i] for i, v in zip(batch["id"], valid) if v for _ in range(k)]
    samples += [{"id": batch["id"][r // k], "sample": r % k, "completion": texts[r],
                 "solution": batch["solution"][r // k]} for r in map(int, np.flatnonzero(rows))]
  comps = {key: np.concatenate(v) for key, v in comps.items()}
  kinds = np.array(kinds)
  per_task = {t: float(comps["accuracy_base"][kinds == t].mean()) for t in sorted(set(kinds))}
  return {**{key: float(v.mean()) for key, v in comps.items()}, "per_task": per_task,
          "num": int(len(kinds)) // k, "samples": samples}


# ------------------------------------------------------------------------------------------------
# Metrics, plot, summary.
# ------------------------------------------------------------------------------------------------
def read_metrics(workdir):
  """metrics.jsonl rows (the last row per step wins, as after a resume)."""
  rows = {}
  for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl")):
    rows[r["step"]] = r
  return [rows[s] for s in sorted(rows)]


def window_means(rows, key, frac=WINDOW_FRAC):
  """(first, last) mean of `key` over the first and last `frac` of the GRPO steps in `rows`."""
  vals = np.array([r[key] for r in rows if not r.get("phase_sft") and key in r], np.float64)
  if len(vals) == 0:
    raise ValueError(f"no GRPO steps with {key!r} in the metrics")
  n = max(1, int(round(frac * len(vals))))
  return float(vals[:n].mean()), float(vals[-n:].mean())


def _smooth(x, k):
  if len(x) < k or k <= 1:
    return np.asarray(x, np.float64)
  c = np.cumsum(np.insert(np.asarray(x, np.float64), 0, 0.0))
  out = (c[k:] - c[:-k]) / k
  return np.concatenate([np.asarray(x[:k - 1], np.float64).cumsum() / np.arange(1, k), out])


def plot_curves(rows, out_png, heldout=None, title="demo"):
  """Writes the reward/accuracy-over-steps PNG (SFT loss, GRPO rewards; held-out points)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sft = [r for r in rows if r.get("phase_sft")]
  rl = [r for r in rows if not r.get("phase_sft")]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2]})
  if sft:
    axes[0].plot([r["step"] for r in sft], [r.get("train/loss", np.nan) for r in sft], color="k")
  axes[0].set(title="SFT warm-up on templated traces", xlabel="step", ylabel="token NLL")
  ax = axes[1]
  steps = np.array([r["step"] for r in rl])
  k = max(1, len(rl) // 12)
  for key, label, color in (("reward/accuracy", "accuracy reward (incl. map bonus)", "C0"),
                            ("reward/accuracy_base", "answer accuracy", "C1"),
                            ("reward/map", "map score", "C2"), ("reward/format", "format", "C7")):
    vals = np.array([r.get(key, np.nan) for r in rl], np.float64)
    if len(vals) and np.isfinite(vals).any():
      ax.plot(steps, vals, color=color, alpha=0.25, lw=0.8)
      ax.plot(steps, _smooth(vals, k), color=color, label=f"{label} (mean of {k})")
  if heldout:
    for name, marker in (("sft", "o"), ("final", "s")):
      if name in heldout:
        h = heldout[name]
        ax.scatter([h["step"]], [h["accuracy_base"]], marker=marker, color="C3", zorder=5,
                   label=f"held-out answer accuracy ({name})")
  ax.set(title="SG-RLVR (GRPO) rollouts", xlabel="step", ylabel="mean over the rollout batch")
  ax.legend(fontsize=7, loc="best")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)


def finish(config, workdir, *, evaluate_heldout=True, printer=print):
  """Held-out evaluation (end of SFT, last step), demo_metrics.json, demo_curve.png, summary.

  Works for any synthetic-data run of train.py (spacer_jax.sweep calls it on each ablation arm):
  without GRPO steps (mode=sft) the rollout windows are left out, without SFT steps the SFT
  checkpoint is not evaluated, and a config without a `demo` section evaluates every held-out
  question in batches of 32.

  Returns the dict written to demo_metrics.json.
  """
  from spacer_jax import config_lib, modeling
  from spacer_jax.data import tokenizer as tokenizer_lib
  t0 = time.perf_counter()
  rows = read_metrics(workdir)
  # The "sft" held-out point is the end of the warm-up (with mode=sft: the step at which the RL arms
  # of an ablation leave SFT, so both are scored from the same checkpoint).
  sft_steps = int(config.sft_warmup_steps)
  last = max(r["step"] for r in rows)
  # Only numbers a rerun reproduces bit for bit (no paths, no times): two runs of the same command
  # write the same demo_metrics.json.
  out = {"seed": int(config.seed),
         "sft_steps": sum(1 for r in rows if r.get("phase_sft")),
         "grpo_steps": sum(1 for r in rows if not r.get("phase_sft")), "last_step": last,
         "window_frac": WINDOW_FRAC}
  for key in ("reward/accuracy", "reward/accuracy_base", "reward/map", "reward/total",
              "reward/format"):
    if out["grpo_steps"]:
      first, final = window_means(rows, key)
      out[key] = {"first": first, "last": final, "gain": final - first}
  heldout = {}
  if evaluate_heldout:
    paths = synthetic_paths(config, workdir)
    records, qtypes = heldout_records(paths, os.path.join(workdir, "demo", "heldout.jsonl"),
                                      use_cogmap_prompt=bool(config.data.use_cogmap_prompt))
    settings = config.get("demo") or {}
    max_items = int(settings.get("eval_max_items", 0))
    if max_items:
      records = records[:max_items]
    tok_dir = config.data.tokenizer_dir or os.path.join(workdir, "tokenizer")
    tokenizer = tokenizer_lib.load_tokenizer(tok_dir)
    reward_config = config_lib.make_reward_config(config)
    from spacer_jax import checkpoint  # pylint: disable=g-import-not-at-top
    final = checkpoint.latest_step(os.path.join(workdir, modeling.RUN_CKPT_DIR))
    # One device in float32, whatever mesh and dtypes the run trained with.
    abstract = modeling.abstract_model(modeling.model_config(workdir))
    # The held-out set scored as the rollouts sample (config.demo.eval_samples completions per
    # question; 0 = greedy), and greedily too where config.demo.eval_greedy asks for it.
    k = int(settings.get("eval_samples", 0))
    decoders = {"heldout": dict(num_samples=k, temperature=float(config.sampling.temperature),
                                top_k=int(config.sampling.top_k), top_p=float(config.sampling.top_p))}
    if k and settings.get("eval_greedy", False):
      decoders["heldout_greedy"] = dict(num_samples=0)
    results = {key: {} for key in decoders}
    for name, step in ((("sft", sft_steps),) if sft_steps else ()) + (("final", final),):
      if not os.path.isdir(os.path.join(workdir, modeling.RUN_CKPT_DIR, str(step), "state")):
        raise FileNotFoundError(f"{workdir}/ckpt/{step}: no checkpoint at step {step}; "
                                f"config.ckpt_every_steps must divide config.sft_warmup_steps")
      model = abstract.merge(modeling.load_params(workdir, abstract, step=step))
      for key, decoding in decoders.items():
        results[key][name] = {"step": step, **evaluate_params(
            model, tokenizer=tokenizer, records=records, question_types=qtypes,
            data_config=config_lib.make_data_config(config, False), reward_config=reward_config,
            max_new_tokens=int(config.sampling.max_new_tokens),
            batch_size=int(settings.get("eval_batch_size", 32)), **decoding)}
    with open(os.path.join(workdir, "demo_heldout_samples.jsonl"), "w") as f:
      for key, res in results.items():
        for name, h in res.items():
          for smp in h.pop("samples"):
            f.write(json.dumps({"decoding": "greedy" if key == "heldout_greedy" or not k else
                                "sampled", "checkpoint": name, "step": h["step"], **smp}) + "\n")
    heldout = results["heldout"]
    out["heldout_samples_per_question"] = k
    out.update(results)
    if "sft" in heldout:
      out["verdict"] = verdict(heldout["sft"], heldout["final"])
  # The curve needs the optional [plots] part (matplotlib); without it the demo still finishes.
  out["curve"] = importlib.util.find_spec("matplotlib") is not None
  with open(os.path.join(workdir, "demo_metrics.json"), "w") as f:
    json.dump(out, f, indent=1)
  if out["curve"]:
    plot_curves(rows, os.path.join(workdir, "demo_curve.png"), heldout,
                title=f"spacer_jax demo (seed {config.seed})")
  times = {"train_s": float(sum(r.get("time/step_s", 0.0) for r in rows)),
           "eval_s": time.perf_counter() - t0}
  printer(summary_text(out, workdir, times))
  return out


def verdict(sft, final, margin=ACCURACY_MARGIN):
  """Learned or not, from the held-out scores of the SFT checkpoint and the final one.

  Learned = answer accuracy gain >= `margin` and format not below the SFT checkpoint's.
  Returns {"learned", "accuracy_gain", "format_change", "margin", "text"}.
  """
  gain = final["accuracy_base"] - sft["accuracy_base"]
  fmt = final["format"] - sft["format"]
  learned = bool(gain >= margin and fmt >= 0)
  why = (f"held-out answer accuracy {sft['accuracy_base']:.3f} -> {final['accuracy_base']:.3f} "
         f"({gain:+.3f}; margin {margin:+.3f}), format {sft['format']:.3f} -> {final['format']:.3f}")
  return {"learned": learned, "accuracy_gain": gain, "format_change": fmt, "margin": margin,
          "text": f"{'learned' if learned else 'did not learn'}: {why}"}


def summary_text(m, workdir, times=None):
  """The final summary printed by the demo; its last line is the verdict."""
  lines = [f"demo summary ({os.path.abspath(workdir)})",
           f"  steps: {m['sft_steps']} SFT + {m['grpo_steps']} SG-RLVR (GRPO)"]
  for key in ("reward/accuracy", "reward/accuracy_base", "reward/map", "reward/format"):
    if key not in m:
      continue
    v = m[key]
    lines.append(f"  {key:22s} first {int(100 * m['window_frac'])}% {v['first']:.3f} -> last "
                 f"{int(100 * m['window_frac'])}% {v['last']:.3f} ({v['gain']:+.3f})")
  k = m.get("heldout_samples_per_question", 0)
  for key, how in (("heldout", f"{k} samples per question" if k else "greedy"),
                   ("heldout_greedy", "greedy")):
    for name, h in m.get(key, {}).items():
      tasks = ", ".join(f"{t} {v:.2f}" for t, v in h["per_task"].items())
      lines.append(f"  held-out after {name:5s} (step {h['step']}, {how}): answer accuracy "
                   f"{h['accuracy_base']:.3f}, accuracy reward {h['accuracy']:.3f}, map "
                   f"{h['map']:.3f}, format {h['format']:.3f} on {h['num']} questions [{tasks}]")
  if times:
    lines.append(f"  time: {times['train_s'] / 60:.1f} min training, {times['eval_s'] / 60:.1f} min "
                 f"held-out evaluation")
  curve = (os.path.join(os.path.abspath(workdir), "demo_curve.png") if m.get("curve", True)
           else "not drawn (matplotlib missing: pip install 'spacer_jax[plots]')")
  lines.append(f"  curve: {curve}; metrics: "
               f"{os.path.join(os.path.abspath(workdir), 'demo_metrics.json')}")
  if "verdict" in m:
    lines.append(f"verdict: {m['verdict']['text']}")
  return "\n".join(lines)


def main(argv):
  """`python -m spacer_jax.demo --workdir=DIR`: train_and_evaluate, then `finish`."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from spacer_jax import train  # pylint: disable=g-import-not-at-top
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  _, interrupted = train.train_and_evaluate(config, workdir)
  if not interrupted:
    finish(config, os.path.abspath(workdir))


def define_flags(fv=None):
  """--config (default: the packaged configs/sgrlvr.py:demo) and --workdir."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from spacer_jax import cli  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if fv is None else fv
  config_flags.DEFINE_config_file("config", cli.resolve_config("configs/sgrlvr.py:demo"),
                                  "Demo config (default: configs/sgrlvr.py:demo).", lock_config=True,
                                  flag_values=fv)
  flags.DEFINE_string("workdir", None, "Run directory.", flag_values=fv)
  flags.mark_flags_as_required(["workdir"], flag_values=fv)


if __name__ == "__main__":
  from spacer_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, define_flags, __doc__)

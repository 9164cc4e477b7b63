"""LoRA vs full fine-tuning of SG-RLVR at demo scale, 3 seeds each (README.md of this directory).

  python experiments/2026-12-04_lora/run_compare.py --out=/tmp/lora_cmp [--seeds=1,2,3] \
      [--parallel=2] [--arms=full,lora] [--summarize_only]

1. The base: the demo recipe's SFT phase alone (configs/sgrlvr.py:demo, 150 SFT steps on the templated
   traces with the demo's learning-rate schedule) in {out}/sft, exported to {out}/sft_hf with
   `python -m spacer_jax.convert` (float32): the "pretrained model" both arms fine-tune.
2. Per seed and arm, 50 SG-RLVR steps from {out}/sft_hf with the demo's GRPO settings (4 prompts x
   G = 4, beta 0.04, map/temporal/length rewards), cosine learning rate to 0:
     full: every parameter, lr 9e-4 (the demo's learning rate where its GRPO phase starts);
     lora: rank 8, alpha 32 on the text decoder's q/k/v/o/gate/up/down, lr 9e-3 (10x).
   Runs are niced, at most --parallel at a time, sharing one synthetic dataset.
3. Per run: the mean rollout accuracy reward (`reward/accuracy`: answer accuracy incl. the map bonus)
   over the first and last 20% of the GRPO steps, and the held-out greedy answer accuracy of the final
   weights on the 186 held-out questions (spacer_jax.demo.evaluate_params; the base is scored once).
   Writes {out}/summary.json, prints the table and draws {out}/curves.png.
"""

import argparse
import ast
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

SFT_STEPS, DEMO_STEPS, GRPO_STEPS = 150, 200, 50  # --sft_steps/--grpo_steps: a dry run only
ARMS = {
    "full": ["--config=configs/sgrlvr.py:demo", "--config.optim.lr=9e-4"],
    "lora": ["--config=configs/sgrlvr.py:demo,lora=8", "--config.optim.lr=9e-3"],
}
MARGIN = 0.05  # a difference of the arms' 3-seed means, fixed before the runs (README.md)


def _train(workdir, flags, log):
  # flags[0] is --config=...: absl reads the overrides after it.
  cmd = ["nice", "-n", "10", sys.executable, "-m", "spacer_jax.train", f"--workdir={workdir}",
         *flags, "--config.post_train=", "--config.use_progress_bar=False"]
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait(proc, what, log):
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise SystemExit(f"{what} failed (exit {proc.returncode}); see {log}")
  return usage.ru_utime + usage.ru_stime


def make_base(out, sft_steps=SFT_STEPS):
  """The SFT checkpoint both arms start from, as a Hugging Face directory."""
  hf = os.path.join(out, "sft_hf")
  if os.path.isfile(os.path.join(hf, "config.json")):
    return hf
  sft = os.path.join(out, "sft")
  log = os.path.join(out, "sft.log")
  t0 = time.time()
  cpu = _wait(_train(sft, ["--config=configs/sgrlvr.py:demo", "--config.seed=42",
                           f"--config.total_steps={sft_steps}",
                           f"--config.sft_warmup_steps={sft_steps}",
                           f"--config.ckpt_every_steps={sft_steps}",
                           f"--config.optim.decay_steps={DEMO_STEPS}",
                           f"--config.data.synthetic_root={os.path.join(out, 'data')}"], log),
              "the SFT base", log)
  subprocess.run([sys.executable, "-m", "spacer_jax.convert", f"--workdir={sft}", f"--out={hf}",
                  "--dtype=float32"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, check=True)
  with open(os.path.join(out, "sft_time.json"), "w") as f:
    json.dump({"wall_s": time.time() - t0, "cpu_s": cpu}, f)
  return hf


def run_flags(arm, seed, out, hf, grpo_steps=GRPO_STEPS):
  return [*ARMS[arm], f"--config.seed={seed}", "--config.model.variant=",
          f"--config.model.hf_dir={hf}", "--config.sft_warmup_steps=0",
          f"--config.total_steps={grpo_steps}", f"--config.ckpt_every_steps={grpo_steps}",
          f"--config.data.synthetic_root={os.path.join(out, 'data')}"]


def heldout(out, workdirs, max_items=0):
  """Held-out greedy scores of the base and of each run's final weights (merged for LoRA runs)."""
  from spacer_jax.configs import sgrlvr  # pylint: disable=g-import-not-at-top
  from spacer_jax import config_lib, demo, modeling  # pylint: disable=g-import-not-at-top
  from spacer_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from spacer_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  config = sgrlvr.get_config("demo")
  paths = synthetic.dataset_paths(os.path.join(out, "data"))
  records, qtypes = demo.heldout_records(paths, os.path.join(out, "heldout.jsonl"))
  records = records[:max_items] if max_items else records
  hf = os.path.join(out, "sft_hf")
  tokenizer = tokenizer_lib.load_tokenizer(hf)
  abstract = modeling.abstract_model(modeling.model_config(hf))
  kw = dict(tokenizer=tokenizer, records=records, question_types=qtypes,
            data_config=config_lib.make_data_config(config, False),
            reward_config=config_lib.make_reward_config(config),
            max_new_tokens=int(config.sampling.max_new_tokens),
            batch_size=int(config.demo.eval_batch_size))
  scores = {}
  for name, source in [("base", hf)] + sorted(workdirs.items()):
    s = demo.evaluate_params(abstract.merge(modeling.load_params(source, abstract)), **kw)
    s.pop("samples")
    scores[name] = s
    print(f"held-out {name}: answer accuracy {s['accuracy_base']:.3f}, format {s['format']:.3f}",
          flush=True)
  return scores


def run_numbers(workdir):
  from spacer_jax import demo  # pylint: disable=g-import-not-at-top
  rows = demo.read_metrics(workdir)
  first, last = demo.window_means(rows, "reward/accuracy")
  fb, lb = demo.window_means(rows, "reward/accuracy_base")
  ff, lf = demo.window_means(rows, "reward/format")
  with open(os.path.join(workdir, "params.txt")) as f:
    lines = f.read().splitlines()[1:]
  lora = os.path.isfile(os.path.join(workdir, "lora_config.json"))
  trained = sum(int(np.prod(ast.literal_eval(_shape(line))))
                for line in lines if not lora or ".lora_" in line.split()[0])
  return {"first20_acc": first, "last20_acc": last, "gain_acc": last - first,
          "first20_base": fb, "last20_base": lb, "first20_format": ff, "last20_format": lf,
          "trained_params": trained, "curve": [r.get("reward/accuracy") for r in rows]}


def _shape(line):
  """The shape tuple text of a params.txt line (`key (a, b) dtype logical spec`)."""
  return line[line.index("("):line.index(")") + 1]


def plot(summary, out_png):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from spacer_jax import demo  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  for arm, color in (("full", "C0"), ("lora", "C3")):
    runs = [v for k, v in summary["runs"].items() if k.startswith(arm + "_")]
    for r in runs:
      y = np.array(r["curve"], np.float64)
      ax.plot(np.arange(1, len(y) + 1), demo._smooth(y, 5), color=color, alpha=0.6)  # pylint: disable=protected-access
    ax.plot([], [], color=color, label=f"{arm} ({len(runs)} seeds, mean of 5 steps)")
  ax.set(xlabel="GRPO step (from the SFT base)", ylabel="rollout accuracy reward",
         title="SG-RLVR at demo scale: LoRA (r=8, text) vs full fine-tuning")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--seeds", default="1,2,3")
  ap.add_argument("--arms", default="full,lora")
  ap.add_argument("--parallel", type=int, default=2)
  ap.add_argument("--summarize_only", action="store_true")
  ap.add_argument("--sft_steps", type=int, default=SFT_STEPS)
  ap.add_argument("--grpo_steps", type=int, default=GRPO_STEPS)
  ap.add_argument("--heldout_items", type=int, default=0, help="0 = all (a dry run: fewer)")
  args = ap.parse_args()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  seeds = [int(s) for s in args.seeds.split(",")]
  names = [f"{arm}_{s}" for s in seeds for arm in args.arms.split(",")]
  times = {}
  if not args.summarize_only:
    hf = make_base(out, args.sft_steps)
    from spacer_jax import checkpoint  # pylint: disable=g-import-not-at-top
    pending, running = [n for n in names if checkpoint.latest_step(
        os.path.join(out, n, "ckpt")) != args.grpo_steps], []
    while pending or running:
      while pending and len(running) < args.parallel:
        n = pending.pop(0)
        arm, seed = n.split("_")
        log = os.path.join(out, n + ".log")
        running.append((n, log, time.time(), _train(
            os.path.join(out, n), run_flags(arm, seed, out, hf, args.grpo_steps), log)))
      n, log, t0, proc = running.pop(0)
      times[n] = {"cpu_s": _wait(proc, n, log), "wall_s": time.time() - t0}
      print(f"{n} done: {times[n]}", flush=True)
    with open(os.path.join(out, "times.json"), "w") as f:
      json.dump(times, f, indent=1)
  elif os.path.isfile(os.path.join(out, "times.json")):
    times = json.load(open(os.path.join(out, "times.json")))
  runs = {n: {**run_numbers(os.path.join(out, n)), **times.get(n, {})} for n in names}
  scores = heldout(out, {n: os.path.join(out, n) for n in names}, args.heldout_items)
  for n in names:
    runs[n]["heldout_acc"] = scores[n]["accuracy_base"]
    runs[n]["heldout_format"] = scores[n]["format"]
  summary = {"runs": runs, "base_heldout": scores["base"], "margin": MARGIN}
  for arm in args.arms.split(","):
    rs = [runs[n] for n in names if n.startswith(arm + "_")]
    summary[arm] = {k: {"mean": float(np.mean([r[k] for r in rs])),
                        "sem": float(np.std([r[k] for r in rs], ddof=1) / np.sqrt(len(rs)))
                        if len(rs) > 1 else float("nan")}
                    for k in ("gain_acc", "last20_acc", "heldout_acc")}
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  plot(summary, os.path.join(out, "curves.png"))
  print(f"base (SFT) held-out answer accuracy {scores['base']['accuracy_base']:.3f}")
  print("| run | trained params | accuracy reward first 20% -> last 20% (gain) | held-out answer "
        "accuracy | format last 20% | wall min |")
  print("|---|---|---|---|---|---|")
  for n in names:
    r = runs[n]
    print(f"| {n} | {r['trained_params']:,} | {r['first20_acc']:.3f} -> {r['last20_acc']:.3f} "
          f"({r['gain_acc']:+.3f}) | {r['heldout_acc']:.3f} | {r['last20_format']:.3f} | "
          f"{r.get('wall_s', float('nan')) / 60:.1f} |")
  for arm in args.arms.split(","):
    s = summary[arm]
    print(f"{arm}: gain {s['gain_acc']['mean']:+.3f} +- {s['gain_acc']['sem']:.3f}, last 20% "
          f"{s['last20_acc']['mean']:.3f} +- {s['last20_acc']['sem']:.3f}, held-out "
          f"{s['heldout_acc']['mean']:.3f} +- {s['heldout_acc']['sem']:.3f} (mean +- SEM)")


if __name__ == "__main__":
  main()

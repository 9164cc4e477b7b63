"""The demo's learning check over runs: per-run numbers, the distribution, the verdict of every run.

  .venv/bin/python experiments/2026-11-26_demo/run_seeds.py --out=/tmp/demo_seeds [--check] \
      [--seeds=1,2,3,42:1core,...] [--parallel=1] [--nice=10] [--extra=--config.x=y ...] \
      [--summarize_only]

Each run is `run_demo.py --config=configs/sgrlvr.py:demo --config.seed=S` (the real trainer, the
README's command plus timing) in {out}/seed_S[_VARIANT], all runs sharing one synthetic dataset and
tokenizer ({out}/data, {out}/tokenizer; both are bit-identical to what each run would generate). A run
is `S` or `S:VARIANT`, where VARIANT perturbs the numerics without changing the recipe:
  1core      taskset -c 0: one CPU, so XLA's intra-op thread pool has one thread (other partitions
             of the work, other float rounding);
  fast_math  XLA_FLAGS=--xla_cpu_enable_fast_math=true (reassociation, approximate functions).

Per run: held-out answer accuracy and format (demo_metrics.json's `heldout`: completions sampled as
the rollouts are) at the SFT checkpoint and at the last step, the demo's verdict
(spacer_jax.demo.verdict: accuracy gain >= demo.ACCURACY_MARGIN and format not below), the mean
rollout accuracy reward over the first and last 20% of the GRPO steps, wall and CPU time, the git
commit the run recorded. Summary: mean, standard deviation and worst run of the held-out gains, how
many runs learned. `--check` exits 1 unless every run learned. Writes
{out}/seeds_summary.json and {out}/distribution.png.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from spacer_jax import demo  # noqa: E402

# Numerics perturbations: (command prefix, extra environment).
VARIANTS = {
    "": ([], {}),
    "1core": (["taskset", "-c", "0"], {}),
    "fast_math": ([], {"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"}),
}


def parse_runs(text):
  runs = []
  for item in text.split(","):
    seed, _, variant = item.strip().partition(":")
    if variant not in VARIANTS:
      raise SystemExit(f"unknown variant {variant!r} in {item!r}; known: {sorted(VARIANTS)}")
    runs.append((int(seed), variant))
  return runs


def run_name(seed, variant):
  return f"seed_{seed}" + (f"_{variant}" if variant else "")


def start_run(seed, variant, out, extra, nice):
  workdir = os.path.join(out, run_name(seed, variant))
  prefix, env = VARIANTS[variant]
  cmd = [*(["nice", "-n", str(nice)] if nice else []), *prefix, sys.executable,
         os.path.join(HERE, "run_demo.py"), "--config=configs/sgrlvr.py:demo", f"--workdir={workdir}",
         f"--config.seed={seed}", f"--config.data.synthetic_root={os.path.join(out, 'data')}",
         f"--config.data.tokenizer_dir={os.path.join(out, 'tokenizer')}",
         "--config.use_progress_bar=False", *extra]
  log = open(os.path.join(out, run_name(seed, variant) + ".log"), "w")
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                          env={**os.environ, "PYTHONPATH": ROOT, **env})
  return workdir, proc


def run_numbers(workdir):
  m = json.load(open(os.path.join(workdir, "demo_metrics.json")))
  tp = os.path.join(workdir, "demo_time.json")
  t = json.load(open(tp)) if os.path.exists(tp) else {}
  commit = open(os.path.join(workdir, "git_commit.txt")).read().strip()
  h = m["heldout"]
  v = demo.verdict(h["sft"], h["final"])
  return {"heldout_sft": h["sft"]["accuracy_base"], "heldout_rl": h["final"]["accuracy_base"],
          "heldout_gain": v["accuracy_gain"],
          "format_sft": h["sft"]["format"], "format_rl": h["final"]["format"],
          "format_change": v["format_change"], "learned": v["learned"], "heldout_num": h["final"]["num"],
          "first20_acc": m["reward/accuracy"]["first"], "last20_acc": m["reward/accuracy"]["last"],
          "gain_acc": m["reward/accuracy"]["gain"],
          "first20_format": m["reward/format"]["first"], "last20_format": m["reward/format"]["last"],
          "wall_s": t.get("total_wall_s", float("nan")), "cpu_s": t.get("total_cpu_s", float("nan")),
          "commit": commit}


def plot(names, rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, (a, b, title) in zip(axes, (("heldout_sft", "heldout_rl", "held-out answer accuracy"),
                                     ("format_sft", "format_rl", "held-out format"))):
    for name, r in zip(names, rows):
      color = "C2" if r["learned"] else "C3"
      ax.plot([0, 1], [r[a], r[b]], "-o", color=color, alpha=0.7)
      ax.annotate(name.replace("seed_", ""), (1, r[b]), xytext=(4, 0), textcoords="offset points",
                  fontsize=7, va="center")
    ax.set(xticks=[0, 1], xticklabels=["after SFT", "after SG-RLVR"], title=title, xlim=(-0.2, 1.4))
  fig.suptitle(f"{len(rows)} demo runs (green: learned, red: did not learn; sampled completions, "
               f"{rows[0]['heldout_num']} held-out questions)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--seeds", default="1,2,3", help="runs: S or S:VARIANT, comma separated")
  ap.add_argument("--parallel", type=int, default=1)
  ap.add_argument("--nice", type=int, default=0, help="nice level of the runs (0 = not niced)")
  ap.add_argument("--check", action="store_true", help="exit 1 unless every run learned")
  ap.add_argument("--extra", action="append", default=[], help="extra flags for every run")
  ap.add_argument("--summarize_only", action="store_true",
                  help="only read {out}/seed_S*/demo_metrics.json of finished runs")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  runs = parse_runs(args.seeds)
  pending, running, done = ([] if args.summarize_only else list(runs)), [], {}
  if args.summarize_only:
    done = {r: run_numbers(os.path.join(args.out, run_name(*r))) for r in runs}
  elif pending:
    # One dataset and tokenizer for all runs, made before they start (no race on the directory).
    subprocess.run([sys.executable, "-c", (
        "import sys; from spacer_jax import demo, train; from spacer_jax.data import tokenizer;"
        "import importlib.util as u; s = u.spec_from_file_location('c', 'spacer_jax/configs/sgrlvr.py');"
        "m = u.module_from_spec(s); s.loader.exec_module(m); c = m.get_config('demo');"
        f"c.data.synthetic_root = {os.path.join(args.out, 'data')!r};"
        "demo.synthetic_paths(c, '');"
        f"tokenizer.build_offline_tokenizer(out_dir={os.path.join(args.out, 'tokenizer')!r})")],
                   cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": ROOT})
  while pending or running:
    while pending and len(running) < args.parallel:
      r = pending.pop(0)
      running.append((r, *start_run(*r, args.out, args.extra, args.nice)))
    r, workdir, proc = running.pop(0)
    if proc.wait() != 0:
      raise SystemExit(f"run {run_name(*r)} failed; see {os.path.join(args.out, run_name(*r))}.log")
    done[r] = run_numbers(workdir)
  names = [run_name(*r) for r in runs]
  rows = [done[r] for r in runs]
  keys = [k for k in rows[0] if k != "commit"]
  print(f"{'run':18s} " + " ".join(f"{k:>14s}" for k in keys) + "  commit")
  for name, row in zip(names, rows):
    print(f"{name:18s} " + " ".join(f"{float(row[k]):14.3f}" for k in keys) + f"  {row['commit']}")
  gains = np.array([r["heldout_gain"] for r in rows])
  fmt = np.array([r["format_change"] for r in rows])
  learned = [r["learned"] for r in rows]
  summary = {
      "runs": names, "per_run": dict(zip(names, rows)), "margin": demo.ACCURACY_MARGIN,
      "heldout_gain_mean": float(gains.mean()),
      "heldout_gain_std": float(gains.std(ddof=1)) if len(gains) > 1 else None,
      "heldout_gain_worst": float(gains.min()), "worst_run": names[int(gains.argmin())],
      "format_change_mean": float(fmt.mean()), "format_change_worst": float(fmt.min()),
      "rollout_gain_mean": float(np.mean([r["gain_acc"] for r in rows])),
      "learned": int(sum(learned)), "every_run_learned": all(learned)}
  print(json.dumps({k: v for k, v in summary.items() if k != "per_run"}, indent=1))
  with open(os.path.join(args.out, "seeds_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  plot(names, rows, os.path.join(args.out, "distribution.png"))
  if args.check and not all(learned):
    raise SystemExit(f"learning check failed: {len(learned) - sum(learned)} of {len(learned)} runs "
                     f"did not learn")


if __name__ == "__main__":
  main()

"""The issue-6 learning check: the demo for 3 seeds; prints per-seed numbers and the margin test.

  .venv/bin/python experiments/2026-11-26_demo/run_seeds.py --out=/tmp/demo_seeds [--check] \
      [--seeds=1,2,3] [--parallel=1] [--extra=--config.x=y ...] [--summarize_only]

Each seed runs `run_demo.py --config=configs/sgrlvr.py:demo --config.seed=S` (the real trainer) in
{out}/seed_S, sharing one synthetic dataset ({out}/data). Per seed: the mean accuracy reward
(`reward/accuracy` of the rollouts: answer accuracy incl. the map bonus) over the first and last 20%
of the GRPO steps, the same for the answer accuracy alone, held-out greedy accuracy after SFT and
after RL, wall and CPU time.

The margin (README.md of this directory): the learning check passes when, for every seed,
  last20 - first20 of reward/accuracy > MARGIN   and   held-out accuracy after RL > after SFT,
and the mean gain over seeds exceeds 2 standard errors of the per-seed gains.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MARGIN = 0.05  # set from the measured seed-to-seed spread, see README.md


def run_seed(seed, out, extra):
  workdir = os.path.join(out, f"seed_{seed}")
  cmd = [sys.executable, os.path.join(HERE, "run_demo.py"), "--config=configs/sgrlvr.py:demo",
         f"--workdir={workdir}", f"--config.seed={seed}",
         f"--config.data.synthetic_root={os.path.join(out, 'data')}", *extra]
  log = open(os.path.join(out, f"seed_{seed}.log"), "w")
  return workdir, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def seed_numbers(workdir):
  m = json.load(open(os.path.join(workdir, "demo_metrics.json")))
  tp = os.path.join(workdir, "demo_time.json")
  t = json.load(open(tp)) if os.path.exists(tp) else {"total_wall_s": float("nan"),
                                                      "total_cpu_s": float("nan")}
  h = m["heldout"]
  return {"first20_acc": m["reward/accuracy"]["first"], "last20_acc": m["reward/accuracy"]["last"],
          "gain_acc": m["reward/accuracy"]["gain"],
          "first20_base": m["reward/accuracy_base"]["first"],
          "last20_base": m["reward/accuracy_base"]["last"],
          "heldout_sft": h["sft"]["accuracy_base"], "heldout_rl": h["final"]["accuracy_base"],
          "heldout_sft_reward": h["sft"]["accuracy"], "heldout_rl_reward": h["final"]["accuracy"],
          "wall_s": t["total_wall_s"], "cpu_s": t["total_cpu_s"]}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--seeds", default="1,2,3")
  ap.add_argument("--parallel", type=int, default=1)
  ap.add_argument("--check", action="store_true", help="exit 1 unless the learning check passes")
  ap.add_argument("--margin", type=float, default=MARGIN)
  ap.add_argument("--extra", action="append", default=[], help="extra flags for every seed")
  ap.add_argument("--summarize_only", action="store_true",
                  help="only read {out}/seed_S/demo_metrics.json of finished runs")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  seeds = [int(s) for s in args.seeds.split(",")]
  pending, running, done = ([] if args.summarize_only else list(seeds)), [], {}
  if args.summarize_only:
    done = {s: seed_numbers(os.path.join(args.out, f"seed_{s}")) for s in seeds}
  while pending or running:
    while pending and len(running) < args.parallel:
      s = pending.pop(0)
      running.append((s, *run_seed(s, args.out, args.extra)))
    s, workdir, proc = running.pop(0)
    if proc.wait() != 0:
      raise SystemExit(f"seed {s} failed; see {os.path.join(args.out, f'seed_{s}.log')}")
    done[s] = seed_numbers(workdir)
  rows = [done[s] for s in seeds]
  keys = list(rows[0])
  print("seed " + " ".join(f"{k:>18s}" for k in keys))
  for s, r in zip(seeds, rows):
    print(f"{s:4d} " + " ".join(f"{r[k]:18.3f}" for k in keys))
  gains = np.array([r["gain_acc"] for r in rows])
  sem = gains.std(ddof=1) / np.sqrt(len(gains)) if len(gains) > 1 else float("nan")
  ok_gain = bool((gains > args.margin).all())
  ok_sem = bool(gains.mean() > 2 * sem) if len(gains) > 1 else True
  ok_heldout = all(r["heldout_rl"] > r["heldout_sft"] for r in rows)
  summary = {"seeds": seeds, "per_seed": rows, "gain_mean": float(gains.mean()),
             "gain_std": float(gains.std(ddof=1)) if len(gains) > 1 else None, "gain_sem": float(sem),
             "margin": args.margin, "every_gain_above_margin": ok_gain, "mean_above_2sem": ok_sem,
             "heldout_rl_above_sft_every_seed": ok_heldout}
  print(json.dumps({k: v for k, v in summary.items() if k != "per_seed"}, indent=1))
  with open(os.path.join(args.out, "seeds_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  if args.check and not (ok_gain and ok_sem and ok_heldout):
    raise SystemExit("learning check failed")


if __name__ == "__main__":
  main()

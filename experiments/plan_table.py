"""The README's "will it fit" table: every recipe size on the TPU slice its run sheet names.

  python experiments/plan_table.py [--out=experiments/2026-12-04_plan_7b_v5p8/table.json] [--only=7b]
  python experiments/plan_table.py --add="SG-RLVR 7B=plan.json"   # a report from a direct run

Runs `python -m spacer_jax.plan` once per row (a fresh process each: one compile's host memory is
returned before the next), keeps each JSON report, and prints the markdown table the README shows.
Rows already in --out are reused (--redo recompiles the rows --only selects, all without --only;
the other rows stay). Every row is printed; one without a report says "not compiled" and why
(--reason; by default that it has not been run), never a number.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (row name, config, topology, overrides): the slices named in each config's run sheet; the
# overrides are the settings a row needs to fit (its README command).
ROWS = (
    ("SG-RLVR 3B", "configs/sgrlvr.py:size=3b", "v5p-8", ()),
    ("SG-RLVR 7B", "configs/sgrlvr.py:size=7b", "v5p-8", ()),
    # 32B and 72B: 4 micro-batches, their config preset (in one, 32B's train step needs >= 107.5 GiB
    # per chip: 32b_one_microbatch.json).
    ("SG-RLVR 32B", "configs/sgrlvr.py:size=32b", "v5p-32", ()),
    # 72B's preset also scans its decoder layers (the unrolled train step needed more than 23.5 GB of
    # host memory to compile on the 24 GB machine these rows were made on).
    ("SG-RLVR 72B", "configs/sgrlvr.py:size=72b", "v5p-64", ()),
    ("SFT 7B", "configs/sft.py:size=7b", "v5p-8", ()),
    # LoRA (rank 16 on the text decoder; the frozen base is the reference) on 16 GB v5e chips: at
    # the recipe's batch (8 prompts x G = 8) the 7B train step needs 27.8 GiB per chip in one
    # micro-batch, so 4 micro-batches; one chip (Colab) takes one prompt x 8 samples per step.
    ("SG-RLVR 7B LoRA", "configs/sgrlvr.py:size=7b,lora=16", "v5e-8",
     ("--config.grad_accum_steps=4",)),
    ("SG-RLVR 3B LoRA", "configs/sgrlvr.py:size=3b,lora=16", "v5e-1",
     ("--config.data.batch_size=1", "--config.grad_accum_steps=8")),
)


def run_row(config, topology, overrides, extra):
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    path = f.name
  cmd = [sys.executable, "-m", "spacer_jax.plan", f"--config={config}", f"--topology={topology}",
         f"--json={path}", *overrides, *extra]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": ROOT})
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  with open(path) as f:
    report = json.load(f)
  os.unlink(path)
  report["wall_seconds"] = time.perf_counter() - t0
  report["overrides"] = list(overrides)
  report["command"] = " ".join(["python -m spacer_jax.plan"] + cmd[3:5] + cmd[6:])
  print(proc.stdout, flush=True)
  return report


def judged_on_compiler_hbm(report):
  """A stored report judged against the HBM the TPU compiler allows on its chip.

  Reports made before the planner took its HBM from the compiler
  (spacer_jax.plan.compiler_hbm_bytes) were judged against the vendor's printed capacity (95 GB
  for v5p, 16 GB for v5e: 88.5 and 14.9 GiB), while their functions were compiled against the compiler's own, larger limit (95.74 and
  15.75 GiB): the compiled figures stand, the verdict is made again on the compiler's basis. A
  program the compiler rejected stays rejected.
  """
  if report["platform"] != "tpu":
    return report
  from spacer_jax import plan  # pylint: disable=g-import-not-at-top  (loads libtpu)
  hbm = plan.tpu_target(report["topology"]).chip.hbm_bytes
  if hbm == report["hbm_bytes_per_device"]:
    return report
  peak = report["step_peak_bytes"]
  return {**report, "hbm_bytes_per_device": hbm, "headroom_bytes": hbm - peak,
          "fits": bool(peak <= hbm and not report.get("out_of_memory")),
          "judged_before_on_bytes": report["hbm_bytes_per_device"]}


def table(rows, reason):
  gib = 2.0 ** 30
  out = ["| recipe | slice | fits | peak GiB / chip (HBM) | step s (est.) | train MFU (est.) | "
         "rollout tok/s (est.) | compile s |",
         "|---|---|---|---|---|---|---|---|"]
  num = lambda x, fmt: "-" if x is None or x != x else fmt.format(x)  # noqa: E731 (None, NaN)
  for name, config, topology, overrides, r in rows:
    recipe = f"{name} (`{' '.join([config, *overrides])}`)"
    if r is None:
      out.append(f"| {recipe} | {topology} | not compiled ({reason}) | | | | | |")
      continue
    fns = r["functions"]
    compile_s = sum(f["compile_seconds"] for f in fns.values())
    fits = "yes" if r["fits"] else f"no ({-r['headroom_bytes'] / gib:.1f} GiB over)"
    mfu = r.get("mfu_estimate")
    out.append(
        f"| {recipe} | {r['topology']} ({r['num_devices']} chips) | {fits} | "
        f"{r['step_peak_bytes'] / gib:.1f} ({r['hbm_bytes_per_device'] / gib:.1f}) | "
        f"{num(r['step_seconds_estimate'], '{:.1f}')} | "
        f"{num(None if mfu is None else 100 * mfu, '{:.0f}%')} | "
        f"{num(r.get('rollout_tokens_per_second'), '{:,.0f}')} | {compile_s:.0f} |")
  return "\n".join(out)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "2026-12-04_plan_7b_v5p8",
                                                "table.json"))
  ap.add_argument("--only", default="", help="comma-separated substrings of row names")
  ap.add_argument("--redo", action="store_true", help="recompile the selected rows")
  ap.add_argument("--add", action="append", default=[],
                  help="ROW NAME=FILE: take that row from a --json report of a direct run of the "
                       "row's config, topology and overrides")
  ap.add_argument("--table_only", action="store_true", help="compile nothing, print the table")
  ap.add_argument("--reason", default="not run yet", help="why rows without a report have none")
  args, extra = ap.parse_known_args()
  done = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      done = json.load(f)
  done = {n: judged_on_compiler_hbm(r) for n, r in done.items()}
  names = {n: (c, t, o) for n, c, t, o in ROWS}
  for spec in args.add:
    name, path = spec.split("=", 1)
    if name not in names:
      raise SystemExit(f"--add={spec}: no row {name!r} (rows: {', '.join(names)})")
    with open(path) as f:
      report = json.load(f)
    if report["topology"] != names[name][1]:
      raise SystemExit(f"--add={spec}: a {report['topology']} report for a {names[name][1]} row")
    # The report is taken as made with the row's config and overrides (its command is the row's).
    report.setdefault("overrides", list(names[name][2]))
    done[name] = report
  only = [s for s in args.only.split(",") if s]
  for name, config, topology, overrides in ROWS:
    # A stored row made with other overrides (the row's settings changed since) is compiled again.
    current = (name in done and done[name].get("overrides", []) == list(overrides)
               and not args.redo)
    if (args.table_only or current
        or (only and not any(s.lower() in name.lower() for s in only))):
      continue
    done[name] = run_row(config, topology, overrides, extra)
    with open(args.out, "w") as f:
      json.dump(done, f, indent=2)
  if args.add:
    with open(args.out, "w") as f:
      json.dump(done, f, indent=2)
  print(table([(n, c, t, o, done[n] if n in done and done[n].get("overrides", []) == list(o)
                 else None) for n, c, t, o in ROWS], args.reason))


if __name__ == "__main__":
  main()

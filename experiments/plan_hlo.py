"""Collectives and largest buffers of an optimized HLO dump (`python -m spacer_jax.plan --hlo_dir=DIR`).

  python experiments/plan_hlo.py DIR/train_step.hlo.txt [--top=15]

Shapes are per device (the SPMD-partitioned program). Collectives are grouped by kind, by where
they come from (vision blocks, decoder layers, other: from the op_name metadata) and by shape.
"""

import argparse
import collections
import re

_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
          "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_COLLECTIVE = re.compile(r"= (\w+\[[\d,]*\])\S* (all-gather|reduce-scatter|all-reduce|all-to-all|"
                         r"collective-permute)(?:-start)?\(")


def nbytes(shape):
  m = re.match(r"(\w+)\[([\d,]*)\]", shape)
  if not m or m.group(1) not in _BYTES:
    return 0
  n = 1
  for d in filter(None, m.group(2).split(",")):
    n *= int(d)
  return n * _BYTES[m.group(1)]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("hlo")
  ap.add_argument("--top", type=int, default=15)
  args = ap.parse_args()
  text = open(args.hlo).read()
  groups = collections.defaultdict(lambda: [0, 0])
  for line in text.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    op = re.search(r'op_name="([^"]*)"', line)
    op = op.group(1) if op else ""
    where = "vision" if "vision_block" in op else "decoder" if "decoder_layer" in op else "other"
    g = groups[(m.group(2), where, m.group(1))]
    g[0] += 1
    g[1] += nbytes(m.group(1))
  gib = 2.0 ** 30
  print(f"{'collective':20s} {'where':8s} {'shape':28s} {'count':>6s} {'GiB':>8s}")
  for (kind, where, shape), (count, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:args.top]:
    print(f"{kind:20s} {where:8s} {shape:28s} {count:6d} {b / gib:8.2f}")
  totals = collections.Counter()
  for (kind, _, _), (_, b) in groups.items():
    totals[kind] += b
  print("totals:", {k: round(v / gib, 2) for k, v in totals.items()})
  shapes = collections.Counter(m.group(1) for m in re.finditer(r"= (\w+\[[\d,]+\])", text))
  print(f"\n{'largest buffer shapes':40s} {'GiB':>8s} {'defs':>6s}")
  for b, s, c in sorted(((nbytes(s), s, c) for s, c in shapes.items()), reverse=True)[:args.top]:
    print(f"{s:40s} {b / gib:8.2f} {c:6d}")


if __name__ == "__main__":
  main()

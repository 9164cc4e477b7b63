"""SpaceR-Eval's answer extraction: the reference regex vs the evaluator's linear-time search.

Prints, for hostile outputs of growing size ("<answer>" repeated, never closed) and for a normal
completion, the seconds of each and their ratio, and checks that both return the same string.

  PYTHONPATH=. python experiments/2026-12-04_eval_answer_extraction/bench_extract.py
"""

import re
import time

from spacer_jax.benchmarks import common

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def reference(text):
  """SpaceR-Eval: the first regex match stripped, "None" when unclosed, the text when no tag."""
  if "<answer>" not in text:
    return text
  m = _TAG.search(text)
  return m.group(1).strip() if m else "None"


def timed(fn, text, repeat):
  t0 = time.perf_counter()
  for _ in range(repeat):
    out = fn(text)
  return (time.perf_counter() - t0) / repeat, out


def main():
  cases = [("normal completion", "<think>" + "let me think. " * 200 + "</think><answer> B </answer>",
            200)]
  cases += [(f"'<answer>' x {n}", "<answer>" * n, 1) for n in (1000, 4000, 16000)]
  print(f"{'input':24s} {'reference s':>12s} {'evaluator s':>12s} {'ratio':>8s}")
  for name, text, repeat in cases:
    t_ref, a = timed(reference, text, repeat)
    t_new, b = timed(common.extract_answer, text, repeat)
    assert a == b, (name, a[:50], b[:50])
    print(f"{name:24s} {t_ref:12.6f} {t_new:12.6f} {t_ref / t_new:8.1f}x")


if __name__ == "__main__":
  main()

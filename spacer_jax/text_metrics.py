"""Word error rate and ROUGE for the OCR and free-form rewards: host tokenisation, jnp DPs.

Reproduces SG-RLVR.py `wer` (word-level Levenshtein / max(1, #reference words)) and `rouge_score`'s
RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True) F-measures. The host turns words into
integer ids (and bigrams into bigram ids); the scoring is jnp over padded [N, L] id arrays. Padded
shapes are powers of two, so a training run compiles each kernel for a handful of shapes only.

Deviation: the stemmer is the original Porter (1980) algorithm written here; rouge_score uses NLTK's
PorterStemmer in its default NLTK_EXTENSIONS mode, which differs on a few irregular words ("dying",
"lying", "skies", "ties", "news"). Scores are float32 (~1e-7 from the float64 reference).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np


def bucket(n: int, minimum: int = 4) -> int:
  """Next power of two >= max(n, minimum): padded shapes take few values, so few compiles."""
  return 1 << max(0, int(max(n, minimum) - 1).bit_length())


def _ids(seqs, vocab):
  return [[vocab.setdefault(w, len(vocab) + 1) for w in s] for s in seqs]


def _pad(seqs, min_len=8):
  """int32[bucket(N), bucket(max len)] ids (0 = padding) and int32 lengths."""
  width = bucket(max([len(s) for s in seqs] + [min_len]), 8)
  out = np.zeros((bucket(len(seqs), 8), width), np.int32)
  for i, s in enumerate(seqs):
    out[i, :len(s)] = s
  lengths = np.zeros(out.shape[0], np.int32)
  lengths[:len(seqs)] = [len(s) for s in seqs]
  return out, lengths


@jax.jit
def _edit_distance_kernel(ref, ref_len, hyp, hyp_len):
  """Word-level Levenshtein distance, one row per reference word. [N] int32.

  Row recurrence d[i][j] = min(d[i-1][j] + 1, d[i-1][j-1] + cost, d[i][j-1] + 1); the last term is
  a running minimum, computed as cummin(t - j) + j, so each row is one vectorised pass over j.
  """
  n = hyp.shape[1]
  cols = jnp.arange(n + 1, dtype=jnp.int32)
  row0 = jnp.broadcast_to(cols, (ref.shape[0], n + 1))

  def step(prev, xs):
    i, word = xs
    cost = (word[:, None] != hyp).astype(jnp.int32)                    # [N, n]
    t = jnp.concatenate([prev[:, :1] + 1, jnp.minimum(prev[:, 1:] + 1, prev[:, :-1] + cost)], 1)
    row = jax.lax.cummin(t - cols, axis=1) + cols
    return jnp.where((i < ref_len)[:, None], row, prev), None

  last, _ = jax.lax.scan(step, row0, (jnp.arange(ref.shape[1]), ref.T))
  return jnp.take_along_axis(last, hyp_len[:, None], 1)[:, 0]


def wer_accuracy(refs, hyps):
  """OCR accuracy clip(1 - WER, 0, 1) with WER = distance / max(1, #ref words). float32[N]."""
  vocab = {}
  ref, ref_len = _pad(_ids([r.split() for r in refs], vocab))
  hyp, hyp_len = _pad(_ids([h.split() for h in hyps], vocab))
  dist = _edit_distance_kernel(ref, ref_len, hyp, hyp_len)
  return jnp.clip(1.0 - dist / jnp.maximum(1, ref_len), 0.0, 1.0)[:len(refs)]


_ROUGE_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def porter_stem(w: str) -> str:
  """The original Porter (1980) stemmer (rouge_score applies it to tokens longer than 3)."""
  def cons(s, i):
    if s[i] in "aeiou":
      return False
    return not (s[i] == "y" and i > 0 and cons(s, i - 1)) if s[i] == "y" else True

  def measure(s):
    forms = "".join("c" if cons(s, i) else "v" for i in range(len(s)))
    return len(re.findall(r"v+c+", forms))

  def has_vowel(s):
    return any(not cons(s, i) for i in range(len(s)))

  def cvc(s):
    return (len(s) >= 3 and cons(s, len(s) - 3) and not cons(s, len(s) - 2)
            and cons(s, len(s) - 1) and s[-1] not in "wxy")

  def double_c(s):
    return len(s) >= 2 and s[-1] == s[-2] and cons(s, len(s) - 1)

  def replace(s, rules, min_m):
    for suf, rep in rules:
      if s.endswith(suf):
        stem = s[:len(s) - len(suf)]
        return stem + rep if measure(stem) > min_m else s
    return s

  if len(w) <= 2:
    return w
  if w.endswith("sses"):
    w = w[:-2]
  elif w.endswith("ies"):
    w = w[:-2]
  elif w.endswith("ss"):
    pass
  elif w.endswith("s"):
    w = w[:-1]
  if w.endswith("eed"):
    if measure(w[:-3]) > 0:
      w = w[:-1]
  else:
    for suf in ("ed", "ing"):
      if w.endswith(suf) and has_vowel(w[:-len(suf)]):
        w = w[:-len(suf)]
        if w.endswith(("at", "bl", "iz")):
          w += "e"
        elif double_c(w) and w[-1] not in "lsz":
          w = w[:-1]
        elif measure(w) == 1 and cvc(w):
          w += "e"
        break
  if w.endswith("y") and has_vowel(w[:-1]):
    w = w[:-1] + "i"
  w = replace(w, (("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"),
                  ("izer", "ize"), ("abli", "able"), ("alli", "al"), ("entli", "ent"),
                  ("eli", "e"), ("ousli", "ous"), ("ization", "ize"), ("ation", "ate"),
                  ("ator", "ate"), ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"),
                  ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble")), 0)
  w = replace(w, (("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"),
                  ("ical", "ic"), ("ful", ""), ("ness", "")), 0)
  for suf in ("ement", "ment", "ent", "al", "ance", "ence", "er", "ic", "able", "ible", "ant",
              "ion", "ou", "ism", "ate", "iti", "ous", "ive", "ize"):
    if w.endswith(suf):
      stem = w[:-len(suf)]
      if measure(stem) > 1 and (suf != "ion" or stem.endswith(("s", "t"))):
        w = stem
      break
  if w.endswith("e"):
    m = measure(w[:-1])
    if m > 1 or (m == 1 and not cvc(w[:-1])):
      w = w[:-1]
  if measure(w) > 1 and double_c(w) and w.endswith("l"):
    w = w[:-1]
  return w


def rouge_tokens(text: str):
  """rouge_score's tokeniser with use_stemmer=True: lowercase, [a-z0-9] runs, stem if len > 3."""
  toks = _ROUGE_NON_ALNUM.sub(" ", text.lower()).split()
  return [porter_stem(t) if len(t) > 3 else t for t in toks]


@jax.jit
def _rouge_kernel(tgt, tgt_len, prd, prd_len, tgt2, tgt2_len, prd2, prd2_len):
  """mean(ROUGE-1 F, ROUGE-2 F, ROUGE-L F) per item, from padded token / bigram ids. [N]."""
  def overlap(t, t_len, p, p_len):
    t_ok = jnp.arange(t.shape[1]) < t_len[:, None]
    p_ok = jnp.arange(p.shape[1]) < p_len[:, None]
    tt = (t[:, :, None] == t[:, None, :]) & t_ok[:, :, None] & t_ok[:, None, :]
    c_t = tt.sum(-1)                                                     # count of t_i in target
    c_p = ((t[:, :, None] == p[:, None, :]) & p_ok[:, None, :]).sum(-1)  # count of t_i in pred
    first = t_ok & ~jnp.any(jnp.tril(tt, -1), -1)                 # first occurrence of a type
    return jnp.where(first, jnp.minimum(c_t, c_p), 0).sum(-1)

  def fmeasure(hit, t_len, p_len):
    prec = hit / jnp.maximum(p_len, 1)
    rec = hit / jnp.maximum(t_len, 1)
    return jnp.where(prec + rec > 0, 2 * prec * rec / jnp.where(prec + rec > 0, prec + rec, 1), 0.0)

  n = prd.shape[1]
  cols = jnp.arange(n + 1)

  def lcs_step(prev, xs):
    i, word = xs
    eq = (word[:, None] == prd) & (cols[None, 1:] <= prd_len[:, None])
    u = jnp.concatenate([prev[:, :1], jnp.maximum(prev[:, 1:], jnp.where(eq, prev[:, :-1] + 1, 0))],
                        1)
    row = jax.lax.cummax(u, axis=1)
    return jnp.where((i < tgt_len)[:, None], row, prev), None

  last, _ = jax.lax.scan(lcs_step, jnp.zeros((tgt.shape[0], n + 1), jnp.int32),
                         (jnp.arange(tgt.shape[1]), tgt.T))
  lcs = jnp.take_along_axis(last, prd_len[:, None], 1)[:, 0]
  r1 = fmeasure(overlap(tgt, tgt_len, prd, prd_len), tgt_len, prd_len)
  r2 = fmeasure(overlap(tgt2, tgt2_len, prd2, prd2_len), tgt2_len, prd2_len)
  rl = jnp.where((tgt_len > 0) & (prd_len > 0), fmeasure(lcs, tgt_len, prd_len), 0.0)
  return jnp.clip((r1 + r2 + rl) / 3, 0.0, 1.0)


def rouge_f(refs, hyps):
  """clip(mean(ROUGE-1 F, ROUGE-2 F, ROUGE-L F), 0, 1) per pair, rouge_score-style. float32[N]."""
  vocab, vocab2 = {}, {}
  t_tok = [rouge_tokens(r) for r in refs]
  p_tok = [rouge_tokens(h) for h in hyps]
  bigrams = lambda toks: [list(zip(s, s[1:])) for s in toks]
  # One width for targets and one for predictions (bigrams reuse them): fewer distinct shapes.
  t_width = max([len(t) for t in t_tok] + [8])
  p_width = max([len(p) for p in p_tok] + [8])
  tgt, tgt_len = _pad(_ids(t_tok, vocab), t_width)
  prd, prd_len = _pad(_ids(p_tok, vocab), p_width)
  tgt2, tgt2_len = _pad(_ids(bigrams(t_tok), vocab2), t_width)
  prd2, prd2_len = _pad(_ids(bigrams(p_tok), vocab2), p_width)
  return _rouge_kernel(tgt, tgt_len, prd, prd_len, tgt2, tgt2_len, prd2, prd2_len)[:len(refs)]

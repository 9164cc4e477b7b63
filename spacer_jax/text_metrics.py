"""Word error rate and ROUGE for the OCR and free-form rewards: host tokenisation, jnp DPs.

Reproduces SG-RLVR.py `wer` (word-level Levenshtein / max(1, #reference words)) and `rouge_score`'s
RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True) F-measures. The host turns words into
integer ids (and bigrams into bigram ids); the dynamic programmes (edit distance, n-gram overlap,
LCS) are jnp over padded [N, L] id arrays and return exact integer counts. Padded shapes are powers
of two, so a training run compiles each kernel for a handful of shapes only.

The final ratios are computed from those counts on the host in float64, with the reference's
operations in the reference's order, so the scores are the reference's bit for bit. That matters
at thresholds: the trainer's bonuses test `accuracy > 0.1`, and an OCR accuracy of 1 - 9/10 is
0.09999999999999998 in float64 (0.1 once stored as the reference's float32 reward, not above 0.1)
but 0.10000002 when computed in float32 (above it).

The stemmer is written here to match NLTK's PorterStemmer in its default NLTK_EXTENSIONS mode (what
rouge_score uses), so there is no nltk dependency.
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
  """OCR accuracy max(0, min(1, 1 - WER)), WER = distance / max(1, #ref words). float64[N].

  The distance is the jnp kernel's exact integer; the ratio is float64 as in the reference.
  """
  vocab = {}
  ref, ref_len = _pad(_ids([r.split() for r in refs], vocab))
  hyp, hyp_len = _pad(_ids([h.split() for h in hyps], vocab))
  n = len(refs)
  dist = np.asarray(_edit_distance_kernel(ref, ref_len, hyp, hyp_len))[:n].astype(np.float64)
  return np.clip(1.0 - dist / np.maximum(1, ref_len[:n]), 0.0, 1.0)


_ROUGE_NON_ALNUM = re.compile(r"[^a-z0-9]+")


# NLTK_EXTENSIONS irregular forms (the table rouge_score's stemmer consults first).
_PORTER_IRREGULAR = {"skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie",
                     "news": "news", "innings": "inning", "inning": "inning", "outings": "outing",
                     "outing": "outing", "cannings": "canning", "canning": "canning",
                     "howe": "howe", "proceed": "proceed", "exceed": "exceed", "succeed": "succeed"}
_STEP2 = (("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"),
          ("izer", "ize"), ("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"),
          ("ousli", "ous"), ("ization", "ize"), ("ation", "ate"), ("ator", "ate"), ("alism", "al"),
          ("iveness", "ive"), ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"),
          ("iviti", "ive"), ("biliti", "ble"), ("fulli", "ful"))
_STEP3 = (("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"),
          ("ful", ""), ("ness", ""))
_STEP4 = ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion",
          "ou", "ism", "ate", "iti", "ous", "ive", "ize")


def porter_stem(w: str) -> str:
  """Porter stemmer with NLTK's default NLTK_EXTENSIONS, the one rouge_score's tokenizer uses.

  Steps 1a-5b of Porter (1980) plus NLTK's additions: the irregular-forms table, "ies"/"ied" on
  4-letter words, y -> i only after a consonant, the "alli", "bli", "fulli" and "logi" rules and
  two-letter vowel-consonant stems counting as cvc. Expects a lowercase word.
  """
  def cons(s, i):
    if s[i] in "aeiou":
      return False
    return True if s[i] != "y" else i == 0 or not cons(s, i - 1)

  def measure(s):
    return len(re.findall(r"v+c+", "".join("c" if cons(s, i) else "v" for i in range(len(s)))))

  def has_vowel(s):
    return any(not cons(s, i) for i in range(len(s)))

  def cvc(s):
    if len(s) == 2:
      return not cons(s, 0) and cons(s, 1)
    return (len(s) >= 3 and cons(s, len(s) - 3) and not cons(s, len(s) - 2)
            and cons(s, len(s) - 1) and s[-1] not in "wxy")

  def first_rule(s, rules, condition):
    """The first rule whose suffix matches applies if its condition holds; no other is tried."""
    for suf, rep in rules:
      if s.endswith(suf):
        return s[:len(s) - len(suf)] + rep if condition(s[:len(s) - len(suf)], suf) else s
    return s

  if w in _PORTER_IRREGULAR:
    return _PORTER_IRREGULAR[w]
  if len(w) <= 2:
    return w
  # Step 1a.
  if w.endswith("ies") and len(w) == 4:
    w = w[:-1]
  else:
    w = first_rule(w, (("sses", "ss"), ("ies", "i"), ("ss", "ss"), ("s", "")), lambda *_: True)
  # Step 1b.
  if w.endswith("ied"):
    w = w[:-1] if len(w) == 4 else w[:-2]
  elif w.endswith("eed"):
    if measure(w[:-3]) > 0:
      w = w[:-1]
  else:
    for suf in ("ed", "ing"):
      if w.endswith(suf) and has_vowel(w[:-len(suf)]):
        w = w[:-len(suf)]
        if w.endswith(("at", "bl", "iz")):
          w += "e"
        elif len(w) >= 2 and w[-1] == w[-2] and cons(w, len(w) - 1):
          if w[-1] not in "lsz":
            w = w[:-1]
        elif measure(w) == 1 and cvc(w):
          w += "e"
        break
  # Step 1c.
  if w.endswith("y") and len(w) > 2 and cons(w, len(w) - 2):
    w = w[:-1] + "i"
  # Step 2.
  if w.endswith("alli") and measure(w[:-4]) > 0:
    w = w[:-2]
    w = first_rule(w, _STEP2, lambda stem, _: measure(stem) > 0)
  else:
    w = first_rule(w, _STEP2 + (("logi", "log"),),
                   lambda stem, suf: measure(stem + "l" if suf == "logi" else stem) > 0)
  # Steps 3 and 4.
  w = first_rule(w, _STEP3, lambda stem, _: measure(stem) > 0)
  w = first_rule(w, tuple((suf, "") for suf in _STEP4),
                 lambda stem, suf: measure(stem) > 1 and (suf != "ion" or stem[-1:] in ("s", "t")))
  # Step 5.
  if w.endswith("e"):
    m = measure(w[:-1])
    if m > 1 or (m == 1 and not cvc(w[:-1])):
      w = w[:-1]
  if w.endswith("ll") and measure(w[:-1]) > 1:
    w = w[:-1]
  return w


def rouge_tokens(text: str):
  """rouge_score's tokeniser with use_stemmer=True: lowercase, [a-z0-9] runs, stem if len > 3."""
  toks = _ROUGE_NON_ALNUM.sub(" ", text.lower()).split()
  return [porter_stem(t) if len(t) > 3 else t for t in toks]


@jax.jit
def _rouge_kernel(tgt, tgt_len, prd, prd_len, tgt2, tgt2_len, prd2, prd2_len):
  """Unigram overlap, bigram overlap and LCS length per item, from padded token / bigram ids.

  Returns int32[N] each (the F-measures are computed from them on the host, see `rouge_f`).
  """
  def overlap(t, t_len, p, p_len):
    t_ok = jnp.arange(t.shape[1]) < t_len[:, None]
    p_ok = jnp.arange(p.shape[1]) < p_len[:, None]
    tt = (t[:, :, None] == t[:, None, :]) & t_ok[:, :, None] & t_ok[:, None, :]
    c_t = tt.sum(-1)                                                     # count of t_i in target
    c_p = ((t[:, :, None] == p[:, None, :]) & p_ok[:, None, :]).sum(-1)  # count of t_i in pred
    first = t_ok & ~jnp.any(jnp.tril(tt, -1), -1)                 # first occurrence of a type
    return jnp.where(first, jnp.minimum(c_t, c_p), 0).sum(-1)

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
  return (overlap(tgt, tgt_len, prd, prd_len), overlap(tgt2, tgt2_len, prd2, prd2_len),
          lcs.astype(jnp.int32))


def _fmeasure(hit, target_count, prediction_count):
  """rouge_score's _score_ngrams / scoring.fmeasure on float64 arrays, in its order of operations."""
  precision = hit / np.maximum(prediction_count, 1)
  recall = hit / np.maximum(target_count, 1)
  total = precision + recall
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, 2 * precision * recall / total, 0.0)


def rouge_f(refs, hyps):
  """max(0, min(1, (ROUGE-1 F + ROUGE-2 F + ROUGE-L F) / 3)) per pair, as SG-RLVR.py. float64[N]."""
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
  n = len(refs)
  hit1, hit2, lcs = (np.asarray(x)[:n].astype(np.float64) for x in _rouge_kernel(
      tgt, tgt_len, prd, prd_len, tgt2, tgt2_len, prd2, prd2_len))
  t1, p1, t2, p2 = tgt_len[:n], prd_len[:n], tgt2_len[:n], prd2_len[:n]
  r1 = _fmeasure(hit1, t1, p1)
  r2 = _fmeasure(hit2, t2, p2)
  # _score_lcs: 0 when either side has no tokens, else lcs / len without the max(., 1).
  rl = np.where((t1 > 0) & (p1 > 0), _fmeasure(lcs, t1, p1), 0.0)
  return np.clip((r1 + r2 + rl) / 3, 0.0, 1.0)

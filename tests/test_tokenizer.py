"""Tokenizers: the offline BPE (deterministic, HF-loadable) and Qwen2.5 ids from Qwen's real vocab files."""

import json
import pickle
import shutil
import sys

import numpy as np
import pytest
import transformers

from conftest import qwen_tokenizer_files
from spacer_jax.data import prompts
from spacer_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def qwen_tok():
  d = qwen_tokenizer_files()
  return tokenizer_lib.bpe_from_files(d / "vocab.json", d / "merges.txt")


@pytest.fixture(scope="module")
def offline_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("offline_tok")
  tok = tokenizer_lib.build_offline_tokenizer(out)
  return out, tok


SR_PROMPT = prompts.spacer_prompt(
    "Measuring from the closest point of each object, which of the following objects is the closest to the fire alarm?",
    "multiple choice", ["A. radiator", "B. smoke detector", "C. wardrobe closet", "D. dresser"], "SR_dataset",
    ["desk", "shelf", "bed", "fire alarm"])


def test_qwen_special_ids(qwen_tok):
  tok = qwen_tok
  assert tok.special_ids() == {
      "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
      "vision_end_token_id": 151653, "eos_token_id": 151645, "pad_token_id": 151643, "vocab_size": 151665}
  assert tok.im_start_id == 151644 and tok.endoftext_id == 151643


def test_qwen_chat_prompt_ids(qwen_tok):
  tok = qwen_tok
  ids = prompts.encode_prompt(tok, "What happens in this video?", "video", video_grid_thw=[[2, 2, 4]])
  # <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n  (Qwen2.5 ids)
  header = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
  np.testing.assert_array_equal(ids[:14], header)
  np.testing.assert_array_equal(ids[14:20], [151652, 151656, 151656, 151656, 151656, 151653])
  # ...<|im_end|>\n<|im_start|>assistant\n
  np.testing.assert_array_equal(ids[-5:], [151645, 198, 151644, 77091, 198])
  assert tok.decode(ids[20:-5]) == "What happens in this video?"


def test_qwen_ids_match_transformers_qwen2_tokenizer(qwen_tok, tmp_path):
  """Our tokenizers pipeline == transformers' own Qwen2Tokenizer built from the same vocab/merges."""
  d = qwen_tokenizer_files()
  for name in ("vocab.json", "merges.txt"):
    shutil.copy(d / name, tmp_path / name)  # A temporary checkpoint dir holding only the slow files.
  added = {str(151643 + i): {"content": c, "special": s, "lstrip": False, "rstrip": False, "normalized": False,
                             "single_word": False}
           for i, (c, s) in enumerate(tokenizer_lib.QWEN2_5_ADDED_TOKENS)}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "eos_token": "<|im_end|>",
      "pad_token": "<|endoftext|>", "bos_token": None, "errors": "replace", "add_prefix_space": False}))
  hf = tokenizer_lib.load_tokenizer(tmp_path)  # transformers.AutoTokenizer -> Qwen2Tokenizer's backend
  for text in (prompts.chat_text(SR_PROMPT), prompts.chat_text("Ünïcödé 3.14 m²  \n\n tabs\tand 1,234", "image"),
               "<think>let me think</think>\n<answer>B</answer> <map>{'chair': [[1, 2]]}</map>"):
    assert qwen_tok.encode(text) == hf.encode(text), text
  assert hf.special_ids() == qwen_tok.special_ids()


def test_offline_tokenizer_is_deterministic(offline_dir):
  _, tok = offline_dir
  again = tokenizer_lib._train_offline.__wrapped__(1024, 0)  # a fresh training run, not the cache
  assert again == tok.backend.to_str()
  assert tokenizer_lib.offline_corpus(seed=1) != tokenizer_lib.offline_corpus(seed=0)


def test_offline_tokenizer_special_ids(offline_dir):
  _, tok = offline_dir
  ids = tok.special_ids()
  # Qwen's order, right after the 1024 learned tokens.
  assert ids["pad_token_id"] == 1024 and tok.im_start_id == 1025 and ids["eos_token_id"] == 1026
  assert ids["vision_start_token_id"] == 1033 and ids["image_token_id"] == 1036 and ids["video_token_id"] == 1037
  assert ids["vocab_size"] == 1024 + len(tokenizer_lib.QWEN2_5_ADDED_TOKENS)
  text = prompts.chat_text(SR_PROMPT)
  enc = tok.encode(text)
  assert enc.count(ids["video_token_id"]) == 1 and enc[0] == tok.im_start_id
  assert tok.decode(enc, skip_special_tokens=False) == text
  assert "<|im_start|>" not in tok.decode(enc)  # special tokens skipped by default
  # The corpus is the prompts: a SpaceR prompt compresses well below one token per character.
  assert len(enc) < len(text) / 3


def test_offline_tokenizer_hf_roundtrip(offline_dir):
  out, tok = offline_dir
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
    assert (out / name).exists()
  loaded = tokenizer_lib.load_tokenizer(out)
  hf = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
  text = prompts.chat_text(SR_PROMPT) + "<think>wait</think><answer>4.5</answer><|im_end|>"
  assert loaded.encode(text) == tok.encode(text) == hf.encode(text, add_special_tokens=False)
  assert loaded.special_ids() == tok.special_ids()
  assert hf.eos_token_id == tok.eos_token_id and hf.pad_token_id == tok.pad_token_id


def test_offline_tokenizer_reads_without_transformers_and_gives_its_ids(offline_dir, tmp_path,
                                                                        monkeypatch):
  """The offline BPE is read with `tokenizers` alone (its tokenizer_config.json carries the mark);
  the ids are transformers' on the whole corpus. Any other tokenizer directory needs transformers
  and says which extra brings it."""
  import itertools  # pylint: disable=g-import-not-at-top
  out, _ = offline_dir
  assert tokenizer_lib.is_offline_tokenizer(out)
  hf = tokenizer_lib.Tokenizer(
      transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True).backend_tokenizer)
  texts = list(itertools.islice(tokenizer_lib.offline_corpus(0), 500))
  texts.append(prompts.chat_text(SR_PROMPT) + "<think>a</think><answer>B</answer><|im_end|>")
  monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
  loaded = tokenizer_lib.load_tokenizer(out)
  assert [loaded.encode(t) for t in texts] == [hf.encode(t) for t in texts]
  assert loaded.special_ids() == hf.special_ids()
  plain = tmp_path / "plain"
  shutil.copytree(out, plain)
  config = json.loads((plain / "tokenizer_config.json").read_text())
  del config[tokenizer_lib.OFFLINE_MARK[0]]
  (plain / "tokenizer_config.json").write_text(json.dumps(config))
  with pytest.raises(ImportError, match=r"pip install 'spacer_jax\[hf\]'"):
    tokenizer_lib.load_tokenizer(plain)


def test_tokenizer_pickles(offline_dir):
  _, tok = offline_dir
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode("How many chairs? 12") == tok.encode("How many chairs? 12")
  assert clone.special_ids() == tok.special_ids()


def test_missing_special_tokens_rejected(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tokenizer_lib.load_tokenizer(tmp_path / "nope")
  import tokenizers
  bare = tokenizers.Tokenizer(tokenizers.models.BPE())
  with pytest.raises(ValueError, match="lacks Qwen special tokens"):
    tokenizer_lib.Tokenizer(bare)

"""`python -m spacer_jax.convert`: train.py workdir -> Hugging Face directory, and back.

The starting point is a tiny random Qwen2.5-VL saved by transformers with the project's offline
tokenizer and published-style processor files; a "trained" workdir holds two checkpoints of those
weights plus different perturbations (written with checkpoint.Checkpointer in train.py's layout). A
slow test exports a real 2-step training run.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import ATOL_MODEL
from spacer_jax import checkpoint
from spacer_jax import convert
from spacer_jax import modeling
from spacer_jax import tree_utils
from spacer_jax.data import prompts
from spacer_jax.data import tokenizer as tokenizer_lib
from spacer_jax.models import hf_weights
from spacer_jax.models import qwen2_5_vl

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_qwen2_5_vl import make_hf_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a published Qwen2.5-VL checkpoint carries besides weights and tokenizer (values as on the Hub,
# token ids of the offline tokenizer filled in by the fixture).
PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor"}


def _tiny_cfg(tok):
  ids = tok.special_ids()
  eos = ids.pop("eos_token_id")
  ids["vocab_size"] += 10  # embedding rows past the tokenizer, as Qwen's 151,936 for 151,665 tokens
  return qwen2_5_vl.tiny(**ids, eos_token_id=(eos,), bos_token_id=tok.endoftext_id,
                         vision_token_id=tok.token_to_id("<|vision_pad|>"))


@pytest.fixture(scope="module")
def start(tmp_path_factory):
  """(dir, cfg, tokenizer): a transformers-saved tiny Qwen2.5-VL with tokenizer and processor files."""
  d = str(tmp_path_factory.mktemp("start"))
  tok = tokenizer_lib.build_offline_tokenizer(out_dir=d)
  cfg = _tiny_cfg(tok)
  make_hf_model(cfg, seed=3).save_pretrained(d)
  with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
    json.dump(PREPROCESSOR, f)
  with open(os.path.join(d, "chat_template.json"), "w") as f:
    json.dump({"chat_template": prompts.QWEN2_5_VL_CHAT_TEMPLATE}, f)
  with open(os.path.join(d, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": tok.endoftext_id, "pad_token_id": tok.pad_token_id,
               "do_sample": True, "eos_token_id": [tok.eos_token_id, tok.endoftext_id],
               "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1}, f)
  return d, cfg, tok


def _start_params(start_dir):
  return {k: np.asarray(v) for k, v in
          tree_utils.split_model(qwen2_5_vl.load_hf(start_dir))[1].items()}


def _write_run(workdir, cfg, steps, run_config):
  """A train.py workdir: config.json, model_config.json and ckpt/<step>/ with {step: params}."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(run_config, f)
  with open(os.path.join(workdir, "model_config.json"), "w") as f:
    json.dump(cfg.to_hf_dict(), f)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "ckpt"), use_async=False)
  for step, params in steps.items():
    ckpt.save(step, {"step": jnp.asarray(step, jnp.int32),
                     "params": {k: jnp.asarray(v) for k, v in params.items()},
                     "opt_state": {"count": jnp.asarray(step, jnp.int32)},
                     "rng": jax.random.PRNGKey(0)})
  ckpt.close()


@pytest.fixture(scope="module")
def trained(start, tmp_path_factory):
  """(workdir, {step: params}): two checkpoints of the start weights plus different updates."""
  start_dir, cfg, _ = start
  base = _start_params(start_dir)
  rng = np.random.default_rng(0)
  steps = {s: {k: v + np.float32(0.01 * s) * rng.standard_normal(v.shape, np.float32)
               for k, v in base.items()} for s in (1, 2)}
  workdir = str(tmp_path_factory.mktemp("run") / "w")
  _write_run(workdir, cfg, steps, {"model": {"hf_dir": start_dir, "variant": ""},
                                   "data": {"tokenizer_dir": ""}})
  return workdir, steps


@pytest.fixture(scope="module")
def exported_fp32(trained, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export") / "e32")
  convert.export_hf(trained[0], out, dtype="float32")
  return out


def _tensors(path):
  return {k: np.asarray(v) for k, v in hf_weights.safetensors_items(path)}


@pytest.mark.hf
def test_export_loads_in_transformers_with_our_logits(start, trained, exported_fp32):
  start_dir, cfg, _ = start
  out = exported_fp32
  hf, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      out, output_loading_info=True, attn_implementation="eager")
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  auto, info = transformers.AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
  assert isinstance(auto, transformers.Qwen2_5_VLForConditionalGeneration)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert hf.dtype == torch.float32
  # The exported weights are the latest (trained) step, not the starting checkpoint.
  ours, theirs = _tensors(out), _tensors(start_dir)
  latest = {hf_weights._save_key(k): v for k, v in trained[1][2].items()}
  assert ours.keys() == theirs.keys() == latest.keys()
  assert all(np.array_equal(ours[k], latest[k]) for k in ours)
  assert all(not np.array_equal(ours[k], theirs[k]) for k in ours)
  # Same logits as the project's model on the exported weights (fp32).
  ids = np.random.default_rng(1).integers(0, 1000, (2, 17))
  with jax.default_matmul_precision("highest"):
    mine = np.asarray(qwen2_5_vl.load_hf(out)(ids))
  with torch.no_grad():
    ref = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
  np.testing.assert_allclose(mine, ref, atol=ATOL_MODEL, rtol=0)


def test_export_step_bf16_default_sharded_index(start, trained, tmp_path):
  """Default dtype bf16, --step, shards + index that a config.json + index reader (vLLM) loads."""
  safetensors = pytest.importorskip("safetensors")
  out = str(tmp_path / "e")
  convert.export_hf(trained[0], out, step=1, max_shard_bytes=convert.parse_size("150KB"))
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["dtype"] == "bfloat16" and config["architectures"] == [
      "Qwen2_5_VLForConditionalGeneration"]
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    weight_map = json.load(f)["weight_map"]
  files = sorted(set(weight_map.values()))
  assert len(files) > 1
  for name in files:  # tensor bytes per file (the JSON header comes on top, as in transformers)
    header, _ = hf_weights.read_header(os.path.join(out, name))
    assert max(i["data_offsets"][1] for i in header.values()) <= 150_000, name
  step1 = {hf_weights._save_key(k): v for k, v in trained[1][1].items()}
  assert weight_map.keys() == step1.keys()
  for name in files:  # the safetensors library, as vLLM reads a checkpoint
    with safetensors.safe_open(os.path.join(out, name), framework="pt") as f:
      for key in f.keys():
        assert weight_map[key] == name
        got = f.get_tensor(key)
        assert got.dtype == torch.bfloat16
        want = step1[key].astype(ml_dtypes.bfloat16).astype(np.float32)  # round to nearest even
        np.testing.assert_array_equal(got.float().numpy(), want, err_msg=key)


def test_export_carries_tokenizer_and_processor_files(start, exported_fp32):
  start_dir, cfg, tok = start
  out = exported_fp32
  for name in ("preprocessor_config.json", "chat_template.json", "generation_config.json",
               "tokenizer.json", "tokenizer_config.json"):
    with open(os.path.join(start_dir, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
      assert a.read() == b.read(), name
  assert not os.path.exists(os.path.join(out, "video_preprocessor_config.json"))  # as the base
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok.eos_token == "<|im_end|>" and hf_tok.eos_token_id == cfg.eos_token_id[0]
  gen = transformers.GenerationConfig.from_pretrained(out)
  assert gen.eos_token_id == [tok.eos_token_id, tok.endoftext_id] and gen.top_k == 1
  image = transformers.AutoImageProcessor.from_pretrained(out)
  assert (image.size.shortest_edge, image.size.longest_edge, image.merge_size) == (3136, 12845056, 2)


def _check_processor(out, tok):
  """The exported processor files work with transformers: chat template, image processor, eos."""
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok.eos_token == "<|im_end|>" and hf_tok.eos_token_id == tok.eos_token_id
  msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "How many?"}]}]
  text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert text == prompts.chat_text("How many?", media="video")
  image = transformers.AutoImageProcessor.from_pretrained(out)
  px = image(images=[np.zeros((60, 90, 3), np.uint8)], return_tensors="np")
  assert px["pixel_values"].shape == (4 * 6, 3 * 2 * 14 * 14)  # 56 x 84 -> grid 1 x 4 x 6
  try:
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except (ImportError, RuntimeError):
    return  # AutoProcessor builds Qwen2VLVideoProcessor, which needs torchvision (not here).
  proc = transformers.AutoProcessor.from_pretrained(out)
  assert type(proc).__name__ == "Qwen2_5_VLProcessor"


def test_export_tiny_run_writes_processor_files(start, tmp_path):
  """A tiny random-init run (offline tokenizer in W/tokenizer, no base) still exports a directory
  with a chat template, Qwen2.5-VL preprocessor configs and a generation config."""
  _, cfg, tok = start
  workdir = str(tmp_path / "w")
  params = tree_utils.split_model(qwen2_5_vl.init_model(cfg, seed=4))[1]
  _write_run(workdir, cfg, {3: params}, {"model": {"hf_dir": "", "variant": "tiny"},
                                         "data": {"tokenizer_dir": ""}})
  tokenizer_lib.save_hf(tok.backend, os.path.join(workdir, "tokenizer"))  # as train.py writes it
  out = str(tmp_path / "e")
  assert convert.export_hf(workdir, out) == (out, 3)
  with open(os.path.join(out, "generation_config.json")) as f:
    assert json.load(f) == {"bos_token_id": tok.endoftext_id, "pad_token_id": tok.pad_token_id,
                            "eos_token_id": [tok.eos_token_id, tok.endoftext_id]}
  with open(os.path.join(out, "chat_template.jinja")) as f:
    assert f.read() == prompts.QWEN2_5_VL_CHAT_TEMPLATE
  with open(os.path.join(out, "preprocessor_config.json")) as f:
    assert json.load(f) == PREPROCESSOR
  with open(os.path.join(out, "video_preprocessor_config.json")) as f:
    video = json.load(f)
  assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
  assert (video["min_pixels"], video["max_pixels"]) == (128 * 28 * 28, 768 * 28 * 28)
  _check_processor(out, tok)
  loaded = tree_utils.split_model(qwen2_5_vl.load_hf(out, dtype=jnp.bfloat16))[1]
  assert all(np.array_equal(np.asarray(loaded[k]), np.asarray(v).astype(ml_dtypes.bfloat16))
             for k, v in params.items())


def test_import_then_export_round_trips_exactly(start, tmp_path):
  start_dir, cfg, _ = start
  w2 = str(tmp_path / "w2")
  convert.import_hf(start_dir, w2)
  assert sorted(os.listdir(w2)) == ["ckpt", "model_config.json", "tokenizer"]
  restored = tree_utils.split_model(modeling.load_model(w2))[1]
  base = _start_params(start_dir)
  assert restored.keys() == base.keys()
  assert all(np.array_equal(np.asarray(restored[k]), base[k]) for k in base)
  from spacer_jax import evaluate  # pylint: disable=g-import-not-at-top
  assert evaluate.load_model(w2, dtype="float32").config == cfg
  out = str(tmp_path / "e")
  convert.export_hf(w2, out, dtype="float32")
  a, b = _tensors(start_dir), _tensors(out)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  for name in ("tokenizer.json", "preprocessor_config.json", "generation_config.json",
               "chat_template.json"):
    with open(os.path.join(start_dir, name), "rb") as x, open(os.path.join(out, name), "rb") as y:
      assert x.read() == y.read(), name


def test_refuses_a_non_empty_out_and_leaves_no_partial_export(trained, tmp_path):
  out = tmp_path / "e"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not an empty directory"):
    convert.export_hf(trained[0], str(out))
  with pytest.raises(FileNotFoundError):  # step 7 does not exist
    convert.export_hf(trained[0], str(tmp_path / "f"), step=7)
  assert sorted(os.listdir(tmp_path)) == ["e"]  # no staging directory left behind


def test_refuses_a_tokenizer_that_does_not_match_the_model(start, trained, tmp_path):
  start_dir, _, tok = start
  other = tmp_path / "other"
  tokenizer_lib.build_offline_tokenizer(out_dir=str(other), vocab_size=700)  # other ids
  with pytest.raises(ValueError, match="wrong tokenizer"):
    convert.export_hf(trained[0], str(tmp_path / "e"), base=str(other))
  assert sorted(os.listdir(tmp_path)) == ["other"]


@pytest.mark.parametrize("text,size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8),
                                       ("2GiB", 2 * 2**30), ("1000", 1000), ("1.5kb", 1500)])
def test_parse_size(text, size):
  assert convert.parse_size(text) == size


def test_cli_help_documents_both_directions():
  out = subprocess.run([sys.executable, "-m", "spacer_jax.convert", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 0, out.stderr
  for text in ("--workdir", "--hf_dir", "--dtype", "--max_shard_size", "--base", "--step",
               "Import (`--hf_dir`)", "Export (`--workdir`)"):
    assert text in out.stdout, text


@pytest.mark.slow
def test_export_a_real_training_run(tmp_path):
  """Two smoke GRPO steps (tiny random init), then the CLI exports step 1 and step 2."""
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  wd = str(tmp_path / "run")
  run = subprocess.run([sys.executable, "-m", "spacer_jax.train",
                        "--config=configs/sgrlvr.py:smoke", f"--workdir={wd}",
                        "--config.ckpt_every_steps=1", "--config.use_progress_bar=False"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert run.returncode == 0, run.stderr[-3000:]
  outs = {}
  for step in (1, 2):
    outs[step] = str(tmp_path / f"e{step}")
    cli = subprocess.run([sys.executable, "-m", "spacer_jax.convert", f"--workdir={wd}",
                          f"--out={outs[step]}", f"--step={step}", "--dtype=float32"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
  hf, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      outs[2], output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  a, b = _tensors(outs[1]), _tensors(outs[2])
  assert a.keys() == b.keys() and any(not np.array_equal(a[k], b[k]) for k in a)
  tok = tokenizer_lib.load_tokenizer(os.path.join(wd, "tokenizer"))
  _check_processor(outs[2], tok)


def test_importing_defines_no_flags():
  """train.py defines --workdir; convert's flags exist only when it runs as a program."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  for name in ("workdir", "step", "hf_dir", "out", "base", "max_shard_size"):
    if name in flags.FLAGS:
      assert flags.FLAGS.find_module_defining_flag(name) != convert.__name__

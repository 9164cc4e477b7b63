r"""Checkpoint conversion in both directions: a train.py workdir <-> a Hugging Face directory.

  # train.py workdir (latest or --step) -> a Hugging Face directory that other tools use as is
  python -m spacer_jax.convert --workdir=runs/sgrlvr --out=exports/spacer-7b \
      [--step=N] [--dtype=bfloat16|float32|float16] [--base=HF_DIR] [--max_shard_size=5GB]

  # Hugging Face directory -> an orbax params checkpoint (train.py workdir layout) for fast restarts
  python -m spacer_jax.convert --hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct --out=runs/qwen7b_params \
      [--dtype=bfloat16|float32|float16]

Export (`--workdir`) writes into --out (which must not exist or be empty; the files are written to a
temporary sibling directory and renamed into place at the end, so a crash never leaves a directory
that looks complete):
  config.json                 Qwen2_5_VLConfig.to_hf_dict() (transformers 5.x layout) with `dtype` set
                              to the weights' dtype.
  model*.safetensors          the run's policy params in the published key layout (visual.*, model.*,
                              lm_head.weight), cast to --dtype (default bfloat16), one file or shards
                              of at most --max_shard_size with model.safetensors.index.json.
  tokenizer files             the run's tokenizer (its tokenizer/ directory, else the data.tokenizer_dir,
                              else the model.hf_dir recorded in its config.json, which --base replaces),
                              with its chat template; its eos and special ids must be the model's.
  processor, generation files preprocessor_config.json, video_preprocessor_config.json,
                              processor_config.json, chat_template.json, generation_config.json and
                              LICENSE as found in the base checkpoint (--base, else the run's
                              model.hf_dir, else the tokenizer directory). For runs without one (the
                              tiny random-init model and the project's offline tokenizer) the published
                              Qwen2.5-VL preprocessor settings, the Qwen2.5-VL chat template and a
                              generation_config.json with the tokenizer's ids are written instead.
transformers (`AutoModelForImageTextToText` / `Qwen2_5_VLForConditionalGeneration.from_pretrained`,
`AutoProcessor.from_pretrained`) and loaders that read config.json plus the safetensors index (vLLM)
use the result as is. The weights are restored in the export dtype onto the local devices (FSDP over
all of them) and written one tensor at a time, so the host holds one tensor beyond the model.

Import (`--hf_dir`) writes a params-only run directory: model_config.json, tokenizer/ (the tokenizer,
processor and generation files of the checkpoint) and ckpt/0/state holding {"params": {key: array}}.
`modeling.load_model`, `python -m spacer_jax.evaluate --config.model_dir=...` and
`python -m spacer_jax.generate --model_dir ...` read it, restoring straight onto a mesh; exporting it
again gives back the original tensors bit for bit. --dtype defaults to the checkpoint's own dtype.
"""

import json
import os
import re
import shutil
import tempfile

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS


def define_flags(fv=FLAGS):
  """The command-line flags; defined only when run as a program (train.py owns --workdir)."""
  flags.DEFINE_string("workdir", None, "export: the train.py workdir to convert", flag_values=fv)
  flags.DEFINE_integer("step", None, "export: checkpoint step (default: the latest)",
                       flag_values=fv)
  flags.DEFINE_string("hf_dir", None, "import: the Hugging Face checkpoint to convert",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "output directory (must not exist or be empty)", flag_values=fv)
  flags.DEFINE_enum("dtype", None, ["bfloat16", "float32", "float16"],
                    "weights dtype; export default bfloat16, import default: the checkpoint's",
                    flag_values=fv)
  flags.DEFINE_string("base", None, "export: base HF checkpoint whose tokenizer, processor and "
                      "generation files are carried over (default: the run's model.hf_dir)",
                      flag_values=fv)
  flags.DEFINE_string("max_shard_size", "5GB", "export: largest safetensors file (e.g. 5GB, 500MB, "
                      "2GiB); above it the weights are sharded", flag_values=fv)


# Files copied next to the weights; the first group prefers the run's tokenizer directory, the second
# the base checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
BASE_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
              "chat_template.json", "generation_config.json", "LICENSE")

# Published Qwen2.5-VL preprocessing (every size's preprocessor_config.json; docs/qwen2_5_vl.md,
# "Preprocessing"). Videos use the video processor's own defaults, which are qwen-vl-utils'.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 56 * 56, 16384 * 28 * 28
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text) -> int:
  """Bytes in "5GB" / "500MB" / "2GiB" / "1000" (decimal units, as transformers' max_shard_size)."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text), re.IGNORECASE)
  if not m or m.group(2).upper() not in _SIZE_UNITS:
    raise ValueError(f"--max_shard_size={text!r}: expected a size such as 5GB, 500MB or 2GiB")
  size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
  if size <= 0:
    raise ValueError(f"--max_shard_size={text!r} must be positive")
  return size


def _check_out(out):
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"--out={out} exists and is not an empty directory; choose a new one")


def _staging(out):
  """A temporary directory next to `out` (same file system, so the final rename is atomic)."""
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", dir=parent)


def _publish(tmp, out):
  if os.path.isdir(out):
    os.rmdir(out)  # empty, checked before
  os.rename(tmp, out)


def _mesh():
  """FSDP over every local device, so a model larger than one device's memory still converts."""
  from spacer_jax import config_lib  # pylint: disable=g-import-not-at-top
  from spacer_jax import sharding  # pylint: disable=g-import-not-at-top
  return sharding.make_mesh(config_lib.MESH_FSDP), config_lib.FSDP_RULES


def _copy_found(names, dirs, out):
  """Copies each of `names` from the first of `dirs` that has it; returns {name: source dir}."""
  found = {}
  for name in names:
    for d in dirs:
      if d and os.path.isfile(os.path.join(d, name)):
        shutil.copyfile(os.path.join(d, name), os.path.join(out, name))
        found[name] = d
        break
  return found


def _has_chat_template(out):
  if any(os.path.exists(os.path.join(out, n)) for n in ("chat_template.jinja", "chat_template.json")):
    return True
  path = os.path.join(out, "tokenizer_config.json")
  if os.path.exists(path):
    with open(path) as f:
      return bool(json.load(f).get("chat_template"))
  return False


def _write_json(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


def preprocessor_configs(cfg) -> tuple[dict, dict]:
  """(preprocessor_config.json, video_preprocessor_config.json) of a Qwen2.5-VL with config cfg."""
  common = dict(patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size,
                merge_size=cfg.spatial_merge_size, image_mean=list(CLIP_MEAN),
                image_std=list(CLIP_STD), processor_class="Qwen2_5_VLProcessor")
  image = dict(min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS, **common,
               image_processor_type="Qwen2VLImageProcessor")
  video = dict(min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS,
               size={"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS},
               do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255,
               do_normalize=True, do_convert_rgb=True, do_sample_frames=False, min_frames=4,
               max_frames=768, **common, video_processor_type="Qwen2VLVideoProcessor")
  return image, video


def write_extra_files(out, cfg, tok_dir, base=None):
  """Writes the non-weight files of an HF export into `out` and checks them against the model.

  Copies the tokenizer files (preferring `tok_dir`) and the processor/generation files (preferring
  `base`); writes the Qwen2.5-VL chat template, preprocessor configs and a generation config where
  none was found; raises ValueError when the tokenizer's eos or special ids are not the model's.

  Args:
    out: the export directory.
    cfg: the exported model's Qwen2_5_VLConfig.
    tok_dir: the tokenizer the run trained with.
    base: the base HF checkpoint, or None.

  Returns:
    ({file name: source dir} copied, [file names] written).
  """
  from spacer_jax.data import prompts  # pylint: disable=g-import-not-at-top
  from spacer_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  found = _copy_found(TOKENIZER_FILES, [tok_dir, base], out)
  found.update(_copy_found(BASE_FILES, [base, tok_dir], out))
  if "tokenizer.json" not in found and "vocab.json" not in found:
    raise FileNotFoundError(f"no tokenizer files in {tok_dir} or {base}; pass --base")
  tok = tokenizer_lib.load_tokenizer(out)
  if tok.eos_token_id not in cfg.eos_token_id:
    raise ValueError(f"the tokenizer of {found.get('tokenizer.json', tok_dir)} ends turns with id "
                     f"{tok.eos_token_id} but the model's eos_token_id is {list(cfg.eos_token_id)}: "
                     "wrong tokenizer (pass --base)")
  for field, value in tok.special_ids().items():
    # The embedding is padded past the tokenizer (151,665 tokens, 151,936 or 152,064 rows).
    bad = value > cfg.vocab_size if field == "vocab_size" else (
        field != "eos_token_id" and getattr(cfg, field) != value)
    if bad:
      raise ValueError(f"tokenizer {field}={value} does not fit model {field}="
                       f"{getattr(cfg, field)}: wrong tokenizer (pass --base)")
  written = []
  if not _has_chat_template(out):
    with open(os.path.join(out, "chat_template.jinja"), "w") as f:
      f.write(prompts.QWEN2_5_VL_CHAT_TEMPLATE)
    written.append("chat_template.jinja")
  if "preprocessor_config.json" not in found:
    image, video = preprocessor_configs(cfg)
    _write_json(os.path.join(out, "preprocessor_config.json"), image)
    written.append("preprocessor_config.json")
    if "video_preprocessor_config.json" not in found:
      _write_json(os.path.join(out, "video_preprocessor_config.json"), video)
      written.append("video_preprocessor_config.json")
  if "generation_config.json" not in found:
    # Qwen's ids: <|im_end|> ends a turn, <|endoftext|> pads and ends documents (and is Qwen's bos).
    _write_json(os.path.join(out, "generation_config.json"), dict(
        bos_token_id=tok.endoftext_id, eos_token_id=[tok.eos_token_id, tok.endoftext_id],
        pad_token_id=tok.pad_token_id))
    written.append("generation_config.json")
  return found, written


def _run_dir(workdir):
  from spacer_jax import modeling  # pylint: disable=g-import-not-at-top
  run = modeling.run_dirs(workdir)
  if run is None:
    raise FileNotFoundError(f"--workdir={workdir} is not a train.py workdir (model_config.json and "
                            "ckpt/) nor its ckpt/ directory")
  return str(run[0])


def _run_config(run_dir):
  """The run's training config.json as a dict ({} when absent, e.g. an imported checkpoint)."""
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def export_hf(workdir, out, *, step=None, dtype="bfloat16", base=None, max_shard_bytes=5 * 10**9):
  """Writes the policy params of a train.py workdir as a Hugging Face Qwen2.5-VL directory.

  Args:
    workdir: the run's workdir (or its ckpt/ directory).
    out: output directory; must not exist or be empty.
    step: checkpoint step (default: the latest).
    dtype: dtype of the written weights.
    base: base HF checkpoint for tokenizer/processor/generation files (default: model.hf_dir of the
      run's config.json).
    max_shard_bytes: largest safetensors file.

  Returns:
    (out, step) with the exported step.
  """
  from spacer_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from spacer_jax import modeling  # pylint: disable=g-import-not-at-top
  from spacer_jax.models import qwen2_5_vl  # pylint: disable=g-import-not-at-top
  _check_out(out)
  run_dir = _run_dir(workdir)
  run = _run_config(run_dir)
  ckpt_dir = os.path.join(run_dir, "ckpt")
  step = checkpoint.latest_step(ckpt_dir) if step is None else int(step)
  if step is None:
    raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint")
  recorded = run.get("model", {}).get("hf_dir") or None
  base = base or (recorded if recorded and os.path.isdir(recorded) else None)
  # The tokenizer the run trained with: its own tokenizer/ (tiny runs, imports), data.tokenizer_dir,
  # else the base checkpoint's (--base replaces the recorded model.hf_dir).
  candidates = [os.path.join(run_dir, "tokenizer"), run.get("data", {}).get("tokenizer_dir"), base]
  tok_dir = next((d for d in candidates if d and any(
      os.path.isfile(os.path.join(d, n)) for n in ("tokenizer.json", "vocab.json"))), None)
  if tok_dir is None:
    raise FileNotFoundError(f"no tokenizer files for {workdir} (looked in "
                            f"{[d for d in candidates if d]}); pass --base=HF_DIR")
  mesh, rules = _mesh()
  model = modeling.load_model(run_dir, dtype=dtype, step=step, mesh=mesh, rules=rules)
  tmp = _staging(out)
  try:
    qwen2_5_vl.save_hf(model, tmp, max_shard_bytes=max_shard_bytes, dtype=dtype)
    found, written = write_extra_files(tmp, model.config, tok_dir, base)
    _publish(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("exported step %d of %s to %s (%s); copied %s; wrote %s", step, workdir, out, dtype,
               {k: v for k, v in found.items()}, written)
  return out, step


def import_hf(hf_dir, out, *, dtype=None):
  """Writes an HF Qwen2.5-VL checkpoint as a params-only train.py run directory (orbax).

  Args:
    hf_dir: checkpoint directory (config.json + safetensors).
    out: output directory; must not exist or be empty.
    dtype: params dtype (default: the checkpoint's).

  Returns:
    out.
  """
  from spacer_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from spacer_jax import tree_utils  # pylint: disable=g-import-not-at-top
  from spacer_jax.models import hf_weights  # pylint: disable=g-import-not-at-top
  from spacer_jax.models import qwen2_5_vl  # pylint: disable=g-import-not-at-top
  _check_out(out)
  dtype = dtype or hf_weights.checkpoint_dtype(hf_dir).name
  mesh, rules = _mesh()
  model = qwen2_5_vl.load_hf(hf_dir, dtype=dtype, mesh=mesh, rules=rules)
  params = tree_utils.split_model(model)[1]
  tmp = _staging(out)
  try:
    _write_json(os.path.join(tmp, "model_config.json"), model.config.to_hf_dict())
    tok = os.path.join(tmp, "tokenizer")
    os.makedirs(tok)
    found = _copy_found(TOKENIZER_FILES + BASE_FILES, [hf_dir], tok)
    ckpt = checkpoint.Checkpointer(os.path.join(tmp, "ckpt"), max_to_keep=1, use_async=False)
    ckpt.save(0, {"params": params})
    ckpt.close()
    _publish(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("imported %s (%s) to %s; tokenizer/ holds %s", hf_dir, dtype, out, sorted(found))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  if bool(FLAGS.workdir) == bool(FLAGS.hf_dir):
    raise app.UsageError("give exactly one of --workdir (export to HF) or --hf_dir (import to orbax)")
  if FLAGS.workdir:
    export_hf(FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype or "bfloat16",
              base=FLAGS.base, max_shard_bytes=parse_size(FLAGS.max_shard_size))
  else:
    for name in ("step", "base"):
      if FLAGS[name].value is not None:
        raise app.UsageError(f"--{name} applies to --workdir exports only")
    import_hf(FLAGS.hf_dir, FLAGS.out, dtype=FLAGS.dtype)


if __name__ == "__main__":
  from spacer_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, define_flags, __doc__)

"""A Qwen2.5-VL model and its weights: the one place that builds and fills them.

Everything that needs a model (the trainer, the evaluator, `generate`, `convert`, the planner, the
demo, the notebooks) goes through two calls:

    abstract = modeling.abstract_model(cfg, dtype="bfloat16", param_dtype="float32", mesh=mesh,
                                       rules=rules)
    params = modeling.load_params(source, abstract)       # {hf_key: jax.Array} on their shardings
    model = abstract.merge(params)                        # an nnx module, when one is needed

`abstract` holds the graph definition, the flat `{hf_key: ShapeDtypeStruct}` parameters with their
shardings (resolved by `sharding.tree_shardings`, the project's only logical-to-mesh resolver) and
the logical axis names. No device memory is touched until `load_params`.

A `source` is one of:
  * a Hugging Face checkpoint directory (config.json + model.safetensors[.index.json]): every tensor
    is streamed from its memory-mapped file straight into its shards (`models/hf_weights.py`);
  * a `train.py` workdir (model_config.json + ckpt/), or its ckpt/ directory, or a params-only
    directory written by `python -m spacer_jax.convert`: the params of the latest (or a given) step
    are restored by orbax directly onto the shardings; the optimizer state is never read;
  * `modeling.RANDOM` ("random"): the model's own initialisers, jitted onto the shardings (tiny test
    and demo models, and random-weight benchmarks at real sizes).

`model_config(source)` reads the architecture of a source and `tokenizer_dir(source)` finds its
tokenizer files. The abstract model is built outside any mesh context: `nnx.eval_shape` under
`jax.set_mesh` would read the logical axis names (`vocab`, `embed`, ...) as mesh axes and fail, so
`abstract_model` clears the mesh itself and can be called from anywhere.
"""

import dataclasses
import functools
import json
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spacer_jax import sharding as sharding_lib
from spacer_jax import tree_utils
from spacer_jax.models import qwen2_5_vl

RANDOM = "random"

# A train.py workdir holds these next to each other (the convert tool writes the same layout).
RUN_MODEL_CONFIG = "model_config.json"
RUN_CKPT_DIR = "ckpt"
RUN_TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass(frozen=True, eq=False)
class AbstractModel:
  """A Qwen2.5-VL without weights: graph, parameter shapes/dtypes/shardings, logical axes.

  Attributes:
    config: the architecture.
    graphdef: nnx graph definition (`nnx.merge(graphdef, state)` rebuilds the module).
    params: flat `{hf_key: jax.ShapeDtypeStruct}` in `param_dtype`, each with its `.sharding`
      (a NamedSharding on `mesh`, or the first device without a mesh).
    paths: `{hf_key: nnx path}` for rebuilding the nested state.
    logical: `{hf_key: logical axis names or None}`.
    dtype: compute dtype the module was built with.
    mesh, rules: where the shardings come from (None / () for one device).
  """
  config: qwen2_5_vl.Qwen2_5_VLConfig
  graphdef: Any
  params: dict
  paths: dict
  logical: dict
  dtype: Any
  mesh: Any = None
  rules: tuple = ()

  @property
  def shardings(self):
    """`{hf_key: Sharding}` of every parameter."""
    return {k: v.sharding for k, v in self.params.items()}

  @property
  def param_dtype(self):
    return next(iter(self.params.values())).dtype

  @property
  def param_count(self):
    return tree_utils.param_count(self.params)

  def with_param_dtype(self, dtype):
    """The same model with parameters stored in `dtype` (e.g. a bf16 reference policy)."""
    dtype = jnp.dtype(dtype)
    return dataclasses.replace(self, params={
        k: jax.ShapeDtypeStruct(v.shape, dtype, sharding=v.sharding) for k, v in self.params.items()})

  def state(self, params):
    """Flat params -> the nnx.State the sampler and `nnx.merge` take (no copies)."""
    return tree_utils.to_state(params, self.paths)

  def merge(self, params=None):
    """An nnx `Qwen2_5_VL` holding `params` (default: the abstract ShapeDtypeStructs)."""
    return tree_utils.merge_model(self.graphdef, self.params if params is None else params,
                                  self.paths)

  def describe(self):
    """Table of every parameter: key, shape, dtype, logical axes, PartitionSpec."""
    return sharding_lib.describe(self.params, self.shardings, self.logical)


def _module(cfg, dtype, param_dtype, seed=0):
  return qwen2_5_vl.Qwen2_5_VL(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype)


def abstract_model(cfg, *, dtype=jnp.float32, param_dtype=None, mesh=None, rules=()):
  """Builds the abstract model of `cfg` (nothing is allocated).

  Args:
    cfg: qwen2_5_vl.Qwen2_5_VLConfig.
    dtype: compute dtype; param_dtype: storage dtype (default: dtype).
    mesh: a jax Mesh (or AbstractMesh, for planning) to shard the parameters over; None = one device.
    rules: logical axis rules ((logical name, mesh axes), ...), e.g. config_lib.FSDP_RULES.

  Returns:
    AbstractModel.
  """
  dtype = jnp.dtype(dtype)
  param_dtype = dtype if param_dtype is None else jnp.dtype(param_dtype)
  rules = tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in (rules or ()))
  with jax.set_mesh(None):  # see the module docstring: logical names are not mesh axes
    module = nnx.eval_shape(lambda: _module(cfg, dtype, param_dtype))
  graphdef, flat, paths = tree_utils.split_model(module)
  logical = sharding_lib.param_logical_axes(nnx.split(module)[1])
  if mesh is None:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {k: dev for k in flat}
  else:
    shardings = sharding_lib.tree_shardings(flat, mesh, rules, logical)
  params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in flat.items()}
  return AbstractModel(config=cfg, graphdef=graphdef, params=params, paths=paths, logical=logical,
                       dtype=dtype, mesh=mesh, rules=rules)


# ------------------------------------------------------------------------------------------------
# Sources.


def run_dirs(path):
  """(run directory, orbax directory) if `path` is a train.py workdir or its ckpt/ directory, else
  None. A workdir is recognised by model_config.json next to ckpt/ (its config.json is the training
  config, not an HF one, so this check comes first)."""
  path = pathlib.Path(os.path.abspath(os.fspath(path)))
  for run_dir, ckpt_dir in ((path, path / RUN_CKPT_DIR), (path.parent, path)):
    if ((run_dir / RUN_MODEL_CONFIG).is_file() and ckpt_dir.is_dir()
        and ckpt_dir.name == RUN_CKPT_DIR):
      return run_dir, ckpt_dir
  return None


def source_kind(source):
  """"random", "run" (train.py workdir) or "hf"; raises naming what a directory lacks."""
  if source == RANDOM:
    return RANDOM
  path = pathlib.Path(os.fspath(source))
  if not path.exists():
    raise FileNotFoundError(f"model source {path}: no such directory")
  if not path.is_dir():
    raise NotADirectoryError(f"model source {path}: not a directory (pass the checkpoint directory)")
  if run_dirs(path) is not None:
    return "run"
  if (path / "config.json").is_file():
    return "hf"
  raise FileNotFoundError(
      f"model source {path} is neither a Hugging Face checkpoint (config.json + *.safetensors) nor a "
      f"train.py workdir ({RUN_MODEL_CONFIG} + {RUN_CKPT_DIR}/)")


def model_config(source, **overrides):
  """The Qwen2_5_VLConfig of an HF directory or a train.py workdir (validated: Qwen2.5-VL only)."""
  kind = source_kind(source)
  if kind == RANDOM:
    raise ValueError("a random source has no config of its own; build one (e.g. qwen2_5_vl.tiny())")
  if kind == "run":
    path = run_dirs(source)[0] / RUN_MODEL_CONFIG
  else:
    path = pathlib.Path(source) / "config.json"
  # Validated there: Qwen2.5-VL only, with its vision_config; errors name the file.
  return qwen2_5_vl.Qwen2_5_VLConfig.from_hf_json(str(path), **overrides)


# The published Qwen2.5-VL sizes (their config.json, as qwen2_5_vl presets).
PUBLISHED = {"3b": qwen2_5_vl.qwen2p5_vl_3b, "7b": qwen2_5_vl.qwen2p5_vl_7b,
             "32b": qwen2_5_vl.qwen2p5_vl_32b, "72b": qwen2_5_vl.qwen2p5_vl_72b}


def published_config(name, **overrides):
  """The config of the published Qwen2.5-VL whose size `name` gives: "7b", or a checkpoint path
  such as /ckpt/Qwen2.5-VL-7B-Instruct (read from its last component; no file is opened). For
  planning a recipe on a host without its checkpoint."""
  base = os.path.basename(os.path.normpath(os.fspath(name))).lower()
  sizes = [m for m in re.findall(r"(\d+)b(?![a-z])", base) if f"{m}b" in PUBLISHED]
  if len(sizes) != 1:
    raise FileNotFoundError(
        f"{name}: no config.json there and the name gives no published Qwen2.5-VL size "
        f"({'/'.join(PUBLISHED)}); point config.model.hf_dir at a checkpoint or a "
        "Qwen2.5-VL-<size>-Instruct directory name")
  return PUBLISHED[f"{sizes[0]}b"](**overrides)


def tokenizer_dir(source, tokenizer_dir=None):
  """Where the tokenizer files of a source are.

  `tokenizer_dir` if given; for a train.py workdir its tokenizer/ directory, else the
  data.tokenizer_dir or model.hf_dir recorded in its config.json; for an HF checkpoint the
  checkpoint directory itself.
  """
  if tokenizer_dir:
    return pathlib.Path(tokenizer_dir)
  run = run_dirs(source)
  if run is None:
    return pathlib.Path(source)
  run_dir = run[0]
  candidates = [run_dir / RUN_TOKENIZER_DIR]
  record = run_dir / "config.json"
  if record.is_file():
    with open(record) as f:
      train_cfg = json.load(f)
    candidates += [pathlib.Path(d) for d in (train_cfg.get("data", {}).get("tokenizer_dir"),
                                             train_cfg.get("model", {}).get("hf_dir")) if d]
  for c in candidates:
    if (c / "tokenizer.json").is_file() or (c / "vocab.json").is_file():
      return c
  raise FileNotFoundError(f"{source}: train.py workdir without tokenizer files (looked in "
                          f"{', '.join(str(c) for c in candidates)}); pass a tokenizer directory")


def check_tokenizer(tokenizer, cfg, where="the tokenizer directory"):
  """Raises when the tokenizer's special ids are not the model's (a wrong tokenizer directory)."""
  bad = [f"{name}: tokenizer {getattr(tokenizer, name)} != model {getattr(cfg, name)}"
         for name in ("image_token_id", "video_token_id", "vision_start_token_id",
                      "vision_end_token_id")
         if getattr(tokenizer, name) != getattr(cfg, name)]
  if tokenizer.vocab_size > cfg.vocab_size:
    bad.append(f"vocab_size: tokenizer {tokenizer.vocab_size} > model {cfg.vocab_size}")
  if bad:
    raise ValueError(f"the tokenizer does not match the model (check {where}): " + "; ".join(bad))


@functools.lru_cache(maxsize=8)
def _jitted_init(cfg, dtype, param_dtype, shardings):
  """The modules' own initialisers as one jitted program onto `shardings` (a tuple of (key,
  sharding)), the seed an argument: compiled once per model, dtypes and layout."""

  def init(seed):
    # unsafe_rbg: XLA compiles threefry for the ~100 parameter draws 2-3x slower on CPU, and this
    # init only has to be deterministic, not a particular stream.
    with jax.default_prng_impl("unsafe_rbg"):
      return tree_utils.split_model(_module(cfg, dtype, param_dtype, jax.random.key(seed)))[1]

  return jax.jit(init, out_shardings=dict(shardings))


def _random_params(abstract, seed):
  """Random init on the shardings. Each call returns fresh buffers (the trainer donates the
  policy's and keeps the reference's)."""
  fn = _jitted_init(abstract.config, abstract.dtype, abstract.param_dtype,
                    tuple(sorted(abstract.shardings.items())))
  with jax.set_mesh(None):
    return fn(jnp.int32(seed))


def load_params(source, abstract, *, step=None, seed=0):
  """Fills `abstract` from `source` (see the module docstring).

  Args:
    source: HF directory, train.py workdir (or its ckpt/), or `RANDOM`.
    abstract: AbstractModel; params come back in its dtypes and on its shardings.
    step: checkpoint step of a workdir (default: the latest).
    seed: random init seed.

  Returns:
    `{hf_key: jax.Array}`.
  """
  kind = source_kind(source)
  if step is not None and kind != "run":
    raise ValueError(f"step={step}: only a train.py workdir has steps; {source} is {kind}")
  if kind == RANDOM:
    return _random_params(abstract, seed)
  if kind == "hf":
    from spacer_jax.models import hf_weights  # pylint: disable=g-import-not-at-top
    return hf_weights.load_params(str(source), abstract.params)
  from spacer_jax import checkpoint  # pylint: disable=g-import-not-at-top  (imports orbax)
  return checkpoint.restore_params(run_dirs(source)[1], abstract.params, step=step)


def load_model(source, *, dtype=jnp.float32, param_dtype=None, mesh=None, rules=(), step=None,
               **config_overrides):
  """`abstract_model(model_config(source)) + load_params(source)` -> an nnx Qwen2_5_VL.

  Args:
    source: HF directory or train.py workdir.
    dtype, param_dtype: compute and storage dtypes (param_dtype defaults to dtype).
    mesh, rules: optional mesh and logical rules (each tensor goes straight into its shard).
    step: workdir checkpoint step (default: the latest).
    **config_overrides: Qwen2_5_VLConfig fields to override (e.g. text_after_vision="hf5").
  """
  cfg = model_config(source, **config_overrides)
  abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
  return abstract.merge(load_params(source, abstract, step=step))


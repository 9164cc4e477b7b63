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

With LoRA (`abstract_model(..., lora=lora.LoraConfig(...))`, spacer_jax/lora.py) the abstract model
also holds the adapters, and `abstract.base` is the same model without them (the frozen reference
policy). `load_params` then reads the base weights from the source and the adapters from the source
when it has them (a LoRA run's workdir), from a peft directory (`adapter=`), or fresh (A random,
B = 0). A LoRA run loaded as a plain model (`abstract.lora` None, e.g. by the evaluator or the
converter) comes back merged (`lora.merge_lora`): base-shaped weights that give the same outputs.

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

from spacer_jax import lora as lora_lib
from spacer_jax import sharding as sharding_lib
from spacer_jax import tree_utils
from spacer_jax.models import qwen2_5_vl

RANDOM = "random"

# A train.py workdir holds these next to each other (the convert tool writes the same layout).
RUN_MODEL_CONFIG = "model_config.json"
RUN_CKPT_DIR = "ckpt"
RUN_TOKENIZER_DIR = "tokenizer"
RUN_LORA_CONFIG = "lora_config.json"  # only in LoRA runs: lora.LoraConfig.to_dict()


@dataclasses.dataclass(frozen=True, eq=False)
class AbstractModel:
  """A Qwen2.5-VL without weights: graph, parameter shapes/dtypes/shardings, logical axes.

  Attributes:
    config: the architecture.
    graphdef: nnx graph definition (`nnx.merge(graphdef, state)` rebuilds the module).
    params: flat `{hf_key: jax.ShapeDtypeStruct}`, each with its `.sharding` (a NamedSharding on
      `mesh`, or the first device without a mesh).
    paths: `{hf_key: nnx path}` for rebuilding the nested state.
    logical: `{hf_key: logical axis names or None}`.
    dtype: compute dtype the module was built with.
    param_dtype: the dtype the module is built (and randomly initialised) in; the storage dtype of
      the trained parameters (with LoRA the frozen base may be stored in another, see `params`).
    mesh, rules: where the shardings come from (None / () for one device).
    lora: lora.LoraConfig of the adapters, or None.
    base_graphdef: with LoRA, the graph without adapters (see `base`).
  """
  config: qwen2_5_vl.Qwen2_5_VLConfig
  graphdef: Any
  params: dict
  paths: dict
  logical: dict
  dtype: Any
  param_dtype: Any
  mesh: Any = None
  rules: tuple = ()
  lora: Any = None
  base_graphdef: Any = None

  @property
  def shardings(self):
    """`{hf_key: Sharding}` of every parameter."""
    return {k: v.sharding for k, v in self.params.items()}

  @property
  def param_count(self):
    return tree_utils.param_count(self.params)

  @property
  def base(self):
    """The model without its LoRA adapters (itself without LoRA): the base keys, the base graph."""
    if self.lora is None:
      return self
    keep = [k for k in self.params if not lora_lib.is_adapter_key(k)]
    return dataclasses.replace(
        self, graphdef=self.base_graphdef, params={k: self.params[k] for k in keep},
        paths={k: self.paths[k] for k in keep}, logical={k: self.logical[k] for k in keep},
        lora=None, base_graphdef=None)

  def with_param_dtype(self, dtype):
    """The same model with every parameter stored in `dtype` (e.g. a bf16 reference policy).

    `param_dtype` stays: a random init still draws in it and casts, so a bf16 copy of a random
    model is the rounded float32 model."""
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


def _module(cfg, dtype, param_dtype, seed=0, lora=None):
  """The nnx model; `seed` an int or a key (traced, in the jitted random init)."""
  model = qwen2_5_vl.Qwen2_5_VL(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype)
  if lora is not None:
    # Their own stream, so the base weights of a random init do not depend on the adapters.
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    lora_lib.add_adapters(model, lora, rngs=nnx.Rngs(jax.random.fold_in(key, 1)),
                          param_dtype=param_dtype)
  return model


def abstract_model(cfg, *, dtype=jnp.float32, param_dtype=None, mesh=None, rules=(), lora=None):
  """Builds the abstract model of `cfg` (nothing is allocated).

  Args:
    cfg: qwen2_5_vl.Qwen2_5_VLConfig.
    dtype: compute dtype; param_dtype: storage dtype (default: dtype).
    mesh: a jax Mesh (or AbstractMesh, for planning) to shard the parameters over; None = one device.
    rules: logical axis rules ((logical name, mesh axes), ...), e.g. config_lib.FSDP_RULES.
    lora: optional lora.LoraConfig: adds the adapters. Base parameters that are not trained
      (`lora.train_also`) are stored in `lora.base_param_dtype` when it is set.

  Returns:
    AbstractModel.
  """
  dtype = jnp.dtype(dtype)
  param_dtype = dtype if param_dtype is None else jnp.dtype(param_dtype)
  rules = tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in (rules or ()))
  with jax.set_mesh(None):  # see the module docstring: logical names are not mesh axes
    module = nnx.eval_shape(lambda: _module(cfg, dtype, param_dtype, lora=lora))
  graphdef, flat, paths = tree_utils.split_model(module)
  logical = sharding_lib.param_logical_axes(nnx.split(module)[1])
  base_graphdef = None
  if lora is not None:
    frozen_dtype = jnp.dtype(lora.base_param_dtype or param_dtype)
    trained = set(lora_lib.trainable_keys(flat, lora))
    flat = {k: v if k in trained else jax.ShapeDtypeStruct(v.shape, frozen_dtype)
            for k, v in flat.items()}
    lora_lib.remove_adapters(module)
    base_graphdef = nnx.split(module)[0]
  if mesh is None:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {k: dev for k in flat}
  else:
    shardings = sharding_lib.tree_shardings(flat, mesh, rules, logical)
  params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in flat.items()}
  return AbstractModel(config=cfg, graphdef=graphdef, params=params, paths=paths, logical=logical,
                       dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, lora=lora,
                       base_graphdef=base_graphdef)


def with_lora(abstract, lora):
  """`abstract` (a model without adapters) rebuilt with the adapters of `lora` (a LoraConfig)."""
  if abstract.lora is not None:
    raise ValueError("the model already has LoRA adapters")
  return abstract_model(abstract.config, dtype=abstract.dtype, param_dtype=abstract.param_dtype,
                        mesh=abstract.mesh, rules=abstract.rules, lora=lora)


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
def _jitted_init(cfg, dtype, param_dtype, lora, targets):
  """The modules' own initialisers as one jitted program onto `targets` (a tuple of (key, dtype,
  sharding); XLA drops the draws of the other parameters), the seed an argument: compiled once per
  model, dtypes and layout."""

  def init(seed):
    # unsafe_rbg: XLA compiles threefry for the ~100 parameter draws 2-3x slower on CPU, and this
    # init only has to be deterministic, not a particular stream.
    with jax.default_prng_impl("unsafe_rbg"):
      flat = tree_utils.split_model(_module(cfg, dtype, param_dtype, jax.random.key(seed), lora))[1]
      return {k: flat[k].astype(dt) for k, dt, _ in targets}

  return jax.jit(init, out_shardings={k: sh for k, _, sh in targets})


def _random_params(abstract, seed, keys=None):
  """Random init of `keys` (default: all) on the shardings. Each call returns fresh buffers (the
  trainer donates the policy's and keeps the reference's)."""
  keys = sorted(abstract.params if keys is None else keys)
  fn = _jitted_init(abstract.config, abstract.dtype, abstract.param_dtype, abstract.lora,
                    tuple((k, abstract.params[k].dtype, abstract.params[k].sharding) for k in keys))
  with jax.set_mesh(None):
    return fn(jnp.int32(seed))


def run_lora_config(source):
  """The lora.LoraConfig a train.py workdir was trained with, or None (no LoRA, not a workdir)."""
  run = None if source == RANDOM else run_dirs(source)
  path = None if run is None else run[0] / RUN_LORA_CONFIG
  if path is None or not path.is_file():
    return None
  with open(path) as f:
    return lora_lib.LoraConfig.from_dict(json.load(f))


def _check_same_adapters(abstract, run_lora, source):
  expected = with_lora(abstract.base, run_lora)
  ours = sorted(k for k in abstract.params if lora_lib.is_adapter_key(k))
  theirs = sorted(k for k in expected.params if lora_lib.is_adapter_key(k))
  if (ours != theirs or abstract.lora.rank != run_lora.rank
      or abstract.lora.scale != run_lora.scale):
    raise ValueError(
        f"{source} was trained with LoRA rank {run_lora.rank}, scale {run_lora.scale} on "
        f"{len(theirs) // 2} layers; the model has rank {abstract.lora.rank}, scale "
        f"{abstract.lora.scale} on {len(ours) // 2} layers (see its {RUN_LORA_CONFIG})")


def load_params(source, abstract, *, step=None, seed=0, keys=None, adapter=None):
  """Fills `abstract` from `source` (see the module docstring).

  Args:
    source: HF directory, train.py workdir (or its ckpt/), or `RANDOM`.
    abstract: AbstractModel; params come back in its dtypes and on its shardings.
    step: checkpoint step of a workdir (default: the latest).
    seed: random init seed (also of fresh LoRA adapters).
    keys: the parameters to read (default: all); the source is still checked against the whole
      model.
    adapter: with LoRA, a peft adapter directory to take the adapters from (lora.load_peft).

  Returns:
    `{hf_key: jax.Array}`.
  """
  kind = source_kind(source)
  if step is not None and kind != "run":
    raise ValueError(f"step={step}: only a train.py workdir has steps; {source} is {kind}")
  keys = list(abstract.params) if keys is None else list(keys)
  unknown = [k for k in keys if k not in abstract.params]
  if unknown:
    raise KeyError(f"keys not in the model: {unknown}")
  if adapter is not None and abstract.lora is None:
    raise ValueError(f"adapter={adapter}: the model has no LoRA layers (build it with "
                     "lora=lora.config_from_peft(adapter))")
  from spacer_jax import checkpoint  # pylint: disable=g-import-not-at-top  (imports orbax)
  run_lora = run_lora_config(source) if kind == "run" else None
  if run_lora is not None and abstract.lora is None:
    # A LoRA run read as a plain model: its adapters merged into the base weights.
    # The base in the requested dtypes, the adapters in float32 (merged in float32, then cast).
    full = with_lora(abstract, dataclasses.replace(run_lora, base_param_dtype=None))
    names = {lora_lib.module_name(k) for k in keys}
    adapters = [k for k in full.params
                if lora_lib.is_adapter_key(k) and lora_lib.module_name(k) in names]
    targets = {k: abstract.params[k] for k in keys}
    targets.update({k: jax.ShapeDtypeStruct(full.params[k].shape, jnp.float32,
                                            sharding=full.params[k].sharding) for k in adapters})
    params = checkpoint.restore_params(run_dirs(source)[1], targets, step=step)
    merged = lora_lib.merge_lora(params, run_lora)
    return {k: merged[k] for k in keys}
  if run_lora is not None:
    _check_same_adapters(abstract, run_lora, source)

  # What the source holds (a LoRA run: base and adapters; otherwise the base weights), what the peft
  # directory holds (adapters, maybe modules trained in full), and fresh adapters for the rest.
  in_adapter = set()
  if adapter is not None:
    in_adapter = set(lora_lib.peft_keys(adapter))
  in_source = set(abstract.params if kind == RANDOM or run_lora is not None else abstract.base.params)
  from_source = [k for k in keys if k in in_source and k not in in_adapter]
  from_adapter = [k for k in keys if k in in_adapter]
  fresh = [k for k in keys if k not in from_source and k not in from_adapter]
  out = {}
  if from_source and kind == RANDOM:
    out.update(_random_params(abstract, seed, from_source))
  elif from_source and kind == "hf":
    from spacer_jax.models import hf_weights  # pylint: disable=g-import-not-at-top
    out.update(hf_weights.load_params(str(source), abstract.base.params, keys=from_source))
  elif from_source:
    out.update(checkpoint.restore_params(
        run_dirs(source)[1], {k: abstract.params[k] for k in from_source}, step=step))
  if from_adapter:
    out.update(lora_lib.load_peft(adapter, abstract, keys=from_adapter))
  if fresh:
    out.update(_random_params(abstract, seed, fresh))
  return {k: out[k] for k in keys}


def load_model(source, *, dtype=jnp.float32, param_dtype=None, mesh=None, rules=(), step=None,
               adapter=None, **config_overrides):
  """`abstract_model(model_config(source)) + load_params(source)` -> an nnx Qwen2_5_VL.

  Args:
    source: HF directory or train.py workdir (a LoRA run comes back with its adapters merged).
    dtype, param_dtype: compute and storage dtypes (param_dtype defaults to dtype).
    mesh, rules: optional mesh and logical rules (each tensor goes straight into its shard).
    step: workdir checkpoint step (default: the latest).
    adapter: optional peft adapter directory: the model gets its LoRA layers and weights.
    **config_overrides: Qwen2_5_VLConfig fields to override (e.g. text_after_vision="hf5").
  """
  cfg = model_config(source, **config_overrides)
  lora = None if adapter is None else lora_lib.config_from_peft(adapter)
  abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules,
                            lora=lora)
  return abstract.merge(load_params(source, abstract, step=step, adapter=adapter))

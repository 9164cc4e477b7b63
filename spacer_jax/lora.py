"""LoRA: low-rank adapters on the model's Linear layers, and their peft files.

A LoRA layer computes `x W^T + b + (alpha / r) * dropout(x) A^T B^T` (`layers.Linear.add_lora`), with
`A = lora_A.weight[r, in]` and `B = lora_B.weight[out, r]` under the layer's HF name, e.g.
`model.layers.0.self_attn.q_proj.lora_A.weight`: peft's names and layouts. The adapters live in the
same flat `{hf_key: array}` dict as the base weights, which keep their names and shardings; A is
sharded like the layer's input axis and B like its output axis.

    cfg = lora.LoraConfig(rank=16, alpha=32.0, targets=config_lib.LORA_TARGETS["text"])
    abstract = modeling.abstract_model(model_cfg, lora=cfg, ...)  # base + adapters
    params = modeling.load_params(hf_dir, abstract)                # HF base, fresh adapters
    abstract.base                                                  # the model without adapters
    lora.save_peft(params, abstract, out_dir)                      # adapter_config.json + safetensors
    merged = lora.merge_lora(params, cfg)                          # base-shaped, for HF export

The frozen base is the reference policy of GRPO: `abstract.base` (the same graph without adapter
modules) applied to the base keys of the policy's own params, so it costs no second copy.

Targets are regexes searched (re.search) in the module names, i.e. the parameter names without
`.weight`: `model.layers.3.mlp.up_proj`, `visual.blocks.0.attn.qkv`. The vision merger's two layers
are `visual.merger.fc1` / `visual.merger.fc2` here (HF's `mlp.0` / `mlp.2`). Only Linear layers take
adapters (not the patch embedding, the token embedding or the norms); a target that matches no Linear
layer is an error.

peft files: `save_peft` writes what `peft.PeftModel.from_pretrained` on the transformers model reads
(keys `base_model.model.<transformers module name>.lora_{A,B}.weight`, target_modules as the exact
module names; parameters trained in full through `train_also` as modules_to_save); `load_peft` reads
such a directory back (also the pre-4.52 `model.layers.*` / `visual.*` naming).
"""

import dataclasses
import functools
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spacer_jax import tree_utils
from spacer_jax.models import hf_weights
from spacer_jax.models import layers

ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
PEFT_PREFIX = "base_model.model."
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """What gets adapters and how they are scaled.

  Attributes:
    rank: r (> 0).
    alpha: the scale is alpha / r (alpha / sqrt(r) with use_rslora), as in peft.
    dropout: dropout on the adapters' input during training steps (peft's lora_dropout).
    targets: regexes over module names (see the module docstring; presets in
      config_lib.LORA_TARGETS).
    train_also: regexes over parameter names trained in full next to the adapters (e.g.
      r"^lm_head\\."); exported as peft modules_to_save.
    base_param_dtype: storage dtype of the frozen base weights (None: the model's param_dtype). The
      adapters and `train_also` parameters keep the model's param_dtype (float32 master weights).
    use_rslora: rank-stabilised scaling alpha / sqrt(r).
  """
  rank: int
  alpha: float
  targets: tuple[str, ...]
  dropout: float = 0.0
  train_also: tuple[str, ...] = ()
  base_param_dtype: str | None = None
  use_rslora: bool = False

  def __post_init__(self):
    if int(self.rank) <= 0:
      raise ValueError(f"LoRA rank must be > 0, got {self.rank}")
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
    if not self.targets:
      raise ValueError("LoRA targets are empty: name the layers to adapt (presets: "
                       "config_lib.LORA_TARGETS)")
    for r in tuple(self.targets) + tuple(self.train_also):
      re.compile(r)
    object.__setattr__(self, "targets", tuple(self.targets))
    object.__setattr__(self, "train_also", tuple(self.train_also))

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

  def to_dict(self):
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d):
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# ------------------------------------------------------------------------------------------------
# The model side.


def is_adapter_key(key: str) -> bool:
  return key.endswith(ADAPTER_SUFFIXES)


def module_name(key: str) -> str:
  """`...q_proj.lora_A.weight` / `...q_proj.weight` -> `...q_proj`."""
  for suffix in ADAPTER_SUFFIXES + (".weight", ".bias"):
    if key.endswith(suffix):
      return key[:-len(suffix)]
  return key.rsplit(".", 1)[0]


def linear_layers(model):
  """`{module name: layers.Linear}` of every Linear of `model`, adapters excluded."""
  out = {}
  for path, m in nnx.iter_modules(model):
    name = tree_utils.key_of(path)
    if isinstance(m, layers.Linear) and not name.endswith((".lora_A", ".lora_B")):
      out[name] = m
  return out


def target_names(names, targets):
  """The names matched by any of `targets`; raises naming a target that matches none."""
  regs = [re.compile(t) for t in targets]
  unmatched = [t for t, r in zip(targets, regs) if not any(r.search(n) for n in names)]
  if unmatched:
    raise ValueError(f"LoRA targets {unmatched} match no Linear layer of the model (module names "
                     f"look like {sorted(names)[:3]} ... {sorted(names)[-2:]})")
  return sorted(n for n in names if any(r.search(n) for r in regs))


def add_adapters(model, config: LoraConfig, *, rngs, param_dtype=None):
  """Gives every target Linear of `model` its adapters (in place); returns the adapted names."""
  linears = linear_layers(model)
  names = target_names(list(linears), config.targets)
  rngs = layers.key_seq(rngs)
  for name in names:
    linears[name].add_lora(config.rank, scale=config.scale, dropout=config.dropout, rngs=rngs,
                           param_dtype=param_dtype)
  return names


def remove_adapters(model):
  """Drops every adapter of `model` (in place): the graph of the base model."""
  for m in linear_layers(model).values():
    m.lora_A = m.lora_B = None
    m.lora_scale = m.lora_dropout = 0.0


def trainable_keys(keys, config: LoraConfig):
  """The adapters and the parameters matched by `config.train_also`, sorted."""
  regs = [re.compile(r) for r in config.train_also]
  return sorted(k for k in keys if is_adapter_key(k) or any(r.search(k) for r in regs))


def adapted_modules(keys):
  """Module names that carry adapters in a flat param dict."""
  return sorted({module_name(k) for k in keys if k.endswith(ADAPTER_SUFFIXES[0])})


@functools.lru_cache(maxsize=None)
def _merge_fn(sharding):
  def merge(w, a, b, scale):
    delta = jnp.einsum("or,ri->oi", b.astype(jnp.float32), a.astype(jnp.float32))  # [out, in]
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
  return jax.jit(merge, out_shardings=sharding)


def merge_lora(params, config: LoraConfig | None):
  """Base-shaped params: `W + scale * B A` for every adapted layer, adapter keys dropped.

  The merged weights keep the base weights' dtype (a bf16 base rounds the update to bf16, as peft's
  merge does) and shardings. `config=None` (no LoRA) returns `params` unchanged.

  Args:
    params: flat `{hf_key: array}` of a LoRA model (base and adapter keys).
    config: its LoraConfig (for the scale).

  Returns:
    `{hf_key: array}` with exactly the base model's keys.
  """
  if config is None:
    return params
  out = {k: v for k, v in params.items() if not is_adapter_key(k)}
  for name in adapted_modules(params):
    w = params[name + ".weight"]
    a, b = params[name + ".lora_A.weight"], params[name + ".lora_B.weight"]
    if isinstance(w, jax.Array):
      out[name + ".weight"] = _merge_fn(w.sharding)(w, a, b, jnp.float32(config.scale))
    else:
      delta = np.asarray(b, np.float32) @ np.asarray(a, np.float32)
      out[name + ".weight"] = (np.asarray(w, np.float32) + config.scale * delta).astype(
          np.asarray(w).dtype)
  return out


# ------------------------------------------------------------------------------------------------
# peft files.


def _peft_key(key):
  return PEFT_PREFIX + hf_weights.transformers_name(key)


def _model_key(peft_key):
  key = peft_key[len(PEFT_PREFIX):] if peft_key.startswith(PEFT_PREFIX) else peft_key
  key = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", key)  # in-memory adapter name
  return hf_weights.apply_aliases(key)


def peft_config(config: LoraConfig, keys, *, base_model_name_or_path=None):
  """peft's adapter_config.json for a LoRA model with parameters `keys`."""
  full = sorted({module_name(k) for k in trainable_keys(keys, config) if not is_adapter_key(k)})
  adapted = adapted_modules(keys)
  both = sorted(set(full) & set(adapted))
  if both:
    raise ValueError(f"{both} carry adapters and are also trained in full (lora.train_also); peft "
                     "cannot express a module that is both a LoRA target and in modules_to_save")
  return {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
      "r": int(config.rank), "lora_alpha": float(config.alpha),
      "lora_dropout": float(config.dropout), "use_rslora": bool(config.use_rslora),
      "target_modules": [hf_weights.transformers_name(n) for n in adapted],
      "modules_to_save": [hf_weights.transformers_name(n) for n in full] or None,
      "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
      "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
      "auto_mapping": {"base_model_class": "Qwen2_5_VLForConditionalGeneration",
                       "parent_library": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"},
  }


def save_peft(params, abstract, out_dir, *, base_model_name_or_path=None, dtype=None):
  """Writes the adapters (and `train_also` modules in full) of a LoRA model as a peft directory.

  Args:
    params: flat `{hf_key: array}` of the LoRA model.
    abstract: its modeling.AbstractModel (with `.lora`).
    out_dir: created if needed; gets adapter_config.json and adapter_model.safetensors.
    base_model_name_or_path: recorded in adapter_config.json (the base checkpoint).
    dtype: dtype of the written tensors (default: as stored, float32 for the adapters).
  """
  config = abstract.lora
  if config is None:
    raise ValueError("save_peft: the model has no LoRA adapters")
  os.makedirs(out_dir, exist_ok=True)
  meta = peft_config(config, params, base_model_name_or_path=base_model_name_or_path)
  full = set(meta["modules_to_save"] or ())
  keys = [k for k in params if is_adapter_key(k)
          or hf_weights.transformers_name(module_name(k)) in full]
  tensors = []
  for k in sorted(keys, key=_peft_key):
    arr = np.asarray(jax.device_get(params[k]))
    tensors.append((_peft_key(k), arr if dtype is None else arr.astype(dtype)))
  hf_weights.write_safetensors(os.path.join(out_dir, PEFT_WEIGHTS), tensors)
  with open(os.path.join(out_dir, PEFT_CONFIG), "w") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
  return out_dir


def _read_peft_config(adapter_dir):
  path = os.path.join(adapter_dir, PEFT_CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{adapter_dir}: no {PEFT_CONFIG} (not a peft adapter directory)")
  with open(path) as f:
    meta = json.load(f)
  bad = []
  if meta.get("peft_type", "LORA") != "LORA":
    bad.append(f"peft_type={meta.get('peft_type')!r} (only LORA)")
  for field, ok in (("use_dora", False), ("fan_in_fan_out", False)):
    if meta.get(field, ok) != ok:
      bad.append(f"{field}={meta[field]!r}")
  if meta.get("bias", "none") != "none":
    bad.append(f"bias={meta['bias']!r} (only 'none')")
  for field in ("rank_pattern", "alpha_pattern"):
    if meta.get(field):
      bad.append(f"{field} (per-layer ranks/alphas)")
  if bad:
    raise ValueError(f"{path}: unsupported adapter settings: {'; '.join(bad)}")
  return meta


def _read_peft_tensors(adapter_dir):
  path = os.path.join(adapter_dir, PEFT_WEIGHTS)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{adapter_dir}: no {PEFT_WEIGHTS}")
  return {_model_key(k): v for k, v in hf_weights.read_safetensors(path)}


def peft_keys(adapter_dir):
  """The model keys a peft adapter directory holds (adapters, and modules_to_save in full)."""
  return sorted(_read_peft_tensors(adapter_dir))


def config_from_peft(adapter_dir, *, base_param_dtype=None, dropout=None):
  """The LoraConfig of a peft adapter directory: exactly the layers (and full modules) its weights
  hold."""
  meta = _read_peft_config(adapter_dir)
  keys = list(_read_peft_tensors(adapter_dir))
  adapted = adapted_modules(keys)
  if not adapted:
    raise ValueError(f"{adapter_dir}/{PEFT_WEIGHTS} holds no lora_A/lora_B weights")
  full = sorted(k for k in keys if not is_adapter_key(k))
  return LoraConfig(
      rank=int(meta["r"]), alpha=float(meta["lora_alpha"]),
      dropout=float(meta.get("lora_dropout") or 0.0) if dropout is None else dropout,
      targets=tuple(f"^{re.escape(n)}$" for n in adapted),
      train_also=tuple(f"^{re.escape(k)}$" for k in full), base_param_dtype=base_param_dtype,
      use_rslora=bool(meta.get("use_rslora", False)))


def load_peft(adapter_dir, abstract, keys=None):
  """Reads a peft adapter directory into a LoRA model's adapter (and modules_to_save) params.

  Args:
    adapter_dir: adapter_config.json + adapter_model.safetensors (peft's save_pretrained).
    abstract: the LoRA modeling.AbstractModel; its adapters must be exactly the file's.
    keys: the keys to return (default: every key the file holds).

  Returns:
    `{hf_key: jax.Array}` in the abstract's dtypes and shardings.

  Raises:
    ValueError naming missing, unexpected and mis-shaped tensors, or a rank/alpha mismatch.
  """
  meta = _read_peft_config(adapter_dir)
  config = abstract.lora
  if config is None:
    raise ValueError(f"{adapter_dir}: the model has no LoRA adapters to load it into")
  if int(meta["r"]) != config.rank or not math.isclose(
      float(meta["lora_alpha"]), config.alpha) or bool(meta.get("use_rslora", False)) != \
      config.use_rslora:
    raise ValueError(f"{adapter_dir}: r={meta['r']}, lora_alpha={meta['lora_alpha']}, use_rslora="
                     f"{meta.get('use_rslora', False)}; the model's LoRA has rank {config.rank}, "
                     f"alpha {config.alpha}, use_rslora {config.use_rslora}")
  tensors = _read_peft_tensors(adapter_dir)
  expected = {k for k in abstract.params if is_adapter_key(k)}
  missing = sorted(expected - set(tensors))
  unexpected = sorted(k for k in tensors if k not in abstract.params)
  bad_shape = [f"{k}: file {tuple(v.shape)} != model {tuple(abstract.params[k].shape)}"
               for k, v in tensors.items()
               if k in abstract.params and tuple(v.shape) != tuple(abstract.params[k].shape)]
  if missing or unexpected or bad_shape:
    raise ValueError(f"{adapter_dir} does not match the model's LoRA layers:\n"
                     f"missing ({len(missing)}): {missing}\nunexpected ({len(unexpected)}): "
                     f"{unexpected}\nwrong shape ({len(bad_shape)}): {bad_shape}")
  keys = sorted(tensors) if keys is None else [k for k in keys if k in tensors]
  out = {}
  for k in keys:
    target = abstract.params[k]
    out[k] = jax.make_array_from_callback(
        target.shape, target.sharding,
        lambda index, arr=tensors[k], dtype=target.dtype: np.asarray(arr[index]).astype(dtype))
  return out

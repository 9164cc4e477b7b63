"""Hugging Face safetensors <-> NNX params: a strict, streaming identity mapping (STYLE 3.4).

Checkpoint keys equal the dotted NNX paths except for the entries of `KEY_ALIASES`. Loading
memory-maps each safetensors file and builds every parameter shard by shard with
`jax.make_array_from_callback`, so the host never holds a second full copy of the weights.
Coverage is strict: one KeyError lists every missing, unexpected and mis-shaped key.

The safetensors format is small enough to read and write directly (8-byte little-endian header
length, JSON header of {name: {dtype, shape, data_offsets}}, raw row-major bytes), which also covers
bfloat16 that numpy cannot name without ml_dtypes.
"""

import json
import os
import re
import struct

import jax
import ml_dtypes
import numpy as np

# (checkpoint regex, model key replacement), applied in order when loading; inverted for saving.
KEY_ALIASES = (
    (r"^model\.visual\.", "visual."),  # transformers >= 4.52 in-memory layout
    (r"^model\.language_model\.", "model."),  # idem
    (r"^visual\.merger\.mlp\.0\.", "visual.merger.fc1."),  # nn.Sequential index 0
    (r"^visual\.merger\.mlp\.2\.", "visual.merger.fc2."),  # nn.Sequential index 2 (1 is GELU)
)
_SAVE_ALIASES = ((r"^visual\.merger\.fc1(?=\.|$)", "visual.merger.mlp.0"),  # keys and module names
                 (r"^visual\.merger\.fc2(?=\.|$)", "visual.merger.mlp.2"))

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def apply_aliases(key: str) -> str:
  for pattern, repl in KEY_ALIASES:
    key = re.sub(pattern, repl, key)
  return key


def _files(path):
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(path, n) for n in names]
  single = os.path.join(path, "model.safetensors")
  if not os.path.exists(single):
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
  return [single]


def read_safetensors(filename):
  """Yields (key, np.memmap view) for every tensor of one file, without reading the data."""
  with open(filename, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  raw = np.memmap(filename, dtype=np.uint8, mode="r", offset=8 + n)
  for key, info in header.items():
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{filename}: tensor {key} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    yield key, raw[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def safetensors_items(path):
  """Yields (key, memmap array) over all safetensors files of a checkpoint directory."""
  for filename in _files(path):
    yield from read_safetensors(filename)


def load_params(path, abstract_params, keys=None):
  """Reads a checkpoint directory into `abstract_params`' dtypes and shardings.

  Args:
    path: checkpoint directory.
    abstract_params: flat `{model key: jax.ShapeDtypeStruct}`, each with its `.sharding`.
    keys: the keys to read (default: all); coverage and shapes are checked for every key anyway.

  Returns:
    `{model key: jax.Array}` for `keys`, every tensor built shard by shard from the memory-mapped
    file.

  Raises:
    KeyError listing every missing, unexpected and mis-shaped key.
  """
  keys = list(abstract_params) if keys is None else list(keys)
  wanted = set(keys)
  found, loaded, unexpected, bad_shape, bad_keys = set(), {}, [], [], set()
  for ckpt_key, arr in safetensors_items(path):
    key = apply_aliases(ckpt_key)
    if key not in abstract_params:
      unexpected.append(ckpt_key)
      continue
    target = abstract_params[key]
    if tuple(arr.shape) != tuple(target.shape):
      bad_shape.append(f"{ckpt_key}: checkpoint {tuple(arr.shape)} != model {tuple(target.shape)}")
      bad_keys.add(key)
      continue
    found.add(key)
    if key not in wanted:
      continue

    def shard(index, arr=arr, dtype=target.dtype):
      return np.asarray(arr[index]).astype(dtype)

    loaded[key] = jax.make_array_from_callback(target.shape, target.sharding, shard)
  missing = sorted(set(abstract_params) - found - bad_keys)
  if missing or unexpected or bad_shape:
    raise KeyError(f"checkpoint {path} does not match the model:\n"
                   f"missing ({len(missing)}): {missing}\n"
                   f"unexpected ({len(unexpected)}): {sorted(unexpected)}\n"
                   f"wrong shape ({len(bad_shape)}): {bad_shape}")
  return {k: loaded[k] for k in keys}


def _save_key(key):
  for pattern, repl in _SAVE_ALIASES:
    key = re.sub(pattern, repl, key)
  return key


def transformers_name(key: str) -> str:
  """A model key as transformers >= 4.52 names it in memory (`model.language_model.*`,
  `model.visual.*`, `lm_head.*`): the names peft keys its adapter files and target_modules by.
  `apply_aliases` is the inverse."""
  key = _save_key(key)
  if key.startswith("visual."):
    return "model." + key
  if key.startswith("model."):
    return "model.language_model." + key[len("model."):]
  return key


def _write_file(filename, tensors):
  header, offset = {}, 0
  for key, arr in tensors:
    nbytes = int(np.prod(arr.shape)) * np.dtype(arr.dtype).itemsize
    header[key] = {"dtype": _NAMES[np.dtype(arr.dtype)], "shape": list(arr.shape),
                   "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # 8-byte alignment of the data section
  with open(filename, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, arr in tensors:  # one tensor on the host at a time
      f.write(np.ascontiguousarray(jax.device_get(arr)).tobytes())


def write_safetensors(filename, tensors):
  """Writes [(key, array)] as one safetensors file, keys as given (e.g. a peft adapter file)."""
  _write_file(filename, list(tensors))


def save_params(params, path, *, max_shard_bytes=4 << 30):
  """Writes flat `{model key: array}` params in the published key layout; shards with an index
  above max_shard_bytes."""
  items = sorted((_save_key(k), v) for k, v in params.items())
  groups, size = [[]], 0
  for key, arr in items:
    nbytes = arr.size * np.dtype(arr.dtype).itemsize
    if groups[-1] and size + nbytes > max_shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append((key, arr))
    size += nbytes
  if len(groups) == 1:
    _write_file(os.path.join(path, "model.safetensors"), groups[0])
    return
  weight_map, total = {}, 0
  for i, group in enumerate(groups):
    name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    _write_file(os.path.join(path, name), group)
    for key, arr in group:
      weight_map[key] = name
      total += arr.size * np.dtype(arr.dtype).itemsize
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

"""Hugging Face safetensors <-> NNX params: a strict, validated, streaming identity mapping.

Checkpoint keys equal the dotted NNX paths except for the entries of `KEY_ALIASES` (both on-disk
layouts are read; see docs/qwen2_5_vl.md, "Weight names"). Loading validates before it reads: every
file header (length, JSON, dtypes, byte ranges inside the file and not overlapping), the index (no
missing file, every listed key present) and the exact key/shape coverage are checked before any tensor
data is touched; then each file is memory-mapped and every parameter is built shard by shard with
`jax.make_array_from_callback`, so the host never holds a second full copy of the weights, and each
shard is checked for NaN/inf as it is read. Every failure is one error naming the file and the key
(`CheckpointError`, a ValueError), or one KeyError listing every missing, unexpected and mis-shaped key.

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


class CheckpointError(ValueError):
  """A checkpoint file that cannot be loaded as is; the message names the file and the key."""


_MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit on the JSON header


def _files(path):
  """Safetensors files of a checkpoint directory, after checking the index against the disk."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      if not isinstance(weight_map, dict):
        raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e
    missing = {}
    for key, name in weight_map.items():
      if not os.path.exists(os.path.join(path, name)):
        missing.setdefault(name, key)
    if missing:
      raise CheckpointError(f"{index}: names files that do not exist: " + ", ".join(
          f"{name} (for {key} and others)" for name, key in sorted(missing.items())))
    names = sorted(set(weight_map.values()))
    return [os.path.join(path, n) for n in names], weight_map
  single = os.path.join(path, "model.safetensors")
  if not os.path.exists(single):
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
  return [single], None


def read_header(filename):
  """Validated safetensors header of one file, without reading any tensor data.

  Checks that the header length fits the file, that the header is a JSON object of
  {name: {dtype, shape, data_offsets}}, that every dtype is known, that every byte range holds
  exactly shape x itemsize bytes inside the data section, and that no two ranges overlap.

  Returns:
    (header without "__metadata__", byte offset of the data section).

  Raises:
    CheckpointError naming the file (and the tensor) on the first problem.
  """
  size = os.path.getsize(filename)
  with open(filename, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{filename}: truncated, {size} bytes is shorter than the 8-byte header "
                            "length")
    (n,) = struct.unpack("<Q", head)
    if n > min(size - 8, _MAX_HEADER_BYTES):
      raise CheckpointError(f"{filename}: corrupt header length {n} (the file has {size - 8} bytes "
                            "after the length field)")
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, ValueError) as e:
    raise CheckpointError(f"{filename}: the header is not valid JSON ({e})") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"{filename}: the header is a JSON {type(header).__name__}, not an object")
  header.pop("__metadata__", None)
  data_size = size - 8 - n
  spans = []
  for key, info in header.items():
    where = f"{filename}: tensor {key}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
      raise CheckpointError(f"{where}: entry {info!r} lacks dtype/shape/data_offsets")
    if info["dtype"] not in _DTYPES:
      raise CheckpointError(f"{where}: unknown dtype {info['dtype']!r} (known: {sorted(_DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if (not isinstance(shape, list) or
        not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
      raise CheckpointError(f"{where}: bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or
        not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) or
        not 0 <= offsets[0] <= offsets[1]):
      raise CheckpointError(f"{where}: bad data_offsets {offsets!r}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
    if offsets[1] - offsets[0] != nbytes:
      raise CheckpointError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes "
                            f"but {info['dtype']}{shape} needs {nbytes}")
    if offsets[1] > data_size:
      raise CheckpointError(f"{where}: truncated file, the tensor ends at data byte {offsets[1]} but "
                            f"the data section has {data_size} bytes")
    spans.append((offsets[0], offsets[1], key))
  spans.sort()
  for (_, end, prev), (start, _, key) in zip(spans, spans[1:]):
    if start < end:
      raise CheckpointError(f"{filename}: tensor {key} overlaps tensor {prev} (its data starts at "
                            f"byte {start}, before {prev} ends at {end})")
  return header, 8 + n


def read_safetensors(filename, header=None):
  """Yields (key, np.memmap view) for every tensor of one file, without reading the data."""
  if header is None:
    header = read_header(filename)
  header, start = header
  raw = np.memmap(filename, dtype=np.uint8, mode="r", offset=start) if header else None
  for key, info in header.items():
    begin, end = info["data_offsets"]
    dtype = _DTYPES[info["dtype"]]
    if begin == end:  # zero-size tensor (np.memmap cannot map an empty tail)
      yield key, np.zeros(info["shape"], dtype)
      continue
    yield key, raw[begin:end].view(dtype).reshape(info["shape"])


def check_checkpoint(path):
  """Validates every header of a checkpoint directory (and its index) before any data is read.

  Returns:
    list of (filename, (header, data offset)) in file order.

  Raises:
    CheckpointError naming the file and key; FileNotFoundError when there is no checkpoint.
  """
  files, weight_map = _files(path)
  headers = [(f, read_header(f)) for f in files]
  if weight_map is not None:
    held = {os.path.basename(f): h for f, (h, _) in headers}
    index = os.path.join(path, "model.safetensors.index.json")
    for key, name in sorted(weight_map.items()):
      if key not in held[name]:
        raise CheckpointError(f"{index}: tensor {key} is listed in {name}, which does not hold it")
  return headers


def safetensors_items(path):
  """Yields (key, memmap array) over all safetensors files of a checkpoint directory."""
  for filename, header in check_checkpoint(path):
    yield from read_safetensors(filename, header)


def checkpoint_dtype(path):
  """The numpy dtype of the floating-point tensors of a checkpoint (ValueError if mixed)."""
  names = {info["dtype"] for _, (h, _) in check_checkpoint(path) for info in h.values()}
  floats = {n for n in names if np.issubdtype(np.dtype(_DTYPES[n]), np.floating) or n == "BF16"}
  if len(floats) != 1:
    raise CheckpointError(f"{path}: expected one floating-point dtype, found {sorted(floats)}")
  return np.dtype(_DTYPES[floats.pop()])


# 16-bit floats are NaN/inf exactly when all their exponent bits are set; testing the bits in
# cache-sized chunks is ~10x faster than np.isfinite on ml_dtypes' bfloat16
# (experiments/bench_load.py).
_EXPONENT_MASKS = {np.dtype(ml_dtypes.bfloat16): 0x7F80, np.dtype(np.float16): 0x7C00}
_CHUNK = 1 << 20  # elements


def _all_finite(x):
  mask = _EXPONENT_MASKS.get(x.dtype)
  flat = np.ascontiguousarray(x).reshape(-1)
  if mask is None:
    return all(np.isfinite(flat[i:i + _CHUNK]).all() for i in range(0, flat.size, _CHUNK))
  bits = flat.view(np.uint16)
  buf = np.empty(min(_CHUNK, bits.size), np.uint16)
  for i in range(0, bits.size, _CHUNK):
    part = buf[:min(_CHUNK, bits.size - i)]
    np.bitwise_and(bits[i:i + _CHUNK], mask, out=part)
    if part.max() == mask:
      return False
  return True


def _check_finite(x, filename, key):
  """Raises CheckpointError when the float array x holds a NaN or an infinity."""
  if not (np.issubdtype(x.dtype, np.floating) or x.dtype in _EXPONENT_MASKS):
    return
  if not _all_finite(x):
    bad = int(x.size - np.count_nonzero(np.isfinite(x.astype(np.float32))))
    raise CheckpointError(f"{filename}: tensor {key} holds {bad} non-finite values (NaN or inf) "
                          f"in a {x.dtype}{list(x.shape)} slice")


def load_params(path, abstract_params, keys=None):
  """Reads a checkpoint directory into `abstract_params`' dtypes and shardings.

  Every header, the index and the key/shape coverage are checked before any tensor data is read.
  Tensors are then memory-mapped and placed shard by shard with `jax.make_array_from_callback`
  (no second host copy); each shard is checked for NaN/inf as it is read.

  Args:
    path: checkpoint directory.
    abstract_params: flat `{model key: jax.ShapeDtypeStruct}`, each with its `.sharding`.
    keys: the keys to read (default: all); coverage and shapes are checked for every key anyway.

  Returns:
    `{model key: jax.Array}` for `keys`, on the given shardings.

  Raises:
    CheckpointError (a ValueError) for a corrupt or truncated file, an index naming a missing file
    or a non-finite tensor, naming the file and key; KeyError listing every missing, unexpected and
    mis-shaped key.
  """
  keys = list(abstract_params) if keys is None else list(keys)
  wanted = set(keys)
  abs_flat = abstract_params
  headers = check_checkpoint(path)
  found, unexpected, bad_shape, bad_keys = {}, [], [], set()
  for filename, (header, _) in headers:
    for ckpt_key, info in header.items():
      key = apply_aliases(ckpt_key)
      if key not in abs_flat:
        unexpected.append(ckpt_key)
        continue
      target = abs_flat[key]
      if tuple(info["shape"]) != tuple(target.shape):
        bad_shape.append(f"{ckpt_key}: checkpoint {tuple(info['shape'])} != model "
                         f"{tuple(target.shape)}")
        bad_keys.add(key)
        continue
      if key in found:
        unexpected.append(f"{ckpt_key} (again in {os.path.basename(filename)})")
        continue
      found[key] = filename
  missing = sorted(set(abs_flat) - set(found) - bad_keys)
  if missing or unexpected or bad_shape:
    raise KeyError(f"checkpoint {path} does not match the model:\n"
                   f"missing ({len(missing)}): {missing}\n"
                   f"unexpected ({len(unexpected)}): {sorted(unexpected)}\n"
                   f"wrong shape ({len(bad_shape)}): {bad_shape}")
  loaded = {}
  for filename, header in headers:
    for ckpt_key, arr in read_safetensors(filename, header):
      key = apply_aliases(ckpt_key)
      if found.get(key) != filename or key not in wanted:
        continue
      target = abs_flat[key]
      checked = set()

      def shard(index, arr=arr, dtype=target.dtype, where=(filename, ckpt_key), checked=checked):
        x = np.asarray(arr[index]).astype(dtype)
        tag = repr(index)  # replicated shards ask for the same slice once per device
        if tag not in checked:
          _check_finite(x, *where)
          checked.add(tag)
        return x

      loaded[key] = jax.make_array_from_callback(target.shape, target.sharding, shard)
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


def _write_file(filename, tensors, dtype=None):
  """One safetensors file; `tensors` is [(key, array)], each cast to `dtype` (if given) as written."""
  header, offset = {}, 0
  for key, arr in tensors:
    dt = np.dtype(dtype or arr.dtype)
    nbytes = int(np.prod(arr.shape)) * dt.itemsize
    header[key] = {"dtype": _NAMES[dt], "shape": list(arr.shape),
                   "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # 8-byte alignment of the data section
  with open(filename, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, arr in tensors:  # one tensor on the host at a time
      host = np.asarray(jax.device_get(arr))
      f.write(np.ascontiguousarray(host.astype(dtype or host.dtype, copy=False)).tobytes())


def write_safetensors(filename, tensors):
  """Writes [(key, array)] as one safetensors file, keys as given (e.g. a peft adapter file)."""
  _write_file(filename, list(tensors))


def _stale_files(path):
  return [n for n in os.listdir(path) if n == "model.safetensors.index.json"
          or re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", n)]


def save_params(params, path, *, max_shard_bytes=4 << 30, dtype=None):
  """Writes params in the published key layout; shards with an index above max_shard_bytes.

  Args:
    params: flat `{model key: array}`.
    path: existing directory; a previous checkpoint there (model*.safetensors and its index) is
      replaced.
    max_shard_bytes: largest file size; a bigger single tensor gets a file of its own.
    dtype: cast every tensor to this dtype while writing (e.g. bfloat16); None keeps each dtype.
  """
  items = sorted((_save_key(k), v) for k, v in params.items())
  nbytes_of = lambda arr: arr.size * np.dtype(dtype or arr.dtype).itemsize  # noqa: E731
  groups, size = [[]], 0
  for key, arr in items:
    nbytes = nbytes_of(arr)
    if groups[-1] and size + nbytes > max_shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append((key, arr))
    size += nbytes
  for name in _stale_files(path):
    os.remove(os.path.join(path, name))
  if len(groups) == 1:
    _write_file(os.path.join(path, "model.safetensors"), groups[0], dtype)
    return
  weight_map, total = {}, 0
  for i, group in enumerate(groups):
    name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    _write_file(os.path.join(path, name), group, dtype)
    for key, arr in group:
      weight_map[key] = name
      total += nbytes_of(arr)
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

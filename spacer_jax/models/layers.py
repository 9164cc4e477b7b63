"""Small building blocks shared by the vision tower and the text decoder.

Linear, RMSNorm and Embedding keep Hugging Face's parameter names and layouts (`weight[out, in]`,
`bias[out]`) so that checkpoint import/export is an identity (docs/qwen2_5_vl.md, "Weight names").
Every parameter carries logical sharding axis names in its `out_sharding` metadata (flax 0.12 NNX),
which `nnx.get_partition_spec` / `nnx.get_named_sharding` resolve under `nnx.logical_axis_rules`.

Linear also carries the optional LoRA adapters (`add_lora`, `lora_dropout`); which layers get them
and everything around them (configuration, merging, peft files) is spacer_jax/lora.py.

Also here: split-half rotary helpers and `attention`, the single wrapper around
`jax.nn.dot_product_attention` used by both towers, and `constrain`, the activation sharding hook.

Axis legend: B batch, T query length, S key/value length, N query heads, K kv heads, H head dim,
W windows (vision), M window length (vision).
"""

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as core_spmd

from spacer_jax import sharding

_INIT_STD = 0.02  # transformers' initializer_range; only used for random (test/smoke) init.


class KeySeq:
  """Per-parameter init keys folded from one draw of an `nnx.Rngs`.

  Drawing from `nnx.Rngs` once per parameter updates its counter Variable, which under tracing
  (nnx.eval_shape, jit) costs time proportional to the graph traced so far in flax 0.12: building
  the abstract 72B model took about a minute. Folding a Python counter into one key is O(1).
  """

  def __init__(self, rngs):
    self.key = rngs.params()
    self.count = 0

  def params(self):
    self.count += 1
    return jax.random.fold_in(self.key, self.count)


def key_seq(rngs):
  return rngs if isinstance(rngs, KeySeq) else KeySeq(rngs)


def _normal(rngs, shape, dtype):
  return _INIT_STD * jax.random.normal(rngs.params(), shape, dtype)


def param(value, axes):
  """nnx.Param carrying logical axis names (`out_sharding` metadata).

  Eager sharding (flax >= 0.12) needs a mesh and rules that resolve every name, so it is only
  requested when both `jax.set_mesh` and `nnx.logical_axis_rules` are active; otherwise the names are
  plain metadata for `nnx.get_partition_spec`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  eager = (nnx.using_eager_sharding() and bool(core_spmd.get_logical_axis_rules())
           and mesh is not None and not mesh.empty)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=eager)


class Linear(nnx.Module):
  """`torch.nn.Linear` with HF layout: `weight[out, in]`, optional `bias[out]`.

  `axes` names the logical axes of `weight` as (out_axis, in_axis); the bias takes the out axis.

  With LoRA (`add_lora`) the layer computes `x W^T + b + scale * dropout(x) A^T B^T` with
  `lora_A.weight[r, in]` and `lora_B.weight[out, r]`, peft's names and layouts, so an adapter key is
  its peft key (`model.layers.0.self_attn.q_proj.lora_A.weight`) and import/export are identities.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool,
               axes: tuple[str | None, str | None], rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.dtype = dtype
    self.axes = tuple(axes)
    self.weight = param(_normal(rngs, (out_features, in_features), param_dtype), axes)
    self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[0],)) if use_bias else None
    # Data attributes (not static), so add_lora can put modules there later.
    self.lora_A, self.lora_B = nnx.data(None), nnx.data(None)
    self.lora_scale = 0.0
    self.lora_dropout = 0.0

  def add_lora(self, rank: int, *, scale: float, dropout: float, rngs, param_dtype=None):
    """Adds the adapters: A ~ U(+-1/sqrt(in)) (peft's kaiming_uniform(a=sqrt(5))), B = 0.

    A shares the layer's input axis and B its output axis, so the adapters are sharded with the
    layer; the rank axis is replicated.
    """
    out_features, in_features = self.weight.shape
    param_dtype = param_dtype or self.weight.dtype
    bound = 1.0 / math.sqrt(in_features)
    self.lora_A = Linear(in_features, rank, use_bias=False, axes=(None, self.axes[1]), rngs=rngs,
                         dtype=self.dtype, param_dtype=param_dtype)
    self.lora_A.weight.set_value(jax.random.uniform(
        key_seq(rngs).params(), (rank, in_features), param_dtype, -bound, bound))
    self.lora_B = Linear(rank, out_features, use_bias=False, axes=(self.axes[0], None), rngs=rngs,
                         dtype=self.dtype, param_dtype=param_dtype)
    self.lora_B.weight.set_value(jnp.zeros((out_features, rank), param_dtype))
    self.lora_scale = float(scale)
    self.lora_dropout = float(dropout)

  def __call__(self, x):
    x = x.astype(self.dtype)
    w = self.weight[...].astype(self.dtype)
    y = jnp.einsum("...i,oi->...o", x, w)  # [..., out]
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_A is not None:
      # peft's order: lora_B(lora_A(dropout(x))) * scale.
      h = self.lora_A(_dropout(x, self.lora_dropout))  # [..., r]
      y = y + self.lora_B(h) * jnp.asarray(self.lora_scale, self.dtype)
    return y


# The LoRA dropout key of the enclosing train step (None outside it: no dropout in sampling,
# evaluation or the log-prob passes). A context rather than module state, so the model keeps
# nothing but Params and crosses jit as a flat dict.
_DROPOUT_KEY = contextvars.ContextVar("lora_dropout_key", default=None)


@contextlib.contextmanager
def lora_dropout(key):
  """Turns LoRA dropout on for the model code traced inside, keyed by `key` (each adapter folds in
  its own call index, so the masks are independent and the same on every retrace)."""
  token = _DROPOUT_KEY.set([key, 0])
  try:
    yield
  finally:
    _DROPOUT_KEY.reset(token)


def _dropout(x, rate):
  state = _DROPOUT_KEY.get()
  if not rate or state is None:
    return x
  state[1] += 1
  keep = jax.random.bernoulli(jax.random.fold_in(state[0], state[1]), 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class RMSNorm(nnx.Module):
  """Mirrors transformers `Qwen2RMSNorm` / `Qwen2_5_VLRMSNorm` (transformers==5.24).

  Normalises in float32, casts back to the input dtype *before* the weight multiply
  (docs/qwen2_5_vl.md, "Numerics").
  """

  def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.weight = param(jnp.ones((dim,), param_dtype), ("norm",))

  def __call__(self, x):
    x = x.astype(self.dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(self.dtype) * y.astype(self.dtype)


class Embedding(nnx.Module):
  """`torch.nn.Embedding` with `weight[V, D]`; `attend` gives tied-head logits."""

  def __init__(self, num_embeddings: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.dtype = dtype
    self.weight = param(_normal(rngs, (num_embeddings, dim), param_dtype), ("vocab", "embed"))

  def __call__(self, ids):
    return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)  # [..., D]

  def attend(self, x):
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.weight[...].astype(self.dtype))


# ------------------------------------------------------------------------------------------------
# Rotary helpers (split halves, as HF `rotate_half`).


def rotate_half(x):
  h = x.shape[-1] // 2
  return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rotary(x, cos, sin):
  """x * cos + rotate_half(x) * sin; cos/sin broadcast against x (computed in x's dtype)."""
  return x * cos + rotate_half(x) * sin


def inv_freq(dim: int, theta: float):
  """float32[dim/2]: 1 / theta^(2k/dim), computed in float32 like HF."""
  exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / jnp.float32(dim)
  return 1.0 / (jnp.float32(theta) ** exponent)


# ------------------------------------------------------------------------------------------------
# Attention and activation sharding.


def attention(q, k, v, *, mask=None, kv_lengths=None, implementation=None):
  """Scaled dot-product attention, softmax in float32.

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0 (GQA handled natively).
    mask: optional bool, broadcastable to [B, N, T, S]; True = attend.
    kv_lengths: optional int32[B]; keys at s >= kv_lengths[b] are masked (cuDNN-friendly padding).
    implementation: passed to `jax.nn.dot_product_attention` (None, "xla" or "cudnn").

  Returns:
    [B, T, N, H] in q's dtype.
  """
  scale = q.shape[-1] ** -0.5
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                      key_value_seq_lengths=kv_lengths,
                                      implementation=implementation)


def _large_negative(dtype):
  # Same masking constant as jax.nn.dot_product_attention's XLA path.
  return jnp.asarray(-0.7 * jnp.finfo(dtype).max, dtype)


def shared_prefix_decode_attention(q, prefix_k, prefix_v, prefix_mask, suffix_k, suffix_v,
                                   suffix_len):
  """Attention of one new token per row over a prompt cache shared by groups of rows.

  GRPO samples G completions of the same prompt: the G rows of a prompt attend to one copy of its
  keys/values (the prefix, never repeated) plus their own generated keys/values (the suffix). The
  softmax runs jointly over both parts in float32, so the result is the attention over the
  concatenated sequence. The G rows of a prompt meet the prefix in one batched matmul with G*Q
  query rows, instead of G matvecs over G copies of the cache.

  Layouts put the batch axes first and contract K over its second-minor axis, the forms XLA's CPU
  dot emitter takes without transposing the cache on every step (tests/test_sampling.py checks the
  compiled decode loop for cache copies).

  Args:
    q: [R, N, H], R = B*G rows, row r belongs to prompt r // G.
    prefix_k: [B, K, H, T]; prefix_v: [B, K, T, H]; prefix_mask: bool[B, T] (True = valid key).
    suffix_k: [R*K, H, S]; suffix_v: [R*K, S, H] (row-major: entry r*K + k); slots
      s < suffix_len are valid.
    suffix_len: int32 scalar.

  Returns:
    [R, N, H] in q's dtype.
  """
  r, n, h = q.shape
  b, kh, _, _ = prefix_k.shape
  g, qg, s = r // b, n // kh, suffix_k.shape[-1]
  x = r * kh
  f32 = jnp.float32
  scale = jnp.asarray(h ** -0.5, f32)
  neg = _large_negative(f32)

  def to_prefix(x):  # [R, K, Q, ...] -> [B, K, G*Q, ...]
    x = x.reshape((b, g, kh, qg) + x.shape[3:])
    return jnp.swapaxes(x, 1, 2).reshape((b, kh, g * qg) + x.shape[4:])

  def to_rows(x):  # [B, K, G*Q, ...] -> [R, K, Q, ...]
    x = x.reshape((b, kh, g, qg) + x.shape[3:])
    return jnp.swapaxes(x, 1, 2).reshape((r, kh, qg) + x.shape[4:])

  qs = q.reshape(r, kh, qg, h)  # [R, K, Q, H]
  sp = jnp.einsum("bkmh,bkht->bkmt", to_prefix(qs), prefix_k.astype(q.dtype),
                  preferred_element_type=f32) * scale  # [B, K, G*Q, T]
  sp = jnp.where(prefix_mask[:, None, None, :], sp, neg)
  ss = jnp.einsum("xqh,xhs->xqs", qs.reshape(x, qg, h), suffix_k.astype(q.dtype),
                  preferred_element_type=f32).reshape(r, kh, qg, s) * scale  # [R, K, Q, S]
  ss = jnp.where(jnp.arange(s) < suffix_len, ss, neg)
  m = jnp.maximum(to_rows(jnp.max(sp, axis=-1)), jnp.max(ss, axis=-1))  # [R, K, Q]
  ep = jnp.exp(sp - to_prefix(m)[..., None])
  es = jnp.exp(ss - m[..., None])
  denom = to_rows(jnp.sum(ep, axis=-1)) + jnp.sum(es, axis=-1)  # [R, K, Q]
  pp = (ep / to_prefix(denom)[..., None]).astype(prefix_v.dtype)
  ps = (es / denom[..., None]).astype(suffix_v.dtype)
  op = jnp.einsum("bkmt,bkth->bkmh", pp, prefix_v, preferred_element_type=f32)  # [B, K, G*Q, H]
  os_ = jnp.einsum("xqs,xsh->xqh", ps.reshape(x, qg, s), suffix_v,
                   preferred_element_type=f32).reshape(r, kh, qg, h)  # [R, K, Q, H]
  return (to_rows(op) + os_).reshape(r, n, h).astype(q.dtype)


def constrain(x, names):
  """Constrains activation `x` to the logical axes `names` (e.g. ("batch", "seq", "embed")).

  Resolved by `sharding.logical_to_spec` (the one logical-to-mesh resolver) with the rules of the
  enclosing `nnx.logical_axis_rules(...)` against the mesh set with `jax.set_mesh(...)`: a mesh axis
  shards at most one dim (under FSDP rules batch -> (data, fsdp) and embed -> fsdp, activations
  [batch, seq, embed] are split over rows and keep embed whole), and an axis that does not divide
  its dim is dropped there (then the next dim may take it). Without rules or without a mesh it is
  the identity, so the model runs unchanged on one device and in tests; the trainer and the
  planner trace under both.
  """
  rules = core_spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh is None or mesh.empty:
    return x
  return sharding.constrain(x, names, rules)

"""Text decoder: everything under the `model.*` checkpoint prefix (Qwen2 with M-RoPE).

Mirrors transformers `Qwen2_5_VLTextModel` and its layers (transformers==5.24): GQA attention with
q/k/v bias and no o_proj bias, SwiGLU MLP without bias, RMSNorm, and multimodal rotary (M-RoPE) whose
64 frequency pairs are split into contiguous sections taking their angle from the t, h and w
position streams (docs/qwen2_5_vl.md, "Text decoder and M-RoPE").

KV cache (`__call__`): a list (one entry per layer) of {"k", "v"} arrays [B, C, K, H]. New
keys/values are written at slots [cache_index, cache_index + T); cache_index is one scalar for the
whole batch because batches are left-padded.

Sampling cache (`decode_step`): the prompt's keys/values once per prompt (the prefix, from
`prefix_from_cache` after prefill: k [B, K, H, T], v [B, K, T, H]) and the generated tokens'
keys/values per row (the suffix, `init_suffix_cache`: k [R*K, H, N], v [R*K, N, H]); the G
samples of a prompt share its prefix (layers.shared_prefix_decode_attention).

Axis legend: B batch, T query length, S key/value length, D text hidden, N query heads,
K kv heads, H head dim, F MLP hidden, V vocab, C cache length.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from spacer_jax.models import layers


def init_cache(cfg, batch: int, length: int, dtype=jnp.bfloat16):
  """Zero KV cache: list over layers of {"k", "v"}: dtype[B, C, K, H]."""
  shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for _ in range(cfg.num_hidden_layers)]


def init_suffix_cache(cfg, rows: int, length: int, dtype=jnp.bfloat16):
  """Zero generated-token cache: list over layers of {"k": [R*K, H, N], "v": [R*K, N, H]}.

  Rows and kv heads share one leading axis (row-major, so row sharding carries over): with a
  separate row axis of size 1, XLA drops it from the attention dot with a bitcast, duplicates the
  cache update for the two readers (attention, loop carry) and copies the cache every step.
  """
  x, h = rows * cfg.num_key_value_heads, cfg.head_dim
  return [{"k": jnp.zeros((x, h, length), dtype), "v": jnp.zeros((x, length, h), dtype)}
          for _ in range(cfg.num_hidden_layers)]


def prefix_from_cache(cache):
  """A prompt-sized `__call__` cache ([B, T, K, H] per layer) in `decode_step`'s prefix layout."""
  return [{"k": jnp.transpose(c["k"], (0, 2, 3, 1)), "v": jnp.transpose(c["v"], (0, 2, 1, 3))}
          for c in cache]


def mrope_cos_sin(position_ids, *, head_dim: int, theta: float, mrope_section, dtype):
  """M-RoPE tables.

  Args:
    position_ids: int[3, B, T] (t, h, w streams).
  Returns:
    cos, sin: dtype[B, T, H]; computed in float32 then cast (HF casts to the activation dtype).
  """
  freq = layers.inv_freq(head_dim, theta)  # [H/2]
  angles = position_ids.astype(jnp.float32)[..., None] * freq  # [3, B, T, H/2]
  parts, start = [], 0
  for i, n in enumerate(mrope_section):
    parts.append(angles[i % 3, ..., start:start + n])
    start += n
  if start != head_dim // 2:
    raise ValueError(f"mrope_section {tuple(mrope_section)} sums to {start}, expected head_dim/2 = "
                     f"{head_dim // 2}")
  f = jnp.concatenate(parts, axis=-1)  # [B, T, H/2]
  emb = jnp.concatenate([f, f], axis=-1)  # [B, T, H]
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


class Attention(nnx.Module):
  """Mirrors transformers `Qwen2_5_VLAttention` (transformers==5.24)."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
    self.implementation = cfg.attn_implementation
    self.q_proj = layers.Linear(d, n * h, use_bias=True, axes=("heads", "embed"), **kw)
    self.k_proj = layers.Linear(d, k * h, use_bias=True, axes=("kv_heads", "embed"), **kw)
    self.v_proj = layers.Linear(d, k * h, use_bias=True, axes=("kv_heads", "embed"), **kw)
    self.o_proj = layers.Linear(n * h, d, use_bias=False, axes=("embed", "heads"), **kw)

  def _qkv(self, x, cos, sin):
    """x: [B, T, D]; cos/sin: [B, T, H] -> q [B, T, N, H], k and v [B, T, K, H] (rotary applied)."""
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)  # [B, T, N, H]
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, H]
    return layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin), v

  def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
    """x: [B, T, D]; cos/sin: [B, T, H]; mask: bool[B, 1, T, S]. Returns ([B, T, D], cache)."""
    b, t, _ = x.shape
    q, k, v = self._qkv(x, cos, sin)
    if cache is not None:
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)  # [B, C, K, H]
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)  # [B, C, K, H]
      cache = {"k": k, "v": v}
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    out = layers.attention(q, k, v, mask=mask, implementation=self.implementation)  # [B, T, N, H]
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache

  def decode(self, x, cos, sin, prefix, prefix_mask, suffix, step):
    """One new token per row. x: [R, 1, D]; cos/sin: [R, 1, H]; prefix/suffix: one layer's entries
    of `prefix_from_cache` / `init_suffix_cache`; prefix_mask: bool[B, T]; step: int32 suffix slot
    of this token. Returns ([R, 1, D], updated suffix)."""
    r = x.shape[0]
    q, k, v = self._qkv(x, cos, sin)  # [R, 1, N, H], [R, 1, K, H]
    k = jnp.transpose(k, (0, 2, 3, 1)).reshape(r * self.num_kv_heads, self.head_dim, 1)
    v = jnp.transpose(v, (0, 2, 1, 3)).reshape(r * self.num_kv_heads, 1, self.head_dim)
    sk = jax.lax.dynamic_update_slice(suffix["k"], k.astype(suffix["k"].dtype), (0, 0, step))
    sv = jax.lax.dynamic_update_slice(suffix["v"], v.astype(suffix["v"].dtype), (0, step, 0))
    out = layers.shared_prefix_decode_attention(q[:, 0], prefix["k"], prefix["v"], prefix_mask,
                                                sk, sv, step + 1)  # [R, N, H]
    return self.o_proj(out.reshape(r, 1, self.num_heads * self.head_dim)), {"k": sk, "v": sv}


class MLP(nnx.Module):
  """Mirrors transformers `Qwen2MLP` (transformers==5.24): down(silu(gate(x)) * up(x)), no bias."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate_proj = layers.Linear(d, f, use_bias=False, axes=("mlp", "embed"), **kw)
    self.up_proj = layers.Linear(d, f, use_bias=False, axes=("mlp", "embed"), **kw)
    self.down_proj = layers.Linear(f, d, use_bias=False, axes=("embed", "mlp"), **kw)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Mirrors transformers `Qwen2_5_VLDecoderLayer` (transformers==5.24), pre-norm."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.self_attn = Attention(cfg, rngs=rngs, **kw)
    self.mlp = MLP(cfg, rngs=rngs, **kw)
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)

  def _block(self, x, attend):
    """Pre-norm residual block; attend(normed x) -> (attention output, updated cache)."""
    with jax.named_scope("decoder_layer"):  # readable profiles
      h, cache = attend(self.input_layernorm(x))
      x = x + h
      x = x + self.mlp(self.post_attention_layernorm(x))
      return layers.constrain(x, ("batch", "seq", "embed")), cache

  def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
    return self._block(x, lambda h: self.self_attn(h, cos, sin, mask, cache, cache_index))

  def decode(self, x, cos, sin, prefix, prefix_mask, suffix, step):
    """`__call__` for one new token per row against a shared prefix (see Attention.decode)."""
    return self._block(x, lambda h: self.self_attn.decode(h, cos, sin, prefix, prefix_mask,
                                                          suffix, step))


def _layer_forward(layer, x, cos, sin, mask, cache, cache_index):
  return layer(x, cos, sin, mask, cache, cache_index)


_layer_forward_remat = nnx.remat(_layer_forward)


class Qwen2Model(nnx.Module):
  """Mirrors transformers `Qwen2_5_VLTextModel` (transformers==5.24): embed_tokens, layers, norm."""

  def __init__(self, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    rngs = layers.key_seq(rngs)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.dtype = dtype
    self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
    self.mrope_section = tuple(cfg.mrope_section)
    self.use_remat = cfg.use_remat
    self.scan_layers = cfg.scan_layers
    self.embed_tokens = layers.Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, **kw)
                            for _ in range(cfg.num_hidden_layers)])
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)

  def __call__(self, embeds, position_ids, kv_mask, cache=None, cache_index=None):
    """Decoder stack on input embeddings.

    Args:
      embeds: [B, T, D].
      position_ids: int32[3, B, T] M-RoPE positions.
      kv_mask: bool[B, S]; valid keys (S == T without cache, S == C with cache).
      cache: optional list of {"k", "v"}: [B, C, K, H]; cache_index: scalar int32 slot of token 0.

    Returns:
      (hidden [B, T, D] after the final norm, updated cache or None).
    """
    b, t, _ = embeds.shape
    s = kv_mask.shape[1]
    offset = 0 if cache is None else cache_index
    q_pos = offset + jnp.arange(t, dtype=jnp.int32)  # [T] slot of each query
    causal = jnp.arange(s, dtype=jnp.int32)[None, :] <= q_pos[:, None]  # [T, S]
    mask = (causal[None] & kv_mask[:, None, :].astype(bool))[:, None]  # [B, 1, T, S]
    cos, sin = mrope_cos_sin(position_ids, head_dim=self.head_dim, theta=self.rope_theta,
                             mrope_section=self.mrope_section, dtype=self.dtype)
    x = layers.constrain(embeds.astype(self.dtype), ("batch", "seq", "embed"))
    if self.scan_layers and cache is None:
      return self.norm(self._scan(x, cos, sin, mask)), None
    fwd = _layer_forward_remat if self.use_remat else _layer_forward
    new_cache = None if cache is None else []
    for i, layer in enumerate(self.layers):
      x, c = fwd(layer, x, cos, sin, mask, None if cache is None else cache[i], cache_index)
      if cache is not None:
        new_cache.append(c)
    return self.norm(x), new_cache

  def _scan(self, x, cos, sin, mask):
    """The layers as one lax.scan over their weights stacked inside the traced function.

    XLA compiles one layer instead of num_hidden_layers (the 7B train step's compile time and
    host memory drop several-fold) while the parameters stay per layer under their checkpoint
    names. The stack is taken in the compute dtype, the dtype every weight is cast to before use,
    so the arithmetic is the unrolled loop's; it costs one copy of the decoder weights in that dtype
    while the forward and backward run.
    """
    graphdef, _ = nnx.split(self.layers[0])
    states = [nnx.split(layer)[1] for layer in self.layers]
    stacked = jax.tree.map(lambda *w: jnp.stack([v.astype(self.dtype) for v in w]), *states)

    def body(h, state):
      return nnx.merge(graphdef, state)(h, cos, sin, mask)[0], None

    if self.use_remat:
      body = jax.checkpoint(body, prevent_cse=False)  # what nnx.remat does per unrolled layer
    return jax.lax.scan(body, x, stacked)[0]

  def decode_step(self, embeds, position_ids, prefix, prefix_mask, suffix, step):
    """One sampling step: each of the R = B*G rows feeds one token.

    Args:
      embeds: [R, 1, D]; position_ids: int32[3, R, 1].
      prefix: `prefix_from_cache` of the prompt cache (B prompts); prefix_mask: bool[B, T].
      suffix: `init_suffix_cache` (R rows, N slots); step: int32 scalar slot written by this token
        (slots < step hold the earlier generated tokens).

    Returns:
      (hidden [R, 1, D] after the final norm, updated suffix).
    """
    cos, sin = mrope_cos_sin(position_ids, head_dim=self.head_dim, theta=self.rope_theta,
                             mrope_section=self.mrope_section, dtype=self.dtype)
    x = layers.constrain(embeds.astype(self.dtype), ("batch", "seq", "embed"))
    new_suffix = []
    for i, layer in enumerate(self.layers):
      x, c = layer.decode(x, cos, sin, prefix[i], prefix_mask, suffix[i], step)
      new_suffix.append(c)
    return self.norm(x), new_suffix

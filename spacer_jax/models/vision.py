"""Vision tower: everything under the `visual.*` checkpoint prefix.

Mirrors transformers `Qwen2_5_VisionTransformerPretrainedModel` (transformers==5.24): Conv3d patch
embedding done as one einsum on the processor's flattened patches, 2-D rotary (h, w), windowed
attention with full attention at `fullatt_block_indexes`, and the 2x2 PatchMerger.

Attention never crosses a window (window blocks) or a temporal patch (full blocks), so instead of a
[P, P] block-diagonal mask the sequence is gathered into padded segments [W, M, ...] with index arrays
computed on the host (positions.segment_gather); the cost is W * M^2, not P^2. All index arrays come
in the `vis` dict built by `qwen2_5_vl.prepare_vision_inputs`.

Patch groups: on a mesh the sampler splits a batch's patches into n groups, one per device along
the batch axes, each holding whole frames (neither a window nor a full-attention segment ever
reaches across a frame, so no group needs another's patches). The index arrays then carry a
leading group axis [n, ...] and the tower runs as n independent sequences: activations [n, P/n, E]
are split over the batch axes with the hidden dim whole, the weights are all-gathered per block
like the decoder's, and no block exchanges activations. Only the final reorder into processor
order moves features between devices. Without groups (no mesh, or several processes) the same
code runs with a group axis of 1: every patch on every device, the hidden dim split over fsdp.

Axis legend: G patch groups, P patches, Q merged tokens (P / 4), E vision hidden, N heads,
H head dim, F vision MLP hidden, W segments (windows or frames), M segment length, D text hidden.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from spacer_jax.models import layers

_EPS = 1e-6  # hard-coded in HF for every vision norm (not rms_norm_eps)


class _Conv3dWeight(nnx.Module):
  """Holds the Conv3d kernel under its HF name (`proj.weight`, [E, C, 2, 14, 14])."""

  def __init__(self, shape, *, rngs, param_dtype):
    self.weight = layers.param(0.02 * jax.random.normal(rngs.params(), shape, param_dtype),
                               ("vision_embed", None, None, None, None))


class PatchEmbed(nnx.Module):
  """Mirrors transformers `Qwen2_5_VisionPatchEmbed`: Conv3d(kernel == stride, no bias) as a matmul."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    e = cfg.vision_hidden_size
    shape = (e, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    self.dtype = dtype
    self.proj = _Conv3dWeight(shape, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, pixel_values):
    w = self.proj.weight[...].astype(self.dtype)
    w = w.reshape(w.shape[0], -1)  # [E, C*2*14*14]
    return jnp.einsum("...k,ek->...e", pixel_values.astype(self.dtype), w)  # [.., P, E]


class VisionAttention(nnx.Module):
  """Mirrors transformers `Qwen2_5_VLVisionAttention`, batched over padded segments."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    e = cfg.vision_hidden_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.num_heads = cfg.vision_num_heads
    self.head_dim = e // cfg.vision_num_heads
    self.implementation = cfg.attn_implementation
    # The fused qkv is never TP-split, so its out axis has no logical name.
    self.qkv = layers.Linear(e, 3 * e, use_bias=True, axes=(None, "vision_embed"), **kw)
    self.proj = layers.Linear(e, e, use_bias=True, axes=("vision_embed", None), **kw)

  def __call__(self, x, cos, sin, gather, lengths, scatter):
    """x: [G, P, E]; cos/sin: float32[G, P, H]; gather int32[G, W, M]; lengths int32[G, W];
    scatter int32[G, P]. Every group attends within itself (the indices are group-local). Without
    the group axis on all six (x [P, E], ...) one group."""
    if x.ndim == 2:
      args = (x, cos, sin, gather, lengths, scatter)
      return self(*(a[None] for a in args))[0]
    g, p, e = x.shape
    n, h = self.num_heads, self.head_dim
    qkv = self.qkv(x).reshape(g, p, 3, n, h)  # [G, P, 3, N, H]
    cos, sin = cos[..., None, :], sin[..., None, :]  # [G, P, 1, H]
    # HF rotates q and k in float32 and casts back (docs/qwen2_5_vl.md, "Vision tower").
    q = layers.apply_rotary(qkv[:, :, 0].astype(jnp.float32), cos, sin).astype(x.dtype)
    k = layers.apply_rotary(qkv[:, :, 1].astype(jnp.float32), cos, sin).astype(x.dtype)
    v = qkv[:, :, 2]  # q, k, v: [G, P, N, H]
    w, m = gather.shape[1:]
    take = jax.vmap(lambda a, idx: a[idx])  # a per-group gather: stays on the group's device
    q, k, v = take(q, gather), take(k, gather), take(v, gather)  # [G, W, M, N, H]
    out = layers.attention(*(a.reshape(g * w, m, n, h) for a in (q, k, v)),
                           kv_lengths=lengths.reshape(g * w), implementation=self.implementation)
    out = take(out.reshape(g, w * m, n * h), scatter)  # [G, P, E]
    return self.proj(out)


class VisionMLP(nnx.Module):
  """Mirrors transformers `Qwen2_5_VLMLP` (bias=True): down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    e, f = cfg.vision_hidden_size, cfg.vision_intermediate_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate_proj = layers.Linear(e, f, use_bias=True, axes=("vision_mlp", "vision_embed"), **kw)
    self.up_proj = layers.Linear(e, f, use_bias=True, axes=("vision_mlp", "vision_embed"), **kw)
    self.down_proj = layers.Linear(f, e, use_bias=True, axes=("vision_embed", "vision_mlp"), **kw)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
  """Mirrors transformers `Qwen2_5_VLVisionBlock` (transformers==5.24)."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = layers.RMSNorm(cfg.vision_hidden_size, eps=_EPS, **kw)
    self.norm2 = layers.RMSNorm(cfg.vision_hidden_size, eps=_EPS, **kw)
    self.attn = VisionAttention(cfg, rngs=rngs, **kw)
    self.mlp = VisionMLP(cfg, rngs=rngs, **kw)

  def __call__(self, x, cos, sin, gather, lengths, scatter):
    with jax.named_scope("vision_block"):  # readable profiles
      x = x + self.attn(self.norm1(x), cos, sin, gather, lengths, scatter)
      x = x + self.mlp(self.norm2(x))
      return layers.constrain(x, _activation_axes(x))


class PatchMerger(nnx.Module):
  """Mirrors transformers `Qwen2_5_VLPatchMerger`: ln_q, 2x2 concat, Linear, exact GELU, Linear.

  HF's `mlp.0` / `mlp.2` (an nn.Sequential) are `fc1` / `fc2` here (hf_weights.KEY_ALIASES).
  """

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    e = cfg.vision_hidden_size
    c = e * cfg.spatial_merge_size ** 2
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.merge_dim = c
    self.ln_q = layers.RMSNorm(e, eps=_EPS, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = layers.Linear(c, c, use_bias=True, axes=("vision_mlp", "vision_embed"), **kw)
    self.fc2 = layers.Linear(c, cfg.out_hidden_size, use_bias=True, axes=("embed", "vision_mlp"),
                             **kw)

  def __call__(self, x):
    x = self.ln_q(x)
    x = x.reshape(*x.shape[:-2], -1, self.merge_dim)  # [.., Q, 4E]
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # [.., Q, D]


def vision_cos_sin(rot_pos, head_dim: int, theta: float):
  """float32[.., P, H] cos/sin of the 2-D rotary from (h, w) ids int[.., P, 2]
  (docs/qwen2_5_vl.md, "Vision tower")."""
  freq = layers.inv_freq(head_dim // 2, theta)  # [H/4]
  ang = rot_pos.astype(jnp.float32)[..., None] * freq  # [.., P, 2, H/4]
  ang = ang.reshape(*ang.shape[:-2], -1)  # [.., P, H/2]: h angles then w angles
  emb = jnp.concatenate([ang, ang], axis=-1)  # [.., P, H]
  return jnp.cos(emb), jnp.sin(emb)


def _activation_axes(x):
  """Logical axes of a vision activation [G, P, E] (or [P, E]): with several groups the groups
  take the batch axes and the hidden dim stays whole (each device runs its own patches); one group
  keeps every patch on every device and splits the hidden dim over fsdp instead."""
  if x.ndim == 2:  # [P, E]: a block called without the group axis
    return (None, "vision_embed")
  return ("batch", None, None) if x.shape[0] > 1 else (None, None, "vision_embed")


def _block_forward(block, x, cos, sin, gather, lengths, scatter):
  return block(x, cos, sin, gather, lengths, scatter)


_block_forward_remat = nnx.remat(_block_forward)


class VisionTransformer(nnx.Module):
  """Mirrors transformers `Qwen2_5_VisionTransformerPretrainedModel` (transformers==5.24)."""

  def __init__(self, cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    rngs = layers.key_seq(rngs)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.dtype = dtype
    self.head_dim = cfg.vision_hidden_size // cfg.vision_num_heads
    self.rope_theta = cfg.vision_rope_theta
    self.merge_unit = cfg.spatial_merge_size ** 2
    self.fullatt_block_indexes = tuple(cfg.fullatt_block_indexes)
    self.use_remat = cfg.use_remat
    self.patch_embed = PatchEmbed(cfg, **kw)
    self.blocks = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.vision_depth)])
    self.merger = PatchMerger(cfg, **kw)

  def __call__(self, pixel_values, vis):
    """Vision features.

    Args:
      pixel_values: float[P, C*2*14*14]: in processor order (P may include budget padding rows),
        or with patch groups in the grouped layout (qwen2_5_vl.group_pixels: group g's frames at
        rows [g * P / G, ...), zero rows after them).
      vis: dict from `qwen2_5_vl.prepare_vision_inputs` (flat, or with a leading group axis).

    Returns:
      [Q, D] merged features in processor order; rows past the real count are padding.
    """
    vis = dict(vis)
    reverse = vis.pop("reverse_index")
    if vis["window_index"].ndim == 1:  # no groups: the same code with a group axis of 1
      vis = {k: v[None] for k, v in vis.items()}
    g, q = vis["window_index"].shape
    if g > 1:  # each group's pixels and index arrays on its own device
      pix = pixel_values.reshape(g, q * self.merge_unit, pixel_values.shape[-1])
      pix = layers.constrain(pix, ("batch", None, None))
      vis = {k: layers.constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in vis.items()}
      x = self.patch_embed(pix)  # [G, P, E]
    else:
      x = self.patch_embed(pixel_values)[None]
    e = x.shape[-1]
    # Merged rows in window order: a gather inside each group's rows.
    x = jax.vmap(lambda a, idx: a[idx])(x.reshape(g, q, self.merge_unit * e), vis["window_index"])
    x = layers.constrain(x.reshape(g, q * self.merge_unit, e), _activation_axes(x))
    cos, sin = vision_cos_sin(vis["rot_pos"], self.head_dim, self.rope_theta)  # window order
    fwd = _block_forward_remat if self.use_remat else _block_forward
    for i, block in enumerate(self.blocks):
      seg = "full" if i in self.fullatt_block_indexes else "win"
      x = fwd(block, x, cos, sin, vis[f"{seg}_gather"], vis[f"{seg}_lengths"],
              vis[f"{seg}_scatter"])
    y = self.merger(x)  # [G, Q, D], window order
    return y.reshape(g * q, -1)[reverse]  # processor order

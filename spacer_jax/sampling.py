"""Autoregressive sampling for Qwen2.5-VL with a pre-allocated, prompt-shared KV cache.

Two jitted functions over pytrees, both module-level and compiled once per
(batch, prompt bucket, max_new_tokens, vision budget, SamplingConfig):

  prefill(params, batch) -> SamplingState
      Runs the vision tower and the text prefill ONCE per prompt and keeps the prompt's k/v once per
      prompt (the prefix); last logits and positions are repeated G times (row b*G + g; the same
      order as transformers' num_return_sequences) and each row gets an empty cache of
      max_new_tokens slots for its own tokens (the suffix). GRPO samples 8 completions per video
      prompt, so the vision tower and the ~1000-token prefill are paid once, not 8 times, and every
      decode step reads the prompt's k/v once for all G rows instead of G copies of it.
  decode(params, state, until) -> SamplingState   (state donated)
      A lax.while_loop that samples one token per row per iteration and feeds it back through the
      cache; it stops when every row has emitted a stop id, when `until` steps are done, or at
      max_new_tokens. `until` is a traced scalar, so streaming in chunks reuses the same executable.

Positions (docs/qwen2_5_vl.md, "Position ids"): the prompt gets the 3-D M-RoPE ids of
`positions.get_rope_index`; generated token k of row b gets `base[:, b] + k` on all three streams,
where `base` is `n_valid + rope_deltas` under the Qwen rule and "last prompt id + 1" per stream
under the transformers-5 rule (what 5.x `generate` does; both agree when the prompt ends with text
holding the largest id, i.e. always with the chat template).

Log-probs are those of the policy at temperature 1 (log_softmax of the raw logits, no top-k/top-p or
placeholder masking), which is what GRPO's ratio and KL need and what the trainer's full forward
computes. Tokens after a row's stop id are the pad id with log-prob 0; `lengths` counts the tokens up
to and including the stop id.

Host code (numpy) lives in `Sampler` / `generate`: bucketing, rope indices, vision index arrays.

Axis legend: B prompts, G samples per prompt, R = B*G rows, T prompt length (bucket),
N max_new_tokens, K kv heads, H head dim, V vocab, P vision patches.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spacer_jax import distributed
from spacer_jax.models import positions as positions_lib
from spacer_jax.models import qwen2_5_vl
from spacer_jax.models import text as text_lib


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling settings (hashable: part of the jit cache key).

  temperature 0 means greedy. top_k 0 and top_p 1.0 disable the filters. SpaceR's GRPO rollouts use
  temperature 1.0, top_p 0.95, top_k 50 (transformers' implicit top_k default).
  repetition_penalty p != 1 is transformers' RepetitionPenaltyLogitsProcessor, applied first: the
  logit of every token already in the row (prompt or completion) is divided by p if positive and
  multiplied by p if not (SpaceR-Eval decodes greedily with p = 1.05). Unlike
  transformers, left padding does not count as "already in the row".
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  stop_ids: tuple[int, ...] = ()
  forbidden_ids: tuple[int, ...] = ()
  pad_id: int = 0


@flax.struct.dataclass
class SamplingState:
  """Everything the decode loop carries. Leading axis R = B*G on all per-row arrays."""
  tokens: jax.Array      # int32[R, N] completion tokens (pad after the stop id)
  logprobs: jax.Array    # float32[R, N] log pi(token) at temperature 1 (0 after the stop id)
  lengths: jax.Array     # int32[R] tokens emitted up to and including the stop id
  done: jax.Array        # bool[R]
  logits: jax.Array      # float32[R, V] logits for the next token
  prefix: Any            # prompt k/v once per prompt (text.prefix_from_cache): k [B, K, H, T]
  prefix_mask: jax.Array  # bool[B, T] valid prompt keys (left padding is False)
  suffix: Any            # generated k/v per row (text.init_suffix_cache): k [R*K, H, N]
  base_pos: jax.Array    # int32[3, R] M-RoPE id of generated token 0
  step: jax.Array        # int32[] tokens generated so far (= suffix slot of the next token)
  rng: jax.Array         # PRNG key
  seen: jax.Array        # bool[R, V] tokens in the row so far (repetition penalty), else bool[R, 0]


@flax.struct.dataclass
class SampleOutput:
  tokens: jax.Array    # int32[R, N]
  logprobs: jax.Array  # float32[R, N]
  lengths: jax.Array   # int32[R]


def default_stop_ids(cfg) -> tuple[int, ...]:
  """The config's eos id(s) plus the pad id: Qwen's pad <|endoftext|> also ends a sequence."""
  eos = cfg.eos_token_id
  ids = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
  if cfg.pad_token_id is not None:
    ids.append(cfg.pad_token_id)
  return tuple(sorted(set(int(i) for i in ids)))


def vision_placeholder_ids(cfg) -> tuple[int, ...]:
  """<|image_pad|>, <|video_pad|> and <|vision_pad|>: never sampled (they would break the feature count
  of any prompt that reuses the completion text)."""
  ids = [cfg.image_token_id, cfg.video_token_id, getattr(cfg, "vision_token_id", None)]
  # Ids outside the vocabulary cannot be sampled anyway (e.g. Qwen's default ids on a tiny vocab).
  return tuple(sorted(set(int(i) for i in ids if i is not None and 0 <= int(i) < cfg.vocab_size)))


def make_config(cfg, *, temperature=0.0, top_k=0, top_p=1.0, stop_ids=None, extra_stop_ids=(),
                pad_id=None, extra_forbidden_ids=(), repetition_penalty=1.0) -> SamplingConfig:
  """SamplingConfig from a model config. `stop_ids=None` means `default_stop_ids(cfg)`; `()` disables
  stopping (all max_new_tokens are generated). `extra_forbidden_ids` adds never-sampled ids to the
  vision placeholders (e.g. <|vision_pad|> from the tokenizer when the config does not carry it)."""
  stops = default_stop_ids(cfg) if stop_ids is None else tuple(int(i) for i in stop_ids)
  stops = tuple(sorted(set(stops) | set(int(i) for i in extra_stop_ids)))
  if pad_id is None:
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (stops[0] if stops else 0)
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if not repetition_penalty > 0:
    raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
  return SamplingConfig(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                        repetition_penalty=float(repetition_penalty),
                        stop_ids=stops, pad_id=int(pad_id),
                        forbidden_ids=tuple(sorted(set(vision_placeholder_ids(cfg))
                                                   | set(int(i) for i in extra_forbidden_ids))))


# ------------------------------------------------------------------------------------------------
# Token selection (device).


def _filter_top_p(sorted_logits, top_p):
  """Masks a descending-sorted [R, K] logit array to the smallest prefix whose mass reaches top_p.

  Same set as transformers' TopPLogitsWarper: a token is kept iff the mass strictly before it is
  < top_p, so the top token always survives.
  """
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  return jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)


def select_tokens(logits, key, scfg: SamplingConfig, seen=None):
  """Picks one token per row.

  Args:
    logits: float32[R, V] raw logits.
    key: PRNG key (unused for greedy).
    scfg: static settings.
    seen: bool[R, V] tokens already in each row; required when scfg.repetition_penalty != 1.

  Returns:
    (int32[R] tokens, float32[R] log pi(token) at temperature 1 from the raw logits).
  """
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  x = logits
  if scfg.repetition_penalty != 1.0:
    p = jnp.float32(scfg.repetition_penalty)
    x = jnp.where(seen, jnp.where(x > 0, x / p, x * p), x)
  if scfg.forbidden_ids:
    x = x.at[:, jnp.asarray(scfg.forbidden_ids)].set(-jnp.inf)
  if scfg.temperature == 0.0:
    tok = jnp.argmax(x, axis=-1)
  else:
    x = x / scfg.temperature
    if scfg.top_k > 0 and scfg.top_k < x.shape[-1]:
      # Sort only the top k (a full sort of a 152k vocab per step is the slow path).
      vals, idx = jax.lax.top_k(x, scfg.top_k)  # [R, k] descending
      if scfg.top_p < 1.0:
        vals = _filter_top_p(vals, scfg.top_p)
      choice = jax.random.categorical(key, vals, axis=-1)
      tok = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    elif scfg.top_p < 1.0:
      sorted_x = -jnp.sort(-x, axis=-1)
      kept = _filter_top_p(sorted_x, scfg.top_p)
      cutoff = jnp.min(jnp.where(jnp.isfinite(kept), kept, jnp.inf), axis=-1, keepdims=True)
      tok = jax.random.categorical(key, jnp.where(x >= cutoff, x, -jnp.inf), axis=-1)
    else:
      tok = jax.random.categorical(key, x, axis=-1)
  tok = tok.astype(jnp.int32)
  return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


# ------------------------------------------------------------------------------------------------
# Jitted prefill / decode (device).


def _constrain_rows(x, row_sharding, axis=0):
  if row_sharding is None:
    return x
  mesh, axes = row_sharding
  spec = [None] * x.ndim
  spec[axis] = axes
  return jax.lax.with_sharding_constraint(
      x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "max_new_tokens",
                                             "cache_dtype", "row_sharding", "prompt_sharding",
                                             "track_seen"))
def _prefill(params, batch, rng, *, graphdef, num_samples, max_new_tokens, cache_dtype,
             row_sharding, prompt_sharding, track_seen=False):
  """Vision + text prefill once per prompt -> a fresh SamplingState with B*G rows.

  The prompt's keys/values stay one copy per prompt (the prefix); only the last logits, positions
  and the empty generated-token cache (the suffix) are per row."""
  model = nnx.merge(graphdef, params)
  input_ids = batch["input_ids"]  # int32[B, T]
  b, t = input_ids.shape
  image_features = video_features = None
  if "pixel_values" in batch:
    image_features = model.get_vision_features(batch["pixel_values"], batch["image_vis"])
  if "pixel_values_videos" in batch:
    video_features = model.get_vision_features(batch["pixel_values_videos"], batch["video_vis"])
  embeds = model.embed(input_ids, image_features=image_features, video_features=video_features)
  prompt_mask = batch["attention_mask"].astype(bool)
  cache = text_lib.init_cache(model.config, b, t, cache_dtype)
  hidden, cache = model.forward_embeds(embeds, batch["position_ids"], prompt_mask, cache=cache,
                                       cache_index=jnp.int32(0))
  prefix = jax.tree.map(lambda x: _constrain_rows(x, prompt_sharding),
                        text_lib.prefix_from_cache(cache))
  # Left padding puts every row's last prompt token in column T-1.
  logits = model.logits(hidden[:, -1:])[:, 0].astype(jnp.float32)  # [B, V]

  g = num_samples
  rep = lambda x: _constrain_rows(jnp.repeat(x, g, axis=0), row_sharding)
  r = b * g
  rows = lambda x: _constrain_rows(x, row_sharding)
  if track_seen:  # prompt tokens (not the left padding) count as already generated
    seen = jnp.zeros((b, logits.shape[-1]), bool).at[jnp.arange(b)[:, None], input_ids].max(
        prompt_mask, mode="drop")
  else:
    seen = jnp.zeros((b, 0), bool)
  return SamplingState(
      tokens=rows(jnp.zeros((r, max_new_tokens), jnp.int32)),
      logprobs=rows(jnp.zeros((r, max_new_tokens), jnp.float32)),
      lengths=rows(jnp.zeros((r,), jnp.int32)),
      done=rows(jnp.zeros((r,), bool)),
      logits=rep(logits),
      prefix=prefix,
      prefix_mask=_constrain_rows(prompt_mask, prompt_sharding),
      suffix=jax.tree.map(rows, text_lib.init_suffix_cache(model.config, r, max_new_tokens,
                                                           cache_dtype)),
      base_pos=_constrain_rows(jnp.repeat(batch["base_pos"], g, axis=1), row_sharding, axis=1),
      step=jnp.int32(0),
      rng=rng,
      seen=rep(seen),
  )


@functools.partial(jax.jit, static_argnames=("graphdef", "scfg"), donate_argnames=("state",))
def _decode(params, state, until, *, graphdef, scfg):
  """Samples until every row is done or `until` (<= max_new_tokens) tokens exist."""
  max_new_tokens = state.tokens.shape[1]
  until = jnp.minimum(until, max_new_tokens)
  stop_ids = jnp.asarray(scfg.stop_ids, jnp.int32) if scfg.stop_ids else None

  def cond(s):
    return (s.step < until) & ~jnp.all(s.done)

  def body(s):
    model = nnx.merge(graphdef, params)
    tok, lp = select_tokens(s.logits, jax.random.fold_in(s.rng, s.step), scfg, s.seen)
    tok = jnp.where(s.done, scfg.pad_id, tok)
    lp = jnp.where(s.done, 0.0, lp)
    tokens = jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step))
    logprobs = jax.lax.dynamic_update_slice(s.logprobs, lp[:, None], (0, s.step))
    lengths = s.lengths + (~s.done).astype(jnp.int32)
    done = s.done
    if stop_ids is not None:
      done = done | jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    # Feed the new token. Done rows feed the pad id; their outputs are never read again.
    pos = (s.base_pos + s.step)[:, :, None]  # [3, R, 1]
    embeds = model.embed(tok[:, None])
    hidden, suffix = model.decode_step(embeds, pos, s.prefix, s.prefix_mask, s.suffix, s.step)
    logits = model.logits(hidden)[:, 0].astype(jnp.float32)
    seen = s.seen
    if scfg.repetition_penalty != 1.0:
      seen = seen.at[jnp.arange(seen.shape[0]), tok].set(True)
    return s.replace(tokens=tokens, logprobs=logprobs, lengths=lengths, done=done, logits=logits,
                     suffix=suffix, step=s.step + 1, seen=seen)

  return jax.lax.while_loop(cond, body, state)


# ------------------------------------------------------------------------------------------------
# Host side.


def _bucket(n):
  return 1 << max(int(n) - 1, 0).bit_length()


def auto_vision_budget(cfg, grid_thw, num_patches, num_groups=1):
  """Static pad-to sizes of `Sampler(vision_budget="auto")` for one batch's images or videos.

  Pixel rows stay at `num_patches` (already at the data pipeline's budget); window and frame counts
  and the longest frame are rounded up to powers of two. With patch groups (num_groups > 1) the
  pixel rows grow to G equal groups that hold whole frames (`qwen2_5_vl.grouped_num_patches`:
  the pipeline's rows, or one bucketed frame more per group when the frames do not pack into
  those), and the window and frame counts are the fullest group's.
  """
  g = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  frame_len = _bucket(int((g[:, 1] * g[:, 2]).max()))
  if num_groups > 1:
    num_patches = qwen2_5_vl.grouped_num_patches(cfg, g, num_patches, num_groups, slack=frame_len)
    windows, frames = qwen2_5_vl.vision_group_counts(cfg, g, num_patches, num_groups)
  else:
    _, cu_win = positions_lib.window_index(g, window_size=cfg.window_size,
                                           patch_size=cfg.patch_size,
                                           spatial_merge_size=cfg.spatial_merge_size)
    windows, frames = len(cu_win) - 1, int(g[:, 0].sum())
  return dict(num_patches=int(num_patches), num_windows=_bucket(windows),
              num_frames=_bucket(frames), frame_len=frame_len)


class BoundJit:
  """A module-level jitted function with its static keyword arguments bound: callable like the
  function, and `.trace(*args)` / `.lower(*args)` like a jitted function (one executable cache,
  shared with every other caller of the same function and static arguments)."""

  def __init__(self, jitted, **static):
    self.jitted, self.static = jitted, static

  def __call__(self, *args):
    return self.jitted(*args, **self.static)

  def trace(self, *args):
    return self.jitted.trace(*args, **self.static)

  def lower(self, *args):
    return self.jitted.lower(*args, **self.static)


def compile_counts():
  """{"prefill": n, "decode": n}: executables compiled so far by the jitted sampler functions."""
  return {"prefill": int(_prefill._cache_size()), "decode": int(_decode._cache_size())}  # pylint: disable=protected-access


def _left_pad(x, length, value):
  x = np.asarray(x)
  pad = length - x.shape[1]
  if pad <= 0:
    return x
  return np.concatenate([np.full((x.shape[0], pad), value, x.dtype), x], axis=1)


def _check_left_padded(mask):
  for b, row in enumerate(mask):
    n = int(row.sum())
    if n == 0:
      raise ValueError(f"attention_mask row {b} is empty: every prompt needs at least one token")
    if not row[len(row) - n:].all():
      raise ValueError(f"attention_mask row {b} is not left-padded (sampling writes new tokens at "
                       "the right end): pad prompts on the left")


class Sampler:
  """Reusable sampler: the jitted prefill/decode are module-level, so every Sampler (and every
  `generate` call) with the same model graph, shapes and settings shares one executable.

  Typical use (trainer rollout, evaluator):
    sampler = Sampler(model, temperature=1.0, top_k=50, top_p=0.95)
    out = sampler(input_ids, attention_mask, max_new_tokens=1024, num_samples=8, rng=key,
                  pixel_values_videos=pv, video_grid_thw=grid, second_per_grid_ts=sec)
  With new weights (after an optimizer step) pass `params=` (the nnx.State of the same graph).

  Args:
    model: a `qwen2_5_vl.Qwen2_5_VL`; it is split once here.
    temperature, top_k, top_p, stop_ids, extra_stop_ids, pad_id, extra_forbidden_ids,
      repetition_penalty: see `make_config` / `SamplingConfig`.
    prompt_bucket: prompts are left-padded to a multiple of this (1 = use the given length).
    cache_dtype: KV-cache dtype (default: the model's compute dtype; bf16 halves cache memory).
    mesh, batch_axes: when a mesh is given, rows are sharded over `batch_axes` (default data+fsdp)
      wherever the row count divides; params keep whatever sharding they already have.
    vision_budget: optional {"image"|"video": {num_patches, num_windows, num_frames, frame_len}}
      static budgets forwarded to `prepare_vision_inputs` (pixel rows are zero-padded to
      num_patches), so videos with different grids but the same budget do not recompile; or
      "auto": every batch's pixel rows as given (the data pipeline pads them to its budget) and its
      window, frame and frame-length counts rounded up to powers of two, so a run recompiles only
      when a batch reaches a new bucket (the trainer's setting). On a mesh the vision tower runs
      over patch groups (`vision_groups`): the pixel rows then grow to equal groups of whole frames
      and laid out group by group, and dict budgets' window and frame counts hold per group.
  """

  def __init__(self, model, *, temperature=0.0, top_k=0, top_p=1.0, stop_ids=None,
               extra_stop_ids=(), pad_id=None, extra_forbidden_ids=(), prompt_bucket=1,
               cache_dtype=None, mesh=None, batch_axes=("data", "fsdp"), vision_budget=None,
               repetition_penalty=1.0):
    self.cfg = model.config
    self.graphdef, self.params = nnx.split(model)
    self.scfg = make_config(self.cfg, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_ids=stop_ids, extra_stop_ids=extra_stop_ids, pad_id=pad_id,
                            extra_forbidden_ids=extra_forbidden_ids,
                            repetition_penalty=repetition_penalty)
    self.prompt_bucket = max(1, int(prompt_bucket))
    self.cache_dtype = jnp.dtype(cache_dtype if cache_dtype is not None
                                 else getattr(model, "dtype", jnp.float32))
    self.mesh = mesh
    self.batch_axes = tuple(a for a in batch_axes if mesh is not None and a in mesh.axis_names)
    self.vision_budget = vision_budget or {}
    if isinstance(self.vision_budget, str) and self.vision_budget != "auto":
      raise ValueError(f"vision_budget={vision_budget!r}: pass a dict of budgets or 'auto'")

  # -- host preparation ------------------------------------------------------------------------

  def _row_sharding(self, rows):
    if self.mesh is None or not self.batch_axes:
      return None
    n = int(np.prod([self.mesh.shape[a] for a in self.batch_axes]))
    return (self.mesh, self.batch_axes) if n > 1 and rows % n == 0 else None

  def prepare(self, input_ids, attention_mask, *, pixel_values=None, image_grid_thw=None,
              pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None):
    """Host-side numpy: bucketing, M-RoPE ids, decode base positions, vision index arrays.

    In a multi-process job every process passes its own prompts (the same number on each) and gets
    the global batch back: the processes' prompts in process order, left-padded to the longest
    process's length, exactly the batch one process holding all of them would prepare. Pixels stay
    process-local where they can (`_global_batch`).
    """
    cfg = self.cfg
    input_ids = np.asarray(input_ids).astype(np.int32)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
    mask = (np.ones_like(input_ids, bool) if attention_mask is None
            else np.asarray(attention_mask).astype(bool))
    if mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
    _check_left_padded(mask)
    t = -(-input_ids.shape[1] // self.prompt_bucket) * self.prompt_bucket
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else self.scfg.pad_id
    vision = {"image": (pixel_values, image_grid_thw, None),
              "video": (pixel_values_videos, video_grid_thw, second_per_grid_ts)}
    offsets = {}
    if jax.process_count() > 1:
      input_ids, mask, t, vision, offsets = self._global_batch(input_ids, mask, t, vision)
      pixel_values, image_grid_thw, _ = vision["image"]
      pixel_values_videos, video_grid_thw, second_per_grid_ts = vision["video"]
    input_ids = _left_pad(input_ids, t, pad)
    mask = _left_pad(mask, t, False)
    qwen2_5_vl.check_placeholder_counts(
        cfg, input_ids, image_grid_thw=image_grid_thw if pixel_values is not None else None,
        video_grid_thw=video_grid_thw if pixel_values_videos is not None else None,
        num_image_rows=None if pixel_values is None else np.shape(pixel_values)[0],
        num_video_rows=None if pixel_values_videos is None else np.shape(pixel_values_videos)[0],
        padded=self.vision_budget == "auto" or bool(offsets))
    pos, deltas = positions_lib.get_rope_index(
        input_ids, mask, image_grid_thw, video_grid_thw, second_per_grid_ts,
        spatial_merge_size=cfg.spatial_merge_size, tokens_per_second=cfg.tokens_per_second,
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id,
        text_after_vision=cfg.text_after_vision)
    pos = np.asarray(pos).astype(np.int32)
    deltas = np.asarray(deltas).reshape(-1).astype(np.int32)
    if cfg.text_after_vision == "hf5":
      base = pos[:, :, -1] + 1  # transformers 5.x generate: each stream's last id + 1
    else:
      base = np.broadcast_to(mask.sum(1).astype(np.int32) + deltas, (3, mask.shape[0])).copy()
    batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": pos,
             "base_pos": base.astype(np.int32)}
    for kind, pixels, grid in (("image", pixel_values, image_grid_thw),
                               ("video", pixel_values_videos, video_grid_thw)):
      if pixels is None:
        continue
      if grid is None:
        raise ValueError(f"{kind} pixels given without {kind}_grid_thw")
      if not isinstance(pixels, jax.Array):
        pixels = np.asarray(pixels, np.float32)
      groups = self.vision_groups()
      if self.vision_budget == "auto":
        budget = auto_vision_budget(cfg, grid, pixels.shape[0], num_groups=groups)
      else:
        budget = dict(self.vision_budget.get(kind, {}))
        if groups > 1:  # the given budgets hold per group; the rows grow to G equal groups
          budget["num_patches"] = qwen2_5_vl.grouped_num_patches(
              cfg, grid, max(budget.get("num_patches") or 0, pixels.shape[0]), groups,
              slack=budget.get("frame_len"))
      if budget.get("num_patches") is not None and pixels.shape[0] < budget["num_patches"]:
        # Static patch budget: pad rows so every grid within budget shares one executable; the
        # padded rows' features are never scattered (embed reads only as many as placeholders).
        pixels = np.concatenate(
            [pixels, np.zeros((budget["num_patches"] - pixels.shape[0], pixels.shape[1]),
                              np.float32)])
      if groups > 1:
        pixels = qwen2_5_vl.group_pixels(cfg, pixels, grid, groups)
      key = "pixel_values" if kind == "image" else "pixel_values_videos"
      batch[key] = pixels
      batch[f"{kind}_vis"] = qwen2_5_vl.prepare_vision_inputs(
          cfg, np.asarray(grid), offsets=offsets.get(kind),
          num_groups=groups if groups > 1 else None, **budget)
    return batch

  def vision_groups(self):
    """G, the number of patch groups the vision tower runs as: one per device along the batch
    axes, each holding whole frames and its own pixels (qwen2_5_vl.prepare_vision_inputs), so
    no vision block moves activations between devices. 1 without a mesh, and with several
    processes: their pixels arrive as per-process blocks (`_global_batch`), and groups would then
    have to take frames from another process's block; the tower then keeps every patch on every
    device and splits its hidden dim instead. 1 too when the model config turns
    `vision_patch_groups` off."""
    if (self.mesh is None or not self.batch_axes or jax.process_count() > 1
        or not self.cfg.vision_patch_groups):
      return 1
    return int(np.prod([self.mesh.shape[a] for a in self.batch_axes]))

  def batch_shardings(self, batch):
    """Shardings of a prepared batch (arrays or ShapeDtypeStructs), as `_put` places it: prompt
    rows over the batch axes where they divide, position rows along dim 1, pixel rows split where
    they divide (`_pixel_sharding`), the vision index arrays with a patch-group axis split over
    the batch axes like the pixels (each device holds its own group's), the others replicated.
    None on one process without a mesh or when the rows do not divide (the jitted functions place
    the batch)."""
    sharding = None if self.mesh is None else self._row_sharding(batch["input_ids"].shape[0])
    if sharding is None and jax.process_count() == 1:
      return None
    repl = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    rows = cols = repl
    if sharding is not None:
      mesh, axes = sharding
      rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))
      cols = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, axes))
    out = {}
    for k, v in batch.items():
      if k in ("input_ids", "attention_mask"):
        s = rows
      elif k in ("position_ids", "base_pos"):
        s = cols
      elif k in ("pixel_values", "pixel_values_videos"):
        s = self._pixel_sharding(np.shape(v)[0])
      elif k in ("image_vis", "video_vis"):
        grouped = qwen2_5_vl.grouped_vision_keys(v)
        out[k] = {name: self._pixel_sharding(np.shape(a)[0]) if name in grouped else repl
                  for name, a in v.items()}
        continue
      else:
        s = repl
      out[k] = jax.tree.map(lambda _, s=s: s, v)
    return out

  def _global_batch(self, input_ids, mask, t, vision):
    """Multi-process `prepare`: every process's prompts and grids gathered in process order.

    Pixels: when every process holding pixels of a kind holds the same number of rows (the data
    pipeline's static per-row budgets) and no pad-to budget has to be added, each process's block
    goes straight to its own devices (`distributed.put_rows`; a process without that kind sends
    zeros) and the grids get `offsets` into the block layout. Otherwise (the evaluator's ragged
    batches) the real pixel rows are gathered and packed as one process would hold them. Either
    way the vision tower sees the single-process activations.
    """
    if self.mesh is None:
      raise ValueError("a multi-process Sampler needs a mesh (Sampler(..., mesh=mesh))")
    dim = self.cfg.in_channels * self.cfg.temporal_patch_size * self.cfg.patch_size ** 2
    local = {"input_ids": input_ids, "mask": mask, "t": t, "vision": {}}
    for kind, (pixels, grid, seconds) in vision.items():
      if pixels is not None:
        local["vision"][kind] = dict(
            rows=int(np.shape(pixels)[0]), grid=np.asarray(grid, np.int64).reshape(-1, 3),
            seconds=None if seconds is None else np.asarray(seconds, np.float32).reshape(-1))
    everyone = distributed.allgather_objects(local)
    if len({p["input_ids"].shape[0] for p in everyone}) != 1:
      raise ValueError("every process must prepare the same number of prompts, got "
                       f"{[p['input_ids'].shape[0] for p in everyone]}")
    t = max(p["t"] for p in everyone)
    pad = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else self.scfg.pad_id
    input_ids = np.concatenate([_left_pad(p["input_ids"], t, pad) for p in everyone])
    mask = np.concatenate([_left_pad(p["mask"], t, False) for p in everyone])
    me = jax.process_index()
    out, offsets = {}, {}
    for kind, (pixels, _, _) in vision.items():
      parts = [p["vision"].get(kind) for p in everyone]
      if all(part is None for part in parts):
        out[kind] = (None, None, None)
        continue
      grids = [np.zeros((0, 3), np.int64) if part is None else part["grid"] for part in parts]
      grid = np.concatenate(grids)
      seconds = None
      if any(part is not None and part["seconds"] is not None for part in parts):
        seconds = np.concatenate([part["seconds"] if part is not None and part["seconds"] is not None
                                  else np.ones(len(g), np.float32) for g, part in zip(grids, parts)])
      sizes = {part["rows"] for part in parts if part is not None}
      budget = self.vision_budget.get(kind, {}) if isinstance(self.vision_budget, dict) else {}
      if len(sizes) == 1 and budget.get("num_patches") is None:
        (rows,) = sizes
        local_pixels = np.zeros((rows, dim), np.float32) if pixels is None else np.asarray(
            pixels, np.float32)
        starts = [i * rows + np.concatenate([[0], np.cumsum(np.prod(g, axis=-1))[:-1]])
                  for i, g in enumerate(grids) if len(g)]
        offsets[kind] = np.concatenate(starts).astype(np.int64)
        pixels = distributed.put_rows(local_pixels, self._pixel_sharding(rows * len(parts)))
      else:
        real = int(np.prod(grids[me], axis=-1).sum())
        mine = np.zeros((0, dim), np.float32) if pixels is None else np.asarray(pixels, np.float32)
        blocks = distributed.allgather_objects(mine[:real])
        padding = sum(part["rows"] for part in parts if part is not None) - sum(len(b) for b in blocks)
        pixels = np.concatenate(blocks + [np.zeros((padding, dim), np.float32)])
      out[kind] = (pixels, grid, seconds)
    return input_ids, mask, t, out, offsets

  def _pixel_sharding(self, rows):
    """Pixel rows split over the batch axes where they divide (in a multi-process job each
    process's block then sits on its own devices), else replicated over the mesh."""
    sharding = self._row_sharding(rows)
    if sharding is None:
      return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    mesh, axes = sharding
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))

  def _put(self, batch):
    shardings = self.batch_shardings(batch)
    if shardings is None:
      return jax.device_put(batch)  # uncommitted: the jitted functions place them
    return {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}

  # -- device calls ----------------------------------------------------------------------------

  def prefill_fn(self, num_prompts, *, max_new_tokens, num_samples=1):
    """The jitted prefill with this sampler's static settings bound for `num_prompts` prompts:
    fn(params, batch, rng) -> SamplingState. Like a jitted function it also has `.trace(...)`
    and `.lower(...)`, which take abstract arguments (the planner compiles it that way)."""
    return BoundJit(_prefill, graphdef=self.graphdef, num_samples=int(num_samples),
                    max_new_tokens=int(max_new_tokens), cache_dtype=self.cache_dtype,
                    row_sharding=self._row_sharding(num_prompts * num_samples),
                    prompt_sharding=self._row_sharding(num_prompts),
                    track_seen=self.scfg.repetition_penalty != 1.0)

  def decode_fn(self):
    """The jitted decode loop with this sampler's static settings bound: fn(params, state, until)
    -> SamplingState (donates `state`; `until` an int32 scalar); `.trace`/`.lower` as prefill_fn."""
    return BoundJit(_decode, graphdef=self.graphdef, scfg=self.scfg)

  def prefill(self, batch, *, max_new_tokens, num_samples=1, rng=None, params=None):
    """Jitted prefill on a prepared batch -> SamplingState with B*num_samples rows."""
    rng = jax.random.key(0) if rng is None else rng
    fn = self.prefill_fn(batch["input_ids"].shape[0], max_new_tokens=max_new_tokens,
                         num_samples=num_samples)
    return fn(self.params if params is None else params, self._put(batch), rng)

  def decode(self, state, *, until=None, params=None):
    """Jitted decode loop (donates `state`)."""
    until = state.tokens.shape[1] if until is None else until
    return self.decode_fn()(self.params if params is None else params, state, jnp.int32(until))

  def __call__(self, input_ids, attention_mask=None, *, max_new_tokens, num_samples=1, rng=None,
               params=None, callback: Callable[[np.ndarray, np.ndarray], None] | None = None,
               chunk=8, **vision) -> SampleOutput:
    """Samples `num_samples` completions per prompt.

    Args:
      input_ids: int[B, T] left-padded prompts; attention_mask: [B, T] (1 = token).
      max_new_tokens: N. num_samples: G. rng: PRNG key (fixed key -> same samples).
      params: optional nnx.State to sample with (defaults to the weights at construction).
      callback: streaming hook; called after every `chunk` tokens with (new int32[R, k] tokens,
        done bool[R]) on the host. The chunks reuse the single compiled decode loop.
      **vision: pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
        second_per_grid_ts (HF processor outputs).

    Returns:
      SampleOutput(tokens int32[B*G, N], logprobs float32[B*G, N], lengths int32[B*G]).
    """
    batch = self.prepare(input_ids, attention_mask, **vision)
    state = self.prefill(batch, max_new_tokens=max_new_tokens, num_samples=num_samples, rng=rng,
                         params=params)
    if callback is None:
      state = self.decode(state, params=params)
    else:
      emitted = 0
      while emitted < max_new_tokens:
        state = self.decode(state, until=min(emitted + chunk, max_new_tokens), params=params)
        step = int(state.step)
        if step > emitted:
          callback(np.asarray(state.tokens[:, emitted:step]), np.asarray(state.done))
        if step <= emitted or step >= max_new_tokens or bool(np.all(np.asarray(state.done))):
          break
        emitted = step
    return SampleOutput(tokens=state.tokens, logprobs=state.logprobs, lengths=state.lengths)


def generate(model, input_ids, attention_mask=None, *, max_new_tokens, temperature=0.0, top_k=0,
             top_p=1.0, num_samples=1, rng=None, stop_ids=None, extra_stop_ids=(), pad_id=None,
             cache_dtype=None, prompt_bucket=1, pixel_values=None, image_grid_thw=None,
             pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
             mesh=None, repetition_penalty=1.0) -> SampleOutput:
  """One-shot sampling (acceptance API). See `Sampler` for the arguments.

  Returns out.tokens int32[B*num_samples, N] (pad id after the stop id), out.logprobs float32
  [B*num_samples, N] (log pi at temperature 1) and out.lengths int32[B*num_samples].
  """
  sampler = Sampler(model, temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids,
                    extra_stop_ids=extra_stop_ids, pad_id=pad_id, prompt_bucket=prompt_bucket,
                    cache_dtype=cache_dtype, mesh=mesh, repetition_penalty=repetition_penalty)
  return sampler(input_ids, attention_mask, max_new_tokens=max_new_tokens, num_samples=num_samples,
                 rng=rng, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                 pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                 second_per_grid_ts=second_per_grid_ts)

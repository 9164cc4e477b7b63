"""One GRPO rollout (host code): prompts -> G samples (+ G/2 on time-shuffled frames) -> detokenise ->
rewards -> advantages -> TrainBatch. Also the SFT batch builder (targets instead of samples).

Input: a host batch of B prompts (numpy + lists), as the data pipeline yields it:
  input_ids int[B, T] (left-padded, vision placeholders expanded), attention_mask [B, T],
  optional pixel_values_videos float[P, 1176] + video_grid_thw int[n, 3] + second_per_grid_ts [n],
  optional pixel_values float[P', 1176] + image_grid_thw int[n', 3],
  optional pixel_values_videos_shuffled (same shapes as pixel_values_videos: the same frames in a
  random time order, re-processed; the temporal bonus, docs/spacer_recipe.md, "Rewards"),
  and per-prompt lists: solution, problem_type, cognitive_map (dict or None), data_type, id
  (plus process for SFT on reasoning traces).

In a multi-process job the batch is the process's own prompts (its block of the global batch); the
sampler runs the global batch, each process scores its own prompts' samples and the scores are
gathered, so every process returns the same global TrainBatch, metrics and samples.

Output TrainBatch (numpy; the trainer puts it on the mesh; multi-process pixels are already global
jax.Arrays). R = B*G rows, Tp prompt bucket, Tc
completion length (= max_new_tokens):
  prompt_ids int32[B, Tp], prompt_mask bool[B, Tp], the vision arrays and their index dicts
  (image_vis / video_vis from qwen2_5_vl.prepare_vision_inputs), completion_ids int32[R, Tc],
  completion_mask float32[R, Tc] (1 up to and including the stop token; see `mask_lengths` for a
  completion that stopped on <|endoftext|>), attention_mask bool[R, Tp+Tc],
  position_ids int32[R, 3, Tp+Tc] (exactly the positions the sampler used), prompt_index int32[R]
  (row r belongs to prompt r // G), advantages float32[R], sampler_logps float32[R, Tc].
"""

import numpy as np

from spacer_jax import distributed
from spacer_jax import grpo
from spacer_jax import rewards as rewards_lib

def present(batch, pixels_key, grid_key):
  """True when the batch carries at least one image/video (the pipeline always emits the keys)."""
  return batch.get(pixels_key) is not None and len(np.asarray(batch.get(grid_key)).reshape(-1, 3)) > 0


def _vision_kwargs(batch, shuffled=False):
  out = {}
  if present(batch, "pixel_values", "image_grid_thw"):
    out.update(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
  if present(batch, "pixel_values_videos", "video_grid_thw"):
    out.update(pixel_values_videos=batch["pixel_values_videos"],
               video_grid_thw=batch["video_grid_thw"],
               second_per_grid_ts=batch.get("second_per_grid_ts"))
  if shuffled and batch.get("pixel_values_videos_shuffled") is not None:
    out["pixel_values_videos"] = batch["pixel_values_videos_shuffled"]
  return out


def _sample(sampler, prepared, params, *, num_samples, max_new_tokens, rng):
  """Prefill once per prompt, decode G samples; returns host numpy (tokens, logprobs, lengths) of
  all rows of the global batch (gathered on every process of a multi-process job)."""
  state = sampler.prefill(prepared, max_new_tokens=max_new_tokens, num_samples=num_samples, rng=rng,
                          params=params)
  state = sampler.decode(state, params=params)
  return (distributed.to_host(state.tokens), distributed.to_host(state.logprobs),
          distributed.to_host(state.lengths))


def mask_lengths(tokens, lengths, group_size, eos_id):
  """Completion lengths as the reference's completion mask counts them. int32[R].

  The reference's mask ends at the first `eos_id` (<|im_end|>) and covers the whole padded width of
  its generate call otherwise. It generates one prompt's G completions per call, so that width is
  the group's longest completion (max_new_tokens if one was cut off): a completion that stopped on
  <|endoftext|> gets that length, its pad tokens included, in the loss mask and for the length
  bonus. `run` uses these unless RewardConfig.use_stop_token_mask_fix (then `lengths` as sampled).

  Args:
    tokens: int[R, Tc] sampled tokens (pad after the stop token), R = B * group_size.
    lengths: int[R] tokens up to and including the stop token.
    group_size: G.
    eos_id: the token the reference's mask recognises (the tokenizer's eos, <|im_end|>).
  """
  lengths = np.asarray(lengths, np.int32)
  tokens = np.asarray(tokens)
  last = tokens[np.arange(len(lengths)), np.maximum(lengths - 1, 0)]
  on_eos = (lengths > 0) & (last == eos_id)
  width = np.repeat(lengths.reshape(-1, group_size).max(1), group_size)
  return np.where(on_eos, lengths, width).astype(np.int32)


def _texts(tokenizer, tokens, lengths):
  return tokenizer.decode_batch([row[:n] for row, n in zip(tokens, lengths)],
                                skip_special_tokens=True)


def assemble(prepared, completion_ids, lengths, group_size):
  """TrainBatch arrays shared by GRPO and SFT from a sampler-prepared prompt batch and completions.

  Positions continue each prompt's M-RoPE ids the way the sampler does (`base_pos + k` on all three
  streams), so the trainer's log-probs at step 0 equal the sampler's.
  """
  b, tp = prepared["input_ids"].shape
  r, tc = completion_ids.shape
  if r != b * group_size:
    raise ValueError(f"{r} completion rows for {b} prompts x G={group_size}")
  comp_mask = np.arange(tc)[None, :] < np.asarray(lengths)[:, None]  # [R, Tc]
  prompt_index = np.arange(r, dtype=np.int32) // group_size
  prompt_pos = np.asarray(prepared["position_ids"])[:, prompt_index]  # [3, R, Tp]
  comp_pos = (np.asarray(prepared["base_pos"])[:, prompt_index, None]
              + np.arange(tc, dtype=np.int32)[None, None, :])  # [3, R, Tc]
  positions = np.concatenate([prompt_pos, comp_pos], axis=2).transpose(1, 0, 2)  # [R, 3, Tp+Tc]
  attn = np.concatenate([np.asarray(prepared["attention_mask"], bool)[prompt_index], comp_mask], 1)
  tb = {
      "prompt_ids": np.asarray(prepared["input_ids"], np.int32),
      "prompt_mask": np.asarray(prepared["attention_mask"], bool),
      "completion_ids": np.asarray(completion_ids, np.int32),
      "completion_mask": comp_mask.astype(np.float32),
      "attention_mask": attn,
      "position_ids": np.ascontiguousarray(positions, np.int32),
      "prompt_index": prompt_index,
  }
  for k in ("pixel_values", "image_vis", "pixel_values_videos", "video_vis"):
    if k in prepared:
      tb[k] = prepared[k]
  return tb


def _group_stats(total, group_size):
  g = np.asarray(total, np.float64).reshape(-1, group_size)
  return {"reward/dead_groups": float((g.std(1) == 0).mean())}


def run(sampler, params, batch, *, tokenizer, num_generations, max_new_tokens, rng,
        reward_config, use_temporal=True, use_map=True, reward_scaling="group",
        adv_eps=grpo.ADV_EPS):
  """Samples, scores and packs one GRPO batch.

  Args:
    sampler: sampling.Sampler built on the policy graph.
    params: nnx.State of the current policy weights (sampler graph).
    batch: host batch (module docstring).
    tokenizer: data.tokenizer.Tokenizer (decoding with special tokens skipped).
    num_generations: G.
    max_new_tokens: completion budget.
    rng: PRNG key for this step.
    reward_config: rewards.RewardConfig.
    use_temporal: score G/2 extra samples on time-shuffled frames for the temporal bonus.
    use_map: pass the GT cognitive maps to the reward (False: plain GRPO, maps never scored).
    reward_scaling, adv_eps: grpo.compute_advantages settings.

  Returns:
    (train_batch, metrics, samples): TrainBatch dict of numpy arrays; dict of float metrics;
    list of per-completion dicts for rollouts.jsonl.
  """
  import jax  # Only for splitting the rng; everything else here is host numpy.
  g = int(num_generations)
  b = len(batch["input_ids"])
  # Multi-process: the sampler runs the global batch (every process's prompts); each process then
  # scores its own rows (its prompts' G samples) and the scores are gathered (spacer_jax/distributed.py).
  prepared = sampler.prepare(batch["input_ids"], batch["attention_mask"], **_vision_kwargs(batch))
  rng_main, rng_shuf = jax.random.split(rng)
  tokens, logps, lengths = _sample(sampler, prepared, params, num_samples=g,
                                   max_new_tokens=max_new_tokens, rng=rng_main)
  mine = distributed.process_rows(len(tokens))

  data_type = list(batch.get("data_type") or ["video"] * b)
  maps = list(batch.get("cognitive_map") or [None] * b)
  if not use_map:
    maps = [None] * b
  local = {"solution": list(batch["solution"]), "problem_type": list(batch["problem_type"]),
           "cognitive_map": maps, "data_type": data_type, "id": list(batch.get("id") or [None] * b)}
  has_shuffled = batch.get("pixel_values_videos_shuffled") is not None
  everyone = distributed.allgather_objects((local, has_shuffled))
  examples = {k: [x for ex, _ in everyone for x in ex[k]] for k in local}
  has_shuffled = all(h for _, h in everyone)
  any_video = any(t == "video" for t in examples["data_type"])

  shuffled_acc = None
  metrics = {}
  if use_temporal and has_shuffled and any_video:
    s = max(g // 2, 1)
    prepared_s = sampler.prepare(batch["input_ids"], batch["attention_mask"],
                                 **_vision_kwargs(batch, shuffled=True))
    tok_s, _, len_s = _sample(sampler, prepared_s, params, num_samples=s,
                              max_new_tokens=max_new_tokens, rng=rng_shuf)
    mine_s = distributed.process_rows(len(tok_s))
    texts_s = _texts(tokenizer, tok_s[mine_s], len_s[mine_s])
    rep = lambda xs: [x for x in xs for _ in range(s)]  # noqa: E731
    shuffled_acc = rewards_lib.accuracy_reward(
        texts_s, rep(local["solution"]), rep(local["problem_type"]),
        rep(local["cognitive_map"]), config=reward_config).reshape(b, s)
  elif use_temporal and not has_shuffled and any_video:
    raise ValueError("temporal bonus on (config.rewards.use_temporal) but the batch has no "
                     "pixel_values_videos_shuffled; enable shuffled frames in the data pipeline")

  extended = mask_lengths(tokens, lengths, g, tokenizer.eos_token_id)  # the reference's
  masked = lengths if reward_config.use_stop_token_mask_fix else extended
  texts = _texts(tokenizer, tokens[mine], lengths[mine])
  comps, counts = rewards_lib.compute_rewards(texts, local, masked[mine], g, shuffled_acc,
                                              config=reward_config)
  if len(everyone) > 1:  # every process's scores, in process (= row) order
    parts = distributed.allgather_objects((texts, comps, counts, shuffled_acc))
    texts = [t for p in parts for t in p[0]]
    comps = {k: np.concatenate([p[1][k] for p in parts]) for k in comps}
    counts = {k: sum(p[2][k] for p in parts) for k in counts}
    if shuffled_acc is not None:
      shuffled_acc = np.concatenate([p[3] for p in parts])
  if shuffled_acc is not None:
    metrics["reward/shuffled_accuracy"] = float(np.mean(shuffled_acc))
  adv = np.asarray(grpo.compute_advantages(comps["total"], g, scaling=reward_scaling, eps=adv_eps))

  tb = assemble(prepared, tokens, masked, g)
  tb["advantages"] = adv.astype(np.float32)
  tb["sampler_logps"] = np.where(tb["completion_mask"] > 0, logps, 0.0).astype(np.float32)

  # -- metrics ------------------------------------------------------------------------------------
  for k, v in comps.items():
    metrics[f"reward/{k}"] = float(np.mean(v))
    if k in ("total", "accuracy"):
      metrics[f"reward/{k}_std"] = float(np.std(v))
  metrics.update(_group_stats(comps["total"], g))
  ptypes = [t for t in examples["problem_type"] for _ in range(g)]
  for t in sorted(set(ptypes)):
    sel = np.array([p == t for p in ptypes])
    metrics[f"accuracy/{t.replace(' ', '_')}"] = float(comps["accuracy"][sel].mean())
  for k, v in counts.items():
    metrics[f"count/{k}"] = int(v)
  metrics["completion/length_mean"] = float(lengths.mean())
  metrics["completion/length_max"] = int(lengths.max())
  metrics["completion/length_min"] = int(lengths.min())
  metrics["completion/truncated_frac"] = float((lengths >= max_new_tokens).mean())
  metrics["rollout/tokens"] = int(lengths.sum())
  metrics["advantage/abs_mean"] = float(np.abs(adv).mean())
  # Completions whose mask (and length-bonus length) the reference extends past their stop token
  # (stopped on <|endoftext|>); extended unless rewards.use_stop_token_mask_fix.
  metrics["completion/extended_mask_frac"] = float((extended != lengths).mean())

  samples = []
  for i, text in enumerate(texts):
    p = i // g
    samples.append({
        "prompt_id": examples["id"][p], "sample": i % g, "problem_type": examples["problem_type"][p],
        "completion": text, "answer": rewards_lib.extract_answer(text),
        "solution": examples["solution"][p], "length": int(lengths[i]),
        "advantage": float(adv[i]), **{f"reward_{k}": float(v[i]) for k, v in comps.items()}})
  return tb, metrics, samples


def sft_batch(sampler, batch, *, tokenizer, max_new_tokens, target="solution"):
  """TrainBatch for supervised fine-tuning: the completion is the record's target text + <|im_end|>.

  Args:
    sampler: used for its host `prepare` only (bucketing, positions, vision indices).
    batch: host batch (module docstring); needs `solution` (and `process` for target="process").
    tokenizer: data.tokenizer.Tokenizer.
    max_new_tokens: Tc; longer targets are truncated (their <|im_end|> is lost, counted in metrics).
    target: "solution" (SpaceR's SFT baseline: the raw `<answer>..</answer>` string) or "process"
      (the CoT trace followed by the solution).

  Returns:
    (train_batch, metrics, samples) like `run`, with G = 1 and advantages 0.
  """
  b = len(batch["input_ids"])
  prepared = sampler.prepare(batch["input_ids"], batch["attention_mask"], **_vision_kwargs(batch))
  processes = batch.get("process") or [""] * b
  if target == "process":
    texts = [f"{p or ''}{s or ''}" for p, s in zip(processes, batch["solution"])]
  elif target == "solution":
    texts = [s or "" for s in batch["solution"]]  # None on padding rows of a partial batch
  else:
    raise ValueError(f"config.sft_target must be solution|process, got {target!r}")
  ids = np.full((b, max_new_tokens), tokenizer.pad_token_id, np.int32)
  lengths = np.zeros(b, np.int32)
  truncated = 0
  for i, row in enumerate(tokenizer.encode_batch(texts)):
    row = row + [tokenizer.eos_token_id]
    truncated += len(row) > max_new_tokens
    row = row[:max_new_tokens]
    ids[i, :len(row)] = row
    lengths[i] = len(row)
  valid = list(batch.get("valid", [True] * b))
  record_ids = list(batch.get("id") or [None] * b)
  parts = distributed.allgather_objects((ids, lengths, truncated, texts, processes, valid,
                                         record_ids))
  if len(parts) > 1:  # the global batch, in process (= row) order
    ids, lengths = (np.concatenate([p[k] for p in parts]) for k in (0, 1))
    truncated = sum(p[2] for p in parts)
    texts, processes, valid, record_ids = ([x for p in parts for x in p[k]] for k in (3, 4, 5, 6))
  n = len(lengths)
  tb = assemble(prepared, ids, lengths, 1)
  tb["advantages"] = np.zeros(n, np.float32)
  tb["sampler_logps"] = np.zeros(ids.shape, np.float32)
  metrics = {"sft/target_tokens": int(lengths.sum()),
             "sft/truncated_frac": truncated / max(n, 1)}
  if target == "process":  # real rows trained on the bare solution because the record has no trace
    metrics["sft/empty_process_frac"] = (sum(bool(v) and not p for p, v in zip(processes, valid))
                                         / max(int(np.sum(valid)), 1))
  samples = [{"prompt_id": record_ids[i], "target": t, "length": int(lengths[i])}
             for i, t in enumerate(texts)]
  return tb, metrics, samples

"""Qwen2.5-VL in Flax NNX: vision tower, M-RoPE text decoder, host-side position code, HF weights."""

"""spacer_jax: SpaceR (SG-RLVR) on Qwen2.5-VL in JAX/Flax NNX."""

__version__ = "0.1.0"

"""Test setup: 8 simulated CPU devices, no hub access, absl flags parsed (grain needs it)."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

# fp32 tolerances (levanter's rule: changing them needs a review note in the issue).
ATOL_LAYER = 1e-5
ATOL_MODEL = 1e-4

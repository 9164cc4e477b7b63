"""Host-side data: video decoding and preprocessing, prompts, datasets and the grain pipeline."""

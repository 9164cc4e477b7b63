"""Synthetic spatial-video dataset: procedural rooms, a NumPy renderer, exact VSI-style questions.

    from spacer_jax.data import synthetic
    paths = synthetic.generate_dataset("/data/synthetic_demo", synthetic.SyntheticConfig.demo())

Modules: scene.py (config, categories, scene sampling, geometry, cognitive map), render.py (ray
caster, visibility, mp4 encoding), questions.py (one generator per VSI-Bench task, record formats),
generate.py (writes the dataset once per config), traces.py (templated think/map/answer
completions for SFT). Command line: `python -m spacer_jax.data.synthetic`.
"""

from spacer_jax.data.synthetic.generate import SyntheticPaths, dataset_paths, generate_dataset, is_generated
from spacer_jax.data.synthetic.scene import CATEGORIES, TASKS, SyntheticConfig

__all__ = ["CATEGORIES", "TASKS", "SyntheticConfig", "SyntheticPaths", "dataset_paths", "generate_dataset",
           "is_generated"]

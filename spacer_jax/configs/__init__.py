"""The recipes' configs, shipped inside the package.

`--config=configs/sgrlvr.py` (or `--config=sgrlvr`) finds them from any directory (spacer_jax/cli.py);
`from spacer_jax.configs import sgrlvr` imports one.
"""

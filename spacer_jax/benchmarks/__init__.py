"""Benchmarks of SpaceR's evaluation besides VSI-Bench (whose module is `spacer_jax.vsibench`).

One module per benchmark, each with the same parts (see `common` for the contract): a record reader,
a prompt builder, a parser/scorer and an aggregator. `spacer_jax.evaluate` runs any of them.
"""

"""Command line: generate a synthetic dataset.

    python -m spacer_jax.data.synthetic --out /tmp/synth --preset demo --num_scenes 64
"""

import argparse
import dataclasses
import json

from spacer_jax.data.synthetic import generate
from spacer_jax.data.synthetic import scene as scene_lib


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m spacer_jax.data.synthetic", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="data directory")
  parser.add_argument("--preset", choices=("demo", "default"), default="default")
  parser.add_argument("--overwrite", action="store_true", help="replace a dataset of another config")
  # Every int/float field of SyntheticConfig can be overridden, e.g. --num_scenes 8 --height 112.
  for field in dataclasses.fields(scene_lib.SyntheticConfig):
    if field.type in ("int", "float", "str", int, float, str):
      kind = {"int": int, "float": float, "str": str}.get(field.type, field.type)
      parser.add_argument(f"--{field.name}", type=kind, default=None)
  args = parser.parse_args(argv)
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(scene_lib.SyntheticConfig)
               if getattr(args, f.name, None) is not None}
  config = getattr(scene_lib.SyntheticConfig, args.preset)(**overrides)
  paths = generate.generate_dataset(args.out, config, overwrite=args.overwrite)
  with open(paths.manifest) as f:
    manifest = json.load(f)
  print(json.dumps({k: manifest[k] for k in ("config_hash", "codec", "num_train_records", "num_eval_records",
                                             "task_counts")}, indent=1))
  print(f"train: {paths.train_jsonl}\neval:  {paths.eval_jsonl}")


if __name__ == "__main__":
  main()

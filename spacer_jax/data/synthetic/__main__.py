r"""Command line: generate a synthetic dataset.

    python -m spacer_jax.data.synthetic --out /tmp/synth --preset demo --num_scenes 64
    python -m spacer_jax.data.synthetic --out /tmp/synth_dir --num_scenes 50 \
        --task_weights object_rel_direction_hard=1 --categories chair,table,bed,sofa,cabinet

Every scalar field of SyntheticConfig is a flag of the same name (see scene.py for their meaning).
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
  # Ranges such as --room_size 4,6 or --categories_per_scene 3,5 are comma-separated pairs.
  for field in dataclasses.fields(scene_lib.SyntheticConfig):
    if field.type in (int, float, str):
      parser.add_argument(f"--{field.name}", type=field.type, default=None)
    elif field.type in (tuple[int, int], tuple[float, float]):
      kind = field.type.__args__[0]
      parser.add_argument(f"--{field.name}", type=lambda v, k=kind: tuple(k(x) for x in v.split(",")),
                          default=None, metavar="LO,HI")
  parser.add_argument("--categories", default=None, help="comma-separated, e.g. chair,table,bed")
  parser.add_argument("--task_weights", default=None,
                      help="comma-separated task=weight, e.g. object_counting=1,obj_appearance_order=2")
  args = parser.parse_args(argv)
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(scene_lib.SyntheticConfig)
               if getattr(args, f.name, None) is not None}
  if args.categories:
    overrides["categories"] = tuple(c.strip() for c in args.categories.split(","))
  if args.task_weights:
    pairs = [kv.split("=") for kv in args.task_weights.split(",")]
    if any(len(p) != 2 for p in pairs):
      parser.error(f"--task_weights: expected task=weight,..., got {args.task_weights!r}")
    overrides["task_weights"] = tuple((k.strip(), float(v)) for k, v in pairs)
  config = getattr(scene_lib.SyntheticConfig, args.preset)(**overrides)
  paths = generate.generate_dataset(args.out, config, overwrite=args.overwrite)
  with open(paths.manifest) as f:
    manifest = json.load(f)
  print(json.dumps({k: manifest[k] for k in ("config_hash", "codec", "num_train_records", "num_eval_records",
                                             "task_counts")}, indent=1))
  print(f"train: {paths.train_jsonl}\neval:  {paths.eval_jsonl}")


if __name__ == "__main__":
  main()

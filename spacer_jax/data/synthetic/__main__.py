r"""Command line: generate a synthetic dataset.

    python -m spacer_jax.data.synthetic --out /tmp/synth --preset demo --num_scenes 64
    python -m spacer_jax.data.synthetic --out /tmp/synth_dir --num_scenes 50 \
        --task_weights object_rel_direction_hard=1 --categories chair,table,bed,sofa,cabinet

Every scalar field of SyntheticConfig is a flag of the same name (see scene.py for their meaning);
ranges such as --room_size 4,6 or --categories_per_scene 3,5 are comma-separated pairs. Unset flags keep
the preset's value.
"""

import dataclasses
import json

from absl import app
from absl import flags

from spacer_jax.data.synthetic import generate
from spacer_jax.data.synthetic import scene as scene_lib

_SCALAR_FLAGS = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}
_PAIR_TYPES = (tuple[int, int], tuple[float, float])


def define_flags(fv=flags.FLAGS):
  """--out, --preset, --overwrite, --categories, --task_weights and one flag per SyntheticConfig
  field (defined only when run as a program)."""
  flags.DEFINE_string("out", None, "data directory", flag_values=fv)
  flags.DEFINE_enum("preset", "default", ["demo", "default"], "SyntheticConfig preset the other "
                    "flags override", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "replace a dataset of another config", flag_values=fv)
  for field in dataclasses.fields(scene_lib.SyntheticConfig):
    if field.type in _SCALAR_FLAGS:
      _SCALAR_FLAGS[field.type](field.name, None, f"SyntheticConfig.{field.name}", flag_values=fv)
    elif field.type in _PAIR_TYPES:
      flags.DEFINE_string(field.name, None, f"SyntheticConfig.{field.name}: LO,HI", flag_values=fv)
  flags.DEFINE_string("categories", None, "comma-separated, e.g. chair,table,bed", flag_values=fv)
  flags.DEFINE_string("task_weights", None, "comma-separated task=weight, e.g. "
                      "object_counting=1,obj_appearance_order=2", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)


def _pair(name, text, kind):
  parts = text.split(",")
  try:
    if len(parts) != 2:
      raise ValueError
    return tuple(kind(x) for x in parts)
  except ValueError:
    raise app.UsageError(f"--{name}: expected LO,HI ({kind.__name__}s), got {text!r}",
                         exitcode=2) from None


def config_from_flags(fv):
  """The SyntheticConfig the flags describe (the preset with every given field replaced)."""
  overrides = {}
  for field in dataclasses.fields(scene_lib.SyntheticConfig):
    value = fv[field.name].value if field.name in fv else None
    if value is None:
      continue
    if field.type in _PAIR_TYPES:
      value = _pair(field.name, value, field.type.__args__[0])
    overrides[field.name] = value
  if fv.categories:
    overrides["categories"] = tuple(c.strip() for c in fv.categories.split(","))
  if fv.task_weights:
    pairs = [kv.split("=") for kv in fv.task_weights.split(",")]
    if any(len(p) != 2 for p in pairs):
      raise app.UsageError(f"--task_weights: expected task=weight,..., got {fv.task_weights!r}",
                           exitcode=2)
    overrides["task_weights"] = tuple((k.strip(), float(v)) for k, v in pairs)
  return getattr(scene_lib.SyntheticConfig, fv.preset)(**overrides)


def main(argv, fv=flags.FLAGS) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}", exitcode=2)
  paths = generate.generate_dataset(fv.out, config_from_flags(fv), overwrite=fv.overwrite)
  with open(paths.manifest) as f:
    manifest = json.load(f)
  print(json.dumps({k: manifest[k] for k in ("config_hash", "codec", "num_train_records", "num_eval_records",
                                             "task_counts")}, indent=1))
  print(f"train: {paths.train_jsonl}\neval:  {paths.eval_jsonl}")


if __name__ == "__main__":
  from spacer_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, define_flags, __doc__)

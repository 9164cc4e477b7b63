"""The command line of every entry point (`python -m spacer_jax.<module>` and the `spacer-*` scripts).

Each entry point defines its flags in a `define_flags()` function, called only when the module runs as a
program (importing a module never defines flags, so train.py, evaluate.py and convert.py can import each
other), and runs `cli.run(main, define_flags, __doc__)`, which is absl's `app.run` plus:

  --help, -h, --helpshort   the module's docstring and its own flags on stdout, exit status 0 (absl's
                            own --help exits 1); --helpfull lists every flag (absl's logging flags, ...).
  --config=PATH[:ARGS]      absl's config_flags still receives a file path. A PATH that exists from the
                            current directory is used as is; otherwise `configs/NAME.py`,
                            `spacer_jax/configs/NAME.py`, `NAME.py` and `NAME` name the config shipped
                            inside the package (spacer_jax/configs/NAME.py). So the README's
                            `--config=configs/sgrlvr.py:smoke` works from a checkout and after a plain
                            `pip install`, from any directory, and `--config=sgrlvr:smoke` is the short
                            form. A file of your own at ./configs/sgrlvr.py takes precedence.
  quiet logs                the INFO lines of spacer_jax itself, and warnings and errors of everything.
                            The INFO chatter of libraries (orbax's checkpoint internals, jax's backend
                            probing, grain) is dropped unless --verbosity is given: --verbosity=0 (-v=0)
                            shows every INFO line, --verbosity=-1 only warnings and errors.
  app.UsageError            "error: MESSAGE (see --help)" on stderr, exit status error.exitcode (1);
                            a module's USER_ERRORS (bad input: a missing file, ...) "error: MESSAGE",
                            exit status 2, no traceback.

The console scripts of pyproject.toml are the functions at the bottom (SCRIPTS: script -> module).

`call(module, argv)` parses `argv` into fresh FlagValues and calls the module's `main`: tests and
notebooks run a command line in process without touching the global flags.
"""

import importlib
import logging
import os
import sys

from absl import app
from absl import flags

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")
HELPFULL_ARGS = ("--helpfull", "-helpfull")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def packaged_configs():
  """Names of the configs shipped in spacer_jax/configs/ (`sgrlvr`, `eval_vsibench`, ...)."""
  if not os.path.isdir(CONFIG_DIR):
    return []
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f != "__init__.py")


def resolve_config(value):
  """`--config` value -> the same value with its path made to exist where possible (see the module
  docstring): `configs/sgrlvr.py:smoke` -> `<package>/configs/sgrlvr.py:smoke` when ./configs/sgrlvr.py
  does not exist. Unresolvable values come back unchanged (config_flags reports them)."""
  path, sep, args = value.partition(":")
  if not path or os.path.exists(path):
    return value
  head, name = os.path.split(os.path.normpath(path))
  if head not in ("", "configs", os.path.join("spacer_jax", "configs")):
    return value
  if not name.endswith(".py"):
    name += ".py"
  candidate = os.path.join(CONFIG_DIR, name)
  return candidate + sep + args if os.path.isfile(candidate) else value


def _resolve_config_args(argv, fv):
  """argv with every --config value resolved (both `--config=V` and `--config V` forms)."""
  if "config" not in fv:
    return argv
  out, i = list(argv[:1]), 1
  while i < len(argv):
    a = argv[i]
    if a == "--":
      out.extend(argv[i:])
      break
    for prefix in ("--config=", "-config="):
      if a.startswith(prefix):
        a = prefix + _checked(a[len(prefix):])
    if a in ("--config", "-config") and i + 1 < len(argv):
      out += [a, _checked(argv[i + 1])]
      i += 2
      continue
    out.append(a)
    i += 1
  return out


def _checked(value):
  resolved = resolve_config(value)
  path = resolved.partition(":")[0]
  if path and not os.path.exists(path):
    raise app.UsageError(
        f"--config={value}: no file {path!r} here, and no packaged config of that name (packaged: "
        f"{', '.join(packaged_configs()) or 'none'}; e.g. --config=configs/sgrlvr.py:smoke)")
  return resolved


def help_text(doc, own, fv=flags.FLAGS, modules=()):
  """The docstring, then the help of the flags named in `own` or defined by `modules` (absl's format),
  then a footer."""
  lines = [(doc or "").strip(), ""]
  for module, module_flags in fv.flags_by_module_dict().items():
    if module in modules or any(f.name in own for f in module_flags):
      lines += ["flags:"] + fv.module_help(module).strip().splitlines()[1:]  # minus "module:"
  lines += ["", "Logs: spacer_jax's INFO lines and every library's warnings and errors; --verbosity=0",
            "adds the libraries' INFO lines, --verbosity=-1 keeps only warnings and errors.",
            "--helpfull: every flag (absl's logging flags included)."]
  return "\n".join(lines) + "\n"


class OwnInfoOnly(logging.Filter):
  """Passes warnings and errors, and INFO/DEBUG records logged from spacer_jax's own files (or the
  program's main file); drops the libraries' INFO."""

  def __init__(self, extra_files=()):
    super().__init__()
    self._extra = {os.path.abspath(f) for f in extra_files if f}

  def filter(self, record):
    if record.levelno >= logging.WARNING:
      return True
    path = os.path.abspath(record.pathname)
    return path.startswith(_PACKAGE_DIR) or path in self._extra


def quiet_library_logs(fv=flags.FLAGS):
  """Installs OwnInfoOnly on absl's handler unless --verbosity/-v was given; returns the filter or
  None."""
  if fv["verbosity"].present:
    return None
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  main_file = getattr(sys.modules.get("__main__"), "__file__", None)
  f = OwnInfoOnly([main_file])
  absl_logging.get_absl_handler().addFilter(f)
  return f


def run(main, define_flags=None, doc=None, module=None, user_errors=()):
  """absl's app.run(main) with the additions of the module docstring: packaged configs, --help exit 0,
  quiet library logs, one-line usage errors.

  Args:
    main: absl main(argv).
    define_flags: defines the program's flags (None: they are defined at import, as absl's usual
      module-level flags; --help then lists those of `module` or of the `python -m` main module).
    doc: the help text's head (the module docstring).
    module: name of the module that runs (console scripts), for --help with module-level flags.
    user_errors: exception types that mean bad input (a missing file, ...): "error: MESSAGE" on
      stderr and exit status 2, without a traceback.
  """
  before = set(flags.FLAGS)
  if define_flags is not None:
    define_flags()
  own = set(flags.FLAGS) - before
  args = sys.argv[1:]
  if "--" in args:
    args = args[:args.index("--")]
  if any(a in HELPFULL_ARGS for a in args):
    app.define_help_flags()
    sys.stdout.write((doc or "").strip() + "\n\n" + flags.FLAGS.get_help() + "\n")
    sys.exit(0)
  if any(a in HELP_ARGS for a in args):
    sys.stdout.write(help_text(doc, own, modules={sys.argv[0], module}))
    sys.exit(0)

  def parse(argv):
    try:
      argv = _resolve_config_args(argv, flags.FLAGS)
    except app.UsageError as e:
      sys.stderr.write(f"error: {e}\n")
      sys.exit(e.exitcode)
    return app.parse_flags_with_usage(argv)

  def wrapped(argv):
    quiet_library_logs()
    try:
      return main(argv)
    except app.UsageError as e:
      sys.stderr.write(f"error: {e} (see --help)\n")
      sys.exit(e.exitcode)
    except tuple(user_errors) as e:  # pylint: disable=catching-non-exception
      sys.stderr.write(f"error: {e}\n")
      sys.exit(2)

  app.run(wrapped, flags_parser=parse)


def call(module, argv):
  """Runs `module.main` on the command line `argv` (without the program name) in process: the flags
  go to fresh FlagValues given to `module.define_flags(fv)` and `module.main(args, fv)`."""
  fv = flags.FlagValues()
  module.define_flags(fv)
  rest = fv(["prog", *_resolve_config_args(["prog", *argv], fv)[1:]])
  return module.main(rest, fv)


# Console scripts ([project.scripts] in pyproject.toml) and the module each one runs.
SCRIPTS = {
    "spacer-train": "spacer_jax.train",
    "spacer-evaluate": "spacer_jax.evaluate",
    "spacer-generate": "spacer_jax.generate",
    "spacer-convert": "spacer_jax.convert",
    "spacer-synthetic": "spacer_jax.data.synthetic.__main__",
    "spacer-demo": "spacer_jax.demo",
    "spacer-plan": "spacer_jax.plan",
}


def run_module(name):
  """Runs module `name`'s main as its `python -m` command line does."""
  module = importlib.import_module(name)
  run(module.main, getattr(module, "define_flags", None), module.__doc__, module=name,
      user_errors=getattr(module, "USER_ERRORS", ()))


def train():
  run_module(SCRIPTS["spacer-train"])


def evaluate():
  run_module(SCRIPTS["spacer-evaluate"])


def generate():
  run_module(SCRIPTS["spacer-generate"])


def convert():
  run_module(SCRIPTS["spacer-convert"])


def synthetic():
  run_module(SCRIPTS["spacer-synthetic"])


def demo():
  run_module(SCRIPTS["spacer-demo"])


def plan():
  run_module(SCRIPTS["spacer-plan"])

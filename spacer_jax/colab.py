"""Installs spacer_jax into a Colab runtime without downgrading what the runtime already has.

    python -m spacer_jax.colab [--accelerator=auto|cpu|gpu|tpu] [--report=FILE] [--dry_run]

Run from a clone of the repository (the notebooks' install cell clones it and runs this there).
Standard library only (plus `packaging`, which pip-based runtimes have): it runs before any
dependency of the project is installed.

What it installs, from the clone's requirements.txt:
  * jax at its pinned version with the runtime's backend: `jax[tpu]==V` on a TPU runtime,
    `jax[cuda12]==V` on a GPU runtime, `jax==V` on CPU. An exact pin: jaxlib, the backend plugin and
    this code move together, so a newer preinstalled jax is replaced too.
  * flax, optax, orbax-checkpoint and grain at their exact pins (they follow jax's API).
  * Every other requirement only where the runtime lacks it, or has a version older than the pin
    (or outside the pinned range). A newer preinstalled version is kept: Colab's own packages are
    not downgraded, and the project runs on them (newer than what it was tested with).
  * The project itself, `pip install -e . --no-deps` (its dependencies are the ones above).
pip resolves the new packages under a constraints file that holds every other installed
distribution at >= its current version, so their own dependencies may upgrade preinstalled
packages but never downgrade one. If pip cannot satisfy that, it retries without the constraints
and lists every downgrade. The report (--report, JSON) lists the changed distributions and their
top-level modules (of the replaced ones): a kernel that imported one of them before the install
must restart.
"""

import argparse
import glob
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

try:
  from packaging.specifiers import SpecifierSet
  from packaging.version import Version
except ImportError:  # pip's own copy (pip is always there when this runs).
  from pip._vendor.packaging.specifiers import SpecifierSet  # pylint: disable=g-import-not-at-top
  from pip._vendor.packaging.version import Version  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Exact pins even when the runtime has a newer version (they follow jax's API).
EXACT = ("flax", "optax", "orbax-checkpoint", "grain")
# jax's backend: installed together by the jax[...] extra, never held by the constraints.
JAX_FAMILY = ("jax", "jaxlib", "libtpu", "libtpu-nightly", "jax-cuda12-plugin", "jax-cuda12-pjrt")
JAX_EXTRA = {"tpu": "[tpu]", "gpu": "[cuda12]", "cpu": ""}
_REQ = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(.*)$")


def norm(name):
  """PEP 503 normalised distribution name."""
  return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirements(text):
  """[(name, specifier text)] of a requirements file (no -r/-e/-c lines, no markers)."""
  out = []
  for raw in text.splitlines():
    line = raw.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
      continue
    m = _REQ.match(line)
    if not m or ";" in line:
      raise ValueError(f"requirements line not understood: {raw!r}")
    out.append((m.group(1), m.group(3).replace(" ", "")))
  return out


def installed_versions():
  """{normalised name: version} of the distributions this interpreter sees."""
  out = {}
  for d in importlib.metadata.distributions():
    name = d.metadata["Name"]
    if name:
      out.setdefault(norm(name), d.version)
  return out


def detect_accelerator():
  """"tpu" (TPU VM devices), "gpu" (nvidia-smi lists one) or "cpu"."""
  if (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
      or os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("COLAB_TPU_ADDR")):
    return "tpu"
  if shutil.which("nvidia-smi"):
    try:
      out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
      if out.returncode == 0 and "GPU" in out.stdout:
        return "gpu"
    except (OSError, subprocess.SubprocessError):
      pass
  return "cpu"


def _pinned(name, spec):
  if not spec.startswith("==") or "," in spec:
    raise ValueError(f"requirements.txt must pin {name} exactly (==X), got {name}{spec!r}")
  return spec[2:]


def plan(requirements, installed, accelerator):
  """What to pip install: (["jax[tpu]==V", "flax==V", ...], {name: why it is kept or installed})."""
  to_install, why = [], {}
  for name, spec in requirements:
    n, have = norm(name), installed.get(norm(name))
    if n == "jax":
      want = _pinned(name, spec)
      backend = {"tpu": "libtpu" in installed,
                 "gpu": installed.get("jax-cuda12-plugin") == want,
                 "cpu": True}[accelerator]
      if have == want and installed.get("jaxlib") == want and backend:
        why[n] = f"kept {have} ({accelerator} backend present)"
      else:
        to_install.append(f"jax{JAX_EXTRA[accelerator]}=={want}")
        why[n] = f"{have or 'missing'} -> {want} for {accelerator}"
    elif n in EXACT:
      want = _pinned(name, spec)
      if have == want:
        why[n] = f"kept {have}"
      else:
        to_install.append(f"{name}=={want}")
        why[n] = f"{have or 'missing'} -> {want} (exact pin)"
    else:
      # `==X` means "X or newer" here; ranges (numpy>=2,<3) are taken as written.
      ok_spec = SpecifierSet(">=" + spec[2:] if spec.startswith("==") else spec)
      if have is not None and Version(have) in ok_spec:
        why[n] = f"kept {have} (satisfies {ok_spec})"
      else:
        to_install.append(f"{name}{spec}")
        why[n] = f"{have or 'missing'} -> {spec}"
  return to_install, why


def constraints(installed, to_install):
  """`name>=version` for every installed distribution pip must not downgrade."""
  skip = {norm(_REQ.match(r).group(1)) for r in to_install} | set(JAX_FAMILY)
  lines = []
  for n, v in sorted(installed.items()):
    if n in skip:
      continue
    base = v.split("+", 1)[0]  # local labels (2.5.1+cu121) are not allowed in >=.
    try:
      Version(base)
    except Exception:  # pylint: disable=broad-except
      continue  # a legacy version string pip cannot compare anyway
    lines.append(f"{n}>={base}")
  return "\n".join(lines) + "\n"


def _modules(dists):
  """Top-level import names of the given (normalised) distributions."""
  out = set()
  for module, names in importlib.metadata.packages_distributions().items():
    if any(norm(d) in dists for d in names):
      out.add(module)
  return sorted(out)


def _pip(args):
  cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
  print("+", " ".join(cmd), flush=True)
  return subprocess.run(cmd).returncode


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m spacer_jax.colab", description=__doc__.split("\n")[0])
  p.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu", "tpu"))
  p.add_argument("--root", default=ROOT, help="the repository clone (requirements.txt, pyproject)")
  p.add_argument("--report", default="", help="write the changed distributions here (JSON)")
  p.add_argument("--dry_run", action="store_true", help="print the plan, install nothing")
  args = p.parse_args(argv)
  accelerator = detect_accelerator() if args.accelerator == "auto" else args.accelerator
  with open(os.path.join(args.root, "requirements.txt")) as f:
    requirements = parse_requirements(f.read())
  before = installed_versions()
  to_install, why = plan(requirements, before, accelerator)
  print(f"runtime: {accelerator}; python {sys.version.split()[0]}")
  for n, w in why.items():
    print(f"  {n:20s} {w}")
  if args.dry_run:
    return 0
  if to_install:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
      f.write(constraints(before, to_install))
    if _pip(["-c", f.name, *to_install]) != 0:
      print("pip could not install without downgrading a preinstalled package; retrying without "
            "that constraint (the downgrades are listed below)", flush=True)
      if _pip(to_install) != 0:
        raise SystemExit("pip install failed; see its output above")
  if _pip(["--no-deps", "-e", args.root]) != 0:
    raise SystemExit("pip install -e failed; see its output above")
  after = installed_versions()
  changed = {n: [before.get(n), v] for n, v in after.items() if before.get(n) != v}
  downgraded = sorted(n for n, (old, new) in changed.items()
                      if old and Version(new.split("+")[0]) < Version(old.split("+")[0]))
  for n, (old, new) in sorted(changed.items()):
    print(f"  changed {n}: {old or '-'} -> {new}" + ("  (DOWNGRADE)" if n in downgraded else ""))
  check = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices(); "
                          "print(f'jax {jax.__version__}: {len(d)} x {d[0].platform} "
                          "({d[0].device_kind})')"], capture_output=True, text=True)
  print(check.stdout.strip() or check.stderr[-2000:])
  platform = {"tpu": "tpu", "gpu": "gpu", "cpu": "cpu"}[accelerator]
  if check.returncode != 0 or f" x {platform} " not in check.stdout:
    raise SystemExit(f"jax does not see the {accelerator} runtime after the install")
  if args.report:
    with open(args.report, "w") as f:
      json.dump({"accelerator": accelerator, "changed": changed, "downgraded": downgraded,
                 # Only replaced distributions: a new one cannot have been imported before.
                 "modules": _modules({n for n, (old, _) in changed.items() if old})}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The package with only its core dependencies: the smoke recipe trains, nothing optional is imported.

Default run: a subprocess in which every module of site-packages that does not belong to pyproject's
core dependencies (and their own dependencies, resolved from the installed metadata) is unimportable,
as if [tfds], [hf], [plots], [wandb] and the test packages were not installed; it trains the smoke
recipe for one step from a directory that is not the repository and prints only a few lines.
Slow: a real `pip install <repo>` (no extras) into a fresh virtual environment, then the installed
console scripts from another directory.
"""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imported first by the subprocess: blocks site-packages files outside the allowed set.
BLOCKER = textwrap.dedent("""
    import importlib.abc, importlib.machinery, json, os, site, sys
    ALLOWED = set(json.load(open(os.environ["CORE_FILES"])))
    SITE = tuple(os.path.realpath(p) + os.sep for p in site.getsitepackages())
    TRIED = []

    class Blocker(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not spec.origin or not os.path.isabs(spec.origin):
          return None  # not found, namespace package, built-in: the normal machinery decides
        origin = os.path.realpath(spec.origin)
        if origin.startswith(SITE) and origin not in ALLOWED:
          frame = sys._getframe(1)
          while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
            frame = frame.f_back
          TRIED.append([name, frame.f_code.co_filename if frame is not None else ""])
          raise ModuleNotFoundError(f"No module named {name!r} (not a core dependency)", name=name)
        return None

    sys.meta_path.insert(0, Blocker())
    import atexit
    atexit.register(lambda: open(os.environ["CORE_TRIED"], "w").write(json.dumps(TRIED)))
    import runpy
    sys.argv = ["spacer_jax.train"] + sys.argv[1:]
    runpy.run_module("spacer_jax.train", run_name="__main__", alter_sys=True)
""")


def core_distributions():
  """{canonical name: extras} of pyproject's core dependencies and, recursively, theirs (as installed)."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    todo = [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]
  seen = {}
  while todo:
    req = todo.pop()
    name = canonicalize_name(req.name)
    if name in seen and set(req.extras) <= seen[name]:
      continue
    try:
      dist = importlib.metadata.distribution(req.name)
    except importlib.metadata.PackageNotFoundError:
      continue  # an environment marker left it out of this environment
    extras = seen.setdefault(name, set())
    extras.update(req.extras)
    for text in dist.requires or ():
      dep = Requirement(text)
      if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras | {""}):
        todo.append(dep)
  return seen


def core_files():
  """Real paths of every file installed by the core distributions."""
  out = []
  for name in core_distributions():
    dist = importlib.metadata.distribution(name)
    out += [os.path.realpath(dist.locate_file(f)) for f in dist.files or ()]
  return out


def test_core_closure_leaves_out_every_optional_part():
  core = core_distributions()
  for name in ("jax", "flax", "orbax-checkpoint", "grain", "tokenizers", "av", "pyarrow"):
    assert name in core, name
  for name in ("transformers", "tensorflow-datasets", "matplotlib", "wandb", "torch", "safetensors"):
    assert name not in core, name


def test_smoke_recipe_trains_with_the_core_dependencies_only(tmp_path):
  files = tmp_path / "core_files.json"
  files.write_text(json.dumps(core_files()))
  driver = tmp_path / "driver.py"
  driver.write_text(BLOCKER)
  env = dict(os.environ, CORE_FILES=str(files), CORE_TRIED=str(tmp_path / "tried.json"),
             PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  cwd = tmp_path / "elsewhere"  # not the repository: the config comes from the package
  cwd.mkdir()
  out = subprocess.run(
      [sys.executable, str(driver), "--config=configs/sgrlvr.py:smoke", "--workdir=run",
       "--config.total_steps=1"], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-4000:]
  with open(cwd / "run" / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1]
  # spacer_jax never even tries an optional package; libraries probe theirs (tensorboardX tries
  # torch), which shows the blocker at work.
  tried = json.loads((tmp_path / "tried.json").read_text())
  assert not [(m, where) for m, where in tried if os.sep + "spacer_jax" + os.sep in where], tried
  assert tried
  # Quiet by default: spacer_jax's own lines, no orbax/jax/grain INFO chatter.
  lines = [l for l in re.split(r"[\r\n]+", out.stderr) if l.strip() and not l.startswith("train:")]
  assert all("/spacer_jax/" in l or re.search(r"\] (mesh|[0-9,]+ param|[0-9]+ train|initial "
                                              r"weights|memory|done)", l) for l in lines), lines
  assert len(lines) <= 8, lines
  assert not re.search(r"checkpoint_manager|xla_bridge|async_checkpointer", out.stderr), out.stderr


@pytest.mark.slow
def test_pip_install_without_extras_then_the_installed_commands(tmp_path):
  """The acceptance check of a plain install: a fresh venv, `pip install <repo>` (the package index
  as pip is configured here), then the console scripts from a directory that is not the repository."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", ROOT], env=env,
                       capture_output=True, text=True, timeout=3000)
  assert pip.returncode == 0, pip.stderr[-4000:]
  freeze = subprocess.run([str(venv / "bin" / "pip"), "freeze"], env=env, capture_output=True,
                          text=True, timeout=300).stdout.lower()
  for name in ("transformers", "tensorflow-datasets", "matplotlib", "wandb", "torch"):
    assert f"\n{name}==" not in "\n" + freeze, name
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  for script in ("spacer-train", "spacer-evaluate", "spacer-generate", "spacer-convert",
                 "spacer-synthetic", "spacer-demo"):
    h = subprocess.run([str(venv / "bin" / script), "--help"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert h.returncode == 0 and "--helpfull" in h.stdout, (script, h.stderr[-2000:])
  run = subprocess.run([str(venv / "bin" / "spacer-train"), "--config=configs/sgrlvr.py:smoke",
                        "--workdir=runs/smoke"], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=3000)
  assert run.returncode == 0, run.stderr[-4000:]
  with open(cwd / "runs" / "smoke" / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]
  # The short name works too, and a rerun resumes (nothing left to train).
  again = subprocess.run([str(venv / "bin" / "spacer-train"), "--config=sgrlvr:smoke",
                          "--workdir=runs/smoke"], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=3000)
  assert again.returncode == 0 and "nothing to train" in again.stderr, again.stderr[-4000:]

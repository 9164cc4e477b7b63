"""Notebooks (notebooks/NN_name.py, `# %%` percent format): structure checks, and (slow) each one
run end to end with SMOKE=1 as a plain Python script on CPU, from a directory outside the repo."""

import ast
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.py")))
NAMES = [os.path.basename(p) for p in NOTEBOOKS]
# Simulated CPU devices per notebook: 01 shards its weights, so give it a real (2-device) mesh; the
# trainer run of 02 uses one device like tests/test_train_smoke.py.
DEVICES = {"01_load_and_sample.py": 2}


def _source(path):
  with open(path) as f:
    return f.read()


def _cells(text):
  """Percent-format cells: list of (header line, body lines)."""
  cells = []
  for line in text.splitlines():
    if line.startswith("# %%"):
      cells.append((line, []))
    elif cells:
      cells[-1][1].append(line)
    else:
      raise AssertionError(f"text before the first '# %%' cell: {line!r}")
  return cells


def test_notebooks_exist():
  assert NAMES == ["01_load_and_sample.py", "02_rollout_inspector.py", "03_rewards_playground.py"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_structure(path):
  text = _source(path)
  tree = ast.parse(text, filename=path)
  cells = _cells(text)
  # First cell: markdown title, then the hardware and the runtime.
  header, body = cells[0]
  assert header == "# %% [markdown]", header
  first = "\n".join(body)
  assert re.search(r"^# # \d\d ", first, re.M), "first cell must start with the notebook title"
  assert "**Hardware:**" in first and "**Runtime:**" in first, first
  # Second cell: the Colab install cell.
  assert cells[1][0] == "# %%" and any("pip" in l for l in cells[1][1]), cells[1]
  # Notebooks never define library code: no functions or classes (a lambda is fine).
  defs = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                           ast.ClassDef))]
  assert not defs, f"{os.path.basename(path)} defines {defs}; move them into spacer_jax"
  # Project code comes only from the package.
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      top = node.module.split(".")[0]
      assert top not in ("notebooks", "tests", "configs", "experiments"), node.module
    if isinstance(node, ast.Import):
      for alias in node.names:
        assert alias.name.split(".")[0] not in ("notebooks", "tests", "configs", "experiments")
  assert 'os.environ.get("SMOKE", "0") == "1"' in text, "notebook must honour SMOKE=1"
  for header, _ in cells:
    assert header in ("# %%", "# %% [markdown]"), header


def test_readme_lists_every_notebook():
  readme = _source(os.path.join(ROOT, "notebooks", "README.md"))
  for name in NAMES:
    assert name in readme, name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_runs_with_smoke(path, tmp_path):
  name = os.path.basename(path)
  env = dict(os.environ)
  env.update(SMOKE="1", MPLBACKEND="Agg", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
  n = DEVICES.get(name, 1)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}" if n > 1 else ""
  out = subprocess.run([sys.executable, path], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1200)
  assert out.returncode == 0, f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"

"""Notebooks: notebooks/NN_name.py (percent format, the source) and notebooks/NN_name.ipynb (what
Colab and GitHub open) must match as jupytext writes them, with no outputs; structure checks; and
(slow) each .ipynb executed end to end with SMOKE=1 through a real Jupyter kernel (nbclient +
ipykernel) on CPU, from a directory outside the repository.

After editing a .py: `jupytext --sync notebooks/NN_name.py` (or `jupytext --to ipynb`) rewrites the
.ipynb; see notebooks/README.md.
"""

import ast
import glob
import os
import re

import jupytext
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.py")))
NAMES = [os.path.basename(p) for p in NOTEBOOKS]
# Simulated CPU devices per notebook: 01 shards its weights, so give it a real (2-device) mesh; the
# trainer runs of 02 and 04 use one device like tests/test_train_smoke.py.
DEVICES = {"01_load_and_sample.py": 2}
NOTEBOOK_METADATA = {"accelerator", "jupytext", "kernelspec"}


def _source(path):
  with open(path) as f:
    return f.read()


def _ipynb(path):
  return path[:-3] + ".ipynb"


def test_notebooks_exist():
  assert NAMES == ["01_load_and_sample.py", "02_rollout_inspector.py", "03_rewards_playground.py",
                   "04_train_demo.py", "05_plan_a_run.py"]
  ipynbs = set(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
  extra = ipynbs - {_ipynb(p) for p in NOTEBOOKS}
  assert not extra, f"notebooks without a .py source: {extra}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_ipynb_matches_py(path):
  """The committed .ipynb is the .py as jupytext converts it, outputs stripped."""
  assert os.path.exists(_ipynb(path)), f"run: jupytext --sync {os.path.relpath(path, ROOT)}"
  nb = nbformat.read(_ipynb(path), as_version=4)
  nbformat.validate(nb)
  fix = f"they differ: run `jupytext --sync {os.path.relpath(path, ROOT)}` (the newer file wins)"
  assert jupytext.writes(nb, fmt="py:percent") == _source(path), fix
  for i, cell in enumerate(nb.cells):
    assert not cell.metadata, f"cell {i} has metadata {cell.metadata}"
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"cell {i} has outputs"
  assert set(nb.metadata) <= NOTEBOOK_METADATA, nb.metadata
  assert nb.metadata.jupytext.formats == "ipynb,py:percent"  # paired: `jupytext --sync` works
  assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_structure(path):
  text = _source(path)
  tree = ast.parse(text, filename=path)
  cells = jupytext.reads(text, fmt="py:percent").cells
  # First cell: markdown title, then the hardware and the runtime.
  first = cells[0]
  assert first.cell_type == "markdown", first
  assert re.match(r"# \d\d ", first.source), "first cell must start with the notebook title"
  assert "**Hardware:**" in first.source and "**Runtime:**" in first.source, first.source
  # Second cell: the Colab install cell, the same in every notebook, REPO_URL set in one place.
  install = cells[1]
  assert install.cell_type == "code" and install.source.startswith("# Install (Colab)")
  assert install.source == jupytext.reads(_source(NOTEBOOKS[0]), fmt="py:percent").cells[1].source
  assert len(re.findall(r"^REPO_URL = ", install.source, re.M)) == 1
  assert "spacer_jax.colab" in install.source
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


def test_readme_links_every_notebook():
  readme = _source(os.path.join(ROOT, "notebooks", "README.md"))
  for name in NAMES:
    link = (f"https://colab.research.google.com/github/YOUR_ORG/spacer_jax/blob/main/notebooks/"
            f"{name[:-3]}.ipynb")
    assert link in readme, link


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_runs_with_smoke(path, tmp_path, monkeypatch):
  """Executes the .ipynb in a Jupyter kernel (this interpreter's ipykernel), as Colab would."""
  import nbclient  # pylint: disable=g-import-not-at-top
  name = os.path.basename(path)
  n = DEVICES.get(name, 1)
  env = dict(SMOKE="1", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT + os.pathsep + os.environ.get(
                 "PYTHONPATH", ""),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={n}" if n > 1 else "")
  for k, v in env.items():
    monkeypatch.setenv(k, v)  # the kernel inherits this process's environment
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, as in Colab
  nb = nbformat.read(_ipynb(path), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, errors

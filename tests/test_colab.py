"""spacer_jax.colab, the notebooks' installer: what it installs on a runtime that has some packages
already (never downgrading them), the jax backend per accelerator, and the constraints pip gets."""

import os

import pytest

from spacer_jax import colab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQS = """# comment
-r other.txt
jax==0.10.2
flax==0.12.8
numpy>=2.0,<3
matplotlib==3.11.2
av==18.1.0  # trailing comment
"""


def test_parse_requirements():
  assert colab.parse_requirements(REQS) == [
      ("jax", "==0.10.2"), ("flax", "==0.12.8"), ("numpy", ">=2.0,<3"),
      ("matplotlib", "==3.11.2"), ("av", "==18.1.0")]
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    names = [n for n, _ in colab.parse_requirements(f.read())]
  assert "jax" in names and set(colab.EXACT) <= {colab.norm(n) for n in names}
  with pytest.raises(ValueError, match="not understood"):
    colab.parse_requirements("jax==1; python_version<'3'")


def test_plan_keeps_newer_and_installs_older_or_missing():
  reqs = colab.parse_requirements(REQS)
  # A Colab-like runtime: newer matplotlib and av, numpy inside the range, an older jax, no flax.
  have = {"jax": "0.7.0", "jaxlib": "0.7.0", "numpy": "2.0.2", "matplotlib": "3.12.0",
          "av": "19.0.0"}
  todo, why = colab.plan(reqs, have, "cpu")
  assert todo == ["jax==0.10.2", "flax==0.12.8"]
  assert why["matplotlib"].startswith("kept 3.12.0") and why["numpy"].startswith("kept 2.0.2")
  # Older or out-of-range: installed at the pin / as specified.
  todo, _ = colab.plan(reqs, {**have, "matplotlib": "3.10.0", "numpy": "1.26.4"}, "cpu")
  assert "matplotlib==3.11.2" in todo and "numpy>=2.0,<3" in todo
  # flax is an exact pin: a newer one is replaced too.
  assert "flax==0.12.8" in colab.plan(reqs, {**have, "flax": "0.13.0"}, "cpu")[0]


@pytest.mark.parametrize("accelerator,backend,expected", [
    ("cpu", {}, []),
    ("tpu", {}, ["jax[tpu]==0.10.2"]),  # jax 0.10.2 without libtpu: add the TPU backend
    ("tpu", {"libtpu": "0.0.30"}, []),
    ("gpu", {}, ["jax[cuda12]==0.10.2"]),
    ("gpu", {"jax-cuda12-plugin": "0.10.2"}, []),
    ("gpu", {"jax-cuda12-plugin": "0.9.0"}, ["jax[cuda12]==0.10.2"]),
])
def test_plan_jax_backend(accelerator, backend, expected):
  have = {"jax": "0.10.2", "jaxlib": "0.10.2", "flax": "0.12.8", "numpy": "2.1.0",
          "matplotlib": "3.11.2", "av": "18.1.0", **backend}
  assert colab.plan(colab.parse_requirements(REQS), have, accelerator)[0] == expected


def test_constraints_hold_the_rest_at_their_versions():
  have = {"numpy": "2.0.2", "torch": "2.5.1+cu121", "jax": "0.7.0", "jaxlib": "0.7.0",
          "matplotlib": "3.10.0", "weird": "not-a-version"}
  text = colab.constraints(have, ["jax==0.10.2", "matplotlib==3.11.2"])
  assert text.split() == ["numpy>=2.0.2", "torch>=2.5.1"]  # not jax's family, not what we install


def test_dry_run_on_this_environment(capsys):
  assert colab.main(["--dry_run", "--accelerator=cpu"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("runtime: cpu") and "jax " in out

"""spacer_jax.cli: every entry point's --help, the packaged-config lookup, quiet library logs, the
console scripts of pyproject.toml."""

import logging
import os
import subprocess
import sys
import tomllib

import pytest
from absl import flags

from spacer_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every `python -m` entry point and flags its --help must mention.
ENTRY_POINTS = {
    "spacer_jax.train": ("--config", "--workdir", "train_and_evaluate"),
    "spacer_jax.evaluate": ("--config", "--workdir", "configs/eval_vsibench.py"),
    "spacer_jax.generate": ("--model_dir", "--video", "--image", "--question", "--max_new_tokens",
                            "--temperature", "--problem_type"),
    "spacer_jax.convert": ("--workdir", "--hf_dir", "--out", "--dtype", "--max_shard_size"),
    "spacer_jax.data.synthetic": ("--out", "--preset", "--num_scenes", "--categories_per_scene",
                                  "--task_weights", "--[no]overwrite"),
    "spacer_jax.demo": ("--config", "--workdir"),
    "spacer_jax.plan": ("--config", "--topology", "--json"),
    "spacer_jax.data.tfds_builders": ("--dataset", "--manual_dir", "--data_dir", "--[no]strict"),
    "spacer_jax.benchmarks.testdata": ("--out", "--benchmark", "--per_task", "--tiny_model"),
}


def _env():
  return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
              JAX_PLATFORMS="cpu")


def test_every_entry_point_help_exits_0_and_names_its_flags():
  procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=ROOT, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for m in ENTRY_POINTS}
  for module, proc in procs.items():
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (module, err[-2000:])
    for text in ENTRY_POINTS[module]:
      assert text in out, (module, text)
    assert "--helpfull" in out and "--verbosity" in out, module


def test_console_scripts_are_the_cli_functions():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert set(scripts) == set(cli.SCRIPTS)
  for name, target in scripts.items():
    module, func = target.split(":")
    assert module == "spacer_jax.cli" and callable(getattr(cli, func)), name
    assert cli.SCRIPTS[name] in ENTRY_POINTS or cli.SCRIPTS[name].removesuffix(".__main__") \
        in ENTRY_POINTS, name


def test_config_paths_resolve_against_the_packaged_configs(tmp_path, monkeypatch):
  packaged = tmp_path / "package_configs"
  packaged.mkdir()
  (packaged / "sgrlvr.py").write_text("def get_config(arg=None):\n  return None\n")
  monkeypatch.setattr(cli, "CONFIG_DIR", str(packaged))
  monkeypatch.chdir(tmp_path)
  want = str(packaged / "sgrlvr.py")
  for value in ("configs/sgrlvr.py", "spacer_jax/configs/sgrlvr.py", "sgrlvr.py", "sgrlvr"):
    assert cli.resolve_config(value) == want, value
    assert cli.resolve_config(value + ":smoke,size=7b") == want + ":smoke,size=7b", value
  # A file of that name here wins; other directories and unknown names are left to config_flags.
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "sgrlvr.py").write_text("")
  assert cli.resolve_config("configs/sgrlvr.py:smoke") == "configs/sgrlvr.py:smoke"
  assert cli.resolve_config("other/sgrlvr.py") == "other/sgrlvr.py"
  assert cli.resolve_config("nope") == "nope"
  fv = flags.FlagValues()
  flags.DEFINE_string("config", None, "", flag_values=fv)
  assert cli._resolve_config_args(["p", "--config", "sgrlvr:smoke", "--config.x=1"], fv) == \
      ["p", "--config", want + ":smoke", "--config.x=1"]
  with pytest.raises(cli.app.UsageError, match="no packaged config of that name"):
    cli._resolve_config_args(["p", "--config=nope:smoke"], fv)


def test_library_info_is_dropped_unless_verbosity_is_given():
  f = cli.OwnInfoOnly(extra_files=["/somewhere/main.py"])

  def record(level, path):
    return logging.LogRecord("absl", level, path, 1, "m", None, None)

  own = os.path.join(os.path.dirname(cli.__file__), "train.py")
  assert f.filter(record(logging.INFO, own))
  assert f.filter(record(logging.INFO, "/somewhere/main.py"))
  assert not f.filter(record(logging.INFO, "/site-packages/orbax/checkpoint/checkpoint_manager.py"))
  assert not f.filter(record(logging.DEBUG, "/site-packages/jax/_src/xla_bridge.py"))
  assert f.filter(record(logging.WARNING, "/site-packages/orbax/checkpoint/checkpoint_manager.py"))
  fv = flags.FlagValues()
  flags.DEFINE_integer("verbosity", -1, "", flag_values=fv)
  fv(["p", "--verbosity=0"])
  assert cli.quiet_library_logs(fv) is None  # asked for: absl's behaviour, every INFO line


def test_bad_input_is_one_error_line_without_a_traceback(tmp_path):
  out = subprocess.run([sys.executable, "-m", "spacer_jax.generate", f"--model_dir={tmp_path}/nope",
                        "--question=q"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "nope" in out.stderr


def test_packaged_configs_resolve_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert {"sgrlvr", "grpo", "sft", "eval_vsibench"} <= set(cli.packaged_configs())
  for value in ("configs/sgrlvr.py:smoke", "spacer_jax/configs/sgrlvr.py:smoke", "sgrlvr:smoke",
                "sgrlvr.py:smoke"):
    path, _, arg = cli.resolve_config(value).partition(":")
    assert path == os.path.join(cli.CONFIG_DIR, "sgrlvr.py") and os.path.isfile(path), value
    assert arg == "smoke", value

"""Command line: --help, generate from TOML/YAML configs, clear exit-2 errors, summary."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from numpyro_nnef.__main__ import load_config, main, parse_generate_config
from numpyro_nnef.dataset import ExpectationDataset

ROOT = Path(__file__).resolve().parents[1]

TOML = """
seed = 3
output = "{output}"

[family]
name = "LaplaceProduct"
dim = 1

[etas]
low = [0.5, 0.5]
high = [3.0, 3.0]
num = 4
scale = "uniform"

[sampler]
num_chains = 2
num_warmup = 100
num_samples = 200
chunk_size = 4
max_retries = 0
min_ess = 50
max_rhat = 1.1
"""

YAML = """
seed: 1
family:
  name: Gaussian
etas:
  low: [-1.0, -2.0]
  high: [1.0, -0.5]
  num: 3
  scale: [uniform, log-uniform]
sampler:
  num_chains: 2
  num_warmup: 100
  num_samples: 200
  chunk_size: 3
  max_retries: 0
  min_ess: 50
  max_rhat: 1.1
"""


def run_cli(*argv):
    return main(list(argv))


def test_help_lists_subcommands():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = subprocess.run([sys.executable, "-m", "numpyro_nnef", "--help"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("generate", "demo", "summary", "families"):
        assert name in out.stdout


def test_generate_from_toml(tmp_path, capsys):
    output = tmp_path / "laplace.npz"
    config = tmp_path / "cfg.toml"
    config.write_text(TOML.format(output=output))
    ckpt = tmp_path / "ckpt"
    assert run_cli("generate", "--config", str(config), "--no-progress",
                   "--checkpoint-dir", str(ckpt)) == 0
    text = capsys.readouterr().out
    from numpyro_nnef.families import get_family

    data = ExpectationDataset.load(output, family=get_family("LaplaceProduct", dim=1))
    assert len(data) == 4 and np.all((data.eta >= 0.5) & (data.eta <= 3.0))
    assert data.metadata["sampler"]["num_samples"] == 200
    assert data.metadata["cli"]["seed"] == 3 and data.metadata["cli"]["etas"]["num"] == 4
    assert "LaplaceProduct: 4 points" in text and "neg_abs_xm1[0]" in text
    assert "means vs exact oracle" in text and "within 3 MCSE" in text
    assert (ckpt / "chunk_00000.npz").exists()
    # summary of the saved file
    assert run_cli("summary", str(output)) == 0
    assert "failed points" in capsys.readouterr().out


def test_generate_from_yaml_with_output_flag(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(YAML)
    output = tmp_path / "out" / "gauss.npz"
    assert run_cli("generate", "--config", str(config), "--output", str(output),
                   "--no-progress") == 0
    data = ExpectationDataset.load(output)
    assert data.family_name == "Gaussian" and len(data) == 3
    assert np.all(data.eta[:, 1] < 0)
    text = capsys.readouterr().out
    assert "Gaussian: 3 points" in text and "within 3 MCSE" in text


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace('"LaplaceProduct"', '"NoSuch"'), "unknown family 'NoSuch'"),
        (lambda t: t.replace("num = 4", ""), "missing key 'num' in \\[etas\\]"),
        (lambda t: t.replace("num = 4", 'num = "four"'), "\\[etas\\] num must be an integer"),
        (lambda t: t.replace("num_chains = 2", "num_chains = 2.5"), "num_chains must be an int"),
        (lambda t: t.replace("num_chains = 2", "num_chain = 2"), "unknown key.*num_chain"),
        (lambda t: t.replace("dim = 1", "dimension = 1"), "bad arguments"),
        (lambda t: t.replace("low = [0.5, 0.5]", "low = [-3.0, -3.0]"), "natural domain"),
        (lambda t: t.replace("[family]", "[familly]"), "unknown top-level key"),
        (lambda t: t + "\n[[broken", "not valid TOML"),
    ],
)
def test_config_errors_exit_2(tmp_path, capsys, edit, message):
    config = tmp_path / "cfg.toml"
    config.write_text(edit(TOML.format(output=tmp_path / "x.npz")))
    assert run_cli("generate", "--config", str(config)) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "x.npz").exists()


def test_unknown_family_exit_code_in_subprocess(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(YAML.replace("Gaussian", "Unknown"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = subprocess.run([sys.executable, "-m", "numpyro_nnef", "generate", "--config",
                          str(config)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown family 'Unknown'" in out.stderr and "Traceback" not in out.stderr


def test_other_file_errors(tmp_path, capsys):
    assert run_cli("generate", "--config", str(tmp_path / "missing.toml")) == 2
    assert "cannot read config file" in capsys.readouterr().err
    bad = tmp_path / "cfg.json"
    bad.write_text("{}")
    assert run_cli("generate", "--config", str(bad)) == 2
    assert ".toml, .yaml or .yml" in capsys.readouterr().err
    yaml_list = tmp_path / "cfg.yml"
    yaml_list.write_text("- 1\n- 2\n")
    assert run_cli("generate", "--config", str(yaml_list)) == 2
    assert "top level" in capsys.readouterr().err
    assert run_cli("summary", str(tmp_path / "missing.npz")) == 2
    assert "no dataset file" in capsys.readouterr().err


def test_builtin_demo_config_is_valid():
    from importlib.resources import files

    path = Path(str(files("numpyro_nnef") / "configs" / "demo.toml"))
    config = parse_generate_config(load_config(path))
    assert config["family"] == {"name": "LaplaceProduct", "kwargs": {"dim": 1}}
    assert config["etas"]["low"] == [0.5, 0.5] and config["etas"]["high"] == [3.0, 3.0]
    assert 8 <= config["etas"]["num"] <= 32
    assert 2 <= config["sampler"]["num_chains"] <= 4

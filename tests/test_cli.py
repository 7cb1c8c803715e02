"""Command line: --help, generate from TOML/YAML configs, train and evaluate neural oracles,
clear exit-2 errors, summary."""

import contextlib
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import numpyro_nnef as nnef
from numpyro_nnef.__main__ import (
    check_model_choice,
    load_config,
    main,
    parse_generate_config,
    parse_train_config,
)
from numpyro_nnef.dataset import ExpectationDataset
from numpyro_nnef.families import Gamma, Gaussian

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
    for name in ("generate", "train", "evaluate", "demo", "summary", "families"):
        assert re.search(rf"^\s+{name}\s", out.stdout, re.MULTILINE), out.stdout


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
        # a bad [train] table is reported before any sampling
        (lambda t: t + '\n[train]\narchitecture = "nosuch"\n', "unknown architecture 'nosuch'"),
        (lambda t: t + "\n[train]\nmax_epochs = 0\n", "\\[train\\] max_epochs must be >= 1"),
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
    assert 64 <= config["etas"]["num"] <= 96
    assert 2 <= config["sampler"]["num_chains"] <= 4
    train = parse_train_config(load_config(path))
    assert train["dataset"] == "runs/demo/dataset.npz"
    assert train["train"]["output_dir"] == "runs/demo/oracle"
    assert train["train"]["max_epochs"] <= 500 and train["train"]["protocol"] == "regression"
    check_model_choice(train["train"]["architecture"], train["train"]["protocol"])


# ---------------------------------------------------------------------------------------------
# train and evaluate
# ---------------------------------------------------------------------------------------------
TRAIN_TOML = """
seed = 4

[train]
architecture = "glu"
hyperparameters = { hidden = [16, 16] }
max_epochs = 30
patience = 30
eval_every = 5
"""


def synthetic_dataset(family, etas, seed, noise=0.02, record_family=True):
    """Exact moments of ``family`` at ``etas`` with N(0, mcse^2) noise on the means."""
    exact = nnef.ExactOracle(family)
    mean, cov = np.asarray(exact.mean(etas)), np.asarray(exact.covariance(etas))
    mcse = noise * np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1))
    mean = mean + mcse * np.asarray(jax.random.normal(jax.random.key(seed), mean.shape))
    n, d = mean.shape
    ones = np.ones((n, d))
    return ExpectationDataset(
        family_name=family.name, stat_labels=family.stat_labels, eta=np.asarray(etas), mean=mean,
        cov=cov, ess_bulk=1000 * ones, ess_tail=1000 * ones, rhat=ones, mcse=mcse,
        divergences=np.zeros(n, int), num_samples=np.full(n, 1000), retries=np.zeros(n, int),
        passed=np.ones(n, bool),
        metadata={"family": family.describe()} if record_family else {},
    )


def gaussian_etas(n=60, seed=1):
    k1, k2 = jax.random.split(jax.random.key(seed))
    loc = jax.random.uniform(k1, (n,), minval=-1.0, maxval=1.0)
    scale = jax.random.uniform(k2, (n,), minval=0.7, maxval=1.5)
    return Gaussian().natural_from_loc_scale(loc, scale)


def run_captured(*argv):
    """(exit status, stdout, stderr) of the CLI run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def gaussian_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    data = synthetic_dataset(Gaussian(), gaussian_etas(), seed=2)
    path = data.save(root / "gauss.npz")
    config = root / "train.toml"
    config.write_text(TRAIN_TOML)
    return data, path, config


@pytest.fixture(scope="module")
def trained(gaussian_file, tmp_path_factory):
    data, path, config = gaussian_file
    out = tmp_path_factory.mktemp("cli_oracle") / "oracle"
    # the flags override the config's architecture (glu), max_epochs (30) and seed (4)
    rc, text, err = run_captured("train", "--dataset", path, "--output", out, "--config", config,
                                 "--architecture", "mlp", "--max-epochs", 20, "--seed", 5,
                                 "--no-progress")
    assert rc == 0, err
    assert "note: [train] hyperparameters are for architecture 'glu', not 'mlp'" in err
    return out, text


def table_rows(text):
    """{statistic: [numbers]} and the header cells of the markdown table in ``text``."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = [float(c) for c in cells[1:]]
    return header, rows


def test_train_writes_oracle_curves_and_summary(gaussian_file, trained):
    data, _, _ = gaussian_file
    out, text = trained
    for name in ("oracle.json", "weights.npz", "learning_curves.csv", "learning_curves.png"):
        assert (out / name).is_file(), name
    record = json.loads((out / "oracle.json").read_text())
    assert record["architecture"] == "mlp" and record["hyperparameters"] == {}
    with open(out / "learning_curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [5, 10, 15, 20]
    # the printed test RMSE is that of the saved oracle on the 80/10/10 test split (seed 0)
    oracle = nnef.load_oracle(out, out_of_range="ignore")
    test = data.split((0.8, 0.1, 0.1), seed=0)[2]
    rmse = np.sqrt(np.mean((np.asarray(oracle.mean(test.eta)) - test.mean) ** 2, axis=0))
    printed = re.search(r"test RMSE per statistic: x (\S+), x2 (\S+)", text)
    np.testing.assert_allclose([float(printed[1]), float(printed[2])], rmse, rtol=1e-3)
    assert "training mlp/regression on" in text and "seed 5" in text
    assert "48 train / 6 validation / 6 test; excluded: none" in text
    assert re.search(r"best epoch \d+ of 20 run", text)
    values = [a.value for a in oracle.anchors]
    assert len(values) == 32 and {a.method for a in oracle.anchors} == {"quadrature"}
    assert (f"log-partition anchors: 32 training eta (quadrature), A from {min(values):.6g} to "
            f"{max(values):.6g}, max stderr 0, max k-hat n/a") in text
    assert str(out / "learning_curves.png") in text


def test_evaluate_table_against_test_split_and_exact(gaussian_file, trained):
    data, path, _ = gaussian_file
    out, _ = trained
    rc, text, err = run_captured("evaluate", "--oracle", out, "--dataset", path)
    assert rc == 0, err
    assert "the test split (6 of 60 points)" in text
    header, rows = table_rows(text)
    assert header == ["statistic", "RMSE vs data", "RMSE vs exact", "data RMSE vs exact",
                      "max rel. error vs exact"]
    assert set(rows) == {"x", "x2"}
    oracle = nnef.load_oracle(out, out_of_range="ignore")
    exact = nnef.ExactOracle(Gaussian())
    test = data.split((0.8, 0.1, 0.1), seed=0)[2]
    pred, truth = np.asarray(oracle.mean(test.eta)), np.asarray(exact.mean(test.eta))
    expected = [np.sqrt(np.mean((pred - test.mean) ** 2, 0)),
                np.sqrt(np.mean((pred - truth) ** 2, 0)),
                np.sqrt(np.mean((test.mean - truth) ** 2, 0))]
    for j, label in enumerate(("x", "x2")):
        np.testing.assert_allclose(rows[label][:3], [e[j] for e in expected], rtol=6e-3)
    # the evaluate RMSE vs data is train's own test RMSE: the same split
    np.testing.assert_allclose([rows["x"][0], rows["x2"][0]],
                               oracle.metadata["training"]["test_rmse"], rtol=6e-3)
    a_error = np.max(np.abs(np.asarray(oracle.log_partition(test.eta))
                            - np.asarray(exact.log_partition(test.eta))))
    printed = float(re.search(r"max \|A error\| vs exact (\S+)", text)[1])
    np.testing.assert_allclose(printed, a_error, rtol=6e-3)
    assert re.search(r"evaluation time: \S+ us per eta \(E\[T\], batch of 10000", text)


def test_evaluate_without_dataset_uses_training_box(trained):
    out, _ = trained
    rc, text, err = run_captured("evaluate", "--oracle", out)
    assert rc == 0, err
    header, rows = table_rows(text)
    assert header == ["statistic", "RMSE vs exact", "max rel. error vs exact"]
    assert "256 etas uniform in the training box" in text and "warning" not in err + text
    assert all(np.isfinite(v).all() and min(v) > 0 for v in rows.values())


def test_evaluate_warns_outside_training_range(trained, tmp_path):
    out, _ = trained
    oracle = nnef.load_oracle(out, out_of_range="ignore")
    u = np.linspace(0.1, 0.9, 12)[:, None]
    etas = oracle.eta_low + u * (oracle.eta_high - oracle.eta_low)  # inside the training box
    etas[:3, 0] = oracle.eta_high[0] + 1.0  # three eta beyond it
    path = synthetic_dataset(Gaussian(), etas, seed=8).save(tmp_path / "wide.npz")
    rc, text, err = run_captured("evaluate", "--oracle", out, "--dataset", path)
    assert rc == 0, err
    assert "all 12 finite points (not the training dataset" in text
    assert "warning: 3 of 12 eta lie outside the training range" in text


def _toml(tmp_path, text):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("max_epochs", "max_epoch"), r"unknown key.*'max_epoch'.*\[train\]"),
        (lambda t: t.replace("max_epochs = 30", 'max_epochs = "30"'),
         r"\[train\] max_epochs must be an integer"),
        (lambda t: t + "learning_rate = 0\n", r"\[train\] learning_rate must be > 0"),
        (lambda t: t.replace('"glu"', '"nosuch"'),
         r"unknown architecture 'nosuch'; .*regression: mlp, .*; fm, ct, df: potential_flow"),
        (lambda t: t + 'protocol = "nope"\n',
         r"unknown protocol 'nope'; known protocols: regression, fm, ct, df"),
        (lambda t: t + 'protocol = "fm"\n',
         r"architecture 'glu' does not work with protocol 'fm'; it takes potential_flow"),
        (lambda t: t.replace("{ hidden = [16, 16] }", "3"),
         r"\[train\] hyperparameters must be a table"),
        (lambda t: t.replace("hidden = [16, 16]", "width = 3"),
         r"cannot train: unknown hyperparameters \['width'\] for 'glu'"),
        (lambda t: t + "protocol_options = { steps = 3 }\n",
         r"protocol_options: unknown option\(s\) \['steps'\]"),
        (lambda t: t + 'anchor = "maybe"\n', r"\[train\] anchor must be one of"),
        (lambda t: t + "num_anchors = 0\n", r"\[train\] num_anchors must be >= 1"),
        (lambda t: t + 'weighting = "heavy"\n', r"\[train\] weighting must be one of"),
        (lambda t: t + "fractions = [0.5, 0.5, 0.5]\n", r"\[train\] fractions must be three"),
        (lambda t: t + "drop_failed = 1\n", r"\[train\] drop_failed must be true or false"),
        (lambda t: t.replace("seed = 4", "sed = 4"), r"unknown top-level key"),
        (lambda t: t + '[family]\nname = "Gamma"\n',
         r"dataset is for family 'Gaussian', not 'Gamma'.*config's \[family\]"),
    ],
)
def test_train_config_errors_exit_2(gaussian_file, tmp_path, edit, message):
    _, path, _ = gaussian_file
    config = _toml(tmp_path, edit(TRAIN_TOML))
    out = tmp_path / "oracle"
    rc, _, err = run_captured("train", "--dataset", path, "--output", out, "--config", config)
    assert rc == 2
    assert "train: error:" in err and "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()


def test_parse_train_config_yaml_and_none_anchor():
    import yaml

    for anchor in ("none", None):
        raw = yaml.safe_load(f"train:\n  anchor: {anchor or 'null'}\n"
                             "  fractions: [0.6, 0.2, 0.2]\n  sobolev_weight: 0\n")
        train = parse_train_config(raw)["train"]
        assert train == {"anchor": None, "fractions": (0.6, 0.2, 0.2), "sobolev_weight": 0.0}


def test_train_and_evaluate_bad_input(gaussian_file, trained, tmp_path):
    _, path, config = gaussian_file
    out, _ = trained
    cases = [
        (("train", "--dataset", tmp_path / "missing.npz", "--output", tmp_path / "o"),
         "no dataset file"),
        (("train", "--dataset", path), "no output directory"),
        (("train", "--output", tmp_path / "o"), "no dataset: pass --dataset"),
        (("train", "--dataset", path, "--output", tmp_path / "o", "--protocol", "ct"),
         "architecture 'mlp' does not work with protocol 'ct'"),
        (("evaluate", "--oracle", tmp_path / "nowhere"), "incomplete oracle directory"),
    ]
    # a dataset without a family record (a user family) needs [family] in a config
    anonymous = synthetic_dataset(Gaussian(), gaussian_etas(12), seed=3, record_family=False)
    cases.append((("train", "--dataset", anonymous.save(tmp_path / "anon.npz"), "--output",
                   tmp_path / "o"), r"does not record its family.*\[family\] name"))
    # evaluate: incomplete, foreign-version or other-family input
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    (partial / "weights.npz").unlink()
    cases.append((("evaluate", "--oracle", partial), "incomplete oracle directory, weights.npz"))
    future = tmp_path / "future"
    shutil.copytree(out, future)
    record = json.loads((future / "oracle.json").read_text())
    (future / "oracle.json").write_text(json.dumps({**record, "version": 99}))
    cases.append((("evaluate", "--oracle", future), "format version 99"))
    gamma = synthetic_dataset(Gamma(), np.array([[1.0, -2.0], [0.5, -1.0]]), seed=4)
    cases.append((("evaluate", "--oracle", out, "--dataset", gamma.save(tmp_path / "g.npz")),
                  "dataset is for family 'Gamma', not 'Gaussian'"))
    for argv, message in cases:
        rc, _, err = run_captured(*argv)
        assert rc == 2, (argv, err)
        assert "error:" in err and "Traceback" not in err
        assert re.search(message, err), (argv, err)
    assert not (tmp_path / "o").exists()

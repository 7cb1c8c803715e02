"""train_oracle and NeuralOracle: accuracy against exact answers, log-partition, inverse map,
save/load identity, training-range checks and bad input.

Datasets here are synthetic: exact E[T] plus Gaussian noise of a known MCSE (the trainer is what
is tested; NUTS datasets are covered in test_sampling and the benchmark)."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpyro_nnef as nnef
from numpyro_nnef.families import Gamma, Gaussian, LaplaceProduct
from numpyro_nnef.oracles.neural import load_oracle

FAST = {"max_epochs": 400, "patience": 400, "eval_every": 50, "progress": False}


def synthetic_dataset(family, etas, key, noise=0.01, nan_rows=()):
    """Exact moments with N(0, mcse^2) noise added to the means; rows in ``nan_rows`` fail."""
    exact = nnef.ExactOracle(family)
    mean = np.asarray(exact.mean(etas))
    cov = np.asarray(exact.covariance(etas))
    mcse = noise * np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1))
    mean = mean + mcse * np.asarray(jax.random.normal(key, mean.shape))
    n, d = mean.shape
    passed = np.ones(n, bool)
    for i in nan_rows:
        mean[i] = np.nan
        passed[i] = False
    ones = np.ones((n, d))
    return nnef.ExpectationDataset(
        family_name=family.name, stat_labels=family.stat_labels, eta=np.asarray(etas), mean=mean,
        cov=cov, ess_bulk=1000 * ones, ess_tail=1000 * ones, rhat=ones, mcse=mcse,
        divergences=np.zeros(n, int), num_samples=np.full(n, 1000), retries=np.zeros(n, int),
        passed=passed, metadata={"family": family.describe()},
    )


def gaussian_etas(n, key, shrink=0.0):
    """Gaussian etas from loc in [-1, 1] and scale in [0.7, 1.5], ranges shrunk by ``shrink``."""
    k1, k2 = jax.random.split(key)
    loc = jax.random.uniform(k1, (n,), minval=-1.0 + shrink, maxval=1.0 - shrink)
    scale = jax.random.uniform(k2, (n,), minval=0.7 + shrink, maxval=1.5 - shrink)
    return Gaussian().natural_from_loc_scale(loc, scale)


@pytest.fixture(scope="module")
def gaussian_data():
    family = Gaussian()
    etas = gaussian_etas(300, jax.random.key(1))
    return family, synthetic_dataset(family, etas, jax.random.key(2))


@pytest.fixture(scope="module")
def mlp_oracle(gaussian_data, tmp_path_factory):
    _, data = gaussian_data
    out = tmp_path_factory.mktemp("mlp")
    oracle = nnef.train_oracle(data, key=jax.random.key(3), hyperparameters={"hidden": (32, 32)},
                               output_dir=out, **FAST)
    return oracle, out


def inside_etas(data, n=40, seed=5):
    """Fresh etas well inside the training distribution."""
    return np.asarray(gaussian_etas(n, jax.random.key(seed), shrink=0.15))


def test_learns_means_better_than_its_noisy_data(gaussian_data, mlp_oracle):
    family, data = gaussian_data
    oracle, _ = mlp_oracle
    etas = inside_etas(data)
    exact = nnef.ExactOracle(family)
    err = np.asarray(oracle.mean(etas) - exact.mean(etas))
    noise = synthetic_dataset(family, etas, jax.random.key(6))
    data_err = noise.mean - np.asarray(exact.mean(etas))
    assert np.all(np.sqrt(np.mean(err**2, 0)) < np.sqrt(np.mean(data_err**2, 0)))
    assert oracle.report.num_train == 240 and oracle.report.num_test == 30
    assert oracle.report.best_epoch > 0


def test_log_partition_is_absolute(gaussian_data, mlp_oracle):
    family, data = gaussian_data
    oracle, _ = mlp_oracle
    assert oracle.anchor.method == "quadrature"
    etas = inside_etas(data)
    exact = nnef.ExactOracle(family).log_partition(etas)
    assert np.abs(np.asarray(oracle.log_partition(etas) - exact)).max() < 0.02


def test_covariance_close_to_exact_and_symmetric(gaussian_data, mlp_oracle):
    family, data = gaussian_data
    oracle, _ = mlp_oracle
    etas = inside_etas(data, n=10)
    cov = np.asarray(oracle.covariance(etas))
    np.testing.assert_allclose(cov, np.swapaxes(cov, -1, -2))
    exact = np.asarray(nnef.ExactOracle(family).covariance(etas))
    assert np.abs(cov - exact).max() < 0.15 * np.abs(exact).max()


def test_inverse_map_round_trip(gaussian_data, mlp_oracle):
    _, data = gaussian_data
    oracle, _ = mlp_oracle
    etas = inside_etas(data, n=8, seed=7)
    mu = oracle.mean(etas)
    back = oracle.natural_from_mean(mu)
    np.testing.assert_allclose(np.asarray(oracle.mean(back)), np.asarray(mu), atol=1e-6)
    np.testing.assert_allclose(np.asarray(back), etas, atol=1e-3)


def test_save_load_identity(gaussian_data, mlp_oracle):
    _, data = gaussian_data
    oracle, out = mlp_oracle
    loaded = load_oracle(out)
    etas = inside_etas(data, n=6)
    for method in ("mean", "covariance", "log_partition"):
        np.testing.assert_array_equal(np.asarray(getattr(loaded, method)(etas)),
                                      np.asarray(getattr(oracle, method)(etas)))
    assert (out / "learning_curves.csv").read_text().startswith("epoch,train_loss,val_rmse")
    assert (out / "learning_curves.png").stat().st_size > 1000


def test_jit_and_vmap(gaussian_data, mlp_oracle):
    _, data = gaussian_data
    oracle, _ = mlp_oracle
    etas = jnp.asarray(inside_etas(data, n=4))
    eager = oracle.mean(etas)
    np.testing.assert_allclose(jax.jit(oracle.mean)(etas), eager, rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(oracle.mean)(etas), eager, rtol=1e-12)
    assert oracle.mean(etas[0]).shape == (2,)
    assert oracle.mean(etas.reshape(2, 2, 2)).shape == (2, 2, 2)


def test_out_of_range_warns_errors_or_ignores(gaussian_data, mlp_oracle, tmp_path):
    _, data = gaussian_data
    oracle, out = mlp_oracle
    far = data.eta.max(0) + 1.0
    with pytest.warns(RuntimeWarning, match="outside the training range"):
        oracle.mean(far)
    with pytest.warns(RuntimeWarning, match="outside the training range"):
        jax.block_until_ready(jax.jit(oracle.mean)(far))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        oracle.mean(inside_etas(data, n=3))
        load_oracle(out, out_of_range="ignore").mean(far)
    with pytest.raises(ValueError, match="outside the training range"):
        load_oracle(out, out_of_range="error").mean(far)
    assert not bool(oracle.in_training_range(far)) and bool(oracle.in_training_range(data.eta[0]))


def test_wrong_eta_shape(mlp_oracle):
    oracle, _ = mlp_oracle
    with pytest.raises(ValueError, match="eta must have shape"):
        oracle.mean(jnp.zeros(3))


def test_gradient_architecture_has_psd_covariance_and_learned_log_partition(gaussian_data):
    family, data = gaussian_data
    oracle = nnef.train_oracle(data, key=jax.random.key(4), architecture="logz_icnn",
                               hyperparameters={"hidden": (16, 16)}, **FAST)
    assert oracle.learned_log_partition
    etas = jax.random.uniform(jax.random.key(9), (20, 2), minval=-3.0, maxval=3.0)
    etas = etas.at[:, 1].set(-jnp.abs(etas[:, 1]) - 0.1)
    cov = np.asarray(oracle.covariance(etas))
    assert np.linalg.eigvalsh(cov).min() > -1e-10
    inside = inside_etas(data, n=10)
    err = np.asarray(oracle.log_partition(inside) - nnef.ExactOracle(family).log_partition(inside))
    assert np.abs(err).max() < 0.05


def test_nan_rows_are_excluded_and_reported():
    family = Gaussian()
    data = synthetic_dataset(family, gaussian_etas(60, jax.random.key(1)), jax.random.key(2),
                             nan_rows=(3, 7))
    with pytest.warns(RuntimeWarning, match="'non_finite': 2"):
        oracle = nnef.train_oracle(data, key=jax.random.key(0), anchor=None,
                                   hyperparameters={"hidden": (8,)},
                                   **{**FAST, "max_epochs": 5})
    assert oracle.report.excluded["non_finite"] == 2
    assert oracle.report.num_train + oracle.report.num_val + oracle.report.num_test == 58
    assert np.all(np.isfinite(np.asarray(oracle.mean(data.eta[:5]))))
    with pytest.raises(ValueError, match="no log-partition anchor"):
        oracle.log_partition(data.eta[0])


def test_dataset_from_another_family_is_refused(gaussian_data):
    _, data = gaussian_data
    with pytest.raises(ValueError, match="dataset is for family 'Gaussian'"):
        nnef.train_oracle(data, key=jax.random.key(0), family=Gamma(), **FAST)
    with pytest.raises(ValueError, match="architecture .transformer. is not available"):
        nnef.train_oracle(data, key=jax.random.key(0), architecture="transformer", **FAST)
    with pytest.raises(ValueError, match="weighting"):
        nnef.train_oracle(data, key=jax.random.key(0), weighting="robust", **FAST)


def test_incomplete_or_foreign_oracle_directory(mlp_oracle, tmp_path):
    _, out = mlp_oracle
    with pytest.raises(FileNotFoundError, match="incomplete oracle directory"):
        load_oracle(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((out / "oracle.json").read_text())
    (broken / "weights.npz").write_bytes((out / "weights.npz").read_bytes()[:-10])
    (broken / "oracle.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weights do not match"):
        load_oracle(broken)
    (broken / "oracle.json").write_text(json.dumps({**config, "version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        load_oracle(broken)
    with pytest.raises(ValueError, match="oracle is for Gaussian"):
        load_oracle(out, family=LaplaceProduct(1))


def test_distribution_accepts_a_trained_oracle(gaussian_data, mlp_oracle):
    family, data = gaussian_data
    oracle, _ = mlp_oracle
    eta = jnp.asarray(inside_etas(data, n=1)[0])
    d = nnef.EFDistribution(family, eta, oracle=oracle)
    x = jnp.linspace(-2.0, 2.0, 5)
    exact = nnef.EFDistribution(family, eta)
    np.testing.assert_allclose(d.log_prob(x), exact.log_prob(x), atol=0.02)
    np.testing.assert_allclose(d.mean, exact.mean, atol=0.05)

"""train_oracle and NeuralOracle: accuracy against exact answers, log-partition, inverse map,
save/load identity, training-range checks and bad input.

Datasets here are synthetic: exact E[T] plus Gaussian noise of a known MCSE (the trainer is what
is tested; NUTS datasets are covered in test_sampling and the benchmark)."""

import ast
import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpyro_nnef as nnef
from numpyro_nnef.families import Gamma, Gaussian, LaplaceProduct
from numpyro_nnef.oracles.neural import NEAREST_ANCHORS, NeuralOracle, load_oracle
from numpyro_nnef.training.trainer import DEFAULT_NUM_ANCHORS, farthest_points

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


def with_anchors(oracle, anchors):
    """The same network and standardisation with other anchors."""
    return NeuralOracle(oracle.family, oracle.protocol, oracle.architecture,
                        oracle.hyperparameters, oracle.model, oracle.standardization,
                        oracle.eta_low, oracle.eta_high, anchors=anchors)


def test_log_partition_is_absolute(gaussian_data, mlp_oracle):
    family, data = gaussian_data
    oracle, _ = mlp_oracle
    anchors = oracle.anchors
    assert len(anchors) == DEFAULT_NUM_ANCHORS["quadrature"]
    assert {a.method for a in anchors} == {"quadrature"}
    # anchors are distinct training etas, the first the one nearest the centre
    train = data.split((0.8, 0.1, 0.1), seed=0)[0]
    s = (train.eta - oracle.standardization.eta_shift) / oracle.standardization.eta_scale
    rows = {tuple(e) for e in train.eta.tolist()}
    assert all(a.eta in rows for a in anchors) and len({a.eta for a in anchors}) == len(anchors)
    assert anchors[0].eta == tuple(train.eta[np.argmin(np.sum(s**2, 1))])
    etas = jnp.asarray(np.concatenate([inside_etas(data), train.eta]))
    exact = np.asarray(nnef.ExactOracle(family).log_partition(etas))
    blended = np.asarray(oracle.log_partition(etas))
    assert np.abs(blended - exact).max() < 0.02
    single = np.asarray(with_anchors(oracle, anchors[:1]).log_partition(etas))  # central anchor
    assert np.abs(single - exact).max() < 0.02
    # at an anchor the blend stays within the network's error of the anchor's own value
    rows = [train.eta.tolist().index(list(a.eta)) + 40 for a in anchors]
    assert np.abs(blended[rows] - [a.value for a in anchors]).max() < 0.005


def test_anchor_weights_are_local_normalised_and_continuous(gaussian_data, mlp_oracle):
    _, data = gaussian_data
    oracle, _ = mlp_oracle
    # a line across the training distribution, through many anchor neighbourhoods, in small steps
    ends = Gaussian().natural_from_loc_scale(jnp.array([-0.85, 0.85]), jnp.array([0.85, 1.35]))
    t = jnp.linspace(0.0, 1.0, 4001)[:, None]
    line = ends[0] + t * (ends[1] - ends[0])
    index, weights = jax.jit(jax.vmap(oracle.anchor_weights))(line)
    assert index.shape == weights.shape == (4001, NEAREST_ANCHORS)
    assert np.all(np.asarray(weights) >= 0)
    np.testing.assert_allclose(np.asarray(weights).sum(1), 1.0, rtol=1e-12)
    dense = np.zeros((4001, len(oracle.anchors)))
    np.put_along_axis(dense, np.asarray(index), np.asarray(weights), axis=1)
    assert len(np.unique(np.argmax(dense, 1))) >= 4  # the nearest anchor changes along the line
    # no jumps: an anchor enters or leaves the nearest few with weight zero
    assert np.abs(np.diff(dense, axis=0)).max() < 0.02
    a_net = np.asarray(oracle.log_partition(line))
    a_exact = np.asarray(nnef.ExactOracle(Gaussian()).log_partition(line))
    assert np.abs(np.diff(a_net - a_exact)).max() < 1e-4


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
    assert len(loaded.anchors) > 1 and loaded.anchors == oracle.anchors
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
    log_z = oracle.log_partition(etas)
    np.testing.assert_allclose(jax.jit(jax.vmap(oracle.log_partition_single))(etas), log_z,
                               rtol=1e-12)
    grad = jax.jit(jax.grad(oracle.log_partition_single))(etas[0])
    assert np.all(np.isfinite(np.asarray(grad)))


def test_out_of_range_warns_errors_or_ignores(gaussian_data, mlp_oracle, tmp_path):
    _, data = gaussian_data
    oracle, out = mlp_oracle
    far = data.eta.min(0) - 1.0  # inside the natural domain (eta[x2] < 0), outside the box
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


def test_version_1_directory_with_one_anchor_loads(gaussian_data, mlp_oracle, tmp_path):
    _, data = gaussian_data
    oracle, out = mlp_oracle
    config = json.loads((out / "oracle.json").read_text())
    old = {k: v for k, v in config.items() if k != "anchors"}
    old |= {"version": 1, "anchor": config["anchors"][0]}
    (tmp_path / "weights.npz").write_bytes((out / "weights.npz").read_bytes())
    (tmp_path / "oracle.json").write_text(json.dumps(old))
    loaded = load_oracle(tmp_path)
    assert loaded.anchors == oracle.anchors[:1]
    etas = inside_etas(data, n=6)
    np.testing.assert_array_equal(np.asarray(loaded.log_partition(etas)),
                                  np.asarray(with_anchors(oracle, oracle.anchors[:1])
                                             .log_partition(etas)))
    (tmp_path / "oracle.json").write_text(json.dumps({**old, "anchor": None}))
    assert load_oracle(tmp_path).anchors == ()


def test_farthest_points():
    points = np.array([[0.0], [1.0], [2.0], [3.0], [10.0], [3.0]])
    np.testing.assert_array_equal(farthest_points(points, 3, start=1), [1, 4, 3])
    # stops once every row coincides with a chosen one (rows 3 and 5 are equal)
    np.testing.assert_array_equal(np.sort(farthest_points(points, 10, start=0)), [0, 1, 2, 3, 4])


def test_gradient_architecture_has_psd_covariance_and_learned_log_partition(gaussian_data):
    family, data = gaussian_data
    oracle = nnef.train_oracle(data, key=jax.random.key(4), architecture="logz_icnn",
                               hyperparameters={"hidden": (16, 16)}, **FAST)
    assert oracle.learned_log_partition
    # A = A_net + sum_k w_k (A_k - A_net(eta_k)): the learned A shifted by a blended constant
    eta = jnp.asarray(inside_etas(data, n=1)[0])
    index, weights = jax.jit(oracle.anchor_weights)(eta)
    a_net = jax.jit(jax.vmap(oracle._learned_log_partition))
    residual = np.array([a.value for a in oracle.anchors]) - np.asarray(
        a_net(jnp.asarray([a.eta for a in oracle.anchors])))
    shift = np.asarray(weights) @ residual[np.asarray(index)]
    np.testing.assert_allclose(oracle.log_partition(eta), a_net(eta[None])[0] + shift, rtol=1e-10)
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
    with pytest.raises(ValueError, match="num_anchors"):
        nnef.train_oracle(data, key=jax.random.key(0), num_anchors=0, **FAST)


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
    (broken / "weights.npz").write_bytes((out / "weights.npz").read_bytes())
    (broken / "oracle.json").write_text(json.dumps({**config, "protocol": {"name": "sgd",
                                                                           "options": {}}}))
    with pytest.raises(ValueError, match="protocol 'sgd', which is not registered.*regression"):
        load_oracle(broken)


def test_oracles_do_not_import_the_training_layer():
    """oracles/ sits below training/: load_oracle finds protocols in oracles.neural's registry,
    which training.protocols fills."""
    package = Path(nnef.__file__).parent
    for path in sorted((package / "oracles").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                assert "training" not in module, f"{path.name} imports {module}"


def test_distribution_accepts_a_trained_oracle(gaussian_data, mlp_oracle):
    family, data = gaussian_data
    oracle, _ = mlp_oracle
    eta = jnp.asarray(inside_etas(data, n=1)[0])
    d = nnef.EFDistribution(family, eta, oracle=oracle)
    x = jnp.linspace(-2.0, 2.0, 5)
    exact = nnef.EFDistribution(family, eta)
    np.testing.assert_allclose(d.log_prob(x), exact.log_prob(x), atol=0.02)
    np.testing.assert_allclose(d.mean, exact.mean, atol=0.05)


QUARTIC_MODULE = '''
import jax.numpy as jnp
from numpyro_nnef import ExponentialFamily, NaturalDomain

QUARTIC = ExponentialFamily.from_statistics(
    "quartic", lambda x: {"x": x, "x2": x**2, "x3": x**3, "x4": x**4},
    natural_constraint=NaturalDomain(lambda e: e[..., 3] < 0, "eta[x4] < 0", [0, 0, 0, -1]))
'''


def test_user_family_dataset_trains_without_family_and_reloads_by_reference(
        tmp_path, monkeypatch):
    (tmp_path / "nnef_user_quartic.py").write_text(QUARTIC_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from nnef_user_quartic import QUARTIC

    u = np.asarray(jax.random.uniform(jax.random.key(5), (24, 4)))
    etas = np.stack([u[:, 0] - 0.5, -0.5 * u[:, 1], 0.4 * u[:, 2] - 0.2, -0.3 - 0.7 * u[:, 3]],
                    axis=1)
    dataset = nnef.generate_dataset(QUARTIC, etas, key=jax.random.key(6), num_chains=2,
                                    num_warmup=150, num_samples=300, chunk_size=24,
                                    max_retries=0, min_ess=20, max_rhat=1.2, progress=False,
                                    target_acceptance_rate=0.95)
    assert dataset.family is QUARTIC and dataset.split()[0].family is QUARTIC
    oracle = nnef.train_oracle(dataset, key=jax.random.key(7), num_anchors=4,
                               **{**FAST, "max_epochs": 100})
    assert oracle.family is QUARTIC
    out = oracle.save(tmp_path / "quartic_oracle")

    # the files hold no family object: a user family is named by reference (or passed)
    with pytest.raises(ValueError, match="'quartic' is not a built-in family.*module:attribute"):
        load_oracle(out)
    loaded = load_oracle(out, family="nnef_user_quartic:QUARTIC")
    assert loaded.family is QUARTIC
    np.testing.assert_array_equal(np.asarray(loaded.mean(etas[:3])),
                                  np.asarray(oracle.mean(etas[:3])))
    with pytest.raises(ValueError, match="nnef_user_quartic:MISSING.*cannot import"):
        load_oracle(out, family="nnef_user_quartic:MISSING")

    path = dataset.save(tmp_path / "quartic.npz")
    with pytest.raises(ValueError, match="'quartic' is not a built-in family.*module:attribute"):
        nnef.train_oracle(nnef.ExpectationDataset.load(path), key=jax.random.key(0), **FAST)
    reloaded = nnef.ExpectationDataset.load(path, family="nnef_user_quartic:QUARTIC")
    assert reloaded.family is QUARTIC

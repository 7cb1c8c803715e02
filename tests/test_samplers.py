"""Flow samplers: training, importance datasets against exact answers, save/load, bad input."""

import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpyro_nnef as nnef
from numpyro_nnef import samplers
from numpyro_nnef.nn.bijections import build_conditional_flow

BOX = ([-2.0, -2.0], [2.0, -0.5])  # Gaussian: loc in [-2, 2], scale in [0.5, 1]
SETTINGS = {"architecture": "realnvp", "hyperparameters": {"num_layers": 2, "hidden": (16, 16)},
            "num_steps": 300, "batch_size": 128, "learning_rate": 3e-3, "progress": False}


@pytest.fixture(scope="module")
def family():
    return nnef.families.Gaussian()


@pytest.fixture(scope="module")
def sampler(family):
    return nnef.train_flow_sampler(family, BOX, key=jax.random.key(0), **SETTINGS)


@pytest.fixture(scope="module")
def etas(family):
    return nnef.sample_etas(family, key=jax.random.key(7), low=BOX[0], high=BOX[1], num=6)


def test_importance_dataset_matches_exact_answers(family, sampler, etas):
    data = nnef.importance_dataset(family, sampler, etas, key=jax.random.key(1),
                                   num_samples=2000, chunk_size=3, progress=False)
    exact = nnef.ExactOracle(family)
    mean = np.asarray(exact.mean(jnp.asarray(etas)))
    cov = np.asarray(exact.covariance(jnp.asarray(etas)))
    log_z = np.asarray(exact.log_partition(jnp.asarray(etas)))
    khat = data.extras["khat"]
    assert np.all(khat < 0.7) and np.all(data.passed)
    assert np.all(np.abs(data.mean - mean) < 4 * data.mcse)
    assert np.all(data.mcse < 0.1)  # the error bound is informative, not vacuous
    assert np.all(np.abs(data.extras["log_z"] - log_z) < 4 * data.extras["log_z_mcse"] + 1e-9)
    np.testing.assert_allclose(data.cov, cov, rtol=0.2, atol=0.05)
    assert np.all(data.ess_bulk > 500) and np.all(data.ess_bulk <= 2000 + 1e-9)
    assert np.all(data.rhat == 1.0) and np.all(data.divergences == 0)
    assert np.all(data.num_samples == 2000) and np.all(data.extras["dropped"] == 0)
    assert data.metadata["sampler"]["method"] == "importance"
    assert data.family is family  # kept in memory: train_oracle(data) needs no family=
    # point i uses fold_in(key, i): a padded last chunk does not change the result
    fewer = nnef.importance_dataset(family, sampler, etas[:5], key=jax.random.key(1),
                                    num_samples=2000, chunk_size=3, progress=False)
    np.testing.assert_array_equal(fewer.mean, data.mean[:5])


def test_sample_and_log_prob_are_consistent(family, sampler, etas):
    eta = jnp.asarray(etas[:3])
    x, log_q = sampler.sample_and_log_prob(jax.random.key(2), eta, (5,))
    assert x.shape == (5, 3) and log_q.shape == (5, 3)
    np.testing.assert_allclose(sampler.log_prob(x, eta), log_q, atol=1e-9)
    np.testing.assert_allclose(jax.jit(sampler.log_prob)(x, eta), log_q, atol=1e-9)
    np.testing.assert_array_equal(sampler.sample(jax.random.key(2), eta, (5,)), x)
    jitted = jax.jit(lambda k, e: sampler.sample_and_log_prob(k, e, (5,)))(jax.random.key(2), eta)
    np.testing.assert_allclose(jitted[0], x, atol=1e-12)
    np.testing.assert_allclose(jax.vmap(sampler.log_prob, in_axes=(1, 0))(x, eta), log_q.T,
                               atol=1e-9)
    assert not np.allclose(sampler.sample(jax.random.key(3), eta, (5,)), x)
    # batch shapes broadcast: one x against three eta
    assert sampler.log_prob(jnp.asarray(0.3), eta).shape == (3,)
    # q(. | eta) is a normalised density: trapezoid rule on a wide grid
    grid = jnp.linspace(-15.0, 15.0, 6001)
    density = jnp.exp(sampler.log_prob(grid[:, None], eta))
    np.testing.assert_allclose(jnp.trapezoid(density, grid, axis=0), 1.0, atol=1e-6)


def test_save_load_roundtrip(family, sampler, etas, tmp_path):
    sampler.save(tmp_path / "s")
    loaded = nnef.load_flow_sampler(tmp_path / "s")
    assert loaded.architecture == sampler.architecture == "realnvp"
    assert loaded.config() == sampler.config()
    eta = jnp.asarray(etas)
    x = sampler.sample(jax.random.key(4), eta, (7,))
    np.testing.assert_array_equal(loaded.sample(jax.random.key(4), eta, (7,)), x)
    np.testing.assert_array_equal(loaded.log_prob(x, eta), sampler.log_prob(x, eta))


def test_load_rejects_incomplete_or_foreign_directories(sampler, tmp_path):
    target = sampler.save(tmp_path / "s")
    (target / samplers.WEIGHTS_FILE).rename(tmp_path / "weights.npz")
    with pytest.raises(FileNotFoundError, match="incomplete flow-sampler directory"):
        nnef.load_flow_sampler(target)
    (tmp_path / "weights.npz").rename(target / samplers.WEIGHTS_FILE)
    config_path = target / samplers.CONFIG_FILE
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        nnef.load_flow_sampler(target)
    config_path.write_text(json.dumps({**config, "weights_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="weights do not match"):
        nnef.load_flow_sampler(target)
    with pytest.raises(FileNotFoundError):
        nnef.load_flow_sampler(tmp_path / "nothing")


def test_out_of_range_eta_warns(family, sampler, tmp_path):
    inside = jnp.array([[0.5, -1.0]])
    outside = jnp.array([[0.5, -1.0], [5.0, -1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler.sample(jax.random.key(0), inside)
    with pytest.warns(RuntimeWarning, match="1 eta outside the training range"):
        sampler.sample(jax.random.key(0), outside)
    with pytest.warns(RuntimeWarning, match="outside the training range"):
        sampler.log_prob(0.1, outside)
    strict = nnef.load_flow_sampler(sampler.save(tmp_path / "s"), out_of_range="error")
    with pytest.raises(ValueError, match="outside the training range"):
        strict.sample(jax.random.key(0), outside)


def test_resume_from_checkpoint_gives_the_uninterrupted_result(family, sampler, tmp_path,
                                                               monkeypatch):
    original = samplers._checkpoint

    def interrupted(directory, current, opt_state, record):
        original(directory, current, opt_state, record)
        if record["step"] == 100:
            raise KeyboardInterrupt

    monkeypatch.setattr(samplers, "_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        nnef.train_flow_sampler(family, BOX, key=jax.random.key(0), checkpoint_dir=tmp_path,
                                checkpoint_every=100, **SETTINGS)
    monkeypatch.setattr(samplers, "_checkpoint", original)
    assert json.loads((tmp_path / samplers.PROGRESS_FILE).read_text())["step"] == 100
    resumed = nnef.train_flow_sampler(family, BOX, key=jax.random.key(0),
                                      checkpoint_dir=tmp_path, checkpoint_every=100, **SETTINGS)
    assert resumed.report.resumed_from_step == 100
    assert resumed.report.history == sampler.report.history
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(resumed.flow)),
                    jax.tree_util.tree_leaves(nnx.state(sampler.flow)), strict=True):
        np.testing.assert_array_equal(a, b)
    on_disk = nnef.load_flow_sampler(tmp_path)
    np.testing.assert_array_equal(on_disk.sample(jax.random.key(1), jnp.array([0.0, -1.0]), (4,)),
                                  sampler.sample(jax.random.key(1), jnp.array([0.0, -1.0]), (4,)))
    with pytest.raises(ValueError, match="different training run"):
        nnef.train_flow_sampler(family, BOX, key=jax.random.key(1), checkpoint_dir=tmp_path,
                                **SETTINGS)


def _broken_family():
    """Gaussian statistics whose log h(x) is NaN for x > 0.5 (a family that fails there)."""
    return nnef.ExponentialFamily.from_statistics(
        "Gaussian", lambda x: {"x": x, "x2": x * x},
        log_base_measure=lambda x: jnp.where(x > 0.5, jnp.nan, 0.0))


def _identity_sampler(family, high=(1.0, -0.5)):
    """An untrained flow is the identity: q(. | eta) = N(0, 1) at every eta."""
    flow = build_conditional_flow("realnvp", 1, 2, rngs=nnx.Rngs(0), num_layers=1, hidden=(4,))
    return nnef.FlowSampler(family, flow, np.zeros(2), np.ones(2), np.array([-1.0, -1.0]),
                            np.asarray(high))


def test_non_finite_draws_are_dropped_and_counted():
    family = _broken_family()
    identity = _identity_sampler(family)  # q = N(0, 1): P(x > 0.5) is known exactly
    num = 4000
    with pytest.warns(RuntimeWarning, match="non-finite log weight"):
        data = nnef.importance_dataset(family, identity, np.array([[0.0, -0.5], [0.5, -1.0]]),
                                       key=jax.random.key(0), num_samples=num, defensive=0.0,
                                       progress=False)
    p = 0.5 * math.erfc(0.5 / math.sqrt(2.0))
    fraction = data.extras["dropped"] / num
    assert np.all(np.abs(fraction - p) < 5 * math.sqrt(p * (1 - p) / num))
    np.testing.assert_array_equal(data.num_samples + data.extras["dropped"], num)
    assert np.all(np.isfinite(data.mean))
    assert data.extras["khat"][0] == -np.inf  # q = p = N(0, 1) at the first eta: equal weights
    with pytest.warns(RuntimeWarning, match="non-finite log-density"):
        trained = nnef.train_flow_sampler(family, BOX, key=jax.random.key(0), num_steps=50,
                                          batch_size=64, hyperparameters={"num_layers": 1,
                                                                          "hidden": (4,)},
                                          progress=False)
    assert trained.report.dropped_draws > 0
    assert np.all(np.isfinite(trained.report.history["loss"]))


def test_bad_arguments(family):
    with pytest.raises(ValueError, match="unknown flow sampler architecture"):
        nnef.train_flow_sampler(family, BOX, key=jax.random.key(0), architecture="nope")
    with pytest.raises(nnef.OutOfDomainError):
        nnef.train_flow_sampler(family, ([0.0, -1.0], [1.0, 1.0]), key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_steps"):
        nnef.train_flow_sampler(family, BOX, key=jax.random.key(0), num_steps=0)


def test_defensive_proposal_bounds_the_weights_of_a_too_narrow_flow(family):
    """q = N(0, 1) against p = N(0.5, 4^2): p/q = exp(0.47 x^2 + ...) has a Pareto tail with
    k = 0.94 (k-hat > 0.7) unless a heavy component joins the proposal; then the estimates match
    the exact answers within their MCSE."""
    narrow = _identity_sampler(family, high=(1.0, -0.02))
    eta = np.array([[0.5 / 16.0, -1.0 / 32.0]])
    exact = np.array([0.5, 16.25])  # E[x], E[x^2]
    plain = nnef.importance_dataset(family, narrow, eta, key=jax.random.key(1),
                                    num_samples=4000, defensive=0.0, progress=False)
    assert plain.extras["khat"][0] > 0.7 and not plain.passed[0]
    # what k-hat warns about: the plain estimate of E[x^2] is far off, by many of its own MCSE
    assert abs(plain.mean[0, 1] - exact[1]) > 10 * plain.mcse[0, 1]
    data = nnef.importance_dataset(family, narrow, eta, key=jax.random.key(1), num_samples=4000,
                                   defensive=0.3, progress=False)
    assert data.extras["khat"][0] < 0.7 and data.passed[0]
    assert np.all(np.abs(data.mean[0] - exact) < 4 * data.mcse[0])
    assert np.all(data.mcse[0] < [0.3, 2.0])
    log_z = float(nnef.ExactOracle(family).log_partition(jnp.asarray(eta[0])))
    assert abs(data.extras["log_z"][0] - log_z) < 4 * data.extras["log_z_mcse"][0]
    assert data.metadata["sampler"]["defensive"] == 0.3
    with pytest.raises(ValueError, match="defensive must be in"):
        nnef.importance_dataset(family, narrow, eta, key=jax.random.key(0), defensive=1.0)


def test_points_that_fail_are_redone_with_nuts(family):
    narrow = _identity_sampler(family, high=(1.0, -0.02))
    eta = np.array([[0.0, -0.5], [0.5 / 16.0, -1.0 / 32.0]])  # q = p at the first, too narrow
    exact = np.array([[0.0, 1.0], [0.5, 16.25]])
    nuts = {"num_chains": 2, "num_warmup": 300, "num_samples": 1000, "progress": False}
    data = nnef.importance_dataset(family, narrow, eta, key=jax.random.key(0), num_samples=2000,
                                   defensive=0.0, redo_with_nuts=nuts, progress=False)
    np.testing.assert_array_equal(data.extras["redone_with_nuts"], [False, True])
    assert data.extras["khat"][1] > 0.7  # the importance diagnostic stays
    assert data.passed[1] and data.rhat[1].max() != 1.0  # NUTS's diagnostics, not importance's
    assert np.all(np.abs(data.mean - exact) < 4 * data.mcse + 1e-12)
    assert data.metadata["redo_with_nuts"]["num_samples"] == 1000
    with pytest.raises(ValueError, match="redo_with_nuts must be"):
        nnef.importance_dataset(family, narrow, eta, key=jax.random.key(0), redo_with_nuts="yes")


def test_forward_kl_pulls_q_to_the_given_draws(family):
    """Reverse KL + w * forward KL on draws of p shifted by +1: for Gaussian q and p of the
    same sd the optimum mean is mu + w / (1 + w), 0.95 for w = 20 (0 without the draws)."""
    etas = nnef.sample_etas(family, key=jax.random.key(3), low=BOX[0], high=BOX[1], num=64)
    moments = np.asarray(nnef.ExactOracle(family).mean(jnp.asarray(etas)))
    mu, sd = moments[:, 0], np.sqrt(moments[:, 1] - moments[:, 0] ** 2)
    z = np.asarray(jax.random.normal(jax.random.key(4), (100, 64)))
    pulled = nnef.train_flow_sampler(family, BOX, key=jax.random.key(0),
                                     forward_draws=(etas, mu + 1.0 + sd * z), forward_weight=20.0,
                                     **SETTINGS)
    x = np.asarray(pulled.sample(jax.random.key(5), jnp.asarray(etas), (2000,)))
    shift = float(np.mean(x.mean(0) - mu))
    assert 0.8 < shift < 1.05, shift
    recorded = pulled.metadata["training"]["forward"]
    assert recorded["num_pairs"] == 6400 and recorded["weight"] == 20.0
    with pytest.raises(ValueError, match="x shape"):
        nnef.train_flow_sampler(family, BOX, key=jax.random.key(0), forward_draws=(etas, z[:, :5]))
    with pytest.raises(ValueError, match="forward_weight"):
        nnef.train_flow_sampler(family, BOX, key=jax.random.key(0),
                                forward_draws=(etas, z), forward_weight=0.0)

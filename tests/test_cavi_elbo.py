"""The CAVI ELBO checked against Monte Carlo estimates from q's own draws, on bilinear models and
on randomly generated conditionally conjugate models; bilinear fixed points against hand-derived
complete conditionals."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_nnef as nnef

# the textbook models of the benchmark, written as their sources write them
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from textbook import factor_analysis, ppca  # noqa: E402


@pytest.fixture(scope="module")
def ppca_result():
    X = np.random.default_rng(0).normal(size=(10, 3))
    guide = nnef.CAVIGuide(ppca)
    result = nnef.CAVI(ppca, guide, tol=1e-12).run(jax.random.key(1), 300, X)
    return X, guide, result


def test_ppca_fixed_point_is_the_hand_derived_complete_conditional(ppca_result):
    """eta(Z_nk) = (E tau sum_d E W_dk (X_nd - sum_{l != k} E Z_nl E W_dl),
    -(1 + E tau sum_d E W_dk^2) / 2): the bilinear term's diagonal needs E[W^2]."""
    X, guide, result = ppca_result
    assert {n: f.family.name for n, f in guide.conjugate.families.items()} == {
        "tau": "Gamma", "W": "Gaussian", "Z": "Gaussian"}
    mean = {n: np.asarray(v) for n, v in result.state.mean.items()}
    e_tau = mean["tau"][1]
    ez, ew, ew2 = mean["Z"][..., 0], mean["W"][..., 0], mean["W"][..., 1]
    residual = X - ez @ ew.T  # (n, d)
    # add back each k's own contribution: sum_{l != k} = full - own
    eta1 = e_tau * (residual @ ew + ez * (ew**2).sum(0))
    eta2 = -0.5 * (1 + e_tau * ew2.sum(0))
    np.testing.assert_allclose(np.asarray(result.params["Z_eta"]),
                               np.stack([eta1, np.broadcast_to(eta2, eta1.shape)], -1),
                               rtol=1e-6, atol=1e-9)
    assert result.converged
    assert np.all(np.diff(result.elbo) >= -1e-9 * np.abs(result.elbo[1:]))


def test_ppca_elbo_agrees_with_monte_carlo(ppca_result):
    *_, result = ppca_result
    check = result.check_elbo(jax.random.key(2), 4000)
    assert check.passed(), str(check)
    assert check.mcse < 0.1


def test_factor_analysis_precisions_are_gamma_with_the_hand_derived_conditional():
    """q(psi_d) = Gamma(2 + n/2, 1 + sum_n E[(X_nd - sum_k Z_nk W_dk)^2] / 2) (the scale
    1/sqrt(psi_d), broadcast over rows, once gave a spurious psi^1/2 statistic)."""
    X = np.random.default_rng(1).normal(size=(8, 3))
    guide = nnef.CAVIGuide(factor_analysis)
    result = nnef.CAVI(factor_analysis, guide, tol=1e-13).run(jax.random.key(0), 500, X)
    assert guide.conjugate.families["psi"].family.name == "Gamma"
    mean = {n: np.asarray(v) for n, v in result.state.mean.items()}
    ez, ez2, ew, ew2 = mean["Z"][..., 0], mean["Z"][..., 1], mean["W"][..., 0], mean["W"][..., 1]
    fit = ez @ ew.T
    # E[(sum_k z_k w_k)^2] = (sum_k Ez Ew)^2 - sum_k (Ez Ew)^2 + sum_k E[z^2] E[w^2]
    square = fit**2 - (ez**2) @ (ew**2).T + ez2 @ ew2.T
    rate = 1 + 0.5 * (X**2 - 2 * X * fit + square).sum(0)
    np.testing.assert_allclose(np.asarray(result.params["psi_eta"]),
                               np.stack([np.full(3, 1 + 8 / 2), -rate], -1), rtol=1e-6)
    check = result.check_elbo(jax.random.key(2), 3000)
    assert check.passed(), str(check)


# ----------------------------------------------------------------------------- random models


def random_model(seed: int):
    """A random small conditionally conjugate model and its data: two or three of a linear
    regression with a shared noise precision, a bilinear (matrix factorisation) block, a
    Beta-Binomial block, a Dirichlet-Categorical mixture and a Poisson-Gamma block, with random
    plate sizes and hyperparameters."""
    rng = np.random.default_rng(seed)
    parts = rng.choice(["linear", "bilinear", "beta", "mixture", "poisson"],
                       size=int(rng.integers(2, 4)), replace=False).tolist()
    size = lambda: int(rng.integers(2, 5))  # noqa: E731
    hyper = lambda: float(rng.uniform(0.5, 3.0))  # noqa: E731
    data, spec = {}, {}
    if "linear" in parts or "bilinear" in parts:
        spec["tau"] = (hyper() + 1, hyper())
    if "linear" in parts:
        n, p = 3 * size(), size()
        spec["linear"] = (rng.normal(size=p), hyper())
        data["X"] = rng.normal(size=(n, p))
        data["y"] = data["X"] @ rng.normal(size=p) + 0.5 * rng.normal(size=n)
    if "bilinear" in parts:
        rows, cols, k = size() + 2, size() + 2, int(rng.integers(1, 3))
        data["Y"] = rng.normal(size=(rows, k)) @ rng.normal(size=(k, cols)) + 0.3 * rng.normal(
            size=(rows, cols))
        spec["bilinear"] = k
    if "beta" in parts:
        groups = size()
        spec["beta"] = (hyper(), hyper())
        data["trials"] = rng.integers(1, 8, size=groups).astype(float)
        data["successes"] = rng.binomial(data["trials"].astype(int), 0.4).astype(float)
    if "mixture" in parts:
        k = int(rng.integers(2, 4))
        spec["mixture"] = (k, hyper())
        data["m"] = np.concatenate([rng.normal(3.0 * j, 0.5, size=4) for j in range(k)])
    if "poisson" in parts:
        spec["poisson"] = (hyper(), hyper())
        data["counts"] = rng.poisson(3.0, size=size()).astype(float)

    def model(**d):
        if "tau" in spec:
            tau = numpyro.sample("tau", dist.Gamma(*spec["tau"]))
        if "linear" in spec:
            loc, scale = spec["linear"]
            with numpyro.plate("p", len(loc)):
                w = numpyro.sample("w", dist.Normal(loc, scale))
            with numpyro.plate("n", len(d["y"])):
                numpyro.sample("y", dist.Normal(d["X"] @ w, 1 / jnp.sqrt(tau)), obs=d["y"])
        if "bilinear" in spec:
            rows, cols = d["Y"].shape
            with numpyro.plate("k", spec["bilinear"]):
                with numpyro.plate("rows", rows, dim=-2):
                    u = numpyro.sample("u", dist.Normal(0.0, 1.0))
                with numpyro.plate("cols", cols, dim=-2):
                    v = numpyro.sample("v", dist.Normal(0.0, 1.0))
            numpyro.sample("Y", dist.Normal(u @ v.T, 1 / jnp.sqrt(tau)), obs=d["Y"])
        if "beta" in spec:
            p = numpyro.sample("p", dist.Beta(*spec["beta"]))
            with numpyro.plate("g", len(d["trials"])):
                numpyro.sample("s", dist.Binomial(d["trials"], p), obs=d["successes"])
        if "mixture" in spec:
            k, prior_scale = spec["mixture"]
            pi = numpyro.sample("pi", dist.Dirichlet(jnp.ones(k)))
            with numpyro.plate("c", k):
                mu = numpyro.sample("mu", dist.Normal(0.0, 3.0 * prior_scale))
            with numpyro.plate("m_obs", len(d["m"])):
                z = numpyro.sample("z", dist.Categorical(pi))
                numpyro.sample("m", dist.Normal(mu[z], 0.5), obs=d["m"])
        if "poisson" in spec:
            rate = numpyro.sample("rate", dist.Gamma(*spec["poisson"]))
            with numpyro.plate("i", len(d["counts"])):
                numpyro.sample("counts", dist.Poisson(rate), obs=d["counts"])

    return model, data, parts


@pytest.mark.parametrize("seed", range(5))
def test_random_conjugate_models_elbo_agrees_with_monte_carlo(seed):
    model, data, parts = random_model(seed)
    guide = nnef.CAVIGuide(model)
    result = nnef.CAVI(model, guide).run(jax.random.key(seed), 30, **data)
    assert np.all(np.diff(result.elbo) >= -1e-9 * np.abs(result.elbo[1:])), parts
    check = result.check_elbo(jax.random.key(100 + seed), 3000)
    assert check.passed(), f"{parts}: {check}"


# ----------------------------------------------------------------------------- NumPyro surface


def test_quantiles_invert_the_cdf_and_arviz_export_has_every_group(ppca_result, capsys):
    X, guide, result = ppca_result
    qs = guide.quantiles(result.params, [0.05, 0.5, 0.95])
    median = guide.median(result.params)
    for name in ("tau", "W", "Z"):
        q = guide.distribution(name, result.params[f"{name}_eta"])
        assert qs[name].shape == (3, *q.shape())
        np.testing.assert_allclose(q.cdf(qs[name]), np.broadcast_to(
            np.array([0.05, 0.5, 0.95]).reshape(3, *[1] * len(q.shape())), qs[name].shape),
            atol=1e-6)
        np.testing.assert_allclose(median[name], qs[name][1])
    with pytest.raises(ValueError, match=r"quantiles must be .* \(0, 1\)"):
        guide.quantiles(result.params, [0.5, 1.5])
    idata = result.to_arviz(jax.random.key(3), num_samples=50, num_chains=2)
    assert idata.posterior["Z"].shape == (2, 50, *X.shape[:1], 2)
    assert idata.posterior_predictive["X"].shape == (2, 50, *X.shape)
    assert idata.log_likelihood["X"].shape == (2, 50, *X.shape)
    np.testing.assert_array_equal(idata.observed_data["X"], X)
    result.print_summary(jax.random.key(4), num_samples=200)
    assert "tau" in capsys.readouterr().out


def test_discrete_quantiles_need_a_key():
    from test_cavi import mixture

    y = jnp.asarray(np.r_[np.full(5, -3.0), np.full(5, 3.0)])
    guide = nnef.CAVIGuide(mixture)
    result = nnef.CAVI(mixture, guide).run(jax.random.key(0), 20, y, 2)
    with pytest.raises(ValueError, match="site 'pi'.*rng_key"):
        guide.median(result.params)
    median = guide.median(result.params, rng_key=jax.random.key(1))
    assert set(np.unique(np.asarray(median["z"]))) <= {0, 1}
    assert median["pi"].shape == (2,)


def test_elbo_check_allows_rounding_only():
    """q equal to the posterior: log p - log q is constant, the MCSE is zero, and only the
    float64 rounding of the engine's sums separates the two numbers."""
    exact = nnef.ELBOCheck(-24.4141, -24.4141 + 3e-14, 3e-16, 2000, rounding=100 * 2.2e-16 * 24.4)
    assert exact.passed()
    assert not nnef.ELBOCheck(-24.4141, -24.4141 + 3e-14, 3e-16, 2000).passed()
    assert not nnef.ELBOCheck(-10.0, -10.5, 0.01, 2000).passed()
    assert nnef.ELBOCheck(-10.0, -10.03, 0.01, 2000).passed()


def test_update_takes_the_data_as_svi_does():
    """init/update/get_params as SVI's: update(state, *args) sweeps on the data it is given,
    so a loop of updates on new data equals a run on that data (here of another length: the
    normal-gamma model's structure does not depend on it)."""
    from test_cavi import lasso, normal_gamma

    rng = np.random.default_rng(3)
    y1, y2 = jnp.asarray(rng.normal(size=12)), jnp.asarray(rng.normal(2.0, 1.0, size=7))
    reference = nnef.CAVI(normal_gamma, nnef.CAVIGuide(normal_gamma), tol=1e-13).run(
        jax.random.key(0), 30, y2, progress_bar=False)
    cavi = nnef.CAVI(normal_gamma, nnef.CAVIGuide(normal_gamma), tol=1e-13)
    state = cavi.init(jax.random.key(0), y1)
    for _ in range(reference.num_steps):
        state, elbo = cavi.update(state, y2)
    np.testing.assert_allclose(cavi.get_params(state)["mu_eta"], reference.params["mu_eta"],
                               rtol=1e-9)
    np.testing.assert_allclose(cavi.evaluate(state, y2), reference.elbo[-1], rtol=1e-9)
    X = rng.normal(size=(10, 3))
    cavi = nnef.CAVI(lasso, nnef.CAVIGuide(lasso))
    state = cavi.init(jax.random.key(0), X, X @ np.ones(3))
    with pytest.raises(ValueError, match="another structure.*call init"):
        cavi.update(state, X[:, :2], X[:, :2] @ np.ones(2))

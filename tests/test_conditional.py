"""Complete conditionals on their own, against the textbook formulas (Bishop PRML 10.1-10.2),
and the pure CAVI kernel against the CAVI wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_nnef as nnef
from numpyro_nnef.infer.conditional import complete_conditionals
from numpyro_nnef.infer.conjugacy import analyse_model
from numpyro_nnef.infer.kernel import cavi_kernel

KEY = jax.random.key(0)


def normal_gamma(y):
    tau = numpyro.sample("tau", dist.Gamma(3.0, 2.0))
    mu = numpyro.sample("mu", dist.Normal(0.5, 1.5))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1 / jnp.sqrt(tau)), obs=y)


def gmm(y, k=3):
    pi = numpyro.sample("pi", dist.Dirichlet(jnp.full(k, 2.0)))
    with numpyro.plate("c", k):
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    with numpyro.plate("n", len(y)):
        z = numpyro.sample("z", dist.Categorical(pi))
        numpyro.sample("y", dist.Normal(mu[z], 1.0), obs=y)


def linreg_mvn(X, y):
    tau = numpyro.sample("tau", dist.Gamma(2.0, 1.0))
    w = numpyro.sample("w", dist.MultivariateNormal(jnp.zeros(X.shape[1]), 2.0 * jnp.eye(
        X.shape[1])))
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ w, 1 / jnp.sqrt(tau)), obs=y)


def beta_bernoulli_groups(group, y, num_groups=3):
    with numpyro.plate("g", num_groups):
        p = numpyro.sample("p", dist.Beta(2.0, 3.0))
    with numpyro.plate("n", len(y)):
        numpyro.sample("y", dist.Bernoulli(p[group]), obs=y)


def cavi_guide_conditionals(y):
    guide = nnef.CAVIGuide(normal_gamma)
    guide.analyse(y, key=KEY)
    return guide.conditionals


@pytest.fixture(scope="module")
def y():
    return np.random.default_rng(0).normal(1.0, 0.7, size=20)


def test_normal_gamma_conditionals_are_bishop_10_26_and_10_29(y):
    """q(mu) = N with eta = (m0/s0^2 + E[tau] sum y, -(1/s0^2 + n E[tau])/2); q(tau) = Gamma
    with eta = (a - 1 + n/2, -(b + sum_i E[(y_i - mu)^2]/2))."""
    conds = complete_conditionals(analyse_model(normal_gamma, y, key=KEY))
    assert [c.family.family.name for c in conds.values()] == ["Gamma", "Gaussian"]
    assert conds["mu"].neighbours == ("tau",) and conds["tau"].neighbours == ("mu",)
    assert cavi_guide_conditionals(y).keys() == conds.keys()
    assert not conds["mu"].sequential and not conds["tau"].sequential
    e_log_tau, e_tau, e_mu, e_mu2 = 0.3, 1.7, 0.9, 1.2
    n = len(y)
    np.testing.assert_allclose(
        conds["mu"].natural_given({"tau": jnp.array([e_log_tau, e_tau])}),
        [0.5 / 1.5**2 + e_tau * y.sum(), -(1 / 1.5**2 + n * e_tau) / 2], rtol=1e-6)
    expected_sq = np.sum(y**2 - 2 * y * e_mu + e_mu2)
    np.testing.assert_allclose(
        conds["tau"].natural_given({"mu": jnp.array([e_mu, e_mu2])}),
        [3.0 - 1 + n / 2, -(2.0 + expected_sq / 2)], rtol=1e-6)


def test_gmm_conditionals_are_bishop_10_46_10_57_and_10_60():
    """q(z_n = k) proportional to exp(E[log pi_k] + y_n E[mu_k] - E[mu_k^2]/2) (up to a
    constant per n); q(pi) = Dirichlet(alpha_0 + N_k); q(mu_k) = N with eta = (sum_n r_nk y_n,
    -(1/25 + sum_n r_nk)/2)."""
    y = np.array([-2.0, -1.5, 0.1, 2.2, 2.9])
    conds = complete_conditionals(analyse_model(gmm, y, key=KEY))
    assert {n: c.neighbours for n, c in conds.items()} == {
        "pi": ("z",), "mu": ("z",), "z": ("mu", "pi")}
    rng = np.random.default_rng(1)
    e_log_pi = np.log(rng.dirichlet(np.ones(3)))
    e_mu = rng.normal(size=3)
    e_mu2 = e_mu**2 + rng.uniform(0.1, 1.0, size=3)
    eta_z = np.asarray(conds["z"].natural_given({
        "pi": jnp.asarray(e_log_pi), "mu": jnp.stack([e_mu, e_mu2], -1)}))
    want = e_log_pi + y[:, None] * e_mu - e_mu2 / 2
    np.testing.assert_allclose(eta_z - eta_z[:, :1], want - want[:, :1], rtol=1e-6, atol=1e-9)
    r = rng.dirichlet(np.ones(3), size=len(y))
    np.testing.assert_allclose(conds["pi"].natural_given({"z": jnp.asarray(r)}),
                               2.0 - 1 + r.sum(0), rtol=1e-6)
    eta_mu = np.asarray(conds["mu"].natural_given({"z": jnp.asarray(r)}))
    np.testing.assert_allclose(eta_mu, np.stack([r.T @ y, -(1 / 25 + r.sum(0)) / 2], -1),
                               rtol=1e-6)


def test_linear_regression_conditional_is_the_gaussian_posterior_given_tau():
    """q(w) = N(Lambda^-1 h, Lambda^-1) with Lambda = I/2 + E[tau] X^T X, h = E[tau] X^T y, as
    MultivariateNormal's natural parameters (h, -Lambda_ii/2, -Lambda_ij for i < j)."""
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(12, 3)), rng.normal(size=12)
    conds = complete_conditionals(analyse_model(linreg_mvn, X, y, key=KEY))
    assert conds["w"].family.family.name == "MultivariateNormal"
    e_tau = 1.3
    eta = np.asarray(conds["w"].natural_given({"tau": jnp.array([0.1, e_tau])}))
    precision = np.eye(3) / 2 + e_tau * X.T @ X
    rows, cols = np.triu_indices(3)
    packed = np.where(rows == cols, -precision[rows, cols] / 2, -precision[rows, cols])
    np.testing.assert_allclose(eta, np.concatenate([e_tau * X.T @ y, packed]), rtol=1e-6)


def test_per_group_beta_conditional_counts_each_group():
    """q(p_g) = Beta(2 + sum_{i in g} y_i, 3 + n_g - sum_{i in g} y_i): eta = counts + prior - 1,
    with no neighbour (the conditional is the exact posterior)."""
    group = np.array([0, 0, 1, 2, 2, 2, 1])
    y = np.array([1.0, 0, 1, 1, 1, 0, 0])
    (cond,) = complete_conditionals(analyse_model(beta_bernoulli_groups, group, y,
                                                  key=KEY)).values()
    assert cond.neighbours == () and cond.family.family.name == "Beta"
    ones = np.bincount(group, weights=y, minlength=3)
    zeros = np.bincount(group, minlength=3) - ones
    np.testing.assert_allclose(cond.natural_given({}), np.stack([1 + ones, 2 + zeros], -1),
                               rtol=1e-6)


def test_missing_neighbour_means_are_named(y):
    conds = complete_conditionals(analyse_model(normal_gamma, y, key=KEY))
    with pytest.raises(ValueError, match="needs the means of \\['tau'\\]"):
        conds["mu"].natural_given({})


def test_kernel_is_pure_and_jittable_and_agrees_with_the_wrapper(y):
    """kernel.step under jit, iterated by hand, reaches the state CAVI.run returns."""
    cavi = nnef.CAVI(normal_gamma, nnef.CAVIGuide(normal_gamma), tol=1e-13)
    result = cavi.run(KEY, 100, y, progress_bar=False)
    cm = cavi.guide.conjugate
    kernel = cavi_kernel(cm)
    state = kernel.init(cavi.init(KEY, y).mu)
    step = jax.jit(kernel.step)
    for _ in range(result.num_steps):
        state = step(cm.data(), state)
    for name in cm.sites:
        np.testing.assert_allclose(state.eta[name], result.state.eta[name], rtol=1e-6)
    np.testing.assert_allclose(kernel.elbo(cm.data(), state), result.elbo[-1], rtol=1e-9)
    with pytest.raises(ValueError, match="damping"):
        cavi_kernel(cm, damping=1.0)

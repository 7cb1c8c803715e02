"""Non-conjugate terms in CAVI: logistic, Poisson-log and probit likelihoods of a linear
predictor, kept as terms with Gauss-Hermite expectations and updated by Knowles-Minka messages
with a step-size search. Each fit is checked against its hand-derived fixed point (the ELBO's
gradient in each factor's mean and variance, computed independently in numpy/scipy), against
the exact posterior by grid quadrature where it is 2-d, and by the ELBO's Monte Carlo check."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.special as sp

import numpyro_nnef as nnef
from numpyro_nnef.infer.interpreter import trace_log_density
from numpyro_nnef.infer.nonconjugate import Nonlinear, gaussian_expectation, kinds

# the benchmark's textbook model, as its source writes it
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from textbook import hierarchical_logistic  # noqa: E402

PRIOR_SD = 1.5


def logistic(X, y):
    w = numpyro.sample("w", dist.Normal(0.0, PRIOR_SD).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)


def poisson(X, y):
    with numpyro.plate("p", X.shape[1]):
        w = numpyro.sample("w", dist.Normal(0.0, PRIOR_SD))
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.Poisson(jnp.exp(X @ w)), obs=y)


def probit(X, y):
    w = numpyro.sample("w", dist.Normal(0.0, PRIOR_SD).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(probs=jax.scipy.stats.norm.cdf(X @ w)), obs=y)


def make_data(kind: str, n: int = 60, p: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    a = X @ np.linspace(1.0, -0.8, p)
    if kind == "poisson":
        y = rng.poisson(np.exp(0.5 * a)).astype(float)
        return jnp.asarray(0.5 * X), jnp.asarray(y)
    prob = sp.expit(a) if kind == "logistic" else sp.ndtr(a)
    return jnp.asarray(X), jnp.asarray((rng.uniform(size=n) < prob).astype(float))


# f(a), f'(a), f''(a) of one observation, in scipy (independent of the package)
def _logistic_derivatives(y, a):
    s = sp.expit(a)
    return y * a - np.logaddexp(0.0, a), y - s, -s * (1 - s)


def _poisson_derivatives(y, a):
    return y * a - np.exp(a) - sp.gammaln(y + 1), y - np.exp(a), -np.exp(a)


def _probit_derivatives(y, a):
    def ratio(t):  # phi(t) / Phi(t)
        return np.exp(-0.5 * t**2 - 0.5 * np.log(2 * np.pi) - sp.log_ndtr(t))

    r_pos, r_neg = ratio(a), ratio(-a)
    value = y * sp.log_ndtr(a) + (1 - y) * sp.log_ndtr(-a)
    first = y * r_pos - (1 - y) * r_neg
    second = -y * r_pos * (a + r_pos) - (1 - y) * r_neg * (r_neg - a)
    return value, first, second


DERIVATIVES = {"logistic": _logistic_derivatives, "poisson": _poisson_derivatives,
               "probit": _probit_derivatives}
MODELS = {"logistic": logistic, "poisson": poisson, "probit": probit}


def gaussian_moments(result, guide, name="w"):
    mean, var = guide.conjugate.moments(name, result.state.mu[name])
    return np.asarray(mean), np.asarray(var)


def fixed_point_residuals(kind, X, y, m, v, nodes=120):
    """d ELBO / d m_j and d ELBO / d v_j of the mean-field Gaussian q(w) = prod N(m_j, v_j),
    prior N(0, PRIOR_SD^2): zero at CAVI's fixed point (numpy Gauss-Hermite, 120 nodes)."""
    X, y = np.asarray(X), np.asarray(y)
    t, w = np.polynomial.hermite.hermgauss(nodes)
    mean_a, var_a = X @ m, (X**2) @ v
    a = mean_a[:, None] + np.sqrt(2 * var_a)[:, None] * t[None]
    _, first, second = DERIVATIVES[kind](y[:, None], a)
    e1 = (first * w).sum(1) / np.sqrt(np.pi)
    e2 = (second * w).sum(1) / np.sqrt(np.pi)
    d_mean = -m / PRIOR_SD**2 + X.T @ e1
    d_var = -0.5 / PRIOR_SD**2 + 0.5 * (X**2).T @ e2 + 0.5 / v
    return d_mean, d_var


@pytest.fixture(scope="module", params=["logistic", "poisson", "probit"])
def fitted(request):
    kind = request.param
    X, y = make_data(kind)
    guide = nnef.CAVIGuide(MODELS[kind])
    result = nnef.CAVI(MODELS[kind], guide, tol=1e-13).run(jax.random.key(0), 300, X, y,
                                                           progress_bar=False)
    return kind, X, y, guide, result


def test_non_conjugate_likelihood_reaches_its_fixed_point(fitted):
    kind, X, y, guide, result = fitted
    assert {n: f.family.name for n, f in guide.conjugate.families.items()} == {"w": "Gaussian"}
    assert result.converged
    elbo = np.asarray(result.elbo)
    assert np.all(np.diff(elbo) >= -1e-9 * np.abs(elbo[1:])), "the ELBO decreased"
    m, v = gaussian_moments(result, guide)
    d_mean, d_var = fixed_point_residuals(kind, X, y, m, v)
    # relative to the gradient's scales: the prior's and the data's curvature
    assert np.all(np.abs(d_mean) * np.sqrt(v) < 1e-5), d_mean
    assert np.all(np.abs(d_var) * v < 1e-5), d_var


def test_non_conjugate_elbo_passes_its_monte_carlo_check(fitted):
    *_, result = fitted
    check = result.check_elbo(jax.random.key(1), 4000)
    assert check.passed(), str(check)


def exact_posterior_moments(log_likelihood, X):
    """Mean and sd of the 2-d weight's exact posterior (prior N(0, PRIOR_SD^2) per weight), by
    grid quadrature; ``log_likelihood(a)`` sums over observations, a = X w on the grid."""
    grid = np.linspace(-6.0, 6.0, 601)
    w1, w2 = np.meshgrid(grid, grid, indexing="ij")
    a = np.asarray(X)[:, 0, None, None] * w1 + np.asarray(X)[:, 1, None, None] * w2
    log_post = log_likelihood(a) - 0.5 * (w1**2 + w2**2) / PRIOR_SD**2
    weights = np.exp(log_post - log_post.max())
    weights /= weights.sum()
    mean = np.array([(weights * w1).sum(), (weights * w2).sum()])
    return mean, np.sqrt(np.array([(weights * w1**2).sum(), (weights * w2**2).sum()]) - mean**2)


def assert_close_to_exact(m, v, exact_mean, exact_sd):
    """Means within 0.3 posterior sd, sds within 0.6-1.1 of the exact posterior's."""
    assert np.all(np.abs(m - exact_mean) < 0.3 * exact_sd), (m, exact_mean, exact_sd)
    ratio = np.sqrt(v) / exact_sd
    assert np.all((ratio > 0.6) & (ratio < 1.1)), ratio


def test_non_conjugate_means_match_the_exact_posterior(fitted):
    kind, X, y, guide, result = fitted
    exact = exact_posterior_moments(
        lambda a: DERIVATIVES[kind](np.asarray(y)[:, None, None], a)[0].sum(0), X)
    assert_close_to_exact(*gaussian_moments(result, guide), *exact)


def laplace(X, y):
    w = numpyro.sample("w", dist.Normal(0.0, PRIOR_SD).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.Laplace(X @ w, 1.0), obs=y)


def test_a_kinked_term_gets_its_curvature_and_its_fixed_point(recwarn):
    """Laplace regression, log p(y | a) = -|y - a| - log 2: f'' is a delta autodiff cannot see
    (Price's dE/dv would be 0 and q(w) would keep the prior's variance); the kinked term's
    derivatives are those of its quadrature sum. Checked against the closed-form gradient of the
    exact ELBO, dE|a - y|/dm = 2 Phi(mu / s) - 1, dE|a - y|/dv = phi(mu / s) / s (mu = m - y,
    s^2 = v), to the 32-node rule's error on a kink, and against the exact posterior."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 2))
    y = X @ np.array([1.0, -0.8]) + rng.laplace(size=60)
    guide = nnef.CAVIGuide(laplace)
    result = nnef.CAVI(laplace, guide, tol=1e-13).run(jax.random.key(0), 300, X, y,
                                                      progress_bar=False)
    assert result.converged and not [w for w in recwarn if "step search" in str(w.message)]
    elbo = np.asarray(result.elbo)
    assert np.all(np.diff(elbo) >= -1e-9 * np.abs(elbo[1:])), "the ELBO decreased"
    m, v = gaussian_moments(result, guide)
    mu, s = X @ m - y, np.sqrt((X**2) @ v)
    d_mean = -m / PRIOR_SD**2 - X.T @ (2 * sp.ndtr(mu / s) - 1)
    d_var = -0.5 / PRIOR_SD**2 - (X**2).T @ (np.exp(-0.5 * (mu / s) ** 2) / np.sqrt(2 * np.pi)
                                             / s) + 0.5 / v
    assert np.all(np.abs(d_mean) * np.sqrt(v) < 0.05), d_mean
    assert np.all(np.abs(d_var) * v < 0.05), d_var
    assert_close_to_exact(m, v, *exact_posterior_moments(
        lambda a: -np.abs(y[:, None, None] - a).sum(0), X))
    assert result.check_elbo(jax.random.key(1), 4000).passed()


def jaakkola_jordan_fixed_point(X, y, sweeps=2000):
    """Mean-field q(w) = prod N(m_j, v_j) of the Polya-Gamma-augmented logistic regression at
    q(omega_i) = PG(1, c_i), c_i^2 = E[a_i^2], lambda(c) = tanh(c/2) / (4c) (Jaakkola & Jordan
    2000; Durante & Rigon 2019), iterated in numpy: 1/v_j = 1/s0^2 + 2 sum_i lambda_i x_ij^2,
    m_j = v_j sum_i x_ij (y_i - 1/2 - 2 lambda_i sum_(k != j) x_ik m_k)."""
    X, y = np.asarray(X), np.asarray(y)
    m, v = np.zeros(X.shape[1]), np.full(X.shape[1], PRIOR_SD**2)
    for _ in range(sweeps):
        for j in range(X.shape[1]):
            c = np.sqrt((X @ m) ** 2 + (X**2) @ v)
            lam = np.tanh(c / 2) / (4 * c)
            v[j] = 1.0 / (1.0 / PRIOR_SD**2 + 2 * (lam * X[:, j] ** 2).sum())
            others = X @ m - X[:, j] * m[j]
            m[j] = v[j] * (X[:, j] * (y - 0.5 - 2 * lam * others)).sum()
    return m, v


def test_polya_gamma_augmentation_reaches_the_jaakkola_jordan_fixed_point():
    """CAVIGuide(augment=True): the logistic term by its Polya-Gamma bound; the fit is the
    augmented model's fixed point (numpy, independent of the package), the traced ELBO is
    monotone and below q's own ELBO, which passes the Monte Carlo check."""
    X, y = make_data("logistic")
    guide = nnef.CAVIGuide(logistic, augment=True)
    result = nnef.CAVI(logistic, guide, tol=1e-13).run(jax.random.key(0), 300, X, y,
                                                       progress_bar=False)
    assert result.converged
    elbo = np.asarray(result.elbo)
    assert np.all(np.diff(elbo) >= -1e-9 * np.abs(elbo[1:])), "the ELBO decreased"
    m, v = gaussian_moments(result, guide)
    want_m, want_v = jaakkola_jordan_fixed_point(X, y)
    np.testing.assert_allclose(m, want_m, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(v, want_v, rtol=1e-6)
    assert result.exact_elbo > elbo[-1]
    assert result.check_elbo(jax.random.key(1), 4000).passed()


def test_augmentation_leaves_terms_that_are_not_logistic_alone():
    """A Poisson-log term has no Polya-Gamma form: augment=True fits what the direct update
    fits."""
    X, y = make_data("poisson")
    fits = [gaussian_moments(nnef.CAVI(poisson, guide, tol=1e-13).run(
        jax.random.key(0), 300, X, y, progress_bar=False), guide)
        for guide in (nnef.CAVIGuide(poisson), nnef.CAVIGuide(poisson, augment=True))]
    np.testing.assert_allclose(fits[0], fits[1], rtol=1e-10)


def test_kinks_are_told_apart_from_smooth_functions():
    """kinds() compares Price's E f''/2 with Stein's form (and finds softplus plus a linear
    function); a kink's derivatives by Stein's forms against the closed forms of E|a|."""
    assert kinds(jnp.exp) == (True, False)
    assert kinds(jax.scipy.special.log_ndtr) == (True, False)
    assert kinds(lambda t: 2.0 - 3.0 * jax.nn.softplus(-t), (4,)) == (True, True)
    assert not kinds(jnp.abs)[0] and not kinds(lambda t: jnp.maximum(t, 0.0))[0]
    # many elements, each probed at one mean: kinks at different places (a Laplace likelihood),
    # and Bernoulli-logit log likelihoods with their own y
    y = np.random.default_rng(0).uniform(-2.0, 2.0, 50)
    assert not kinds(lambda t: -jnp.abs(y - t), (50,))[0]
    assert kinds(lambda t: np.round(y + 2) / 4 * t - jax.nn.softplus(t), (50,)) == (True, True)
    assert kinds(lambda t: -0.5 * (y - t) ** 2, (50,)) == (True, False)
    m, v = jnp.asarray([0.3, -1.0]), jnp.asarray([0.5, 2.0])
    dm, dv = jax.grad(lambda m, v: jnp.sum(gaussian_expectation(jnp.abs, m, v, False)),
                      argnums=(0, 1))(m, v)
    s = np.sqrt(np.asarray(v))
    # E|a| = s sqrt(2/pi) exp(-m^2/2v) + m (1 - 2 Phi(-m/s)); 32 nodes on a kink: a few 1e-3
    # (the derivatives of the rule's own sum, E f'(a) of a step: 0.1)
    np.testing.assert_allclose(dm, 2 * sp.ndtr(np.asarray(m) / s) - 1, atol=5e-3)
    np.testing.assert_allclose(dv, np.exp(-0.5 * np.asarray(m) ** 2 / np.asarray(v))
                               / np.sqrt(2 * np.pi) / s, atol=5e-3)


def test_gauss_hermite_expectation_and_its_derivatives_are_exact_for_exp():
    """E exp(a) = exp(m + v/2) for a ~ N(m, v): value, d/dm and d/dv (Price's theorem)."""
    m, v = jnp.asarray([0.3, -1.0]), jnp.asarray([0.5, 2.0])
    value, (dm, dv) = jax.value_and_grad(
        lambda m, v: jnp.sum(gaussian_expectation(jnp.exp, m, v)), argnums=(0, 1))(m, v)
    exact = np.exp(np.asarray(m) + np.asarray(v) / 2)
    np.testing.assert_allclose(float(value), exact.sum(), rtol=1e-10)
    np.testing.assert_allclose(dm, exact, rtol=1e-10)
    np.testing.assert_allclose(dv, exact / 2, rtol=1e-10)


def test_bernoulli_logits_log_density_is_one_term_of_the_predictor():
    """log p(y | logits = X w) traced: y (X w) - softplus(X w), terms of one predictor; equal
    to numpyro's log density at random points."""
    X, y = make_data("logistic", n=7, p=3)

    def log_density(_data, s):
        return jnp.sum(dist.Bernoulli(logits=X @ s["w"]).log_prob(y))

    draws = {"w": np.random.default_rng(1).normal(size=(8, 3))}
    form = trace_log_density(log_density, {"w": draws["w"][0]}, draws)
    assert isinstance(form, Nonlinear) and len({id(t.arg) for t in form.terms}) == 1
    for k in range(1, 4):
        point = {"w": jnp.asarray(draws["w"][k])}
        np.testing.assert_allclose(float(form.at(point)), float(log_density(None, point)),
                                   rtol=1e-10)


def test_separable_data_converge_quietly(recwarn):
    """Perfectly separated classes: the posterior is driven by the prior; CAVI converges, the
    ELBO rises monotonically and passes its check, and nothing warns."""
    X = jnp.asarray(np.linspace(-2.0, 2.0, 40)[:, None] * np.ones((1, 2)))
    y = (X[:, 0] > 0).astype(float)
    guide = nnef.CAVIGuide(logistic)
    result = nnef.CAVI(logistic, guide).run(jax.random.key(0), 500, X, y, progress_bar=False)
    assert result.converged
    m, _ = gaussian_moments(result, guide)
    assert np.all(m > 0) and np.all(np.isfinite(m))
    assert result.check_elbo(jax.random.key(1), 2000).passed()
    assert not [w for w in recwarn.list if issubclass(w.category, RuntimeWarning)]


def test_a_predictor_that_is_not_linear_is_refused_naming_the_term():
    def model(X, y):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("n", X.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=(X @ a) * b), obs=y)

    X, y = make_data("logistic", n=10)
    with pytest.raises(nnef.NonConjugateError, match=r"'a', 'b'.*site 'y' \(Bernoulli\)"):
        nnef.CAVI(model, nnef.CAVIGuide(model)).run(jax.random.key(0), 5, X, y)


def test_a_predictor_of_a_positive_site_is_refused_naming_its_support():
    def model(X, y):
        w = numpyro.sample("w", dist.Gamma(2.0, 1.0).expand([2]).to_event(1))
        with numpyro.plate("n", X.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)

    X, y = make_data("logistic", n=10)
    with pytest.raises(nnef.NonConjugateError, match=r"\['w'\].*only for sites with real support"):
        nnef.CAVI(model, nnef.CAVIGuide(model)).run(jax.random.key(0), 5, X, y)


def test_hierarchical_logistic_reaches_its_fixed_point():
    """Random intercepts a_g ~ N(mu_a, sigma_a) (an indexed predictor a[group] + X w), sigma_a
    HalfNormal (its conditional [x^2, x^-2, log x] is SqrtGIG): the ELBO's gradient in every
    Gaussian factor's mean and variance, computed in numpy from the other factors' moments, is
    zero."""
    rng = np.random.default_rng(3)
    num_groups, n = 5, 80
    group = rng.integers(0, num_groups, n)
    X = rng.normal(size=(n, 2))
    logits = rng.normal(0.5, 0.8, num_groups)[group] + X @ np.array([1.0, -0.5])
    y = (rng.uniform(size=n) < sp.expit(logits)).astype(float)
    guide = nnef.CAVIGuide(hierarchical_logistic)
    result = nnef.CAVI(hierarchical_logistic, guide, tol=1e-13).run(
        jax.random.key(0), 500, group, X, y, num_groups, progress_bar=False)
    assert result.converged
    assert result.check_elbo(jax.random.key(1), 4000).passed()
    m_a, v_a = gaussian_moments(result, guide, "a")
    m_w, v_w = gaussian_moments(result, guide, "w")
    mean_mu, _ = gaussian_moments(result, guide, "mu_a")
    sigma = guide.conjugate.families["sigma_a"].family
    assert sigma.name == "SqrtGIG"
    precision = float(result.state.mean["sigma_a"][sigma.stat_labels.index("inv_x2")])
    t, weights = np.polynomial.hermite.hermgauss(120)
    alpha = m_a[group] + X @ m_w
    nodes = alpha[:, None] + np.sqrt(2 * (v_a[group] + X**2 @ v_w))[:, None] * t[None]
    _, first, second = _logistic_derivatives(y[:, None], nodes)
    e1, e2 = (first * weights).sum(1) / np.sqrt(np.pi), (second * weights).sum(1) / np.sqrt(np.pi)
    by_group = np.eye(num_groups)[group]  # (n, G)
    d_mean_a = -precision * (m_a - float(mean_mu)) + by_group.T @ e1
    d_var_a = -0.5 * precision + 0.5 * by_group.T @ e2 + 0.5 / v_a
    d_mean_w = -m_w + X.T @ e1
    d_var_w = -0.5 + 0.5 * (X**2).T @ e2 + 0.5 / v_w
    for d_mean, d_var, v in ((d_mean_a, d_var_a, v_a), (d_mean_w, d_var_w, v_w)):
        assert np.all(np.abs(d_mean) * np.sqrt(v) < 1e-5), d_mean
        assert np.all(np.abs(d_var) * v < 1e-5), d_var


def test_another_analysis_key_reuses_the_compiled_program():
    """Two analyses of the same model and data (other random probe draws) have one signature,
    so a second run does not compile again."""
    X, y = make_data("logistic", n=20)
    guide = nnef.CAVIGuide(logistic)
    first = guide.analyse(X, y, key=jax.random.key(0)).signature()
    assert guide.analyse(X, y, key=jax.random.key(1)).signature() == first


def test_a_step_search_that_finds_no_step_warns(monkeypatch):
    """When no step size keeps the ELBO from falling (forced here by demanding an increase of
    twice |ELBO| per step), the site keeps its factor, the run stops, and a warning names the
    site."""
    from numpyro_nnef.infer import kernel

    monkeypatch.setattr(kernel, "ELBO_SLACK_ULPS", -2 / np.finfo(float).eps)
    X, y = make_data("logistic", n=13)  # a shape no other test compiles
    guide = nnef.CAVIGuide(logistic)
    with pytest.warns(RuntimeWarning, match=r"step search of site\(s\) \['w'\].*found no step"):
        result = nnef.CAVI(logistic, guide, damping=0.25).run(jax.random.key(0), 20, X, y,
                                                               progress_bar=False)
    assert np.all(np.isfinite(result.elbo))
    assert result.num_steps == 2  # the first sweep moves, the second finds nothing


def _mvn_logistic(X, y):
    w = numpyro.sample("w", dist.MultivariateNormal(jnp.zeros(X.shape[1]),
                                                    jnp.eye(X.shape[1]) + 0.5))
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)


def _mvn_groups(X, y):
    with numpyro.plate("g", 4):
        w = numpyro.sample("w", dist.MultivariateNormal(jnp.zeros(X.shape[1]),
                                                        jnp.eye(X.shape[1]) + 0.5))
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=jnp.sum(X * w[np.arange(len(y)) % 4], -1)),
                       obs=y)


def _two_slices(X, y):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([2, X.shape[1]]).to_event(2))
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ w[0] + (X**2) @ w[1]), obs=y)


@pytest.mark.parametrize("model, direct", [(logistic, True), (_mvn_logistic, True),
                                           (_mvn_groups, True), (_two_slices, False)])
def test_predictor_variance_matches_the_forward_mode_jacobian(model, direct):
    """Var[a] = sum_j J_j Cov[x_j] J_j^T from the term's operands (scalar and vector elements)
    equals the forward-mode Jacobian's; a site in two terms of the predictor has no direct
    form (None: ``expected`` differentiates)."""
    from numpyro_nnef.infer.conjugacy import analyse_model

    X, y = make_data("logistic", n=12, p=3)
    cm = analyse_model(model, X, y, key=jax.random.key(0))
    (term,) = cm.nonconjugate
    start = sum(len(t.operands) for t in cm.terms)
    data = [jnp.asarray(a) for a in cm.data()[start:start + len(term.data())]]
    (name,) = term.sites
    site = cm.sites[name]
    rng = np.random.default_rng(1)
    if site.element_shape:
        root = rng.normal(size=(*site.shape, site.shape[-1]))
        spread = np.einsum("...ik,...jk->...ij", root, root)
    else:
        spread = rng.uniform(size=site.shape)
    found = term.variance(name, jnp.asarray(spread), data)
    assert (found is not None) == direct
    if not direct:
        return
    jac = jax.jacfwd(lambda x: term.predictor({name: x}, data))(jnp.zeros(site.shape))
    if site.element_shape:
        d = site.shape[-1]
        jac = jac.reshape((*term.shape, -1, d))
        expected = jnp.einsum("...bi,bij,...bj->...", jac, spread.reshape((-1, d, d)), jac)
    else:
        expected = jnp.sum(jac**2 * spread, axis=tuple(range(len(term.shape), jac.ndim)))
    np.testing.assert_allclose(found, expected, rtol=1e-12, atol=1e-12)

"""CAVI on plain NumPyro models: the symbolic form, family resolution, fixed points, bad input."""

import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.special
from numpyro.infer import Predictive
from numpyro.infer.util import log_density

import numpyro_nnef as nnef
from numpyro_nnef.infer.interpreter import trace_log_density

# the textbook models of the benchmark, written as their sources write them
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from textbook import gmm_lognormal_scale  # noqa: E402

MU0, LAM0, A0, B0 = 0.5, 2.0, 3.0, 2.0


def normal_gamma(y):
    tau = numpyro.sample("tau", dist.Gamma(A0, B0))
    mu = numpyro.sample("mu", dist.Normal(MU0, 1 / jnp.sqrt(LAM0 * tau)))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1 / jnp.sqrt(tau)), obs=y)


def lasso(X, y, b=1.0):
    tau = numpyro.sample("tau", dist.Gamma(2.0, 1.0))
    with numpyro.plate("p", X.shape[1]):
        w = numpyro.sample("w", dist.Laplace(0.0, b))
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ w, 1 / jnp.sqrt(tau)), obs=y)


@pytest.fixture(scope="module")
def ng_data():
    return jnp.asarray(np.random.default_rng(0).normal(1.0, 0.7, size=20))


@pytest.fixture(scope="module")
def lasso_data():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 4))
    w = np.array([1.5, 0.0, -0.7, 0.0])
    return jnp.asarray(X), jnp.asarray(X @ w + 0.5 * rng.normal(size=30))


def test_symbolic_form_equals_log_density_at_random_points():
    def model(y):
        tau = numpyro.sample("tau", dist.Gamma(2.0, 1.0))
        mu = numpyro.sample("mu", dist.Normal(0.0, 1 / jnp.sqrt(3.0 * tau)))
        with numpyro.plate("n", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu, 1 / jnp.sqrt(tau)), obs=y)
        w = numpyro.sample("w", dist.Laplace(0.0, 1.0).expand([3]).to_event(1))
        numpyro.sample("y2", dist.Normal(jnp.ones((4, 3)) @ w, 1 / jnp.sqrt(tau)), obs=y)
        numpyro.sample("e", dist.Exponential(2.0))
        numpyro.sample("b", dist.Beta(2.0, 3.0))

    y = jnp.arange(4.0)
    rng = np.random.default_rng(0)
    draws = {"tau": rng.gamma(2, size=8), "mu": rng.normal(size=8), "w": rng.normal(size=(8, 3)),
             "e": rng.exponential(size=8), "b": rng.uniform(size=8)}
    values = {k: v[0] for k, v in draws.items()}

    def ld(d):
        return log_density(model, (y,), {}, d)[0]

    poly = trace_log_density(lambda data, d: ld(d), values, draws)
    for k in range(1, 4):
        point = {n: jnp.asarray(v[k]) for n, v in draws.items()}
        np.testing.assert_allclose(float(poly.at(point)), float(ld(point)), rtol=1e-12)


def bishop_fixed_point(y):
    """Closed-form mean-field fixed point of the Normal-Gamma model (Bishop, PRML 10.1.3)."""
    y = np.asarray(y)
    n, ybar = len(y), y.mean()
    e_tau = 1.0
    for _ in range(500):
        mu_n, lam_n = (LAM0 * MU0 + n * ybar) / (LAM0 + n), (LAM0 + n) * e_tau
        e_mu, e_mu2 = mu_n, mu_n**2 + 1 / lam_n
        a_n = A0 + (n + 1) / 2
        b_n = B0 + 0.5 * (np.sum(y**2) - 2 * e_mu * np.sum(y) + n * e_mu2
                          + LAM0 * (e_mu2 - 2 * MU0 * e_mu + MU0**2))
        e_tau = a_n / b_n
    return mu_n, lam_n, a_n, b_n


def test_normal_gamma_matches_closed_form(ng_data):
    guide = nnef.CAVIGuide(normal_gamma)
    result = nnef.CAVI(normal_gamma, guide, tol=1e-14).run(jax.random.key(0), 50, ng_data)
    fams = guide.conjugate.families
    assert fams["mu"].family.name == "Gaussian" and fams["tau"].family.name == "Gamma"
    mu_n, lam_n, a_n, b_n = bishop_fixed_point(ng_data)
    loc, scale = fams["mu"].family.loc_scale_from_natural(result.params["mu_eta"])
    shape, rate = fams["tau"].family.shape_rate_from_natural(result.params["tau_eta"])
    np.testing.assert_allclose([loc, scale**-2, shape, rate], [mu_n, lam_n, a_n, b_n],
                               rtol=1e-6)
    assert result.converged
    assert np.all(np.diff(result.elbo) >= -1e-9 * np.abs(result.elbo[1:]))


def test_lasso_fixed_point_and_monotone_elbo(lasso_data):
    X, y = lasso_data
    guide = nnef.CAVIGuide(lasso)
    result = nnef.CAVI(lasso, guide, tol=1e-13).run(jax.random.key(1), 200, X, y)
    cm = guide.conjugate
    assert cm.families["w"].family.name == "GaussLaplace"
    assert cm.self_coupled["w"] and not cm.self_coupled["tau"]
    assert np.all(np.diff(result.elbo) >= -1e-9 * np.abs(result.elbo[1:]))
    # the fixed point, derived by hand: eta_w_i = tau (X^T y - sum_{j!=i} G_ij m_j),
    # -tau G_ii / 2, -1/b, with G = X^T X and tau = E[tau]
    state = result.state
    m = np.asarray(state.mean["w"])[:, 0]
    e_tau = float(state.mean["tau"][1])
    G, Xty = np.asarray(X.T @ X), np.asarray(X.T @ y)
    off = G @ m - np.diag(G) * m
    expected = np.stack([e_tau * (Xty - off), -0.5 * e_tau * np.diag(G), -np.ones(4)], -1)
    np.testing.assert_allclose(np.asarray(result.params["w_eta"]), expected, rtol=1e-6,
                               atol=1e-8)
    # the reported ELBO against an independent Monte Carlo estimate E_q[log p - log q], with
    # log p from NumPyro's log density and log q from the guide's distributions
    check = result.check_elbo(jax.random.key(5), 20000)
    assert check.passed(), str(check)


def bayesian_lasso(X, y, lam=1.0):
    """Park & Casella (2008): w_j | sigma2, tau2_j ~ Normal(0, sigma2 tau2_j), tau2_j ~
    Exponential(lam^2 / 2); the complete conditional of tau2_j is GIG(1/2, lam^2, w_j^2/sigma2)."""
    sigma2 = numpyro.sample("sigma2", dist.InverseGamma(1.0, 1.0))
    with numpyro.plate("p", X.shape[1]):
        tau2 = numpyro.sample("tau2", dist.Exponential(lam**2 / 2))
        w = numpyro.sample("w", dist.Normal(0.0, jnp.sqrt(sigma2 * tau2)))
    numpyro.sample("y", dist.Normal(X @ w, jnp.sqrt(sigma2)), obs=y)


def test_bayesian_lasso_gets_gig_and_a_checked_elbo(lasso_data):
    """tau2's statistics [x, 1/x, log x] resolve to GIG (sigma2 keeps InverseGamma); the fixed
    point is eta_tau2_j = (-lam^2/2, -E[1/sigma2] E[w_j^2]/2, -1/2); the ELBO is monotone and
    agrees with E_q[log p - log q] (the side script's NUTS check: |CAVI - NUTS| / NUTS sd of
    the posterior means of w <= 0.09)."""
    X, y = lasso_data
    guide = nnef.CAVIGuide(bayesian_lasso)
    result = nnef.CAVI(bayesian_lasso, guide, tol=1e-14).run(jax.random.key(0), 400, X, y)
    fams = guide.conjugate.families
    assert fams["tau2"].family.name == "GIG" and fams["sigma2"].family.name == "InverseGamma"
    assert fams["w"].family.name == "Gaussian"
    assert result.converged
    assert np.all(np.diff(result.elbo) >= -1e-9 * np.abs(result.elbo[1:]))
    mean = result.state.mean
    e_inv_sigma2 = float(fams["sigma2"].family.unflatten(mean["sigma2"])["inv_x"])
    e_w2 = np.asarray(fams["w"].family.unflatten(mean["w"])["x2"])
    expected = np.stack([np.full(4, -0.5), -0.5 * e_inv_sigma2 * e_w2, np.full(4, -0.5)], -1)
    np.testing.assert_allclose(result.params["tau2_eta"], expected, rtol=1e-6)
    check = result.check_elbo(jax.random.key(1), 2000)
    assert check.passed(), str(check)


def test_guide_works_with_predictive(ng_data):
    guide = nnef.CAVIGuide(normal_gamma)
    result = nnef.CAVI(normal_gamma, guide).run(jax.random.key(0), 20, ng_data)
    draws = Predictive(normal_gamma, guide=guide, params=result.params, num_samples=50,
                       return_sites=["mu", "tau", "y"])(jax.random.key(2), ng_data)
    assert draws["mu"].shape == (50,) and draws["tau"].shape == (50,)
    assert draws["y"].shape == (50, ng_data.shape[0])
    assert np.all(np.asarray(draws["tau"]) > 0)
    idata = guide.to_arviz(jax.random.key(3), result.params, num_samples=100)
    assert idata.posterior["mu"].shape == (1, 100)


def test_laplace_likelihood_of_a_scalar_site_gets_a_quadrature_family(ng_data):
    """mu ~ N(0, 1), y_i ~ Laplace(mu, 1): the statistics x^2 and |y_i - x| (a vector statistic
    of the scalar mu, kinks at the data) make an automatic family; one site, so q is the exact
    posterior: E[mu^2] against numpy quadrature on a fine grid (the kinks, which are not panel
    boundaries, cost the quadrature some accuracy)."""
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("n", y.shape[0]):
            numpyro.sample("y", dist.Laplace(mu, 1.0), obs=y)

    guide = nnef.CAVIGuide(model)
    result = nnef.CAVI(model, guide).run(jax.random.key(0), 5, ng_data)
    fam = guide.conjugate.families["mu"]
    assert isinstance(fam.oracle, nnef.QuadratureOracle)
    assert fam.family.stat_dim == 1 + ng_data.shape[0]  # x^2 and one |y_i - x| per datum
    grid = np.linspace(-10.0, 10.0, 400001)
    log_p = -0.5 * grid**2 - np.abs(np.asarray(ng_data)[:, None] - grid).sum(0)
    w = np.exp(log_p - log_p.max())
    exact = (w * grid**2).sum() / w.sum()
    second = float(result.state.mean["mu"][fam.family.stat_labels.index("x^2")])
    np.testing.assert_allclose(second, exact, rtol=1e-3)
    # another analysis key (other probe draws) keeps the family, so the compiled sweep is reused
    assert guide.analyse(ng_data, key=jax.random.key(7)).families["mu"].family is fam.family
    other = guide.analyse(ng_data + 1.0, key=jax.random.key(7)).families["mu"].family
    assert other is not fam.family  # other data: other statistics |y_i + 1 - x|


def test_vector_statistics_without_a_named_family_explain_what_to_do():
    def model():
        p = numpyro.sample("p", dist.Dirichlet(jnp.ones(3)))
        numpyro.factor("quadratic", -jnp.sum(p**2))

    with pytest.raises(nnef.NonConjugateError,
                       match=r"site 'p'.*only for scalar elements.*from_statistics.*oracles="):
        nnef.CAVI(model, nnef.CAVIGuide(model)).run(jax.random.key(0), 5)


def test_scalar_statistics_without_a_named_family_get_a_quadrature_family():
    """One site, so q is the exact posterior p(x) ~ exp(-(x - 0.5)^2/2 + x^3 - 0.1 x^4): its
    mean by numpy quadrature on a fine grid."""
    def model():
        x = numpyro.sample("x", dist.Normal(0.5, 1.0))
        numpyro.factor("quartic", -0.1 * x**4 + x**3)

    guide = nnef.CAVIGuide(model)
    result = nnef.CAVI(model, guide).run(jax.random.key(0), 5)
    fam = guide.conjugate.families["x"]
    assert isinstance(fam.oracle, nnef.QuadratureOracle)
    assert set(fam.family.stat_labels) == {"x", "x^2", "x^3", "x^4"}
    grid = np.linspace(-20.0, 30.0, 200001)
    log_p = -0.5 * (grid - 0.5) ** 2 + grid**3 - 0.1 * grid**4
    w = np.exp(log_p - log_p.max())
    exact = (w * grid).sum() / w.sum()
    mean = float(result.state.mean["x"][fam.family.stat_labels.index("x")])
    np.testing.assert_allclose(mean, exact, rtol=1e-8)


def test_improper_automatic_conditional_is_refused_by_name():
    def model():
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        numpyro.factor("cubic", x**3)

    with pytest.raises(ValueError, match=r"site\(s\) \['x'\] left the natural domain.*improper"):
        nnef.CAVI(model, nnef.CAVIGuide(model)).run(jax.random.key(0), 5)


def test_nan_in_observed_data_is_rejected(ng_data):
    bad = ng_data.at[3].set(jnp.nan)
    with pytest.raises(ValueError, match="observed site 'y'.*NaN"):
        nnef.CAVI(normal_gamma, nnef.CAVIGuide(normal_gamma)).run(jax.random.key(0), 5, bad)


def mixture(y, num_components=3):
    pi = numpyro.sample("pi", dist.Dirichlet(jnp.ones(num_components)))
    with numpyro.plate("k", num_components):
        tau = numpyro.sample("tau", dist.Gamma(2.0, 1.0))
        mu = numpyro.sample("mu", dist.Normal(0.0, 1 / jnp.sqrt(0.1 * tau)))
    with numpyro.plate("n", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(pi))
        numpyro.sample("y", dist.Normal(mu[z], 1 / jnp.sqrt(tau[z])), obs=y)


def test_gaussian_mixture_monotone_and_recovers_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([-4.0, 0.0, 4.0])
    y = jnp.asarray((centres[:, None] + 0.5 * rng.normal(size=(3, 15))).ravel())
    guide = nnef.CAVIGuide(mixture)
    result = nnef.CAVI(mixture, guide).run(jax.random.key(0), 200, y)
    cm = guide.conjugate
    assert {n: f.family.name for n, f in cm.families.items()} == {
        "pi": "Dirichlet", "tau": "Gamma", "mu": "Gaussian", "z": "Categorical"}
    assert result.converged
    assert np.all(np.diff(result.elbo) >= -1e-9 * np.abs(result.elbo[1:]))
    means = np.sort(np.asarray(result.state.mean["mu"])[:, 0])
    np.testing.assert_allclose(means, centres, atol=0.4)
    # every point is assigned to its own cluster with probability > 0.99
    probs = np.asarray(result.state.mean["z"])
    order = np.argsort(np.asarray(result.state.mean["mu"])[:, 0])
    assert np.all(probs[:, order][np.arange(45), np.repeat(np.arange(3), 15)] > 0.99)


def test_mixture_starts_escape_the_symmetric_saddle():
    """A mixture with a LogNormal scale prior (Quadrature family): a single start can creep
    along the symmetric saddle (both components at the data's mean, the scale at the data's
    sd) and is reported as not converged; the default 8 starts reach the separated optimum
    from every key, with the scale near the clusters' own sd and a checked ELBO."""
    y = np.r_[np.random.default_rng(0).normal(-3, 1, 15), np.random.default_rng(1).normal(
        3, 1, 15)]
    cavi = nnef.CAVI(gmm_lognormal_scale, nnef.CAVIGuide(gmm_lognormal_scale))
    stuck = None
    for seed in range(8):  # about one start in three falls into the saddle
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            single = cavi.run(jax.random.key(seed), 150, y, num_starts=1, progress_bar=False)
        if not single.converged:
            stuck = single
            assert any("not converged after 150 sweeps" in str(w.message) for w in caught)
            break
    assert stuck is not None, "no single start fell into the saddle: the test shows nothing"
    best = []
    for seed in range(4):
        guide = nnef.CAVIGuide(gmm_lognormal_scale)
        result = nnef.CAVI(gmm_lognormal_scale, guide).run(jax.random.key(seed), 150, y,
                                                           progress_bar=False)
        assert result.converged
        best.append(result.elbo[-1])
    np.testing.assert_allclose(best, best[0], rtol=1e-9)
    assert best[0] > stuck.elbo[-1] + 10
    sigma = guide.distribution("sigma", result.params["sigma_eta"])
    draws = sigma.sample(jax.random.key(7), (4000,))
    assert 0.8 < float(jnp.mean(draws)) < 1.3
    assert result.check_elbo(jax.random.key(8), 2000).passed()
    with pytest.raises(ValueError, match="num_starts"):
        nnef.CAVI(gmm_lognormal_scale, guide).run(jax.random.key(0), 10, y, num_starts=0)


def nmf(Y, k=2):
    n, m = Y.shape
    tau = numpyro.sample("tau", dist.Gamma(2.0, 1.0))
    with numpyro.plate("rows", n, dim=-2), numpyro.plate("kw", k, dim=-1):
        W = numpyro.sample("W", dist.Exponential(1.0))
    with numpyro.plate("kh", k, dim=-2), numpyro.plate("cols", m, dim=-1):
        H = numpyro.sample("H", dist.Exponential(1.0))
    with numpyro.plate("r", n, dim=-2), numpyro.plate("c", m, dim=-1):
        numpyro.sample("Y", dist.Normal(W @ H, 1 / jnp.sqrt(tau)), obs=Y)


def test_nmf_rectified_gaussian_factors():
    rng = np.random.default_rng(0)
    Y = jnp.asarray(rng.exponential(size=(8, 2)) @ rng.exponential(size=(2, 6))
                    + 0.1 * rng.normal(size=(8, 6)))
    guide = nnef.CAVIGuide(nmf)
    result = nnef.CAVI(nmf, guide).run(jax.random.key(0), 100, Y)
    cm = guide.conjugate
    assert {n: f.family.name for n, f in cm.families.items()} == {
        "tau": "Gamma", "W": "RectifiedGaussian", "H": "RectifiedGaussian"}
    assert cm.self_coupled["W"] and cm.self_coupled["H"] and not cm.self_coupled["tau"]
    assert np.all(np.diff(result.elbo) >= -1e-9 * np.abs(result.elbo[1:]))
    ew, eh = (np.asarray(result.state.mean[n])[..., 0] for n in ("W", "H"))
    assert np.all(ew >= 0) and np.all(eh >= 0)
    assert np.linalg.norm(ew @ eh - np.asarray(Y)) < 0.1 * np.linalg.norm(np.asarray(Y))
    check = result.check_elbo(jax.random.key(1), 4000)
    assert check.passed(), str(check)


def test_bilinear_coupling_of_families_without_names():
    """Model a: x, y in unnamed families with fixed priors, coupled by T(x) . A . S(y); the
    fixed point is eta_x = eta_x0 + A <S(y)>, eta_y = eta_y0 + A^T <T(x)>, with x's oracle
    given by hand or found automatically (a quadrature family of x's own statistics)."""
    from numpyro.distributions import constraints

    fx = nnef.ExponentialFamily.from_statistics(
        "Quartic", lambda x: {"x": x, "x2": x * x, "x4": x**4}, event_shape=(),
        support=constraints.real)
    fy = nnef.families.GaussLaplace()
    ox, oy = nnef.QuadratureOracle(fx), nnef.ExactOracle(fy)
    eta_x0, eta_y0 = jnp.array([0.3, -0.5, -0.3]), jnp.array([-0.2, -0.8, -0.5])
    A = jnp.array([[0.2, 0.0, 0.1], [0.0, -0.05, 0.0], [0.0, 0.0, 0.0]])

    def model():
        x = numpyro.sample("x", nnef.EFDistribution(fx, eta_x0, oracle=ox))
        y = numpyro.sample("y", nnef.EFDistribution(fy, eta_y0, oracle=oy))
        numpyro.factor("coupling", fx.sufficient_statistics(x) @ A @ fy.sufficient_statistics(y))

    ex, ey = eta_x0, eta_y0
    for _ in range(100):
        ex = eta_x0 + A @ oy.mean(ey)
        ey = eta_y0 + A.T @ ox.mean(ex)
    means = {}
    for label, oracles in (("given", {"x": ox}), ("automatic", None)):
        guide = nnef.CAVIGuide(model, oracles=oracles)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # quadrature: ELBO flat to ~1e-6
            result = nnef.CAVI(model, guide, tol=1e-14).run(jax.random.key(0), 100)
        fam = guide.conjugate.families["x"]
        assert isinstance(fam.oracle, nnef.QuadratureOracle)
        np.testing.assert_allclose(result.params["y_eta"], ey, rtol=1e-8)
        means[label] = np.asarray(result.state.mean["x"]) @ fam.B.T + fam.c  # E[s(x)]
        if label == "given":
            assert fam.family.name == "Quartic"
            np.testing.assert_allclose(result.params["x_eta"], ex, rtol=1e-8)
        else:  # its own statistics: the site's, so E[s] is comparable, not eta
            assert fam.family is not fx
    np.testing.assert_allclose(means["automatic"], means["given"], rtol=1e-8)


def test_lasso_with_a_trained_oracle_agrees_with_the_exact_one():
    """Model c with the weights' GaussLaplace factors given by a trained neural oracle: posterior
    means within 2% of a posterior sd of the exact-oracle run."""
    from test_training import synthetic_dataset

    family = nnef.families.GaussLaplace()
    etas = nnef.sample_etas(family, key=jax.random.key(5), low=[-2.5, -2.0, -1.5],
                            high=[2.5, -0.5, -0.5], num=200)
    dataset = synthetic_dataset(family, etas, jax.random.key(6), noise=0.005)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        oracle = nnef.train_oracle(dataset, key=jax.random.key(7), progress=False,
                                   max_epochs=700, patience=500, sobolev_weight=30.0,
                                   out_of_range="error")
    rng = np.random.default_rng(3)
    X = rng.normal(size=(60, 5))
    X /= np.linalg.norm(X, axis=0)  # unit columns keep the weights' eta inside the data's box
    y = X @ np.array([0.6, 0.0, -0.4, 0.0, 0.2]) + 0.6 * rng.normal(size=60)
    means = {}
    for label, oracles in (("exact", None), ("trained", {"w": oracle})):
        guide = nnef.CAVIGuide(lasso, oracles=oracles)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a learned oracle: ELBO flat
            result = nnef.CAVI(lasso, guide).run(jax.random.key(0), 100, jnp.asarray(X),
                                                 jnp.asarray(y))
        assert result.converged
        means[label] = np.asarray(result.state.mean["w"])
    sd = np.sqrt(means["exact"][:, 1] - means["exact"][:, 0] ** 2)
    gap = np.max(np.abs(means["trained"][:, 0] - means["exact"][:, 0]) / sd)
    assert gap < 0.02


def test_plates_that_do_not_match_the_data_name_the_site():
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("n", 5):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(ValueError, match=r"'y'.*plate's size"):
        nnef.CAVI(model, nnef.CAVIGuide(model)).run(jax.random.key(0), 5, jnp.ones(7))


def quartic_site_model():
    """An unnamed family x ~ exp(eta . (x, x^2, x^4)) (no exact sampler, a QuadratureOracle)
    observed through y_i ~ N(x, 1): the posterior eta is eta0 + (sum y, -n/2, 0)."""
    from numpyro.distributions import constraints

    family = nnef.ExponentialFamily.from_statistics(
        "Quartic", lambda x: {"x": x, "x2": x * x, "x4": x**4}, event_shape=(),
        support=constraints.real)
    oracle = nnef.QuadratureOracle(family)

    def model(y):
        x = numpyro.sample("x", nnef.EFDistribution(family, jnp.array([0.3, -0.5, -0.3]),
                                                    oracle=oracle))
        with numpyro.plate("n", y.shape[0]):
            numpyro.sample("y", dist.Normal(x, 1.0), obs=y)

    return family, oracle, model


def test_posterior_draws_of_a_learned_family_come_from_its_flow_sampler(monkeypatch):
    family, oracle, model = quartic_site_model()
    y = jnp.array([0.9, 1.4, 0.3, 1.1, 0.8])  # posterior eta = (4.8, -3.0, -0.3)
    sampler = nnef.train_flow_sampler(
        family, ([4.6, -3.2, -0.35], [5.0, -2.8, -0.25]), key=jax.random.key(0),
        architecture="nsf", hyperparameters={"num_layers": 1, "hidden": (16, 16), "num_bins": 4},
        num_steps=400, batch_size=128, learning_rate=1e-2, progress=False, out_of_range="error")
    guide = nnef.CAVIGuide(model, oracles={"x": oracle}, samplers={"x": sampler})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # quadrature: ELBO flat to ~1e-6
        result = nnef.CAVI(model, guide).run(jax.random.key(1), 20, y)
    eta = result.params["x_eta"]
    np.testing.assert_allclose(eta, [4.8, -3.0, -0.3], rtol=1e-8)

    def no_nuts(*args, **kwargs):
        raise AssertionError("NUTS was called although the site has a sampler")

    monkeypatch.setattr(nnef.sampling, "sample_family", no_nuts)
    n = 2000
    draws = guide.sample_posterior(jax.random.key(2), result.params, sample_shape=(n,))
    t = np.asarray(family.sufficient_statistics(draws["x"]))
    assert t.shape == (n, 3)
    mcse = t.std(0) / np.sqrt(n)
    exact = np.asarray(result.state.mean["x"])  # the oracle's E[T] at the CAVI eta
    assert np.all(np.abs(t.mean(0) - exact) < 4 * mcse), (t.mean(0), exact, mcse)


def test_sampler_for_another_family_or_site_names_the_site():
    from flax import nnx

    from numpyro_nnef.nn.bijections import build_conditional_flow

    family, oracle, model = quartic_site_model()
    other = nnef.FlowSampler(nnef.families.GaussLaplace(),
                             build_conditional_flow("realnvp", 1, 3, rngs=nnx.Rngs(0)),
                             np.zeros(3), np.ones(3), -np.ones(3), np.ones(3))
    y = jnp.ones(3)
    for samplers, match in (({"x": other}, r"site 'x'.*GaussLaplace.*Quartic"),
                            ({"z": other}, r"\['z'\].*not latent sites")):
        guide = nnef.CAVIGuide(model, oracles={"x": oracle}, samplers=samplers)
        with pytest.raises(ValueError, match=match):
            nnef.CAVI(model, guide).run(jax.random.key(0), 5, y)


# ----------------------------------------------------------------------------- automatic families

SCHOOLS_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(sigma, y=None):
    """NumPyro's eight schools, non-centred."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("J", sigma.shape[0]):
        theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        numpyro.sample("obs", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)


def divorce_regression(marriage, divorce=None):
    """The divorce-rate regression of NumPyro's Bayesian regression tutorial."""
    a = numpyro.sample("a", dist.Normal(0.0, 0.2))
    bM = numpyro.sample("bM", dist.Normal(0.0, 0.5))
    sigma = numpyro.sample("sigma", dist.Exponential(1.0))
    numpyro.sample("obs", dist.Normal(a + bM * marriage, sigma), obs=divorce)


def divorce_data(n=50):
    rng = np.random.default_rng(0)
    m = rng.normal(size=n)
    d = 0.35 * m + 0.9 * rng.normal(size=n)
    return (m - m.mean()) / m.std(), (d - d.mean()) / d.std()


def gaussian_mixture_moments(log_prior_s, s, u, design, prior_var, noise_var, y):
    """Exact posterior means and sds of (s, z) for z ~ N(0, diag(prior_var)), y ~ N(design(s) z,
    diag(noise_var(s))), s = exp(u) on a fine grid in u (a mixture of Gaussians over s)."""
    log_w, means, second = [], [], []
    for si, ui in zip(s, u, strict=True):
        A, S = design(si), noise_var(si)
        C = A @ np.diag(prior_var) @ A.T + np.diag(S)
        _, logdet = np.linalg.slogdet(C)
        log_w.append(log_prior_s(si) + ui - 0.5 * (logdet + y @ np.linalg.solve(C, y)))
        P = np.diag(1 / prior_var) + A.T @ (A / S[:, None])
        cov = np.linalg.inv(P)
        m = cov @ (A.T @ (y / S))
        means.append(m)
        second.append(np.diag(cov) + m**2)
    w = np.exp(np.asarray(log_w) - np.max(log_w))
    w /= w.sum()  # uniform grid in u: the trapezoid rule's end weights are negligible
    e_z, e_z2 = w @ np.asarray(means), w @ np.asarray(second)
    e_s, e_s2 = w @ s, w @ s**2
    return (np.append(e_s, e_z), np.sqrt(np.append(e_s2 - e_s**2, e_z2 - e_z**2)))


def test_eight_schools_scale_gets_an_automatic_quadrature_family(caplog):
    """tau's conditional [log(1 + tau^2/25), tau, tau^2] has no name: a quadrature family; the
    CAVI means are within 0.5 posterior sd of the exact posterior (1-d quadrature over tau)."""
    sigma, y = jnp.asarray(SCHOOLS_SIGMA), jnp.asarray(SCHOOLS_Y)
    guide = nnef.CAVIGuide(eight_schools)
    with caplog.at_level("INFO", logger="numpyro_nnef"):
        result = nnef.CAVI(eight_schools, guide).run(jax.random.key(0), 100, sigma, y)
    fam = guide.conjugate.families["tau"]
    assert isinstance(fam.oracle, nnef.QuadratureOracle)
    assert fam.family.stat_labels == ("log(0.04*x^2 + 1)", "x", "x^2")
    assert "site 'tau': no named family has" in caplog.text
    assert result.converged
    assert guide.analyse(sigma, y, key=jax.random.key(9)).families["tau"].family is fam.family
    check = result.check_elbo(jax.random.key(1), 2000)
    assert check.passed(), str(check)
    u = np.linspace(-12.0, 6.0, 4000)
    mean, sd = gaussian_mixture_moments(
        lambda t: -np.log1p((t / 5.0) ** 2), np.exp(u), u,
        lambda t: np.concatenate([np.ones((8, 1)), t * np.eye(8)], axis=1),
        np.append(25.0, np.ones(8)), lambda t: SCHOOLS_SIGMA**2, SCHOOLS_Y)
    state = result.state
    cavi = np.concatenate([[float(state.mean["tau"][1]), float(state.mean["mu"][0])],
                           np.asarray(state.mean["theta_tilde"])[:, 0]])
    assert np.all(np.abs(cavi - mean) < 0.5 * sd), (cavi, mean, sd)


def test_divorce_regression_noise_scale_gets_an_automatic_quadrature_family(monkeypatch):
    """sigma's conditional [sigma, sigma^-2, log sigma] (Exponential prior, Normal likelihood)
    has no name; CAVI means within 0.5 posterior sd of the exact posterior; q(sigma) is sampled
    by its quadrature oracle (inverse CDF), not by NUTS."""

    def no_nuts(*args, **kwargs):
        raise AssertionError("NUTS was called for a site with a QuadratureOracle")

    monkeypatch.setattr(nnef.sampling, "sample_family", no_nuts)
    m, d = divorce_data()
    guide = nnef.CAVIGuide(divorce_regression)
    result = nnef.CAVI(divorce_regression, guide).run(jax.random.key(0), 100, jnp.asarray(m),
                                                      jnp.asarray(d))
    fam = guide.conjugate.families["sigma"]
    assert isinstance(fam.oracle, nnef.QuadratureOracle)
    assert result.converged
    check = result.check_elbo(jax.random.key(1), 2000)
    assert check.passed(), str(check)
    u = np.linspace(-4.0, 3.0, 3000)
    design = np.stack([np.ones_like(m), m], axis=1)
    mean, sd = gaussian_mixture_moments(lambda s: -s, np.exp(u), u, lambda s: design,
                                        np.array([0.04, 0.25]), lambda s: np.full(50, s**2), d)
    state = result.state
    x = fam.family.stat_labels.index("x")
    cavi = np.array([float(state.mean["sigma"][x]), float(state.mean["a"][0]),
                     float(state.mean["bM"][0])])
    assert np.all(np.abs(cavi - mean) < 0.5 * sd), (cavi, mean, sd)


def test_nan_in_a_covariate_names_the_argument(lasso_data):
    X, y = lasso_data
    bad = X.at[2, 1].set(jnp.nan).at[5, 0].set(jnp.inf)
    with pytest.raises(ValueError, match=r"argument 'X' \(2 of 120 values\).*finite data"):
        nnef.CAVI(lasso, nnef.CAVIGuide(lasso)).run(jax.random.key(0), 5, bad, y)

    def model(data):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(w * data["x"], 1.0), obs=data["y"])

    data = {"x": jnp.ones(4).at[0].set(jnp.nan), "y": jnp.ones(4)}
    with pytest.raises(ValueError, match=r"argument 'data'\['x'\] \(1 of 4 values\)"):
        nnef.CAVI(model, nnef.CAVIGuide(model)).run(jax.random.key(0), 5, data)


def test_a_function_of_several_sites_is_named_in_words(ng_data):
    def model(y):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("n", y.shape[0]):
            numpyro.sample("y", dist.Normal(jnp.exp(a * b), 1.0), obs=y)

    with pytest.raises(nnef.NonConjugateError,
                       match=r"'a', 'b'.*site 'y' \(Normal\) contains exp of a function of several"
                             r" sites \(a and b\)"):
        nnef.CAVI(model, nnef.CAVIGuide(model)).run(jax.random.key(0), 5, ng_data)


# ----------------------------------------------------------------------------- vector elements

BLR_COV = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]])
BLR_LOC = np.array([0.2, -0.1, 0.0])
BLR_SIGMA = 0.3


@pytest.fixture(scope="module")
def blr_data():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(20, 3))
    return jnp.asarray(X), jnp.asarray(X @ np.array([1.0, -0.5, 0.3]) + BLR_SIGMA * rng.normal(
        size=20))


def blr_prior(kind):
    """w's prior: MultivariateNormal(BLR_LOC, BLR_COV) given three ways, or N(0, I) as
    Normal(0, 1).expand([3]).to_event(1)."""
    if kind == "covariance":
        return dist.MultivariateNormal(BLR_LOC, covariance_matrix=BLR_COV)
    if kind == "scale_tril":
        return dist.MultivariateNormal(BLR_LOC, scale_tril=np.linalg.cholesky(BLR_COV))
    if kind == "precision":
        return dist.MultivariateNormal(BLR_LOC, precision_matrix=np.linalg.inv(BLR_COV))
    return dist.Normal(0.0, 1.0).expand([3]).to_event(1)


@pytest.mark.parametrize("kind", ["covariance", "scale_tril", "precision", "to_event"])
def test_linear_regression_with_a_vector_prior_is_the_exact_posterior(blr_data, kind):
    """w ~ N(m0, S0), y ~ N(X w, sigma^2): one MultivariateNormal q factor for w, equal to the
    posterior N(S (S0^-1 m0 + X^T y / sigma^2), S = (S0^-1 + X^T X / sigma^2)^-1)."""
    X, y = blr_data

    def model(X, y):
        w = numpyro.sample("w", blr_prior(kind))
        numpyro.sample("y", dist.Normal(X @ w, BLR_SIGMA), obs=y)

    guide = nnef.CAVIGuide(model)
    result = nnef.CAVI(model, guide).run(jax.random.key(0), 10, X, y)
    fam = guide.conjugate.families["w"].family
    assert fam.name == "MultivariateNormal" and guide.conjugate.sites["w"].element_shape == (3,)
    loc, cov = fam.loc_covariance_from_natural(result.params["w_eta"])
    m0, s0 = (BLR_LOC, BLR_COV) if kind != "to_event" else (np.zeros(3), np.eye(3))
    Xn, yn = np.asarray(X), np.asarray(y)
    post_cov = np.linalg.inv(np.linalg.inv(s0) + Xn.T @ Xn / BLR_SIGMA**2)
    post_loc = post_cov @ (np.linalg.solve(s0, m0) + Xn.T @ yn / BLR_SIGMA**2)
    np.testing.assert_allclose(loc, post_loc, rtol=1e-6)
    np.testing.assert_allclose(cov, post_cov, rtol=1e-6)
    assert result.converged
    draws = Predictive(model, guide=guide, params=result.params, num_samples=50,
                       return_sites=["w", "y"])(jax.random.key(2), X, None)
    assert draws["w"].shape == (50, 3) and draws["y"].shape == (50, 20)


def test_linear_regression_with_a_gamma_noise_precision(blr_data):
    X, y = blr_data

    def model(X, y):
        tau = numpyro.sample("tau", dist.Gamma(2.0, 1.0))
        w = numpyro.sample("w", blr_prior("covariance"))
        numpyro.sample("y", dist.Normal(X @ w, 1 / jnp.sqrt(tau)), obs=y)

    guide = nnef.CAVIGuide(model)
    result = nnef.CAVI(model, guide).run(jax.random.key(0), 100, X, y)
    assert {n: f.family.name for n, f in guide.conjugate.families.items()} == {
        "tau": "Gamma", "w": "MultivariateNormal"}
    assert result.converged
    assert np.all(np.diff(result.elbo) >= -1e-9 * np.abs(result.elbo[1:]))


def grouped_counts(group, y, n, k, exposure, counts, num_groups=3):
    """Per-group Beta-Bernoulli (indexed by a data array), Binomial with per-group totals, and
    Gamma-Poisson with per-observation exposures and a rate per group or per observation."""
    with numpyro.plate("g", num_groups):
        p = numpyro.sample("p", dist.Beta(2.0, 2.0))
        q = numpyro.sample("q", dist.Beta(1.5, 3.0))
        rate = numpyro.sample("rate", dist.Gamma(2.0, 1.0))
        numpyro.sample("k", dist.Binomial(total_count=n, probs=q), obs=k)
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Bernoulli(probs=p[group]), obs=y)
        numpyro.sample("c", dist.Poisson(exposure * rate[group]), obs=counts)
        lam = numpyro.sample("lam", dist.Gamma(2.0, 1.0))
        numpyro.sample("c_own", dist.Poisson(exposure * lam), obs=counts)


@pytest.fixture(scope="module")
def counts_data():
    rng = np.random.default_rng(4)
    group = rng.integers(0, 3, 24)
    exposure = rng.uniform(0.5, 2.0, 24)
    n = np.array([5.0, 12.0, 3.0])
    return (jnp.asarray(group), jnp.asarray(rng.integers(0, 2, 24).astype(float)),
            jnp.asarray(n), jnp.asarray(rng.binomial(n.astype(int), 0.4).astype(float)),
            jnp.asarray(exposure), jnp.asarray(rng.poisson(2.0 * exposure).astype(float)))


def test_symbolic_form_with_per_element_coefficients_and_indexing(counts_data):
    """log(1 - p[group]) with counts outside the log, Binomial totals that differ per group, and
    log(exposure * rate[group]) trace to a form equal to the log density."""
    rng = np.random.default_rng(0)
    draws = {"p": rng.uniform(size=(8, 3)), "q": rng.uniform(size=(8, 3)),
             "rate": rng.gamma(2.0, size=(8, 3)), "lam": rng.gamma(2.0, size=(8, 24))}

    def ld(d):
        return log_density(grouped_counts, counts_data, {}, d)[0]

    poly = trace_log_density(lambda data, d: ld(d), {k: v[0] for k, v in draws.items()}, draws)
    for k in range(1, 4):
        point = {n: jnp.asarray(v[k]) for n, v in draws.items()}
        np.testing.assert_allclose(float(poly.at(point)), float(ld(point)), rtol=1e-5)


def test_symbolic_form_of_moved_entries():
    """pad, rev, reshape, slices and a gather with out-of-bounds fills of sites, and a log of
    an expression whose entries are a site's elements or constants, equal the log density."""
    def model():
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([6]).to_event(1))
        b = numpyro.sample("b", dist.Beta(2.0, 2.0).expand([3]).to_event(1))
        v = jnp.pad(w, (1, 2))[::-1].reshape(3, 3)[:, 1:]
        picked = jnp.take(w, jnp.array([0, 5, 7]), mode="fill", fill_value=0.5)
        numpyro.factor("moved", jnp.sum(v * jnp.arange(6.0).reshape(3, 2)) - picked @ picked)
        numpyro.factor("log", jnp.arange(1.0, 6.0) @ jnp.log(jnp.pad(b, 1, constant_values=2.0)))

    rng = np.random.default_rng(0)
    draws = {"w": rng.normal(size=(8, 6)), "b": rng.uniform(size=(8, 3))}

    def ld(d):
        return log_density(model, (), {}, d)[0]

    poly = trace_log_density(lambda data, d: ld(d), {k: v[0] for k, v in draws.items()}, draws)
    for k in range(1, 4):
        point = {n: jnp.asarray(v[k]) for n, v in draws.items()}
        np.testing.assert_allclose(float(poly.at(point)), float(ld(point)), rtol=1e-5)


def test_grouped_beta_bernoulli_binomial_poisson_are_exact(counts_data):
    """Each q factor is the exact posterior: Beta(a + sum y_g, b + n_g - sum y_g),
    Gamma(2 + sum c_g, 1 + sum exposure_g) and Gamma(2 + c_i, 1 + exposure_i)."""
    group, y, n, k, exposure, counts = (np.asarray(a) for a in counts_data)
    guide = nnef.CAVIGuide(grouped_counts)
    result = nnef.CAVI(grouped_counts, guide).run(jax.random.key(0), 20, *counts_data)
    assert {n: f.family.name for n, f in guide.conjugate.families.items()} == {
        "p": "Beta", "q": "Beta", "rate": "Gamma", "lam": "Gamma"}
    assert result.converged
    assert np.all(np.diff(result.elbo) >= -1e-6 * np.abs(result.elbo[1:]))
    ones = np.ones_like(y)
    np.testing.assert_allclose(result.params["p_eta"], np.stack(
        [1 + np.bincount(group, y, 3), 1 + np.bincount(group, ones - y, 3)], -1), rtol=1e-5)
    np.testing.assert_allclose(result.params["q_eta"], np.stack([0.5 + k, 2.0 + n - k], -1),
                               rtol=1e-5)
    np.testing.assert_allclose(result.params["rate_eta"], np.stack(
        [1 + np.bincount(group, counts, 3), -1 - np.bincount(group, exposure, 3)], -1),
        rtol=1e-5)
    np.testing.assert_allclose(result.params["lam_eta"], np.stack(
        [1 + counts, -1 - exposure], -1), rtol=1e-5)
    check = result.check_elbo(jax.random.key(1), 2000)
    assert check.passed(), str(check)


def test_coordinates_of_a_non_gaussian_event_stay_scalar_elements(lasso_data):
    """Laplace(0, 1).expand([p]).to_event(1) weights: |x| is no Gaussian statistic, so each
    coordinate is an element with a GaussLaplace factor (as under a plate)."""
    X, y = lasso_data

    def model(X, y):
        tau = numpyro.sample("tau", dist.Gamma(2.0, 1.0))
        w = numpyro.sample("w", dist.Laplace(0.0, 1.0).expand([X.shape[1]]).to_event(1))
        numpyro.sample("y", dist.Normal(X @ w, 1 / jnp.sqrt(tau)), obs=y)

    cm = nnef.CAVIGuide(model).analyse(X, y, key=jax.random.key(0))
    assert cm.families["w"].family.name == "GaussLaplace"
    assert cm.sites["w"].element_shape == () and cm.sites["w"].batch_shape == (4,)


def test_expected_log_joint_of_batched_vector_elements_at_point_masses():
    """Two vector elements of one site coupled within and across elements: at point masses
    (mu = the statistics of one point) E_q[log p] is log p at that point."""
    from numpyro_nnef.infer.conjugacy import analyse_model

    def model(X, y):
        with numpyro.plate("k", 2):
            w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        numpyro.sample("y", dist.Normal(X @ w.ravel(), 0.5), obs=y)
        numpyro.factor("c", jnp.sum(w[0] * w[1]) + w[0, 0] * w[1, 2])

    rng = np.random.default_rng(2)
    X, y = jnp.asarray(rng.normal(size=(10, 6))), jnp.asarray(rng.normal(size=10))
    cm = analyse_model(model, X, y, key=jax.random.key(0))
    assert cm.sites["w"].element_shape == (3,) and cm.self_coupled["w"]
    for _ in range(3):
        point = rng.normal(size=(2, 3))
        mu = {"w": jnp.asarray(cm.site_stat_batch("w", point).reshape(2, -1))}
        np.testing.assert_allclose(float(cm.expected_log_joint(mu)),
                                   float(log_density(model, (X, y), {}, {"w": point})[0]),
                                   rtol=1e-12)


@pytest.mark.parametrize("left_side", [True, False])
def test_triangular_solve_of_a_site_is_a_linear_map(left_side):
    """solve(A, b) with A constant (lower or upper, transposed, unit diagonal, batched) and b
    depending on a site: the symbolic form equals the function at random points."""
    rng = np.random.default_rng(3)
    A = np.tril(rng.normal(size=(2, 3, 3))) + 3 * np.eye(3)

    def fn(data, d):
        b = d["x"][:, :, None] if left_side else d["x"][:, None, :]
        out = 0.0
        for lower, transpose_a, unit in ((True, False, False), (False, True, True)):
            a = A if lower else np.swapaxes(A, -1, -2)
            solved = jax.lax.linalg.triangular_solve(a, b + 1.0, left_side=left_side,
                                                     lower=lower, transpose_a=transpose_a,
                                                     unit_diagonal=unit)
            out = out + jnp.sum(solved**2) + jnp.sum(solved)
        return out

    draws = {"x": rng.normal(size=(4, 2, 3))}
    poly = trace_log_density(fn, {"x": draws["x"][0]}, draws)
    for k in range(1, 4):
        point = {"x": jnp.asarray(draws["x"][k])}
        np.testing.assert_allclose(float(poly.at(point)), float(fn([], point)), rtol=1e-12)


LDA_BETA = np.array([[3.0, 3.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 3.0, 3.0]])  # breaks symmetry


def lda(w, alpha=1.0):
    """Latent Dirichlet allocation: theta_d ~ Dir(alpha), phi_k ~ Dir(beta_k),
    z_dn ~ Cat(theta_d), w_dn ~ Cat(phi[z_dn]) (phi[z] gathers rows of a site by a site)."""
    num_docs, num_words = w.shape
    num_topics, vocabulary = LDA_BETA.shape
    with numpyro.plate("k", num_topics):
        phi = numpyro.sample("phi", dist.Dirichlet(jnp.asarray(LDA_BETA)))
    with numpyro.plate("d", num_docs, dim=-2):
        theta = numpyro.sample("theta", dist.Dirichlet(alpha * jnp.ones(num_topics)))
        with numpyro.plate("n", num_words, dim=-1):
            z = numpyro.sample("z", dist.Categorical(theta))
            numpyro.sample("w", dist.Categorical(phi[z]), obs=w)


def lda_data():
    rng = np.random.default_rng(6)
    topics = np.array([[0.45, 0.45, 0.05, 0.025, 0.025], [0.025, 0.025, 0.05, 0.45, 0.45]])
    mixes = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9]])
    z = np.array([rng.choice(2, size=10, p=m) for m in mixes])
    return jnp.asarray(np.array([[rng.choice(5, p=topics[k]) for k in row] for row in z]))


HMM_MU0 = np.array([-2.0, 2.0])  # prior means of the states' emissions (break symmetry)


def hmm(y):
    """z_0 ~ Cat(1/K), z_t ~ Cat(trans[z_{t-1}]), y_t ~ N(mu[z_t], 1); trans_j ~ Dir(1),
    mu_j ~ N(mu0_j, 1), one site per time step (a Python loop)."""
    num_states = HMM_MU0.shape[0]
    with numpyro.plate("states", num_states):
        trans = numpyro.sample("trans", dist.Dirichlet(jnp.ones(num_states)))
        mu = numpyro.sample("mu", dist.Normal(jnp.asarray(HMM_MU0), 1.0))
    z = None
    for t in range(y.shape[0]):
        probs = jnp.ones(num_states) / num_states if z is None else trans[z]
        z = numpyro.sample(f"z_{t}", dist.Categorical(probs))
        numpyro.sample(f"y_{t}", dist.Normal(mu[z], 1.0), obs=y[t])


def hmm_data():
    rng = np.random.default_rng(7)
    states = np.array([0, 0, 0, 1, 1, 1, 0, 0])
    return jnp.asarray(np.array([-2.0, 2.0])[states] + 0.7 * rng.normal(size=8))


def lda_draws(rng, num):
    return {"phi": rng.dirichlet(np.ones(5), size=(num, 2)),
            "theta": rng.dirichlet(np.ones(2), size=(num, 4, 1)),
            "z": rng.integers(0, 2, size=(num, 4, 10))}


def hmm_draws(rng, num):
    return {"trans": rng.dirichlet(np.ones(2), size=(num, 2)), "mu": rng.normal(size=(num, 2)),
            **{f"z_{t}": rng.integers(0, 2, size=num) for t in range(8)}}


@pytest.mark.parametrize("model, data, draws", [(lda, lda_data, lda_draws),
                                                (hmm, hmm_data, hmm_draws)])
def test_symbolic_form_with_categorical_indices(model, data, draws):
    """Rows of a site gathered by a categorical site (phi[z], trans[z_{t-1}], mu[z_t]) and the
    observation gathered from them trace to a form equal to the log density."""
    args = (data(),)
    draws = draws(np.random.default_rng(0), 8)

    def ld(d):
        return log_density(model, args, {}, d)[0]

    finite = {n: np.arange(2) for n in draws if n.startswith("z")}
    poly = trace_log_density(lambda data, d: ld(d), {k: v[0] for k, v in draws.items()}, draws,
                             finite)
    for k in range(1, 4):
        point = {n: jnp.asarray(v[k]) for n, v in draws.items()}
        np.testing.assert_allclose(float(poly.at(point)), float(ld(point)), rtol=1e-5)


def expected_log_dirichlet(concentration):
    c = np.asarray(concentration, dtype=np.float64)
    return scipy.special.digamma(c) - scipy.special.digamma(c.sum(-1, keepdims=True))


def softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_lda_fixed_point_and_elbo():
    """At the fixed point (derived by hand) q(theta_d) = Dir(alpha + sum_n r_dn), q(phi_k) =
    Dir(beta_k + sum_dn r_dnk onehot(w_dn)), r_dn ~ exp(E log theta_d + E log phi[:, w_dn]).
    (NUTS on the model with z summed out: every posterior mean within 0.3 sd of CAVI's.)"""
    w = lda_data()
    guide = nnef.CAVIGuide(lda)
    result = nnef.CAVI(lda, guide).run(jax.random.key(0), 200, w)
    assert {n: f.family.name for n, f in guide.conjugate.families.items()} == {
        "phi": "Dirichlet", "theta": "Dirichlet", "z": "Categorical"}
    assert result.converged
    assert np.all(np.diff(result.elbo) >= -1e-6 * np.abs(result.elbo[1:]))
    q = {n: guide.distribution(n, result.params[f"{n}_eta"]) for n in ("phi", "theta", "z")}
    r = np.asarray(q["z"].probs, dtype=np.float64)  # (D, N, K)
    theta, phi = (np.asarray(q[n].concentration, dtype=np.float64) for n in ("theta", "phi"))
    np.testing.assert_allclose(theta[:, 0], 1.0 + r.sum(1), rtol=1e-4)
    onehot = np.eye(5)[np.asarray(w)]  # (D, N, V)
    np.testing.assert_allclose(phi, LDA_BETA + np.einsum("dnk,dnv->kv", r, onehot), rtol=1e-4)
    e_log_phi = expected_log_dirichlet(phi)  # (K, V)
    logits = expected_log_dirichlet(theta) + e_log_phi[:, np.asarray(w)].transpose(1, 2, 0)
    np.testing.assert_allclose(r, softmax(logits), atol=1e-4)
    check = result.check_elbo(jax.random.key(1), 2000)
    assert check.passed(), str(check)


def test_hmm_fixed_point_and_elbo():
    """Mean field over time steps; at the fixed point (derived by hand) q(trans_j) =
    Dir(1 + sum_t r_{t-1,j} r_t), q(mu_k) = N((mu0_k + sum_t r_tk y_t) / (1 + sum_t r_tk), .),
    r_t ~ exp(r_{t-1} E log trans + E log trans r_{t+1} + E log N(y_t | mu, 1)).
    (NUTS with the states summed out by the forward algorithm: every posterior mean and
    P(z_t = 1) within 0.25 sd of CAVI's.)"""
    y = hmm_data()
    guide = nnef.CAVIGuide(hmm)
    result = nnef.CAVI(hmm, guide).run(jax.random.key(0), 200, y)
    families = {n: f.family.name for n, f in guide.conjugate.families.items()}
    assert families == {"trans": "Dirichlet", "mu": "Gaussian",
                        **{f"z_{t}": "Categorical" for t in range(8)}}
    assert result.converged
    assert np.all(np.diff(result.elbo) >= -1e-6 * np.abs(result.elbo[1:]))
    q = {n: guide.distribution(n, result.params[f"{n}_eta"]) for n in families}
    r = np.stack([np.asarray(q[f"z_{t}"].probs, dtype=np.float64) for t in range(8)])
    trans = np.asarray(q["trans"].concentration, dtype=np.float64)
    np.testing.assert_allclose(trans, 1.0 + np.einsum("tj,tk->jk", r[:-1], r[1:]), rtol=1e-4)
    precision = 1.0 + r.sum(0)
    e_mu = np.asarray(q["mu"].mean, dtype=np.float64)
    np.testing.assert_allclose(e_mu, (HMM_MU0 + r.T @ np.asarray(y)) / precision, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(q["mu"].variance), 1.0 / precision, rtol=1e-4)
    e_log_trans = expected_log_dirichlet(trans)
    y = np.asarray(y, dtype=np.float64)[:, None]
    logits = -0.5 * (-2.0 * y * e_mu + e_mu**2 + 1.0 / precision)
    logits[1:] += r[:-1] @ e_log_trans
    logits[:-1] += r[1:] @ e_log_trans.T
    np.testing.assert_allclose(r, softmax(logits), atol=1e-4)
    check = result.check_elbo(jax.random.key(1), 2000)
    assert check.passed(), str(check)

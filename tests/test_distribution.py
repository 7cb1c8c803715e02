"""EFDistribution: the numpyro Distribution contract (shapes, jit, vmap, log_prob, NUTS)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.stats as st
from numpyro.infer import MCMC, NUTS, Predictive

import numpyro_nnef as nnef
from numpyro_nnef import families
from numpyro_nnef.distribution import EFDistribution
from numpyro_nnef.oracles.quadrature import QuadratureOracle


def gaussian_eta(loc, scale):
    return jnp.stack([loc / scale**2, -0.5 / scale**2], -1)


def lasso_family():
    """T = [x, x^2, |x|] defined by the user: no closed form, quadrature for A(eta)."""
    return nnef.ExponentialFamily.from_statistics(
        "UserGaussLaplace",
        lambda x: {"x": x, "x2": x**2, "abs_x": jnp.abs(x)},
        natural_constraint=nnef.NaturalDomain(lambda e: e[..., 1] < 0, "eta2 < 0", [0, -1, 0]),
        breakpoints=(0.0,),
    )


SCIPY_CASES = [
    (families.Gaussian(), gaussian_eta(jnp.array([0.3, -1.0]), jnp.array([0.7, 2.0])),
     lambda x: st.norm.logpdf(x, [0.3, -1.0], [0.7, 2.0])),
    (families.Gamma(), jnp.array([[1.5, -2.0], [-0.4, -0.5]]),
     lambda x: st.gamma.logpdf(x, [2.5, 0.6], scale=[0.5, 2.0])),
    (families.Beta(), jnp.array([[1.0, 2.0], [-0.5, 0.3]]),
     lambda x: st.beta.logpdf(x, [2.0, 0.5], [3.0, 1.3])),
    (families.VonMises(), jnp.array([[2.0, 0.0], [0.0, -0.5]]),
     lambda x: st.vonmises.logpdf(x, [2.0, 0.5], loc=[0.0, -np.pi / 2])),
]


@pytest.mark.parametrize(
    "family, eta, scipy_logpdf", SCIPY_CASES, ids=lambda c: getattr(c, "name", "")
)
def test_log_prob_matches_scipy(family, eta, scipy_logpdf, key):
    d = EFDistribution(family, eta)
    x = d.sample(key, (5,))
    assert x.shape == (5, 2)
    np.testing.assert_allclose(d.log_prob(x), scipy_logpdf(np.asarray(x)), rtol=1e-8, atol=1e-8)


def test_multivariate_normal_log_prob_matches_scipy(key):
    family = families.MultivariateNormal(3)
    loc = jnp.array([0.5, -1.0, 2.0])
    cov = jnp.array([[2.0, 0.3, 0.1], [0.3, 1.0, -0.2], [0.1, -0.2, 0.5]])
    eta = family.natural_from_loc_covariance(loc, cov)
    d = EFDistribution(family, eta)
    assert d.batch_shape == () and d.event_shape == (3,)
    x = d.sample(key, (4,))
    assert x.shape == (4, 3)
    expected = st.multivariate_normal(np.asarray(loc), np.asarray(cov)).logpdf(np.asarray(x))
    np.testing.assert_allclose(d.log_prob(x), expected, rtol=1e-8)


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)])
def test_shapes_expand_to_event(batch_shape, key):
    family = families.Gaussian()
    eta = jnp.broadcast_to(jnp.array([1.0, -1.0]), batch_shape + (2,))
    d = EFDistribution(family, eta)
    assert d.batch_shape == batch_shape and d.event_shape == ()
    x = d.sample(key, (7,))
    assert x.shape == (7,) + batch_shape
    assert d.log_prob(x).shape == (7,) + batch_shape
    assert d.mean.shape == batch_shape + (2,)
    assert d.covariance.shape == batch_shape + (2, 2)
    expanded = d.expand((4,) + batch_shape)
    assert expanded.batch_shape == (4,) + batch_shape
    assert expanded.sample(key).shape == (4,) + batch_shape
    if batch_shape:
        event = d.to_event(1)
        assert event.event_shape == batch_shape[-1:]
        assert event.log_prob(x).shape == (7,) + batch_shape[:-1]


def test_mean_is_expected_statistics():
    d = EFDistribution(families.Gamma(), jnp.array([1.5, -2.0]))  # shape 2.5, rate 2
    from scipy.special import digamma

    np.testing.assert_allclose(d.mean, [digamma(2.5) - np.log(2.0), 1.25], rtol=1e-10)
    assert set(d.mean_statistics()) == {"log_x", "x"}


def test_pytree_jit_vmap(key):
    family = families.Gaussian()
    eta = gaussian_eta(jnp.linspace(-1, 1, 4), jnp.ones(4))
    d = EFDistribution(family, eta)
    leaves, treedef = jax.tree.flatten(d)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, EFDistribution) and rebuilt.family is family

    x = jnp.linspace(-2, 2, 4)
    jitted = jax.jit(lambda dist_, v: dist_.log_prob(v))(d, x)
    np.testing.assert_allclose(jitted, d.log_prob(x), rtol=1e-12)

    per_eta = jax.vmap(lambda e, v: EFDistribution(family, e).log_prob(v))(eta, x)
    np.testing.assert_allclose(per_eta, d.log_prob(x), rtol=1e-12)
    grad = jax.grad(lambda e: EFDistribution(family, e).log_prob(x).sum())(eta)
    assert jnp.all(jnp.isfinite(grad))


def test_out_of_domain_eta_raises_under_validate_args():
    with pytest.raises(nnef.OutOfDomainError, match="eta2 < 0|natural domain"):
        EFDistribution(families.Gaussian(), jnp.array([0.0, 1.0]), validate_args=True)
    with pytest.raises(ValueError, match="shape"):
        EFDistribution(families.Gaussian(), jnp.array([0.0, -1.0, 2.0]))


def test_family_without_oracle_needs_one_or_unnormalized(key):
    family = lasso_family()
    eta = jnp.array([0.5, -1.0, -1.0])
    d = EFDistribution(family, eta)
    with pytest.raises(ValueError, match="oracle"):
        d.log_prob(0.3)
    unnormalized = EFDistribution(family, eta, unnormalized=True)
    np.testing.assert_allclose(unnormalized.log_prob(0.3), 0.5 * 0.3 - 0.09 - 0.3)


def test_quadrature_oracle_normalizes_user_family():
    family = lasso_family()
    d = EFDistribution(family, jnp.array([0.5, -1.0, -1.0]), QuadratureOracle(family))
    grid = np.linspace(-12, 12, 200001)
    total = np.trapezoid(np.exp(np.asarray(d.log_prob(jnp.asarray(grid)))), grid)
    np.testing.assert_allclose(total, 1.0, rtol=1e-6)


def test_nuts_backed_sample_matches_oracle_moments(key):
    family = lasso_family()
    oracle = QuadratureOracle(family)
    eta = jnp.array([0.5, -1.0, -1.0])
    d = EFDistribution(family, eta, oracle)
    x = d.sample(key, (2000,))
    assert x.shape == (2000,)
    t = np.asarray(family.sufficient_statistics(x))
    exact = np.asarray(oracle.mean(eta))
    # autocorrelated draws: a generous effective-sample-size discount of 4
    se = t.std(0) / np.sqrt(t.shape[0] / 4)
    assert np.all(np.abs(t.mean(0) - exact) < 5 * se), (t.mean(0), exact, se)


def test_latent_site_under_numpyro_nuts(key):
    family = families.Gamma()
    eta = jnp.array([2.0, -1.5])  # shape 3, rate 1.5, E[x] = 2

    def model():
        numpyro.sample("x", EFDistribution(family, eta))

    mcmc = MCMC(NUTS(model), num_warmup=300, num_samples=2000, progress_bar=False)
    mcmc.run(key)
    x = mcmc.get_samples()["x"]
    assert jnp.all(x > 0)
    ess = numpyro.diagnostics.effective_sample_size(np.asarray(x)[None])
    se = float(x.std()) / np.sqrt(ess)
    assert abs(float(x.mean()) - 2.0) < 5 * se, (float(x.mean()), se)


def test_observed_site_with_latent_eta_recovers_it(key):
    family = families.Gamma()
    true_eta = jnp.array([1.0, -2.0])  # shape 2, rate 2
    data = EFDistribution(family, true_eta).sample(jax.random.fold_in(key, 1), (3000,))

    def model(x):
        shape = numpyro.sample("shape", dist.LogNormal(0.0, 1.0))
        rate = numpyro.sample("rate", dist.LogNormal(0.0, 1.0))
        eta = jnp.stack([shape - 1.0, -rate])
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", EFDistribution(family, eta), obs=x)

    mcmc = MCMC(NUTS(model), num_warmup=300, num_samples=500, progress_bar=False)
    with warnings.catch_warnings():
        # the step-size search probes u far out: exp(u) underflows to shape = 0 or overflows to
        # rate = inf, eta leaves the domain and log_prob is NaN there (a divergence for NUTS),
        # which the oracle reports
        warnings.filterwarnings("ignore", "ExactOracle.*outside the natural domain",
                                RuntimeWarning)
        mcmc.run(key, data)
    samples = mcmc.get_samples()
    for name, truth in (("shape", 2.0), ("rate", 2.0)):
        s = samples[name]
        assert abs(float(s.mean()) - truth) < 4 * float(s.std()), (name, float(s.mean()))

    predictive = Predictive(model, samples, return_sites=["x"])
    draws = predictive(jax.random.fold_in(key, 2), data)["x"]
    assert draws.shape == (500, 3000)


def test_prior_predictive_with_user_family(key):
    family = lasso_family()
    oracle = QuadratureOracle(family)

    def model():
        scale = numpyro.sample("scale", dist.HalfNormal(1.0))
        eta = jnp.stack([jnp.zeros(()), -0.5 / scale**2, -jnp.ones(())])
        numpyro.sample("w", EFDistribution(family, eta, oracle))

    draws = Predictive(model, num_samples=3)(key)
    assert draws["w"].shape == (3,) and jnp.all(jnp.isfinite(draws["w"]))


def test_oracle_of_another_family_is_refused():
    oracle = nnef.ExactOracle(families.LaplaceProduct(2))
    with pytest.raises(ValueError, match="oracle is for family"):
        EFDistribution(families.LaplaceProduct(1), jnp.array([1.0, 1.0]), oracle)

"""Named families for CAVI (Exponential, InverseGamma, Dirichlet, Categorical, Bernoulli, Poisson)
and ``to_numpyro`` for every family with a standard NumPyro equivalent.

References are scipy closed forms in the usual parameters (computed from eta by hand, not by the
package) and NumPyro's own log densities; Monte Carlo checks allow 5 standard errors.
"""

import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
import scipy.special as sp

from numpyro_nnef import EFDistribution, QuadratureOracle, generate_dataset, sample_family
from numpyro_nnef.families import (
    GIG,
    REGISTRY,
    Bernoulli,
    Beta,
    Categorical,
    Dirichlet,
    Exponential,
    Gamma,
    Gaussian,
    InverseGamma,
    MultivariateNormal,
    Poisson,
    SqrtGIG,
    VonMises,
    family_from_description,
    get_family,
)
from numpyro_nnef.family import OutOfDomainError
from numpyro_nnef.oracles.exact import ExactOracle

# ---------------------------------------------------------------------------- cases

NEW = {
    "Exponential": Exponential(),
    "InverseGamma": InverseGamma(),
    "Dirichlet": Dirichlet(3),
    "Categorical": Categorical(4),
    "Bernoulli": Bernoulli(),
    "Poisson": Poisson(),
}
NEW_NAMES = list(NEW)
DISCRETE = ["Categorical", "Bernoulli", "Poisson"]

_EXP_RATES = [0.3, 1.0, 25.0]
_IG_SHAPE_RATE = [(2.5, 1.7), (0.7, 0.2), (40.0, 90.0)]
_DIR_ALPHAS = [[1.0, 1.0, 1.0], [0.6, 2.5, 7.0], [30.0, 4.0, 0.8]]
_CAT_LOGITS = [[0.0, 0.0, 0.0, 0.0], [1.5, -2.0, 0.3, 4.0], [-30.0, 2.0, 2.0, -1.0]]
_BERN_LOGITS = [-3.0, 0.0, 0.7, 8.0]
_POIS_RATES = [0.05, 1.0, 3.5, 40.0]


def case_etas(name: str) -> jax.Array:
    """Natural parameters of the test cases, shape (k, stat_dim), written out by hand."""
    if name == "Exponential":
        return -jnp.array(_EXP_RATES)[:, None]
    if name == "InverseGamma":
        return jnp.array([[-a - 1.0, -b] for a, b in _IG_SHAPE_RATE])
    if name == "Dirichlet":
        return jnp.array(_DIR_ALPHAS) - 1.0
    if name == "Categorical":
        return jnp.array(_CAT_LOGITS)
    if name == "Bernoulli":
        return jnp.array(_BERN_LOGITS)[:, None]
    return jnp.log(jnp.array(_POIS_RATES))[:, None]


def reference(name: str) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """(A, E[T], Cov[T]) per case from scipy closed forms in the usual parameters."""
    out = []
    if name == "Exponential":
        for r in _EXP_RATES:
            out.append((-np.log(r), np.array([1 / r]), np.array([[1 / r**2]])))
    elif name == "InverseGamma":
        # y = 1/x ~ Gamma(a, rate=b): E log x = log b - digamma(a), E y = a/b,
        # Var log x = trigamma(a), Var y = a/b^2, Cov(log x, y) = -Cov(log y, y) = -1/b
        for a, b in _IG_SHAPE_RATE:
            mean = np.array([np.log(b) - sp.digamma(a), a / b])
            cov = np.array([[sp.polygamma(1, a), -1 / b], [-1 / b, a / b**2]])
            out.append((sp.gammaln(a) - a * np.log(b), mean, cov))
    elif name == "Dirichlet":
        for alpha in map(np.array, _DIR_ALPHAS):
            a0 = alpha.sum()
            mean = sp.digamma(alpha) - sp.digamma(a0)
            cov = np.diag(sp.polygamma(1, alpha)) - sp.polygamma(1, a0)
            out.append((sp.gammaln(alpha).sum() - sp.gammaln(a0), mean, cov))
    elif name == "Categorical":
        for logits in map(np.array, _CAT_LOGITS):
            p = sp.softmax(logits)
            out.append((sp.logsumexp(logits), p, np.diag(p) - np.outer(p, p)))
    elif name == "Bernoulli":
        for logit in _BERN_LOGITS:
            p = sp.expit(logit)
            out.append((np.logaddexp(0.0, logit), np.array([p]), np.array([[p * (1 - p)]])))
    else:
        for r in _POIS_RATES:
            out.append((r, np.array([r]), np.array([[r]])))
    return out


def support_points(name: str) -> jax.Array:
    """A few x in the support, shape (n,) + event_shape."""
    if name in ("Exponential", "InverseGamma"):
        return jnp.array([0.01, 0.4, 1.0, 3.7, 80.0])
    if name == "Dirichlet":
        return jnp.array([[1 / 3, 1 / 3, 1 / 3], [0.01, 0.2, 0.79], [0.9, 0.0999, 1e-4]])
    if name == "Categorical":
        return jnp.arange(4)
    if name == "Bernoulli":
        return jnp.array([0, 1])
    return jnp.array([0, 1, 2, 7, 60])


@functools.cache
def oracle(name: str) -> ExactOracle:
    return ExactOracle(NEW[name])


@functools.cache
def exact_moments(name: str):
    """jit(eta -> (A, E[T], Cov[T])) of the family's ExactOracle, compiled once per family."""
    o = oracle(name)
    return jax.jit(lambda eta: (o.log_partition(eta), o.mean(eta), o.covariance(eta)))


# ---------------------------------------------------------------------------- registry, layout


def test_registered_and_described():
    for name, family in NEW.items():
        assert REGISTRY[name] is type(family) and family.name == name
        assert family.has_closed_form and family.has_exact_sampler
        description = json.loads(json.dumps(family.describe()))   # JSON-able
        rebuilt = family_from_description(description)
        assert type(rebuilt) is type(family) and rebuilt == family
        assert rebuilt.stat_labels == family.stat_labels
        assert hash(rebuilt) == hash(family)
    assert get_family("Dirichlet", dim=5).event_shape == (5,)
    assert get_family("Categorical", num_categories=6).stat_dim == 6
    assert Dirichlet(4) != Dirichlet(3) and Categorical(4) != Categorical(5)
    assert family_from_description(Dirichlet(5).describe()) == Dirichlet(5)
    assert family_from_description(Categorical(2).describe()) == Categorical(2)


@pytest.mark.parametrize("cls", [Dirichlet, Categorical], ids=["Dirichlet", "Categorical"])
@pytest.mark.parametrize("value", [1, 0, 2.5])
def test_bad_sizes(cls, value):
    with pytest.raises(ValueError, match=cls.__name__):
        cls(value)


def test_layouts():
    assert Exponential().stat_labels == ("x",)
    assert InverseGamma().stat_labels == ("log_x", "inv_x")
    assert Dirichlet(3).stat_shapes == {"log_x": (3,)} and Dirichlet(3).event_shape == (3,)
    cat = Categorical(4)
    assert cat.stat_shapes == {"one_hot": (4,)} and cat.event_shape == ()
    t = cat.sufficient_statistics(jnp.array([[2, 0], [3, 1]]))
    assert t.shape == (2, 2, 4) and jnp.issubdtype(t.dtype, jnp.floating)
    np.testing.assert_array_equal(t[0, 0], [0, 0, 1, 0])
    for family in (Bernoulli(), Poisson()):   # integer x -> float statistics
        t = family.sufficient_statistics(jnp.array([0, 1, 1]))
        assert t.shape == (3, 1) and jnp.issubdtype(t.dtype, jnp.floating)
    np.testing.assert_allclose(Poisson().log_base_measure(jnp.array([0, 3])), [0, -np.log(6)])
    assert all(NEW[n].support.is_discrete for n in DISCRETE)


# ---------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("name", NEW_NAMES)
def test_log_partition_mean_covariance(name):
    """A, grad A and Hessian A against scipy closed forms in the usual parameters."""
    etas = case_etas(name)
    assert bool(jnp.all(NEW[name].in_domain(etas)))
    log_z, mean, cov = (np.asarray(v) for v in exact_moments(name)(etas))
    for i, (ref_a, ref_mean, ref_cov) in enumerate(reference(name)):
        msg = f"{name} at eta = {np.asarray(etas[i]).tolist()}"
        np.testing.assert_allclose(log_z[i], ref_a, rtol=1e-12, atol=1e-12, err_msg=msg)
        np.testing.assert_allclose(mean[i], ref_mean, rtol=1e-10, atol=1e-14, err_msg=msg)
        np.testing.assert_allclose(cov[i], ref_cov, rtol=1e-8, atol=1e-14, err_msg=msg)


@pytest.mark.parametrize("name", NEW_NAMES)
def test_mean_matches_numpyro_moments(name):
    """E[T] = grad A against the moments of the equivalent NumPyro distribution."""
    family, etas = NEW[name], case_etas(name)
    d = family.to_numpyro(etas)
    _, mean, cov = exact_moments(name)(etas)
    if name == "InverseGamma":   # E[1/x] = a / b, E[log x] = log b - digamma(a)
        expected = jnp.stack([jnp.log(d.rate) - jax.scipy.special.digamma(d.concentration),
                              d.concentration / d.rate], -1)
    elif name == "Dirichlet":
        alpha = d.concentration
        digamma = jax.scipy.special.digamma
        expected = digamma(alpha) - digamma(alpha.sum(-1, keepdims=True))
    elif name == "Categorical":
        expected = d.probs
    else:
        expected = d.mean[..., None]
    np.testing.assert_allclose(mean, expected, rtol=1e-10, atol=1e-14)
    if name in ("Exponential", "Bernoulli", "Poisson"):
        np.testing.assert_allclose(cov[..., 0, 0], d.variance, rtol=1e-10)


@pytest.mark.parametrize("name", NEW_NAMES)
def test_normalisation_against_numpyro(name):
    """eta . T(x) + log h(x) - A(eta) is NumPyro's log_prob at every x and every eta."""
    family, etas = NEW[name], case_etas(name)
    x = support_points(name)
    x = x.reshape((x.shape[0], 1) + family.event_shape)            # against the batch of etas
    ours = family.unnormalized_log_prob(etas, x) - exact_moments(name)(etas)[0]
    theirs = jax.jit(lambda eta, x: family.to_numpyro(eta).log_prob(x))(etas, x)
    assert ours.shape == theirs.shape == (x.shape[0], etas.shape[0])
    np.testing.assert_allclose(ours, theirs, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("name", DISCRETE)
def test_discrete_probabilities_sum_to_one(name):
    """sum_x exp(eta . T(x) + log h(x) - A(eta)) = 1 over the support (Poisson: x < 400)."""
    family, etas = NEW[name], case_etas(name)
    x = {"Categorical": jnp.arange(4), "Bernoulli": jnp.arange(2)}.get(name, jnp.arange(400))
    log_p = family.unnormalized_log_prob(etas, x[:, None]) - exact_moments(name)(etas)[0]
    np.testing.assert_allclose(jnp.exp(log_p).sum(0), 1.0, rtol=1e-13)


@pytest.mark.parametrize("name", NEW_NAMES)
def test_natural_from_mean_round_trip(name):
    etas = case_etas(name)
    mu = exact_moments(name)(etas)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # Newton must converge (or not be used)
        back = oracle(name).natural_from_mean(mu)
    log_z, mean, _ = exact_moments(name)(back)
    np.testing.assert_allclose(mean, mu, rtol=1e-9, atol=1e-12)
    if name == "Categorical":
        # over-parametrised: the closed form returns log(mu), the representative with A = 0
        np.testing.assert_array_equal(back, jnp.log(mu))
        np.testing.assert_allclose(log_z, 0.0, atol=1e-14)
        np.testing.assert_allclose(back - back[:, :1], etas - etas[:, :1], rtol=1e-9,
                                   atol=1e-9)
    else:
        np.testing.assert_allclose(back, etas, rtol=1e-7, atol=1e-9)


def test_categorical_natural_from_mean_avoids_singular_newton():
    """The Hessian of logsumexp is singular along (1, ..., 1); the closed form is used."""
    cat = Categorical(4)
    cov = exact_moments("Categorical")(case_etas("Categorical"))[2]
    np.testing.assert_allclose(cov @ jnp.ones(4), 0.0, atol=1e-14)
    mu = jnp.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_array_equal(oracle("Categorical").natural_from_mean(mu), jnp.log(mu))
    np.testing.assert_allclose(cat.probs_from_natural(cat.natural_from_probs(mu)), mu,
                               rtol=1e-14)


def test_inverse_gamma_newton_start():
    """Minka's approximation (plus one Newton step on the shape) lands within 0.1% of eta."""
    family, etas = InverseGamma(), case_etas("InverseGamma")
    guess = jax.vmap(family.natural_init_from_mean)(exact_moments("InverseGamma")(etas)[1])
    np.testing.assert_allclose(guess, etas, rtol=1e-3)


def test_parameter_conversions():
    np.testing.assert_allclose(Exponential().rate_from_natural(
        Exponential().natural_from_rate(jnp.array([0.5, 2.0]))), [0.5, 2.0], rtol=1e-15)
    ig = InverseGamma()
    np.testing.assert_allclose(ig.shape_rate_from_natural(ig.natural_from_shape_rate(2.0, 3.0)),
                               [2.0, 3.0], rtol=1e-15)
    dr = Dirichlet(3)
    alpha = jnp.array([0.5, 1.0, 4.0])
    np.testing.assert_allclose(dr.concentration_from_natural(dr.natural_from_concentration(alpha)),
                               alpha, rtol=1e-15)
    np.testing.assert_allclose(Bernoulli().probs_from_natural(
        Bernoulli().natural_from_probs(jnp.array([0.1, 0.7]))), [0.1, 0.7], rtol=1e-14)
    np.testing.assert_allclose(Poisson().rate_from_natural(
        Poisson().natural_from_rate(jnp.array([0.1, 7.0]))), [0.1, 7.0], rtol=1e-14)


# ---------------------------------------------------------------------------- domains

_OUTSIDE = {
    "Exponential": [[0.5], [0.0]],
    "InverseGamma": [[-0.5, -1.0], [-2.0, 0.3], [-1.0, -1.0]],
    "Dirichlet": [[0.0, -1.2, 0.0], [-1.0, 0.0, 0.0]],
    "Categorical": [[0.0, np.nan, 0.0, 0.0], [np.inf, 0.0, 0.0, 0.0]],
    "Bernoulli": [[np.inf], [np.nan]],
    "Poisson": [[np.nan], [-np.inf]],
}


@pytest.mark.parametrize("name", NEW_NAMES)
def test_natural_domain(name):
    family = NEW[name]
    inside = jnp.asarray(family.natural_constraint.feasible, jnp.float64)
    outside = jnp.asarray(_OUTSIDE[name], jnp.float64)
    etas = jnp.concatenate([inside[None], outside, inside[None]])
    expected = [True] + [False] * len(outside) + [True]
    np.testing.assert_array_equal(family.in_domain(etas), expected)
    family.validate_natural(inside)
    for bad in outside:
        with pytest.raises(OutOfDomainError, match=name):
            family.validate_natural(bad)
        with pytest.raises(OutOfDomainError, match=name):
            EFDistribution(family, bad, validate_args=True)


# ---------------------------------------------------------------------------- exact samplers


NUM_DRAWS = 20_000


@pytest.mark.parametrize("name", NEW_NAMES)
def test_sample_exact(name, key):
    """Shapes, dtype, support, reproducibility; sample means of T within 5 Monte Carlo standard
    errors (sqrt(diag Cov[T] / n), from the exact covariance) of the exact E[T]."""
    family, etas = NEW[name], case_etas(name)
    x = family.sample_exact(key, etas, (NUM_DRAWS,))
    assert x.shape == (NUM_DRAWS, len(etas)) + family.event_shape
    assert jnp.issubdtype(x.dtype, jnp.integer) == (name in DISCRETE)
    assert bool(jnp.all(family.support(x)))
    np.testing.assert_array_equal(x, family.sample_exact(key, etas, (NUM_DRAWS,)))
    t = np.asarray(family.sufficient_statistics(x))
    assert np.all(np.isfinite(t))
    _, mean, cov = (np.asarray(v) for v in exact_moments(name)(etas))
    se = np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1) / NUM_DRAWS)
    z = np.abs(t.mean(0) - mean) / np.where(se > 0, se, 1.0)
    assert np.all(z < 5), f"{name}: sample means {t.mean(0)}, exact {mean}, |z| = {z}"


@pytest.mark.parametrize("name", DISCRETE)
def test_ef_distribution_discrete(name, key):
    """EFDistribution of a discrete family: exact sampler, exact log_prob, discrete support."""
    family, etas = NEW[name], case_etas(name)
    d = EFDistribution(family, etas, validate_args=True)
    assert d.is_discrete and d.batch_shape == etas.shape[:-1]
    x = d.sample(key, (NUM_DRAWS,))      # the compiled sampler of test_sample_exact
    assert x.shape == (NUM_DRAWS,) + etas.shape[:-1]
    x = x[:5]

    @jax.jit
    def both(etas, x):
        return (EFDistribution(family, etas).log_prob(x),
                family.to_numpyro(etas).log_prob(x))

    ours, theirs = both(etas, x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("name", DISCRETE)
def test_discrete_families_refuse_quadrature_and_nuts(name, key):
    family = NEW[name]
    eta = jnp.asarray(family.natural_constraint.feasible, jnp.float64)
    with pytest.raises(ValueError, match=f"{name}.*discrete support.*ExactOracle"):
        QuadratureOracle(family)
    with pytest.raises(ValueError, match=f"{name}.*discrete support"):
        generate_dataset(family, eta[None], key=key, progress=False)
    with pytest.raises(ValueError, match=f"{name}.*discrete support"):
        sample_family(family, eta, key=key, sample_shape=(2,))


# ---------------------------------------------------------------------------- to_numpyro

_MVN = MultivariateNormal(3)


def _mvn_etas(locs: np.ndarray, covs: np.ndarray) -> jax.Array:
    """eta = (Lambda m, -Lambda_ii / 2 on the diagonal, -Lambda_ij for i < j) by hand."""
    rows, cols = np.triu_indices(3)
    out = []
    for m, c in zip(locs, covs, strict=True):
        lam = np.linalg.inv(c)
        out.append(np.concatenate([lam @ m, np.where(rows == cols, 0.5, 1.0) * -lam[rows, cols]]))
    return jnp.asarray(np.array(out))


_MVN_COV = np.array([[1.0, 0.3, -0.2], [0.3, 0.5, 0.1], [-0.2, 0.1, 2.0]])
EXISTING = {
    "Gaussian": (Gaussian(), dist.Normal,
                 Gaussian().natural_from_loc_scale(jnp.array([0.7, -3.0]), jnp.array([1.3, 0.1])),
                 jnp.array([-1.0, 0.0, 2.5])),
    "Gamma": (Gamma(), dist.Gamma,
              Gamma().natural_from_shape_rate(jnp.array([2.5, 0.4]), jnp.array([1.7, 3.0])),
              jnp.array([0.01, 1.0, 6.0])),
    "Beta": (Beta(), dist.Beta,
             Beta().natural_from_concentrations(jnp.array([2.3, 0.5]), jnp.array([0.7, 0.5])),
             jnp.array([0.001, 0.4, 0.97])),
    "VonMises": (VonMises(), dist.VonMises,
                 VonMises().natural_from_loc_concentration(jnp.array([0.4, -2.5, 0.0]),
                                                           jnp.array([2.1, 15.0, 0.0])),
                 jnp.array([-3.0, 0.0, 1.2])),
    "MultivariateNormal": (_MVN, dist.MultivariateNormal,
                           _mvn_etas(np.array([[0.3, -1.0, 2.0], [0.0, 0.0, 0.5]]),
                                     np.stack([_MVN_COV, 0.3 * _MVN_COV])),
                           jnp.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])),
}


@pytest.mark.parametrize("name", list(EXISTING))
def test_to_numpyro_existing_families(name):
    """log_prob identity eta . T(x) + log h(x) - A(eta) = NumPyro log_prob, and shapes."""
    family, cls, etas, x = EXISTING[name]
    x = x.reshape((x.shape[0], 1) + family.event_shape)
    seen = {}

    @jax.jit   # one compiled program: eager linear algebra would compile op by op
    def log_probs(etas, x):
        d = family.to_numpyro(etas)
        seen.update(cls=type(d), batch_shape=d.batch_shape, event_shape=d.event_shape)
        log_z = ExactOracle(family).log_partition(etas)
        return d.log_prob(x), family.unnormalized_log_prob(etas, x) - log_z

    theirs, ours = log_probs(etas, x)
    assert issubclass(seen["cls"], cls)
    assert seen["batch_shape"] == etas.shape[:-1] and seen["event_shape"] == family.event_shape
    np.testing.assert_allclose(theirs, ours, rtol=1e-10, atol=1e-10)


def test_to_numpyro_von_mises_uniform(key):
    """eta = 0 (kappa = 0): NumPyro's sampler divides by kappa; to_numpyro floors it."""
    @jax.jit
    def sample_and_log_prob(key, eta):
        d = VonMises().to_numpyro(eta)
        return d.sample(key, (4,)), d.log_prob(jnp.array([0.3]))

    x, log_p = sample_and_log_prob(key, jnp.zeros((1, 2)))
    assert bool(jnp.all(jnp.isfinite(x)))
    np.testing.assert_allclose(log_p, -np.log(2 * np.pi), rtol=1e-12)


@pytest.mark.parametrize("name", NEW_NAMES)
def test_to_numpyro_batch_shapes(name):
    family = NEW[name]
    etas = jnp.broadcast_to(case_etas(name)[0], (2, 3, family.stat_dim))
    d = family.to_numpyro(etas)
    assert d.batch_shape == (2, 3) and d.event_shape == family.event_shape
    assert d.support.is_discrete == (name in DISCRETE)
    with pytest.raises(ValueError, match=name):
        family.to_numpyro(jnp.zeros((2, family.stat_dim + 1)))


# ---------------------------------------------------------------------------- GIG

_GIG = GIG()
# (p, a, b): p < 0, p = 0, p ~ 0, p > 0, |p| = 50; sqrt(a b) from 0.001 to 1000
_GIG_CASES = [(1.0, 2.0, 2.0), (-0.5, 1.0, 3.0), (0.0, 0.7, 0.4), (-3.2, 0.01, 5.0),
              (2.5, 4.0, 0.02), (1e-3, 1e3, 1e3), (-7.0, 3e-3, 6e-3), (20.0, 0.5, 1.5),
              (50.0, 1e-3, 1e-3), (-50.0, 1.0, 1e-6)]
_GIG_ETAS = jnp.array([[-a / 2, -b / 2, p - 1.0] for p, a, b in _GIG_CASES])   # by hand


@functools.cache
def gig_moments():
    o = ExactOracle(_GIG)
    return jax.jit(lambda eta: (o.log_partition(eta), o.mean(eta), o.covariance(eta)))


def _gig_log_density(p: float, a: float, b: float):
    """Unnormalised log density of y = log x, exp(p y - (a e^y + b e^-y) / 2), less its maximum,
    and the mode (for scipy quadrature)."""
    w = np.sqrt(a * b)
    mode = np.arcsinh(p / w) + 0.5 * np.log(b / a)

    def log_f(y):
        return p * y - 0.5 * (a * np.exp(y) + b * np.exp(-y))

    peak = log_f(mode)
    return (lambda y: log_f(y) - peak), mode, peak


def _gig_quadrature(p: float, a: float, b: float):
    """(A, E[T], Cov[T]) by scipy.integrate.quad on the log scale, T = (x, 1/x, log x)."""
    from scipy.integrate import IntegrationWarning, quad

    log_f, mode, peak = _gig_log_density(p, a, b)
    width = 1.0 / np.sqrt(np.hypot(np.sqrt(a * b), p))     # 1 / sqrt(-g'') at the mode
    stats = [np.exp, lambda y: np.exp(-y), lambda y: y]

    def reach(direction):
        """The first y from the mode on where even x^2 or x^-2 times the density is < e^-100."""
        y = mode
        while log_f(y) + 2 * abs(y - mode) > -100:
            y += direction * width
        return y

    lo, hi = reach(-1), reach(1)

    def integral(fn):
        pieces = [(lo, mode - width), (mode - width, mode + width), (mode + width, hi)]
        with warnings.catch_warnings():
            # sqrt(a b) = 1000: quad reports round-off on the centred products (Cov[x, 1/x] is
            # 1e-6 of the terms); it still agrees with the exact oracle to 1e-8 below
            warnings.simplefilter("ignore", IntegrationWarning)
            return sum(quad(lambda y: fn(y) * np.exp(log_f(y)), a, b, epsabs=0, epsrel=1e-10,
                            limit=500)[0] for a, b in pieces)

    log_z, mean, cov = _moments_by_quadrature(integral, stats)
    return log_z + peak, mean, cov


def _moments_by_quadrature(integral, stats):
    """(log Z, E[T], Cov[T]) from ``integral(fn)`` = int fn(y) f(y) dy of an unnormalised f."""
    z = integral(lambda y: 1.0)
    mean = np.array([integral(s) / z for s in stats])
    cov = np.array([[integral(lambda y, s=s, t=t, ms=ms, mt=mt: (s(y) - ms) * (t(y) - mt)) / z
                     for t, mt in zip(stats, mean, strict=True)]
                    for s, ms in zip(stats, mean, strict=True)])
    return np.log(z), mean, cov


def test_gig_registered_and_layout():
    assert REGISTRY["GIG"] is GIG and get_family("GIG") == _GIG
    assert _GIG.stat_labels == ("x", "inv_x", "log_x") and _GIG.event_shape == ()
    assert _GIG.has_closed_form and _GIG.has_exact_sampler and not hasattr(_GIG, "to_numpyro")
    assert family_from_description(json.loads(json.dumps(_GIG.describe()))) == _GIG
    assert "a > 0 and b > 0" in _GIG.natural_constraint.description
    p, a, b = _GIG.p_a_b_from_natural(_GIG.natural_from_p_a_b(-0.3, 2.0, 5.0))
    np.testing.assert_allclose([p, a, b], [-0.3, 2.0, 5.0], rtol=1e-15)


def test_log_bessel_k_against_scipy():
    """log K_v(z) of real order to 1e-12 relative in K over |v| <= 50, 1e-3 <= z <= 1e3; its
    v-derivative against central differences of scipy, its z-derivative against the
    recurrence K_v' = -(K_{v-1} + K_{v+1}) / 2."""
    from numpyro_nnef.families._special import log_bessel_k

    v, z = np.meshgrid([-50.0, -7.3, -1.0, -0.5, 0.0, 1e-3, 0.5, 2.2, 15.0, 50.0],
                       np.geomspace(1e-3, 1e3, 19), indexing="ij")
    v, z = v.ravel(), z.ravel()
    ref = np.log(sp.kve(v, z)) - z

    @jax.jit
    def value_and_grads(v, z):
        return log_bessel_k(v, z), jax.vmap(jax.grad(log_bessel_k, (0, 1)))(v, z)

    ours, (dv, dz) = value_and_grads(v, z)
    np.testing.assert_allclose(np.expm1(ours - ref), 0.0, atol=1e-12)
    h = 1e-5
    fd = (np.log(sp.kve(v + h, z)) - np.log(sp.kve(v - h, z))) / (2 * h)
    np.testing.assert_allclose(dv, fd, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(dz, -(sp.kve(v - 1, z) + sp.kve(v + 1, z)) / (2 * sp.kve(v, z)),
                               rtol=1e-11)
    v32 = log_bessel_k(jnp.float32(2.5), jnp.float32(0.3))
    assert v32.dtype == jnp.float32
    np.testing.assert_allclose(v32, np.log(sp.kv(2.5, 0.3)), rtol=1e-6)


def test_gig_log_partition_mean_covariance():
    """A, E[T], Cov[T] against scipy quadrature of the density (A to 1e-8, correlations to
    1e-8); E x and E 1/x also against the Bessel ratios sqrt(b/a) K_{p+1}/K_p and
    sqrt(a/b) K_{p-1}/K_p of scipy."""
    assert bool(jnp.all(_GIG.in_domain(_GIG_ETAS)))
    log_z, mean, cov = (np.asarray(v) for v in gig_moments()(_GIG_ETAS))
    for i, (p, a, b) in enumerate(_GIG_CASES):
        msg = f"GIG p={p}, a={a}, b={b}"
        ref_a, ref_mean, ref_cov = _gig_quadrature(p, a, b)
        np.testing.assert_allclose(log_z[i], ref_a, rtol=1e-8, atol=1e-8, err_msg=msg)
        np.testing.assert_allclose(mean[i], ref_mean, rtol=1e-8, atol=1e-10, err_msg=msg)
        sd = np.sqrt(np.diag(ref_cov))
        np.testing.assert_allclose(cov[i] / np.outer(sd, sd), ref_cov / np.outer(sd, sd),
                                   rtol=1e-8, atol=1e-10, err_msg=msg)
        w = np.sqrt(a * b)
        ratio_up, ratio_down = (sp.kve(p + 1, w) / sp.kve(p, w), sp.kve(p - 1, w) / sp.kve(p, w))
        np.testing.assert_allclose(mean[i, :2], [np.sqrt(b / a) * ratio_up,
                                                 np.sqrt(a / b) * ratio_down], rtol=1e-12)
        np.testing.assert_allclose(log_z[i], np.log(2 * sp.kve(p, w)) - w + p / 2 * np.log(b / a),
                                   rtol=1e-12, atol=1e-12)
    # the closed-form mean and covariance are the gradient and Hessian of A (autodiff loses
    # digits to cancellation, e.g. in E 1/x = sqrt(a/b) K_{p+1}/K_p - 2p/b where a b is small)
    moderate = _GIG_ETAS[:8]
    grad, hessian = jax.jit(jax.vmap(lambda eta: (
        jax.grad(_GIG.closed_form_log_partition)(eta),
        jax.jacfwd(_GIG.closed_form_mean)(eta))))(moderate)
    np.testing.assert_allclose(grad, mean[:8], rtol=1e-7)
    np.testing.assert_allclose(hessian, cov[:8], rtol=1e-6, atol=1e-9)
    assert np.all(np.linalg.eigvalsh(cov) > 0)


def test_gig_special_cases():
    """p = -1/2 (inverse Gaussian, mean sqrt(b/a), K_{1/2}(w) = sqrt(pi / 2w) e^-w) and the
    Gamma limit b -> 0 (p > 0)."""
    a, b = 2.0, 3.0
    log_z, mean, _ = gig_moments()(_GIG.natural_from_p_a_b(-0.5, a, b)[None])
    w = np.sqrt(a * b)
    np.testing.assert_allclose(log_z[0], np.log(np.sqrt(2 * np.pi / w) * np.exp(-w))
                               - 0.25 * np.log(b / a), rtol=1e-13)
    np.testing.assert_allclose(mean[0, :2], [np.sqrt(b / a), np.sqrt(a / b) + 1 / b],
                               rtol=1e-13)
    shape, rate = 2.5, 1.5
    _, mean, _ = gig_moments()(_GIG.natural_from_p_a_b(shape, 2 * rate, 1e-12)[None])
    np.testing.assert_allclose(mean[0, [0, 2]], [shape / rate,
                                                 sp.digamma(shape) - np.log(rate)], rtol=1e-9)


def test_gig_natural_from_mean_round_trip():
    etas = _GIG_ETAS[:5]
    mu = gig_moments()(etas)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = ExactOracle(_GIG).natural_from_mean(mu)
    np.testing.assert_allclose(back, etas, rtol=1e-7, atol=1e-9)


def test_gig_natural_domain():
    outside = jnp.array([[0.5, -1.0, 0.0], [-1.0, 0.0, 2.0], [0.0, 0.0, -3.0],
                         [-1.0, -1.0, np.nan], [-np.inf, -1.0, 0.0]])
    inside = jnp.array([[-1.0, -1.0, 0.0], [-1e-6, -300.0, -40.0]])
    np.testing.assert_array_equal(_GIG.in_domain(jnp.concatenate([inside, outside])),
                                  [True] * 2 + [False] * 5)
    for bad in outside:
        with pytest.raises(OutOfDomainError, match="GIG"):
            _GIG.validate_natural(bad)
        with pytest.raises(OutOfDomainError, match="a > 0 and b > 0"):
            EFDistribution(_GIG, bad, validate_args=True)


def test_gig_sample_exact(key):
    """Shapes, support, reproducibility; sample means of x, 1/x and log x within 4 Monte Carlo
    standard errors of the exact E[T], for p < 0, p = 0, p > 0 and sqrt(a b) small and large."""
    x = _GIG.sample_exact(key, _GIG_ETAS, (NUM_DRAWS,))
    assert x.shape == (NUM_DRAWS, len(_GIG_CASES)) and x.dtype == jnp.float64
    assert bool(jnp.all(x > 0))
    np.testing.assert_array_equal(x[:3], _GIG.sample_exact(key, _GIG_ETAS, (NUM_DRAWS,))[:3])
    t = np.asarray(_GIG.sufficient_statistics(x))
    assert np.all(np.isfinite(t))
    _, mean, cov = (np.asarray(v) for v in gig_moments()(_GIG_ETAS))
    se = np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1) / NUM_DRAWS)
    z = np.abs(t.mean(0) - mean) / se
    assert np.all(z < 4), f"sample means {t.mean(0)}, exact {mean}, |z| = {z}"
    assert _GIG.sample_exact(key, _GIG_ETAS[0]).shape == ()
    outside = jnp.array([[1.0, -1.0, 0.0], [-1.0, -1.0, 0.0]])       # a < 0: NaN, no endless loop
    draws = _GIG.sample_exact(key, outside, (5,))
    assert bool(jnp.all(jnp.isnan(draws[:, 0]))) and bool(jnp.all(draws[:, 1] > 0))


# ---------------------------------------------------------------------------- SqrtGIG

_SQRT_GIG = SqrtGIG()
# eta of [x^2, x^-2, log x]: a HalfNormal scale's conditionals with few and many groups
_SQRT_GIG_ETAS = jnp.array([[-0.5, -2.0, -5.0], [-2.0, -0.3, 1.0], [-0.05, -40.0, -60.0],
                            [-8.0, -8.0, 0.0]])


def _sqrt_gig_quadrature(eta: np.ndarray):
    """(A, E[T], Cov[T]) of exp(eta . (x^2, x^-2, log x)) on x > 0 by scipy quadrature in x."""
    from scipy.integrate import quad
    from scipy.optimize import minimize_scalar

    def log_f(x):
        return eta[0] * x**2 + eta[1] / x**2 + eta[2] * np.log(x)

    mode = minimize_scalar(lambda u: -log_f(np.exp(u)), bounds=(-20, 20), method="bounded").x
    peak = log_f(np.exp(mode))
    stats = [lambda x: x**2, lambda x: x**-2, np.log]

    def integral(fn):  # on u = log x, so that both tails are short
        return quad(lambda u: fn(np.exp(u)) * np.exp(log_f(np.exp(u)) - peak + u),
                    mode - 15, mode + 15, points=[mode], epsabs=0, epsrel=1e-11, limit=500)[0]

    log_z, mean, cov = _moments_by_quadrature(integral, stats)
    return log_z + peak, mean, cov


def test_sqrt_gig_against_quadrature_in_x():
    """A, E[T] and Cov[T] of SqrtGIG (through GIG of x^2) against scipy quadrature of its own
    density in x; Newton's inverse returns eta; the family is registered and serialisable."""
    o = ExactOracle(_SQRT_GIG)
    log_z, mean, cov = (np.asarray(v) for v in jax.jit(lambda e: (
        o.log_partition(e), o.mean(e), o.covariance(e)))(_SQRT_GIG_ETAS))
    for i, eta in enumerate(np.asarray(_SQRT_GIG_ETAS)):
        ref_a, ref_mean, ref_cov = _sqrt_gig_quadrature(eta)
        np.testing.assert_allclose(log_z[i], ref_a, rtol=1e-9, atol=1e-9, err_msg=str(eta))
        np.testing.assert_allclose(mean[i], ref_mean, rtol=1e-8, atol=1e-10, err_msg=str(eta))
        np.testing.assert_allclose(cov[i], ref_cov, rtol=1e-6, atol=1e-10, err_msg=str(eta))
    np.testing.assert_allclose(o.natural_from_mean(mean), _SQRT_GIG_ETAS, rtol=1e-7, atol=1e-9)
    assert REGISTRY["SqrtGIG"] is SqrtGIG and _SQRT_GIG.stat_labels == ("x2", "inv_x2", "log_x")
    assert family_from_description(json.loads(json.dumps(_SQRT_GIG.describe()))) == _SQRT_GIG
    assert not bool(_SQRT_GIG.in_domain(jnp.array([-1.0, 0.0, 2.0])))


def test_sqrt_gig_sample_exact(key):
    """Sample means of x^2, x^-2 and log x within 4 Monte Carlo standard errors of E[T]."""
    x = _SQRT_GIG.sample_exact(key, _SQRT_GIG_ETAS, (NUM_DRAWS,))
    assert x.shape == (NUM_DRAWS, len(_SQRT_GIG_ETAS)) and bool(jnp.all(x > 0))
    t = np.asarray(_SQRT_GIG.sufficient_statistics(x))
    o = ExactOracle(_SQRT_GIG)
    mean, cov = np.asarray(o.mean(_SQRT_GIG_ETAS)), np.asarray(o.covariance(_SQRT_GIG_ETAS))
    z = np.abs(t.mean(0) - mean) / np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1) / NUM_DRAWS)
    assert np.all(z < 4), f"sample means {t.mean(0)}, exact {mean}, |z| = {z}"


def test_gig_ef_distribution(key):
    """EFDistribution(GIG): log_prob is the density written with scipy's K_p, draws of q."""
    etas = _GIG_ETAS[:4]
    d = EFDistribution(_GIG, etas, validate_args=True)
    x = d.sample(key, (3,))
    assert x.shape == (3, 4)
    log_p = np.asarray(jax.jit(lambda etas, x: EFDistribution(_GIG, etas).log_prob(x))(etas, x))
    for i, (p, a, b) in enumerate(_GIG_CASES[:4]):
        xi = np.asarray(x[:, i])
        w = np.sqrt(a * b)
        ref = ((p - 1) * np.log(xi) - 0.5 * (a * xi + b / xi) - np.log(2 * sp.kve(p, w)) + w
               - p / 2 * np.log(b / a))
        np.testing.assert_allclose(log_p[:, i], ref, rtol=1e-12)

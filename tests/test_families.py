"""Built-in families: layout, natural domains, log-partitions and moments against independent
references (scipy closed forms and quadrature), smoothness at removable singularities, and the
exact samplers."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate as si
import scipy.special as sp
import scipy.stats as st
from numpyro.distributions.transforms import biject_to

from numpyro_nnef.families import (
    REGISTRY,
    Beta,
    Gamma,
    Gaussian,
    GaussLaplace,
    LaplaceProduct,
    MultivariateNormal,
    RectifiedGaussian,
    VonMises,
    get_family,
)
from numpyro_nnef.family import ExponentialFamily, OutOfDomainError
from numpyro_nnef.oracles.exact import ExactOracle

# ---------------------------------------------------------------------------- references


def quad_moments(log_density, points=(), lo=-np.inf, hi=np.inf, stats=None):
    """(log Z, E[T], Cov[T]) of exp(log_density(x)) on (lo, hi) by scipy quad, T = stats(x)."""
    edges = [lo, *points, hi]

    def integrate(fn):
        return sum(
            si.quad(fn, a, b, epsabs=0, epsrel=1e-12, limit=200)[0]
            for a, b in zip(edges[:-1], edges[1:], strict=True)
        )

    # shift by the maximum of the log density on a grid for stability
    grid = np.linspace(max(lo, -50.0), min(hi, 50.0), 20001)
    shift = np.max(log_density(grid))
    z = integrate(lambda x: np.exp(log_density(x) - shift))
    k = len(stats(0.0))
    mean = np.array([
        integrate(lambda x, i=i: stats(x)[i] * np.exp(log_density(x) - shift)) / z
        for i in range(k)
    ])
    second = np.array([
        [integrate(lambda x, i=i, j=j: stats(x)[i] * stats(x)[j]
                   * np.exp(log_density(x) - shift)) / z for j in range(k)]
        for i in range(k)
    ])
    return math.log(z) + shift, mean, second - np.outer(mean, mean)


def gaussian_reference(loc, scale):
    v = scale**2
    a = 0.5 * math.log(2 * math.pi * v) + loc**2 / (2 * v)
    mean = np.array([loc, loc**2 + v])
    cov = np.array([[v, 2 * loc * v], [2 * loc * v, 2 * v**2 + 4 * loc**2 * v]])
    return a, mean, cov


def mvn_reference(loc, covariance):
    """Isserlis' theorem for the moments of (x, x_i x_j, i <= j)."""
    d = len(loc)
    s, m = covariance, loc
    lam = np.linalg.inv(s)
    a = 0.5 * m @ lam @ m + 0.5 * np.linalg.slogdet(s)[1] + 0.5 * d * math.log(2 * math.pi)
    pairs = list(zip(*np.triu_indices(d), strict=True))
    second = s + np.outer(m, m)
    mean = np.concatenate([m, [second[i, j] for i, j in pairs]])
    k = d + len(pairs)
    cov = np.zeros((k, k))
    cov[:d, :d] = s
    for p, (i, j) in enumerate(pairs):
        for q in range(d):
            cov[q, d + p] = cov[d + p, q] = m[i] * s[j, q] + m[j] * s[i, q]
        for r, (u, w) in enumerate(pairs):
            cov[d + p, d + r] = (s[i, u] * s[j, w] + s[i, w] * s[j, u] + m[i] * m[u] * s[j, w]
                                 + m[i] * m[w] * s[j, u] + m[j] * m[u] * s[i, w]
                                 + m[j] * m[w] * s[i, u])
    return a, mean, cov


def gamma_reference(shape, rate):
    a = sp.gammaln(shape) - shape * math.log(rate)
    mean = np.array([sp.digamma(shape) - math.log(rate), shape / rate])
    cov = np.array([[sp.polygamma(1, shape), 1 / rate], [1 / rate, shape / rate**2]])
    return a, mean, cov


def beta_reference(a, b):
    logz = sp.betaln(a, b)
    mean = np.array([sp.digamma(a) - sp.digamma(a + b), sp.digamma(b) - sp.digamma(a + b)])
    t = sp.polygamma(1, a + b)
    cov = np.array([[sp.polygamma(1, a) - t, -t], [-t, sp.polygamma(1, b) - t]])
    return logz, mean, cov


def von_mises_reference(loc, kappa):
    """Bessel moments: radial variance 1 - A1/kappa - A1^2, tangential A1/kappa (A1 = I1/I0)."""
    a1 = sp.iv(1, kappa) / sp.iv(0, kappa)
    logz = math.log(2 * math.pi * sp.iv(0, kappa))
    direction = np.array([math.cos(loc), math.sin(loc)])
    perp = np.array([-math.sin(loc), math.cos(loc)])
    radial = 1 - a1 / kappa - a1**2 if kappa > 0 else 0.5
    tangential = a1 / kappa if kappa > 0 else 0.5
    cov = radial * np.outer(direction, direction) + tangential * np.outer(perp, perp)
    return logz, a1 * direction, cov


def rectified_reference(eta1, eta2):
    """scipy truncnorm moments (quad in the far tail, where truncnorm's higher moments lose
    digits); log Z by quad of exp(eta1 x + eta2 x^2) on [0, inf)."""
    s = math.sqrt(-0.5 / eta2)
    m = eta1 * s**2
    by_quad = quad_moments(lambda x: eta1 * x + eta2 * x**2, lo=0.0,
                           stats=lambda x: np.array([x, x**2]))
    if -m / s > 5:
        return by_quad
    dist = st.truncnorm(-m / s, np.inf, loc=m, scale=s)
    moments = [dist.moment(n) for n in (1, 2, 3, 4)]
    mean = np.array(moments[:2])
    cov = np.array([[moments[1], moments[2]], [moments[2], moments[3]]]) - np.outer(mean, mean)
    return by_quad[0], mean, cov


def laplace_reference(a, b):
    """Per coordinate quad, assembled in the [a_1..a_d, b_1..b_d] layout."""
    d = len(a)
    logz, mean, cov = 0.0, np.zeros(2 * d), np.zeros((2 * d, 2 * d))
    for i in range(d):
        lz, m, c = quad_moments(
            lambda x, i=i: -a[i] * np.abs(x - 1) - b[i] * np.abs(x + 1), points=(-1.0, 1.0),
            stats=lambda x: np.array([-np.abs(x - 1), -np.abs(x + 1)]),
        )
        logz += lz
        idx = [i, d + i]
        mean[idx] = m
        cov[np.ix_(idx, idx)] = c
    return logz, mean, cov


def gauss_laplace_reference(eta):
    e1, e2, e3 = eta
    return quad_moments(lambda x: e1 * x + e2 * x**2 + e3 * np.abs(x), points=(0.0,),
                        stats=lambda x: np.array([x, x**2, np.abs(x)]))


# ---------------------------------------------------------------------------- test cases
# Every family is evaluated on a batch of etas through one jitted function (compiled once per
# family and shared by the tests), so the file stays fast.

FAMILIES = {
    "Gaussian": Gaussian(),
    "MultivariateNormal": MultivariateNormal(3),
    "Gamma": Gamma(),
    "Beta": Beta(),
    "VonMises": VonMises(),
    "RectifiedGaussian": RectifiedGaussian(),
    "LaplaceProduct": LaplaceProduct(2),
    "GaussLaplace": GaussLaplace(),
}
NAMES = sorted(FAMILIES)

_RNG = np.random.default_rng(3)
_MVN_LOC = np.array([0.3, -1.1, 0.6])
_L = np.tril(_RNG.normal(size=(3, 3)), -1) * 0.4 + np.diag([1.2, 0.8, 0.5])
_MVN_COV = _L @ _L.T
_VM_KAPPAS = [2.1, 30.0, 0.0, 1e-7, 0.0999999, 0.1000001]   # 0.1: switch of the Taylor branch
_VM_LOCS = [0.4, -2.5, 0.0, 0.3, 0.3, 0.3]
_LP_AB = [                                         # a == b, and a - b = 0.05: switch of log g
    ([-0.5, 2.0], [1.5, 0.8]),
    ([1.3, 1.3 + 1e-9], [1.3, 1.3]),
    ([1.35 - 1e-9, 1.35 + 1e-9], [1.3, 1.3]),
    ([1.0, 3.0], [1.3, -1.1]),
]
_LP_EXTREME = [                                    # finite values and the sampler only
    ([0.7, -30.0], [0.7, 30.5]),
    ([-40.0, 300.0], [40.5, 300.0]),
    ([40.5, 1e-3], [-40.0, 1e-3]),
]
_RG_ETAS = [(-1.5, -0.6), (2.0, -0.3), (-30.0, -0.5), (-4.0 - 1e-9, -0.5), (-4.0 + 1e-9, -0.5)]
_RG_FAR = [1e3, 1e4, 1e6]                          # eta1 = -lam: checked against Exp(lam)
_GL_ETAS = [(0.4, -0.7, -1.3), (3.0, -0.4, -2.0), (-1.0, -2.0, 0.5)]


def case_etas(name: str) -> jax.Array:
    """A batch of test etas of one family, shape (k, stat_dim)."""
    f = FAMILIES[name]
    if name == "Gaussian":
        return f.natural_from_loc_scale(jnp.array([0.7, -2.0]), jnp.array([1.3, 0.2]))
    if name == "MultivariateNormal":
        return f.natural_from_loc_covariance(_MVN_LOC, _MVN_COV)[None]
    if name == "Gamma":
        return f.natural_from_shape_rate(jnp.array([2.5, 0.3]), jnp.array([1.7, 4.0]))
    if name == "Beta":
        return f.natural_from_concentrations(jnp.array([2.3, 0.5]), jnp.array([0.7, 0.5]))
    if name == "VonMises":
        return f.natural_from_loc_concentration(jnp.array(_VM_LOCS), jnp.array(_VM_KAPPAS))
    if name == "RectifiedGaussian":
        return jnp.array(_RG_ETAS + [(-lam, -0.5) for lam in _RG_FAR])
    if name == "LaplaceProduct":
        return jnp.stack([f.natural_from_ab(jnp.array(a), jnp.array(b))
                          for a, b in _LP_AB + _LP_EXTREME])
    return jnp.array(_GL_ETAS)


@functools.cache
def references(name: str) -> list:
    """(A, E[T], Cov[T]) for each eta of ``case_etas(name)`` (None: checked elsewhere),
    computed without the package."""
    if name == "Gaussian":
        return [gaussian_reference(0.7, 1.3), gaussian_reference(-2.0, 0.2)]
    if name == "MultivariateNormal":
        return [mvn_reference(_MVN_LOC, _MVN_COV)]
    if name == "Gamma":
        return [gamma_reference(2.5, 1.7), gamma_reference(0.3, 4.0)]
    if name == "Beta":
        return [beta_reference(2.3, 0.7), beta_reference(0.5, 0.5)]
    if name == "VonMises":
        return [von_mises_reference(m, k) for m, k in zip(_VM_LOCS, _VM_KAPPAS, strict=True)]
    if name == "RectifiedGaussian":
        return [rectified_reference(*e) for e in _RG_ETAS] + [None] * len(_RG_FAR)
    if name == "LaplaceProduct":
        return ([laplace_reference(np.array(a), np.array(b)) for a, b in _LP_AB]
                + [None] * len(_LP_EXTREME))
    return [gauss_laplace_reference(np.array(e)) for e in _GL_ETAS]


@functools.cache
def exact_moments(name: str):
    """jit(eta -> (A, E[T], Cov[T])) of the family's ExactOracle, compiled once per family."""
    oracle = ExactOracle(FAMILIES[name])
    return jax.jit(lambda eta: (oracle.log_partition(eta), oracle.mean(eta),
                                oracle.covariance(eta)))


@functools.cache
def exact_sampler(name: str):
    """jit of the family's sample_exact with a static sample shape."""
    return jax.jit(FAMILIES[name].sample_exact, static_argnums=2)


# ---------------------------------------------------------------------------- registry


def test_registry_lists_all_builtins():
    assert set(FAMILIES) <= set(REGISTRY)  # the named families of test_named_families too
    for name, cls in REGISTRY.items():
        assert issubclass(cls, ExponentialFamily)
        family = cls()
        assert family.name == name
        assert family.has_closed_form and family.has_exact_sampler


def test_get_family():
    family = get_family("MultivariateNormal", dim=4)
    assert isinstance(family, MultivariateNormal) and family.event_shape == (4,)
    assert isinstance(get_family("Gamma"), Gamma)
    with pytest.raises(ValueError, match="Nope.*known families: .*Gaussian"):
        get_family("Nope")


@pytest.mark.parametrize("cls", [MultivariateNormal, LaplaceProduct])
def test_vector_families_reject_bad_dim(cls):
    with pytest.raises(ValueError, match="dim"):
        cls(0)


# ---------------------------------------------------------------------------- layout

_LAYOUT_FAMILIES = [*FAMILIES.values(), LaplaceProduct(1), MultivariateNormal(1)]


@pytest.mark.parametrize("family", _LAYOUT_FAMILIES, ids=repr)
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)], ids=str)
def test_statistics_shapes_and_round_trip(family, batch, key):
    transform = biject_to(family.support)
    shape = batch + tuple(transform.inverse_shape(family.event_shape))
    u = np.linspace(-2.0, 2.0, math.prod(shape)).reshape(shape)   # no RNG: nothing to compile
    x = transform(jnp.asarray(u))
    assert x.shape == batch + family.event_shape
    stats = family.statistics(x)
    assert tuple(stats) == family.stat_names
    for name, value in stats.items():
        assert value.shape == batch + family.stat_shapes[name]
    flat = family.sufficient_statistics(x)
    assert flat.shape == batch + (family.stat_dim,)
    assert len(family.stat_labels) == family.stat_dim
    back = family.unflatten(flat)
    for name in stats:
        np.testing.assert_array_equal(back[name], stats[name])
    np.testing.assert_array_equal(family.flatten(back), flat)
    assert family.unnormalized_log_prob(
        family.natural_constraint.feasible_like(flat), x).shape == batch
    if batch == ():
        family.check_statistics(key, num_points=16)


def test_layouts_of_vector_families():
    mvn = MultivariateNormal(3)
    assert mvn.stat_shapes == {"x": (3,), "xx": (6,)}
    x = np.array([2.0, 3.0, 5.0])
    rows, cols = np.triu_indices(3)
    np.testing.assert_allclose(mvn.statistics(jnp.asarray(x))["xx"], x[rows] * x[cols])
    lp = LaplaceProduct(2)
    assert lp.stat_shapes == {"neg_abs_xm1": (2,), "neg_abs_xp1": (2,)}
    assert lp.event_shape == (2,) and LaplaceProduct().event_shape == (1,)
    a, b = lp.ab_from_natural(lp.natural_from_ab(jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0])))
    np.testing.assert_array_equal(a, [1.0, 2.0])
    np.testing.assert_array_equal(b, [3.0, 4.0])
    assert lp.natural_from_ab(jnp.ones((5, 2)), 2.0).shape == (5, 4)


def test_parameter_conversions():
    mvn = MultivariateNormal(3)
    eta = mvn.natural_from_loc_covariance(_MVN_LOC, _MVN_COV)
    loc, cov = mvn.loc_covariance_from_natural(eta)
    np.testing.assert_allclose(loc, _MVN_LOC, rtol=1e-10)
    np.testing.assert_allclose(cov, _MVN_COV, rtol=1e-10)
    lam = np.linalg.inv(_MVN_COV)
    np.testing.assert_allclose(mvn.precision_from_natural(eta), lam, rtol=1e-10)
    loc2, lam2 = mvn.loc_precision_from_natural(eta)
    np.testing.assert_allclose(loc2, _MVN_LOC, rtol=1e-10)
    np.testing.assert_allclose(lam2, lam, rtol=1e-10)
    # eta . T(x) = h.x - x^T Lambda x / 2 for any x
    x = np.array([0.2, -0.4, 1.5])
    expected = (lam @ _MVN_LOC) @ x - 0.5 * x @ lam @ x
    np.testing.assert_allclose(mvn.unnormalized_log_prob(eta, jnp.asarray(x)), expected,
                               rtol=1e-10)
    assert mvn.natural_from_loc_covariance(jnp.stack([_MVN_LOC] * 4), _MVN_COV).shape == (4, 9)
    # scalar families
    g = Gaussian()
    loc, scale = g.loc_scale_from_natural(g.natural_from_loc_scale(0.7, 1.3))
    np.testing.assert_allclose([loc, scale], [0.7, 1.3], rtol=1e-14)
    ga = Gamma()
    np.testing.assert_allclose(ga.shape_rate_from_natural(ga.natural_from_shape_rate(2.0, 3.0)),
                               [2.0, 3.0], rtol=1e-14)
    be = Beta()
    np.testing.assert_allclose(
        be.concentrations_from_natural(be.natural_from_concentrations(2.0, 3.0)), [2.0, 3.0],
        rtol=1e-14)
    vm = VonMises()
    np.testing.assert_allclose(
        vm.loc_concentration_from_natural(vm.natural_from_loc_concentration(-2.0, 3.0)),
        [-2.0, 3.0], rtol=1e-14)


# ---------------------------------------------------------------------------- domains


_OUTSIDE = {
    "Gaussian": [0.0, 0.5],
    "MultivariateNormal": [0.0, 0.0, 0.0, -0.5, 2.0, 0.0, -0.5, 0.0, -0.5],
    "Gamma": [-1.5, -1.0],
    "Beta": [0.3, -1.2],
    "VonMises": [np.nan, 0.0],
    "RectifiedGaussian": [1.0, 0.0],
    "LaplaceProduct": [1.0, -2.0, 1.0, 1.5],
    "GaussLaplace": [0.0, 0.1, -1.0],
}


@pytest.mark.parametrize("name", NAMES)
def test_natural_domain(name):
    family = FAMILIES[name]
    inside = jnp.asarray(family.natural_constraint.feasible, jnp.float64)
    etas = jnp.stack([inside, jnp.asarray(_OUTSIDE[name]), inside])
    np.testing.assert_array_equal(family.in_domain(etas), [True, False, True])
    assert family.in_domain(jnp.broadcast_to(inside, (2, 3, family.stat_dim))).shape == (2, 3)
    assert bool(jnp.all(family.in_domain(case_etas(name))))
    family.validate_natural(inside)
    with pytest.raises(OutOfDomainError, match=name):
        family.validate_natural(etas)


def test_domain_edge_cases():
    lp = LaplaceProduct(1)   # a or b may be negative as long as a + b > 0
    assert bool(lp.in_domain(jnp.array([-0.5, 0.6])))
    assert not bool(lp.in_domain(jnp.array([-0.5, 0.5])))
    assert bool(VonMises().in_domain(jnp.array([-1e3, 7.0])))
    mvn = MultivariateNormal(2)   # negative diagonal of eta_xx but an indefinite precision
    assert bool(mvn.in_domain(mvn.natural_from_loc_precision(jnp.zeros(2), jnp.eye(2))))
    assert not bool(mvn.in_domain(mvn.natural_from_loc_precision(
        jnp.zeros(2), jnp.array([[1.0, 2.0], [2.0, 1.0]]))))


# ---------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("name", NAMES)
def test_log_partition_and_moments(name):
    etas = case_etas(name)
    log_z, mean, cov = (np.asarray(v) for v in exact_moments(name)(etas))
    for i, ref in enumerate(references(name)):
        if ref is None:
            continue
        ref_a, ref_mean, ref_cov = ref
        msg = f"{name} at eta = {np.asarray(etas[i]).tolist()}"
        np.testing.assert_allclose(log_z[i], ref_a, rtol=1e-10, atol=1e-10, err_msg=msg)
        np.testing.assert_allclose(mean[i], ref_mean, rtol=1e-8, atol=1e-12, err_msg=msg)
        np.testing.assert_allclose(cov[i], ref_cov, rtol=1e-6, atol=1e-12, err_msg=msg)
        np.testing.assert_allclose(cov[i], cov[i].T, atol=1e-13, err_msg=msg)
        assert np.linalg.eigvalsh(cov[i]).min() > 0, msg


def test_rectified_gaussian_far_tail():
    """eta1 -> -inf: x ~ Exp(lam) with lam = -eta1, up to O(1/lam^2); no cancellation."""
    lam = np.array(_RG_FAR)
    _, mean, cov = (np.asarray(v)[-len(lam):]
                    for v in exact_moments("RectifiedGaussian")(case_etas("RectifiedGaussian")))
    np.testing.assert_allclose(mean[:, 0], 1 / lam - 2 / lam**3, rtol=1e-10)
    np.testing.assert_allclose(mean[:, 1], 2 / lam**2 - 10 / lam**4, rtol=1e-10)
    np.testing.assert_allclose(cov[:, 0, 0], 1 / lam**2 - 6 / lam**4, rtol=1e-8)
    assert np.all(np.isfinite(cov)) and np.all(np.linalg.eigvalsh(cov).min(-1) > 0)


@pytest.mark.parametrize("family", [RectifiedGaussian(), GaussLaplace()], ids=lambda f: f.name)
def test_closed_form_mean_is_the_gradient_of_the_log_partition(family):
    """The closed-form E[T] equals grad A on both sides of the tail switch (z = -4) and deep in
    the tail, for both signs of the |x| coefficient."""
    e1 = np.array([-1e4, -200.0, -9.0, -5.7, -4.01, -3.99, -1.0, 0.0, 0.3, 2.0, 8.0, 40.0])
    e2 = np.array([-0.01, -0.5, -3.0, -40.0])
    grid = np.stack(np.meshgrid(e1, e2), -1).reshape(-1, 2)
    if family.stat_dim == 3:
        grid = np.concatenate([np.c_[grid, -np.abs(grid[:, :1]) - 1.0],
                               np.c_[grid, np.abs(grid[:, :1]) + 0.5]])
    etas = jnp.asarray(grid)
    closed = np.asarray(jax.vmap(family.closed_form_mean)(etas))
    grad = np.asarray(jax.vmap(jax.grad(family.closed_form_log_partition))(etas))
    np.testing.assert_allclose(closed, grad, rtol=1e-11, atol=1e-300)


# ---------------------------------------------------------------------------- smoothness
# The removable singularities (VonMises at eta = 0, LaplaceProduct at a == b) and the branch
# switches are in the case lists above, so the Hessians there are checked against quadrature and
# Bessel values by test_log_partition_and_moments; here only exact values and finiteness.


def test_von_mises_smooth_at_zero():
    etas = case_etas("VonMises")
    assert float(jnp.abs(etas[2]).max()) == 0.0
    log_z, mean, cov = (np.asarray(v)[2] for v in exact_moments("VonMises")(etas))
    np.testing.assert_allclose(log_z, math.log(2 * math.pi), rtol=1e-14)
    np.testing.assert_allclose(mean, [0.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(cov, 0.5 * np.eye(2), rtol=1e-12)
    grad = jax.grad(ExactOracle(VonMises()).log_partition_single)(jnp.zeros(2))
    np.testing.assert_array_equal(grad, [0.0, 0.0])


def test_laplace_product_smooth_at_a_equals_b():
    etas = case_etas("LaplaceProduct")
    a, b = FAMILIES["LaplaceProduct"].ab_from_natural(etas[1])
    assert float(a[0]) == float(b[0])
    _, mean, cov = (np.asarray(v)[1] for v in exact_moments("LaplaceProduct")(etas))
    assert np.all(np.isfinite(cov))
    np.testing.assert_allclose(mean[0], mean[2], rtol=1e-14)   # x -> -x symmetry at a == b
    np.testing.assert_allclose(cov[0, 0], cov[2, 2], rtol=1e-12)


def test_laplace_product_extreme_but_valid():
    """Strongly negative a or b (mass piled at one kink) and huge a = b stay finite."""
    values = exact_moments("LaplaceProduct")(case_etas("LaplaceProduct"))
    for value in values:
        assert np.all(np.isfinite(np.asarray(value)[-len(_LP_EXTREME):]))
    cov = np.asarray(values[2])[-len(_LP_EXTREME):]
    assert np.all(np.linalg.eigvalsh(cov).min(-1) > 0)


# ---------------------------------------------------------------------------- exact samplers


@pytest.mark.parametrize("name", NAMES)
def test_sample_exact_moments(name, key):
    """Sample means of T within 5 Monte Carlo standard errors of the exact E[T]."""
    family = FAMILIES[name]
    num = 20_000
    etas = case_etas(name)
    x = exact_sampler(name)(key, etas, (num,))
    assert x.shape == (num, len(etas)) + family.event_shape
    assert bool(jnp.all(family.support(x)))
    np.testing.assert_array_equal(x, exact_sampler(name)(key, etas, (num,)))   # reproducible
    t = np.asarray(family.sufficient_statistics(x))
    assert np.all(np.isfinite(t))
    _, exact_mean, exact_cov = (np.asarray(v) for v in exact_moments(name)(etas))
    mc_error = np.sqrt(np.diagonal(exact_cov, axis1=-2, axis2=-1) / num)
    z = np.abs(t.mean(0) - exact_mean) / mc_error
    assert np.all(z < 5), (
        f"{name}: sample means {t.mean(0)} vs exact {exact_mean}; "
        f"Monte Carlo standard errors {mc_error}; |z| = {z}"
    )


def test_sample_exact_shapes(key):
    g = Gaussian()
    etas = g.natural_from_loc_scale(jnp.zeros((2, 3)), 1.0)
    assert g.sample_exact(key, etas, [4]).shape == (4, 2, 3)


def test_sample_exact_float32(key):
    """The half-line sampler keeps float32 and stays finite deep in both tails."""
    family = RectifiedGaussian()
    eta = jnp.array([[-300.0, -0.5], [0.0, -0.5], [310.0, -0.5]], jnp.float32)
    x = family.sample_exact(key, eta, (1000,))
    assert x.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(x))) and bool(jnp.all(x >= 0))
    assert bool(jnp.all(x[:, 0] < 0.1))                    # x ~ Exponential(300)
    assert bool(jnp.all(jnp.abs(x[:, 2] - 310.0) < 6.0))   # x ~ Normal(310, 1)

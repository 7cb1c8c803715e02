"""ExactOracle: construction, batching, jit/vmap, and the inverse map mu -> eta for every family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_nnef.families import (
    Beta,
    Gamma,
    Gaussian,
    GaussLaplace,
    LaplaceProduct,
    MultivariateNormal,
    RectifiedGaussian,
    VonMises,
)
from numpyro_nnef.family import ExponentialFamily
from numpyro_nnef.oracles.base import Oracle
from numpyro_nnef.oracles.exact import ExactOracle


def _etas(family: ExponentialFamily) -> jax.Array:
    """A few points inside the natural domain (none of them the default init)."""
    name = family.name
    if name == "Gaussian":
        return family.natural_from_loc_scale(jnp.array([0.7, -3.0]), jnp.array([1.3, 0.1]))
    if name == "MultivariateNormal":
        cov = jnp.array([[1.0, 0.3, -0.2], [0.3, 0.5, 0.1], [-0.2, 0.1, 2.0]])
        return family.natural_from_loc_covariance(jnp.array([[0.3, -1.0, 2.0], [0.0, 0.0, 0.5]]),
                                                  jnp.stack([cov, 0.3 * cov]))
    if name == "Gamma":
        return family.natural_from_shape_rate(jnp.array([2.5, 0.4, 30.0]),
                                              jnp.array([1.7, 3.0, 0.2]))
    if name == "Beta":
        return family.natural_from_concentrations(jnp.array([2.3, 0.5, 40.0]),
                                                  jnp.array([0.7, 0.5, 3.0]))
    if name == "VonMises":
        return family.natural_from_loc_concentration(jnp.array([0.4, -2.5, 3.0]),
                                                     jnp.array([2.1, 15.0, 0.05]))
    if name == "RectifiedGaussian":
        # the last two need Newton's moment-matched start (natural_init_from_mean): from the
        # default point the base Newton stalls on the boundary eta2 -> 0, where A is finite
        return jnp.array([[-1.5, -0.6], [2.0, -0.3], [-8.0, -2.0], [10.0, -0.1]])
    if name == "LaplaceProduct":
        return jnp.array([[-0.5, 2.0, 1.5, 0.8], [1.3, 1.3, 1.3, 1.3], [4.0, 0.2, -1.0, 0.9]])
    return jnp.array([[0.4, -0.7, -1.3], [3.0, -0.4, -2.0], [-1.0, -2.0, 0.5],
                      [0.0, -0.5, -20.0]])


FAMILIES = [Gaussian(), MultivariateNormal(3), Gamma(), Beta(), VonMises(),
            RectifiedGaussian(), LaplaceProduct(2), GaussLaplace()]
IDS = [f.name for f in FAMILIES]


def test_rejects_family_without_closed_form():
    family = ExponentialFamily.from_statistics(
        "AbsFamily", lambda x: {"abs_x": jnp.abs(x)},
        natural_constraint=None,
    )
    with pytest.raises(TypeError, match="AbsFamily.*QuadratureOracle"):
        ExactOracle(family)
    with pytest.raises(TypeError, match="ExponentialFamily"):
        ExactOracle("Gaussian")


def test_is_an_oracle_and_uses_closed_form():
    family = Gamma()
    oracle = ExactOracle(family)
    assert isinstance(oracle, Oracle) and oracle.family is family
    assert repr(oracle) == "ExactOracle(Gamma)"
    eta = jnp.array([1.5, -2.0])
    np.testing.assert_allclose(oracle.log_partition_single(eta),
                               family.closed_form_log_partition(eta), rtol=1e-15)


def test_batch_shapes_and_consistency():
    family = MultivariateNormal(2)
    oracle = ExactOracle(family)
    loc = jnp.arange(12.0).reshape(2, 3, 2) / 10
    etas = family.natural_from_loc_covariance(loc, jnp.array([[1.0, 0.2], [0.2, 0.7]]))
    log_z, mean, cov = oracle.log_partition(etas), oracle.mean(etas), oracle.covariance(etas)
    assert log_z.shape == (2, 3)
    assert mean.shape == (2, 3, 5)
    assert cov.shape == (2, 3, 5, 5)
    np.testing.assert_allclose(log_z[0, 1], oracle.log_partition_single(etas[0, 1]),
                               rtol=1e-13)
    with pytest.raises(ValueError, match=r"batch \+ \(5,\)"):
        oracle.mean(jnp.zeros((2, 4)))


def test_jit_and_vmap():
    oracle = ExactOracle(Gaussian())
    etas = _etas(oracle.family)
    mean, cov, log_z = oracle.mean(etas), oracle.covariance(etas), oracle.log_partition(etas)
    np.testing.assert_allclose(jax.jit(oracle.mean)(etas), mean, rtol=1e-13)
    np.testing.assert_allclose(jax.vmap(oracle.covariance)(etas), cov, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(jax.vmap(oracle.log_partition))(etas), log_z,
                               rtol=1e-13)
    inverse = jax.jit(jax.vmap(oracle.natural_from_mean))(mean)
    np.testing.assert_allclose(inverse, etas, rtol=1e-10)


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_natural_from_mean_round_trip(family):
    """eta -> mu = grad A(eta) -> natural_from_mean(mu) recovers eta (jitted, batched)."""
    oracle = ExactOracle(family)
    etas = _etas(family)
    assert bool(jnp.all(family.in_domain(etas)))

    @jax.jit
    def round_trip(etas):
        mu = oracle.mean(etas)
        recovered = oracle.natural_from_mean(mu)
        return mu, recovered, oracle.mean(recovered)

    mu, recovered, mu_again = round_trip(etas)
    closed = hasattr(family, "closed_form_natural_from_mean")
    np.testing.assert_allclose(recovered, etas, rtol=1e-9 if closed else 1e-6,
                               atol=1e-9 if closed else 1e-7,
                               err_msg=f"{family.name} (closed form: {closed})")
    np.testing.assert_allclose(mu_again, mu, rtol=1e-9, atol=1e-12)


def test_closed_form_inverse_is_exact():
    family = Gaussian()
    oracle = ExactOracle(family)
    # E x = 2, Var x = 0.25  ->  eta = (2 / 0.25, -1 / 0.5)
    np.testing.assert_allclose(oracle.natural_from_mean(jnp.array([2.0, 4.25])), [8.0, -2.0],
                               rtol=1e-14)


def test_family_start_is_inside_the_domain():
    """natural_init_from_mean (Newton's start) is in the domain even for an invalid mean."""
    family = RectifiedGaussian()
    mu = ExactOracle(family).mean(jnp.array([[-1.5, -0.6], [2.0, -0.3]]))
    start = jax.vmap(family.natural_init_from_mean)(jnp.concatenate([mu, jnp.array([[1.0, 0.5]])]))
    assert bool(jnp.all(family.in_domain(start)))
    assert bool(GaussLaplace().in_domain(GaussLaplace().natural_init_from_mean(
        jnp.array([0.1, 2.0, 1.0]))))

"""ExponentialFamily base class: layout, flat view, user families, natural domain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.distributions import constraints

import numpyro_nnef as nnef


def matrix_family():
    """Vector x with a scalar, a vector and a matrix statistic."""
    return nnef.ExponentialFamily.from_statistics(
        "Mixed",
        lambda x: {"sum": x.sum(-1), "x": x, "outer": x[..., :, None] * x[..., None, :]},
        event_shape=(2,),
        support=constraints.real_vector,
    )


def test_layout_and_labels():
    family = matrix_family()
    assert family.stat_shapes == {"sum": (), "x": (2,), "outer": (2, 2)}
    assert family.stat_dim == 1 + 2 + 4
    assert family.stat_labels == (
        "sum", "x[0]", "x[1]", "outer[0,0]", "outer[0,1]", "outer[1,0]", "outer[1,1]",
    )


@pytest.mark.parametrize("batch", [(), (1,), (3,), (2, 3)])
def test_flatten_round_trip_any_batch(batch, key):
    family = matrix_family()
    x = jax.random.normal(key, batch + (2,))
    stats = family.statistics(x)
    flat = family.sufficient_statistics(x)
    assert flat.shape == batch + (family.stat_dim,)
    back = family.unflatten(flat)
    for name in stats:
        np.testing.assert_array_equal(back[name], stats[name])
    np.testing.assert_array_equal(family.flatten(back), flat)


def test_flatten_broadcasts_and_checks_shapes():
    family = matrix_family()
    stats = {"sum": jnp.zeros(()), "x": jnp.ones((3, 2)), "outer": jnp.zeros((3, 2, 2))}
    assert family.flatten(stats).shape == (3, 7)
    with pytest.raises(ValueError, match="outer"):
        family.flatten({**stats, "outer": jnp.zeros((3, 4))})
    with pytest.raises(KeyError, match="sum"):
        family.flatten({"x": stats["x"], "outer": stats["outer"]})
    with pytest.raises(ValueError, match="stat_dim=7"):
        family.unflatten(jnp.zeros((3, 6)))


def test_single_array_statistics_and_scalar_statistic():
    family = nnef.ExponentialFamily.from_statistics("Abs", lambda x: jnp.abs(x))
    assert family.stat_shapes == {"T": ()} and family.stat_dim == 1
    assert family.sufficient_statistics(jnp.array([-2.0, 3.0])).tolist() == [[2.0], [3.0]]
    assert family.sufficient_statistics(jnp.array(-2.0)).shape == (1,)


def test_unnormalized_log_prob_broadcasts(key):
    family = nnef.ExponentialFamily.from_statistics(
        "Gauss", lambda x: {"x": x, "x2": x**2}, log_base_measure=lambda x: -0.5 * jnp.abs(x)
    )
    eta = jnp.array([[1.0, -0.5], [0.0, -2.0]])
    x = jnp.array([[0.5], [1.5], [-1.0]])  # (3, 1) against eta batch (2,)
    out = family.unnormalized_log_prob(eta, x)
    assert out.shape == (3, 2)
    expected = eta[None, :, 0] * x + eta[None, :, 1] * x**2 - 0.5 * jnp.abs(x)
    np.testing.assert_allclose(out, expected)


def test_frozen_network_statistics(key):
    """T(x) given by a fixed two-layer network; jit, vmap and grad go through it."""
    k1, k2 = jax.random.split(key)
    w1, w2 = jax.random.normal(k1, (1, 8)), jax.random.normal(k2, (8, 3))

    def network(x):
        return jnp.tanh(x[..., None] @ w1) @ w2

    family = nnef.ExponentialFamily.from_statistics(
        "Net", network, natural_constraint=None, support=constraints.interval(-1.0, 1.0)
    )
    assert family.stat_dim == 3
    x = jnp.linspace(-0.9, 0.9, 5)
    flat = jax.jit(family.sufficient_statistics)(x)
    np.testing.assert_allclose(flat, network(x), rtol=1e-12)
    eta = jnp.array([0.1, -0.2, 0.3])
    grad = jax.grad(lambda e: family.unnormalized_log_prob(e, x).sum())(eta)
    np.testing.assert_allclose(grad, network(x).sum(0), rtol=1e-10)
    family.check_statistics(key)


def test_non_finite_statistics_are_refused(key):
    family = nnef.ExponentialFamily.from_statistics(
        "LogOnReal", lambda x: {"log_x": jnp.log(x)}, support=constraints.real
    )
    with pytest.raises(ValueError, match="not finite"):
        family.check_statistics(key)


def test_natural_domain_validation():
    domain = nnef.NaturalDomain(lambda e: e[..., 1] < 0, "eta2 < 0", [0.0, -1.0])
    family = nnef.ExponentialFamily.from_statistics(
        "Gauss", lambda x: {"x": x, "x2": x**2}, natural_constraint=domain
    )
    eta = jnp.array([[0.0, -1.0], [0.0, 1.0], [jnp.nan, -1.0]])
    assert family.in_domain(eta).tolist() == [True, False, False]
    with pytest.raises(nnef.OutOfDomainError, match=r"2 natural parameter\(s\).*eta2 < 0"):
        family.validate_natural(eta)
    assert family.validate_natural(eta[:1]).shape == (1, 2)
    with pytest.raises(ValueError, match=r"batch \+ \(2,\)"):
        family.validate_natural(jnp.zeros(3))
    # under jit the check is skipped (no concrete values), never a crash
    jax.jit(family.validate_natural)(eta)
    assert domain.feasible_like(jnp.zeros((4, 2))).shape == (4, 2)


def test_bad_user_arguments():
    with pytest.raises(TypeError, match="callable"):
        nnef.ExponentialFamily.from_statistics("Bad", 3.0)
    with pytest.raises(TypeError, match="numpyro constraint"):
        nnef.ExponentialFamily.from_statistics("Bad", lambda x: x, support="real")
    with pytest.raises(TypeError, match="dict"):
        nnef.ExponentialFamily.from_statistics("Bad", lambda x: {})


def test_equality_shares_identity_only_when_declared():
    from numpyro_nnef import families

    assert families.LaplaceProduct(1) == families.LaplaceProduct(1)
    assert hash(families.LaplaceProduct(1)) == hash(families.LaplaceProduct(1))
    assert families.LaplaceProduct(1) != families.LaplaceProduct(2)
    assert families.Gamma() != families.Beta()
    a, b = matrix_family(), matrix_family()
    assert a == a and a != b  # user families: equal only to themselves

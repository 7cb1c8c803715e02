"""No silent NaN: eta outside the natural domain raises OutOfDomainError in eager oracle calls
and gives NaN plus one warning per call site under jit/vmap; trusted_domain() skips the check."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpyro_nnef as nnef
from numpyro_nnef.families import Gamma
from numpyro_nnef.oracles.base import trusted_domain
from numpyro_nnef.oracles.neural import NeuralOracle, Standardization
from numpyro_nnef.training.protocols import get_protocol

GAMMA = Gamma()
INSIDE = [1.0, -2.0]
OUTSIDE = [1.0, 2.0]  # rate < 0
METHODS = ("mean", "covariance", "log_partition", "mean_and_log_partition")


def neural_gamma_oracle() -> NeuralOracle:
    """An untrained network for Gamma whose training box contains OUTSIDE (so only the
    natural domain, not the training range, is at stake)."""
    protocol = get_protocol("regression")
    model = protocol.build_model("mlp", eta_dim=2, stat_dim=2, rngs=nnx.Rngs(0))
    ones, zeros = np.ones(2), np.zeros(2)
    return NeuralOracle(GAMMA, protocol, "mlp", {}, model,
                        Standardization(zeros, ones, zeros, ones), [-3.0, -3.0], [3.0, 3.0])


def collect(fn):
    """(fn(), the RuntimeWarnings it emitted), with every warning shown."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("method", METHODS)
def test_eager_call_outside_raises_naming_oracle_domain_and_point(method):
    oracle = nnef.ExactOracle(GAMMA)
    with pytest.raises(nnef.OutOfDomainError) as info:
        getattr(oracle, method)(jnp.asarray([INSIDE, INSIDE, OUTSIDE]))
    message = str(info.value)
    assert message.startswith(f"ExactOracle(Gamma).{method}: 1 of 3 eta outside")
    assert GAMMA.natural_constraint.description in message
    assert "batch index (2,): eta = (log_x=1, x=2)" in message
    # the example: a plain list, no batch
    with pytest.raises(nnef.OutOfDomainError, match=r"batch index \(\): eta = \(log_x=1, x=2\)"):
        oracle.mean(OUTSIDE)


def test_neural_oracle_and_distribution_raise_eagerly():
    neural = neural_gamma_oracle()
    for method in ("mean", "covariance"):
        with trusted_domain():  # the network itself extrapolates to finite values
            assert np.isfinite(getattr(neural, method)(jnp.asarray(OUTSIDE))).all()
        with pytest.raises(nnef.OutOfDomainError, match=rf"NeuralOracle\(Gamma, mlp/regression\)"
                                                        rf"\.{method}: .*log_x=1, x=2"):
            getattr(neural, method)(jnp.asarray(OUTSIDE))
    dist = nnef.EFDistribution(GAMMA, jnp.asarray(OUTSIDE), validate_args=False)
    with pytest.raises(nnef.OutOfDomainError, match=r"ExactOracle\(Gamma\)\.log_partition"):
        dist.log_prob(1.0)
    with pytest.raises(nnef.OutOfDomainError, match=r"ExactOracle\(Gamma\)\.mean"):
        dist.mean  # noqa: B018


def test_jit_gives_nan_and_warns_once_per_call_site():
    oracle = nnef.ExactOracle(GAMMA)
    etas = jnp.asarray([INSIDE, OUTSIDE, INSIDE])
    expected = np.asarray(oracle.mean(etas[::2]))
    site = jax.jit(lambda e: oracle.mean(e))

    def three_calls():
        return [site(etas) for _ in range(3)] + [jax.vmap(site)(etas[:, None])[:, 0]]

    results, caught = collect(three_calls)
    for out in results:
        out = np.asarray(out)
        assert np.isnan(out[1]).all()
        np.testing.assert_allclose(out[::2], expected, rtol=1e-12)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert message.startswith("ExactOracle(Gamma).mean: 1 eta outside the natural domain")
    assert GAMMA.natural_constraint.description in message and "NaN" in message
    assert caught[0].filename == __file__  # the line that called the oracle
    assert collect(three_calls)[1] == []  # still once for that site
    # another call site is reported again; an inside eta is not reported at all
    other = jax.jit(lambda e: oracle.mean(e))
    _, caught = collect(lambda: other(etas).block_until_ready())
    assert len(caught) == 1 and str(caught[0].message) == message
    _, caught = collect(lambda: jax.jit(lambda e: oracle.mean(e))(etas[::2]).block_until_ready())
    assert caught == []


def test_jit_distribution_log_prob_and_unconstrained_family_warn():
    dist_log_prob = jax.jit(
        lambda eta, x: nnef.EFDistribution(GAMMA, eta, validate_args=False).log_prob(x))
    values, caught = collect(lambda: dist_log_prob(jnp.asarray([INSIDE, OUTSIDE]), 1.5))
    assert np.isfinite(values[0]) and np.isnan(values[1])
    assert len(caught) == 1 and "ExactOracle(Gamma).log_partition" in str(caught[0].message)
    # a family without natural_constraint: A = inf is what says eta is outside
    plain = nnef.ExponentialFamily.from_statistics("plain_gamma",
                                                   lambda x: {"log_x": jnp.log(x), "x": x},
                                                   support=GAMMA.support)
    quadrature = nnef.QuadratureOracle(plain)
    with pytest.raises(nnef.OutOfDomainError, match="plain_gamma.*no natural_constraint"):
        quadrature.log_partition(jnp.asarray(OUTSIDE))
    values, caught = collect(lambda: jax.jit(quadrature.log_partition)(
        jnp.asarray([INSIDE, OUTSIDE])))
    assert np.isfinite(values[0]) and np.isnan(values[1])
    assert len(caught) == 1 and "plain_gamma (A(eta) < inf" in str(caught[0].message)


def test_grad_and_vmap_inside_the_domain_are_unchanged_and_silent():
    oracle = nnef.ExactOracle(GAMMA)
    etas = jnp.asarray([INSIDE, [0.5, -1.0]])
    grad = jax.jit(jax.vmap(jax.grad(lambda e: oracle.log_partition(e))))
    out, caught = collect(lambda: grad(etas))
    assert caught == []
    with trusted_domain():
        np.testing.assert_allclose(out, oracle.mean(etas), rtol=1e-12)


def test_trusted_domain_skips_the_check():
    oracle = nnef.ExactOracle(GAMMA)
    with trusted_domain():
        eager = np.asarray(oracle.mean(jnp.asarray(OUTSIDE)))
        jitted, caught = collect(lambda: jax.jit(oracle.mean)(jnp.asarray(OUTSIDE)))
    assert np.isnan(eager[0]) and np.isfinite(eager[1])  # the raw closed form, unchecked
    np.testing.assert_array_equal(np.asarray(jitted), eager)
    assert caught == []
    with pytest.raises(nnef.OutOfDomainError):  # the check is back outside the block
        oracle.mean(jnp.asarray(OUTSIDE))

"""estimate_log_partition: A(eta_ref) by quadrature (scalar x) or importance sampling."""

import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_nnef import ExactOracle, OutOfDomainError
from numpyro_nnef.families import Gamma, GaussLaplace, LaplaceProduct, MultivariateNormal
from numpyro_nnef.oracles.anchor import (
    LogPartitionEstimate,
    _summarise_log_weights,
    estimate_log_partition,
    estimate_log_partitions,
    resolve_method,
)

# Small NUTS runs (the sampler's compilation dominates the cost); the proposal draws are cheap.
NUTS = {"num_warmup": 200, "num_nuts_draws": 500}


def _mvn():
    family = MultivariateNormal(2)
    eta = family.natural_from_loc_covariance(jnp.array([0.5, -0.3]),
                                             jnp.array([[1.0, 0.5], [0.5, 2.0]]))
    return family, eta


def _laplace():
    family = LaplaceProduct(2)
    return family, family.natural_from_ab(jnp.array([-0.5, 2.0]), jnp.array([1.5, 1.0]))


@pytest.fixture(scope="module")
def importance():
    """Forced importance-sampling estimates (no RuntimeWarning allowed) and exact values."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for name, (family, eta) in {"mvn": _mvn(), "laplace": _laplace()}.items():
            est = estimate_log_partition(family, eta, key=jax.random.key(1),
                                         method="importance", **NUTS)
            out[name] = (est, float(ExactOracle(family).log_partition_single(eta)))
    return out


# ------------------------------------------------------------------------- quadrature
@pytest.mark.parametrize("family, eta", [
    (Gamma(), [1.5, -2.0]),  # A = lgamma(2.5) - 2.5 log 2 in closed form
    (GaussLaplace(), [0.3, -0.7, -1.0]),
    (LaplaceProduct(1), [-0.5, 1.5]),  # event shape (1,): still a scalar x
])
def test_auto_uses_quadrature_for_scalar_x(family, eta, key):
    est = estimate_log_partition(family, jnp.array(eta), key=key)
    exact = float(ExactOracle(family).log_partition_single(jnp.array(eta)))
    assert est.method == "quadrature"
    assert abs(est.value - exact) < 1e-8
    assert est.stderr == 0.0 and est.khat is None and est.num_samples is None
    assert est.eta == tuple(eta)


# ------------------------------------------------------------------------- importance
@pytest.mark.parametrize("name", ["mvn", "laplace"])
def test_importance_matches_exact(importance, name):
    est, exact = importance[name]
    assert est.method == "importance" and est.num_samples == 20000
    assert 0 < est.stderr < 0.01
    assert abs(est.value - exact) < 4 * est.stderr + 1e-3
    assert abs(est.value - exact) < 0.02
    assert est.khat < 0.7


def test_importance_is_reproducible_and_auto_selects_it(importance):
    family, eta = _mvn()
    # auto picks importance for a vector x; the same key gives the same value bit for bit
    again = estimate_log_partition(family, eta, key=jax.random.key(1), **NUTS)
    assert again == importance["mvn"][0]
    other = estimate_log_partition(family, eta, key=jax.random.key(2), **NUTS)
    assert other.value != again.value


def test_batched_estimates(importance, key):
    gamma = Gamma()
    etas = jnp.array([[1.5, -2.0], [0.2, -0.7], [6.0, -4.0]])
    batch = estimate_log_partitions(gamma, etas, key=key)  # one compiled quadrature
    exact = np.asarray(ExactOracle(gamma).log_partition(etas))
    assert [e.eta for e in batch] == [tuple(eta) for eta in etas.tolist()]
    assert {e.method for e in batch} == {"quadrature"} and {e.stderr for e in batch} == {0.0}
    np.testing.assert_allclose([e.value for e in batch], exact, rtol=0, atol=1e-8)
    # importance sampling: one run per eta with keys split from the key (the sampler compiled by
    # the fixture is reused)
    family, eta = _mvn()
    pair = estimate_log_partitions(family, jnp.stack([eta, eta]), key=jax.random.key(1), **NUTS)
    keys = jax.random.split(jax.random.key(1), 2)
    assert pair[1] == estimate_log_partition(family, eta, key=keys[1], **NUTS)
    assert pair[0].value != pair[1].value
    assert resolve_method(gamma, "auto") == "quadrature"
    assert resolve_method(family, "auto") == "importance"
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        estimate_log_partitions(gamma, etas[0], key=key)


def test_log_weight_summary_matches_direct_formulas():
    rng = np.random.default_rng(0)
    log_w = 1000.0 + 0.5 * rng.standard_normal(5000)  # exp(log_w) overflows: log space needed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value, stderr, khat = _summarise_log_weights(log_w, "test")
    w = np.exp(log_w - 1000.0)
    assert value == pytest.approx(1000.0 + math.log(w.mean()), abs=1e-12)
    assert stderr == pytest.approx(w.std(ddof=1) / (math.sqrt(w.size) * w.mean()), rel=1e-10)
    assert khat < 0.7


def test_heavy_tailed_weights_warn_with_khat():
    u = np.random.default_rng(1).uniform(size=4000)
    log_w = -1.2 * np.log(u)  # Pareto weights with tail index 1/1.2: k = 1.2
    with pytest.warns(RuntimeWarning, match="k-hat = .* > 0.7"):
        _, _, khat = _summarise_log_weights(log_w, "test")
    assert khat > 0.7


def test_undefined_log_weights_get_weight_zero_and_are_reported():
    log_w = np.random.default_rng(2).normal(0.0, 0.1, 1000)
    log_w[:3] = np.nan
    log_w[3] = np.inf
    with pytest.warns(RuntimeWarning, match="4 of 1000 log-weights were NaN or \\+inf"):
        value, _, _ = _summarise_log_weights(log_w, "test")
    assert value == pytest.approx(math.log(np.exp(log_w[4:]).sum() / 1000), abs=1e-12)
    with pytest.raises(RuntimeError, match="no importance weight"):
        _summarise_log_weights(np.full(10, np.nan), "test")


# ------------------------------------------------------------------------- errors
def test_bad_eta_and_options_raise(key):
    gamma = Gamma()
    with pytest.raises(ValueError, match="shape"):
        estimate_log_partition(gamma, jnp.zeros(3), key=key)
    with pytest.raises(ValueError, match="single eta"):
        estimate_log_partition(gamma, jnp.array([[1.0, -1.0], [2.0, -1.0]]), key=key)
    with pytest.raises(OutOfDomainError, match="natural domain"):
        estimate_log_partition(gamma, jnp.array([0.0, 1.0]), key=key)
    with pytest.raises(ValueError, match="unknown method"):
        estimate_log_partition(gamma, jnp.array([0.0, -1.0]), key=key, method="mc")
    family, eta = _mvn()
    with pytest.raises(ValueError, match="scalar x"):
        estimate_log_partition(family, eta, key=key, method="quadrature")
    with pytest.raises(ValueError, match="proposal_df"):
        estimate_log_partition(family, eta, key=key, proposal_df=2.0)
    with pytest.raises(ValueError, match="num_samples"):
        estimate_log_partition(family, eta, key=key, num_samples=1)


# ------------------------------------------------------------------------- JSON
def test_json_round_trip(importance):
    quad = LogPartitionEstimate(-0.25, 0.0, "quadrature", (1.5, -2.0))
    for est in (quad, importance["laplace"][0]):
        assert LogPartitionEstimate.from_json(json.loads(json.dumps(est.to_json()))) == est


_REMOVE = object()


@pytest.mark.parametrize("change", [
    {"value": _REMOVE},
    {"extra": 1.0},
    {"value": "1.0"},
    {"stderr": -1.0},
    {"method": "mc"},
    {"eta": 1.0},
    {"khat": 0.1},  # a quadrature estimate has no k-hat
    {"num_samples": 0},
])
def test_from_json_rejects_bad_dicts(change):
    d = LogPartitionEstimate(1.0, 0.0, "quadrature", (1.0, -1.0)).to_json()
    d = {k: v for k, v in {**d, **change}.items() if v is not _REMOVE}
    with pytest.raises(ValueError, match="LogPartitionEstimate"):
        LogPartitionEstimate.from_json(d)

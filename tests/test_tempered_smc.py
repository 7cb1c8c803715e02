"""Bimodal members: adaptive tempered SMC, selected directly and as the fallback for points that
fail the NUTS diagnostics, checked against quadrature within 4 reported (across-run) MCSE."""

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints

from numpyro_nnef.family import ExponentialFamily, NaturalDomain
from numpyro_nnef.oracles.quadrature import QuadratureOracle
from numpyro_nnef.sampling import SMCSettings, generate_dataset

NUTS = dict(num_chains=2, num_warmup=150, num_samples=400, chunk_size=4, min_ess=100,
            max_rhat=1.05, progress=False)
SMC = SMCSettings(num_runs=10, num_particles=256)


def wells():
    """Quartic double wells: T = (x, x^2, x^4), two modes where eta[x2] > 0."""
    return ExponentialFamily.from_statistics(
        "Wells", lambda x: {"x": x, "x2": x * x, "x4": x**4}, event_shape=(),
        support=constraints.real,
        natural_constraint=NaturalDomain(lambda e: e[..., 2] < 0, "eta[x4] < 0", [0, 0, -1.0]),
    )


def within_mcse(data, family, limit=4.0):
    exact = np.asarray(QuadratureOracle(family).mean(jnp.asarray(data.eta)))
    return np.abs(data.mean - exact) / data.mcse, limit


BIMODAL = np.array([[0.5, 2.0, -0.5], [-0.3, 3.0, -0.4], [0.2, 4.0, -0.25]])


def test_tempered_smc_matches_quadrature_on_a_bimodal_family():
    family = wells()
    data = generate_dataset(family, BIMODAL, key=jax.random.key(2), sampler="smc", smc=SMC,
                            **NUTS)
    assert data.passed.all() and data.extras["tempered_smc"].all(), data.metadata["failures"]
    z, limit = within_mcse(data, family)
    assert np.all(z < limit), z
    # the MCSE is the spread of independent runs, not a particle count
    assert np.all(data.mcse > 0) and np.all(data.ess_bulk < SMC.num_runs * SMC.num_particles * 4)


def test_failed_nuts_points_fall_back_to_smc():
    family = wells()
    etas = np.array([[0.3, 6.0, -0.5]])  # modes at x = +-2.45, barrier 18 nats: chains stick
    # 8 chains from u ~ U(-2, 2): all in one well has probability about 1/128 (they would pass)
    data = generate_dataset(family, etas, key=jax.random.key(3), sampler="nuts", smc=SMC,
                            max_retries=0, **dict(NUTS, num_chains=8))
    assert data.retries.tolist() == [1] and data.extras["tempered_smc"].tolist() == [True]
    assert data.passed.all(), data.metadata["failures"]
    z, limit = within_mcse(data, family)
    assert np.all(z < limit), z

"""Bimodal members: adaptive tempered SMC, selected directly and as the fallback for points that
fail the NUTS diagnostics, checked against quadrature within 4 reported (across-run) MCSE; and
the across-run MCSE is honest (z-scores against exact answers of unit spread)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.distributions import constraints

import numpyro_nnef as nnef
from numpyro_nnef.family import ExponentialFamily, NaturalDomain
from numpyro_nnef.oracles.quadrature import QuadratureOracle
from numpyro_nnef.sampling import (
    SMCDraws,
    SMCSettings,
    generate_dataset,
    run_smc,
    smc_diagnostics,
)

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


def test_smc_mcse_is_honest_against_exact_answers():
    """z = (SMC mean - exact mean) / MCSE over 24 Gamma etas x 2 statistics: unit spread. An MCSE
    that ignored the runs' spread or divided by R instead of sqrt(R) gives rms(z) of 3 or more
    (with 48 z, the rms of honest z lies in [0.75, 1.3] with probability about 0.99)."""
    family = nnef.families.Gamma()
    etas = nnef.sample_etas(family, key=jax.random.key(5), low=[0.0, -5.0], high=[9.0, -0.5],
                            num=24, scale=["uniform", "log-uniform"])
    d = smc_diagnostics(run_smc(family, etas, key=jax.random.key(6), settings=SMC))
    z = (d["mean"] - np.asarray(nnef.ExactOracle(family).mean(etas))) / d["mcse"]
    rms = float(np.sqrt(np.mean(z**2)))
    assert 0.6 < rms < 1.5 and np.abs(z).max() < 5.0, (rms, z)


def test_smc_mcse_has_the_student_t_correction():
    """R = 10 runs: MCSE = sd(run means) / sqrt(R) * sqrt(9 / 7) (the t_9 variance)."""
    run_mean = np.arange(10.0).reshape(1, 10, 1)
    stats = np.broadcast_to(run_mean[:, :, None], (1, 10, 4, 1)) + np.arange(4.0)[:, None]
    d = smc_diagnostics(SMCDraws(run_mean, stats, np.zeros((1, 10)), np.ones((1, 10)),
                                 np.ones((1, 10), bool)))
    expected = np.std(np.arange(10.0), ddof=1) / np.sqrt(10) * np.sqrt(9 / 7)
    np.testing.assert_allclose(d["mcse"], [[expected]])
    with pytest.raises(ValueError, match="num_runs must be >= 4"):
        run_smc(wells(), BIMODAL, key=jax.random.key(0), settings=SMCSettings(num_runs=3))

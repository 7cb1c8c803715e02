"""Auxiliary-variable augmentations (``CAVIGuide(augment=True)``): the HalfCauchy scale
mixture keeps the model's marginal, and CAVI on the augmented eight schools reaches the
mixing variable's closed-form conditional (InverseGamma) and passes its ELBO check."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import scipy.integrate as si
import scipy.stats as ss

import numpyro_nnef as nnef
from numpyro_nnef.infer.augment import SqrtInverseGamma, augmented

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from textbook import EIGHT_SCHOOLS, eight_schools  # noqa: E402


def test_sqrt_inverse_gamma_density_and_draws():
    """p(tau) = 2 tau InvGamma(tau^2; alpha, beta) (scipy); draws have its mean (quadrature),
    within 5 Monte Carlo standard errors."""
    alpha, beta = 1.5, 2.0
    d = SqrtInverseGamma(alpha, beta)
    tau = np.array([0.3, 1.0, 2.5])
    np.testing.assert_allclose(np.exp(d.log_prob(jnp.asarray(tau))),
                               2 * tau * ss.invgamma.pdf(tau**2, alpha, scale=beta), rtol=1e-10)
    mean = si.quad(lambda t: t * 2 * t * ss.invgamma.pdf(t**2, alpha, scale=beta), 0, np.inf)[0]
    draws = np.asarray(d.sample(jax.random.key(0), (20000,)))
    assert abs(draws.mean() - mean) < 5 * draws.std() / np.sqrt(draws.size)


def test_scale_mixture_keeps_the_half_cauchy_marginal():
    """int p(tau | a) p(a) da = HalfCauchy(tau; A), from the augmented model's own densities."""
    scale = 5.0

    def model():
        numpyro.sample("tau", dist.HalfCauchy(scale))

    trace = numpyro.handlers.trace(numpyro.handlers.seed(augmented(model), 0)).get_trace()
    assert list(trace) == ["tau_mixing", "tau"]
    mixing_prior = trace["tau_mixing"]["fn"]

    def joint(a, tau):
        conditional = SqrtInverseGamma(0.5, 1.0 / a)
        return float(np.exp(mixing_prior.log_prob(a) + conditional.log_prob(tau)))

    for tau in (0.5, 3.0, 12.0):
        marginal = si.quad(joint, 0, np.inf, args=(tau,), limit=200)[0]
        np.testing.assert_allclose(marginal, ss.halfcauchy.pdf(tau, scale=scale), rtol=1e-6)


def test_augmented_eight_schools_reaches_the_mixing_conditional():
    guide = nnef.CAVIGuide(eight_schools, augment=True)
    result = nnef.CAVI(eight_schools, guide, tol=1e-12).run(
        jax.random.key(0), 500, progress_bar=False, **EIGHT_SCHOOLS)
    families = {n: f.family.name for n, f in guide.conjugate.families.items()}
    assert families["tau_mixing"] == "InverseGamma", families
    assert result.converged
    elbo = np.asarray(result.elbo)
    assert np.all(np.diff(elbo) >= -1e-9 * np.abs(elbo[1:])), "the ELBO decreased"
    # q(a) = InverseGamma(1, 1/25 + E[1/tau^2]) (Wand et al. 2011), E by q(tau)'s quadrature
    q_tau = guide.distribution("tau", result.params["tau_eta"])
    grid = np.linspace(1e-3, 60.0, 200001)
    density = np.exp(np.asarray(q_tau.log_prob(jnp.asarray(grid))))
    inverse_square = np.trapezoid(density / grid**2, grid) / np.trapezoid(density, grid)
    q_mixing = guide.distribution("tau_mixing", result.params["tau_mixing_eta"])
    a = np.array([0.02, 0.1, 1.0])
    want = ss.invgamma.logpdf(a, 1.0, scale=1 / 25 + inverse_square)
    np.testing.assert_allclose(np.asarray(q_mixing.log_prob(jnp.asarray(a))), want, rtol=2e-4)
    assert result.check_elbo(jax.random.key(1), 4000).passed()

"""Auxiliary variables that make non-conjugate priors conditionally conjugate (Wand et al.,
"Mean field variational Bayes for elaborate distributions", 2011): a model rewritten with them
has the same marginal over its own sites.

- HalfCauchy(A) as a scale mixture: tau^2 | a ~ InverseGamma(1/2, 1/a), a ~ InverseGamma(1/2,
  1/A^2). The site keeps its name (its density is now that of tau given the mixing variable,
  statistics log tau and 1/tau^2); the mixing variable is the new site ``<name>_mixing``, whose
  complete conditional is InverseGamma.

The Polya-Gamma augmentation of logistic terms needs no new site: its q(omega) is optimal in
closed form (``nonconjugate.polya_gamma_bound``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import gammaln
from numpyro.distributions import constraints
from numpyro.infer.reparam import Reparam

__all__ = ["ScaleMixtureHalfCauchy", "SqrtInverseGamma", "augmented"]

MIXING_SUFFIX = "_mixing"


class SqrtInverseGamma(dist.Distribution):
    """tau > 0 with tau^2 ~ InverseGamma(concentration, rate): log p(tau) = log 2 + alpha log
    beta - log Gamma(alpha) - (2 alpha + 1) log tau - beta / tau^2."""

    arg_constraints = {"concentration": constraints.positive, "rate": constraints.positive}
    support = constraints.positive
    reparametrized_params = ["rate"]

    def __init__(self, concentration, rate, *, validate_args=None):
        self.concentration, self.rate = jnp.broadcast_arrays(jnp.asarray(concentration),
                                                             jnp.asarray(rate))
        super().__init__(jnp.shape(self.concentration), validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        shape = sample_shape + self.batch_shape
        return jnp.sqrt(self.rate / jax.random.gamma(key, self.concentration, shape))

    def log_prob(self, value):
        alpha, beta = self.concentration, self.rate
        return (jnp.log(2.0) + alpha * jnp.log(beta) - gammaln(alpha)
                - (2 * alpha + 1) * jnp.log(value) - beta / value**2)


class ScaleMixtureHalfCauchy(Reparam):
    """A latent HalfCauchy(A) site as tau^2 | a ~ InverseGamma(1/2, 1/a) with the new site
    ``<name>_mixing`` a ~ InverseGamma(1/2, 1/A^2) (same marginal of tau)."""

    def __call__(self, name, fn, obs):
        if obs is not None:
            return fn, obs
        base, expand_shape, event_dim = self._unwrap(fn)
        scale = jnp.broadcast_to(base.scale, base.batch_shape)
        mixing_prior = dist.InverseGamma(0.5, 1.0 / scale**2).expand(expand_shape)
        mixing = numpyro.sample(name + MIXING_SUFFIX, mixing_prior.to_event(event_dim))
        return self._wrap(SqrtInverseGamma(0.5, 1.0 / mixing), expand_shape, event_dim), None


def _half_cauchy_sites(msg: dict) -> Reparam | None:
    if msg["type"] != "sample" or msg.get("is_observed"):
        return None
    fn = msg["fn"]
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return ScaleMixtureHalfCauchy() if isinstance(fn, dist.HalfCauchy) else None


def augmented(model: Callable) -> Callable:
    """``model`` with every latent HalfCauchy site written as its inverse-gamma scale mixture."""
    return numpyro.handlers.reparam(model, config=_half_cauchy_sites)

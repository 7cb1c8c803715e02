"""Exponential (T = x on x > 0) and InverseGamma (T = (log x, 1/x) on x > 0)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import digamma, gammaln, polygamma
from numpyro.distributions import constraints

from ..family import Array, ExponentialFamily, NaturalDomain
from ._special import jit_sampler


class Exponential(ExponentialFamily):
    """Exponential(rate): T = x, A(eta) = -log(-eta), eta = -rate < 0."""

    name = "Exponential"
    identity_attributes = ()
    event_shape = ()
    support = constraints.positive
    natural_constraint = NaturalDomain(lambda eta: eta[..., 0] < 0, "eta[x] < 0", np.array([-1.0]))
    has_closed_form = True
    has_exact_sampler = True

    def statistics(self, x: Array) -> dict[str, Array]:
        """T(x) = {x}."""
        return {"x": jnp.asarray(x)}

    def closed_form_log_partition(self, eta: Array) -> Array:
        """A(eta) = -log(-eta)."""
        return -jnp.log(-eta[0])

    def closed_form_natural_from_mean(self, mu: Array) -> Array:
        """E x = 1 / rate -> eta = -1 / E x."""
        return -1.0 / mu

    def natural_from_rate(self, rate: Array) -> Array:
        """eta = -rate, shape ``batch + (1,)``."""
        return -jnp.asarray(rate)[..., None]

    def rate_from_natural(self, eta: Array) -> Array:
        """rate = -eta, shape ``batch``."""
        return -self.check_eta(eta)[..., 0]

    def to_numpyro(self, eta: Array, *, validate_args: bool | None = None) -> dist.Distribution:
        """numpyro Exponential(rate = -eta) with batch shape ``eta.shape[:-1]``."""
        return dist.Exponential(self.rate_from_natural(eta), validate_args=validate_args)

    @jit_sampler
    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """x ~ Exponential(rate); shape ``sample_shape + batch``."""
        return dist.Exponential(self.rate_from_natural(eta)).sample(key, tuple(sample_shape))


class InverseGamma(ExponentialFamily):
    """InverseGamma(a, b): p ∝ x^(-a-1) exp(-b/x), T = (log x, 1/x), A = lgamma(a) - a log b.

    eta = (-a - 1, -b) with shape a > 0 and rate b > 0. ``b`` is numpyro's ``rate`` (scipy's
    ``scale``); 1/x ~ Gamma(a, rate=b).
    """

    name = "InverseGamma"
    identity_attributes = ()
    event_shape = ()
    support = constraints.positive
    natural_constraint = NaturalDomain(
        lambda eta: (eta[..., 0] < -1) & (eta[..., 1] < 0),
        "eta[log_x] < -1 and eta[inv_x] < 0",
        np.array([-2.0, -1.0]),
    )
    has_closed_form = True
    has_exact_sampler = True

    def statistics(self, x: Array) -> dict[str, Array]:
        """T(x) = {log x, 1/x}."""
        x = jnp.asarray(x)
        return {"log_x": jnp.log(x), "inv_x": 1.0 / x}

    def closed_form_log_partition(self, eta: Array) -> Array:
        """A(eta) = lgamma(-eta1 - 1) - (-eta1 - 1) log(-eta2)."""
        shape = -eta[0] - 1.0
        return gammaln(shape) - shape * jnp.log(-eta[1])

    def natural_init_from_mean(self, mu: Array) -> Array:
        """Newton's start for mu = (E log x, E 1/x): Minka's approximate Gamma MLE on 1/x.

        With y = 1/x ~ Gamma(a, b): s = log E y - E log y = log a - digamma(a) > 0, solved by
        a ~ (3 - s + sqrt((s - 3)^2 + 24 s)) / (12 s), then b = a / E y.
        """
        mean_log_y, mean_y = -mu[0], mu[1]
        s = jnp.log(mean_y) - mean_log_y
        ok = jnp.isfinite(s) & (s > 0)
        s = jnp.where(ok, s, 1.0)
        a = (3.0 - s + jnp.sqrt((s - 3.0) ** 2 + 24.0 * s)) / (12.0 * s)
        # one Newton step on log a - digamma(a) = s sharpens the approximation
        a = jnp.maximum(a - (jnp.log(a) - digamma(a) - s) / (1.0 / a - polygamma(1, a)), 0.5 * a)
        eta = jnp.stack([-a - 1.0, -a / mean_y])
        return jnp.where(ok & jnp.all(jnp.isfinite(eta)), eta, jnp.asarray([-2.0, -1.0], mu.dtype))

    def natural_from_shape_rate(self, shape: Array, rate: Array) -> Array:
        """eta = (-shape - 1, -rate), shape ``batch + (2,)``."""
        shape, rate = jnp.broadcast_arrays(jnp.asarray(shape), jnp.asarray(rate))
        return jnp.stack([-shape - 1.0, -rate], axis=-1)

    def shape_rate_from_natural(self, eta: Array) -> tuple[Array, Array]:
        """(shape, rate) = (-eta1 - 1, -eta2)."""
        eta = self.check_eta(eta)
        return -eta[..., 0] - 1.0, -eta[..., 1]

    def to_numpyro(self, eta: Array, *, validate_args: bool | None = None) -> dist.Distribution:
        """numpyro InverseGamma(concentration = a, rate = b) with batch shape ``eta.shape[:-1]``."""
        shape, rate = self.shape_rate_from_natural(eta)
        return dist.InverseGamma(shape, rate, validate_args=validate_args)

    @jit_sampler
    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """x = 1 / y with y ~ Gamma(a, b); shape ``sample_shape + batch``."""
        shape, rate = self.shape_rate_from_natural(eta)
        return dist.InverseGamma(shape, rate).sample(key, tuple(sample_shape))


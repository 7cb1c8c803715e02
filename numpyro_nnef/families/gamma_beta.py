"""Gamma (T = (log x, x) on x > 0) and Beta (T = (log x, log(1 - x)) on 0 < x < 1)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import gammaln
from numpyro.distributions import constraints

from ..family import Array, ExponentialFamily, NaturalDomain
from ._special import jit_sampler


class Gamma(ExponentialFamily):
    """Gamma(shape, rate): T = (log x, x), A = lgamma(shape) - shape log(rate).

    eta = (shape - 1, -rate).
    """

    name = "Gamma"
    identity_attributes = ()
    event_shape = ()
    support = constraints.positive
    natural_constraint = NaturalDomain(
        lambda eta: (eta[..., 0] > -1) & (eta[..., 1] < 0),
        "eta[log_x] > -1 and eta[x] < 0",
        np.array([0.0, -1.0]),
    )
    has_closed_form = True
    has_exact_sampler = True

    def statistics(self, x: Array) -> dict[str, Array]:
        """T(x) = {log x, x}."""
        x = jnp.asarray(x)
        return {"log_x": jnp.log(x), "x": x}

    def closed_form_log_partition(self, eta: Array) -> Array:
        """A(eta) = lgamma(eta1 + 1) - (eta1 + 1) log(-eta2)."""
        shape = eta[0] + 1.0
        return gammaln(shape) - shape * jnp.log(-eta[1])

    def natural_from_shape_rate(self, shape: Array, rate: Array) -> Array:
        """eta = (shape - 1, -rate), shape ``batch + (2,)``."""
        shape, rate = jnp.broadcast_arrays(jnp.asarray(shape), jnp.asarray(rate))
        return jnp.stack([shape - 1.0, -rate], axis=-1)

    def shape_rate_from_natural(self, eta: Array) -> tuple[Array, Array]:
        """(shape, rate) = (eta1 + 1, -eta2)."""
        eta = self.check_eta(eta)
        return eta[..., 0] + 1.0, -eta[..., 1]

    def to_numpyro(self, eta: Array, *, validate_args: bool | None = None) -> dist.Distribution:
        """numpyro Gamma(shape, rate) with batch shape ``eta.shape[:-1]``."""
        shape, rate = self.shape_rate_from_natural(eta)
        return dist.Gamma(shape, rate, validate_args=validate_args)

    @jit_sampler
    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """x ~ Gamma(shape, rate); shape ``sample_shape + batch``."""
        shape, rate = self.shape_rate_from_natural(eta)
        return dist.Gamma(shape, rate).sample(key, tuple(sample_shape))


class Beta(ExponentialFamily):
    """Beta(a, b): T = (log x, log(1 - x)), A = lgamma(a) + lgamma(b) - lgamma(a + b).

    eta = (a - 1, b - 1).
    """

    name = "Beta"
    identity_attributes = ()
    event_shape = ()
    support = constraints.unit_interval
    natural_constraint = NaturalDomain(
        lambda eta: (eta[..., 0] > -1) & (eta[..., 1] > -1),
        "eta[log_x] > -1 and eta[log1m_x] > -1",
        np.array([0.0, 0.0]),
    )
    has_closed_form = True
    has_exact_sampler = True

    def statistics(self, x: Array) -> dict[str, Array]:
        """T(x) = {log x, log(1 - x)}."""
        x = jnp.asarray(x)
        return {"log_x": jnp.log(x), "log1m_x": jnp.log1p(-x)}

    def closed_form_log_partition(self, eta: Array) -> Array:
        """A(eta) = lgamma(eta1 + 1) + lgamma(eta2 + 1) - lgamma(eta1 + eta2 + 2)."""
        a, b = eta[0] + 1.0, eta[1] + 1.0
        return gammaln(a) + gammaln(b) - gammaln(a + b)

    def natural_from_concentrations(self, a: Array, b: Array) -> Array:
        """eta = (a - 1, b - 1), shape ``batch + (2,)``."""
        a, b = jnp.broadcast_arrays(jnp.asarray(a), jnp.asarray(b))
        return jnp.stack([a - 1.0, b - 1.0], axis=-1)

    def concentrations_from_natural(self, eta: Array) -> tuple[Array, Array]:
        """(a, b) = (eta1 + 1, eta2 + 1)."""
        eta = self.check_eta(eta)
        return eta[..., 0] + 1.0, eta[..., 1] + 1.0

    def to_numpyro(self, eta: Array, *, validate_args: bool | None = None) -> dist.Distribution:
        """numpyro Beta(a, b) with batch shape ``eta.shape[:-1]``."""
        a, b = self.concentrations_from_natural(eta)
        return dist.Beta(a, b, validate_args=validate_args)

    @jit_sampler
    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """x ~ Beta(a, b); shape ``sample_shape + batch``."""
        a, b = self.concentrations_from_natural(eta)
        return dist.Beta(a, b).sample(key, tuple(sample_shape))

"""The Dirichlet family on the probability simplex: T = log x."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import gammaln
from numpyro.distributions import constraints

from ..family import Array, ExponentialFamily, NaturalDomain
from ._special import jit_sampler


class Dirichlet(ExponentialFamily):
    """Dirichlet(alpha) on the simplex: T = log x, A = sum lgamma(alpha) - lgamma(sum alpha).

    eta = alpha - 1 (every eta_i > -1); x has ``dim`` coordinates. The density is with respect
    to Lebesgue measure on the first dim - 1 coordinates (numpyro's convention), so h = 1.
    ``Dirichlet(2)`` is ``Beta`` in another layout.
    """

    name = "Dirichlet"
    identity_attributes = ("dim",)
    support = constraints.simplex
    has_closed_form = True
    has_exact_sampler = True

    def __init__(self, dim: int = 3):
        if int(dim) != dim or dim < 2:
            raise ValueError(f"Dirichlet: dim must be an integer >= 2, got {dim!r}")
        self.dim = int(dim)
        self.event_shape = (self.dim,)
        self.natural_constraint = NaturalDomain(
            lambda eta: jnp.all(eta > -1, axis=-1), "every eta[log_x[i]] > -1",
            np.zeros(self.dim),
        )

    def __repr__(self) -> str:
        return f"Dirichlet(dim={self.dim})"

    def statistics(self, x: Array) -> dict[str, Array]:
        """T(x) = {log x} (shape (dim,))."""
        return {"log_x": jnp.log(jnp.asarray(x))}

    def closed_form_log_partition(self, eta: Array) -> Array:
        """A(eta) = sum_i lgamma(eta_i + 1) - lgamma(sum_i (eta_i + 1))."""
        alpha = eta + 1.0
        return jnp.sum(gammaln(alpha)) - gammaln(jnp.sum(alpha))

    def natural_from_concentration(self, concentration: Array) -> Array:
        """eta = alpha - 1, shape ``batch + (dim,)``."""
        return jnp.asarray(concentration) - 1.0

    def concentration_from_natural(self, eta: Array) -> Array:
        """alpha = eta + 1, shape ``batch + (dim,)``."""
        return self.check_eta(eta) + 1.0

    def to_numpyro(self, eta: Array, *, validate_args: bool | None = None) -> dist.Distribution:
        """numpyro Dirichlet(alpha = eta + 1) with batch shape ``eta.shape[:-1]``."""
        return dist.Dirichlet(self.concentration_from_natural(eta), validate_args=validate_args)

    @jit_sampler
    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """x ~ Dirichlet(alpha); shape ``sample_shape + batch + (dim,)``."""
        alpha = self.concentration_from_natural(eta)
        return dist.Dirichlet(alpha).sample(key, tuple(sample_shape))

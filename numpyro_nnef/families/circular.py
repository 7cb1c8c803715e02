"""The von Mises family on the circle: T = (cos x, sin x)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints

from ..family import Array, ExponentialFamily, whole_space
from ._special import jit_sampler, log_i0_sqrt

# numpyro's sampler divides by the concentration; kappa = 0 (uniform) is sampled as kappa = tiny.
_MIN_CONCENTRATION = 1e-12


class VonMises(ExponentialFamily):
    """VonMises(loc, kappa): T = (cos x, sin x), A(eta) = log(2 pi I0(|eta|)).

    eta = kappa (cos loc, sin loc); the natural domain is all of R^2 (eta = 0 is uniform).
    """

    name = "VonMises"
    identity_attributes = ()
    event_shape = ()
    support = constraints.circular
    natural_constraint = whole_space(2)
    has_closed_form = True
    has_exact_sampler = True

    def statistics(self, x: Array) -> dict[str, Array]:
        """T(x) = {cos x, sin x}."""
        x = jnp.asarray(x)
        return {"cos": jnp.cos(x), "sin": jnp.sin(x)}

    def closed_form_log_partition(self, eta: Array) -> Array:
        """A(eta) = log(2 pi) + log I0(sqrt(|eta|^2)), smooth at eta = 0."""
        return math.log(2.0 * math.pi) + log_i0_sqrt(jnp.dot(eta, eta))

    def natural_from_loc_concentration(self, loc: Array, concentration: Array) -> Array:
        """eta = kappa (cos loc, sin loc), shape ``batch + (2,)``."""
        loc, kappa = jnp.broadcast_arrays(jnp.asarray(loc), jnp.asarray(concentration))
        return jnp.stack([kappa * jnp.cos(loc), kappa * jnp.sin(loc)], axis=-1)

    def loc_concentration_from_natural(self, eta: Array) -> tuple[Array, Array]:
        """(loc, kappa) = (atan2(eta2, eta1), |eta|)."""
        eta = self.check_eta(eta)
        return jnp.arctan2(eta[..., 1], eta[..., 0]), jnp.hypot(eta[..., 0], eta[..., 1])

    def to_numpyro(self, eta: Array, *, validate_args: bool | None = None) -> dist.Distribution:
        """numpyro VonMises(loc, kappa) with batch shape ``eta.shape[:-1]``.

        kappa is floored at 1e-12 (numpyro's sampler divides by it; log_prob changes by
        under 1e-12), so eta = 0 gives a usable uniform distribution.
        """
        loc, kappa = self.loc_concentration_from_natural(eta)
        return dist.VonMises(loc, jnp.maximum(kappa, _MIN_CONCENTRATION),
                             validate_args=validate_args)

    @jit_sampler
    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """x ~ VonMises(loc, kappa) in [-pi, pi); shape ``sample_shape + batch``."""
        loc, kappa = self.loc_concentration_from_natural(eta)
        kappa = jnp.maximum(kappa, _MIN_CONCENTRATION)
        return dist.VonMises(loc, kappa).sample(key, tuple(sample_shape))

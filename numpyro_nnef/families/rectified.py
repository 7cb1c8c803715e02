"""Gaussian statistics on half lines: the rectified Gaussian (x >= 0) and the Gauss-Laplace family.

Both are sampled exactly: a normal truncated to [0, inf) by inverse CDF in log space, which stays
finite and accurate deep in the tail where ``numpyro.distributions.TruncatedNormal`` returns inf.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from numpyro.distributions import constraints

from ..family import Array, ExponentialFamily, NaturalDomain
from ._special import (
    jit_sampler,
    rectified_gaussian_log_partition,
    rectified_gaussian_moments,
    standard_normal_excess,
    uniform_open_closed,
)


def _eta2_negative(index: int, label: str, feasible) -> NaturalDomain:
    return NaturalDomain(lambda eta: eta[..., index] < 0, f"{label} < 0", np.asarray(feasible))


def _half_line(u: Array, eta1: Array, eta2: Array) -> Array:
    """y >= 0 with density ~ exp(eta1 y + eta2 y^2) (eta2 < 0), by inverse CDF of u."""
    scale = jnp.sqrt(-0.5 / eta2)
    return scale * standard_normal_excess(u, -eta1 * scale)


def _moment_matched_gaussian(mu: Array, extra: int) -> Array:
    """eta of the normal with mean mu[0] and E x^2 = mu[1] (then ``extra`` zeros).

    A starting point for Newton's inverse that lies inside the natural domain (eta2 < 0) for
    every valid mu; from the domain's default point Newton can stall on the boundary eta2 -> 0,
    where A stays finite for eta1 < 0.
    """
    var = mu[1] - mu[0] ** 2
    ok = jnp.isfinite(var) & (var > 0)
    var = jnp.where(ok, var, 1.0)
    eta = jnp.stack([jnp.where(ok, mu[0], 0.0) / var, -0.5 / var])
    return jnp.concatenate([eta, jnp.zeros((extra,), eta.dtype)])


class RectifiedGaussian(ExponentialFamily):
    """Normal truncated to x >= 0: T = (x, x^2), A = 0.5 log(2 pi s2) + m^2/(2 s2) + log Phi(m/s).

    Here s2 = -1/(2 eta2) and m = eta1 s2 are the parameters of the untruncated normal.
    """

    name = "RectifiedGaussian"
    identity_attributes = ()
    event_shape = ()
    support = constraints.nonnegative
    natural_constraint = _eta2_negative(1, "eta[x2]", [0.0, -0.5])
    has_closed_form = True
    has_exact_sampler = True

    def statistics(self, x: Array) -> dict[str, Array]:
        """T(x) = {x, x^2}."""
        x = jnp.asarray(x)
        return {"x": x, "x2": x * x}

    def closed_form_log_partition(self, eta: Array) -> Array:
        """A(eta) = log int_0^inf exp(eta1 x + eta2 x^2) dx."""
        return rectified_gaussian_log_partition(eta[0], eta[1])

    def closed_form_mean(self, eta: Array) -> Array:
        """E[T] = (s (z + l), s^2 (1 + z (z + l))), l the inverse Mills ratio at z = m/s."""
        return jnp.stack(rectified_gaussian_moments(eta[0], eta[1]))

    def natural_init_from_mean(self, mu: Array) -> Array:
        """Newton's start for mu -> eta: the moment-matched Gaussian (E x, E x^2)."""
        return _moment_matched_gaussian(mu, 0)

    def natural_from_loc_scale(self, loc: Array, scale: Array) -> Array:
        """eta of Normal(loc, scale^2) truncated to x >= 0: (loc/scale^2, -1/(2 scale^2))."""
        loc, var = jnp.broadcast_arrays(jnp.asarray(loc), jnp.square(scale))
        return jnp.stack([loc / var, -0.5 / var], axis=-1)

    @jit_sampler
    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """x ~ Normal(m, s2) conditioned on x >= 0; shape ``sample_shape + batch``."""
        eta = self.check_eta(eta)
        u = uniform_open_closed(key, tuple(sample_shape) + eta.shape[:-1], eta.dtype)
        return _half_line(u, eta[..., 0], eta[..., 1])


class GaussLaplace(ExponentialFamily):
    """T = (x, x^2, |x|) on R: A = logaddexp(A_RG(eta1 + eta3, eta2), A_RG(eta3 - eta1, eta2)).

    The complete conditional of a Bayesian-lasso weight; A_RG is the rectified Gaussian
    log-partition of each half line.
    """

    name = "GaussLaplace"
    identity_attributes = ()
    event_shape = ()
    support = constraints.real
    natural_constraint = _eta2_negative(1, "eta[x2]", [0.0, -0.5, -1.0])
    has_closed_form = True
    has_exact_sampler = True
    breakpoints = (0.0,)

    def statistics(self, x: Array) -> dict[str, Array]:
        """T(x) = {x, x^2, |x|}."""
        x = jnp.asarray(x)
        return {"x": x, "x2": x * x, "abs_x": jnp.abs(x)}

    def _half_log_partitions(self, eta: Array) -> Array:
        """(A_RG(eta3 + eta1, eta2), A_RG(eta3 - eta1, eta2)) stacked on a new last axis."""
        e1, e2, e3 = eta[..., 0:1], eta[..., 1:2], eta[..., 2:3]
        return rectified_gaussian_log_partition(e3 + jnp.concatenate([e1, -e1], axis=-1), e2)

    def closed_form_log_partition(self, eta: Array) -> Array:
        """A(eta) = logaddexp(A_RG(eta1 + eta3, eta2), A_RG(eta3 - eta1, eta2))."""
        return logsumexp(self._half_log_partitions(eta), axis=-1)

    def closed_form_mean(self, eta: Array) -> Array:
        """E[T] from the two half lines y = |x| >= 0, weighted by p_+- = exp(A_+- - A):
        E x = p+ E+ y - p- E- y, E x^2 = p+ E+ y^2 + p- E- y^2, E|x| = p+ E+ y + p- E- y."""
        return self.closed_form_mean_and_log_partition(eta)[0]

    def closed_form_mean_and_log_partition(self, eta: Array) -> tuple[Array, Array]:
        """(E[T], A(eta)): A = logaddexp(A_+, A_-) comes with the half-line weights."""
        e1, e2, e3 = eta[0], eta[1], eta[2]
        linear = jnp.stack([e3 + e1, e3 - e1])
        halves = rectified_gaussian_log_partition(linear, e2)
        log_z = logsumexp(halves)
        weights = jnp.exp(halves - log_z)
        first, second = rectified_gaussian_moments(linear, e2)
        mean = jnp.stack([weights[0] * first[0] - weights[1] * first[1], weights @ second,
                          weights @ first])
        return mean, log_z

    def natural_init_from_mean(self, mu: Array) -> Array:
        """Newton's start for mu -> eta: the moment-matched Gaussian, eta3 = 0."""
        return _moment_matched_gaussian(mu, 1)

    @jit_sampler
    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """Sign + with probability exp(A_RG(+) - A), then a half-line normal.

        Returns draws of shape ``sample_shape + batch``.
        """
        eta = self.check_eta(eta)
        shape = tuple(sample_shape) + eta.shape[:-1]
        halves = self._half_log_partitions(eta)
        u = uniform_open_closed(key, shape + (2,), eta.dtype)
        positive = jnp.log(u[..., 0]) < halves[..., 0] - logsumexp(halves, axis=-1)
        e1 = jnp.where(positive, eta[..., 2] + eta[..., 0], eta[..., 2] - eta[..., 0])
        y = _half_line(u[..., 1], e1, eta[..., 1])
        return jnp.where(positive, y, -y)

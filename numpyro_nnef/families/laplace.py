"""Products of two-kink Laplace densities: p(x_i) ~ exp(-a_i |x_i - 1| - b_i |x_i + 1|)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from numpyro.distributions import constraints

from ..family import Array, ExponentialFamily, NaturalDomain
from ._special import jit_sampler, log_g, uniform_open_closed


def _piece_log_masses(a: Array, b: Array) -> Array:
    """log masses of (x < -1, -1 < x < 1, x > 1), stacked on a new last axis.

    Left e^{-2a}/(a+b), right e^{-2b}/(a+b), middle (e^{-2b} - e^{-2a})/(a-b) = 2 e^{-2b} g(2(a-b)).
    """
    log_apb = jnp.log(a + b)
    left = -2.0 * a - log_apb
    middle = -2.0 * b + math.log(2.0) + log_g(2.0 * (a - b))
    right = -2.0 * b - log_apb
    return jnp.stack([left, middle, right], axis=-1)


def _truncated_exponential_fraction(kappa: Array, u: Array) -> Array:
    """t in [0, 1] with density proportional to exp(-kappa t) (kappa >= 0), by inverse CDF of u."""
    positive = kappa > 0
    k = jnp.where(positive, kappa, 1.0)
    return jnp.where(positive, -jnp.log1p(u * jnp.expm1(-k)) / k, u)


class LaplaceProduct(ExponentialFamily):
    """x in R^d, T_i = (-|x_i - 1|, -|x_i + 1|), A = sum_i log Z(a_i, b_i).

    eta = (a_1..a_d, b_1..b_d) (``flatten`` concatenates per statistic) and
    Z(a, b) = (e^{-2a} + e^{-2b})/(a + b) + (e^{-2b} - e^{-2a})/(a - b), finite iff a + b > 0;
    a or b alone may be negative. Evaluated in log space and smooth across a = b.
    """

    name = "LaplaceProduct"
    identity_attributes = ("dim",)
    support = constraints.real_vector
    has_closed_form = True
    has_exact_sampler = True
    breakpoints = (-1.0, 1.0)

    def __init__(self, dim: int = 1):
        if int(dim) != dim or dim < 1:
            raise ValueError(f"LaplaceProduct: dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.event_shape = (self.dim,)
        d = self.dim
        self.natural_constraint = NaturalDomain(
            lambda eta: jnp.all(eta[..., :d] + eta[..., d:] > 0, axis=-1),
            "eta[neg_abs_xm1][i] + eta[neg_abs_xp1][i] > 0 for every coordinate i",
            np.ones(2 * d),
        )

    def __repr__(self) -> str:
        return f"LaplaceProduct(dim={self.dim})"

    def statistics(self, x: Array) -> dict[str, Array]:
        """T(x) = {-|x - 1|, -|x + 1|} per coordinate."""
        x = jnp.asarray(x)
        return {"neg_abs_xm1": -jnp.abs(x - 1.0), "neg_abs_xp1": -jnp.abs(x + 1.0)}

    def natural_from_ab(self, a: Array, b: Array) -> Array:
        """eta = concat(a, b) for a, b of shape ``batch + (d,)`` or scalars; ``batch + (2 d,)``."""
        a, b = jnp.asarray(a), jnp.asarray(b)
        shape = jnp.broadcast_shapes(a.shape, b.shape, (self.dim,))
        return jnp.concatenate([jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape)], axis=-1)

    def ab_from_natural(self, eta: Array) -> tuple[Array, Array]:
        """(a, b) = (eta[:d], eta[d:]), each ``batch + (d,)``."""
        eta = self.check_eta(eta)
        return eta[..., : self.dim], eta[..., self.dim:]

    def closed_form_log_partition(self, eta: Array) -> Array:
        """A(eta) = sum_i log Z(a_i, b_i)."""
        a, b = eta[: self.dim], eta[self.dim:]
        return jnp.sum(logsumexp(_piece_log_masses(a, b), axis=-1))

    @jit_sampler
    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """Per coordinate: pick a piece by its mass, then invert its CDF.

        Returns draws of shape ``sample_shape + batch + (d,)``.
        """
        a, b = self.ab_from_natural(eta)
        shape = tuple(sample_shape) + a.shape
        a, b = jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape)
        u = uniform_open_closed(key, shape + (3,), a.dtype)
        # the piece, by inverse CDF of its probabilities (left, middle, right)
        prob = jax.nn.softmax(_piece_log_masses(a, b), axis=-1)
        piece = (u[..., 0] > prob[..., 0]).astype(jnp.int32) + (
            u[..., 0] > prob[..., 0] + prob[..., 1])
        # tails: |x| - 1 ~ Exponential(a + b)
        excess = -jnp.log(u[..., 1]) / (a + b)
        # middle: density proportional to exp((a - b) x) on [-1, 1]; 2 t is the distance from
        # the end towards which the density increases.
        c = a - b
        t = _truncated_exponential_fraction(2.0 * jnp.abs(c), u[..., 2])
        middle = jnp.where(c > 0, 1.0 - 2.0 * t, -1.0 + 2.0 * t)
        return jnp.select([piece == 0, piece == 1], [-1.0 - excess, middle], 1.0 + excess)

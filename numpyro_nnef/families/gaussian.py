"""Gaussian families: univariate T = (x, x^2); multivariate T = (x, x_i x_j for i <= j)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.linalg import cho_solve, solve_triangular
from numpyro.distributions import constraints
from numpyro.distributions.util import cholesky_of_inverse

from ..family import Array, ExponentialFamily, NaturalDomain
from ._special import jit_sampler


class Gaussian(ExponentialFamily):
    """Normal(m, s^2): T = (x, x^2), A = -eta1^2/(4 eta2) + log(pi/-eta2)/2.

    eta = (m/s^2, -1/(2 s^2)).
    """

    name = "Gaussian"
    identity_attributes = ()
    event_shape = ()
    support = constraints.real
    natural_constraint = NaturalDomain(
        lambda eta: eta[..., 1] < 0, "eta[x2] < 0", np.array([0.0, -0.5])
    )
    has_closed_form = True
    has_exact_sampler = True

    def statistics(self, x: Array) -> dict[str, Array]:
        """T(x) = {x, x^2}."""
        x = jnp.asarray(x)
        return {"x": x, "x2": x * x}

    def closed_form_log_partition(self, eta: Array) -> Array:
        """A(eta) = -eta1^2 / (4 eta2) + 0.5 log(pi / -eta2)."""
        e1, e2 = eta[0], eta[1]
        return -e1 * e1 / (4.0 * e2) + 0.5 * jnp.log(math.pi / -e2)

    def closed_form_natural_from_mean(self, mu: Array) -> Array:
        """(E x, E x^2) -> eta = (m / v, -1 / (2 v)) with v = E x^2 - (E x)^2."""
        m, v = mu[0], mu[1] - mu[0] ** 2
        return jnp.stack([m / v, -0.5 / v])

    def natural_from_loc_scale(self, loc: Array, scale: Array) -> Array:
        """eta = (loc / scale^2, -1 / (2 scale^2)), shape ``batch + (2,)``."""
        loc, var = jnp.broadcast_arrays(jnp.asarray(loc), jnp.square(scale))
        return jnp.stack([loc / var, -0.5 / var], axis=-1)

    def loc_scale_from_natural(self, eta: Array) -> tuple[Array, Array]:
        """(loc, scale) = (-eta1 / (2 eta2), sqrt(-1 / (2 eta2)))."""
        eta = self.check_eta(eta)
        var = -0.5 / eta[..., 1]
        return eta[..., 0] * var, jnp.sqrt(var)

    def to_numpyro(self, eta: Array, *, validate_args: bool | None = None) -> dist.Distribution:
        """numpyro Normal(loc, scale) with batch shape ``eta.shape[:-1]``."""
        loc, scale = self.loc_scale_from_natural(eta)
        return dist.Normal(loc, scale, validate_args=validate_args)

    @jit_sampler
    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """x ~ Normal(loc, scale); shape ``sample_shape + batch``."""
        loc, scale = self.loc_scale_from_natural(eta)
        return dist.Normal(loc, scale).sample(key, tuple(sample_shape))


class MultivariateNormal(ExponentialFamily):
    """N(m, Lambda^{-1}) on R^d: T = (x, x_i x_j for i <= j).

    A = h.Lambda^{-1} h / 2 - log det(Lambda) / 2 + d log(2 pi) / 2 with
    eta = (h, eta_xx) with h = Lambda m, eta_xx[i, i] = -Lambda_ii / 2 and
    eta_xx[i < j] = -Lambda_ij; the pairs (i, j) follow ``jnp.triu_indices(d)`` (row-major).
    """

    name = "MultivariateNormal"
    identity_attributes = ("dim",)
    support = constraints.real_vector
    has_closed_form = True
    has_exact_sampler = True

    def __init__(self, dim: int = 2):
        if int(dim) != dim or dim < 1:
            raise ValueError(f"MultivariateNormal: dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.event_shape = (self.dim,)
        self._rows, self._cols = (np.asarray(i) for i in np.triu_indices(self.dim))
        feasible = np.concatenate(
            [np.zeros(self.dim), np.where(self._rows == self._cols, -0.5, 0.0)]
        )
        self.natural_constraint = NaturalDomain(
            self._precision_is_positive_definite,
            "precision matrix Lambda (Lambda_ii = -2 eta_xx[i,i], Lambda_ij = -eta_xx[i,j]) "
            "positive definite",
            feasible,
        )

    def __repr__(self) -> str:
        return f"MultivariateNormal(dim={self.dim})"

    def statistics(self, x: Array) -> dict[str, Array]:
        """T(x) = {x, x_i x_j (i <= j)}."""
        x = jnp.asarray(x)
        return {"x": x, "xx": x[..., self._rows] * x[..., self._cols]}

    # ------------------------------------------------------------------ conversions
    def _symmetric_from_upper(self, upper: Array, diagonal_scale: float) -> Array:
        """Symmetric S with S_ij = S_ji = upper_ij (i < j) and S_ii = diagonal_scale * upper_ii."""
        batch = upper.shape[:-1]
        m = jnp.zeros(batch + (self.dim, self.dim), upper.dtype)
        m = m.at[..., self._rows, self._cols].set(upper)
        full = m + jnp.swapaxes(m, -1, -2)
        eye = jnp.eye(self.dim, dtype=bool)
        return jnp.where(eye, full * (0.5 * diagonal_scale), full)

    def _upper_from_symmetric(self, sym: Array, diagonal_scale: float) -> Array:
        upper = sym[..., self._rows, self._cols]
        return jnp.where(jnp.asarray(self._rows == self._cols), upper * diagonal_scale, upper)

    def precision_from_natural(self, eta: Array) -> Array:
        """Lambda with Lambda_ii = -2 eta_xx[i,i], Lambda_ij = -eta_xx[i,j]; ``batch + (d, d)``."""
        eta = self.check_eta(eta)
        return self._symmetric_from_upper(-eta[..., self.dim:], 2.0)

    def natural_from_loc_precision(self, loc: Array, precision: Array) -> Array:
        """eta = (Lambda m, upper(-Lambda) with the diagonal halved)."""
        loc, precision = jnp.asarray(loc), jnp.asarray(precision)
        batch = jnp.broadcast_shapes(loc.shape[:-1], precision.shape[:-2])
        loc = jnp.broadcast_to(loc, batch + (self.dim,))
        precision = jnp.broadcast_to(precision, batch + (self.dim, self.dim))
        h = jnp.einsum("...ij,...j->...i", precision, loc)
        return jnp.concatenate([h, self._upper_from_symmetric(-precision, 0.5)], axis=-1)

    def natural_from_loc_covariance(self, loc: Array, covariance: Array) -> Array:
        """eta from (m, Sigma) with Lambda = Sigma^{-1}."""
        covariance = jnp.asarray(covariance)
        return self.natural_from_loc_precision(loc, jnp.linalg.inv(covariance))

    def loc_precision_from_natural(self, eta: Array) -> tuple[Array, Array]:
        """(m, Lambda) with m = Lambda^{-1} h."""
        precision = self.precision_from_natural(eta)
        h = jnp.asarray(eta)[..., : self.dim]
        loc = jnp.linalg.solve(precision, h[..., None])[..., 0]
        return loc, precision

    def loc_covariance_from_natural(self, eta: Array) -> tuple[Array, Array]:
        """(m, Sigma) with Sigma = Lambda^{-1}, m = Sigma h."""
        precision = self.precision_from_natural(eta)
        covariance = jnp.linalg.inv(precision)
        covariance = 0.5 * (covariance + jnp.swapaxes(covariance, -1, -2))
        h = jnp.asarray(eta)[..., : self.dim]
        return jnp.einsum("...ij,...j->...i", covariance, h), covariance

    def _precision_is_positive_definite(self, eta: Array) -> Array:
        precision = self._symmetric_from_upper(-eta[..., self.dim:], 2.0)
        return jnp.linalg.eigvalsh(precision)[..., 0] > 0

    # ------------------------------------------------------------------ closed forms
    def closed_form_log_partition(self, eta: Array) -> Array:
        """A(eta) = 0.5 h.Lambda^{-1} h - 0.5 log det Lambda + (d/2) log(2 pi)."""
        precision = self.precision_from_natural(eta)
        chol = jnp.linalg.cholesky(precision)
        v = solve_triangular(chol, eta[: self.dim], lower=True)
        return (
            0.5 * jnp.dot(v, v)
            - jnp.sum(jnp.log(jnp.diagonal(chol)))
            + 0.5 * self.dim * math.log(2.0 * math.pi)
        )

    def closed_form_natural_from_mean(self, mu: Array) -> Array:
        """(E x, E x_i x_j) -> Sigma = E xx^T - m m^T, Lambda = Sigma^{-1}, h = Lambda m."""
        m = mu[: self.dim]
        second = self._symmetric_from_upper(mu[self.dim:], 1.0)
        covariance = second - jnp.outer(m, m)
        chol = jnp.linalg.cholesky(covariance)
        precision = cho_solve((chol, True), jnp.eye(self.dim, dtype=mu.dtype))
        precision = 0.5 * (precision + precision.T)
        return self.natural_from_loc_precision(m, precision)

    def to_numpyro(self, eta: Array, *, validate_args: bool | None = None) -> dist.Distribution:
        """numpyro MultivariateNormal(m, Sigma = Lambda^{-1}), batch ``eta.shape[:-1]``.

        Given by ``scale_tril`` (the Cholesky factor of Sigma), computed in one compiled program.
        """
        loc, scale_tril = _mvn_loc_scale_tril(self, self.check_eta(eta))
        return dist.MultivariateNormal(loc, scale_tril=scale_tril, validate_args=validate_args)

    @jit_sampler
    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """x ~ MultivariateNormal(m, precision_matrix=Lambda); ``sample_shape + batch + (d,)``."""
        loc, precision = self.loc_precision_from_natural(eta)
        return dist.MultivariateNormal(loc, precision_matrix=precision).sample(
            key, tuple(sample_shape)
        )


@functools.partial(jax.jit, static_argnums=0)
def _mvn_loc_scale_tril(family: MultivariateNormal, eta: Array) -> tuple[Array, Array]:
    """(m, chol(Lambda^{-1})) from eta, compiled once per family and shape."""
    precision = family.precision_from_natural(eta)
    loc = cho_solve((jnp.linalg.cholesky(precision), True), eta[..., : family.dim, None])
    return loc[..., 0], cholesky_of_inverse(precision)

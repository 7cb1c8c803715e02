"""The exact oracle: closed-form A(eta) of a named family; E[T] = grad A, Cov[T] = Hessian A."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..family import Array, ExponentialFamily
from .base import Oracle


class ExactOracle(Oracle):
    """Oracle of a named family: A(eta) = family.closed_form_log_partition(eta)."""

    def __init__(self, family: ExponentialFamily):
        super().__init__(family)
        if not getattr(family, "has_closed_form", False):
            raise TypeError(
                f"ExactOracle needs a family with a closed-form log-partition; {family.name!r} "
                f"has none (has_closed_form is False). Use QuadratureOracle({family.name}) for "
                f"low-dimensional x, or a trained oracle."
            )
        # Compiled once per oracle: eager calls (and their autodiff) then dispatch one program.
        self._log_partition = jax.jit(family.closed_form_log_partition)
        # a closed-form mean (where the family has one) compiles to a much smaller program
        # than the gradient of A
        mean = getattr(family, "closed_form_mean", None)
        self._mean = None if mean is None else jax.jit(mean)
        covariance = getattr(family, "closed_form_covariance", None)
        self._covariance = None if covariance is None else jax.jit(covariance)
        joint = getattr(family, "closed_form_mean_and_log_partition", None)
        self._joint = None if joint is None else jax.jit(joint)
        closed = getattr(family, "closed_form_natural_from_mean", None)
        self._natural_from_mean = None if closed is None else jax.jit(closed)

    def log_partition_single(self, eta: Array) -> Array:
        """A(eta) in closed form for one flat eta."""
        return self._log_partition(eta)

    def mean_single(self, eta: Array) -> Array:
        """E[T] = grad A(eta), in closed form when the family has one."""
        return super().mean_single(eta) if self._mean is None else self._mean(eta)

    def covariance_single(self, eta: Array) -> Array:
        """Cov[T] = Hessian A(eta), in closed form when the family has one."""
        return super().covariance_single(eta) if self._covariance is None else self._covariance(eta)

    def mean_and_log_partition_single(self, eta: Array) -> tuple[Array, Array]:
        """(E[T], A(eta)), from one closed-form computation when the family has one."""
        if self._joint is None:
            return super().mean_and_log_partition_single(eta)
        return self._joint(eta)

    def natural_from_mean_single(self, mu: Array, init: Array, max_steps: int = 100,
                                 tol: float = 1e-9) -> tuple[Array, Array]:
        """(eta(mu), converged): in closed form when the family has one, else damped Newton."""
        if self._natural_from_mean is not None:
            return self._natural_from_mean(mu), jnp.asarray(True)
        return super().natural_from_mean_single(mu, init, max_steps, tol)

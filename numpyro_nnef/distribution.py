"""EFDistribution: an exponential family with natural parameter eta as a numpyro Distribution.

log p(x | eta) = eta . T(x) + log h(x) - A(eta), with A(eta) from an expectation oracle.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from numpyro.distributions import Distribution, constraints
from numpyro.distributions.util import validate_sample

from .family import Array, ExponentialFamily


class EFDistribution(Distribution):
    """p(x | eta) = h(x) exp(eta . T(x) - A(eta)) for any :class:`ExponentialFamily`.

    Args:
      family: the exponential family.
      eta: natural parameters, shape ``batch_shape + (family.stat_dim,)``.
      oracle: supplies A(eta) (``log_partition``) and E[T] (``mean``). Defaults to the
        family's ``ExactOracle`` when it has a closed form; otherwise it must be given.
      sampler: optional learned sampler with ``sample(key, eta, sample_shape)``; without it,
        families with an exact sampler use it and the others are sampled by NUTS.
      unnormalized: if True, ``log_prob`` returns eta . T(x) + log h(x) without -A(eta), which
        needs no oracle. Only correct where eta is fixed (e.g. a factor with a constant eta).
      num_warmup: NUTS warm-up steps when sampling falls back to NUTS.
    """

    pytree_data_fields = ("eta",)
    pytree_aux_fields = ("family", "oracle", "sampler", "unnormalized", "num_warmup")

    def __init__(
        self,
        family: ExponentialFamily,
        eta: Array,
        oracle: Any = None,
        *,
        sampler: Any = None,
        unnormalized: bool = False,
        num_warmup: int = 300,
        validate_args: bool | None = None,
    ):
        if not isinstance(family, ExponentialFamily):
            raise TypeError(f"family must be an ExponentialFamily, got {type(family).__name__}")
        eta = family.check_eta(eta)
        if oracle is None and not unnormalized and family.has_closed_form:
            from .oracles.exact import ExactOracle

            oracle = ExactOracle(family)
        oracle_family = getattr(oracle, "family", family)
        if (oracle_family.name, oracle_family.stat_labels) != (family.name, family.stat_labels):
            raise ValueError(
                f"the oracle is for family {oracle_family.name!r} with statistics "
                f"{oracle_family.stat_labels}, not {family.name!r} with {family.stat_labels}"
            )
        self.family = family
        self.eta = eta
        self.oracle = oracle
        self.sampler = sampler
        self.unnormalized = unnormalized
        self.num_warmup = num_warmup
        super().__init__(eta.shape[:-1], family.event_shape, validate_args=validate_args)

    # eta's natural domain depends on the family: validate_args below checks it.
    arg_constraints = {"eta": constraints.real_vector}

    @property
    def support(self) -> constraints.Constraint:
        return self.family.support

    def validate_args(self, strict: bool = True) -> None:
        """Raise OutOfDomainError naming the domain when eta is outside the natural domain."""
        with jax.ensure_compile_time_eval():
            self.family.validate_natural(self.eta)

    # ---------------------------------------------------------------- density
    @validate_sample
    def log_prob(self, value: Array) -> Array:
        """eta . T(x) + log h(x) - A(eta)."""
        log_unnormalized = self.family.unnormalized_log_prob(self.eta, value)
        if self.unnormalized:
            return log_unnormalized
        return log_unnormalized - self._require_oracle("log_prob").log_partition(self.eta)

    def log_partition(self) -> Array:
        """A(eta), shape ``batch_shape``."""
        return self._require_oracle("log_partition").log_partition(self.eta)

    @property
    def mean(self) -> Array:
        """E[T(x) | eta] (the mean of the sufficient statistics), ``batch_shape + (stat_dim,)``."""
        return self._require_oracle("mean").mean(self.eta)

    @property
    def variance(self) -> Array:
        """Var[T(x) | eta] per statistic: the diagonal of Cov[T], ``batch + (stat_dim,)``."""
        return jnp.diagonal(self.covariance, axis1=-2, axis2=-1)

    @property
    def covariance(self) -> Array:
        """Cov[T(x) | eta] = Hessian A(eta), ``batch_shape + (stat_dim, stat_dim)``."""
        return self._require_oracle("covariance").covariance(self.eta)

    def mean_statistics(self) -> dict[str, Array]:
        """E[T(x) | eta] as named statistics."""
        return self.family.unflatten(self.mean)

    # ---------------------------------------------------------------- sampling
    def sample(self, key: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """Draws of shape ``sample_shape + batch_shape + event_shape``."""
        sample_shape = tuple(sample_shape)
        if self.sampler is not None:
            return self.sampler.sample(key, self.eta, sample_shape)
        if self.family.has_exact_sampler:
            return self.family.sample_exact(key, self.eta, sample_shape)
        from .sampling import sample_family

        return sample_family(
            self.family, self.eta, key=key, sample_shape=sample_shape, num_warmup=self.num_warmup
        )

    # ---------------------------------------------------------------- shapes
    def expand(self, batch_shape) -> EFDistribution:
        batch_shape = tuple(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        eta = jnp.broadcast_to(self.eta, batch_shape + (self.family.stat_dim,))
        return self._with_eta(eta)

    def _with_eta(self, eta: Array) -> EFDistribution:
        return EFDistribution(
            self.family, eta, self.oracle, sampler=self.sampler, unnormalized=self.unnormalized,
            num_warmup=self.num_warmup, validate_args=self._validate_args,
        )

    def _require_oracle(self, what: str):
        if self.oracle is None:
            raise ValueError(
                f"EFDistribution({self.family.name}).{what} needs an oracle for A(eta): pass "
                f"oracle=QuadratureOracle(family) (scalar x) or a trained oracle, or "
                f"unnormalized=True to use eta . T(x) + log h(x) without A(eta)"
            )
        return self.oracle

    def __repr__(self) -> str:
        return (
            f"EFDistribution(family={self.family.name}, batch_shape={self.batch_shape}, "
            f"event_shape={self.event_shape})"
        )


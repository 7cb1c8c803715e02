"""Discrete families: Categorical (T = one_hot x), Bernoulli (T = x) and Poisson (T = x).

Their supports are integer sets, so only the closed forms apply: ``ExactOracle`` and the exact
samplers. Quadrature and NUTS need a continuous x and refuse these families.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import gammaln, logit, logsumexp
from numpyro.distributions import constraints

from ..family import Array, ExponentialFamily, whole_space
from ._special import jit_sampler


def _as_float(x: Array) -> Array:
    """x as a floating array (integer draws become float, of the default float dtype)."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


class Categorical(ExponentialFamily):
    """Categorical on {0, ..., K-1}: T = one_hot(x, K), A(eta) = logsumexp(eta), eta = logits.

    Any finite eta is allowed. Over-parametrised: eta and eta + c (1, ..., 1) give the same
    distribution, so Cov[T] (the Hessian of A) is singular along (1, ..., 1) and mu -> eta has
    no unique answer.
    ``closed_form_natural_from_mean`` returns the representative log(mu) (the one with A = 0);
    Newton is never used for this family.
    """

    name = "Categorical"
    identity_attributes = ("num_categories",)
    event_shape = ()
    has_closed_form = True
    has_exact_sampler = True

    def __init__(self, num_categories: int = 3):
        if int(num_categories) != num_categories or num_categories < 2:
            raise ValueError(
                f"Categorical: num_categories must be an integer >= 2, got {num_categories!r}"
            )
        self.num_categories = int(num_categories)
        self.support = constraints.integer_interval(0, self.num_categories - 1)
        self.natural_constraint = whole_space(self.num_categories)

    def __repr__(self) -> str:
        return f"Categorical(num_categories={self.num_categories})"

    def statistics(self, x: Array) -> dict[str, Array]:
        """T(x) = {one_hot(x, K)} (shape (K,))."""
        x = jnp.asarray(x)
        categories = jnp.arange(self.num_categories, dtype=x.dtype)
        return {"one_hot": (x[..., None] == categories).astype(_as_float(x).dtype)}

    def closed_form_log_partition(self, eta: Array) -> Array:
        """A(eta) = logsumexp(eta)."""
        return logsumexp(eta)

    def closed_form_natural_from_mean(self, mu: Array) -> Array:
        """mu = probs -> eta = log(mu), the representative with A(eta) = 0 when sum(mu) = 1.

        Any eta + c (1, ..., 1) has the same mean; a mu with a zero entry has no finite eta.
        """
        return jnp.log(mu)

    def natural_from_probs(self, probs: Array) -> Array:
        """eta = log(probs), shape ``batch + (K,)``."""
        return jnp.log(jnp.asarray(probs))

    def probs_from_natural(self, eta: Array) -> Array:
        """probs = softmax(eta), shape ``batch + (K,)``."""
        return jax.nn.softmax(self.check_eta(eta), axis=-1)

    def to_numpyro(self, eta: Array, *, validate_args: bool | None = None) -> dist.Distribution:
        """numpyro Categorical(logits = eta) with batch shape ``eta.shape[:-1]``."""
        return dist.CategoricalLogits(self.check_eta(eta), validate_args=validate_args)

    @jit_sampler
    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """x ~ Categorical(logits = eta), integers; shape ``sample_shape + batch``."""
        return dist.CategoricalLogits(self.check_eta(eta)).sample(key, tuple(sample_shape))


class Bernoulli(ExponentialFamily):
    """Bernoulli(p) on {0, 1}: T = x, A(eta) = softplus(eta) = log(1 + e^eta), eta = logit(p)."""

    name = "Bernoulli"
    identity_attributes = ()
    event_shape = ()
    support = constraints.boolean
    natural_constraint = whole_space(1)
    has_closed_form = True
    has_exact_sampler = True

    def statistics(self, x: Array) -> dict[str, Array]:
        """T(x) = {x}."""
        return {"x": _as_float(x)}

    def closed_form_log_partition(self, eta: Array) -> Array:
        """A(eta) = softplus(eta)."""
        return jax.nn.softplus(eta[0])

    def closed_form_natural_from_mean(self, mu: Array) -> Array:
        """mu = p -> eta = logit(p)."""
        return logit(mu)

    def natural_from_probs(self, probs: Array) -> Array:
        """eta = logit(p), shape ``batch + (1,)``."""
        return logit(jnp.asarray(probs))[..., None]

    def probs_from_natural(self, eta: Array) -> Array:
        """p = sigmoid(eta), shape ``batch``."""
        return jax.nn.sigmoid(self.check_eta(eta)[..., 0])

    def to_numpyro(self, eta: Array, *, validate_args: bool | None = None) -> dist.Distribution:
        """numpyro Bernoulli(logits = eta) with batch shape ``eta.shape[:-1]``."""
        return dist.BernoulliLogits(self.check_eta(eta)[..., 0], validate_args=validate_args)

    @jit_sampler
    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """x ~ Bernoulli(logits = eta), integers 0/1; shape ``sample_shape + batch``."""
        return dist.BernoulliLogits(self.check_eta(eta)[..., 0]).sample(key, tuple(sample_shape))


class Poisson(ExponentialFamily):
    """Poisson(rate) on {0, 1, 2, ...}: T = x, h(x) = 1/x!, A(eta) = exp(eta), eta = log(rate)."""

    name = "Poisson"
    identity_attributes = ()
    event_shape = ()
    support = constraints.nonnegative_integer
    natural_constraint = whole_space(1)
    has_closed_form = True
    has_exact_sampler = True

    def statistics(self, x: Array) -> dict[str, Array]:
        """T(x) = {x}."""
        return {"x": _as_float(x)}

    def log_base_measure(self, x: Array) -> Array:
        """log h(x) = -lgamma(x + 1)."""
        return -gammaln(_as_float(x) + 1.0)

    def closed_form_log_partition(self, eta: Array) -> Array:
        """A(eta) = exp(eta)."""
        return jnp.exp(eta[0])

    def closed_form_natural_from_mean(self, mu: Array) -> Array:
        """mu = rate -> eta = log(rate)."""
        return jnp.log(mu)

    def natural_from_rate(self, rate: Array) -> Array:
        """eta = log(rate), shape ``batch + (1,)``."""
        return jnp.log(jnp.asarray(rate))[..., None]

    def rate_from_natural(self, eta: Array) -> Array:
        """rate = exp(eta), shape ``batch``."""
        return jnp.exp(self.check_eta(eta)[..., 0])

    def to_numpyro(self, eta: Array, *, validate_args: bool | None = None) -> dist.Distribution:
        """numpyro Poisson(rate = exp(eta)) with batch shape ``eta.shape[:-1]``."""
        return dist.Poisson(self.rate_from_natural(eta), validate_args=validate_args)

    @jit_sampler
    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """x ~ Poisson(exp(eta)), integers; shape ``sample_shape + batch``."""
        return dist.Poisson(self.rate_from_natural(eta)).sample(key, tuple(sample_shape))

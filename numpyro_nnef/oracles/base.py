"""The oracle protocol: eta -> E[T], Cov[T], A(eta) and the inverse map mu -> eta.

Every oracle works on one flat eta (``*_single`` methods) and the public methods map over any
batch shape. Defaults follow the mathematics: mean = grad A, covariance = Hessian A = d mean/d eta,
and the inverse minimises the convex A(eta) - eta . mu by damped Newton steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..family import Array, ExponentialFamily


def map_over_batch(fn, x: Array, event_ndim: int = 1) -> Array:
    """Apply ``fn`` (defined on one event of ``event_ndim`` dims) over all leading dimensions."""
    x = jnp.asarray(x)
    batch = x.shape[: x.ndim - event_ndim]
    flat = x.reshape((-1,) + x.shape[x.ndim - event_ndim:])
    out = jax.vmap(fn)(flat)
    return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), out)


class Oracle:
    """Base class of expectation oracles for one exponential family.

    Subclasses implement ``log_partition_single`` and may override ``mean_single`` and
    ``covariance_single`` with something cheaper or more accurate than autodiff.
    """

    def __init__(self, family: ExponentialFamily):
        if not isinstance(family, ExponentialFamily):
            raise TypeError(f"an oracle needs an ExponentialFamily, got {type(family).__name__}")
        self.family = family

    # ---------------------------------------------------------------- per eta
    def log_partition_single(self, eta: Array) -> Array:
        raise NotImplementedError(f"{type(self).__name__} does not provide log_partition")

    def mean_single(self, eta: Array) -> Array:
        return jax.grad(self.log_partition_single)(eta)

    def covariance_single(self, eta: Array) -> Array:
        return jax.jacfwd(self.mean_single)(eta)

    # ---------------------------------------------------------------- batched
    def log_partition(self, eta: Array) -> Array:
        """A(eta) = log int h(x) exp(eta . T(x)) dx; shape ``batch``."""
        return map_over_batch(self.log_partition_single, self._eta(eta))

    def mean(self, eta: Array) -> Array:
        """E[T(x) | eta] = grad A(eta); shape ``batch + (stat_dim,)``."""
        return map_over_batch(self.mean_single, self._eta(eta))

    def covariance(self, eta: Array) -> Array:
        """Cov[T(x) | eta] = Hessian A(eta); shape ``batch + (stat_dim, stat_dim)``."""
        return map_over_batch(self.covariance_single, self._eta(eta))

    def natural_from_mean(self, mu: Array, *, init: Array | None = None,
                          max_steps: int = 100, tol: float = 1e-9) -> Array:
        """eta with E[T | eta] = mu: argmin over the natural domain of A(eta) - eta . mu."""
        mu = self.family._check_eta(mu)
        if init is None:
            init = self.default_init()
        init = jnp.broadcast_to(jnp.asarray(init, mu.dtype), mu.shape)
        pair = jnp.stack([mu, init], axis=-2)
        return map_over_batch(
            lambda p: self.natural_from_mean_single(p[0], p[1], max_steps, tol), pair, 2
        )

    def natural_from_mean_single(self, mu: Array, init: Array, max_steps: int = 100,
                                 tol: float = 1e-9) -> Array:
        return newton_natural_from_mean(self, mu, init, max_steps, tol)

    def default_init(self) -> Array:
        domain = self.family.natural_constraint
        if domain is None:
            return jnp.zeros(self.family.stat_dim)
        return jnp.asarray(domain.feasible)

    def _eta(self, eta: Array) -> Array:
        return self.family._check_eta(eta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.family.name})"


def newton_natural_from_mean(oracle: Oracle, mu: Array, init: Array, max_steps: int,
                             tol: float) -> Array:
    """Damped Newton on f(eta) = A(eta) - eta . mu with Cov[T] as Hessian.

    Backtracking halves the step until the new eta is inside the natural domain and f does not
    increase, so every iterate stays in the domain.
    """
    family = oracle.family
    dim = family.stat_dim

    def objective(eta):
        return oracle.log_partition_single(eta) - jnp.dot(eta, mu)

    def inside(eta):
        return family.in_domain(eta[None])[0] & jnp.isfinite(objective(eta))

    def step(carry):
        eta, value, _, i = carry
        grad = oracle.mean_single(eta) - mu
        hess = oracle.covariance_single(eta)
        scale = jnp.maximum(jnp.trace(hess) / dim, 1e-12)
        direction = jnp.linalg.solve(hess + 1e-10 * scale * jnp.eye(dim), grad)

        def shrink(state):
            t, _ = state
            return t * 0.5, objective(eta - t * 0.5 * direction)

        def keep_shrinking(state):
            t, new_value = state
            candidate = eta - t * direction
            ok = inside(candidate) & (new_value <= value + 1e-12 * jnp.abs(value))
            return (~ok) & (t > 1e-10)

        t, new_value = jax.lax.while_loop(
            keep_shrinking, shrink, (jnp.asarray(1.0, eta.dtype), objective(eta - direction))
        )
        new_eta = eta - t * direction
        accepted = inside(new_eta) & jnp.isfinite(new_value)
        new_eta = jnp.where(accepted, new_eta, eta)
        new_value = jnp.where(accepted, new_value, value)
        gnorm = jnp.max(jnp.abs(grad))
        return new_eta, new_value, jnp.where(accepted, gnorm, 0.0), i + 1

    threshold = tol + 100 * jnp.finfo(mu.dtype).eps * (1.0 + jnp.max(jnp.abs(mu)))

    def not_done(carry):
        _, _, gnorm, i = carry
        return (gnorm > threshold) & (i < max_steps)

    init = jnp.asarray(init, mu.dtype)
    carry = (init, objective(init), jnp.asarray(jnp.inf, mu.dtype), 0)
    eta, *_ = jax.lax.while_loop(not_done, step, carry)
    return eta

"""The oracle protocol: eta -> E[T], Cov[T], A(eta) and the inverse map mu -> eta.

Every oracle works on one flat eta (``*_single`` methods) and the public methods map over any
batch shape. Defaults follow the mathematics: mean = grad A, covariance = Hessian A = d mean/d eta,
and the inverse minimises the convex A(eta) - eta . mu by damped Newton steps.
"""

from __future__ import annotations

import warnings
from functools import partial

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

    def mean_and_log_partition_single(self, eta: Array) -> tuple[Array, Array]:
        """(E[T | eta], A(eta)); oracles that compute both together override it."""
        return self.mean_single(eta), self.log_partition_single(eta)

    # ---------------------------------------------------------------- batched
    def log_partition(self, eta: Array) -> Array:
        """A(eta) = log int h(x) exp(eta . T(x)) dx; shape ``batch``."""
        return self._batched("log_partition_single", eta)

    def mean(self, eta: Array) -> Array:
        """E[T(x) | eta] = grad A(eta); shape ``batch + (stat_dim,)``."""
        return self._batched("mean_single", eta)

    def mean_and_log_partition(self, eta: Array) -> tuple[Array, Array]:
        """(E[T | eta], A(eta)) in one call (CAVI needs both for every updated factor)."""
        return self._batched("mean_and_log_partition_single", eta)

    def covariance(self, eta: Array) -> Array:
        """Cov[T(x) | eta] = Hessian A(eta); shape ``batch + (stat_dim, stat_dim)``."""
        return self._batched("covariance_single", eta)

    def _batched(self, method: str, eta: Array) -> Array:
        """Map ``method`` over the batch of eta, compiled once per oracle, method and shape."""
        compiled = self.__dict__.setdefault("_compiled", {})
        if method not in compiled:
            compiled[method] = jax.jit(partial(map_over_batch, getattr(self, method)))
        return compiled[method](self._eta(eta))

    def natural_from_mean(self, mu: Array, *, init: Array | None = None,
                          max_steps: int = 100, tol: float = 1e-9) -> Array:
        """eta with E[T | eta] = mu: argmin over the natural domain of A(eta) - eta . mu.

        Newton starts at ``init``, else at ``family.natural_init_from_mean(mu)`` when the family
        provides a moment-matched guess, else at a fixed feasible point. Outside jit, a warning
        names the points where Newton did not converge.
        """
        mu = self.family.check_eta(mu)
        if init is None:
            guess = getattr(self.family, "natural_init_from_mean", None)
            init = self.default_init() if guess is None else map_over_batch(guess, mu)
        init = jnp.broadcast_to(jnp.asarray(init, mu.dtype), mu.shape)
        pair = jnp.stack([mu, init], axis=-2)
        eta, converged = map_over_batch(
            lambda p: self.natural_from_mean_single(p[0], p[1], max_steps, tol), pair, 2
        )
        if not isinstance(converged, jax.core.Tracer) and not bool(jnp.all(converged)):
            warnings.warn(
                f"{self!r}.natural_from_mean: Newton did not converge for "
                f"{int((~converged).sum())} of {converged.size} mean(s); the closest eta found "
                f"is returned", RuntimeWarning, stacklevel=2,
            )
        return eta

    def natural_from_mean_single(self, mu: Array, init: Array, max_steps: int = 100,
                                 tol: float = 1e-9) -> tuple[Array, Array]:
        """(eta, converged) for one flat mu."""
        return newton_natural_from_mean(self, mu, init, max_steps, tol)

    def default_init(self) -> Array:
        domain = self.family.natural_constraint
        if domain is None:
            return jnp.zeros(self.family.stat_dim)
        return jnp.asarray(domain.feasible)

    def _eta(self, eta: Array) -> Array:
        return self.family.check_eta(eta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.family.name})"


def newton_natural_from_mean(oracle: Oracle, mu: Array, init: Array, max_steps: int,
                             tol: float, log_partition=None) -> tuple[Array, Array]:
    """Damped Newton on f(eta) = A(eta) - eta . mu with Cov[T] as Hessian; (eta, converged).

    Backtracking halves the step until the new eta is inside the natural domain and f does not
    increase, so every iterate stays in the domain. When the domain cuts a Newton step short, a
    Cauchy (steepest-descent) step is tried as well and the better one is kept.
    ``log_partition`` (default ``oracle.log_partition_single``) may be A up to a constant.
    """
    family = oracle.family
    dim = family.stat_dim
    log_partition = oracle.log_partition_single if log_partition is None else log_partition

    def objective(eta):
        return log_partition(eta) - jnp.dot(eta, mu)

    def inside(eta):
        return family.in_domain(eta[None])[0] & jnp.isfinite(objective(eta))

    def line_search(eta, value, direction):
        def acceptable(t, new_value):
            return inside(eta - t * direction) & (new_value <= value + 1e-12 * jnp.abs(value))

        def shrink(state):
            t, _ = state
            return t * 0.5, objective(eta - t * 0.5 * direction)

        def keep_shrinking(state):
            t, new_value = state
            return ~acceptable(t, new_value) & (t > 1e-10)

        t, new_value = jax.lax.while_loop(
            keep_shrinking, shrink, (jnp.asarray(1.0, eta.dtype), objective(eta - direction))
        )
        ok = acceptable(t, new_value) & jnp.isfinite(new_value)
        return jnp.where(ok, eta - t * direction, eta), jnp.where(ok, new_value, value), t, ok

    def step(carry):
        eta, value, _, i, _ = carry
        grad = oracle.mean_single(eta) - mu
        hess = oracle.covariance_single(eta)
        scale = jnp.maximum(jnp.trace(hess) / dim, 1e-12)
        newton = jnp.linalg.solve(hess + 1e-10 * scale * jnp.eye(dim), grad)
        n_eta, n_value, t, n_ok = line_search(eta, value, newton)
        cauchy = (grad @ grad) / jnp.maximum(grad @ hess @ grad, 1e-300) * grad
        g_eta, g_value, _, g_ok = jax.lax.cond(
            t < 0.25,
            lambda: line_search(eta, value, cauchy),
            lambda: (eta, value, jnp.asarray(0.0, eta.dtype), jnp.asarray(False)),
        )
        use_cauchy = g_ok & (g_value < n_value)
        new_eta = jnp.where(use_cauchy, g_eta, n_eta)
        new_value = jnp.where(use_cauchy, g_value, n_value)
        return new_eta, new_value, jnp.max(jnp.abs(grad)), i + 1, ~(n_ok | g_ok)

    threshold = tol + 100 * jnp.finfo(mu.dtype).eps * (1.0 + jnp.max(jnp.abs(mu)))

    def not_done(carry):
        _, _, gnorm, i, stalled = carry
        return (gnorm > threshold) & (i < max_steps) & ~stalled

    init = jnp.asarray(init, mu.dtype)
    carry = (init, objective(init), jnp.asarray(jnp.inf, mu.dtype), 0, jnp.asarray(False))
    eta, _, _, _, _ = jax.lax.while_loop(not_done, step, carry)
    residual = jnp.max(jnp.abs(oracle.mean_single(eta) - mu))
    converged = residual <= jnp.maximum(threshold, 1e-6 * (1.0 + jnp.max(jnp.abs(mu))))
    return eta, converged

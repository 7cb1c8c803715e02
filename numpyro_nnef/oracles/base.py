"""The oracle protocol: eta -> E[T], Cov[T], A(eta) and the inverse map mu -> eta.

Every oracle works on one flat eta (``*_single`` methods) and the public methods map over any
batch shape. Defaults follow the mathematics: mean = grad A, covariance = Hessian A = d mean/d eta,
and the inverse minimises the convex A(eta) - eta . mu by damped Newton steps.

No silent NaN: the public methods check that eta lies in the natural domain (``in_domain``; for a
family without ``natural_constraint``, that the result is finite, i.e. A(eta) < inf). An eager
call raises :class:`OutOfDomainError` naming the oracle, the domain and the first bad eta. Under a
transformation (jit, vmap, grad) the result is NaN there and a warning names the oracle and the
domain, once per call site: a host callback inside ``lax.cond`` that runs only when some eta is
outside (under vmap the counts are summed first: ``custom_vmap``).
Callers that keep eta inside the domain themselves skip the check in ``trusted_domain()``.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap

from ..family import Array, ExponentialFamily, OutOfDomainError

_CHECK_DOMAIN = contextvars.ContextVar("numpyro_nnef_check_domain", default=True)
# frames of these packages are not a call site (the user's line that called the oracle is)
_INTERNAL_MODULES = ("numpyro_nnef", "numpyro", "jax", "jaxlib", "flax")


@contextlib.contextmanager
def trusted_domain() -> Iterator[None]:
    """Oracle calls made (or traced) inside skip the natural-domain check: for callers that
    keep eta inside the domain themselves, such as CAVI, which replaces an improper candidate's
    eta by a feasible point before it calls the oracle."""
    token = _CHECK_DOMAIN.set(False)
    try:
        yield
    finally:
        _CHECK_DOMAIN.reset(token)


def _call_site() -> tuple[str, int]:
    """(file, line) of the innermost frame outside numpyro(_nnef), JAX and Flax: the line that
    called the oracle (or ran the NumPyro inference that did)."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".", 1)[0] not in _INTERNAL_MODULES:
            return frame.f_code.co_filename, frame.f_lineno
        frame = frame.f_back
    return "<unknown>", 0


def map_over_batch(fn, x: Array, event_ndim: int = 1) -> Array:
    """Apply ``fn`` (defined on one event of ``event_ndim`` dims) over all leading dimensions."""
    x = jnp.asarray(x)
    batch = x.shape[: x.ndim - event_ndim]
    flat = x.reshape((-1,) + x.shape[x.ndim - event_ndim:])
    if flat.shape[0] == 1:  # one event (a scalar site in CAVI): no batching pass to trace
        out = jax.tree.map(lambda o: o[None], fn(flat[0]))
    else:
        out = jax.vmap(fn)(flat)
    return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), out)


def _host_report(report: Callable[[np.ndarray], np.ndarray]) -> Callable[[Array], Array]:
    """``count -> 0`` that calls ``report(count)`` on the host only when count > 0 (a
    ``pure_callback`` in ``lax.cond``); under vmap the counts are summed first, so the condition
    stays unbatched and the host is called at most once per execution."""

    @custom_vmap
    def flag(count: Array) -> Array:
        return jax.lax.cond(
            count > 0,
            lambda: jax.pure_callback(report, jax.ShapeDtypeStruct((), jnp.int32), count),
            lambda: jnp.zeros((), jnp.int32),
        )

    @flag.def_vmap
    def _batched_flag(axis_size: int, in_batched: list[bool], count: Array
                      ) -> tuple[Array, bool]:
        return flag(jnp.sum(count) if in_batched[0] else count), False

    return flag


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

    def _batched(self, method: str, eta: Array, *, check_domain: bool = True,
                 name: str | None = None) -> Any:
        """Map ``method`` over the batch of eta, compiled once per oracle, method and shape;
        with ``check_domain`` (outside ``trusted_domain``) eta outside the natural domain raises
        eagerly and gives NaN and a warning under a transformation (see the module docstring).
        ``name`` is the public method named in messages (default: ``method`` less "_single")."""
        eta = self._eta(eta)
        checked = check_domain and _CHECK_DOMAIN.get()
        compiled = self.__dict__.setdefault("_compiled", {})
        if (method, checked) not in compiled:
            compiled[method, checked] = jax.jit(partial(self._evaluate, method, checked))
        out, inside = compiled[method, checked](eta)
        if not checked:
            return out
        name = name or method.removesuffix("_single")
        if not isinstance(inside, jax.core.Tracer):
            inside = np.asarray(inside)
            if not inside.all():
                raise OutOfDomainError(
                    f"{self!r}.{name}: {int((~inside).sum())} of {inside.size} eta outside the "
                    f"natural domain of {self.family.name} ({self.family.domain_description}); "
                    f"first at {self.family.first_outside(np.asarray(eta), inside)}"
                )
            return out
        report = _host_report(partial(self._warn_outside_domain, name, _call_site()))
        keep = inside & (report(jnp.sum(~inside)) == 0)  # it is 0: this ties it to the result
        return jax.tree.map(
            lambda o: jnp.where(keep.reshape(keep.shape + (1,) * (o.ndim - keep.ndim)), o,
                                jnp.nan), out)

    def _evaluate(self, method: str, checked: bool, eta: Array) -> tuple[Any, Array | None]:
        """(``method`` over the batch, inside the natural domain per eta or None unchecked)."""
        out = map_over_batch(getattr(self, method), eta)
        if not checked:
            return out, None
        inside = self.family.in_domain(eta)
        if self.family.natural_constraint is None:  # the domain is where A(eta) < inf
            for leaf in jax.tree.leaves(out):
                inside = inside & jnp.all(jnp.isfinite(leaf),
                                          axis=tuple(range(inside.ndim, leaf.ndim)))
        return out, inside

    def _warn_outside_domain(self, name: str, site: tuple[str, int], outside: np.ndarray
                             ) -> np.ndarray:
        """Host side of the traced check: warn, once per call site, that ``outside`` eta were
        outside the natural domain; returns 0."""
        count = int(outside)
        reported = self.__dict__.setdefault("_reported_sites", set())
        if count and (name, site) not in reported:
            reported.add((name, site))
            warnings.warn_explicit(
                f"{self!r}.{name}: {count} eta outside the natural domain of "
                f"{self.family.name} ({self.family.domain_description}) under a JAX "
                f"transformation; the result is NaN there (reported once for this call site)",
                RuntimeWarning, site[0], site[1])
        return np.zeros((), np.int32)

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

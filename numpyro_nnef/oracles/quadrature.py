"""Ground-truth oracle by numerical integration over a scalar x.

A(eta) = log int h(x) exp(eta . T(x)) dx. The integral is taken in unconstrained space
u = biject_to(support)^-1(x), where the integrand becomes exp(g(u)) with

    g(u) = eta . T(x(u)) + log h(x(u)) + log |dx/du|,

so endpoint singularities of integrable densities (x^-1/2 at 0, ...) become smooth exponential
tails in u. A circular support is integrated in x itself (periodic, log |dx/du| = 0), on a window
of length 2 pi centred on the mode.

Per eta, everything in JAX with static shapes (jit/vmap-able):

1. Locate: g on a coarse sinh-spaced grid covering u in [-L, L]; keep the hull of the points
   with g > max g - ``log_threshold`` (one grid step of margin), then refine the window a few
   times on uniform grids. These limits carry ``stop_gradient``: the integral does not depend on
   them to working precision.
2. Integrate: composite Gauss-Legendre on panels whose boundaries equidistribute
   (length / window length + |dg| / total variation of g) over the last grid, plus panel
   boundaries at ``family.breakpoints`` (mapped into u) so kinks of T lie on panel edges.

With nodes u_i and log weights log w_i: A = logsumexp(g(u_i) + log w_i); the normalised weights
p_i = softmax(g_i + log w_i) give E[T] = sum p_i T_i and Cov[T] = sum p_i (T_i - E T)(T_i - E T)^T
directly (more accurate than autodiff of A, and still differentiable in eta; since the nodes do
not depend on eta, grad A equals this mean to rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpy.polynomial.legendre import leggauss
from numpyro.distributions import constraints
from numpyro.distributions.transforms import IdentityTransform, biject_to

from ..family import Array, ExponentialFamily
from .base import Oracle, map_over_batch

__all__ = ["QuadratureOracle"]

_TWO_PI = 2.0 * np.pi


def _wrap(x: Array) -> Array:
    """Map angles into [-pi, pi)."""
    return jnp.mod(x + np.pi, _TWO_PI) - np.pi


def _window(u: Array, g: Array, threshold: float) -> tuple[Array, Array, Array, Array]:
    """Indices (lo, hi) of the hull of {g > max g - threshold}, widened by one grid point.

    Returns (lo, hi, gmax, touches_end) where touches_end says the set reaches an end of the grid.
    """
    size = g.shape[0]
    gmax = jnp.max(g)
    above = g > gmax - threshold
    first = jnp.argmax(above)
    last = size - 1 - jnp.argmax(above[::-1])
    any_above = jnp.any(above)
    first = jnp.where(any_above, first, 0)
    last = jnp.where(any_above, last, size - 1)
    touches_end = above[0] | above[-1]
    return jnp.maximum(first - 1, 0), jnp.minimum(last + 1, size - 1), gmax, touches_end


class QuadratureOracle(Oracle):
    """Expectation oracle by adaptive composite Gauss-Legendre quadrature (scalar x only).

    Args:
      family: an ExponentialFamily with ``event_shape == ()``.
      num_panels: Gauss-Legendre panels placed by equidistribution (breakpoints add more).
      nodes_per_panel: Gauss-Legendre nodes per panel.
      coarse_points: size of the first, sinh-spaced search grid.
      refine_points: size of each uniform refinement grid.
      num_refinements: how many times the window is re-located on a uniform grid.
      log_threshold: the window keeps u where g(u) > max g - log_threshold
        (the neglected mass is about exp(-log_threshold) relative to the peak).
      coarse_limit: the search grid covers u in [-coarse_limit, coarse_limit] (700 keeps exp(u)
        finite in float64).
      coarse_scale: grid spacing near u = 0 is about coarse_scale * asinh(L / scale) * 2 /
        coarse_points; points are scale * sinh(t) for uniform t.

    Where the integrand is not negligible at the ends of the search grid (eta outside the natural
    domain, or tails too heavy to integrate to working precision), log_partition is +inf and the
    moments are NaN.
    """

    def __init__(
        self,
        family: ExponentialFamily,
        *,
        num_panels: int = 16,
        nodes_per_panel: int = 12,
        coarse_points: int = 128,
        refine_points: int = 64,
        min_refinements: int = 1,
        max_refinements: int = 12,
        log_threshold: float = 40.0,
        coarse_limit: float | None = None,
        coarse_scale: float = 1.0,
    ):
        super().__init__(family)
        if tuple(family.event_shape) != ():
            raise ValueError(
                f"QuadratureOracle integrates over a scalar x, but family {family.name!r} has "
                f"event_shape {tuple(family.event_shape)}; use a sampling-based oracle for "
                f"vector events"
            )
        support = family.support
        if getattr(support, "event_dim", 0) != 0:
            raise ValueError(
                f"QuadratureOracle needs a scalar support, but family {family.name!r} has "
                f"support {support} with event_dim {support.event_dim}"
            )
        for name, value in (("num_panels", num_panels), ("nodes_per_panel", nodes_per_panel),
                            ("coarse_points", coarse_points), ("refine_points", refine_points)):
            if int(value) < 2:
                raise ValueError(f"QuadratureOracle: {name} must be at least 2, got {value}")
        if not 1 <= int(min_refinements) <= int(max_refinements):
            raise ValueError(
                f"QuadratureOracle: need 1 <= min_refinements <= max_refinements, got "
                f"{min_refinements}, {max_refinements}"
            )
        self.num_panels = int(num_panels)
        self.nodes_per_panel = int(nodes_per_panel)
        self.coarse_points = int(coarse_points)
        self.refine_points = int(refine_points)
        self.min_refinements = int(min_refinements)
        self.max_refinements = int(max_refinements)
        self.log_threshold = float(log_threshold)
        self.coarse_scale = float(coarse_scale)

        self._mw = (1.0, 1.0, 1.0, 1.0)
        self._alive_only = 1
        self.circular = isinstance(support, constraints._Circular)
        gl_x, gl_w = leggauss(self.nodes_per_panel)
        self._gl_x, self._gl_w = gl_x, gl_w
        breakpoints = np.asarray(family.breakpoints, dtype=np.float64).reshape(-1)
        if self.circular:
            self.transform = None
            self.coarse_limit = np.pi
            # Kinks of T, and the seam at +-pi (T need not be smooth across it).
            self._breakpoints = np.concatenate([_np_wrap(breakpoints), [-np.pi]])
            self._coarse = np.linspace(-np.pi, np.pi, self.coarse_points)
        else:
            self.transform = biject_to(support)
            if coarse_limit is None:
                identity = isinstance(self.transform, IdentityTransform)
                coarse_limit = 1e8 if identity else 700.0
            self.coarse_limit = float(coarse_limit)
            with jax.ensure_compile_time_eval():
                u_bp = np.asarray(self.transform.inv(jnp.asarray(breakpoints)), np.float64)
            # Breakpoints outside the support (or on its boundary) map to non-finite u: drop.
            self._breakpoints = np.unique(u_bp[np.isfinite(u_bp)])
            s = self.coarse_scale
            t = np.linspace(-1.0, 1.0, self.coarse_points) * np.arcsinh(self.coarse_limit / s)
            self._coarse = s * np.sinh(t)

    # ---------------------------------------------------------------- integrand
    def _log_integrand(self, eta: Array, u: Array, shift: Array) -> tuple[Array, Array]:
        """(g(u), T(x(u))) with non-finite points given g = -inf and T = 0 (gradient-safe)."""
        if self.circular:
            x = _wrap(u + shift)
            log_jac = jnp.zeros_like(u)
        else:
            x = self.transform(u)
            log_jac = self.transform.log_abs_det_jacobian(u, x)
        t = self.family.sufficient_statistics(x).astype(u.dtype)
        base = self.family.log_base_measure(x) + log_jac
        ok = jnp.all(jnp.isfinite(t), axis=-1) & jnp.isfinite(base)
        t = jnp.where(ok[:, None], t, 0.0)
        g = jnp.where(ok, t @ eta + jnp.where(ok, base, 0.0), -jnp.inf)
        g = jnp.where(jnp.isnan(g) | (g == jnp.inf), -jnp.inf, g)
        return g, t

    # ---------------------------------------------------------------- nodes
    def nodes_single(self, eta: Array) -> tuple[Array, Array, Array, Array]:
        """Quadrature rule for one eta: (u nodes, log weights, shift, diverged).

        ``shift`` is the circular window centre (0 otherwise); ``diverged`` flags an integrand
        that is not negligible at the ends of the search grid. No gradient flows through these.
        """
        eta = jax.lax.stop_gradient(jnp.asarray(eta))
        dtype = eta.dtype
        thr = self.log_threshold
        u = jnp.asarray(self._coarse, dtype)
        shift = jnp.zeros((), dtype)
        if self.circular:
            g, _ = self._log_integrand(eta, u, shift)
            shift = u[jnp.argmax(g)]  # centre the periodic window on the mode
        g, _ = self._log_integrand(eta, u, shift)
        lo, hi, _, diverged = _window(u, g, thr)
        if self.circular:
            diverged = jnp.zeros((), bool)
        def refine(carry):
            u, g, lo, hi, i = carry
            u = jnp.linspace(u[lo], u[hi], self.refine_points, dtype=dtype)
            g, _ = self._log_integrand(eta, u, shift)
            lo, hi, _, _ = _window(u, g, thr)
            return u, g, lo, hi, i + 1

        def unresolved(carry):
            _, _, lo, hi, i = carry
            coarse = (hi - lo + 1) < self.refine_points // 2
            return (i < self.min_refinements) | (coarse & (i < self.max_refinements))

        # The first grid may be the sinh grid (a different size): do one pass unconditionally.
        u, g, lo, hi, _ = refine((u, g, lo, hi, 0))
        u, g, lo, hi, _ = jax.lax.while_loop(unresolved, refine, (u, g, lo, hi, 1))
        a, b = u[lo], u[hi]

        # Equidistribute panel boundaries over the last (uniform) grid: each panel gets an equal
        # share of length + variation |dg| + probability mass + curvature sqrt|d2g| h, each term
        # normalised to sum to one over the window [a, b].
        gmax = jnp.max(g)
        floor = gmax - thr - 10.0
        gc = jnp.clip(jnp.where(jnp.isfinite(g), g, floor), floor, gmax)
        idx = jnp.arange(u.shape[0] - 1)
        inside = ((idx >= lo) & (idx < hi)).astype(dtype)
        alive = jnp.maximum(gc[1:], gc[:-1]) > gmax - thr
        length = inside * jnp.where(alive | (self._alive_only == 0), 1.0, 0.0)
        variation = jnp.abs(jnp.diff(gc)) * inside
        density = jnp.exp(gc - gmax)
        mass = (density[1:] + density[:-1]) * inside
        d2 = jnp.abs(jnp.diff(gc, 2))
        d2 = jnp.concatenate([d2[:1], jnp.maximum(d2[1:], d2[:-1]), d2[-1:]])
        curvature = jnp.sqrt(d2) * inside
        inc = 1e-9 * inside  # keeps the cumulative strictly increasing inside the window
        for weight, term in zip(self._mw, (length, variation, mass, curvature), strict=True):
            inc = inc + weight * term / jnp.maximum(jnp.sum(term), jnp.finfo(dtype).tiny)
        cum = jnp.concatenate([jnp.zeros((1,), dtype), jnp.cumsum(inc)])
        levels = jnp.linspace(0.0, 1.0, self.num_panels + 1, dtype=dtype) * cum[-1]
        bounds = jnp.clip(jnp.interp(levels, cum, u), a, b)
        bounds = bounds.at[0].set(a).at[-1].set(b)
        if self.circular:
            bp = _wrap(jnp.asarray(self._breakpoints, dtype) - shift)
        else:
            bp = jnp.asarray(self._breakpoints, dtype)
        if bp.size:
            bounds = jnp.sort(jnp.concatenate([bounds, jnp.clip(bp, a, b)]))

        left, right = bounds[:-1], bounds[1:]
        half, mid = 0.5 * (right - left), 0.5 * (right + left)
        nodes = (mid[:, None] + half[:, None] * jnp.asarray(self._gl_x, dtype)).reshape(-1)
        weights = (half[:, None] * jnp.asarray(self._gl_w, dtype)).reshape(-1)
        log_w = jnp.log(weights)  # -inf on empty panels (breakpoints outside the window)
        return nodes, log_w, shift, diverged

    @property
    def num_nodes(self) -> int:
        """Integrand evaluations in the final Gauss-Legendre stage."""
        return (self.num_panels + self._breakpoints.size) * self.nodes_per_panel

    # ---------------------------------------------------------------- per eta
    def log_partition_and_moments_single(self, eta: Array) -> tuple[Array, Array, Array]:
        """(A(eta), E[T], Cov[T]) for one flat eta, from one set of integrand evaluations."""
        eta = jnp.asarray(eta)
        if not jnp.issubdtype(eta.dtype, jnp.floating):
            eta = eta.astype(jnp.result_type(float))
        nodes, log_w, shift, diverged = self.nodes_single(eta)
        g, t = self._log_integrand(eta, nodes, shift)
        logits = g + log_w
        log_z = jax.nn.logsumexp(logits)
        p = jax.nn.softmax(logits)  # normalised by its own sum: exact even when |A| is huge
        mean = p @ t
        centred = t - mean
        cov = (centred * p[:, None]).T @ centred
        cov = 0.5 * (cov + cov.T)
        nan = jnp.asarray(jnp.nan, eta.dtype)
        log_z = jnp.where(diverged, jnp.inf, log_z)
        return log_z, jnp.where(diverged, nan, mean), jnp.where(diverged, nan, cov)

    def log_partition_single(self, eta: Array) -> Array:
        """A(eta) = logsumexp_i(g(u_i) + log w_i)."""
        return self.log_partition_and_moments_single(eta)[0]

    def mean_single(self, eta: Array) -> Array:
        """E[T] = sum_i p_i T(x_i) with p = softmax(g + log w)."""
        return self.log_partition_and_moments_single(eta)[1]

    def covariance_single(self, eta: Array) -> Array:
        """Cov[T] = sum_i p_i (T_i - E T)(T_i - E T)^T."""
        return self.log_partition_and_moments_single(eta)[2]

    # ---------------------------------------------------------------- batched
    def log_partition_and_moments(self, eta: Array) -> tuple[Array, Array, Array]:
        """(A, E[T], Cov[T]) for any batch shape of eta, in one pass."""
        return map_over_batch(self.log_partition_and_moments_single, self._eta(eta))

    def __repr__(self) -> str:
        return (f"QuadratureOracle({self.family.name}, panels={self.num_panels}, "
                f"nodes_per_panel={self.nodes_per_panel})")


def _np_wrap(x: np.ndarray) -> np.ndarray:
    return np.mod(x + np.pi, _TWO_PI) - np.pi

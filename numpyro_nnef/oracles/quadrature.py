"""Ground-truth oracle by numerical integration over a scalar x.

A(eta) = log int h(x) exp(eta . T(x)) dx. The integral is taken in unconstrained space
u = biject_to(support)^-1(x), where the integrand becomes exp(g(u)) with

    g(u) = eta . T(x(u)) + log h(x(u)) + log |dx/du|,

so endpoint singularities of integrable densities (x^-1/2 at 0, ...) become smooth exponential
tails in u. A circular support is integrated in x itself (periodic, log |dx/du| = 0), on a window
of length 2 pi centred on the mode.

Per eta, everything in JAX with static shapes (jit/vmap-able):

1. Locate: g on a coarse sinh-spaced grid covering u in [-L, L]; keep the hull of the points
   with g > max g - ``log_threshold`` (one grid step of margin), and re-locate it on uniform
   grids over that window until the window is resolved (it spans half the grid). The window
   carries ``stop_gradient``: the integral does not depend on it to working precision.
2. Integrate: composite Gauss-Legendre on panels whose boundaries equidistribute, over the last
   grid, the sum of four normalised shares (length, variation |dg|, probability mass and
   curvature sqrt|d2g|), plus panel boundaries at ``family.breakpoints`` (mapped into u) so that
   kinks of T lie on panel edges.

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
from .base import Oracle

__all__ = ["QuadratureOracle"]

_TWO_PI = 2.0 * np.pi


def _wrap(x: Array) -> Array:
    """Map angles into [-pi, pi)."""
    return jnp.mod(x + np.pi, _TWO_PI) - np.pi


def _window(g: Array, threshold: float) -> tuple[Array, Array]:
    """Grid indices (lo, hi) of the hull of {g >= max g - threshold}, widened by one point.

    (min/max of masked indices: the same as argmax of the mask, and quicker to compile.)
    """
    size = g.shape[0]
    idx = jnp.arange(size)
    above = g >= jnp.max(g) - threshold
    first = jnp.min(jnp.where(above, idx, size - 1))
    last = jnp.max(jnp.where(above, idx, 0))
    empty = first > last  # only if g is NaN everywhere: keep the whole grid
    return (jnp.where(empty, 0, jnp.maximum(first - 1, 0)),
            jnp.where(empty, size - 1, jnp.minimum(last + 1, size - 1)))


def _diverges(g: Array, threshold: float) -> Array:
    """Whether exp(g) fails to decay at an end of the grid, as far as the grid can tell: g is
    within ``threshold`` of its maximum at the first or last point where it is finite and does
    not decrease outwards there (or g is nowhere finite). The ends are the outermost finite
    points, because statistics such as x^2 overflow before the grid's end (g = -inf there)."""
    size = g.shape[0]
    idx = jnp.arange(size)
    finite = g > -jnp.inf
    first = jnp.min(jnp.where(finite, idx, size - 1))
    last = jnp.max(jnp.where(finite, idx, 0))
    near = g >= jnp.max(g) - threshold
    rising_out_first = g[first] >= g[jnp.minimum(first + 1, size - 1)]
    rising_out_last = g[last] >= g[jnp.maximum(last - 1, 0)]
    return ~jnp.any(finite) | (near[first] & rising_out_first) | (near[last] & rising_out_last)


def _log_expm1_ratio(d: Array) -> Array:
    """log((exp(d) - 1) / d), stable for every d (d / 2 near 0)."""
    small = jnp.abs(d) < 1e-6
    safe = jnp.where(small, 1.0, d)
    positive = safe + jnp.log(-jnp.expm1(-safe)) - jnp.log(jnp.abs(safe))
    negative = jnp.log(-jnp.expm1(safe)) - jnp.log(jnp.abs(safe))
    return jnp.where(small, d / 2, jnp.where(safe > 0, positive, negative))


def _interp(x: Array, xp: Array, fp: Array) -> Array:
    """Piecewise-linear interpolation for increasing xp (small sizes: compares all pairs, which
    compiles much faster than jnp.interp's search)."""
    i = jnp.clip(jnp.sum(xp[None, :] <= x[:, None], axis=1) - 1, 0, xp.shape[0] - 2)
    x0, x1, f0, f1 = xp[i], xp[i + 1], fp[i], fp[i + 1]
    t = jnp.clip((x - x0) / jnp.where(x1 > x0, x1 - x0, 1.0), 0.0, 1.0)
    return f0 + t * (f1 - f0)


class QuadratureOracle(Oracle):
    """Expectation oracle by adaptive composite Gauss-Legendre quadrature (scalar x only).

    Args:
      family: an ExponentialFamily with a scalar x: ``event_shape`` () (or (1,) with an
        independent support such as ``real_vector``).
      num_panels: Gauss-Legendre panels placed by equidistribution (each breakpoint adds one).
      nodes_per_panel: Gauss-Legendre nodes per panel.
      coarse_points: size of the first search grid (sinh-spaced; uniform on the circle).
      refine_points: size of each uniform refinement grid.
      max_refinements: at most this many refinements; they stop once the window spans at least
        half of its grid (one refinement always runs).
      log_threshold: the window keeps u where g(u) > max g - log_threshold; the neglected mass is
        about exp(-log_threshold) relative to the peak.
      coarse_limit: the search grid covers u in [-coarse_limit, coarse_limit]; default 1e8 on the
        real line and 700 through exp/sigmoid transforms (exp(+-700) is finite in float64; in
        float32 the limit becomes 84).
      coarse_scale: search points are coarse_scale * sinh(t) for uniform t.
      sample_points: uniform points of the window on which ``sample`` inverts the CDF.

    Where the integrand does not decay at an end of the search grid (eta outside the natural
    domain), log_partition is +inf and the moments are NaN. Tails too heavy to fit in the search
    grid are truncated there.
    """

    # Weights of (length, variation, mass, curvature) in the panel equidistribution.
    _monitor_weights = (1.0, 1.0, 1.0, 1.0)

    def __init__(
        self,
        family: ExponentialFamily,
        *,
        num_panels: int = 16,
        nodes_per_panel: int = 10,
        coarse_points: int = 128,
        refine_points: int = 64,
        max_refinements: int = 12,
        log_threshold: float = 40.0,
        coarse_limit: float | None = None,
        coarse_scale: float = 1.0,
        sample_points: int = 4096,
    ):
        super().__init__(family)
        event_shape, support = tuple(family.event_shape), family.support
        if getattr(support, "is_discrete", False):
            raise ValueError(
                f"QuadratureOracle integrates over a continuous x, but family {family.name!r} "
                f"has the discrete support {support}; use ExactOracle({family.name}) for a named "
                f"discrete family"
            )
        # A vector event of size one (e.g. LaplaceProduct(dim=1)) is integrated as a scalar.
        self._unit_vector = event_shape == (1,)
        if self._unit_vector and isinstance(support, constraints.independent) and (
                support.reinterpreted_batch_ndims == 1):
            support = support.base_constraint
        if event_shape not in ((), (1,)):
            raise ValueError(
                f"QuadratureOracle integrates over a scalar x, but family {family.name!r} has "
                f"event_shape {event_shape} (a vector event); quadrature over several "
                f"dimensions is not supported, use a sampling-based oracle instead"
            )
        if getattr(support, "event_dim", 0) != 0:
            raise ValueError(
                f"QuadratureOracle needs a scalar support, but family {family.name!r} has "
                f"support {family.support} with event_dim {family.support.event_dim}"
            )
        self.scalar_support = support  # what x itself ranges over
        for name, value in (("num_panels", num_panels), ("nodes_per_panel", nodes_per_panel),
                            ("coarse_points", coarse_points), ("refine_points", refine_points),
                            ("max_refinements", max_refinements),
                            ("sample_points", sample_points)):
            if int(value) < (1 if name == "max_refinements" else 2):
                raise ValueError(f"QuadratureOracle: {name} is too small: {value}")
        if not log_threshold > 0:
            raise ValueError(f"QuadratureOracle: log_threshold must be > 0, got {log_threshold}")
        self.num_panels = int(num_panels)
        self.nodes_per_panel = int(nodes_per_panel)
        self.coarse_points = int(coarse_points)
        self.refine_points = int(refine_points)
        self.max_refinements = int(max_refinements)
        self.log_threshold = float(log_threshold)
        self.coarse_scale = float(coarse_scale)
        self.sample_points = int(sample_points)
        self._gl_x, self._gl_w = leggauss(self.nodes_per_panel)

        self.circular = isinstance(support, constraints._Circular)
        breakpoints = np.asarray(family.breakpoints, dtype=np.float64).reshape(-1)
        if self.circular:
            self.transform = None
            self.coarse_limit = np.pi
            # Kinks of T, and the seam at +-pi (T need not be smooth across it); in x.
            self._breakpoints = np.unique(np.concatenate([_np_wrap(breakpoints), [-np.pi]]))
        else:
            self.transform = biject_to(support)
            self._identity = isinstance(self.transform, IdentityTransform)
            if coarse_limit is None:
                coarse_limit = 1e8 if self._identity else 700.0
            self.coarse_limit = float(coarse_limit)
            with jax.ensure_compile_time_eval():
                u_bp = np.asarray(self.transform.inv(jnp.asarray(breakpoints)), np.float64)
            # Breakpoints outside the support (or on its boundary) map to non-finite u: dropped.
            self._breakpoints = np.unique(u_bp[np.isfinite(u_bp)])

    # ---------------------------------------------------------------- integrand
    def _log_integrand(self, eta: Array, u: Array, shift: Array) -> tuple[Array, Array]:
        """(g(u), T(x(u))); points where T, log h or the Jacobian is not finite get g = -inf and
        T = 0, so that neither values nor gradients pick up NaN there."""
        if self.circular:
            x = _wrap(u + shift)
            log_jac = jnp.zeros_like(u)
        else:
            x = self.transform(u)
            log_jac = self.transform.log_abs_det_jacobian(u, x)
        x_event = x[:, None] if self._unit_vector else x
        t = self.family.sufficient_statistics(x_event).astype(u.dtype)
        base = (self.family.log_base_measure(x_event) + log_jac).astype(u.dtype)
        ok = jnp.all(jnp.isfinite(t), axis=-1) & jnp.isfinite(base)
        t = jnp.where(ok[:, None], t, 0.0)
        g = jnp.sum(t * eta, axis=-1) + jnp.where(ok, base, 0.0)
        g = jnp.where(ok & ~jnp.isnan(g) & (g < jnp.inf), g, -jnp.inf)
        return g, t

    # ---------------------------------------------------------------- nodes
    def nodes_single(self, eta: Array) -> tuple[Array, Array, Array, Array]:
        """Quadrature rule for one eta: (u nodes, log weights, shift, diverged).

        ``shift`` is the circular window centre (x = wrap(u + shift); 0 otherwise) and
        ``diverged`` flags an integrand that does not decay at an end of the search grid.
        Nothing here carries a gradient.
        """
        eta = jax.lax.stop_gradient(jnp.asarray(eta))
        dtype = eta.dtype
        thr = self.log_threshold
        u = jnp.asarray(self._search_grid(dtype), dtype)
        shift = jnp.zeros((), dtype)
        if self.circular:
            g, _ = self._log_integrand(eta, u, shift)
            shift = u[jnp.argmax(g)]  # centre the periodic window on the mode
        g, _ = self._log_integrand(eta, u, shift)
        lo, hi = _window(g, thr)
        diverged = jnp.zeros((), bool) if self.circular else _diverges(g, thr)

        def refine(carry):
            u, g, lo, hi, i = carry
            u = jnp.linspace(u[lo], u[hi], self.refine_points, dtype=dtype)
            g, _ = self._log_integrand(eta, u, shift)
            lo, hi = _window(g, thr)
            return u, g, lo, hi, i + 1

        def unresolved(carry):
            _, _, lo, hi, i = carry
            coarse = (hi - lo + 1) < self.refine_points // 2
            return (i == 0) | (coarse & (i < self.max_refinements))

        if self.refine_points == self.coarse_points:
            carry = (u, g, lo, hi, 0)
        else:  # the search grid has another size than the refinement grids
            carry = refine((u, g, lo, hi, 0))
        u, g, lo, hi, _ = jax.lax.while_loop(unresolved, refine, carry)
        a, b = u[lo], u[hi]

        # Panel boundaries equidistribute, over the last (uniform) grid restricted to [a, b], the
        # sum of four shares, each normalised to one: length (where g is above the threshold),
        # variation |dg|, probability mass, and curvature sqrt|d2g| (in grid units).
        gmax = jnp.max(g)
        floor = gmax - thr - 10.0
        gc = jnp.clip(jnp.where(jnp.isfinite(g), g, floor), floor, gmax)
        idx = jnp.arange(u.shape[0] - 1)
        inside = ((idx >= lo) & (idx < hi)).astype(dtype)
        alive = jnp.maximum(gc[1:], gc[:-1]) > gmax - thr
        length = inside * alive
        variation = inside * jnp.abs(jnp.diff(gc))
        density = jnp.exp(gc - gmax)
        mass = inside * (density[1:] + density[:-1])
        d2 = jnp.abs(jnp.diff(gc, 2))
        curvature = inside * jnp.sqrt(
            jnp.concatenate([d2[:1], jnp.maximum(d2[1:], d2[:-1]), d2[-1:]])
        )
        terms = jnp.stack([length, variation, mass, curvature])
        totals = jnp.maximum(jnp.sum(terms, axis=1, keepdims=True), jnp.finfo(dtype).tiny)
        weights = jnp.asarray(self._monitor_weights, dtype)[:, None]
        # (+ 1e-9 keeps the cumulative strictly increasing inside the window)
        inc = jnp.sum(weights * terms / totals, axis=0) + 1e-9 * inside
        cum = jnp.concatenate([jnp.zeros((1,), dtype), jnp.cumsum(inc)])
        levels = jnp.linspace(0.0, 1.0, self.num_panels + 1, dtype=dtype) * cum[-1]
        bounds = jnp.clip(_interp(levels, cum, u), a, b)
        bounds = bounds.at[0].set(a).at[-1].set(b)
        if self._breakpoints.size:
            bp = jnp.asarray(self._breakpoints, dtype)
            if self.circular:
                bp = _wrap(bp - shift)
            # Breakpoints outside [a, b] give empty panels (zero weights).
            bounds = jnp.sort(jnp.concatenate([bounds, jnp.clip(bp, a, b)]))

        left, right = bounds[:-1], bounds[1:]
        half, mid = 0.5 * (right - left), 0.5 * (right + left)
        nodes = (mid[:, None] + half[:, None] * jnp.asarray(self._gl_x, dtype)).reshape(-1)
        log_w = jnp.log(half[:, None] * jnp.asarray(self._gl_w, dtype)).reshape(-1)
        return nodes, log_w, shift, diverged

    def _search_grid(self, dtype) -> np.ndarray:
        """The first search grid: uniform on the circle, else coarse_scale * sinh(t) for uniform
        t, out to coarse_limit (kept where exp(u) stays finite in ``dtype``)."""
        if self.circular:
            return np.linspace(-np.pi, np.pi, self.coarse_points)
        limit = self.coarse_limit
        if not self._identity:
            limit = min(limit, 0.95 * float(np.log(np.finfo(dtype).max)))
        s = self.coarse_scale
        return s * np.sinh(np.linspace(-1.0, 1.0, self.coarse_points) * np.arcsinh(limit / s))

    @property
    def num_nodes(self) -> int:
        """Integrand evaluations in the final Gauss-Legendre stage (the search adds
        coarse_points + refine_points per refinement)."""
        return (self.num_panels + self._breakpoints.size) * self.nodes_per_panel

    # ---------------------------------------------------------------- per eta
    def log_partition_and_moments_single(self, eta: Array) -> tuple[Array, Array, Array]:
        """(A(eta), E[T], Cov[T]) for one flat eta, from one set of integrand evaluations.

        A = logsumexp_i(g_i + log w_i); with p = softmax(g + log w), E[T] = sum_i p_i T_i and
        Cov[T] = sum_i p_i (T_i - E T)(T_i - E T)^T.
        """
        eta = jnp.asarray(eta)
        if not jnp.issubdtype(eta.dtype, jnp.floating):
            eta = eta.astype(jnp.result_type(float))
        # One compiled program per oracle: programs that call A, E[T] and Cov[T] several times
        # (Newton's inverse) trace and compile it once.
        if "_moments_jit" not in self.__dict__:
            self.__dict__["_moments_jit"] = jax.jit(self._log_partition_and_moments)
        return self.__dict__["_moments_jit"](eta)

    def _log_partition_and_moments(self, eta: Array) -> tuple[Array, Array, Array]:
        nodes, log_w, shift, diverged = self.nodes_single(eta)
        g, t = self._log_integrand(eta, nodes, shift)
        logits = g + log_w
        log_z = jax.nn.logsumexp(logits)
        p = jax.nn.softmax(logits)  # normalised by its own sum: exact even when |A| is huge
        # elementwise sums rather than dots: same result, much faster to compile on CPU
        mean = jnp.sum(p[:, None] * t, axis=0)
        centred = t - mean
        cov = jnp.sum(p[:, None, None] * centred[:, :, None] * centred[:, None, :], axis=0)
        nan = jnp.asarray(jnp.nan, eta.dtype)
        return (jnp.where(diverged, jnp.inf, log_z), jnp.where(diverged, nan, mean),
                jnp.where(diverged, nan, cov))

    def mean_and_log_partition_single(self, eta: Array) -> tuple[Array, Array]:
        """(E[T | eta], A(eta)) from one set of integrand evaluations."""
        log_z, mean, _ = self.log_partition_and_moments_single(eta)
        return mean, log_z

    def integrable_single(self, eta: Array) -> Array:
        """Whether A(eta) < inf as far as the search grid can tell (the test by which
        ``log_partition`` returns +inf), from the first search grid only."""
        if self.circular:  # a bounded support: every finite eta
            return jnp.all(jnp.isfinite(eta))
        eta = jnp.asarray(eta)
        u = jnp.asarray(self._search_grid(eta.dtype), eta.dtype)
        g, _ = self._log_integrand(eta, u, jnp.zeros((), eta.dtype))
        return jnp.all(jnp.isfinite(eta)) & ~_diverges(g, self.log_threshold)

    def integrable(self, eta: Array) -> Array:
        """``integrable_single`` over eta of shape ``batch + (stat_dim,)``: shape ``batch``."""
        return self._batched("integrable_single", eta, check_domain=False)

    def sample_single(self, key: Array, eta: Array, num: int) -> Array:
        """``num`` draws of x for one flat eta, by inverting the CDF of exp(g) with g linear
        between ``sample_points`` uniform points of the quadrature window (exact for that
        piecewise-exponential density, whose relative error is about h^2 |g''| / 8 for spacing
        h); non-finite g drops its segments; NaN draws where A(eta) = inf."""
        nodes, _, shift, diverged = self.nodes_single(eta)
        eta = jax.lax.stop_gradient(jnp.asarray(eta))
        u = jnp.linspace(jnp.min(nodes), jnp.max(nodes), self.sample_points, dtype=eta.dtype)
        g, _ = self._log_integrand(eta, u, shift)
        h = u[1] - u[0]
        g0, g1 = g[:-1], g[1:]
        ok = (g0 > -jnp.inf) & (g1 > -jnp.inf)
        d = jnp.where(ok, g1 - g0, 0.0)
        log_mass = jnp.where(ok, g0 + _log_expm1_ratio(d), -jnp.inf)
        k_seg, k_pos = jax.random.split(key)
        cdf = jnp.cumsum(jnp.exp(log_mass - jnp.max(log_mass)))
        w = jax.random.uniform(k_seg, (num,), eta.dtype) * cdf[-1]
        j = jnp.clip(jnp.searchsorted(cdf, w, side="right"), 0, cdf.shape[0] - 1)
        v = jax.random.uniform(k_pos, (num,), eta.dtype)
        dj = d[j]
        small = jnp.abs(dj) < 1e-8
        safe = jnp.where(small, 1.0, dj)
        # t in [0, 1] with density prop. to exp(d t): the inverse of its CDF, stable for both signs
        t = jnp.where(safe > 0, 1.0 + jnp.log(v + (1.0 - v) * jnp.exp(-safe)) / safe,
                      jnp.log1p(v * jnp.expm1(safe)) / safe)
        t = jnp.clip(jnp.where(small, v, t), 0.0, 1.0)
        draws = u[j] + t * h
        x = _wrap(draws + shift) if self.circular else self.transform(draws)
        return jnp.where(diverged, jnp.nan, x)

    def sample(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """Draws x ~ p(x | eta), shape ``sample_shape + batch + event_shape`` (see
        ``sample_single``); jit/vmap-able."""
        eta = self._eta(jnp.asarray(eta))
        sample_shape = tuple(int(n) for n in sample_shape)
        num = int(np.prod(sample_shape))
        if "_sample_jit" not in self.__dict__:
            def draw(key, flat, num):
                keys = jax.random.split(key, flat.shape[0])
                return jax.vmap(lambda k, e: self.sample_single(k, e, num))(keys, flat)
            self.__dict__["_sample_jit"] = jax.jit(draw, static_argnums=2)
        x = self.__dict__["_sample_jit"](key, eta.reshape((-1, eta.shape[-1])), num)
        x = jnp.moveaxis(x, 0, -1).reshape(sample_shape + eta.shape[:-1])  # x was (batch, num)
        return x[..., None] if self._unit_vector else x

    def log_partition_single(self, eta: Array) -> Array:
        """A(eta) = log int h(x) exp(eta . T(x)) dx for one flat eta."""
        return self.log_partition_and_moments_single(eta)[0]

    def mean_single(self, eta: Array) -> Array:
        """E[T | eta] as a weighted sum over the nodes (equals grad A to rounding)."""
        return self.log_partition_and_moments_single(eta)[1]

    def covariance_single(self, eta: Array) -> Array:
        """Cov[T | eta] as a weighted sum over the nodes (equals the Hessian of A)."""
        return self.log_partition_and_moments_single(eta)[2]

    # ---------------------------------------------------------------- batched
    def log_partition_and_moments(self, eta: Array) -> tuple[Array, Array, Array]:
        """(A, E[T], Cov[T]) for eta of shape ``batch + (stat_dim,)``, in one pass."""
        return self._batched("log_partition_and_moments_single", eta)

    # The three protocol methods share one compiled program (one compilation per batch shape).
    def log_partition(self, eta: Array) -> Array:
        """A(eta) = log int h(x) exp(eta . T(x)) dx; shape ``batch``."""
        return self._batched("log_partition_and_moments_single", eta, name="log_partition")[0]

    def mean(self, eta: Array) -> Array:
        """E[T(x) | eta]; shape ``batch + (stat_dim,)``."""
        return self._batched("log_partition_and_moments_single", eta, name="mean")[1]

    def covariance(self, eta: Array) -> Array:
        """Cov[T(x) | eta]; shape ``batch + (stat_dim, stat_dim)``."""
        return self._batched("log_partition_and_moments_single", eta, name="covariance")[2]

    def __repr__(self) -> str:
        return (f"QuadratureOracle({self.family.name}, num_panels={self.num_panels}, "
                f"nodes_per_panel={self.nodes_per_panel})")


def _np_wrap(x: np.ndarray) -> np.ndarray:
    return np.mod(x + np.pi, _TWO_PI) - np.pi

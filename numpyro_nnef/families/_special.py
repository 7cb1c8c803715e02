"""Numerically stable special functions shared by the built-in families.

Every function is elementwise, works in float32 and float64, and is smooth where the mathematics
is: removable singularities are handled with a "double where" (the unused branch is evaluated at a
safe point) so that gradients and Hessians stay finite and correct.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import i0e, log_ndtr, ndtr, ndtri

Array = jax.Array

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def double_where(
    use_first: Array,
    x: Array,
    first: Callable[[Array], Array],
    second: Callable[[Array], Array],
    first_safe: float,
    second_safe: float,
) -> Array:
    """where(use_first, first(x), second(x)), each branch fed a safe x where it is not used.

    Evaluating an unused branch at a safe point keeps NaN/inf out of the gradient.
    """
    x1 = jnp.where(use_first, x, jnp.asarray(first_safe, x.dtype))
    x2 = jnp.where(use_first, jnp.asarray(second_safe, x.dtype), x)
    return jnp.where(use_first, first(x1), second(x2))


def polyval(coefficients: tuple[float, ...], x: Array) -> Array:
    """sum_k c_k x^k (Horner); ``coefficients`` start at the constant term."""
    out = jnp.zeros_like(x)
    for c in reversed(coefficients):
        out = out * x + c
    return out


# ---------------------------------------------------------------------- Bessel: log I0(sqrt s)
# log I0(sqrt s) = s/4 - s^2/64 + s^3/576 - 11 s^4/49152 + 19 s^5/614400 - ...
_LOG_I0_SERIES = (0.0, 1.0 / 4, -1.0 / 64, 1.0 / 576, -11.0 / 49152, 19.0 / 614400)
_LOG_I0_SMALL = 1e-2


def log_i0_sqrt(s: Array) -> Array:
    """log I0(sqrt(s)) for s >= 0; smooth in s (Taylor series near s = 0)."""
    s = jnp.asarray(s)

    def large(v):
        r = jnp.sqrt(v)
        return jnp.log(i0e(r)) + r

    return double_where(
        s < _LOG_I0_SMALL, s, lambda v: polyval(_LOG_I0_SERIES, v), large, 0.0, 1.0
    )


# ---------------------------------------------------------------------- log g(u)
# log g(u) = log((1 - e^{-u}) / u) = -u/2 + u^2/24 - u^4/2880 + u^6/181440 - ...
_LOG_G_SERIES = (0.0, -0.5, 1.0 / 24, 0.0, -1.0 / 2880, 0.0, 1.0 / 181440)
_LOG_G_SMALL = 0.1


def log_g(u: Array) -> Array:
    """log g(u), g(u) = (1 - e^{-u}) / u = int_0^1 e^{-u t} dt; analytic for every real u."""
    u = jnp.asarray(u)

    def general(v):
        positive = v > 0
        vp = jnp.where(positive, v, 1.0)
        vn = jnp.where(positive, -1.0, v)
        pos = jnp.log(-jnp.expm1(-vp)) - jnp.log(vp)
        neg = -vn + jnp.log(-jnp.expm1(vn)) - jnp.log(-vn)
        return jnp.where(positive, pos, neg)

    return double_where(
        jnp.abs(u) < _LOG_G_SMALL, u, lambda v: polyval(_LOG_G_SERIES, v), general, 0.0, 1.0
    )


# ---------------------------------------------------------------------- normal tails
_CF_TERMS = 32
_TAIL_SWITCH = -4.0


def _log_mills_tail(z: Array) -> Array:
    """log Phi(z) + z^2/2 + log(-z) for z <= -4 (-> -log(2 pi)/2 as z -> -inf), no cancellation.

    With t = -z/sqrt(2): Phi(z) e^{z^2/2} = erfcx(t)/2 and sqrt(pi) erfcx(t) = 1/r_1 by the
    continued fraction r_k = t + (k/2)/r_{k+1}; the value is -log(2 pi)/2 - log1p(1/(2 t r_2)).
    """
    t = -z / math.sqrt(2.0)
    # a rolled loop (not unrolled in Python) keeps the compiled Hessians small
    def level(i, r):
        return t + (0.5 * (_CF_TERMS - i)).astype(t.dtype) / r

    r = jax.lax.fori_loop(0, _CF_TERMS - 1, level, t)
    return -HALF_LOG_2PI - jnp.log1p(0.5 / (t * r))


def only_where_needed(needed: Array, fn: Callable[[Array], Array], x: Array) -> Array:
    """fn(x), skipped (x returned) when no element needs it: a loop-heavy branch costs nothing
    on unbatched calls outside its region (under vmap both sides run, as with jnp.where)."""
    return jax.lax.cond(jnp.any(needed), fn, lambda v: v, x)


def _continued_fraction_r3(t: Array) -> Array:
    """r_3 of r_k = t + (k/2)/r_{k+1} (the continued fraction of sqrt(pi) erfcx(t) = 1/r_1)."""
    def level(i, r):
        return t + (0.5 * (_CF_TERMS - i)).astype(t.dtype) / r

    return jax.lax.fori_loop(0, _CF_TERMS - 2, level, t)


def log_ndtr_half_square(z: Array) -> Array:
    """log Phi(z) + z^2/2, without the cancellation of the two terms for z << 0."""
    z = jnp.asarray(z)
    return double_where(
        z < _TAIL_SWITCH,
        z,
        lambda v: _log_mills_tail(v) - jnp.log(-v),
        lambda v: log_ndtr(v) + 0.5 * v * v,
        2.0 * _TAIL_SWITCH,
        0.0,
    )


def rectified_gaussian_log_partition(eta1: Array, eta2: Array) -> Array:
    """log int_0^inf exp(eta1 x + eta2 x^2) dx = 0.5 log(2 pi s2) + m^2/(2 s2) + log Phi(m/s).

    With s2 = -1/(2 eta2), m = eta1 s2 and z = m/s = eta1 s (eta2 < 0). For z < -4 it is written
    -log(-eta1) + log(2 pi)/2 + [log Phi(z) + z^2/2 + log(-z)], the exponential limit plus a
    small correction, so that E[x^2] = dA/d eta2 keeps its relative precision as eta1 -> -inf.
    """
    eta1, eta2 = jnp.broadcast_arrays(jnp.asarray(eta1), jnp.asarray(eta2))
    s = jnp.sqrt(-0.5 / eta2)
    tail = eta1 * s < _TAIL_SWITCH
    # each branch sees safe values where it is not used (double where)
    e1_tail = jnp.where(tail, eta1, 2.0 * _TAIL_SWITCH)
    s_tail = jnp.where(tail, s, 1.0)
    e1_body = jnp.where(tail, 0.0, eta1)
    z_body = e1_body * s
    tail_value = HALF_LOG_2PI - jnp.log(-e1_tail) + only_where_needed(
        tail, _log_mills_tail, e1_tail * s_tail)
    body_value = HALF_LOG_2PI + jnp.log(s) + log_ndtr(z_body) + 0.5 * z_body * z_body
    return jnp.where(tail, tail_value, body_value)


def rectified_gaussian_moments(eta1: Array, eta2: Array) -> tuple[Array, Array]:
    """(E x, E x^2) of exp(eta1 x + eta2 x^2) on x >= 0: s (z + l), s^2 (1 + z (z + l)).

    Here z = eta1 s, s^2 = -1/(2 eta2) and l = phi(z)/Phi(z) (the inverse Mills ratio). For
    z < -4 the continued fraction gives z + l = 1/(sqrt(2) r_2) and 1 + z (z + l) = 1/(r_2 r_3)
    (t = -z/sqrt(2)) without cancellation. The gradient of ``rectified_gaussian_log_partition``
    in closed form: a much smaller program than autodiff through it.
    """
    eta1, eta2 = jnp.broadcast_arrays(jnp.asarray(eta1), jnp.asarray(eta2))
    s = jnp.sqrt(-0.5 / eta2)
    z = eta1 * s
    tail = z < _TAIL_SWITCH
    z_body = jnp.where(tail, 0.0, z)
    z_plus_l = z_body + jnp.exp(-HALF_LOG_2PI - log_ndtr(z_body) - 0.5 * z_body * z_body)
    t = jnp.where(tail, -z, -2.0 * _TAIL_SWITCH) / math.sqrt(2.0)
    r3 = only_where_needed(tail, _continued_fraction_r3, t)
    r2 = t + 1.0 / r3
    first = jnp.where(tail, 1.0 / (math.sqrt(2.0) * r2), z_plus_l)
    second = jnp.where(tail, 1.0 / (r2 * r3), 1.0 + z_body * z_plus_l)
    return s * first, s * s * second


_NEWTON_STEPS = 12


def uniform_open_closed(key: Array, shape: tuple[int, ...], dtype) -> Array:
    """U ~ Uniform(0, 1] (never 0, so log U is finite)."""
    return jax.random.uniform(key, shape, dtype, minval=jnp.finfo(dtype).tiny, maxval=1.0)


def standard_normal_excess(u: Array, alpha: Array) -> Array:
    """w = z - alpha >= 0 for z ~ Normal(0, 1) conditioned on z > alpha, from U in (0, 1].

    Exact inverse CDF, P(Z > alpha + w | Z > alpha) = U. alpha < 0: z = -ndtri(U Phi(-alpha)).
    alpha >= 0: Newton from w0 = sqrt(alpha^2 - 2 log U) - alpha (monotone convergence, the
    problem is concave), written with log Phi(z) + z^2/2 so deep tails keep full precision.
    """
    u, alpha = jnp.broadcast_arrays(jnp.asarray(u), jnp.asarray(alpha))
    log_u = jnp.log(u)
    upper = alpha >= 0

    # alpha < 0: plain inverse survival function (Phi(-alpha) >= 1/2, no underflow).
    a_neg = jnp.where(upper, -1.0, alpha)
    w_neg = -ndtri(u * ndtr(-a_neg)) - a_neg

    # alpha >= 0: Newton on f(w) = h(-a-w) - h(-a) - w (a + w/2) - log U, h = log Phi + z^2/2.
    a = jnp.where(upper, alpha, 0.0)
    h_a = log_ndtr_half_square(-a)
    w = -2.0 * log_u / (jnp.sqrt(a * a - 2.0 * log_u) + a)

    def newton(_, w):
        h_w = log_ndtr_half_square(-a - w)
        f = h_w - h_a - w * (a + 0.5 * w) - log_u
        # f'(w) = -phi(a+w) / Phi(-a-w) = -exp(-HALF_LOG_2PI - h_w)
        return jnp.maximum(w + f * jnp.exp(HALF_LOG_2PI + h_w), 0.0)

    w_pos = jax.lax.fori_loop(0, _NEWTON_STEPS, newton, w)
    return jnp.maximum(jnp.where(upper, w_pos, w_neg), 0.0)


def jit_sampler(method: Callable) -> Callable:
    """Compile ``sample_exact(self, key, eta, sample_shape=())`` with self and sample_shape static.

    Eager calls then run one compiled program instead of dispatching op by op.
    """
    compiled = jax.jit(method, static_argnums=(0, 3))

    @functools.wraps(method)
    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        return compiled(self, key, jnp.asarray(eta), tuple(int(n) for n in sample_shape))

    return sample_exact


# ---------------------------------------------------------------------- log K_v(z), real v
# 2 K_v(z) = int_R exp(g(y)) dy with g(y) = v y - z cosh y, concave with mode t* = asinh(v/z).
# Around the mode, g(t*) - g(t* + u) = [(s + v)(e^u - 1 - u) + (s - v)(e^-u - 1 + u)] / 2 with
# s = sqrt(z^2 + v^2): two nonnegative terms, no cancellation between them.
_BESSEL_NODES = 192
_BESSEL_DROP = 50.0


def cosh_mode_parameters(v: Array, z: Array) -> tuple[Array, Array, Array]:
    """(s + v, s - v, t*) with s = sqrt(z^2 + v^2), s -+ v = z^2 / (s +- v) when small."""
    positive = v >= 0
    vp, vm = jnp.where(positive, v, 0.0), jnp.where(positive, 0.0, v)
    s_plus_vp, s_minus_vm = jnp.hypot(z, vp) + vp, jnp.hypot(z, vm) - vm    # both >= z > 0
    plus = jnp.where(positive, s_plus_vp, z * (z / s_minus_vm))
    minus = jnp.where(positive, z * (z / s_plus_vp), s_minus_vm)
    return plus, minus, jnp.log(plus / z)


def cosh_drop(u: Array, plus: Array, minus: Array) -> Array:
    """g(t*) - g(t* + u) >= 0 from (s + v, s - v) of ``cosh_mode_parameters``; convex in u."""
    return 0.5 * (plus * (jnp.expm1(u) - u) + minus * (jnp.expm1(-u) + u))


def cosh_drop_slope(u: Array, plus: Array, minus: Array) -> Array:
    """d/du cosh_drop(u, plus, minus) = [(s + v) expm1(u) - (s - v) expm1(-u)] / 2."""
    return 0.5 * (plus * jnp.expm1(u) - minus * jnp.expm1(-u))


def _drop_reach(steep: Array, shallow: Array, drop: float | Array) -> Array:
    """u > 0 with [steep (e^u - 1 - u) + shallow (e^-u - 1 + u)] / 2 >= drop.

    e^u - 1 - u >= u^2 / 2, and >= e^u / 2 for u >= 1.7; e^-u - 1 + u >= u - 1.
    """
    ratio = 4.0 * drop / steep
    by_steep = jnp.minimum(jnp.sqrt(ratio), jnp.maximum(1.7, jnp.log(ratio)))
    return jnp.minimum(by_steep, 1.0 + 2.0 * drop / shallow)


def cosh_drop_bounds(plus: Array, minus: Array, drop: float | Array) -> tuple[Array, Array]:
    """(u_lo < 0 < u_hi) with cosh_drop >= drop for u <= u_lo and for u >= u_hi."""
    return -_drop_reach(minus, plus, drop), _drop_reach(plus, minus, drop)


def log_bessel_k(v: Array, z: Array) -> Array:
    """log K_v(z) = log(int_R exp(v y - z cosh y) dy / 2) for real v and z > 0 (trapezoid rule).

    The nodes y = t* + u span the region where the integrand is above exp(-50) of its maximum;
    they are constants for autodiff, so derivatives of every order in v and z are the trapezoid
    rule of the exact derivatives, written in the centred u and cosh y - 1 (well conditioned).
    The rule converges exponentially: the integrand is analytic and decays double-exponentially.
    """
    v, z = jnp.broadcast_arrays(jnp.asarray(v), jnp.asarray(z))
    dtype = jnp.result_type(v.dtype, z.dtype, float)
    v, z = v.astype(dtype), z.astype(dtype)
    plus, minus, mode = jax.lax.stop_gradient(cosh_mode_parameters(v, z))
    lo, hi = cosh_drop_bounds(plus, minus, _BESSEL_DROP)
    step = (hi - lo) / _BESSEL_NODES
    u = lo[..., None] + step[..., None] * jnp.arange(_BESSEL_NODES + 1, dtype=dtype)
    cosh_minus_one = 2.0 * jnp.sinh(0.5 * (mode[..., None] + u)) ** 2
    # the exponent's maximum, z - sqrt(z^2 + v^2) = -v^2 / (s + z), keeps exp() in range
    shift = jax.lax.stop_gradient(-v * v / (0.5 * (plus + minus) + z))
    exponent = v[..., None] * u - z[..., None] * cosh_minus_one - shift[..., None]
    return (v * mode - z + shift + jax.nn.logsumexp(exponent, axis=-1) + jnp.log(step)
            - math.log(2.0))

"""The generalised inverse Gaussian, p(x) ∝ x^(p-1) exp(-(a x + b / x) / 2) on x > 0, and its
square root (the complete conditional of a scale with a HalfNormal prior in a Normal)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints

from ..family import Array, ExponentialFamily, NaturalDomain
from ._special import (
    cosh_drop,
    cosh_drop_bounds,
    cosh_drop_slope,
    cosh_mode_parameters,
    jit_sampler,
    log_bessel_k,
    uniform_open_closed,
)

_NEWTON_STEPS = 6


def _first_two_negative(eta: Array) -> Array:
    """a > 0 and b > 0: eta_1 < 0 and eta_2 < 0."""
    return (eta[..., 0] < 0) & (eta[..., 1] < 0)
_MOMENT_NODES = 384
_MOMENT_DROP = 50.0


class GIG(ExponentialFamily):
    """GIG(p, a, b): T = (x, 1/x, log x), A = log 2 + log K_p(sqrt(a b)) + (p/2) log(b/a).

    eta = (-a/2, -b/2, p - 1). The natural domain used is the open set a > 0, b > 0 (any real
    p); its boundary points b = 0, p > 0 (Gamma) and a = 0, p < 0 (InverseGamma) are excluded.
    NumPyro has no GIG distribution, so q is an ``EFDistribution`` (exact oracle and sampler).
    """

    name = "GIG"
    identity_attributes = ()
    event_shape = ()
    support = constraints.positive
    natural_constraint = NaturalDomain(
        _first_two_negative,
        "eta[x] < 0 and eta[inv_x] < 0, i.e. a > 0 and b > 0 for any p (the boundary b = 0 "
        "(Gamma) and a = 0 (InverseGamma) is excluded)",
        np.array([-1.0, -1.0, 0.0]),
    )
    has_closed_form = True
    has_exact_sampler = True

    def statistics(self, x: Array) -> dict[str, Array]:
        """T(x) = {x, 1/x, log x}."""
        x = jnp.asarray(x)
        return {"x": x, "inv_x": 1.0 / x, "log_x": jnp.log(x)}

    def closed_form_log_partition(self, eta: Array) -> Array:
        """A(eta) = log 2 + log K_p(sqrt(a b)) + (p/2) log(b/a)."""
        p, w, half_log_ratio = _order_argument_ratio(eta)
        return math.log(2.0) + log_bessel_k(p, w) + p * half_log_ratio

    def closed_form_mean(self, eta: Array) -> Array:
        """E[T] = sum_i w_i T(x_i), trapezoid weights w_i ∝ x^p exp(-(a x + b/x)/2) on log x."""
        weight, t = _log_scale_quadrature(eta)
        return weight @ t

    def closed_form_mean_and_log_partition(self, eta: Array) -> tuple[Array, Array]:
        """(E[T], A(eta)): the mean on the grid of ``closed_form_mean``, A from log K_p."""
        return self.closed_form_mean(eta), self.closed_form_log_partition(eta)

    def closed_form_covariance(self, eta: Array) -> Array:
        """Cov[T] = sum_i w_i (T(x_i) - E T)(T(x_i) - E T)^T on the grid of ``closed_form_mean``.

        Central moments cancel no digits, where the Jacobian of the mean or differences of
        Bessel ratios such as K_{p+2}/K_p - (K_{p+1}/K_p)^2 would lose most of them (Var 1/x
        when p >> 1 and a b << 1, Var x when a b >> 1).
        """
        weight, t = _log_scale_quadrature(eta)
        centred = t - weight @ t
        return (weight[:, None] * centred).T @ centred

    def natural_init_from_mean(self, mu: Array) -> Array:
        """Newton's start for mu = (E x, E 1/x, E log x): the Stein identities
        E[d/dx (x^k p(x))] = 0 for k = 0, 1, 2, linear in (p, a, b), with E x^2 ~ (E x)^2 E x E 1/x
        and E x^-2 ~ (E 1/x)^2 E x E 1/x (exact for a log-normal)."""
        m1, m2 = mu[0], mu[1]
        spread = m1 * m2
        # rows: k = 1, 2, 0; unknowns (p, a, b)
        lhs = jnp.array([[1.0, -0.5 * m1, 0.5 * m2],
                         [m1, -0.5 * m1 * m1 * spread, 0.5],
                         [m2, -0.5, 0.5 * m2 * m2 * spread]])
        p, a, b = jnp.linalg.solve(lhs, jnp.stack([jnp.zeros_like(m1), -m1, m2]))
        eta = jnp.stack([-0.5 * a, -0.5 * b, p - 1.0])
        ok = (a > 0) & (b > 0) & jnp.all(jnp.isfinite(eta))
        return jnp.where(ok, eta, jnp.asarray(self.natural_constraint.feasible, mu.dtype))

    def natural_from_p_a_b(self, p: Array, a: Array, b: Array) -> Array:
        """eta = (-a/2, -b/2, p - 1), shape ``batch + (3,)``."""
        p, a, b = jnp.broadcast_arrays(jnp.asarray(p), jnp.asarray(a), jnp.asarray(b))
        return jnp.stack([-0.5 * a, -0.5 * b, p - 1.0], axis=-1)

    def p_a_b_from_natural(self, eta: Array) -> tuple[Array, Array, Array]:
        """(p, a, b) = (eta3 + 1, -2 eta1, -2 eta2)."""
        eta = self.check_eta(eta)
        return eta[..., 2] + 1.0, -2.0 * eta[..., 0], -2.0 * eta[..., 1]

    @jit_sampler
    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """x = sqrt(b/a) e^y, y by rejection from a three-piece envelope of the log-concave
        density of y ∝ exp(p y - w cosh y) (Devroye 2014); shape ``sample_shape + batch``."""
        p, a, b = self.p_a_b_from_natural(eta)
        dtype = jnp.result_type(eta.dtype, float)
        shape = tuple(sample_shape) + p.shape
        plus, minus, mode = cosh_mode_parameters(p.astype(dtype), jnp.sqrt(a * b).astype(dtype))
        u_lo, u_hi = _drop_one_points(plus, minus)
        u = _log_scale_draws(key, *(jnp.broadcast_to(c, shape) for c in (plus, minus, u_lo, u_hi)))
        return jnp.exp(mode + 0.5 * (jnp.log(b) - jnp.log(a)) + u).astype(dtype)


class SqrtGIG(ExponentialFamily):
    """x = sqrt(y), y ~ GIG(p, a, b): p(x) ∝ x^(2p-1) exp(-(a x^2 + b / x^2) / 2) on x > 0.

    T = (x^2, 1/x^2, log x), eta = (-a/2, -b/2, 2p - 1), A(eta) = A_GIG(eta_1, eta_2,
    (eta_3 - 1)/2) - log 2. The complete conditional of a scale sigma with a HalfNormal prior
    whose likelihood is Normal in sigma (a group-level sd: sigma^-n exp(-S / (2 sigma^2)) times
    exp(-sigma^2 / (2 s^2))); NumPyro has no such distribution, so q is an ``EFDistribution``.
    """

    name = "SqrtGIG"
    identity_attributes = ()
    event_shape = ()
    support = constraints.positive
    natural_constraint = NaturalDomain(
        _first_two_negative,
        "eta[x2] < 0 and eta[inv_x2] < 0, i.e. a > 0 and b > 0 for any p (as for GIG)",
        GIG.natural_constraint.feasible)
    has_closed_form = True
    has_exact_sampler = True

    def statistics(self, x: Array) -> dict[str, Array]:
        """T(x) = {x^2, 1/x^2, log x}."""
        x = jnp.asarray(x)
        return {"x2": x * x, "inv_x2": 1.0 / (x * x), "log_x": jnp.log(x)}

    def closed_form_log_partition(self, eta: Array) -> Array:
        """A(eta) = A_GIG(eta of x^2) - log 2 (dx = dy / (2 sqrt y))."""
        return _GIG.closed_form_log_partition(_gig_eta(eta)) - math.log(2.0)

    def closed_form_mean(self, eta: Array) -> Array:
        """E[T] = (E y, E 1/y, E log y / 2) for y = x^2 ~ GIG."""
        return _GIG.closed_form_mean(_gig_eta(eta)) * _LOG_HALF

    def closed_form_mean_and_log_partition(self, eta: Array) -> tuple[Array, Array]:
        """(E[T], A(eta)) through GIG's."""
        return self.closed_form_mean(eta), self.closed_form_log_partition(eta)

    def closed_form_covariance(self, eta: Array) -> Array:
        """Cov[T] = J Cov_GIG J, J = diag(1, 1, 1/2)."""
        return _GIG.closed_form_covariance(_gig_eta(eta)) * np.outer(_LOG_HALF, _LOG_HALF)

    def natural_init_from_mean(self, mu: Array) -> Array:
        """GIG's start for the mean of y = x^2, mapped back to x."""
        eta = _GIG.natural_init_from_mean(mu / _LOG_HALF)
        return jnp.stack([eta[0], eta[1], 2.0 * eta[2] + 1.0])

    def sample_exact(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """x = sqrt(y), y from GIG's exact sampler; shape ``sample_shape + batch``."""
        return jnp.sqrt(_GIG.sample_exact(key, _gig_eta(jnp.asarray(eta)), sample_shape))


_GIG = GIG()
_LOG_HALF = np.array([1.0, 1.0, 0.5])  # E[T] of SqrtGIG from E[T] of GIG


def _gig_eta(eta: Array) -> Array:
    """GIG's eta of y = x^2 from SqrtGIG's eta of x: (eta_1, eta_2, (eta_3 - 1) / 2)."""
    eta = jnp.asarray(eta)
    return jnp.concatenate([eta[..., :2], (eta[..., 2:] - 1.0) / 2.0], axis=-1)


def _order_argument_ratio(eta: Array) -> tuple[Array, Array, Array]:
    """(p, w = sqrt(a b), log(b/a) / 2) of one flat eta."""
    a, b = -2.0 * eta[0], -2.0 * eta[1]
    return eta[2] + 1.0, jnp.sqrt(a * b), 0.5 * (jnp.log(b) - jnp.log(a))


def _log_scale_quadrature(eta: Array) -> tuple[Array, Array]:
    """(w_i, T(x_i)) for one flat eta: normalised trapezoid weights on nodes y_i = log x_i."""
    p, w, half_log_ratio = _order_argument_ratio(eta)
    y = _moment_nodes(p, w)
    weight = jax.nn.softmax(p * y - w * 2.0 * jnp.sinh(0.5 * y) ** 2)
    t = jnp.stack([jnp.exp(y + half_log_ratio), jnp.exp(-y - half_log_ratio),
                   y + half_log_ratio], axis=-1)
    return weight, t


def _moment_nodes(p: Array, w: Array) -> Array:
    """Nodes y = log x spanning the integrands of log K at orders p - 2 ... p + 2 (where each is
    above exp(-50) of its maximum); constants for autodiff."""
    orders = p + jnp.arange(-2.0, 3.0, dtype=w.dtype)
    plus, minus, mode = cosh_mode_parameters(orders, jnp.broadcast_to(w, orders.shape))
    lo, hi = cosh_drop_bounds(plus, minus, _MOMENT_DROP)
    start, stop = jnp.min(mode + lo), jnp.max(mode + hi)
    nodes = start + (stop - start) / _MOMENT_NODES * jnp.arange(_MOMENT_NODES + 1, dtype=w.dtype)
    return jax.lax.stop_gradient(nodes)


def _drop_one_points(plus: Array, minus: Array) -> tuple[Array, Array]:
    """u_lo < 0 < u_hi near cosh_drop = 1, by Newton from outside (the drop is convex)."""
    u_lo, u_hi = cosh_drop_bounds(plus, minus, 1.0)

    def newton(_, u):
        return u - (cosh_drop(u, plus, minus) - 1.0) / cosh_drop_slope(u, plus, minus)

    return jax.lax.fori_loop(0, _NEWTON_STEPS, newton, u_lo), jax.lax.fori_loop(
        0, _NEWTON_STEPS, newton, u_hi)


def _log_scale_draws(key: Array, plus: Array, minus: Array, u_lo: Array, u_hi: Array) -> Array:
    """u with density ∝ exp(-cosh_drop(u)) for every element (shape of ``plus``): rejection from
    the envelope that is 1 on [u_lo, u_hi] and the tangent exponentials of the concave
    -cosh_drop beyond; each round proposes for all elements, until all are accepted (NaN where
    the parameters are outside the domain)."""
    drop_lo, drop_hi = cosh_drop(u_lo, plus, minus), cosh_drop(u_hi, plus, minus)
    rate_lo, rate_hi = -cosh_drop_slope(u_lo, plus, minus), cosh_drop_slope(u_hi, plus, minus)
    width = u_hi - u_lo
    mass_hi = jnp.exp(-drop_hi) / rate_hi
    total = width + mass_hi + jnp.exp(-drop_lo) / rate_lo

    def propose(state):
        i, u_kept, done = state
        pick, tail, accept = uniform_open_closed(jax.random.fold_in(key, i),
                                                 (3,) + plus.shape, plus.dtype)
        pick, tail = total * pick, -jnp.log(tail)
        middle, right = pick <= width, (pick > width) & (pick <= width + mass_hi)
        u = jnp.where(middle, u_lo + pick, jnp.where(right, u_hi + tail / rate_hi,
                                                     u_lo - tail / rate_lo))
        log_envelope = jnp.where(middle, 0.0, jnp.where(
            right, -drop_hi - rate_hi * (u - u_hi), -drop_lo - rate_lo * (u_lo - u)))
        ok = jnp.log(accept) <= -cosh_drop(u, plus, minus) - log_envelope
        return i + 1, jnp.where(done, u_kept, u), done | ok

    # elements with parameters outside the domain (NaN envelope) stay NaN instead of looping
    invalid = ~jnp.isfinite(total)
    start = (jnp.zeros((), jnp.int32), jnp.where(invalid, jnp.nan, 0.0).astype(plus.dtype),
             invalid)
    return jax.lax.while_loop(lambda state: ~jnp.all(state[2]), propose, start)[1]

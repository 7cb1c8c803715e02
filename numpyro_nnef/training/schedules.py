"""Noise schedules and probability-flow drifts for the denoising protocols (``ct``, ``df``).

Time runs from noise to data: z_t = a(t) y + s(t) eps, eps ~ N(0, I), with
a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar) and alpha_bar(t) = sigmoid(lambda(t)), where the
log signal-to-noise ratio lambda(t) = log(a^2 / s^2) increases from ``gamma_min`` at t = 0 (the
noise end) to ``gamma_max`` at t = 1 (the data end).  Every schedule hits both endpoints exactly,
so alpha_bar is never 0 or 1 and a, s > 0 on all of [0, 1].

- ``linear``: alpha_bar(t) = ab_0 + (ab_1 - ab_0) t, ab_i = sigmoid(gamma_i) (alpha_bar = t
  up to the endpoint clipping);
- ``cosine``: alpha_bar(t) = cos^2(pi u / 2), u = u_0 + (u_1 - u_0) t, u_i = (2/pi)
  arctan(exp(-gamma_i / 2)) (Nichol & Dhariwal's schedule in diffusion time u = 1 - t,
  truncated to the log-SNR range);
- ``sigmoid``: lambda(t) = gamma_min + (gamma_max - gamma_min) t, so alpha_bar is a sigmoid in t;
- ``learnable``: lambda(t) = gamma_min + (gamma_max - gamma_min) phi(t), phi a learned convex
  combination of monotone basis functions with phi(0) = 0, phi(1) = 1 (weights nnx.Param).

The derivative lambda'(t) is taken by forward-mode autodiff (``Schedule.rates``).
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
BISECTION_STEPS = 60  # halves [0, 1] below float64 resolution


class Rates(NamedTuple):
    """a(t), s(t) and their time derivatives."""

    a: Array
    s: Array
    da: Array
    ds: Array


def _signal_noise(lam: Array) -> tuple[Array, Array]:
    return jnp.exp(0.5 * jax.nn.log_sigmoid(lam)), jnp.exp(0.5 * jax.nn.log_sigmoid(-lam))


class Schedule(nnx.Module):
    """Base class: subclasses define ``log_snr(t)`` (lambda, increasing, elementwise) and its
    inverse ``time(log_snr)``; everything else (alpha_bar, a, s, their t-derivatives) follows."""

    name: ClassVar[str]

    def __init__(self, *, gamma_min: float, gamma_max: float):
        gamma_min, gamma_max = float(gamma_min), float(gamma_max)
        if not (np.isfinite(gamma_min) and np.isfinite(gamma_max) and gamma_min < gamma_max):
            raise ValueError(
                f"need finite gamma_min < gamma_max (the log-SNR at t = 0 and t = 1), got "
                f"gamma_min={gamma_min}, gamma_max={gamma_max}"
            )
        self.gamma_min = gamma_min
        self.gamma_max = gamma_max

    def alpha_bar(self, t: Array) -> Array:
        """alpha_bar(t) = sigmoid(lambda(t))."""
        return jax.nn.sigmoid(self.log_snr(t))

    def signal_noise(self, t: Array) -> tuple[Array, Array]:
        """(a, s) = (sqrt(sigmoid(lambda)), sqrt(sigmoid(-lambda))), computed in log space."""
        return _signal_noise(self.log_snr(t))

    def rates(self, t: Array) -> Rates:
        """(a, s, da/dt, ds/dt) with a' = a s^2 lambda' / 2 and s' = -s a^2 lambda' / 2 (from
        a^2 = sigmoid(lambda)); lambda' by forward-mode autodiff."""
        t = jnp.asarray(t)
        lam, dlam = jax.jvp(self.log_snr, (t,), (jnp.ones_like(t),))
        a, s = _signal_noise(lam)
        return Rates(a, s, 0.5 * a * s**2 * dlam, -0.5 * s * a**2 * dlam)

    def log_snr_rate(self, t: Array) -> Array:
        """d lambda / dt (> 0)."""
        t = jnp.asarray(t)
        return jax.jvp(self.log_snr, (t,), (jnp.ones_like(t),))[1]

    def snr_rate(self, t: Array) -> Array:
        """d SNR / dt = exp(lambda) d lambda / dt, SNR = alpha_bar / (1 - alpha_bar)."""
        t = jnp.asarray(t)
        lam, dlam = jax.jvp(self.log_snr, (t,), (jnp.ones_like(t),))
        return jnp.exp(lam) * dlam


class LinearSchedule(Schedule):
    """alpha_bar(t) = ab_0 + (ab_1 - ab_0) t with ab_i = sigmoid(gamma_i)."""

    name = "linear"

    def _ends(self) -> tuple[float, float]:
        return _sigmoid(self.gamma_min), _sigmoid(self.gamma_max)

    def log_snr(self, t: Array) -> Array:
        ab0, ab1 = self._ends()
        ab = ab0 + (ab1 - ab0) * jnp.asarray(t)
        return jnp.log(ab) - jnp.log1p(-ab)

    def time(self, log_snr: Array) -> Array:
        ab0, ab1 = self._ends()
        return (jax.nn.sigmoid(log_snr) - ab0) / (ab1 - ab0)


class CosineSchedule(Schedule):
    """alpha_bar(t) = cos^2(pi u / 2), u = u_0 + (u_1 - u_0) t, i.e. lambda = -2 log tan(pi u/2)."""

    name = "cosine"

    def _ends(self) -> tuple[float, float]:
        return (float(2 / np.pi * np.arctan(np.exp(-self.gamma_min / 2))),
                float(2 / np.pi * np.arctan(np.exp(-self.gamma_max / 2))))

    def log_snr(self, t: Array) -> Array:
        u0, u1 = self._ends()
        u = u0 + (u1 - u0) * jnp.asarray(t)
        return -2.0 * jnp.log(jnp.tan(0.5 * jnp.pi * u))

    def time(self, log_snr: Array) -> Array:
        u0, u1 = self._ends()
        u = 2 / jnp.pi * jnp.arctan(jnp.exp(-0.5 * jnp.asarray(log_snr)))
        return (u - u0) / (u1 - u0)


class SigmoidSchedule(Schedule):
    """lambda(t) = gamma_min + (gamma_max - gamma_min) t (alpha_bar = sigmoid(lambda))."""

    name = "sigmoid"

    def log_snr(self, t: Array) -> Array:
        return self.gamma_min + (self.gamma_max - self.gamma_min) * jnp.asarray(t)

    def time(self, log_snr: Array) -> Array:
        return (jnp.asarray(log_snr) - self.gamma_min) / (self.gamma_max - self.gamma_min)


class LearnableSchedule(Schedule):
    """lambda(t) = gamma_min + (gamma_max - gamma_min) phi(t), phi = sum_k w_k b_k(t),
    w = softmax(logits) (nnx.Param), b_0(t) = t and b_k (k = 1..K) logistic steps
    sigma(beta (t - m_k)) rescaled to run from 0 to 1 on [0, 1], centres m_k = (k - 1/2) / K.

    Every b_k is increasing with b_k(0) = 0, b_k(1) = 1 and w_0 > 0, so phi is strictly
    increasing with fixed endpoints: the schedule can bend but never collapse.  Starts at
    logits = 0 (close to the sigmoid schedule).
    """

    name = "learnable"

    def __init__(self, *, gamma_min: float, gamma_max: float, num_basis: int = 8,
                 sharpness: float = 16.0):
        super().__init__(gamma_min=gamma_min, gamma_max=gamma_max)
        if int(num_basis) < 1 or not sharpness > 0:
            raise ValueError(f"need num_basis >= 1 and sharpness > 0, got {num_basis}, "
                             f"{sharpness}")
        self.num_basis = int(num_basis)
        self.sharpness = float(sharpness)
        self.logits = nnx.Param(jnp.zeros(self.num_basis + 1))

    def _phi(self, t: Array, weights: Array) -> Array:
        t = jnp.asarray(t)
        centres = (jnp.arange(1, self.num_basis + 1, dtype=weights.dtype) - 0.5) / self.num_basis
        step = lambda u: jax.nn.sigmoid(self.sharpness * (u - centres))
        lo, hi = step(0.0), step(1.0)
        basis = (step(t[..., None]) - lo) / (hi - lo)
        return weights[0] * t + basis @ weights[1:]

    def log_snr(self, t: Array) -> Array:
        weights = jax.nn.softmax(self.logits[...])
        return self.gamma_min + (self.gamma_max - self.gamma_min) * self._phi(t, weights)

    def time(self, log_snr: Array) -> Array:
        """Bisection on [0, 1] (no gradient), then one Newton step t - (lambda(t) - l) /
        lambda'(t), which carries the implicit-function derivatives in l and in the logits."""
        log_snr = jnp.asarray(log_snr)
        weights = jax.lax.stop_gradient(jax.nn.softmax(self.logits[...]))
        target = jax.lax.stop_gradient(
            (log_snr - self.gamma_min) / (self.gamma_max - self.gamma_min)
        )

        def bisect(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            below = self._phi(mid, weights) < target
            return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

        lo, hi = jax.lax.fori_loop(
            0, BISECTION_STEPS, bisect, (jnp.zeros_like(target), jnp.ones_like(target))
        )
        t = 0.5 * (lo + hi)
        value, slope = jax.jvp(self.log_snr, (t,), (jnp.ones_like(t),))
        return t - (value - log_snr) / slope


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (LinearSchedule, CosineSchedule, SigmoidSchedule, LearnableSchedule)
}


def build_schedule(name: str, *, gamma_min: float, gamma_max: float, **kwargs: Any) -> Schedule:
    """The schedule ``name`` (see ``SCHEDULES``) with log-SNR range [gamma_min, gamma_max]."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {sorted(SCHEDULES)}")
    return SCHEDULES[name](gamma_min=gamma_min, gamma_max=gamma_max, **kwargs)


# ----------------------------------------------------------------------------- drifts


def eps_drift(rates: Rates, z: Array, eps_hat: Array) -> Array:
    """Probability-flow drift for a noise prediction (y_hat = (z - s eps_hat) / a):
    dz/dt = a' y_hat + s' eps_hat = (a'/a) z + (s' - a' s / a) eps_hat."""
    a, s, da, ds = rates
    return (da / a) * z + (ds - da * s / a) * eps_hat


def denoiser_drift(rates: Rates, z: Array, y_hat: Array) -> Array:
    """Probability-flow drift for a clean-target prediction (eps_hat = (z - a y_hat) / s):
    dz/dt = a' y_hat + s' (z - a y_hat) / s."""
    a, s, da, ds = rates
    return da * y_hat + ds * (z - a * y_hat) / s

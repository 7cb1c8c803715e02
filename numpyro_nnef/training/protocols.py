"""Training protocols, one registry (``PROTOCOLS``): how a network is fitted to (eta, E[T]) pairs
and how it predicts E[T] for one eta.  All work in standardised coordinates.

- ``regression``: mu_hat(eta) from an expectation network (``nn.architectures``), loss
  mean(w (mu_hat - y)^2).
- ``fm``, ``ct``, ``df``: E[T] is the end point of a flow in E[T]-space conditioned on eta, with a
  field f(z, t, eta) from ``nn.flows``.  Time t runs from the source/noise end (t = 0) to the data
  end (t = 1); the prediction integrates an ODE with a fixed-step explicit Runge-Kutta solver
  (``solver``, ``num_steps``) from the deterministic point z = 0, so it is a smooth,
  deterministic, differentiable function of eta.

  - ``fm`` (flow matching, linear interpolant): z_t = (1 - t) z_0 + t y, z_0 ~ N(0, c^2 I) with
    c = ``source_scale``; loss mean(w (f - (y - z_0))^2); predict dz/dt = f, z(0) = 0, -> z(1).
  - ``ct`` (continuous-time NoProp-style denoising): z_t = a y + s eps (``schedules``), the field
    predicts y; loss mean(SNR'(t) / (SNR(1) - SNR(0)) w (f - y)^2) (the weight has mean 1 over
    t ~ U(0, 1)); predict: probability-flow ODE ``denoiser_drift`` then y_hat = f(z(1), 1, eta).
  - ``df`` (diffusion, noise prediction): loss mean(r(t) w (f - eps)^2) with r = 1 for the fixed
    schedules and r = lambda'(t) / (gamma_max - gamma_min) (the continuous-time ELBO weight, mean
    1) for ``learnable``, under which the expected loss does not reward squeezing the schedule;
    predict: probability-flow ODE ``eps_drift`` then y_hat = (z(1) - s f(z(1), 1, eta)) / a.

  Both denoising ODEs are integrated in sigma = s/a (grid uniform in log-SNR) with state
  x = z/a: dz/dt = g(z, t) becomes dx/dsigma = (g(a x, t) - a' x) / (a sigma'), which is the
  implied noise prediction (z - a y_hat)/s itself.  It is constant along the flow of a perfect
  field for a deterministic target, so any Runge-Kutta step is exact there, and it has no
  1/alpha_bar stiffness at the noise end (DDIM is Euler's method in these variables).  Hence the
  default ``num_steps``: 8 for ct and df, 16 for fm (on a smooth 2-d toy, ct/df predictions stop
  changing at 4 RK4 steps and fm's at 8-16).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..nn.architectures import ARCHITECTURES, build_network
from ..nn.base import jsonable
from ..nn.flows import FLOW_ARCHITECTURES, build_flow_field
from ..oracles.neural import PROTOCOL_REGISTRY
from .schedules import (
    SCHEDULES,
    Rates,
    Schedule,
    build_schedule,
    denoiser_drift,
    eps_drift,
)

Array = jax.Array

# Butcher tableaux (c, A, b) of explicit Runge-Kutta methods whose nodes c lie in {0, 1/2, 1}.
TABLEAUS: dict[str, tuple[tuple[float, ...], tuple[tuple[float, ...], ...], tuple[float, ...]]] = {
    "euler": ((0.0,), ((),), (1.0,)),
    "heun": ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "rk4": (
        (0.0, 0.5, 0.5, 1.0),
        ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        (1 / 6, 1 / 3, 1 / 3, 1 / 6),
    ),
}


def solve_ode(
    f: Callable[[Array, Any], Array],
    x0: Array,
    grid: Array,
    solver: str = "rk4",
    time_of: Callable[[Array], Any] | None = None,
) -> Array:
    """Explicit Runge-Kutta for dx/dtau = f(x, time_of(tau)) over the grid tau_0, ..., tau_N (any
    direction; ``time_of`` is the identity when None).  ``time_of`` is evaluated once, vectorised,
    at every step's start, midpoint and end, and may return a pytree (e.g. t and schedule rates)."""
    c, a, b = TABLEAUS[solver]
    grid = jnp.asarray(grid)
    nodes = jnp.stack([grid[:-1], 0.5 * (grid[:-1] + grid[1:]), grid[1:]], axis=1)  # (N, 3)
    aux = nodes if time_of is None else time_of(nodes)
    columns = [{0.0: 0, 0.5: 1, 1.0: 2}[ci] for ci in c]

    def step(x, row):
        tau, aux_row = row
        h = tau[2] - tau[0]
        slopes: list[Array] = []
        for ai, col in zip(a, columns, strict=True):
            xi = x + h * sum((aij * k for aij, k in zip(ai, slopes, strict=False)), 0.0)
            slopes.append(f(xi, jax.tree.map(lambda leaf, col=col: leaf[col], aux_row)))
        x_next = x + h * sum(bi * k for bi, k in zip(b, slopes, strict=True))
        return x_next.astype(x.dtype), None

    x1, _ = jax.lax.scan(step, x0, (nodes, aux))
    return x1


def integrate_flow(velocity: Callable[[Array, Array], Array], z0: Array, num_steps: int,
                   solver: str = "rk4") -> Array:
    """z(1) for dz/dt = velocity(z, t) from z(0) = z0, uniform grid on [0, 1]."""
    grid = jnp.linspace(0.0, 1.0, num_steps + 1, dtype=jnp.result_type(z0, float))
    return solve_ode(velocity, z0, grid, solver)


def integrate_probability_flow(
    schedule: Schedule,
    drift: Callable[[Array, Array, Rates], Array],
    z0: Array,
    num_steps: int,
    solver: str = "rk4",
) -> Array:
    """z(1) for dz/dt = drift(z, t, rates(t)) from z(0) = z0, solved as dx/dsigma =
    (drift(a x, t) - a' x) / (a sigma') in sigma = s/a = exp(-lambda/2) on a grid uniform in
    lambda, x = z/a."""
    dtype = jnp.result_type(z0, float)
    lam = jnp.linspace(schedule.gamma_min, schedule.gamma_max, num_steps + 1, dtype=dtype)

    def time_of(sigma):
        t = jnp.clip(schedule.time(-2.0 * jnp.log(sigma)), 0.0, 1.0)
        return t, schedule.rates(t)

    def f(x, aux):
        t, r = aux
        dsigma = (r.ds * r.a - r.s * r.da) / r.a**2
        return (drift(r.a * x, t, r) - r.da * x) / (r.a * dsigma)

    a0, _ = schedule.signal_noise(jnp.zeros((), dtype))
    a1, _ = schedule.signal_noise(jnp.ones((), dtype))
    return a1 * solve_ode(f, z0 / a0, jnp.exp(-0.5 * lam), solver, time_of)


# ----------------------------------------------------------------------------- protocols


class Protocol:
    """One training protocol with its options (JSON-able; ``defaults`` lists them).

    Subclasses implement ``_build`` (the model), ``loss(model, eta, target, weights, key)``
    (batch arrays) and ``predict(model, eta)`` (one eta -> (stat_dim,)).
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    architectures: ClassVar[tuple[str, ...]]

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for protocol {self.name!r}; "
                f"known: {sorted(self.defaults)}"
            )
        self._options = jsonable(self._validate({**self.defaults, **options}))

    def _validate(self, options: dict[str, Any]) -> dict[str, Any]:
        return options

    @property
    def options(self) -> dict[str, Any]:
        """The merged options (a copy)."""
        return dict(self._options)

    def build_model(self, architecture: str, *, eta_dim: int, stat_dim: int, rngs: nnx.Rngs,
                    **hyperparameters: Any) -> nnx.Module:
        """A fresh model for ``architecture`` (one of ``self.architectures``)."""
        if architecture not in self.architectures:
            raise ValueError(
                f"architecture {architecture!r} is not available for protocol {self.name!r}; "
                f"choose one of {sorted(self.architectures)}"
            )
        return self._build(architecture, eta_dim=eta_dim, stat_dim=stat_dim, rngs=rngs,
                           **hyperparameters)

    def log_partition(self, model: nnx.Module, eta: Array) -> Array | None:
        """A(eta) up to a constant when the model is a learned log-partition, else None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._options})"


class Regression(Protocol):
    """mu_hat(eta) = net(eta) (direct) or grad A(eta) (gradient); loss mean(w (mu_hat - y)^2)."""

    name = "regression"
    architectures = tuple(ARCHITECTURES)

    def _build(self, architecture: str, **kwargs: Any) -> nnx.Module:
        return build_network(architecture, **kwargs)

    def predict(self, model: nnx.Module, eta: Array) -> Array:
        """mu_hat at one eta (eta_dim,) -> (stat_dim,)."""
        if model.kind == "gradient":
            return jax.grad(model._log_partition)(eta)
        return model._mean(eta)

    def loss(self, model: nnx.Module, eta: Array, target: Array, weights: Array,
             key: Array) -> Array:
        """mean(w (mu_hat(eta) - y)^2) (``key`` unused)."""
        pred = jax.vmap(lambda e: self.predict(model, e))(eta)
        return jnp.mean(weights * (pred - target) ** 2)

    def log_partition(self, model: nnx.Module, eta: Array) -> Array | None:
        """The network's A(eta) for gradient architectures, else None."""
        return model._log_partition(eta) if model.kind == "gradient" else None


class _FlowProtocol(Protocol):
    """Shared option checks and field construction of fm, ct and df."""

    architectures = tuple(FLOW_ARCHITECTURES)

    def _validate(self, options: dict[str, Any]) -> dict[str, Any]:
        steps = options["num_steps"]
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"option num_steps must be an integer >= 1, got {steps!r}")
        options["num_steps"] = int(steps)
        if options["solver"] not in TABLEAUS:
            raise ValueError(f"unknown solver {options['solver']!r}; known: {sorted(TABLEAUS)}")
        return options

    def _field(self, architecture: str, *, eta_dim: int, stat_dim: int, rngs: nnx.Rngs,
               **hyperparameters: Any) -> nnx.Module:
        return build_flow_field(architecture, dim=stat_dim, eta_dim=eta_dim, rngs=rngs,
                                **hyperparameters)


class FlowMatching(_FlowProtocol):
    """Flow matching: z_t = (1 - t) z_0 + t y, field = velocity, target y - z_0."""

    name = "fm"
    defaults = {"num_steps": 16, "solver": "rk4", "source_scale": 1.0}

    def _validate(self, options: dict[str, Any]) -> dict[str, Any]:
        options = super()._validate(options)
        if not (np.isfinite(options["source_scale"]) and options["source_scale"] > 0):
            raise ValueError(f"option source_scale must be > 0, got {options['source_scale']}")
        options["source_scale"] = float(options["source_scale"])
        return options

    def _build(self, architecture: str, **kwargs: Any) -> nnx.Module:
        return self._field(architecture, **kwargs)

    def loss(self, model: nnx.Module, eta: Array, target: Array, weights: Array,
             key: Array) -> Array:
        """mean(w (f(z_t, t, eta) - (y - z_0))^2), t ~ U(0, 1), z_0 ~ N(0, c^2 I)."""
        k_t, k_z = jax.random.split(key)
        dtype = jnp.result_type(target, float)
        t = jax.random.uniform(k_t, target.shape[:1], dtype)
        z0 = self._options["source_scale"] * jax.random.normal(k_z, target.shape, dtype)
        zt = (1.0 - t)[:, None] * z0 + t[:, None] * target
        velocity = jax.vmap(model)(zt, t, eta)
        return jnp.mean(weights * (velocity - (target - z0)) ** 2)

    def predict(self, model: nnx.Module, eta: Array) -> Array:
        """z(1) of dz/dt = f(z, t, eta), z(0) = 0 (the source mean)."""
        z0 = jnp.zeros(model.dim, jnp.result_type(eta, float))
        return integrate_flow(lambda z, t: model(z, t, eta), z0, self._options["num_steps"],
                              self._options["solver"])


class DenoisingModel(nnx.Module):
    """A flow field and the noise schedule it was trained with."""

    def __init__(self, field: nnx.Module, schedule: Schedule):
        self.field = field
        self.schedule = schedule


def _make_schedule(options: dict[str, Any]) -> Schedule:
    return build_schedule(options["schedule"], gamma_min=options["gamma_min"],
                          gamma_max=options["gamma_max"])


class _DenoisingProtocol(_FlowProtocol):
    """ct and df: z_t = a(t) y + s(t) eps with the schedule of option ``schedule``."""

    def _validate(self, options: dict[str, Any]) -> dict[str, Any]:
        options = super()._validate(options)
        if options["schedule"] not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {options['schedule']!r}; known: {sorted(SCHEDULES)}"
            )
        options["gamma_min"] = float(options["gamma_min"])
        options["gamma_max"] = float(options["gamma_max"])
        _make_schedule(options)  # validates the log-SNR range
        return options

    def _build(self, architecture: str, **kwargs: Any) -> nnx.Module:
        return DenoisingModel(self._field(architecture, **kwargs), _make_schedule(self._options))

    def _noisy(self, model: DenoisingModel, target: Array, key: Array
               ) -> tuple[Array, Array, Array]:
        """(t, eps, z_t) with t ~ U(0, 1), eps ~ N(0, I), z_t = a(t) y + s(t) eps."""
        k_t, k_eps = jax.random.split(key)
        dtype = jnp.result_type(target, float)
        t = jax.random.uniform(k_t, target.shape[:1], dtype)
        eps = jax.random.normal(k_eps, target.shape, dtype)
        a, s = model.schedule.signal_noise(t)
        return t, eps, a[:, None] * target + s[:, None] * eps

    def _flow_end(self, model: DenoisingModel, eta: Array, drift: Callable) -> Array:
        """z(1) of the probability-flow ODE from z(0) = 0."""
        z0 = jnp.zeros(model.field.dim, jnp.result_type(eta, float))
        return integrate_probability_flow(
            model.schedule, lambda z, t, rates: drift(rates, z, model.field(z, t, eta)),
            z0, self._options["num_steps"], self._options["solver"],
        )


class ContinuousTime(_DenoisingProtocol):
    """NoProp-CT-style denoising: the field predicts the clean target y from (z_t, t, eta)."""

    name = "ct"
    defaults = {"num_steps": 8, "solver": "rk4", "schedule": "learnable",
                "gamma_min": -6.0, "gamma_max": 6.0}

    def loss(self, model: DenoisingModel, eta: Array, target: Array, weights: Array,
             key: Array) -> Array:
        """mean(SNR'(t) / (SNR(1) - SNR(0)) w (f(z_t, t, eta) - y)^2)."""
        t, _, zt = self._noisy(model, target, key)
        y_hat = jax.vmap(model.field)(zt, t, eta)
        sched = model.schedule
        rate = sched.snr_rate(t) / (np.exp(sched.gamma_max) - np.exp(sched.gamma_min))
        return jnp.mean(rate[:, None] * weights * (y_hat - target) ** 2)

    def predict(self, model: DenoisingModel, eta: Array) -> Array:
        """f(z(1), 1, eta) after the probability-flow ODE for y-prediction."""
        z1 = self._flow_end(model, eta, denoiser_drift)
        return model.field(z1, jnp.ones((), z1.dtype), eta)


class Diffusion(_DenoisingProtocol):
    """Diffusion with noise prediction: the field predicts eps from (z_t, t, eta)."""

    name = "df"
    defaults = {"num_steps": 8, "solver": "rk4", "schedule": "cosine",
                "gamma_min": -6.0, "gamma_max": 6.0}

    def loss(self, model: DenoisingModel, eta: Array, target: Array, weights: Array,
             key: Array) -> Array:
        """mean(r(t) w (f(z_t, t, eta) - eps)^2), r = 1 or the ELBO weight for ``learnable``."""
        t, eps, zt = self._noisy(model, target, key)
        eps_hat = jax.vmap(model.field)(zt, t, eta)
        sched = model.schedule
        if self._options["schedule"] == "learnable":
            rate = sched.log_snr_rate(t) / (sched.gamma_max - sched.gamma_min)
        else:
            rate = jnp.ones_like(t)
        return jnp.mean(rate[:, None] * weights * (eps_hat - eps) ** 2)

    def predict(self, model: DenoisingModel, eta: Array) -> Array:
        """(z(1) - s(1) f(z(1), 1, eta)) / a(1) after the probability-flow ODE for eps."""
        z1 = self._flow_end(model, eta, eps_drift)
        one = jnp.ones((), z1.dtype)
        a1, s1 = model.schedule.signal_noise(one)
        return (z1 - s1 * model.field(z1, one, eta)) / a1


PROTOCOLS: dict[str, type[Protocol]] = {
    cls.name: cls for cls in (Regression, FlowMatching, ContinuousTime, Diffusion)
}
# saved oracles are rebuilt from oracles.neural's registry (that layer cannot import this one)
PROTOCOL_REGISTRY.update(PROTOCOLS)


def get_protocol(name: str, **options: Any) -> Protocol:
    """The protocol ``name`` (see ``PROTOCOLS``) with ``options`` over its defaults."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name](**options)

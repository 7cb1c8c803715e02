"""Data generation: eta -> (E[T(x)], Cov[T(x)]) with ArviZ-exact diagnostics.

For each natural parameter eta, independent NUTS chains (BlackJAX window adaptation, then a scan
of NUTS steps) target p(x | eta) ∝ h(x) exp(eta . T(x)) in unconstrained space: with
x = f(u), f = :func:`support_transform` (softplus for x >= 0, ``biject_to(support)`` otherwise;
a circle is cut at its lowest-density angle), the chains sample

    log p(u | eta) = eta . T(f(u)) + log h(f(u)) + log |det J_f(u)| + const,

so constrained supports are never clipped. Points that fail the diagnostics are retried with
more chains and then handed to adaptive tempered SMC (:func:`run_smc`), which also serves as
the engine for multimodal families (``sampler="smc"``). Chains are vectorised (``vmap``) over
eta and chains and sharded over all local JAX devices along the eta axis. Randomness comes only
from the given ``jax.random`` key: point i uses ``fold_in(fold_in(key, 0), i)``, attempt r of that
point ``fold_in(point_key, r)`` (replica j of a NUTS retry ``fold_in(attempt_key, j)``), so results
do not depend on interruptions or the number of devices, nor, for first attempts, on chunking
(a retry gives each failing point as many replicas as fill the retry batch).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
from blackjax.adaptation.base import get_filter_adapt_info_fn
from blackjax.smc import adaptive_tempered, resampling
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from numpyro.distributions import constraints
from numpyro.distributions.transforms import SoftplusTransform, Transform, biject_to

from ._io import atomic_write
from .dataset import ExpectationDataset
from .diagnostics import ess_bulk, ess_tail, mcse_mean, rhat
from .family import Array, ExponentialFamily, OutOfDomainError

__all__ = [
    "CheckpointMismatchError",
    "NUTSDraws",
    "SMCDraws",
    "SMCSettings",
    "compute_diagnostics",
    "generate_dataset",
    "passes_diagnostics",
    "run_nuts",
    "run_smc",
    "sample_etas",
    "sample_family",
    "smc_diagnostics",
    "unconstrained_log_density",
]

CHECKPOINT_FORMAT = "numpyro_nnef.generate_dataset.checkpoint"
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# NUTS kernels
# ---------------------------------------------------------------------------------------------
class NUTSDraws(NamedTuple):
    """Output of :func:`run_nuts` for etas of shape ``batch + (stat_dim,)``.

    statistics: T(x) draws, ``batch + (num_chains, num_samples, stat_dim)``.
    divergences: divergent transitions after warm-up, summed over chains, ``batch``.
    step_size: adapted step size per chain, ``batch + (num_chains,)``.
    acceptance_rate: mean acceptance probability per chain, ``batch + (num_chains,)``.
    u_mean, u_sd: mean and sd of the unconstrained draws pooled over chains, ``batch + (d,)``.
    u_max: the largest |u| drawn, ``batch`` (chains running off to infinity: an improper member).
    climb: the largest rise of a chain's log density from its first to its last quarter of draws,
    ``batch`` (zero up to noise for a stationary chain; chains climbing an improper member rise).
    x: the draws of x, ``batch + (num_chains, num_samples) + event_shape`` (or None).
    """

    statistics: Array
    divergences: Array
    step_size: Array
    acceptance_rate: Array
    u_mean: Array
    u_sd: Array
    u_max: Array
    climb: Array
    x: Array | None = None


def support_transform(family: ExponentialFamily) -> Transform:
    """The map f: R^d -> support used by the samplers, chosen per support:

    x >= 0 (``constraints.nonnegative``, mass may reach x = 0): softplus, x = log(1 + e^u), whose
    right tail is linear, so Gaussian-tailed densities stay Gaussian in u (exp would turn
    exp(-x^2) into the double-exponential wall exp(-e^{2u}), where NUTS diverges); every other
    support: ``biject_to(family.support)``. ValueError naming the family for a discrete support.
    """
    if getattr(family.support, "is_discrete", False):
        raise ValueError(
            f"NUTS samples a continuous x, but family {family.name!r} has the discrete support "
            f"{family.support}; use ExactOracle({family.name}) and family.sample_exact for a "
            f"named discrete family"
        )
    if family.support is constraints.nonnegative and family.event_shape == ():
        return SoftplusTransform()
    return biject_to(family.support)


def _wrap(x: Array) -> Array:
    """Angles into [-pi, pi)."""
    return jnp.mod(x + math.pi, 2 * math.pi) - math.pi


def _circular_cut(family: ExponentialFamily, eta: Array, num_grid: int = 64) -> Array:
    """argmin over a grid of 64 angles of eta . T(x) + log h(x): where to cut the circle."""
    grid = -math.pi + 2 * math.pi * (jnp.arange(num_grid, dtype=eta.dtype) + 0.5) / num_grid
    logp = jax.vmap(lambda x: family.unnormalized_log_prob(eta, x))(grid)
    return grid[jnp.argmin(jnp.where(jnp.isnan(logp), -jnp.inf, logp))]


def engine_maps(family: ExponentialFamily, eta: Array, *, cut_circle: bool = True
                ) -> tuple[Callable[[Array], Array], Callable[[Array], Array]]:
    """(u -> x, u -> log p(u | eta) + A(eta)) used by NUTS and SMC at one eta:

    log p(u | eta) + A(eta) = eta . T(x) + log h(x) + log|det J_f(u)|,  x = f(u),
    f = :func:`support_transform`. For a circular support (scalar angle, ``cut_circle``) the
    circle is cut at the lowest-density angle c of a 64-point grid, x = wrap(f(u) + c + pi), so
    that no mode straddles the cut (cut at -pi, a member with its mode near pi has its mass at
    both ends u -> -inf and u -> +inf: two modes in u); a translation leaves log|det J| alone.
    Where f(u) rounds onto the edge of a bounded support (|u| large in float arithmetic) the
    value can be NaN or +inf; it is mapped to -inf so that chains are never drawn there.
    """
    transform = support_transform(family)
    rotate = cut_circle and family.support is constraints.circular and family.event_shape == ()
    shift = _circular_cut(family, eta) + math.pi if rotate else 0.0

    def to_x(u):
        x = transform(u)
        return _wrap(x + shift) if rotate else x

    def logdensity(u):
        x = transform(u)
        log_det = jnp.sum(transform.log_abs_det_jacobian(u, x))
        value = family.unnormalized_log_prob(eta, _wrap(x + shift) if rotate else x) + log_det
        return jnp.where(jnp.isnan(value) | (value == jnp.inf), -jnp.inf, value)

    return to_x, logdensity


def unconstrained_log_density(family: ExponentialFamily, eta: Array
                              ) -> Callable[[Array], Array]:
    """u -> eta . T(f(u)) + log h(f(u)) + log|det J_f(u)| (= log p(u | eta) + A(eta)) for one
    unconstrained point u of shape ``f.inverse_shape(event_shape)``, f = :func:`support_transform`
    (no circle cut: the map from u to x is f itself); -inf where f(u) rounds onto an edge."""
    return engine_maps(family, eta, cut_circle=False)[1]


def _unconstrained_shape(family: ExponentialFamily) -> tuple[int, ...]:
    return tuple(support_transform(family).inverse_shape(family.event_shape))


def _one_eta_fn(family, num_chains, num_warmup, num_samples, target_acceptance_rate, return_x):
    """(key, eta) -> per-eta outputs of ``num_chains`` independent adapted NUTS chains
    (BlackJAX window adaptation, then a scan of NUTS steps)."""
    u_shape = _unconstrained_shape(family)

    def one_eta(key, eta):
        transform, logdensity = engine_maps(family, eta)
        k_init, k_warm, k_draw = jax.random.split(key, 3)
        u_init = jax.random.uniform(
            k_init, (num_chains,) + u_shape, eta.dtype, minval=-2.0, maxval=2.0
        )

        def one_chain(k_w, k_d, u0):
            warmup = blackjax.window_adaptation(
                blackjax.nuts, logdensity, target_acceptance_rate=target_acceptance_rate,
                adaptation_info_fn=get_filter_adapt_info_fn(),
            )
            (state, parameters), _ = warmup.run(k_w, u0, num_steps=num_warmup)
            step = blackjax.nuts(logdensity, **parameters).step
            quarter = max(1, num_samples // 4)

            def body(carry, inputs):
                state, (sum_u, sum_u2, max_u, logp_first, logp_last) = carry
                i, k = inputs
                state, info = step(k, state)
                x = transform(state.position)
                u, logp = jnp.ravel(state.position), state.logdensity
                sums = (sum_u + u, sum_u2 + u * u, jnp.maximum(max_u, jnp.max(jnp.abs(u))),
                        logp_first + jnp.where(i < quarter, logp, 0.0),
                        logp_last + jnp.where(i >= num_samples - quarter, logp, 0.0))
                out = (family.sufficient_statistics(x), info.is_divergent, info.acceptance_rate)
                return (state, sums), out + ((x,) if return_x else ())

            d = math.prod(u_shape)
            zero = jnp.zeros((), eta.dtype)
            sums = (jnp.zeros(d, eta.dtype), jnp.zeros(d, eta.dtype), zero, zero, zero)
            (_, sums), outs = jax.lax.scan(
                body, (state, sums), (jnp.arange(num_samples), jax.random.split(k_d, num_samples))
            )
            stats, divergent, accept = outs[:3]
            climb = (sums[4] - sums[3]) / quarter
            result = (stats, jnp.sum(divergent), parameters["step_size"], jnp.mean(accept),
                      sums[0] / num_samples, sums[1] / num_samples, sums[2], climb)
            return result + ((outs[3],) if return_x else ())

        outs = jax.vmap(one_chain)(
            jax.random.split(k_warm, num_chains), jax.random.split(k_draw, num_chains), u_init
        )
        stats, divergences, step_size, accept, u1, u2, u_max, climb = outs[:8]
        u_mean = jnp.mean(u1, axis=0)  # pooled over chains of equal length
        u_sd = jnp.sqrt(jnp.maximum(jnp.mean(u2, axis=0) - u_mean**2, 0.0))
        positions = (u_mean, u_sd, jnp.max(u_max), jnp.max(jnp.nan_to_num(climb, nan=jnp.inf)))
        return (stats, jnp.sum(divergences), step_size, accept) + positions + tuple(outs[8:])

    return one_eta


_SAMPLER_CACHE: dict[tuple, Callable] = {}


def _batched_fn(family, settings: tuple, sharded: bool, builder: Callable = _one_eta_fn,
                num_inputs: int = 2):
    """jit(vmap over eta [sharded over local devices]) of ``builder(family, *settings)``.

    Cached per family (equal families share it, see ``ExponentialFamily.cache_key``), builder
    and settings, so repeated calls, retries with equal settings and equal family instances
    reuse the compiled sampler.
    """
    devices = tuple(jax.local_devices()) if sharded else None
    cache_key = (family, builder, settings, devices)  # the family keeps id-based keys unique
    fn = _SAMPLER_CACHE.get(cache_key)
    if fn is None:
        fn = jax.vmap(builder(family, *settings))
        if sharded:
            mesh = Mesh(np.array(devices), ("eta",))
            fn = jax.shard_map(fn, mesh=mesh, in_specs=(P("eta"),) * num_inputs,
                               out_specs=P("eta"), check_vma=False)
        fn = jax.jit(fn)
        _SAMPLER_CACHE[cache_key] = fn
    return fn


def _pad(a: Array, size: int) -> Array:
    """Pad axis 0 to ``size`` by repeating the last row (a valid eta/key: no NaN from padding)."""
    n = a.shape[0]
    if n == size:
        return a
    return jnp.concatenate([a, jnp.repeat(a[-1:], size - n, axis=0)], axis=0)


def _run_flat(family, etas: Array, keys: Array, *, num_chains, num_warmup, num_samples,
              target_acceptance_rate, return_x, batch_size: int | None = None) -> NUTSDraws:
    """Run on etas (n, D) with one key per eta; n is padded to ``batch_size`` and to a multiple
    of the local device count (sharded path) unless the inputs are traced."""
    _check_settings(num_chains, num_warmup, num_samples)
    settings = (int(num_chains), int(num_warmup), int(num_samples),
                float(target_acceptance_rate), bool(return_x))
    n = etas.shape[0]
    traced = isinstance(etas, jax.core.Tracer) or isinstance(keys, jax.core.Tracer)
    if traced:
        out = _batched_fn(family, settings, sharded=False)(keys, etas)
    else:
        num_devices = len(jax.local_devices())
        size = max(n, batch_size or 0)
        size = -(-size // num_devices) * num_devices
        out = _batched_fn(family, settings, sharded=True)(_pad(keys, size), _pad(etas, size))
        out = tuple(o[:n] for o in out)
    return NUTSDraws(*out[:8], out[8] if return_x else None)


def _check_settings(num_chains, num_warmup, num_samples):
    for name, value, least in (("num_chains", num_chains, 1), ("num_warmup", num_warmup, 1),
                               ("num_samples", num_samples, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def as_key(key) -> Array:
    """A typed jax.random key (legacy uint32 keys are wrapped)."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"key must be a single jax.random key, got shape {key.shape}")
        return key
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(f"key must be a jax.random key, got {key.dtype}{list(key.shape)}")
    return jax.random.wrap_key_data(key)


def _point_keys(key: Array, indices) -> Array:
    root = jax.random.fold_in(key, 0)
    return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(indices, jnp.uint32))


def _attempt_keys(point_keys: Array, attempt: int) -> Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, attempt))(point_keys)


def _float_etas(family: ExponentialFamily, etas) -> Array:
    etas = jnp.asarray(etas)
    if not jnp.issubdtype(etas.dtype, jnp.floating):
        etas = etas.astype(jnp.result_type(float))
    return family.check_eta(etas)


def run_nuts(
    family: ExponentialFamily,
    etas: Array,
    *,
    key: Array,
    num_chains: int = 4,
    num_warmup: int = 500,
    num_samples: int = 1000,
    target_acceptance_rate: float = 0.8,
    return_x: bool = False,
) -> NUTSDraws:
    """Independent adapted NUTS chains on p(x | eta) ∝ h(x) exp(eta . T(x)) for each eta.

    ``etas`` has shape ``batch + (stat_dim,)`` (usually ``(n_eta, stat_dim)``). Each chain starts
    at u ~ Uniform(-2, 2) in unconstrained space, runs ``num_warmup`` steps of BlackJAX window
    adaptation, then ``num_samples`` NUTS steps. Returns :class:`NUTSDraws` with
    ``statistics`` of shape ``batch + (num_chains, num_samples, stat_dim)``.
    """
    etas = family.validate_natural(_float_etas(family, etas))
    key = as_key(key)
    batch = etas.shape[:-1]
    flat = etas.reshape((-1, family.stat_dim))
    n = flat.shape[0]
    draws = _run_flat(
        family, flat, _point_keys(key, np.arange(n)), num_chains=num_chains,
        num_warmup=num_warmup, num_samples=num_samples,
        target_acceptance_rate=target_acceptance_rate, return_x=return_x,
    )
    return NUTSDraws(*(None if a is None else a.reshape(batch + a.shape[1:]) for a in draws))


def sample_family(
    family: ExponentialFamily,
    eta: Array,
    *,
    key: Array,
    sample_shape: tuple[int, ...] = (),
    num_chains: int = 2,
    num_warmup: int = 300,
    target_acceptance_rate: float = 0.8,
) -> Array:
    """Draws x ~ p(x | eta) by NUTS, shape ``sample_shape + batch + event_shape``.

    ``eta`` has shape ``batch + (stat_dim,)``. The prod(sample_shape) draws per eta are taken
    round-robin over ``num_chains`` chains of ceil(prod(sample_shape) / num_chains) draws each,
    after ``num_warmup`` adaptation steps (draws are exact only up to MCMC error). Works under
    ``jax.jit`` (eta and key may be traced).
    """
    eta = family.validate_natural(_float_etas(family, eta))
    key = as_key(key)
    sample_shape = tuple(int(s) for s in sample_shape)
    batch = eta.shape[:-1]
    flat = eta.reshape((-1, family.stat_dim))
    n_eta, n_draws = flat.shape[0], math.prod(sample_shape)
    per_chain = max(1, -(-n_draws // num_chains))
    draws = _run_flat(
        family, flat, _point_keys(key, np.arange(n_eta)), num_chains=num_chains,
        num_warmup=num_warmup, num_samples=per_chain,
        target_acceptance_rate=target_acceptance_rate, return_x=True,
    )
    x = draws.x  # (n_eta, C, S) + event
    event = x.shape[3:]
    x = jnp.swapaxes(x, 1, 2).reshape((n_eta, -1) + event)[:, :n_draws]  # round-robin
    x = jnp.moveaxis(x, 1, 0)
    return x.reshape(sample_shape + batch + event)


# ---------------------------------------------------------------------------------------------
# adaptive tempered SMC (multimodal members)
# ---------------------------------------------------------------------------------------------
class SMCSettings(NamedTuple):
    """Adaptive tempered SMC: ``num_runs`` independent runs of ``num_particles`` particles; each
    tempering step resamples, moves every particle by ``num_mcmc_steps`` HMC steps of
    ``num_integration_steps`` leapfrogs, and picks the next temperature so that the weights keep
    an ESS of ``target_ess`` * num_particles; at most ``max_steps`` tempering steps."""

    num_runs: int = 10
    num_particles: int = 512
    num_mcmc_steps: int = 10
    num_integration_steps: int = 5
    target_ess: float = 0.9
    max_steps: int = 200


class SMCDraws(NamedTuple):
    """Output of :func:`run_smc` for n etas (R runs, N particles, D statistics).

    run_mean: E[T] estimated by each run, (n, R, D). statistics: T at the final particles (equal
    weights after a resample-move step at beta = 1), (n, R, N, D). log_z: each run's estimate of
    A(eta), (n, R). num_steps: tempering steps per run, (n, R). finished: beta reached 1, (n, R).
    """

    run_mean: Array
    statistics: Array
    log_z: Array
    num_steps: Array
    finished: Array


def _check_num_runs(num_runs: int) -> None:
    if num_runs < 4:
        raise ValueError(f"SMCSettings.num_runs must be >= 4 (the across-run MCSE is Student-t "
                         f"with num_runs - 1 degrees of freedom), got {num_runs}")


def _smc_one_eta_fn(family, num_runs, num_particles, num_mcmc_steps, num_integration_steps,
                    target_ess, max_steps):
    """(key, eta, ref_mean, ref_sd) -> per-eta outputs of ``num_runs`` tempered SMC runs.

    Path in unconstrained space u (flat, d): pi_beta(u) ∝ q(u)^(1 - beta) p(u | eta)^beta,
    q = N(ref_mean, diag ref_sd^2), beta from 0 to 1 (BlackJAX adaptive tempered SMC).
    HMC moves use the particles' weighted variance as inverse mass matrix and a step size
    adapted towards an acceptance rate of 0.65 between tempering steps.
    """
    u_shape = _unconstrained_shape(family)
    dim = math.prod(u_shape)
    hmc_step = functools.partial(blackjax.hmc.build_kernel(),
                                 num_integration_steps=num_integration_steps)

    def one_eta(key, eta, ref_mean, ref_sd):
        to_x, logdensity = engine_maps(family, eta)

        def log_ref(u):
            return jnp.sum(jax.scipy.stats.norm.logpdf(u, ref_mean, ref_sd))

        def log_lik(u):
            return logdensity(u.reshape(u_shape)) - log_ref(u)

        kernel = adaptive_tempered.build_kernel(
            log_ref, log_lik, hmc_step, blackjax.hmc.init, resampling.systematic, target_ess,
        )

        def move(carry):
            state, log_eps, log_z, i, k = carry
            k, k_step = jax.random.split(k)
            mean = state.weights @ state.particles
            var = state.weights @ (state.particles - mean) ** 2
            params = {"step_size": jnp.exp(log_eps)[None],
                      "inverse_mass_matrix": jnp.maximum(var, jnp.finfo(var.dtype).tiny)[None]}
            state, info = kernel(k_step, state, num_mcmc_steps, params)
            accept = jnp.nan_to_num(jnp.mean(info.update_info.acceptance_rate))
            return state, log_eps + accept - 0.65, log_z + info.log_likelihood_increment, i + 1, k

        def one_run(k):
            k_init, k_loop = jax.random.split(k)
            u0 = ref_mean + ref_sd * jax.random.normal(k_init, (num_particles, dim), eta.dtype)
            carry = (adaptive_tempered.init(u0), jnp.log(jnp.asarray(0.5, eta.dtype)),
                     jnp.zeros((), eta.dtype), jnp.zeros((), jnp.int32), k_loop)
            carry = jax.lax.while_loop(
                lambda c: (c[0].tempering_param < 1) & (c[3] < max_steps), move, carry
            )
            finished = carry[0].tempering_param >= 1
            state, _, log_z, steps, _ = move(carry)  # resample-move at beta = 1: equal weights
            stats = jax.vmap(lambda u: family.sufficient_statistics(to_x(u.reshape(u_shape))))(
                state.particles
            )
            run_mean = jnp.where(finished, jnp.mean(stats, axis=0), jnp.nan)
            return run_mean, stats, log_z, steps, finished

        return jax.vmap(one_run)(jax.random.split(key, num_runs))

    return one_eta


def run_smc(family: ExponentialFamily, etas: Array, *, key: Array,
            settings: SMCSettings | None = None, ref_mean: Array | None = None,
            ref_sd: Array | None = None, batch_size: int | None = None) -> SMCDraws:
    """Adaptive tempered SMC on p(x | eta) for each row of ``etas`` (n, stat_dim), run in
    unconstrained space from the reference N(ref_mean, ref_sd^2) (default N(0, 2^2) per
    coordinate; shapes (n, d)). Point i uses ``fold_in(fold_in(key, 0), i)``."""
    etas = family.validate_natural(_float_etas(family, etas))
    settings = settings or SMCSettings()
    _check_num_runs(settings.num_runs)
    n = etas.shape[0]
    dim = math.prod(_unconstrained_shape(family))
    ref_mean = jnp.zeros((n, dim), etas.dtype) if ref_mean is None else jnp.asarray(ref_mean)
    ref_sd = jnp.full((n, dim), 2.0, etas.dtype) if ref_sd is None else jnp.asarray(ref_sd)
    return _run_smc_flat(family, etas, _point_keys(as_key(key), np.arange(n)), settings,
                         ref_mean.astype(etas.dtype), ref_sd.astype(etas.dtype), batch_size)


def _run_smc_flat(family, etas, keys, settings: SMCSettings, ref_mean, ref_sd,
                  batch_size: int | None) -> SMCDraws:
    n = etas.shape[0]
    size = max(n, batch_size or 0)
    num_devices = len(jax.local_devices())
    size = -(-size // num_devices) * num_devices
    fn = _batched_fn(family, tuple(settings), True, _smc_one_eta_fn, 4)
    out = fn(*(_pad(a, size) for a in (keys, etas, ref_mean, ref_sd)))
    return SMCDraws(*(o[:n] for o in out))


def smc_diagnostics(draws: SMCDraws) -> dict[str, np.ndarray]:
    """Diagnostics of :func:`run_smc` output, in the form of :func:`compute_diagnostics`.

    mean = average of the R run means; mcse = sd of the run means / sqrt(R) (independent runs:
    an honest error whatever the particles' correlation) times sqrt((R - 1) / (R - 3)): with the
    sd estimated from R runs, error / (sd / sqrt(R)) is Student-t with R - 1 degrees of freedom,
    whose variance is (R - 1) / (R - 3) (1.29 for R = 10), so that error / mcse has unit variance
    as for a NUTS point; ess_bulk = ess_tail = Var[T] / mcse^2;
    cov from all final particles; rhat = rank-normalised split R-hat with the runs as chains
    (runs that disagree, e.g. on the weights of modes, fail it); divergences 0 (HMC moves are
    Metropolis-corrected: a divergent proposal is a rejection, and the run-to-run spread carries
    any loss of accuracy).
    """
    run_mean = np.asarray(draws.run_mean, np.float64)
    out = compute_diagnostics(draws.statistics)
    runs = run_mean.shape[1]
    _check_num_runs(runs)
    mean = run_mean.mean(axis=1)
    mcse = run_mean.std(axis=1, ddof=1) / math.sqrt(runs) * math.sqrt((runs - 1) / (runs - 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        ess = np.diagonal(out["cov"], axis1=-2, axis2=-1) / mcse**2
    out.update(mean=mean, mcse=mcse, ess_bulk=ess, ess_tail=ess.copy())
    return out


# ---------------------------------------------------------------------------------------------
# diagnostics
# ---------------------------------------------------------------------------------------------
def compute_diagnostics(statistics, divergences=None) -> dict[str, np.ndarray]:
    """Per-eta, per-statistic diagnostics of draws of shape ``(n_eta, chain, draw, stat_dim)``.

    Returns float64/int64 numpy arrays: ``mean`` (n, D) and ``cov`` (n, D, D) pooled over chains
    (cov with ddof=1), ``ess_bulk``, ``ess_tail`` (``az.ess(method='bulk'/'tail')``), ``rhat``
    (``az.rhat``, rank-normalised split R-hat) and ``mcse`` (``az.mcse`` of the mean), each
    (n, D), and ``divergences`` (n,) (zeros if not given). The four ArviZ diagnostics come from
    :mod:`numpyro_nnef.diagnostics`, a vectorised NumPy port that matches ArviZ 0.23 to float
    rounding, for all etas and statistics at once.
    """
    draws = np.asarray(statistics, dtype=np.float64)
    if draws.ndim != 4:
        raise ValueError(f"draws must have shape (n_eta, chain, draw, stat_dim), got {draws.shape}")
    n, chains, num_draws, dim = draws.shape
    flat = draws.reshape(n, chains * num_draws, dim)
    mean = flat.mean(axis=1)
    centred = flat - mean[:, None, :]
    cov = np.einsum("nsi,nsj->nij", centred, centred) / max(chains * num_draws - 1, 1)
    per_chain = np.moveaxis(draws, 0, 2)  # (chain, draw, n, D)
    if divergences is None:
        divergences = np.zeros(n, np.int64)
    return {
        "mean": mean,
        "cov": cov,
        "ess_bulk": ess_bulk(per_chain),
        "ess_tail": ess_tail(per_chain),
        "rhat": rhat(per_chain),
        "mcse": mcse_mean(per_chain),
        "divergences": np.array(divergences, np.int64).reshape(n),
    }


def passes_diagnostics(diagnostics: dict[str, np.ndarray], *, min_ess: float = 400,
                       max_rhat: float = 1.01) -> np.ndarray:
    """Boolean (n,): every statistic has r_hat <= max_rhat and ess_bulk, ess_tail >= min_ess,
    the mean is finite and there was no divergence (NaN diagnostics fail)."""
    d = diagnostics
    ok = (d["rhat"] <= max_rhat) & (d["ess_bulk"] >= min_ess) & (d["ess_tail"] >= min_ess)
    ok &= np.isfinite(d["mean"])
    return np.all(ok, axis=-1) & (d["divergences"] == 0)


# ---------------------------------------------------------------------------------------------
# eta boxes
# ---------------------------------------------------------------------------------------------
_SCALES = ("uniform", "log-uniform")


def sample_etas(
    family: ExponentialFamily,
    *,
    key: Array,
    low: Sequence[float] | Array,
    high: Sequence[float] | Array,
    num: int,
    scale: str | Sequence[str] = "uniform",
) -> np.ndarray:
    """``num`` etas in the box [low, high] (arrays of shape (stat_dim,)), float64 (num, stat_dim).

    ``scale`` ("uniform", "log-uniform", or one per coordinate): uniform draws eta_i ~ U(low_i,
    high_i); log-uniform draws log|eta_i| ~ U(log|low_i|, log|high_i|) and needs bounds of one
    sign (for a negative box, |eta_i| is log-uniform and the sign is kept). Coordinates with
    low_i == high_i are fixed. Raises :class:`OutOfDomainError` (naming the family and its
    natural domain) if the box corners or the sampled points leave the natural domain.
    """
    dim = family.stat_dim
    low = np.asarray(low, dtype=np.float64)
    high = np.asarray(high, dtype=np.float64)
    for name, bound in (("low", low), ("high", high)):
        if bound.shape != (dim,):
            raise ValueError(
                f"{family.name}: {name} must have shape ({dim},) (statistics "
                f"{family.stat_labels}), got {bound.shape}"
            )
        if not np.all(np.isfinite(bound)):
            raise ValueError(f"{family.name}: {name} must be finite, got {bound.tolist()}")
    if np.any(low > high):
        raise ValueError(f"{family.name}: need low <= high, got low={low.tolist()}, "
                         f"high={high.tolist()}")
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num must be a positive integer, got {num!r}")
    scales = [scale] * dim if isinstance(scale, str) else list(scale)
    if len(scales) != dim:
        raise ValueError(f"{family.name}: scale needs one entry per statistic ({dim}), "
                         f"got {len(scales)}")
    for i, s in enumerate(scales):
        if s not in _SCALES:
            raise ValueError(f"scale must be one of {_SCALES}, got {s!r}")
        if s == "log-uniform" and not (low[i] > 0 or high[i] < 0):
            raise ValueError(
                f"{family.name}: log-uniform scale for {family.stat_labels[i]!r} needs bounds "
                f"of one sign (both > 0 or both < 0), got [{low[i]}, {high[i]}]"
            )
    log_mask = np.array([s == "log-uniform" for s in scales])

    def describe():
        domain = family.natural_constraint
        return domain.description if domain is not None else "all finite eta"

    # the corners of the box (only where cheap: at most 2^12 of them)
    if dim <= 12:
        corners = np.array(np.meshgrid(*zip(low, high, strict=True), indexing="ij"))
        corners = corners.reshape(dim, -1).T
        inside = np.asarray(family.in_domain(jnp.asarray(corners)))
        if not inside.all():
            # a coordinate bound is to blame where every corner on it is outside
            blamed = [f"eta[{family.stat_labels[i]}] = {bound[i]:g} (the {name} bound)"
                      for i in range(dim) for name, bound in (("low", low), ("high", high))
                      if not inside[corners[:, i] == bound[i]].any()]
            raise OutOfDomainError(
                f"{family.name}: the eta box low={low.tolist()}, high={high.tolist()} is not "
                f"inside the natural domain ({describe()}): "
                + (f"coordinate {', '.join(blamed)} is outside for every value of the others"
                   if blamed else f"e.g. the corner {corners[~inside][0].tolist()} is outside")
            )

    u = np.asarray(jax.random.uniform(as_key(key), (num, dim), dtype=jnp.float32))
    u = u.astype(np.float64)
    sign = np.where(high < 0, -1.0, 1.0)
    with np.errstate(divide="ignore"):
        log_lo = np.where(log_mask, np.log(np.abs(np.where(sign < 0, high, low))), 0.0)
        log_hi = np.where(log_mask, np.log(np.abs(np.where(sign < 0, low, high))), 0.0)
    etas_uniform = low + u * (high - low)
    etas_log = sign * np.exp(log_lo + u * (log_hi - log_lo))
    etas = np.where(log_mask, etas_log, etas_uniform)
    etas = np.clip(etas, low, high)  # rounding in exp/log must not leave the box
    inside = np.asarray(family.in_domain(jnp.asarray(etas)))
    if not inside.all():
        raise OutOfDomainError(
            f"{family.name}: {int((~inside).sum())} of {num} etas sampled from the box "
            f"low={low.tolist()}, high={high.tolist()} are outside the natural domain "
            f"({describe()}); e.g. eta = {etas[~inside][0].tolist()}"
        )
    return etas


# ---------------------------------------------------------------------------------------------
# dataset generation
# ---------------------------------------------------------------------------------------------
_CHUNK_ARRAYS = ("mean", "cov", "ess_bulk", "ess_tail", "rhat", "mcse", "divergences",
                 "num_samples", "retries", "passed", "smc", "cause")
_DATASET_ARRAYS = _CHUNK_ARRAYS[:-2]
IMPROPER_U = 1e8  # chains beyond |u| = 1e8 in unconstrained space: taken as running off
IMPROPER_CLIMB = 50.0  # a chain whose log density rises by 50 nats over its draws: climbing


class CheckpointMismatchError(ValueError):
    """A checkpoint directory holds chunks of another run (names the settings that differ)."""


def _flat_items(d: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_items(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("numpyro-nnef")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


class _Checkpoint:
    """A directory of finished chunks (``chunk_00000.npz``) plus ``manifest.json``."""

    def __init__(self, directory, fingerprint: str, description: dict):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / "manifest.json"
        if manifest.exists():
            try:
                found = json.loads(manifest.read_text())
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"checkpoint directory {str(self.directory)!r}: unreadable manifest.json "
                    f"({err}); use another directory"
                ) from err
            if not isinstance(found, dict) or found.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(
                    f"checkpoint directory {str(self.directory)!r} does not hold "
                    "generate_dataset checkpoints; use another directory"
                )
            if found.get("fingerprint") != fingerprint:
                old = _flat_items(found.get("run", {}) if isinstance(found.get("run"), dict)
                                  else {})
                new = _flat_items(description)
                diff = [f"{k} ({old.get(k, 'absent')!r} there, {new.get(k, 'absent')!r} here)"
                        for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
                raise CheckpointMismatchError(
                    f"checkpoint directory {str(self.directory)!r} belongs to a different run; "
                    f"differs in: {'; '.join(diff) or 'fingerprint'}. Use another directory "
                    "or the same family, etas, key and sampler settings"
                )
        else:
            text = json.dumps({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                               "fingerprint": fingerprint, "run": description}, indent=1)
            atomic_write(manifest, lambda f: f.write(text.encode()))

    def path(self, index: int) -> Path:
        return self.directory / f"chunk_{index:05d}.npz"

    def load(self, index: int, eta: np.ndarray) -> dict[str, np.ndarray] | None:
        path = self.path(index)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as err:
            warnings.warn(f"ignoring unreadable checkpoint chunk {path} ({err}); recomputing",
                          stacklevel=3)
            return None
        if (str(data.get("fingerprint", "")) != self.fingerprint
                or data.get("eta", np.empty(0)).shape != eta.shape
                or not np.array_equal(data["eta"], eta)):
            raise CheckpointMismatchError(
                f"checkpoint chunk {str(path)!r} does not match this run's etas and settings; "
                "use another checkpoint directory"
            )
        missing = [k for k in _CHUNK_ARRAYS if k not in data]
        if missing:
            raise ValueError(f"checkpoint chunk {str(path)!r} lacks arrays {missing}")
        return {k: data[k] for k in _CHUNK_ARRAYS}

    def save(self, index: int, eta: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        payload = dict(arrays, eta=eta, fingerprint=np.array(self.fingerprint))
        atomic_write(self.path(index), lambda f: np.savez(f, **payload))


def _improper(d: dict[str, np.ndarray], u_max: np.ndarray, climb: np.ndarray) -> np.ndarray:
    """(n,) bool: non-finite mean statistics, chains beyond |u| = IMPROPER_U, or a chain whose
    log density rose by more than IMPROPER_CLIMB nats over its draws (heuristics for A = inf)."""
    return (~np.all(np.isfinite(d["mean"]), axis=-1) | ~(u_max <= IMPROPER_U)
            | ~(climb <= IMPROPER_CLIMB))


def _failure_causes(d: dict[str, np.ndarray], passed: np.ndarray, u_max: np.ndarray,
                    climb: np.ndarray, labels: Sequence[str], min_ess: float, max_rhat: float
                    ) -> np.ndarray:
    """One string per point: '' if it passed, else every failed check in words."""
    improper = _improper(d, u_max, climb)
    causes = []
    for i in range(passed.shape[0]):
        parts = []
        if improper[i]:
            parts.append(f"the member looks improper here (A(eta) = inf): chains reached |u| = "
                         f"{u_max[i]:.3g}, their log density rose by {climb[i]:.3g} over the "
                         "draws, or statistics were not finite")
        if d["divergences"][i] > 0:
            parts.append(f"{int(d['divergences'][i])} divergent transitions")
        for j, label in enumerate(labels):
            if not d["rhat"][i, j] <= max_rhat:
                parts.append(f"r_hat {d['rhat'][i, j]:.4g} > {max_rhat} for {label}")
            for name in ("ess_bulk", "ess_tail"):
                if not d[name][i, j] >= min_ess:
                    parts.append(f"{name} {d[name][i, j]:.4g} < {min_ess} for {label}")
        causes.append("" if passed[i] else "; ".join(parts))
    return np.array(causes, dtype=str)


def _in_worker(fn: Callable[[], dict]) -> dict:
    """fn() on a daemon thread while this thread waits: SIGINT (and SIGTERM, see
    :func:`generate_dataset`) raise KeyboardInterrupt here at once, even while XLA compiles or
    runs; the abandoned thread finishes its current call alone and its result is dropped."""
    box: dict[str, object] = {}
    done = threading.Event()

    def run():
        try:
            box["value"] = fn()
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err
        finally:
            done.set()

    threading.Thread(target=run, name="numpyro_nnef.generate_dataset", daemon=True).start()
    done.wait()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _raise_interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: stop like Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")


def generate_dataset(
    family: ExponentialFamily,
    etas: Array,
    *,
    key: Array,
    num_chains: int = 4,
    num_warmup: int = 500,
    num_samples: int = 1000,
    chunk_size: int = 50,
    checkpoint_dir: str | os.PathLike | None = None,
    max_retries: int = 2,
    min_ess: float = 400,
    max_rhat: float = 1.01,
    target_acceptance_rate: float = 0.8,
    sampler: str = "nuts",
    fallback: str | None = "smc",
    smc: SMCSettings | None = None,
    progress: bool = True,
    callback: Callable[[int, int, int], None] | None = None,
) -> ExpectationDataset:
    """Estimates of mu(eta) = E[T(x) | eta] and Cov[T(x) | eta] for each row of ``etas``.

    ``etas`` (N, stat_dim) must lie in the natural domain (else :class:`OutOfDomainError`) and T
    must be finite on the support (else ValueError). Work runs chunk by chunk (``chunk_size``
    etas, vectorised, sharded over local devices).

    ``sampler="nuts"`` (default): adapted NUTS chains. A point fails if some statistic has r_hat
    > ``max_rhat`` or ess_bulk/ess_tail < ``min_ess``, or there was a divergence; failing points
    are re-run with new keys and at least 2^r times the chains at retry r (free slots of the
    retry batch give more), up to ``max_retries`` times, all through one compiled program (the
    first attempt's for runs of at most 4 chunks, else one of 8 eta per device), and then,
    with ``fallback="smc"``, once by adaptive tempered SMC (:func:`run_smc`, reference fitted to
    the NUTS draws; ``retries = max_retries + 1``, ``extras["tempered_smc"]``), which mixes
    over modes that stuck chains cannot. ``sampler="smc"`` runs SMC for every point (advised for
    families known to be multimodal: chains that all stick in one mode pass every diagnostic).
    SMC points carry the across-run MCSE (:func:`smc_diagnostics`). Points still failing are
    flagged ``passed=False`` (trainers drop them); ``metadata["failures"]`` names each one's
    causes (an improper member, A(eta) = inf, is reported as such and not retried).

    With ``checkpoint_dir`` each finished chunk is written atomically and a rerun with the same
    arguments resumes from them ("resumed N of M chunks" on stderr); a directory of another run
    raises :class:`CheckpointMismatchError` naming the settings that differ. SIGINT and SIGTERM
    raise KeyboardInterrupt at once (the chunk in progress is abandoned, finished chunks are
    kept). ``callback(chunk_index, points_done, num_points)`` is called after each chunk.
    """
    key = as_key(key)
    _check_settings(num_chains, num_warmup, num_samples)
    for name, value, least in (("chunk_size", chunk_size, 1), ("max_retries", max_retries, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if sampler not in ("nuts", "smc"):
        raise ValueError(f"sampler must be 'nuts' or 'smc', got {sampler!r}")
    if fallback not in ("smc", None):
        raise ValueError(f"fallback must be 'smc' or None, got {fallback!r}")
    smc = smc or SMCSettings()
    _check_num_runs(smc.num_runs)
    etas_np = np.asarray(etas, dtype=np.float64)
    if etas_np.ndim != 2 or etas_np.shape[1] != family.stat_dim or etas_np.shape[0] == 0:
        raise ValueError(
            f"{family.name}: etas must have shape (N, {family.stat_dim}) with N >= 1 "
            f"(statistics {family.stat_labels}), got {etas_np.shape}"
        )
    support_transform(family)  # a discrete support: a clear error before any work
    family.validate_natural(jnp.asarray(etas_np))
    family.check_statistics(jax.random.fold_in(key, 1))

    num_points = etas_np.shape[0]
    settings = {
        "sampler": "blackjax.nuts+window_adaptation" if sampler == "nuts"
        else "blackjax.adaptive_tempered_smc",
        "num_chains": int(num_chains), "num_warmup": int(num_warmup),
        "num_samples": int(num_samples), "chunk_size": int(chunk_size),
        "max_retries": int(max_retries), "min_ess": float(min_ess),
        "max_rhat": float(max_rhat), "target_acceptance_rate": float(target_acceptance_rate),
        "fallback": fallback, "smc": smc._asdict(),
        "unconstrained": "support_transform (softplus for x >= 0, biject_to otherwise) with "
                         "log|det J|; circle cut at its lowest-density grid angle",
    }
    key_info = {"impl": str(jax.random.key_impl(key)),
                "data": np.asarray(jax.random.key_data(key)).tolist()}
    run_description = {
        "family": family.name, "stat_labels": list(family.stat_labels),
        "num_points": num_points,
        "etas_sha256": hashlib.sha256(np.ascontiguousarray(etas_np).tobytes()).hexdigest(),
        "key": key_info, "settings": settings,
        "x64": bool(jax.config.jax_enable_x64),
    }
    fingerprint = hashlib.sha256(
        json.dumps(run_description, sort_keys=True).encode()
    ).hexdigest()
    checkpoint = (_Checkpoint(checkpoint_dir, fingerprint, run_description)
                  if checkpoint_dir is not None else None)

    jax_etas = _float_etas(family, etas_np)
    all_keys = _point_keys(key, np.arange(num_points))
    num_devices = len(jax.local_devices())
    batch = -(-min(chunk_size, num_points) // num_devices) * num_devices
    dim = math.prod(_unconstrained_shape(family))
    starts = list(range(0, num_points, chunk_size))

    def passes(d):
        return passes_diagnostics(d, min_ess=min_ess, max_rhat=max_rhat)

    smc_batch = min(batch, 8 * num_devices)

    def run_smc_points(points, attempt, ref_mean, ref_sd):
        """SMC for the etas ``points``, in calls of one fixed batch shape (one compilation)."""
        keys = _attempt_keys(all_keys[points], attempt)
        parts = [_run_smc_flat(family, jax_etas[points[sl]], keys[sl], smc,
                               jnp.asarray(ref_mean[sl], jax_etas.dtype),
                               jnp.asarray(ref_sd[sl], jax_etas.dtype), smc_batch)
                 for sl in (slice(i, i + smc_batch) for i in range(0, points.size, smc_batch))]
        return smc_diagnostics(SMCDraws(*(np.concatenate(f) for f in zip(*parts, strict=True))))

    # retries of a short run go through the first attempt's program (no compilation); a longer
    # run compiles one small retry program once, so that a few failing points are cheap to redo
    retry_batch = batch if len(starts) <= 4 else min(batch, 8 * num_devices)

    def dispatch_nuts(points, attempt, replicas) -> list[NUTSDraws]:
        """Start NUTS for the etas ``points`` (JAX dispatches asynchronously): ``replicas``
        independent runs of num_chains chains each, in calls of a fixed batch shape (one
        compiled program for first attempts, one for all retries)."""
        size = batch if attempt == 0 else retry_batch
        rows = np.repeat(points, replicas)
        keys = _attempt_keys(all_keys[rows], attempt)
        if replicas > 1:
            keys = jax.vmap(jax.random.fold_in)(
                keys, jnp.asarray(np.tile(np.arange(replicas), points.size), jnp.uint32))
        return [_run_flat(family, jax_etas[rows[i:i + size]], keys[i:i + size],
                          num_chains=num_chains, num_warmup=num_warmup, num_samples=num_samples,
                          batch_size=size, target_acceptance_rate=target_acceptance_rate,
                          return_x=False)
                for i in range(0, rows.size, size)]

    def collect_nuts(parts: list[NUTSDraws], n: int, replicas: int) -> tuple:
        """Pool each point's replicas as replicas * num_chains chains: (diagnostics, u mean,
        u sd, u_max, climb)."""
        d = NUTSDraws(*(None if f[0] is None else np.concatenate([np.asarray(a) for a in f])
                        for f in zip(*parts, strict=True)))
        stats = d.statistics.reshape((n, replicas * num_chains) + d.statistics.shape[2:])
        diagnostics = compute_diagnostics(stats, d.divergences.reshape(n, replicas).sum(1))
        u_mean = d.u_mean.reshape(n, replicas, -1)
        second = (d.u_sd.reshape(n, replicas, -1) ** 2 + u_mean**2).mean(1)
        u_sd = np.sqrt(np.maximum(second - u_mean.mean(1) ** 2, 0.0))
        return (diagnostics, u_mean.mean(1), u_sd, d.u_max.reshape(n, replicas).max(1),
                d.climb.reshape(n, replicas).max(1))

    def compute(lo: int, hi: int, first: list[NUTSDraws] | None) -> dict[str, np.ndarray]:
        """All attempts for the points lo..hi-1 (``first``: their first NUTS attempt, if it was
        dispatched already)."""
        idx = np.arange(lo, hi)
        n = hi - lo
        u_max, climb = np.zeros(n), np.zeros(n)
        if sampler == "smc":
            out = run_smc_points(idx, 0, np.zeros((n, dim)), np.full((n, dim), 2.0))
            out.update(num_samples=np.full(n, smc.num_particles, np.int64),
                       retries=np.zeros(n, np.int64), smc=np.ones(n, bool))
            passed = passes(out)
        else:
            first = dispatch_nuts(idx, 0, 1) if first is None else first
            out, ref_mean, ref_sd, u_max, climb = collect_nuts(first, n, 1)
            out.update(num_samples=np.full(n, num_samples, np.int64),
                       retries=np.zeros(n, np.int64), smc=np.zeros(n, bool))
            passed = passes(out)
            for attempt in range(1, max_retries + 1):
                failing = np.flatnonzero(~passed & ~_improper(out, u_max, climb))
                if failing.size == 0:
                    break
                # at least 2^attempt times the chains; free slots of the retry batch get more
                replicas = max(2**attempt, retry_batch // failing.size)
                again, m, sd, u_max[failing], climb[failing] = collect_nuts(
                    dispatch_nuts(idx[failing], attempt, replicas), failing.size, replicas)
                for name, value in again.items():
                    out[name][failing] = value
                ref_mean[failing], ref_sd[failing] = m, sd
                out["retries"][failing] = attempt
                passed[failing] = passes(again)
            failing = np.flatnonzero(~passed & ~_improper(out, u_max, climb))
            if fallback == "smc" and failing.size:
                # reference N(mean, (2 sd)^2) of the pooled chains: it spans every mode they saw
                m, sd = ref_mean[failing], 2.0 * ref_sd[failing]
                usable = np.isfinite(m) & np.isfinite(sd) & (sd > 0)
                again = run_smc_points(idx[failing], max_retries + 1, np.where(usable, m, 0.0),
                                       np.where(usable, sd, 2.0))
                for name, value in again.items():
                    out[name][failing] = value
                out["num_samples"][failing] = smc.num_particles
                out["retries"][failing] = max_retries + 1
                out["smc"][failing] = True
                u_max[failing], climb[failing] = 0.0, 0.0
                passed[failing] = passes(again)
        out["passed"] = passed
        out["cause"] = _failure_causes(out, passed, u_max, climb, family.stat_labels, min_ess,
                                       max_rhat)
        return out

    from tqdm.auto import tqdm

    results: list[dict[str, np.ndarray]] = [
        checkpoint.load(c, etas_np[lo:lo + chunk_size]) if checkpoint is not None else None
        for c, lo in enumerate(starts)
    ]
    resumed = sum(r is not None for r in results)
    if resumed:
        print(f"resumed {resumed} of {len(starts)} chunks from {checkpoint.directory}",
              file=sys.stderr, flush=True)
    ahead: dict[int, list[NUTSDraws]] = {}

    def work(c: int) -> dict[str, np.ndarray]:
        """Chunk c, on the worker thread. The next chunk's first attempt is dispatched before
        chunk c is finished, so XLA runs two chunks at once (both cores of a CPU host busy)."""
        if sampler == "nuts":
            following = [d for d in range(c + 1, len(starts)) if results[d] is None][:1]
            for d in [c] + following:
                if d not in ahead:
                    ahead[d] = dispatch_nuts(
                        np.arange(starts[d], min(starts[d] + chunk_size, num_points)), 0, 1)
        return compute(starts[c], min(starts[c] + chunk_size, num_points), ahead.pop(c, None))

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
    failed = 0
    try:
        with tqdm(total=num_points, disable=not progress, unit="eta",
                  desc=f"{sampler.upper()} {family.name}") as bar:
            for c, lo in enumerate(starts):
                hi = min(lo + chunk_size, num_points)
                if results[c] is None:
                    results[c] = _in_worker(functools.partial(work, c))
                    if checkpoint is not None:
                        checkpoint.save(c, etas_np[lo:hi], results[c])
                failed += int((~results[c]["passed"]).sum())
                bar.update(hi - lo)
                bar.set_postfix(failed=failed)
                if callback is not None:
                    callback(c, hi, num_points)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)

    arrays = {k: np.concatenate([r[k] for r in results]) for k in _CHUNK_ARRAYS}
    failures = [{"index": int(i), "eta": etas_np[i].tolist(), "cause": str(arrays["cause"][i])}
                for i in np.flatnonzero(~arrays["passed"])]
    metadata = {
        "sampler": settings,
        "key": key_info,
        "package_version": package_version(),
        "family": family.describe(),
        "versions": {"jax": jax.__version__, "blackjax": blackjax.__version__,
                     "numpy": np.__version__},
        "num_devices": num_devices,
        "x64": bool(jax.config.jax_enable_x64),
        "failures": failures,
    }
    return ExpectationDataset(
        family_name=family.name, stat_labels=tuple(family.stat_labels), eta=etas_np,
        metadata=metadata, family=family, extras={"tempered_smc": arrays["smc"]},
        **{k: arrays[k] for k in _DATASET_ARRAYS},
    )

"""Learned samplers for a whole family: a conditional normalizing flow q(x | eta).

x = f(g(z; s(eta))) with z ~ N(0, I_d), g a conditional flow on R^d (``nn/bijections.py``),
s(eta) = (eta - eta_shift) / eta_scale and f = ``biject_to(family.support)`` (d = the size of the
unconstrained space), so

    log q(x | eta) = log N(z; 0, I) + log|det dz/du| - log|det J_f(u)|,   u = f^{-1}(x).

Training minimises the reverse KL divergence to p(x | eta) ∝ h(x) exp(eta . T(x)) averaged over
eta, which needs no samples of p: with u = g(z; s(eta)) reparameterised,

    L = E_eta E_z [log q_u(u | eta) - eta . T(f(u)) - log h(f(u)) - log|det J_f(u)|]
      = E_eta [KL(q(. | eta) || p(. | eta)) - A(eta)].

Importance sampling with weights w = h(x) exp(eta . T(x)) / r(x | eta), x ~ r, with r the flow
mixed with a wider heavy-tailed component (defensive importance sampling), gives self-normalised
estimates of E[T], Cov[T], log Z = A(eta) = log E_r[w] and ArviZ's Pareto-smoothed k-hat
(``importance_dataset``). Sampling evaluates the flow's eta-only part once per eta
(``ConditionalFlow.condition``) and only the per-draw rest for each draw.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.scipy.special import logsumexp
from tqdm.auto import tqdm

from ._io import (
    TrainingRange,
    atomic_write,
    read_record,
    restore_tree,
    save_weights_and_config,
    tree_to_npz_bytes,
)
from .dataset import ExpectationDataset
from .family import Array, ExponentialFamily
from .nn.bijections import ConditionalFlow, build_conditional_flow
from .sampling import (
    as_key,
    generate_dataset,
    package_version,
    sample_etas,
    support_transform,
    unconstrained_log_density,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FlowSampler",
    "FlowTrainingReport",
    "importance_dataset",
    "load_flow_sampler",
    "train_flow_sampler",
]

FORMAT_NAME = "numpyro_nnef.FlowSampler"
FORMAT_VERSION = 1
CONFIG_FILE = "sampler.json"
WEIGHTS_FILE = "weights.npz"
OPTIMIZER_FILE = "optimizer.npz"
PROGRESS_FILE = "training.json"
TRAINING_FORMAT = "numpyro_nnef.train_flow_sampler.checkpoint"
OUT_OF_RANGE = ("warn", "error", "ignore")
ETA_POOL_SIZE = 8192  # etas drawn once from a box; each training step picks batch_size of them
STEPS_PER_CALL = 50  # training steps per compiled call (one progress-bar update)
MIN_FINITE_DRAWS = 10  # fewer finite importance draws than this: no estimate at that eta
EQUAL_LOG_WEIGHTS = 1e-10  # log weights spread less than this count as equal (k-hat = -inf)
DEFENSIVE_DF = 5.0  # importance sampling's heavy component: Student-t degrees of freedom,
DEFENSIVE_WIDTH = 2.0  # its scale in units of the flow's sd (per unconstrained coordinate),
DEFENSIVE_PILOT = 256  # estimated from this many flow draws (drawn apart from the sample)


def _to_support(family: ExponentialFamily, u_flat: Array) -> tuple[Array, Array]:
    """(x = f(u), log|det J_f(u)|) for one unconstrained point u (d,), f = biject_to(support)."""
    transform = support_transform(family)
    u = u_flat.reshape(tuple(transform.inverse_shape(family.event_shape)))
    x = transform(u)
    return x, jnp.sum(transform.log_abs_det_jacobian(u, x))


def _normal_log_prob(z: Array) -> Array:
    """log N(z; 0, I), summed over the last axis."""
    return jnp.sum(jax.scipy.stats.norm.logpdf(z), axis=-1)


def _draws_at(graphdef: Any, family: ExponentialFamily, state: Any, shift: Array, scale: Array,
              z: Array, eta: Array) -> tuple[Array, Array]:
    """x = f(g(z; eta)) (S, event) and log|det dx/dz| (S,) for base draws z (S, d) at one eta
    (stat_dim,); the flow's eta-only part (``flow.condition``) is computed once for the S draws."""
    flow = nnx.merge(graphdef, state)
    context = flow.condition(((eta - shift) / scale).astype(z.dtype))

    def one(z_s):
        u, log_det = flow.forward_given(z_s, context)
        x, log_jf = _to_support(family, u)
        return x, log_det + log_jf

    return jax.vmap(one)(z)


def _log_prob_one(graphdef: Any, family: ExponentialFamily, state: Any, shift: Array,
                  scale: Array, x: Array, eta: Array) -> Array:
    """log q(x | eta) for one x (event_shape) and one eta (stat_dim,)."""
    transform = support_transform(family)
    flow = nnx.merge(graphdef, state)
    u = transform.inv(x)
    z, log_det = flow.inverse(u.reshape(-1), ((eta - shift) / scale).astype(u.dtype))
    log_jf = jnp.sum(transform.log_abs_det_jacobian(u, x))
    return _normal_log_prob(z) + log_det - log_jf


# Compiled once per (flow structure, family): samplers loaded or retrained with the same
# architecture and family reuse the compiled code.
@partial(jax.jit, static_argnames=("graphdef", "family", "num_samples", "with_log_q"))
def _sample_batch(state, shift, scale, key, etas, *, graphdef, family, num_samples, with_log_q):
    """num_samples draws at each of the n etas (n, stat_dim): x (num_samples, n, event) and,
    with ``with_log_q``, log q (num_samples, n)."""
    d = math.prod(support_transform(family).inverse_shape(family.event_shape))
    z = jax.random.normal(key, (num_samples, etas.shape[0], d), etas.dtype)
    draw = partial(_draws_at, graphdef, family, state, shift, scale)
    x, log_det = jax.vmap(draw, in_axes=(1, 0), out_axes=1)(z, etas)
    return (x, _normal_log_prob(z) - log_det) if with_log_q else x  # x alone: no log q work


@partial(jax.jit, static_argnames=("graphdef", "family"))
def _log_prob_pairs(state, shift, scale, x, eta, *, graphdef, family):
    return jax.vmap(partial(_log_prob_one, graphdef, family, state, shift, scale))(x, eta)


# ---------------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------------
class FlowSampler(TrainingRange):
    """q(x | eta) = a conditional flow pushed through ``biject_to(family.support)``.

    ``sample``, ``log_prob`` and ``sample_and_log_prob`` accept any batch of eta (shape
    ``batch + (stat_dim,)``) and are jit/vmap-able. An eta outside the training box
    [eta_low, eta_high] triggers a warning, an error or nothing per ``out_of_range``.
    """

    extrapolation_hint = ("the flow extrapolates there (check k-hat with importance_dataset, "
                          "pass out_of_range='ignore' to silence, or train on a wider box)")

    def __init__(
        self,
        family: ExponentialFamily,
        flow: ConditionalFlow,
        eta_shift: np.ndarray,
        eta_scale: np.ndarray,
        eta_low: np.ndarray,
        eta_high: np.ndarray,
        *,
        out_of_range: str = "warn",
        metadata: dict[str, Any] | None = None,
    ):
        if out_of_range not in OUT_OF_RANGE:
            raise ValueError(f"out_of_range must be one of {OUT_OF_RANGE}, got {out_of_range!r}")
        dim = family.stat_dim
        self.family = family
        self._u_shape = tuple(support_transform(family).inverse_shape(family.event_shape))
        if flow.dim != math.prod(self._u_shape) or flow.cond_dim != dim:
            raise ValueError(
                f"flow {flow.name!r} has dim={flow.dim}, cond_dim={flow.cond_dim}; family "
                f"{family.name} needs dim={math.prod(self._u_shape)} (unconstrained shape "
                f"{self._u_shape}) and cond_dim={dim}"
            )
        vectors = {}
        for name, value in (("eta_shift", eta_shift), ("eta_scale", eta_scale),
                            ("eta_low", eta_low), ("eta_high", eta_high)):
            value = np.asarray(value, dtype=np.float64)
            if value.shape != (dim,) or not np.all(np.isfinite(value)):
                raise ValueError(f"{name} must be a finite vector of length {dim}, got {value!r}")
            vectors[name] = value
        if np.any(vectors["eta_scale"] <= 0) or np.any(vectors["eta_low"] > vectors["eta_high"]):
            raise ValueError("need eta_scale > 0 and eta_low <= eta_high")
        self.eta_shift, self.eta_scale = vectors["eta_shift"], vectors["eta_scale"]
        self.eta_low, self.eta_high = vectors["eta_low"], vectors["eta_high"]
        self.out_of_range = out_of_range
        self.metadata = dict(metadata or {})
        self.config_flow = flow.config
        self._graphdef, self._state = nnx.split(flow)
        self.report: FlowTrainingReport | None = None  # set by train_flow_sampler

    # ---------------------------------------------------------------- the flow
    @property
    def flow(self) -> ConditionalFlow:
        """A fresh copy of the flow (changing it does not change the sampler)."""
        return nnx.merge(self._graphdef, self._state)

    @property
    def architecture(self) -> str:
        return self.config_flow["name"]

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return dict(self.config_flow["hyperparameters"])

    def _arrays(self, dtype) -> tuple[Any, Array, Array]:
        """(flow state, eta_shift, eta_scale) for the compiled functions."""
        return self._state, jnp.asarray(self.eta_shift, dtype), jnp.asarray(self.eta_scale, dtype)

    # ---------------------------------------------------------------- public API
    def _sample(self, key: Array, eta: Array, sample_shape: tuple[int, ...], with_log_q: bool
                ) -> Any:
        eta = self._eta(eta)
        sample_shape = tuple(int(s) for s in sample_shape)
        batch = eta.shape[:-1]
        out = _sample_batch(*self._arrays(eta.dtype), as_key(key),
                            eta.reshape(-1, self.family.stat_dim), graphdef=self._graphdef,
                            family=self.family, num_samples=math.prod(sample_shape),
                            with_log_q=with_log_q)
        event = tuple(self.family.event_shape)
        if not with_log_q:
            return out.reshape(sample_shape + batch + event)
        x, log_q = out
        return x.reshape(sample_shape + batch + event), log_q.reshape(sample_shape + batch)

    def sample_and_log_prob(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()
                            ) -> tuple[Array, Array]:
        """(x, log q(x | eta)): x of shape ``sample_shape + batch + event_shape``, log q of shape
        ``sample_shape + batch``, for eta of shape ``batch + (stat_dim,)``."""
        return self._sample(key, eta, sample_shape, with_log_q=True)

    def sample(self, key: Array, eta: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """x ~ q(x | eta), shape ``sample_shape + batch + event_shape`` (log q is not computed)."""
        return self._sample(key, eta, sample_shape, with_log_q=False)

    def log_prob(self, x: Array, eta: Array) -> Array:
        """log q(x | eta); the batch shapes of x (``batch + event_shape``) and eta broadcast."""
        eta = self._eta(eta)
        x = self.family._check_x(jnp.asarray(x, eta.dtype))
        event = tuple(self.family.event_shape)
        batch = jnp.broadcast_shapes(x.shape[:x.ndim - len(event)], eta.shape[:-1])
        x = jnp.broadcast_to(x, batch + event).reshape((-1,) + event)
        eta = jnp.broadcast_to(eta, batch + eta.shape[-1:]).reshape(-1, eta.shape[-1])
        log_q = _log_prob_pairs(*self._arrays(eta.dtype), x, eta, graphdef=self._graphdef,
                                family=self.family)
        return log_q.reshape(batch)

    # ---------------------------------------------------------------- range check
    def _eta(self, eta: Array) -> Array:
        eta = jnp.asarray(eta)
        if not jnp.issubdtype(eta.dtype, jnp.floating):
            eta = eta.astype(jnp.result_type(float))
        return self.check_range(self.family.check_eta(eta))

    # ---------------------------------------------------------------- persistence
    def config(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-able data."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "family": self.family.describe(),
            "flow": self.config_flow,
            "eta_shift": self.eta_shift.tolist(),
            "eta_scale": self.eta_scale.tolist(),
            "eta_low": self.eta_low.tolist(),
            "eta_high": self.eta_high.tolist(),
            "out_of_range": self.out_of_range,
            "metadata": self.metadata,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``weights.npz`` then ``sampler.json`` (with the weights' SHA-256), atomically."""
        return save_weights_and_config(directory, self._state, self.config(), WEIGHTS_FILE,
                                       CONFIG_FILE)

    def __repr__(self) -> str:
        return f"FlowSampler({self.family.name}, {self.architecture})"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def load_flow_sampler(directory: str | os.PathLike, family: ExponentialFamily | None = None,
                      *, out_of_range: str | None = None) -> FlowSampler:
    """Rebuild a saved FlowSampler exactly (weights checked against the recorded SHA-256).

    ``family`` is needed for user-defined families; built-in ones are rebuilt from the record.
    Raises FileNotFoundError for an incomplete directory and ValueError for another format or
    version, changed weights or a different family.
    """
    config, payload, family = read_record(
        directory, what="flow-sampler", config_file=CONFIG_FILE, weights_file=WEIGHTS_FILE,
        format_name=FORMAT_NAME, versions=(FORMAT_VERSION,), family=family)
    weights_path = Path(directory) / WEIGHTS_FILE
    spec = config["flow"]
    flow = build_conditional_flow(spec["name"], spec["dim"], spec["cond_dim"], rngs=nnx.Rngs(0),
                                  **spec["hyperparameters"])
    nnx.update(flow, restore_tree(nnx.state(flow), payload, weights_path))
    return FlowSampler(
        family, flow, np.asarray(config["eta_shift"]), np.asarray(config["eta_scale"]),
        np.asarray(config["eta_low"]), np.asarray(config["eta_high"]),
        out_of_range=config["out_of_range"] if out_of_range is None else out_of_range,
        metadata=config["metadata"],
    )


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FlowTrainingReport:
    """What ``train_flow_sampler`` did: the loss (reverse KL minus A(eta), averaged over eta)
    per call of STEPS_PER_CALL steps, draws dropped for a non-finite log-density, steps skipped
    for a non-finite gradient, and the step a checkpointed run resumed from."""

    architecture: str
    num_steps: int
    batch_size: int
    learning_rate: float
    history: dict[str, list[float]]
    dropped_draws: int
    skipped_steps: int
    resumed_from_step: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _eta_pool(family: ExponentialFamily, etas_or_box: Any, key: Array
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(pool of training etas, low, high, a JSON description) from etas or a box."""
    if isinstance(etas_or_box, Mapping) or isinstance(etas_or_box, tuple):
        box = dict(etas_or_box) if isinstance(etas_or_box, Mapping) else None
        if box is None:
            if len(etas_or_box) != 2:
                raise ValueError("a box is (low, high) or {'low': ..., 'high': ..., 'scale': ...}")
            box = {"low": etas_or_box[0], "high": etas_or_box[1]}
        unknown = set(box) - {"low", "high", "scale"}
        if unknown or not {"low", "high"} <= set(box):
            raise ValueError(f"a box needs keys 'low', 'high' (and optionally 'scale'), got "
                             f"{sorted(box)}")
        scale = box.get("scale", "uniform")
        pool = sample_etas(family, key=key, low=box["low"], high=box["high"], num=ETA_POOL_SIZE,
                           scale=scale)
        low = np.asarray(box["low"], np.float64)
        high = np.asarray(box["high"], np.float64)
        return pool, low, high, {"box": {"low": low.tolist(), "high": high.tolist(),
                                         "scale": scale}}
    pool = np.asarray(etas_or_box, dtype=np.float64)
    if pool.ndim != 2 or pool.shape[0] < 1:
        raise ValueError(f"etas must have shape (n, {family.stat_dim}), got {pool.shape}")
    family.validate_natural(jnp.asarray(pool))
    digest = hashlib.sha256(np.ascontiguousarray(pool).tobytes()).hexdigest()
    return pool, pool.min(0), pool.max(0), {"etas": {"num": len(pool), "sha256": digest}}


def _forward_pairs(family: ExponentialFamily, forward_draws: Any, dtype: Any
                   ) -> tuple[tuple[Array, Array], dict[str, Any]]:
    """((etas (m, stat_dim), unconstrained draws (m, d)), a JSON description) of the (eta, x)
    pairs in ``forward_draws = (etas (n, stat_dim), x (S, n) + event_shape)``."""
    transform = support_transform(family)
    d = math.prod(transform.inverse_shape(family.event_shape))
    if forward_draws is None:  # placeholders of the right shapes; the term is skipped
        return (jnp.zeros((1, family.stat_dim), dtype), jnp.zeros((1, d), dtype)), {}
    if not isinstance(forward_draws, (tuple, list)) or len(forward_draws) != 2:
        raise ValueError("forward_draws must be a pair (etas, x) with x of shape "
                         "(S, n) + event_shape for etas of shape (n, stat_dim)")
    etas = np.asarray(forward_draws[0], np.float64)
    x = np.asarray(forward_draws[1], np.float64)
    event = tuple(family.event_shape)
    if etas.ndim != 2 or etas.shape[1] != family.stat_dim or x.ndim != 2 + len(event) or (
            x.shape[1:] != (etas.shape[0],) + event):
        raise ValueError(f"forward_draws: etas must have shape (n, {family.stat_dim}) and x "
                         f"shape (S, n) + {event}; got {etas.shape} and {x.shape}")
    family.validate_natural(jnp.asarray(etas))
    u = np.asarray(transform.inv(jnp.asarray(x)), np.float64).reshape(x.shape[0] * x.shape[1], d)
    bad = int(np.sum(~np.all(np.isfinite(u), axis=1)))
    if bad:
        raise ValueError(f"forward_draws: {bad} draws are outside the support of {family.name} "
                         "(or not finite)")
    pair_etas = np.broadcast_to(etas, (x.shape[0],) + etas.shape).reshape(-1, family.stat_dim)
    digest = hashlib.sha256(np.ascontiguousarray(etas).tobytes()
                            + np.ascontiguousarray(x).tobytes()).hexdigest()
    return ((jnp.asarray(pair_etas, dtype), jnp.asarray(u, dtype)),
            {"num_pairs": int(u.shape[0]), "sha256": digest})


def _safe_std(a: np.ndarray) -> np.ndarray:
    std = a.std(0)
    return np.where(std > 1e-12 * (1.0 + np.abs(a).max(0)), std, 1.0)


@lru_cache(maxsize=32)
def _optimizer(learning_rate: float, num_steps: int) -> optax.GradientTransformation:
    """Adam with a cosine-decayed rate and gradient clipping; skips non-finite updates.
    Cached so that equal settings give the same (hashable) object and reuse compiled steps."""
    schedule = optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.05)
    return optax.apply_if_finite(
        optax.chain(optax.clip_by_global_norm(10.0), optax.adam(schedule)),
        max_consecutive_errors=100,
    )


def _reverse_kl(params, rest, pool, shift, scale, key, *, graphdef, family, batch_size):
    """(mean over finite draws of log q_u(u | eta) - log p~_u(u | eta), number dropped)."""
    k_eta, k_z = jax.random.split(key)
    eta = pool[jax.random.randint(k_eta, (batch_size,), 0, pool.shape[0])]
    u_shape = tuple(support_transform(family).inverse_shape(family.event_shape))
    z = jax.random.normal(k_z, (batch_size, math.prod(u_shape)), pool.dtype)
    flow = nnx.merge(graphdef, params, rest)

    def one(z_i, eta_i):
        u, log_det = flow.forward(z_i, (eta_i - shift) / scale)
        log_q = _normal_log_prob(z_i) - log_det
        return log_q - unconstrained_log_density(family, eta_i)(u.reshape(u_shape))

    values = jax.vmap(one)(z, eta)
    finite = jnp.isfinite(values)
    count = jnp.sum(finite)
    return jnp.sum(jnp.where(finite, values, 0.0)) / jnp.maximum(count, 1), batch_size - count


def _forward_kl(params, rest, forward, shift, scale, key, *, graphdef, batch_size):
    """Mean over finite values of -log q_u(u | eta) for ``batch_size`` (eta, u) pairs drawn from
    ``forward`` = (etas (m, stat_dim), unconstrained draws of p (m, d)); = KL(p || q) + const."""
    etas, us = forward
    index = jax.random.randint(key, (batch_size,), 0, etas.shape[0])
    flow = nnx.merge(graphdef, params, rest)

    def one(u_i, eta_i):
        z, log_det = flow.inverse(u_i, (eta_i - shift) / scale)
        return -(_normal_log_prob(z) + log_det)

    values = jax.vmap(one)(us[index], etas[index])
    finite = jnp.isfinite(values)
    return jnp.sum(jnp.where(finite, values, 0.0)) / jnp.maximum(jnp.sum(finite), 1)


def _loss(params, rest, pool, forward, shift, scale, key, *, graphdef, family, batch_size,
          forward_weight):
    """(reverse KL term + forward_weight * forward KL term, draws dropped)."""
    loss, dropped = _reverse_kl(params, rest, pool, shift, scale, key, graphdef=graphdef,
                                family=family, batch_size=batch_size)
    if forward_weight:
        loss = loss + forward_weight * _forward_kl(
            params, rest, forward, shift, scale, jax.random.fold_in(key, 1), graphdef=graphdef,
            batch_size=batch_size)
    return loss, dropped


@partial(jax.jit, static_argnames=("graphdef", "family", "batch_size", "optimizer",
                                   "forward_weight"))
def _train_steps(params, rest, opt_state, pool, forward, shift, scale, key, indices, *, graphdef,
                 family, batch_size, optimizer, forward_weight):
    """Adam steps ``indices`` (step i uses fold_in(key, i)); (params, opt_state, mean finite
    loss, draws dropped)."""
    loss_fn = partial(_loss, graphdef=graphdef, family=family, batch_size=batch_size,
                      forward_weight=forward_weight)

    def step(carry, index):
        p, o = carry
        (loss, dropped), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            p, rest, pool, forward, shift, scale, jax.random.fold_in(key, index))
        updates, o = optimizer.update(grads, o, p)
        return (optax.apply_updates(p, updates), o), (loss, dropped)

    (params, opt_state), (losses, dropped) = jax.lax.scan(step, (params, opt_state), indices)
    finite = jnp.isfinite(losses)
    mean = jnp.sum(jnp.where(finite, losses, 0.0)) / jnp.maximum(jnp.sum(finite), 1)
    return params, opt_state, mean, jnp.sum(dropped)


def train_flow_sampler(
    family: ExponentialFamily,
    etas_or_box: Any,
    *,
    key: Array,
    architecture: str = "realnvp",
    hyperparameters: dict[str, Any] | None = None,
    num_steps: int = 2000,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    progress: bool = True,
    out_of_range: str = "warn",
    forward_draws: tuple[Array, Array] | None = None,
    forward_weight: float = 1.0,
) -> FlowSampler:
    """Fit q(x | eta) by reverse KL against h(x) exp(eta . T(x)) (no samples of p needed),
    optionally plus forward KL on draws of p.

    ``etas_or_box``: training etas (an array (n, stat_dim)), or a box given as a tuple
    ``(low, high)`` or a dict ``{"low", "high", "scale"}`` as in :func:`sample_etas` (ETA_POOL_SIZE
    etas are drawn from it once). Each step draws ``batch_size`` etas from them, one
    reparameterised x per eta, and takes an Adam step (cosine-decayed learning rate, gradient
    norm clipped at 10) on L = mean[log q(x | eta) - eta . T(x) - log h(x)] in unconstrained
    coordinates. Draws whose value is not finite are dropped from the loss and counted; a step
    whose gradient is still not finite is skipped and counted (``sampler.report``). With
    ``checkpoint_dir`` the state is written every ``checkpoint_every`` steps (rounded up to a
    multiple of STEPS_PER_CALL) and a rerun with the same arguments resumes from it, with the
    same result as an uninterrupted run; the directory also loads with :func:`load_flow_sampler`.
    ``hyperparameters`` go to the flow (``FLOW_SAMPLER_ARCHITECTURES[architecture].defaults``);
    ``out_of_range`` ("warn", "error", "ignore") is the returned sampler's policy.

    ``forward_draws = (etas, x)``: draws of p, e.g. NUTS's
    ``x = sample_family(family, etas, key=..., sample_shape=(S,))`` with x of shape
    ``(S, n) + event_shape`` for etas (n, stat_dim). Each step then also takes ``batch_size``
    of these (eta, x) pairs and adds ``forward_weight`` * mean[-log q_u(u | eta)] (u = f^{-1}(x);
    the forward KL KL(p || q) up to a constant), which is mass covering where reverse KL is mode
    seeking: it pulls q's tails out to where p has mass. The reported loss is the sum.
    """
    for name, value in (("num_steps", num_steps), ("batch_size", batch_size),
                        ("checkpoint_every", checkpoint_every)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (math.isfinite(forward_weight) and forward_weight > 0):
        raise ValueError(f"forward_weight must be a positive number, got {forward_weight!r}")
    key = as_key(key)
    k_pool, k_init, k_data, k_train = jax.random.split(key, 4)
    # ValueError for a discrete support
    dim = math.prod(support_transform(family).inverse_shape(family.event_shape))
    pool, low, high, eta_spec = _eta_pool(family, etas_or_box, k_pool)
    shift, scale = pool.mean(0), _safe_std(pool)
    flow = build_conditional_flow(architecture, dim, family.stat_dim, rngs=nnx.Rngs(k_init),
                                  **(hyperparameters or {}))
    dtype = jnp.result_type(float)
    pool_j = jnp.asarray(pool, dtype)
    k_z, k_i = jax.random.split(k_data)
    idx = jax.random.randint(k_i, (batch_size,), 0, pool.shape[0])
    flow.initialize(jax.random.normal(k_z, (batch_size, dim), dtype),
                    (pool_j[idx] - shift) / scale)

    graphdef, params, rest = nnx.split(flow, nnx.Param, ...)
    optimizer = _optimizer(float(learning_rate), int(num_steps))
    opt_state = optimizer.init(params)
    forward, forward_spec = _forward_pairs(family, forward_draws, dtype)
    weight = float(forward_weight) if forward_draws is not None else 0.0
    arrays = (pool_j, forward, jnp.asarray(shift, dtype), jnp.asarray(scale, dtype), k_train)
    statics = {"graphdef": graphdef, "family": family, "batch_size": int(batch_size),
               "optimizer": optimizer, "forward_weight": weight}

    every = -(-int(checkpoint_every) // STEPS_PER_CALL) * STEPS_PER_CALL
    settings = {
        "family": family.describe(), "flow": flow.config, "eta": eta_spec,
        "key": np.asarray(jax.random.key_data(key)).tolist(), "num_steps": int(num_steps),
        "batch_size": int(batch_size), "learning_rate": float(learning_rate),
        "x64": bool(jax.config.jax_enable_x64),
        **({"forward": {**forward_spec, "weight": weight}} if weight else {}),
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    history: dict[str, list[float]] = {"step": [], "loss": []}
    done, dropped_total = 0, 0
    if checkpoint_dir is not None and (Path(checkpoint_dir) / PROGRESS_FILE).exists():
        params, opt_state, record = _resume(Path(checkpoint_dir), fingerprint, family, opt_state)
        done, history = int(record["step"]), record["history"]
        dropped_total = int(record["dropped_draws"])
    resumed_from = done

    def current_sampler(p):
        return FlowSampler(family, nnx.merge(graphdef, p, rest), shift, scale, low, high,
                           out_of_range=out_of_range,
                           metadata={"training": settings, "package_version": package_version()})

    start = time.perf_counter()
    bar = tqdm(total=num_steps, initial=done, desc=f"train flow sampler {architecture}",
               disable=not progress, leave=False)
    while done < num_steps:
        n = min(STEPS_PER_CALL, num_steps - done)
        params, opt_state, loss, dropped = _train_steps(
            params, rest, opt_state, *arrays, jnp.arange(done, done + n, dtype=jnp.uint32),
            **statics)
        done += n
        dropped_total += int(dropped)
        history["step"].append(done)
        history["loss"].append(float(loss))
        bar.update(n)
        bar.set_postfix(loss=f"{float(loss):.4g}", dropped=dropped_total)
        if checkpoint_dir is not None and (done % every == 0 or done == num_steps):
            _checkpoint(Path(checkpoint_dir), current_sampler(params), opt_state, {
                "format": TRAINING_FORMAT, "fingerprint": fingerprint, "step": done,
                "history": history, "dropped_draws": dropped_total})
    bar.close()
    skipped_total = int(opt_state.total_notfinite)  # steps apply_if_finite skipped
    if dropped_total or skipped_total:
        warnings.warn(
            f"train_flow_sampler: {dropped_total} draws had a non-finite log-density (dropped "
            f"from the loss) and {skipped_total} steps a non-finite gradient (skipped)",
            RuntimeWarning, stacklevel=2)
    sampler = current_sampler(params)
    sampler.report = FlowTrainingReport(
        architecture=architecture, num_steps=int(num_steps), batch_size=int(batch_size),
        learning_rate=float(learning_rate), history=history, dropped_draws=dropped_total,
        skipped_steps=skipped_total, resumed_from_step=resumed_from,
        seconds=time.perf_counter() - start)
    sampler.metadata["report"] = sampler.report.to_json()  # saved with the sampler
    return sampler


def _checkpoint(directory: Path, sampler: FlowSampler, opt_state: Any,
                record: dict[str, Any]) -> None:
    """Sampler files, optimizer state, then ``training.json`` naming both files' SHA-256."""
    sampler.save(directory)
    payload = tree_to_npz_bytes(opt_state)
    atomic_write(directory / OPTIMIZER_FILE, lambda f: f.write(payload))
    record = {**record, "optimizer_sha256": hashlib.sha256(payload).hexdigest(),
              "weights_sha256": hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()
                                               ).hexdigest()}
    text = json.dumps(record, sort_keys=True).encode()
    atomic_write(directory / PROGRESS_FILE, lambda f: f.write(text))


def _resume(directory: Path, fingerprint: str, family: ExponentialFamily, opt_state: Any
            ) -> tuple[Any, Any, dict[str, Any]]:
    """(params, optimizer state, progress record) from a checkpoint of the same run."""
    record = _read_json(directory / PROGRESS_FILE)
    if record.get("format") != TRAINING_FORMAT:
        raise ValueError(f"checkpoint directory {str(directory)!r} does not hold "
                         "train_flow_sampler checkpoints; use another directory")
    if record.get("fingerprint") != fingerprint:
        raise ValueError(f"checkpoint directory {str(directory)!r} belongs to a different "
                         "training run (family, flow, etas, key or settings differ); use "
                         "another directory")
    optimizer_path = directory / OPTIMIZER_FILE
    if not optimizer_path.is_file():
        raise FileNotFoundError(f"{directory}: incomplete checkpoint, {OPTIMIZER_FILE} missing")
    payload = optimizer_path.read_bytes()
    weights = directory / WEIGHTS_FILE
    if (hashlib.sha256(payload).hexdigest() != record.get("optimizer_sha256")
            or not weights.is_file()
            or hashlib.sha256(weights.read_bytes()).hexdigest() != record.get("weights_sha256")):
        raise ValueError(f"{directory}: checkpoint files do not match {PROGRESS_FILE} "
                         "(interrupted while writing?); use another directory")
    _, params, _ = nnx.split(load_flow_sampler(directory, family).flow, nnx.Param, ...)
    opt_state = restore_tree(opt_state, payload, optimizer_path)
    return params, opt_state, record


# ---------------------------------------------------------------------------------------------
# importance sampling
# ---------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("graphdef", "family", "num_samples", "defensive"))
def _importance_draws(state, shift, scale, keys, etas, *, graphdef, family, num_samples,
                      defensive):
    """(T(x) (n, S, D), log w (n, S)) at each eta_i from keys[i]: S - S_h draws of the flow q
    and S_h = round(defensive S) of the heavy component h (see ``importance_dataset``), weighed
    against the mixture r = (1 - a) q + a h, a = S_h / S (balance heuristic)."""
    flow = nnx.merge(graphdef, state)
    d = math.prod(support_transform(family).inverse_shape(family.event_shape))
    num_heavy = round(defensive * num_samples)
    share = num_heavy / num_samples

    def one_eta(key, eta):
        k_pilot, k_z, k_heavy = jax.random.split(key, 3)
        context = flow.condition(((eta - shift) / scale).astype(eta.dtype))
        forward = jax.vmap(lambda z: flow.forward_given(z, context))
        z = jax.random.normal(k_z, (num_samples - num_heavy, d), eta.dtype)
        u, log_det = forward(z)
        log_r = _normal_log_prob(z) - log_det  # log q(u)
        if num_heavy:
            pilot, _ = forward(jax.random.normal(k_pilot, (DEFENSIVE_PILOT, d), eta.dtype))
            loc = jnp.mean(pilot, axis=0)
            width = DEFENSIVE_WIDTH * jnp.maximum(jnp.std(pilot, axis=0), 1e-6)
            u_heavy = loc + width * jax.random.t(k_heavy, DEFENSIVE_DF, (num_heavy, d),
                                                 eta.dtype)
            z_heavy, log_det_inverse = jax.vmap(lambda v: flow.inverse_given(v, context))(u_heavy)
            u = jnp.concatenate([u, u_heavy])
            log_q = jnp.concatenate([log_r, _normal_log_prob(z_heavy) + log_det_inverse])
            log_h = jnp.sum(jax.scipy.stats.t.logpdf((u - loc) / width, DEFENSIVE_DF)
                            - jnp.log(width), axis=-1)
            log_r = jnp.logaddexp(math.log1p(-share) + log_q, math.log(share) + log_h)
        x, log_jf = jax.vmap(partial(_to_support, family))(u)
        log_w = family.unnormalized_log_prob(eta, x) + log_jf - log_r
        return family.sufficient_statistics(x), log_w

    return jax.vmap(one_eta)(keys, etas)


def _estimates(stats: np.ndarray, log_w: np.ndarray) -> dict[str, Any]:
    """PSIS self-normalised estimates at one eta from T (S, D) and raw log weights (S,)."""
    dim = stats.shape[1]
    ok = np.isfinite(log_w) & np.all(np.isfinite(stats), axis=1)
    count = int(ok.sum())
    kept = count + int(np.sum(log_w == -np.inf))  # p(x) = 0: weight 0, kept, not dropped
    out = {"dropped": stats.shape[0] - kept, "num": kept}
    if count < MIN_FINITE_DRAWS:
        nan = np.full(dim, np.nan)
        return {**out, "mean": nan, "cov": np.full((dim, dim), np.nan), "mcse": nan, "ess": 0.0,
                "khat": np.nan, "log_z": np.nan, "log_z_mcse": np.nan}
    t, lw = stats[ok], log_w[ok]
    if np.ptp(lw) <= EQUAL_LOG_WEIGHTS:  # q = p to rounding: no tail to fit
        smoothed, khat = np.zeros(count), -np.inf
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            smoothed, khat = az.psislw(lw, reff=1.0)
        if not np.all(np.isfinite(smoothed)):  # a degenerate tail fit: raw weights, k-hat NaN
            smoothed, khat = lw, np.nan
    w = np.exp(smoothed - logsumexp(smoothed))
    mean = w @ t
    centred = t - mean
    sum_w2 = float(w @ w)
    cov = (centred * w[:, None]).T @ centred / max(1.0 - sum_w2, 1e-12)
    raw = np.concatenate([np.exp(lw - lw.max()), np.zeros(kept - count)])
    return {**out, "mean": mean, "cov": 0.5 * (cov + cov.T),
            "mcse": np.sqrt((w**2) @ centred**2), "ess": 1.0 / sum_w2, "khat": float(khat),
            "log_z": float(logsumexp(lw) - np.log(kept)),
            "log_z_mcse": float(raw.std() / (raw.mean() * np.sqrt(kept)))}


def importance_dataset(
    family: ExponentialFamily,
    sampler: FlowSampler,
    etas: Array,
    *,
    key: Array,
    num_samples: int = 4000,
    max_khat: float = 0.7,
    defensive: float = 0.2,
    redo_with_nuts: bool | Mapping[str, Any] = False,
    chunk_size: int = 64,
    progress: bool = True,
) -> ExpectationDataset:
    """Importance-sampled E[T], Cov[T] and log Z per eta, with ArviZ's PSIS k-hat.

    For each eta (row of ``etas``, shape (N, stat_dim)), ``num_samples`` independent draws
    x_s ~ r(. | eta) get log w_s = eta . T(x_s) + log h(x_s) - log r(x_s | eta); draws with a
    non-finite log weight or T are dropped and counted. The proposal r is defensive (Hesterberg
    1995) in the unconstrained coordinates u: r = (1 - a) q + a h, h a product of Student-t
    (DEFENSIVE_DF) located at the flow's mean and DEFENSIVE_WIDTH times wider than the flow
    (from DEFENSIVE_PILOT separate draws), with a fixed share a = ``defensive`` of the draws from
    h (a = 0: r = q). h's polynomial tails keep w bounded where the flow's tails are lighter than
    p's (x = exp(u) near 0 has density ~ e^u: an exponential tail in u), and in the bulk w grows
    by at most 1 / (1 - a). Draws with p = 0 have weight 0 (kept). ``az.psislw`` gives the smoothed
    normalised weights w~ and k-hat; then mean = sum w~ T, cov = sum w~ (T - mean)(T - mean)^T
    / (1 - sum w~^2), mcse = sqrt(sum w~^2 (T - mean)^2) (delta method), ess = 1 / sum w~^2
    (= (sum w)^2 / sum w^2 for the smoothed w), log Z = log mean(w) with the raw weights.

    The dataset fills ess_bulk and ess_tail with the importance ESS, rhat with 1 (independent
    draws, no chains: nothing to compare), divergences and retries with 0, num_samples with the
    finite draws used, and passed = (k-hat <= max_khat and at least MIN_FINITE_DRAWS finite
    draws). ``extras`` holds ``khat``, ``log_z``, ``log_z_mcse`` and ``dropped`` (per eta);
    k-hat is -inf where all log weights agree to EQUAL_LOG_WEIGHTS (q = p), and NaN (with raw
    weights, passed=False) where the Pareto fit degenerates. Point i uses ``fold_in(key, i)``, so
    results do not depend on ``chunk_size``.

    ``redo_with_nuts`` (True, or a dict of :func:`generate_dataset` settings) re-does the points
    that did not pass with NUTS (key ``fold_in(key, N)``) and puts its estimates and diagnostics
    in their rows; ``extras["redone_with_nuts"]`` marks them (their k-hat stays the importance
    one).
    """
    if sampler.family.name != family.name or sampler.family.stat_labels != family.stat_labels:
        raise ValueError(f"{sampler!r} is for {sampler.family.name}, not {family.name}")
    for name, value in (("num_samples", num_samples), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 <= float(defensive) < 1.0:
        raise ValueError(f"defensive must be in [0, 1), got {defensive!r}")
    if not isinstance(redo_with_nuts, (bool, Mapping)):
        raise ValueError("redo_with_nuts must be True, False or a dict of generate_dataset "
                         f"settings, got {redo_with_nuts!r}")
    etas = sampler._eta(jnp.asarray(etas))
    if etas.ndim != 2:
        raise ValueError(f"etas must have shape (N, {family.stat_dim}), got {etas.shape}")
    etas = family.validate_natural(etas)
    key = as_key(key)
    n = etas.shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n, dtype=jnp.uint32))
    size = min(int(chunk_size), n)
    results = []
    bar = tqdm(total=n, desc=f"importance {sampler.architecture}", disable=not progress,
               leave=False)
    for lo in range(0, n, size):
        hi = min(lo + size, n)
        pad = size - (hi - lo)
        chunk_keys = jnp.concatenate([keys[lo:hi], jnp.repeat(keys[hi - 1:hi], pad)])
        chunk_etas = jnp.concatenate([etas[lo:hi], jnp.repeat(etas[hi - 1:hi], pad, axis=0)])
        draws = _importance_draws(*sampler._arrays(etas.dtype), chunk_keys, chunk_etas,
                                  graphdef=sampler._graphdef, family=family,
                                  num_samples=int(num_samples), defensive=float(defensive))
        stats, log_w = (np.asarray(a, np.float64) for a in draws)
        results.extend(_estimates(stats[i], log_w[i]) for i in range(hi - lo))
        bar.update(hi - lo)
    bar.close()

    def stack(name):
        return np.array([r[name] for r in results])

    dim = family.stat_dim
    khat, dropped = stack("khat"), stack("dropped").astype(np.int64)
    mean = stack("mean")
    finite = np.all(np.isfinite(mean), axis=1)
    ess = np.repeat(stack("ess")[:, None], dim, axis=1)
    if dropped.sum():
        warnings.warn(
            f"importance_dataset: {int(dropped.sum())} of {n * num_samples} draws had a "
            f"non-finite log weight or statistic and were dropped (at {int((dropped > 0).sum())} "
            "eta; see extras['dropped'])", RuntimeWarning, stacklevel=2)
    metadata = {
        "sampler": {"method": "importance", "architecture": sampler.architecture,
                    "flow": sampler.config_flow, "num_samples": int(num_samples),
                    "max_khat": float(max_khat), "defensive": float(defensive),
                    "defensive_df": DEFENSIVE_DF, "min_ess": 0.0, "max_rhat": 1.0},
        "key": np.asarray(jax.random.key_data(key)).tolist(),
        "package_version": package_version(),
        "family": family.describe(),
        "x64": bool(jax.config.jax_enable_x64),
    }
    columns = {
        "mean": mean, "cov": stack("cov"), "ess_bulk": ess, "ess_tail": ess.copy(),
        "rhat": np.ones((n, dim)), "mcse": stack("mcse"), "divergences": np.zeros(n, np.int64),
        "num_samples": stack("num").astype(np.int64), "retries": np.zeros(n, np.int64),
        "passed": finite & (khat <= max_khat),
    }
    redone = np.zeros(n, bool)
    if redo_with_nuts is not False and not columns["passed"].all():
        redone = ~columns["passed"]
        settings = {"progress": progress,
                    **({} if redo_with_nuts is True else dict(redo_with_nuts))}
        nuts = generate_dataset(family, np.asarray(etas)[redone],
                                key=jax.random.fold_in(key, n), **settings)
        for name, column in columns.items():
            column[redone] = getattr(nuts, name)
        metadata["redo_with_nuts"] = nuts.metadata["sampler"]
    return ExpectationDataset(
        family_name=family.name, stat_labels=tuple(family.stat_labels),
        eta=np.asarray(etas, np.float64), **columns, metadata=metadata, family=family,
        extras={"khat": khat, "log_z": stack("log_z"), "log_z_mcse": stack("log_z_mcse"),
                "dropped": dropped, "redone_with_nuts": redone},
    )

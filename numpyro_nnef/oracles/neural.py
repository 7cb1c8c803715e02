"""A trained network as an oracle: eta -> E[T], Cov[T], absolute A(eta), training-range checks.

The network works in standardised coordinates s = (eta - eta_shift) / eta_scale and predicts
(E[T] - mean_shift) / mean_scale. Gradient networks (a learned A) use mean_scale = c / eta_scale
so that E[T] = grad_eta [mean_shift . eta + c A_net(s)] holds exactly.

The absolute log-partition is pinned at anchors eta_k, training etas with independent estimates
A_k (quadrature or importance sampling, see ``anchor.py``), and blended:

    A(eta) = sum_k w_k(eta) [A_k + D(eta, eta_k)],

with D(eta, eta_k) = A_net(eta) - A_net(eta_k) for a learned A, else the path integral
int_0^1 mu(eta_k + t (eta - eta_k)) . (eta - eta_k) dt (thermodynamic integration, 24-point
Gauss-Legendre). The weights live on the NEAREST_ANCHORS nearest anchors in standardised
coordinates s: with kernel values g_k = exp(-|s - s_k|^2 / h^2) sorted g_(1) >= g_(2) >= ...,
w_k is proportional to max(g_k - g_(m+1), 0) (m = NEAREST_ANCHORS), so an anchor's weight falls
to zero before it leaves the nearest m and A stays continuous in eta. The bandwidth h is
BANDWIDTH_FACTOR times the median distance from an anchor to its nearest other anchor. The error
of a continuation grows with its path length; nearby anchors keep the paths short.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .._io import TrainingRange, read_record, restore_tree, save_weights_and_config
from ..family import Array, ExponentialFamily
from .anchor import LogPartitionEstimate
from .base import Oracle, newton_natural_from_mean

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "PROTOCOL_REGISTRY", "NeuralOracle",
           "PredictionProtocol", "Standardization", "load_oracle"]

FORMAT_NAME = "numpyro_nnef.NeuralOracle"
FORMAT_VERSION = 2  # version 1 stored one anchor under "anchor"; still read
CONFIG_FILE = "oracle.json"
WEIGHTS_FILE = "weights.npz"
OUT_OF_RANGE = ("warn", "error", "ignore")
PATH_QUADRATURE_ORDER = 24
NEAREST_ANCHORS = 4
BANDWIDTH_FACTOR = 0.5


class PredictionProtocol(Protocol):
    """What a NeuralOracle uses of its training protocol (``training.protocols.Protocol``)."""

    name: str

    @property
    def options(self) -> dict[str, Any]: ...

    def build_model(self, architecture: str, *, eta_dim: int, stat_dim: int, rngs: nnx.Rngs,
                    **hyperparameters: Any) -> nnx.Module: ...

    def predict(self, model: nnx.Module, eta: Array) -> Array: ...

    def log_partition(self, model: nnx.Module, eta: Array) -> Array | None: ...


# Protocol name -> class, filled by ``training.protocols`` (the layer above, which this module
# does not import); ``load_oracle`` rebuilds a saved oracle's protocol from it.
PROTOCOL_REGISTRY: dict[str, Callable[..., PredictionProtocol]] = {}


def protocol_from_record(name: str, options: dict[str, Any]) -> PredictionProtocol:
    """The registered protocol ``name`` with ``options`` (as recorded by ``NeuralOracle.save``)."""
    if name not in PROTOCOL_REGISTRY:
        raise ValueError(f"the oracle was trained with protocol {name!r}, which is not "
                         f"registered (registered: {sorted(PROTOCOL_REGISTRY)})")
    return PROTOCOL_REGISTRY[name](**options)


@dataclasses.dataclass(frozen=True)
class Standardization:
    """s = (eta - eta_shift) / eta_scale; network output = (E[T] - mean_shift) / mean_scale."""

    eta_shift: np.ndarray
    eta_scale: np.ndarray
    mean_shift: np.ndarray
    mean_scale: np.ndarray

    def __post_init__(self):
        dims = set()
        for field in dataclasses.fields(self):
            value = np.asarray(getattr(self, field.name), dtype=np.float64)
            if value.ndim != 1 or not np.all(np.isfinite(value)):
                raise ValueError(f"{field.name} must be a finite vector, got {value!r}")
            if field.name.endswith("scale") and np.any(value <= 0):
                raise ValueError(f"{field.name} must be positive, got {value.tolist()}")
            dims.add(value.shape[0])
            object.__setattr__(self, field.name, value)
        if len(dims) != 1:
            raise ValueError(f"standardisation vectors differ in length: {sorted(dims)}")

    @classmethod
    def fit(cls, eta: np.ndarray, mean: np.ndarray, *, gradient: bool) -> Standardization:
        """Centre and scale eta and E[T] by their training mean and standard deviation; for a
        gradient network the mean scale is tied to the eta scale (c / eta_scale, c scalar)."""
        eta_scale = _safe_std(eta)
        mean_scale = _safe_std(mean)
        if gradient:
            c = float(np.median(mean_scale * eta_scale))
            mean_scale = c / eta_scale
        return cls(eta.mean(0), eta_scale, mean.mean(0), mean_scale)

    @property
    def gradient_constant(self) -> float:
        """c in mean_scale = c / eta_scale (meaningful for gradient networks)."""
        return float(np.median(self.mean_scale * self.eta_scale))

    def to_json(self) -> dict[str, list[float]]:
        return {f.name: getattr(self, f.name).tolist() for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: dict) -> Standardization:
        return cls(**{f.name: np.asarray(data[f.name]) for f in dataclasses.fields(cls)})


def _safe_std(a: np.ndarray) -> np.ndarray:
    std = np.asarray(a, dtype=np.float64).std(0)
    return np.where(std > 1e-12 * (1.0 + np.abs(a).max(0)), std, 1.0)


class NeuralOracle(TrainingRange, Oracle):
    """Oracle backed by a trained network (any architecture x training protocol).

    ``mean``/``covariance``/``log_partition``/``natural_from_mean`` follow the oracle protocol and
    are jit/vmap-able. An eta outside the training box [eta_low, eta_high] triggers a warning,
    an error or nothing, per ``out_of_range`` ("warn" by default): never a silent extrapolation.
    """

    extrapolation_hint = ("the network extrapolates there (pass out_of_range='ignore' to "
                          "silence, or train on a wider box)")

    def __init__(
        self,
        family: ExponentialFamily,
        protocol: PredictionProtocol,
        architecture: str,
        hyperparameters: dict[str, Any],
        model: nnx.Module,
        standardization: Standardization,
        eta_low: np.ndarray,
        eta_high: np.ndarray,
        *,
        anchors: Sequence[LogPartitionEstimate] = (),
        out_of_range: str = "warn",
        metadata: dict[str, Any] | None = None,
    ):
        super().__init__(family)
        if out_of_range not in OUT_OF_RANGE:
            raise ValueError(f"out_of_range must be one of {OUT_OF_RANGE}, got {out_of_range!r}")
        dim = family.stat_dim
        if standardization.eta_shift.shape != (dim,):
            raise ValueError(
                f"standardisation has {standardization.eta_shift.shape[0]} dimensions, "
                f"family {family.name} has stat_dim={dim}"
            )
        self.protocol = protocol
        self.architecture = architecture
        self.hyperparameters = dict(hyperparameters)
        self.standardization = standardization
        self.eta_low = np.asarray(eta_low, dtype=np.float64).reshape(dim)
        self.eta_high = np.asarray(eta_high, dtype=np.float64).reshape(dim)
        self.out_of_range = out_of_range
        self.metadata = dict(metadata or {})
        self._graphdef, self._state = nnx.split(model)
        self.learned_log_partition = has_learned_log_partition(protocol, model, dim)
        self._set_anchors(tuple(anchors))
        self.report = None  # a TrainingReport when the oracle comes from train_oracle

    # ---------------------------------------------------------------- the model
    @property
    def model(self) -> nnx.Module:
        """A fresh copy of the trained network (changing it does not change the oracle)."""
        return nnx.merge(self._graphdef, self._state)

    def _standardise(self, eta: Array) -> Array:
        st = self.standardization
        return (eta - st.eta_shift) / st.eta_scale

    # ---------------------------------------------------------------- per eta
    def mean_single(self, eta: Array) -> Array:
        """E[T | eta] = mean_shift + mean_scale * network(s(eta))."""
        st = self.standardization
        return st.mean_shift + st.mean_scale * self.protocol.predict(
            nnx.merge(self._graphdef, self._state), self._standardise(eta)
        )

    def covariance_single(self, eta: Array) -> Array:
        """Cov[T | eta] = d E[T] / d eta (the Hessian of A for gradient networks); the Jacobian of a
        direct network is symmetrised, 0.5 (J + J^T), the nearest symmetric matrix."""
        jac = jax.jacfwd(self.mean_single)(eta)
        return 0.5 * (jac + jac.T)

    # ---------------------------------------------------------------- log-partition
    def _set_anchors(self, anchors: tuple[LogPartitionEstimate, ...]) -> None:
        """Validate the anchors and precompute their standardised positions, the bandwidth and
        the constants c_k (A_k - A_net(eta_k) for a learned A, else A_k)."""
        dim = self.family.stat_dim
        for a in anchors:
            if not isinstance(a, LogPartitionEstimate) or len(a.eta) != dim:
                raise ValueError(f"anchors must be LogPartitionEstimates with {dim}-dimensional "
                                 f"eta, got {a!r}")
        self.anchors = anchors
        eta = np.array([a.eta for a in anchors], dtype=np.float64).reshape(-1, dim)
        s = (eta - self.standardization.eta_shift) / self.standardization.eta_scale
        self._bandwidth = 1.0
        if len(anchors) > 1:
            gaps = np.linalg.norm(s[:, None] - s[None], axis=-1)
            np.fill_diagonal(gaps, np.inf)
            if not gaps.min() > 0:
                raise ValueError("two anchors share the same eta")
            self._bandwidth = BANDWIDTH_FACTOR * float(np.median(gaps.min(1)))
        self._anchor_eta, self._anchor_s = eta, s
        constant = np.array([a.value for a in anchors], dtype=np.float64)
        if self.learned_log_partition and anchors:
            constant = constant - np.asarray(
                jax.jit(jax.vmap(self._learned_log_partition))(jnp.asarray(eta)), np.float64)
        self._anchor_constant = constant

    def anchor_weights(self, eta: Array) -> tuple[Array, Array]:
        """(indices, weights) of the anchors that A(eta) blends, for one flat eta.

        d_k = |s - s_k| / h; with K <= m anchors w = softmax(-d^2); otherwise the m nearest get
        w_k proportional to exp(-d_k^2) - exp(-d_(m+1)^2) (uniform weights in the tie
        d_(1) = d_(m+1)). The weights are >= 0, sum to 1 and are continuous in eta.
        """
        s = jnp.asarray(self._anchor_s, eta.dtype)
        neg_d2 = -jnp.sum((self._standardise(eta) - s) ** 2, axis=1) / self._bandwidth**2
        count = s.shape[0]
        if count <= NEAREST_ANCHORS:
            return jnp.arange(count), jax.nn.softmax(neg_d2)
        top, index = jax.lax.top_k(neg_d2, NEAREST_ANCHORS + 1)
        kernel = jnp.exp(top[:-1] - top[0]) - jnp.exp(top[-1] - top[0])
        total = jnp.sum(kernel)
        uniform = jnp.full(NEAREST_ANCHORS, 1.0 / NEAREST_ANCHORS, eta.dtype)
        weights = jnp.where(total > 0, kernel / jnp.where(total > 0, total, 1.0), uniform)
        return index[:-1], weights

    def _path_integral(self, ref: Array, eta: Array) -> Array:
        """int_0^1 mu(ref + t (eta - ref)) . (eta - ref) dt (Gauss-Legendre on [0, 1])."""
        nodes, weights = np.polynomial.legendre.leggauss(PATH_QUADRATURE_ORDER)
        t = jnp.asarray(0.5 * (nodes + 1.0), eta.dtype)
        delta = eta - ref
        means = jax.vmap(lambda ti: self.mean_single(ref + ti * delta))(t)
        return 0.5 * jnp.asarray(weights, eta.dtype) @ (means @ delta)

    def _learned_log_partition(self, eta: Array) -> Array:
        st = self.standardization
        model = nnx.merge(self._graphdef, self._state)
        value = self.protocol.log_partition(model, self._standardise(eta))
        return st.mean_shift @ eta + st.gradient_constant * value

    def log_partition_single(self, eta: Array) -> Array:
        """Absolute A(eta) = sum_k w_k(eta) [A_k + D(eta, eta_k)] (see the module docstring);
        for a learned A this is A_net(eta) + sum_k w_k(eta) [A_k - A_net(eta_k)]."""
        if not self.anchors:
            raise ValueError(
                "this neural oracle has no log-partition anchor (trained with anchor=None); "
                "its log-partition is only known up to a constant"
            )
        index, weights = self.anchor_weights(eta)
        constant = jnp.asarray(self._anchor_constant, eta.dtype)[index]
        if self.learned_log_partition:
            return self._learned_log_partition(eta) + weights @ constant
        refs = jnp.asarray(self._anchor_eta, eta.dtype)[index]
        paths = jax.vmap(self._path_integral, in_axes=(0, None))(refs, eta)
        return weights @ (constant + paths)

    def natural_from_mean(self, mu: Array, *, init: Array | None = None, max_steps: int = 100,
                          tol: float = 1e-9) -> Array:
        """eta with E[T | eta] = mu, searched inside the training range; Newton starts at
        ``init``, by default the mean of the training etas (feasible: the domain is convex)."""
        if init is None:
            init = jnp.asarray(self.standardization.eta_shift)
        return super().natural_from_mean(mu, init=init, max_steps=max_steps, tol=tol)

    def natural_from_mean_single(self, mu: Array, init: Array, max_steps: int = 100,
                                 tol: float = 1e-9) -> tuple[Array, Array]:
        """(eta, converged) with E[T | eta] = mu: Newton on the convex A(eta) - eta . mu for a
        learned A; for a direct network (whose mean need not be an exact gradient, nor one-to-one
        where it extrapolates) Newton on the residual mean(eta) - mu, backtracking on its squared
        norm inside the natural domain and the training range (plus a 10% margin)."""
        if self.learned_log_partition:
            return newton_natural_from_mean(self, mu, init, max_steps, tol,
                                            log_partition=self._learned_log_partition)
        family = self.family
        jacobian = jax.jacfwd(self.mean_single)
        threshold = tol + 100 * jnp.finfo(mu.dtype).eps * (1.0 + jnp.max(jnp.abs(mu)))

        margin = 0.1 * (self.eta_high - self.eta_low)
        low, high = self.eta_low - margin, self.eta_high + margin

        def merit(eta):
            residual = self.mean_single(eta) - mu
            value = 0.5 * residual @ residual
            in_range = jnp.all((eta >= low) & (eta <= high))
            inside = family.in_domain(eta[None])[0] & jnp.isfinite(value) & in_range
            return jnp.where(inside, value, jnp.inf)

        def step(carry):
            eta, value, i, _ = carry
            residual = self.mean_single(eta) - mu
            direction = jnp.linalg.lstsq(jacobian(eta), residual)[0]

            def shrink(state):
                t, _ = state
                return t * 0.5, merit(eta - t * 0.5 * direction)

            def keep_shrinking(state):
                t, new = state
                return (new > (1.0 - 1e-4 * t) * value) & (t > 1e-10)

            t, new = jax.lax.while_loop(keep_shrinking, shrink, (1.0, merit(eta - direction)))
            ok = new <= (1.0 - 1e-4 * t) * value
            return (jnp.where(ok, eta - t * direction, eta), jnp.where(ok, new, value), i + 1,
                    ~ok)

        def not_done(carry):
            eta, value, i, stalled = carry
            return (jnp.sqrt(2 * value) > threshold) & (i < max_steps) & ~stalled

        init = jnp.asarray(init, mu.dtype)
        eta, value, _, _ = jax.lax.while_loop(
            not_done, step, (init, merit(init), 0, jnp.asarray(False))
        )
        converged = jnp.sqrt(2 * value) <= jnp.maximum(
            threshold, 1e-6 * (1.0 + jnp.max(jnp.abs(mu)))
        )
        return eta, converged

    # ---------------------------------------------------------------- range check
    def _eta(self, eta: Array) -> Array:
        return self.check_range(super()._eta(eta))

    # ---------------------------------------------------------------- persistence
    def config(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-able data."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "family": self.family.describe(),
            "protocol": {"name": self.protocol.name, "options": self.protocol.options},
            "architecture": self.architecture,
            "hyperparameters": self.hyperparameters,
            "standardization": self.standardization.to_json(),
            "eta_low": self.eta_low.tolist(),
            "eta_high": self.eta_high.tolist(),
            "anchors": [a.to_json() for a in self.anchors],
            "out_of_range": self.out_of_range,
            "metadata": self.metadata,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``weights.npz`` then ``oracle.json`` (with the weights' SHA-256), atomically."""
        return save_weights_and_config(directory, self._state, self.config(), WEIGHTS_FILE,
                                       CONFIG_FILE)

    def __repr__(self) -> str:
        return f"NeuralOracle({self.family.name}, {self.architecture}/{self.protocol.name})"


def has_learned_log_partition(protocol: PredictionProtocol, model: nnx.Module, dim: int) -> bool:
    """True when the protocol's model is a learned log-partition A (mu = grad A)."""
    graphdef, state = nnx.split(model)
    probe = jax.eval_shape(lambda s: protocol.log_partition(nnx.merge(graphdef, state), s),
                           jax.ShapeDtypeStruct((dim,), jnp.float64))
    return probe is not None


def load_oracle(directory: str | os.PathLike, family: ExponentialFamily | str | None = None,
                *, out_of_range: str | None = None) -> NeuralOracle:
    """Rebuild a saved NeuralOracle exactly (weights checked against the recorded SHA-256).

    ``family`` is needed for user-defined families: the family object or a
    ``"package.module:attribute"`` reference to it; built-in ones are rebuilt from the record.
    """
    config, payload, family = read_record(
        directory, what="oracle", config_file=CONFIG_FILE, weights_file=WEIGHTS_FILE,
        format_name=FORMAT_NAME, versions=(1, FORMAT_VERSION), family=family)
    weights_path = Path(directory) / WEIGHTS_FILE
    version = config["version"]
    protocol = protocol_from_record(config["protocol"]["name"], config["protocol"]["options"])
    dim = family.stat_dim
    model = protocol.build_model(config["architecture"], eta_dim=dim, stat_dim=dim,
                                 rngs=nnx.Rngs(0), **config["hyperparameters"])
    nnx.update(model, restore_tree(nnx.state(model), payload, weights_path))
    if version == 1:  # one anchor or None
        anchors = [] if config["anchor"] is None else [config["anchor"]]
    else:
        anchors = config["anchors"]
    return NeuralOracle(
        family, protocol, config["architecture"], config["hyperparameters"], model,
        Standardization.from_json(config["standardization"]),
        np.asarray(config["eta_low"]), np.asarray(config["eta_high"]),
        anchors=[LogPartitionEstimate.from_json(a) for a in anchors],
        out_of_range=config["out_of_range"] if out_of_range is None else out_of_range,
        metadata=config["metadata"],
    )

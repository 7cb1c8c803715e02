"""Flax NNX networks mapping a (standardised) natural parameter eta to E[T | eta].

Two kinds of network share one interface (``__call__`` = mean, ``covariance``):

- ``kind == "direct"``: the network outputs mu(eta) in R^stat_dim directly; the covariance is
  the Jacobian d mu / d eta, shape (..., stat_dim, eta_dim) (square when stat_dim == eta_dim).
  ``geometric_flow`` is direct but structured: mu(eta0) plus a quadrature of a PD matrix field
  along the segment eta0 -> eta (needs stat_dim == eta_dim).
- ``kind == "gradient"``: the network is a scalar log-partition A(eta); mu = grad A and
  Cov = Hessian A (jax autodiff), so stat_dim must equal eta_dim.  ``logz_icnn`` makes A
  input-convex, hence Cov is PSD by construction.

Every network accepts any leading batch shape: eta has shape (..., eta_dim).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .base import (
    Array,
    ConfiguredModule,
    build_from_registry,
    compiled,
    get_activation,
    per_example,
)

# ----------------------------------------------------------------------------- layer stacks


class GLULayer(nnx.Module):
    """Gated linear unit: (W1 x + b1) * sigmoid(W2 x + b2)."""

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
        self.value = nnx.Linear(din, dout, rngs=rngs)
        self.gate = nnx.Linear(din, dout, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.value(x) * jax.nn.sigmoid(self.gate(x))


class QuadraticLayer(nnx.Module):
    """Quadratic layer: W x + b - (W1 x) * relu(W2 x)."""

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.left = nnx.Linear(din, dout, use_bias=False, rngs=rngs)
        self.right = nnx.Linear(din, dout, use_bias=False, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.linear(x) - self.left(x) * jax.nn.relu(self.right(x))


def _dense(din: int, dout: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, rngs=rngs)


def _check_square(name: str, eta_dim: int, stat_dim: int, reason: str) -> None:
    if stat_dim != eta_dim:
        raise ValueError(
            f"{name!r} needs stat_dim == eta_dim ({reason}), "
            f"got stat_dim={stat_dim}, eta_dim={eta_dim}"
        )


class LayerStack(nnx.Module):
    """Hidden layers ``layer(d_k, d_{k+1})`` each followed by ``activation``, then a linear
    read-out to ``dout``: the shared body of every direct network and of ``logz_mlp``."""

    def __init__(
        self,
        din: int,
        dout: int,
        hidden: Sequence[int],
        activation: str,
        layer: Callable[..., nnx.Module],
        *,
        rngs: nnx.Rngs,
    ):
        sizes = [din, *hidden]
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.hidden = nnx.List([layer(a, b, rngs=rngs) for a, b in pairs])
        self.readout = nnx.Linear(sizes[-1], dout, rngs=rngs)
        self.activation = activation

    def __call__(self, x: Array) -> Array:
        act = get_activation(self.activation)
        for layer in self.hidden:
            x = act(layer(x))
        return self.readout(x)


# ----------------------------------------------------------------------------- base classes


class ExpectationNetwork(ConfiguredModule):
    """Base class: eta (..., eta_dim) -> E[T] (..., stat_dim).

    Subclasses declare ``name``, ``kind`` and ``defaults`` (hyperparameter defaults) and
    implement ``_build(**hyperparameters)``.
    """

    kind: ClassVar[str]

    def __init__(self, *, eta_dim: int, stat_dim: int, rngs: nnx.Rngs, **hyperparameters: Any):
        hp = self._configure({"eta_dim": eta_dim, "stat_dim": stat_dim}, hyperparameters)
        self.eta_dim = int(eta_dim)
        self.stat_dim = int(stat_dim)
        self._build(rngs=rngs, **hp)

    def _build(self, *, rngs: nnx.Rngs, **hyperparameters: Any) -> None:
        raise NotImplementedError

    def __call__(self, eta: Array) -> Array:
        raise NotImplementedError

    def covariance(self, eta: Array) -> Array:
        raise NotImplementedError

    def log_partition(self, eta: Array) -> Array:
        raise TypeError(
            f"{type(self).__name__} ({self.kind!r} network) has no log-partition; "
            "use a 'gradient' architecture (logz_mlp, logz_icnn)"
        )


class DirectNetwork(ExpectationNetwork):
    """mu(eta) = f(eta) directly; Cov(eta) := d mu / d eta (Jacobian, via jax.jacfwd)."""

    kind: ClassVar[str] = "direct"

    def _mean(self, eta: Array) -> Array:
        raise NotImplementedError

    def __call__(self, eta: Array) -> Array:
        return compiled(self, "_batched_mean", eta)

    def covariance(self, eta: Array) -> Array:
        return compiled(self, "_batched_covariance", eta)

    def _batched_mean(self, eta: Array) -> Array:
        return per_example(self._mean, eta, self.eta_dim)

    def _batched_covariance(self, eta: Array) -> Array:
        return per_example(jax.jacfwd(self._mean), eta, self.eta_dim)


class GradientNetwork(ExpectationNetwork):
    """Scalar log-partition A(eta); mu = grad A, Cov = Hessian A."""

    kind: ClassVar[str] = "gradient"

    def __init__(self, *, eta_dim: int, stat_dim: int, rngs: nnx.Rngs, **hyperparameters: Any):
        _check_square(self.name, eta_dim, stat_dim, "mu = grad A")
        super().__init__(eta_dim=eta_dim, stat_dim=stat_dim, rngs=rngs, **hyperparameters)

    def _log_partition(self, eta: Array) -> Array:
        """A at a single eta of shape (eta_dim,); returns a scalar."""
        raise NotImplementedError

    def log_partition(self, eta: Array) -> Array:
        return compiled(self, "_batched_log_partition", eta)

    def __call__(self, eta: Array) -> Array:
        return compiled(self, "_batched_mean", eta)

    def covariance(self, eta: Array) -> Array:
        return compiled(self, "_batched_covariance", eta)

    def _batched_log_partition(self, eta: Array) -> Array:
        return per_example(self._log_partition, eta, self.eta_dim)

    def _batched_mean(self, eta: Array) -> Array:
        return per_example(jax.grad(self._log_partition), eta, self.eta_dim)

    def _batched_covariance(self, eta: Array) -> Array:
        return per_example(jax.hessian(self._log_partition), eta, self.eta_dim)


# ----------------------------------------------------------------------------- architectures


class _StackMixin:
    """Direct networks that are a single ``LayerStack`` of a given layer type."""

    layer: ClassVar[Callable[..., nnx.Module]]

    def _build(self, *, rngs: nnx.Rngs, hidden: Sequence[int], activation: str) -> None:
        get_activation(activation)  # validate early
        self.body = LayerStack(
            self.eta_dim, self.stat_dim, hidden, activation, type(self).layer, rngs=rngs
        )

    def _mean(self, eta: Array) -> Array:
        return self.body(eta)


class MLP(_StackMixin, DirectNetwork):
    """mu = W_L act(... act(W_1 eta + b_1) ...) + b_L."""

    name = "mlp"
    layer = staticmethod(_dense)
    defaults = {"hidden": (64, 64), "activation": "silu"}


class GLU(_StackMixin, DirectNetwork):
    """Stack of gated blocks h -> (W1 h + b1) * sigmoid(W2 h + b2), then a linear read-out."""

    name = "glu"
    layer = GLULayer
    defaults = {"hidden": (64, 64), "activation": "identity"}


class Quadratic(_StackMixin, DirectNetwork):
    """Stack of quadratic layers h -> W h + b - (W1 h) * relu(W2 h), then a linear read-out."""

    name = "quadratic"
    layer = QuadraticLayer
    defaults = {"hidden": (64, 64), "activation": "identity"}


class LogZMLP(GradientNetwork):
    """A(eta) = scalar MLP (smooth activation; softplus by default so the Hessian is nonzero)."""

    name = "logz_mlp"
    defaults = {"hidden": (64, 64), "activation": "softplus"}

    def _build(self, *, rngs: nnx.Rngs, hidden: Sequence[int], activation: str) -> None:
        get_activation(activation)
        self.body = LayerStack(self.eta_dim, 1, hidden, activation, _dense, rngs=rngs)

    def _log_partition(self, eta: Array) -> Array:
        return self.body(eta)[0]


class LogZICNN(GradientNetwork):
    """Input-convex log-partition (Amos et al., 2017):

    z_1 = softplus(W_0 x + b_0);  z_{k+1} = softplus(softplus(U_k) z_k + W_k x + b_k);
    A(x) = softplus(u)·z_K + w·x + b + 0.5 * eps * |x|^2.

    softplus is convex and non-decreasing and the z-weights softplus(U_k) are non-negative, so
    A is convex in x and Hessian A (the covariance) is PSD; eps > 0 makes it strictly convex.
    """

    name = "logz_icnn"
    defaults = {"hidden": (64, 64), "eps": 1e-4}

    def _build(self, *, rngs: nnx.Rngs, hidden: Sequence[int], eps: float) -> None:
        hidden = list(hidden)
        if not hidden:
            raise ValueError("logz_icnn needs at least one hidden layer")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = float(eps)
        # x -> layer k pass-through (unconstrained); the last one is the affine term w·x + b.
        self.x_layers = nnx.List([nnx.Linear(self.eta_dim, d, rngs=rngs) for d in [*hidden, 1]])
        # z_k -> z_{k+1} raw weights; softplus(raw) >= 0.  Initialised so softplus(raw) ~ 1/d_in.
        self.z_raw = nnx.List(
            [
                nnx.Param(
                    jnp.log(jnp.expm1(1.0 / a)) + 0.1 * jax.random.normal(rngs.params(), (a, b))
                )
                for a, b in zip(hidden, [*hidden[1:], 1], strict=True)
            ]
        )

    def _log_partition(self, eta: Array) -> Array:
        z = jax.nn.softplus(self.x_layers[0](eta))
        n = len(self.z_raw)
        for k in range(n):
            pre = z @ jax.nn.softplus(self.z_raw[k][...]) + self.x_layers[k + 1](eta)
            z = pre if k == n - 1 else jax.nn.softplus(pre)
        return z[0] + 0.5 * self.eps * jnp.sum(eta**2)


class Glow(DirectNetwork):
    """Augmented affine-coupling flow, then a linear read-out (Dinh et al. 2017; Kingma &
    Dhariwal 2018; Huang et al. 2020 for the augmentation):

    x_0 = [eta, 0] in R^width;  coupling k: (a, b) -> (a, b * exp(s_k(a)) + t_k(a)),
    s_k = tanh(.) (bounded log scale), (s_k, t_k) = MLP_k(a), the halves swapping roles each layer;
    mu = W x_K + c.  Each coupling is invertible with log|det| = sum s_k(a).

    ``width`` is even and >= eta_dim; 0 means 2 * eta_dim, so the first coupling sees all of eta
    and writes an MLP feature t_0(eta) into the padding.
    """

    name = "glow"
    defaults = {"num_layers": 4, "hidden": (64,), "activation": "silu", "width": 0}

    def _build(
        self,
        *,
        rngs: nnx.Rngs,
        num_layers: int,
        hidden: Sequence[int],
        activation: str,
        width: int,
    ) -> None:
        get_activation(activation)
        if int(num_layers) < 1:
            raise ValueError(f"glow needs num_layers >= 1, got {num_layers}")
        width = int(width) or 2 * self.eta_dim
        if width % 2 or width < self.eta_dim:
            raise ValueError(
                f"glow width must be even and >= eta_dim={self.eta_dim} "
                f"(or 0 for 2 * eta_dim), got {width}"
            )
        self.width = width
        half = width // 2
        self.conditioners = nnx.List(
            [
                LayerStack(half, 2 * half, hidden, activation, _dense, rngs=rngs)
                for _ in range(int(num_layers))
            ]
        )
        self.readout = nnx.Linear(width, self.stat_dim, rngs=rngs)

    def flow(self, x: Array) -> tuple[Array, Array]:
        """The coupling stack on one x of shape (width,): (x_K, log|det dx_K / dx_0|)."""
        half = self.width // 2
        log_det = jnp.zeros((), x.dtype)
        for k, conditioner in enumerate(self.conditioners):
            a, b = (x[:half], x[half:]) if k % 2 == 0 else (x[half:], x[:half])
            out = conditioner(a)
            log_scale = jnp.tanh(out[:half])
            b = b * jnp.exp(log_scale) + out[half:]
            x = jnp.concatenate([a, b] if k % 2 == 0 else [b, a])
            log_det = log_det + jnp.sum(log_scale)
        return x, log_det

    def _mean(self, eta: Array) -> Array:
        x = jnp.concatenate([eta, jnp.zeros(self.width - self.eta_dim, eta.dtype)])
        return self.readout(self.flow(x)[0])


class Anchor(nnx.Variable):
    """Non-trainable state (not an ``nnx.Param``): a fixed reference point such as eta0."""


def gauss_legendre_01(order: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [0, 1]: int_0^1 f ~ sum_q w_q f(t_q)."""
    x, w = np.polynomial.legendre.leggauss(order)
    return 0.5 * (x + 1.0), 0.5 * w


class GeometricFlow(DirectNetwork):
    """mu(eta) = m0 + sum_q w_q L(eta_q) L(eta_q)^T (eta - eta0),  eta_q = eta0 + t_q (eta - eta0).

    This is Gauss-Legendre quadrature (nodes t_q, weights w_q on [0, 1]) of the exact identity
    E[T](eta) = E[T](eta0) + int_0^1 Cov(eta_t) (eta - eta0) dt along eta_t = eta0 + t (eta - eta0)
    (since d/dt E[T](eta_t) = Cov(eta_t) (eta - eta0)), with Cov modelled as L L^T: L lower
    triangular from an MLP, diagonal softplus(.) + eps > 0, so L L^T is positive definite and the
    Jacobian at the anchor is exactly L L^T(eta0).  The anchor eta0 (an ``Anchor``, not trained)
    and m0 (an ``nnx.Param``) start at 0; ``set_anchor`` sets them to a point with known E[T].
    """

    name = "geometric_flow"
    defaults = {"hidden": (64, 64), "activation": "silu", "quadrature_order": 8, "eps": 1e-4}

    def __init__(self, *, eta_dim: int, stat_dim: int, rngs: nnx.Rngs, **hyperparameters: Any):
        _check_square(self.name, eta_dim, stat_dim, "Cov(eta) (eta - eta0) is in eta-space")
        super().__init__(eta_dim=eta_dim, stat_dim=stat_dim, rngs=rngs, **hyperparameters)

    def _build(
        self,
        *,
        rngs: nnx.Rngs,
        hidden: Sequence[int],
        activation: str,
        quadrature_order: int,
        eps: float,
    ) -> None:
        get_activation(activation)
        if int(quadrature_order) < 1:
            raise ValueError(f"quadrature_order must be >= 1, got {quadrature_order}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.quadrature_order = int(quadrature_order)
        self.eps = float(eps)
        d = self.eta_dim
        self.body = LayerStack(d, d * (d + 1) // 2, hidden, activation, _dense, rngs=rngs)
        self.eta0 = Anchor(jnp.zeros(d))
        self.m0 = nnx.Param(jnp.zeros(d))

    def factor(self, eta: Array) -> Array:
        """L(eta) of shape (eta_dim, eta_dim): lower triangular, diagonal softplus(.) + eps."""
        d = self.eta_dim
        rows, cols = np.tril_indices(d)
        out = self.body(eta)
        raw = jnp.zeros((d, d), out.dtype).at[rows, cols].set(out)
        return jnp.where(np.eye(d, dtype=bool), jax.nn.softplus(raw) + self.eps, raw)

    def set_anchor(self, eta0: Array, mean0: Array) -> None:
        """Anchor the path: eta0 <- eta0, m0 <- mean0 (= E[T](eta0)), dtypes kept."""
        eta0, mean0 = jnp.asarray(eta0), jnp.asarray(mean0)
        if eta0.shape != (self.eta_dim,) or mean0.shape != (self.stat_dim,):
            raise ValueError(
                f"set_anchor needs eta0 of shape ({self.eta_dim},) and mean0 of shape "
                f"({self.stat_dim},), got {eta0.shape} and {mean0.shape}"
            )
        self.eta0[...] = eta0.astype(self.eta0[...].dtype)
        self.m0[...] = mean0.astype(self.m0[...].dtype)

    def _mean(self, eta: Array) -> Array:
        eta0 = self.eta0[...]
        delta = eta - eta0
        t, w = (jnp.asarray(v, delta.dtype) for v in gauss_legendre_01(self.quadrature_order))
        factors = jax.vmap(self.factor)(eta0 + t[:, None] * delta)  # (Q, d, d)
        half = jnp.einsum("qij,i->qj", factors, delta)  # L_q^T delta
        return self.m0[...] + jnp.einsum("q,qij,qj->i", w, factors, half)


# ----------------------------------------------------------------------------- registry

ARCHITECTURES: dict[str, type[ExpectationNetwork]] = {
    cls.name: cls for cls in (MLP, GLU, Quadratic, Glow, GeometricFlow, LogZMLP, LogZICNN)
}


def build_network(
    name: str, *, eta_dim: int, stat_dim: int, rngs: nnx.Rngs, **hyperparameters: Any
) -> ExpectationNetwork:
    """Build the architecture ``name`` (see ``ARCHITECTURES``); unspecified hyperparameters take
    the class defaults.  ``network.config`` records everything needed to rebuild it via
    ``build_network(config["name"], eta_dim=..., stat_dim=..., rngs=...,
    **config["hyperparameters"])``."""
    return build_from_registry(
        ARCHITECTURES, "architecture", name,
        eta_dim=eta_dim, stat_dim=stat_dim, rngs=rngs, **hyperparameters,
    )

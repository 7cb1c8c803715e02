"""Conditional vector fields f(z, t, eta) in R^dim for the flow training protocols (fm, ct, df).

A field acts on ONE example: z (dim,), a scalar time t in [0, 1] and a standardised natural
parameter eta (eta_dim,); the protocols vmap it and decide what the output means (a velocity for
fm, a clean-target prediction for ct, a noise prediction for df).  Time enters every field through
``time_embedding``; "cond" below is c = [emb(t), eta].

Seven fields, one registry (``FLOW_ARCHITECTURES``, ``build_flow_field``):

- ``potential_flow``: f = -grad_z V(z, t, eta), V a scalar MLP;
- ``geometric_flow``: f = Sigma(z, t, eta) eta, Sigma = L L^T + eps I (dim == eta_dim);
- ``natural_flow``: f = S S^T eta, S (dim x rank) from an MLP (dim == eta_dim);
- ``convex_potential_flow``: f = -grad_z V with V convex in z (a partially input-convex network);
- ``conditional_resnet_mlp``: residual MLP with the condition fed to every block;
- ``convex_conditional_resnet``: residual network whose every output coordinate is convex in z;
- ``bilinear_conditional_resnet``: residual blocks with a bilinear hidden x condition interaction.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .architectures import LayerStack
from .base import Array, ConfiguredModule, build_from_registry, get_activation


def time_embedding(t: Array, num_features: int) -> Array:
    """emb(t) = [t, sin(pi k t)_{k=1..K}, cos(pi k t)_{k=1..K}] with K = num_features."""
    t = jnp.asarray(t, dtype=jnp.result_type(float))
    angles = jnp.pi * jnp.arange(1, num_features + 1, dtype=t.dtype) * t
    return jnp.concatenate([t[None], jnp.sin(angles), jnp.cos(angles)])


class FlowField(ConfiguredModule):
    """Base class of the conditional fields f(z, t, eta) -> (dim,), for one example.

    Every field has the hyperparameters ``width`` (hidden width), ``depth`` (hidden layers or
    residual blocks), ``activation`` and ``time_features`` (K in ``time_embedding``).  Subclasses
    declare ``name`` and ``defaults``, build their layers in ``_build(rngs=..., activation=...,
    **extra)`` and compute the field in ``_field(z, t, eta)``; ``square`` fields need
    dim == eta_dim.
    """

    defaults: ClassVar[dict[str, Any]] = {
        "width": 64, "depth": 2, "activation": "silu", "time_features": 4,
    }
    square: ClassVar[bool] = False

    def __init__(self, *, dim: int, eta_dim: int, rngs: nnx.Rngs, **hyperparameters: Any):
        hp = self._configure({"dim": dim, "eta_dim": eta_dim}, hyperparameters)
        if self.square and dim != eta_dim:
            raise ValueError(
                f"flow field {self.name!r} multiplies eta by a dim x dim matrix, so it needs "
                f"dim == eta_dim; got dim={dim}, eta_dim={eta_dim}"
            )
        self.dim = int(dim)
        self.eta_dim = int(eta_dim)
        self.width = _positive_int("width", hp.pop("width"))
        self.depth = _positive_int("depth", hp.pop("depth"))
        self.time_features = int(hp.pop("time_features"))
        if self.time_features < 0:
            raise ValueError(f"time_features must be >= 0, got {self.time_features}")
        get_activation(hp["activation"])  # validate early
        self.activation = hp["activation"]
        self.cond_dim = 1 + 2 * self.time_features + self.eta_dim
        self._build(rngs=rngs, **hp)

    def __call__(self, z: Array, t: Array, eta: Array) -> Array:
        """The field at one example: (dim,)."""
        self._check(z, t, eta)
        return self._field(z, t, eta)

    def _check(self, z: Array, t: Array, eta: Array) -> None:
        shapes = (jnp.shape(z), jnp.shape(t), jnp.shape(eta))
        if shapes != ((self.dim,), (), (self.eta_dim,)):
            raise ValueError(
                f"flow field {self.name!r} acts on one example: z ({self.dim},), scalar t, "
                f"eta ({self.eta_dim},); got shapes {shapes} (vmap it over a batch)"
            )

    def conditioning(self, t: Array, eta: Array) -> Array:
        """c = [emb(t), eta], shape (cond_dim,)."""
        return jnp.concatenate([time_embedding(t, self.time_features), eta])

    def _mlp(self, din: int, dout: int, activation: str, rngs: nnx.Rngs) -> LayerStack:
        return LayerStack(din, dout, (self.width,) * self.depth, activation, nnx.Linear, rngs=rngs)


def soft_clip(z: Array, bound: float = 4.0) -> Array:
    """z / sqrt(1 + (z / bound)^2): the identity near 0, bounded by ``bound`` in each entry."""
    return z / jnp.sqrt(1.0 + (z / bound) ** 2)


def _positive_int(name: str, value: Any) -> int:
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


# ----------------------------------------------------------------------------- potential fields


class _PotentialField(FlowField):
    """f = -grad_z V(z, t, eta) for a scalar potential ``potential``."""

    def _field(self, z: Array, t: Array, eta: Array) -> Array:
        return -jax.grad(self._potential)(z, t, eta)

    def potential(self, z: Array, t: Array, eta: Array) -> Array:
        """The scalar potential V(z, t, eta)."""
        self._check(z, t, eta)
        return self._potential(z, t, eta)


class PotentialFlowField(_PotentialField):
    """f = -grad_z V(z, t, eta), V = MLP([z, emb(t), eta]) -> scalar."""

    name = "potential_flow"

    def _build(self, *, rngs: nnx.Rngs, activation: str) -> None:
        # depth hidden layers; the scalar read-out has no bias (a constant in V is dead weight).
        hidden = (self.width,) * (self.depth - 1)
        din = self.dim + self.cond_dim
        self.body = LayerStack(din, self.width, hidden, activation, nnx.Linear, rngs=rngs)
        self.readout = nnx.Linear(self.width, 1, use_bias=False, rngs=rngs)

    def _potential(self, z: Array, t: Array, eta: Array) -> Array:
        act = get_activation(self.activation)
        return self.readout(act(self.body(jnp.concatenate([z, self.conditioning(t, eta)]))))[0]


def _nonnegative(din: int, dout: int, rngs: nnx.Rngs) -> nnx.Param:
    """Raw weights R whose softplus(R) >= 0 starts near 1 / din (the LogZICNN initialisation)."""
    noise = 0.1 * jax.random.normal(rngs.params(), (din, dout))
    return nnx.Param(jnp.log(jnp.expm1(1.0 / din)) + noise)


def _centred_softplus(x: Array) -> Array:
    """softplus(x) - log 2: convex, non-decreasing and 0 at 0 (hidden units stay centred)."""
    return jax.nn.softplus(x) - jnp.log(2.0)


class ConvexInput(nnx.Module):
    """Affine in x for a fixed context u: W [x * (A u + a), u] + b (the PICNN input term)."""

    def __init__(
        self, dim: int, context_dim: int, dout: int, *, use_bias: bool = True, rngs: nnx.Rngs
    ):
        self.gate = nnx.Linear(context_dim, dim, rngs=rngs)
        self.linear = nnx.Linear(dim + context_dim, dout, use_bias=use_bias, rngs=rngs)

    def __call__(self, x: Array, context: Array) -> Array:
        return self.linear(jnp.concatenate([x * self.gate(context), context]))


class _ConvexField(FlowField):
    """Partially input-convex networks (Amos et al., 2017): convex in z for fixed (t, eta).

    The condition is encoded as u = act(W_u c + b_u) (unconstrained); on the z path every weight
    is softplus(raw) >= 0 and every activation is sp(x) = softplus(x) - log 2 (convex,
    non-decreasing), and z enters only through ``ConvexInput`` terms that are affine in z.
    """

    def _context(self, t: Array, eta: Array) -> Array:
        return get_activation(self.activation)(self.context(self.conditioning(t, eta)))


class ConvexPotentialFlowField(_ConvexField, _PotentialField):
    """f = -grad_z V, V = h_K sp(r) + I_K(z, u) + 0.5 sp(q(u)) |z|^2, convex in z, with
    h_1 = sp(I_0(z, u)), h_{k+1} = sp(h_k sp(R_k) + I_k(z, u)), sp = softplus (- log 2 on h)."""

    name = "convex_potential_flow"

    def _build(self, *, rngs: nnx.Rngs, activation: str) -> None:
        w, d = self.width, self.depth
        self.context = nnx.Linear(self.cond_dim, w, rngs=rngs)
        # the last input term has no bias: a constant in V is dead weight.
        self.inputs = nnx.List(
            [ConvexInput(self.dim, w, w, rngs=rngs) for _ in range(d)]
            + [ConvexInput(self.dim, w, 1, use_bias=False, rngs=rngs)]
        )
        self.hidden_raw = nnx.List(
            [_nonnegative(w, dout, rngs) for dout in [w] * (d - 1) + [1]]
        )
        self.curvature = nnx.Linear(w, 1, rngs=rngs)

    def _potential(self, z: Array, t: Array, eta: Array) -> Array:
        u = self._context(t, eta)
        h = _centred_softplus(self.inputs[0](z, u))
        for k in range(self.depth):
            pre = h @ jax.nn.softplus(self.hidden_raw[k][...]) + self.inputs[k + 1](z, u)
            h = pre if k == self.depth - 1 else _centred_softplus(pre)
        return h[0] + 0.5 * jax.nn.softplus(self.curvature(u)[0]) * jnp.sum(z**2)


# ----------------------------------------------------------------------------- matrix fields


class GeometricFlowField(FlowField):
    """f = Sigma eta, Sigma = L L^T + eps I (symmetric PSD), L lower-triangular =
    MLP([soft_clip(z), c]).  Sigma is bounded in z, so the field is too and no probability-flow
    ODE built on it can blow up in finite time (with L linear in z it would grow like |z|^2)."""

    name = "geometric_flow"
    square = True
    defaults = {**FlowField.defaults, "eps": 1e-4}

    def _build(self, *, rngs: nnx.Rngs, activation: str, eps: float) -> None:
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = float(eps)
        entries = self.dim * (self.dim + 1) // 2
        self.body = self._mlp(self.dim + self.cond_dim, entries, activation, rngs)

    def matrix(self, z: Array, t: Array, eta: Array) -> Array:
        """Sigma(z, t, eta) = L L^T + eps I, shape (dim, dim)."""
        self._check(z, t, eta)
        entries = self.body(jnp.concatenate([soft_clip(z), self.conditioning(t, eta)]))
        rows, cols = np.tril_indices(self.dim)
        chol = jnp.zeros((self.dim, self.dim), entries.dtype).at[rows, cols].set(entries)
        return chol @ chol.T + self.eps * jnp.eye(self.dim, dtype=entries.dtype)

    def _field(self, z: Array, t: Array, eta: Array) -> Array:
        return self.matrix(z, t, eta) @ eta


class NaturalFlowField(FlowField):
    """f = S S^T eta, S (dim x rank) = MLP([soft_clip(z), c]) reshaped (bounded in z, as in
    ``GeometricFlowField``); rank = dim when ``rank`` is None."""

    name = "natural_flow"
    square = True
    defaults = {**FlowField.defaults, "rank": None}

    def _build(self, *, rngs: nnx.Rngs, activation: str, rank: int | None) -> None:
        self.rank = self.dim if rank is None else _positive_int("rank", rank)
        self.body = self._mlp(self.dim + self.cond_dim, self.dim * self.rank, activation, rngs)

    def factor(self, z: Array, t: Array, eta: Array) -> Array:
        """S(z, t, eta), shape (dim, rank)."""
        self._check(z, t, eta)
        out = self.body(jnp.concatenate([soft_clip(z), self.conditioning(t, eta)]))
        return out.reshape(self.dim, self.rank)

    def matrix(self, z: Array, t: Array, eta: Array) -> Array:
        """S S^T, shape (dim, dim), symmetric PSD of rank <= ``rank``."""
        s = self.factor(z, t, eta)
        return s @ s.T

    def _field(self, z: Array, t: Array, eta: Array) -> Array:
        s = self.factor(z, t, eta)
        return s @ (s.T @ eta)


# ----------------------------------------------------------------------------- residual fields


class ConditionalResNetMLP(FlowField):
    """h = W_in [z, c]; h <- h + W2 act(W1 [h, c]) per block; f = W_out h."""

    name = "conditional_resnet_mlp"

    def _build(self, *, rngs: nnx.Rngs, activation: str) -> None:
        w, c = self.width, self.cond_dim
        self.stem = nnx.Linear(self.dim + c, w, rngs=rngs)
        self.block_in = nnx.List([nnx.Linear(w + c, w, rngs=rngs) for _ in range(self.depth)])
        self.block_out = nnx.List([nnx.Linear(w, w, rngs=rngs) for _ in range(self.depth)])
        self.readout = nnx.Linear(w, self.dim, rngs=rngs)

    def _field(self, z: Array, t: Array, eta: Array) -> Array:
        act = get_activation(self.activation)
        c = self.conditioning(t, eta)
        h = self.stem(jnp.concatenate([z, c]))
        for inner, outer in zip(self.block_in, self.block_out, strict=True):
            h = h + outer(act(inner(jnp.concatenate([h, c]))))
        return self.readout(h)


class ConvexConditionalResNet(_ConvexField):
    """h = sp(I_0(z, u)); h <- h + sp(h sp(R1) + I_k(z, u)) sp(R2) per block;
    f = h sp(R_out) + I_out(z, u), sp = softplus (- log 2 on h): each f_i convex in z."""

    name = "convex_conditional_resnet"

    def _build(self, *, rngs: nnx.Rngs, activation: str) -> None:
        w, d = self.width, self.depth
        self.context = nnx.Linear(self.cond_dim, w, rngs=rngs)
        self.stem = ConvexInput(self.dim, w, w, rngs=rngs)
        self.block_inputs = nnx.List([ConvexInput(self.dim, w, w, rngs=rngs) for _ in range(d)])
        self.block_in_raw = nnx.List([_nonnegative(w, w, rngs) for _ in range(d)])
        self.block_out_raw = nnx.List([_nonnegative(w, w, rngs) for _ in range(d)])
        self.readout = ConvexInput(self.dim, w, self.dim, rngs=rngs)
        self.readout_raw = _nonnegative(w, self.dim, rngs)

    def _field(self, z: Array, t: Array, eta: Array) -> Array:
        sp, act = jax.nn.softplus, _centred_softplus
        u = self._context(t, eta)
        h = act(self.stem(z, u))
        for k in range(self.depth):
            inner = act(h @ sp(self.block_in_raw[k][...]) + self.block_inputs[k](z, u))
            h = h + inner @ sp(self.block_out_raw[k][...])
        return h @ sp(self.readout_raw[...]) + self.readout(z, u)


class BilinearConditionalResNet(FlowField):
    """h = W_in [z, c]; h <- h + W_o act((W_h h) * (W_c c) + b) per block; f = W_out h."""

    name = "bilinear_conditional_resnet"

    def _build(self, *, rngs: nnx.Rngs, activation: str) -> None:
        w, c, d = self.width, self.cond_dim, self.depth
        self.stem = nnx.Linear(self.dim + c, w, rngs=rngs)
        self.hidden_proj = nnx.List(
            [nnx.Linear(w, w, use_bias=False, rngs=rngs) for _ in range(d)]
        )
        self.cond_proj = nnx.List([nnx.Linear(c, w, use_bias=False, rngs=rngs) for _ in range(d)])
        self.bias = nnx.List([nnx.Param(jnp.zeros((w,))) for _ in range(d)])
        self.out_proj = nnx.List([nnx.Linear(w, w, rngs=rngs) for _ in range(d)])
        self.readout = nnx.Linear(w, self.dim, rngs=rngs)

    def _field(self, z: Array, t: Array, eta: Array) -> Array:
        act = get_activation(self.activation)
        c = self.conditioning(t, eta)
        h = self.stem(jnp.concatenate([z, c]))
        for k in range(self.depth):
            inner = self.hidden_proj[k](h) * self.cond_proj[k](c) + self.bias[k][...]
            h = h + self.out_proj[k](act(inner))
        return self.readout(h)


# ----------------------------------------------------------------------------- registry

FLOW_ARCHITECTURES: dict[str, type[FlowField]] = {
    cls.name: cls
    for cls in (
        PotentialFlowField,
        GeometricFlowField,
        NaturalFlowField,
        ConvexPotentialFlowField,
        ConditionalResNetMLP,
        ConvexConditionalResNet,
        BilinearConditionalResNet,
    )
}


def build_flow_field(
    name: str, *, dim: int, eta_dim: int, rngs: nnx.Rngs, **hyperparameters: Any
) -> FlowField:
    """Build the flow field ``name`` (see ``FLOW_ARCHITECTURES``); unspecified hyperparameters
    take the class defaults.  ``field.config`` rebuilds it via ``build_flow_field(config["name"],
    dim=..., eta_dim=..., rngs=..., **config["hyperparameters"])``."""
    return build_from_registry(
        FLOW_ARCHITECTURES, "flow architecture", name,
        dim=dim, eta_dim=eta_dim, rngs=rngs, **hyperparameters,
    )

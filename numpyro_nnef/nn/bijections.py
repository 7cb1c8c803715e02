"""Conditional normalizing flows x = g(z; c) on R^dim, conditioned on a standardised eta c.

Every layer acts on ONE example (callers vmap) and has

    forward(z, c) -> (x, log|det dx/dz|)      (the sampling direction, base -> data)
    inverse(x, c) -> (z, log|det dz/dx|)      (the density direction, data -> base)

so log q(x | c) = log N(z; 0, I) + log|det dz/dx|. Layers are float64-safe (parameters take the
default float dtype: float64 under ``jax_enable_x64``). Conditioner networks end in a
zero-initialised linear layer, so a freshly built flow is a permutation of z (the identity for
realnvp and nsf; maf, iaf and glow reverse the coordinates between layers).

Five flows, one registry (``FLOW_SAMPLER_ARCHITECTURES``, ``build_conditional_flow``); each
ends (on the data side) in a conditional elementwise affine layer x = loc(c) + exp(s(c)) y, so
every flow contains the conditional Gaussians:

- ``realnvp``: affine couplings with alternating masks (Dinh et al. 2017);
- ``maf``: masked autoregressive affine layers, MADE conditioners (Papamakarios et al. 2017):
  the density is one pass, sampling takes dim passes;
- ``iaf``: inverse autoregressive affine layers (Kingma et al. 2016): sampling is one pass,
  the density takes dim passes;
- ``nsf``: rational-quadratic spline couplings with linear (identity) tails outside
  [-tail_bound, tail_bound] (Durkan et al. 2019);
- ``glow``: steps of ActNorm (data-dependent initialisation), an invertible linear map
  W = P L (U + diag(exp(log_s))) (LU parameterisation, P a reversal) and an affine coupling
  (Kingma & Dhariwal 2018).

For dim = 1 a coupling has nothing to condition on but c: its "identity part" is empty, and the
coupling is a conditional elementwise map (affine for realnvp/glow, a spline for nsf; maf/iaf
likewise reduce to conditional elementwise affine maps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.scipy.linalg import solve_triangular

from .base import Array, ConfiguredModule, build_from_registry, get_activation

__all__ = [
    "FLOW_SAMPLER_ARCHITECTURES",
    "MADE",
    "ActNorm",
    "AffineCoupling",
    "Autoregressive",
    "ConditionalAffine",
    "ConditionalFlow",
    "Conditioner",
    "GlowFlow",
    "IAFFlow",
    "InvertibleLinear",
    "Layer",
    "MAFFlow",
    "NSFFlow",
    "RealNVPFlow",
    "Reverse",
    "SplineCoupling",
    "build_conditional_flow",
    "rational_quadratic_spline",
]

DEFAULT_SCALE_CLAMP = 3.0  # coupling log-scales are s = clamp * tanh(raw / clamp)
OUTPUT_SCALE_CLAMP = 10.0  # the final conditional affine layer


def _float() -> Any:
    return jnp.result_type(float)


def _soft_clamp(raw: Array, bound: float) -> Array:
    """s = bound * tanh(raw / bound): |s| < bound, s ~ raw near 0."""
    return bound * jnp.tanh(raw / bound)


# ----------------------------------------------------------------------------- conditioners


class Conditioner(nnx.Module):
    """MLP [y, c] -> R^dout (y of size din_y, c of size cond_dim) with a zero-initialised
    read-out (the layer starts as identity).

    The first layer splits as W [y; c] + b = W_y y + (W_c c + b): ``context(c)`` is the part
    computed once per condition, ``apply(y, context)`` the part computed per draw.
    """

    def __init__(self, din_y: int, cond_dim: int, dout: int, hidden: Sequence[int],
                 activation: str, *, rngs: nnx.Rngs):
        sizes = [din_y + cond_dim, *hidden]
        self.din_y = int(din_y)
        self.hidden = nnx.List([nnx.Linear(a, b, param_dtype=_float(), rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:], strict=True)])
        self.readout = nnx.Linear(sizes[-1], dout, param_dtype=_float(), rngs=rngs,
                                  kernel_init=nnx.initializers.zeros_init())
        self.activation = activation

    def _linears(self) -> list[nnx.Linear]:
        return [*self.hidden, self.readout]

    def context(self, c: Array) -> Array:
        """W_c c + b of the first layer."""
        first = self._linears()[0]
        return c @ first.kernel[...][self.din_y:] + first.bias[...]

    def apply(self, y: Array, context: Array) -> Array:
        """The network's output from y and ``context(c)``."""
        act = get_activation(self.activation)
        linears = self._linears()
        h = context if self.din_y == 0 else y @ linears[0].kernel[...][:self.din_y] + context
        for layer in linears[1:]:
            h = layer(act(h))
        return h

    def __call__(self, y: Array, c: Array) -> Array:
        return self.apply(y, self.context(c))


def _made_masks(dim: int, hidden: Sequence[int], params_per_dim: int) -> list[np.ndarray]:
    """MADE masks (Germain et al. 2015): input i has degree i + 1, hidden units cycle through
    degrees 1..dim-1 (0 when dim = 1: they see only c), output block i has degree i + 1;
    a connection k -> j exists iff deg(j) >= deg(k) (hidden) or deg(j) > deg(k) (output)."""
    degrees = [np.arange(1, dim + 1)]
    for width in hidden:
        degrees.append(np.arange(width) % max(dim - 1, 1) + min(dim - 1, 1))
    masks = [(d_out[None, :] >= d_in[:, None])
             for d_in, d_out in zip(degrees[:-1], degrees[1:], strict=True)]
    out_degrees = np.repeat(np.arange(1, dim + 1), params_per_dim)
    masks.append(out_degrees[None, :] > degrees[-1][:, None])
    return [m.astype(np.float64) for m in masks]


class MADE(nnx.Module):
    """Masked MLP (y, c) -> (dim, params_per_dim): row i depends on y_<i and on c only."""

    def __init__(self, dim: int, cond_dim: int, params_per_dim: int, hidden: Sequence[int],
                 activation: str, *, rngs: nnx.Rngs):
        self.dim, self.params_per_dim, self.hidden_sizes = dim, params_per_dim, tuple(hidden)
        self.activation = activation
        sizes = [dim, *hidden, dim * params_per_dim]
        init = nnx.initializers.lecun_normal()
        kernels, biases = [], []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            last = i == len(sizes) - 2
            kernels.append(nnx.Param(jnp.zeros((a, b), _float()) if last
                                     else init(rngs.params(), (a, b), _float())))
            biases.append(nnx.Param(jnp.zeros((b,), _float())))
        self.kernels, self.biases = nnx.List(kernels), nnx.List(biases)
        first = hidden[0] if hidden else dim * params_per_dim
        self.cond = nnx.Linear(cond_dim, first, use_bias=False, param_dtype=_float(), rngs=rngs)

    def context(self, c: Array) -> Array:
        """The first layer's conditional part W_c c + b_0 (computed once per condition)."""
        return self.cond(c) + self.biases[0][...]

    def apply(self, y: Array, context: Array) -> Array:
        """The (dim, params_per_dim) outputs from y and ``context(c)``."""
        act = get_activation(self.activation)
        masks = _made_masks(self.dim, self.hidden_sizes, self.params_per_dim)
        h = y @ (self.kernels[0][...] * masks[0].astype(y.dtype)) + context
        for kernel, bias, mask in zip(self.kernels[1:], self.biases[1:], masks[1:],
                                      strict=True):
            h = act(h) @ (kernel[...] * mask.astype(h.dtype)) + bias[...]
        return h.reshape(self.dim, self.params_per_dim)

    def __call__(self, y: Array, c: Array) -> Array:
        return self.apply(y, self.context(c))


# ----------------------------------------------------------------------------- layers


class Layer(nnx.Module):
    """A conditional bijection split in two: ``condition(c)`` computes what depends on c only
    (once per condition), ``forward_given`` / ``inverse_given`` the rest (per draw), so that many
    draws at one condition share the conditioner work. ``forward(z, c)`` composes the two."""

    def condition(self, c: Array) -> Any:
        return ()

    def forward_given(self, z: Array, context: Any) -> tuple[Array, Array]:
        raise NotImplementedError

    def inverse_given(self, x: Array, context: Any) -> tuple[Array, Array]:
        raise NotImplementedError

    def forward(self, z: Array, c: Array) -> tuple[Array, Array]:
        """(x, log|det dx/dz|)."""
        return self.forward_given(z, self.condition(c))

    def inverse(self, x: Array, c: Array) -> tuple[Array, Array]:
        """(z, log|det dz/dx|)."""
        return self.inverse_given(x, self.condition(c))


class ConditionalAffine(Layer):
    """x = loc(c) + exp(s(c)) * z elementwise; log|det| = sum s."""

    def __init__(self, dim: int, cond_dim: int, hidden: Sequence[int], activation: str, *,
                 rngs: nnx.Rngs):
        self.net = Conditioner(0, cond_dim, 2 * dim, hidden, activation, rngs=rngs)

    def condition(self, c: Array) -> tuple[Array, Array]:
        loc, raw = jnp.split(self.net(jnp.zeros(0, c.dtype), c), 2)
        return loc, _soft_clamp(raw, OUTPUT_SCALE_CLAMP)

    def forward_given(self, z: Array, context: tuple[Array, Array]) -> tuple[Array, Array]:
        loc, s = context
        return loc + jnp.exp(s) * z, jnp.sum(s)

    def inverse_given(self, x: Array, context: tuple[Array, Array]) -> tuple[Array, Array]:
        loc, s = context
        return (x - loc) * jnp.exp(-s), -jnp.sum(s)


def _coupling_mask(dim: int, parity: int) -> np.ndarray:
    """True where a coordinate is transformed: i + parity odd (all coordinates when dim = 1)."""
    if dim == 1:
        return np.ones(1, bool)
    return (np.arange(dim) + parity) % 2 == 1


class _Coupling(Layer):
    """theta = NN(y_A, c) with y_A = y outside the transformed set B (zeros on B). For dim = 1,
    A is empty and theta depends on c only, so ``condition`` computes theta itself."""

    def __init__(self, dim: int, cond_dim: int, parity: int, dout: int, hidden: Sequence[int],
                 activation: str, *, rngs: nnx.Rngs):
        self.dim, self.parity = dim, parity
        self.net = Conditioner(dim, cond_dim, dout, hidden, activation, rngs=rngs)

    def _mask(self) -> Array:
        return jnp.asarray(_coupling_mask(self.dim, self.parity))

    def condition(self, c: Array) -> Array:
        context = self.net.context(c)
        if self.dim == 1:
            return self.net.apply(jnp.zeros(1, c.dtype), context)
        return context

    def _theta(self, y: Array, context: Array) -> Array:
        if self.dim == 1:
            return context
        return self.net.apply(jnp.where(self._mask(), 0.0, y), context)


class AffineCoupling(_Coupling):
    """x_B = z_B * exp(s) + t, x_A = z_A, with (s, t) = NN(z_A, c) (B = transformed set)."""

    def __init__(self, dim: int, cond_dim: int, parity: int, hidden: Sequence[int],
                 activation: str, scale_clamp: float, *, rngs: nnx.Rngs):
        super().__init__(dim, cond_dim, parity, 2 * dim, hidden, activation, rngs=rngs)
        self.scale_clamp = float(scale_clamp)

    def _params(self, y: Array, context: Array) -> tuple[Array, Array]:
        mask = self._mask()
        shift, raw = jnp.split(self._theta(y, context), 2)
        return jnp.where(mask, shift, 0.0), jnp.where(mask, _soft_clamp(raw, self.scale_clamp),
                                                      0.0)

    def forward_given(self, z: Array, context: Array) -> tuple[Array, Array]:
        shift, s = self._params(z, context)
        return z * jnp.exp(s) + shift, jnp.sum(s)

    def inverse_given(self, x: Array, context: Array) -> tuple[Array, Array]:
        shift, s = self._params(x, context)
        return (x - shift) * jnp.exp(-s), -jnp.sum(s)


class Autoregressive(Layer):
    """Affine autoregressive layer with a MADE conditioner, (m_i, s_i) = MADE(y_<i, c).

    ``inverse_autoregressive=False`` (MAF): z_i = (x_i - m_i(x_<i)) exp(-s_i), one pass for the
    density, dim passes to sample. ``True`` (IAF): x_i = z_i exp(s_i(z_<i)) + m_i(z_<i), one pass
    to sample, dim passes for the density.
    """

    def __init__(self, dim: int, cond_dim: int, hidden: Sequence[int], activation: str,
                 scale_clamp: float, inverse_autoregressive: bool, *, rngs: nnx.Rngs):
        self.dim, self.scale_clamp = dim, float(scale_clamp)
        self.inverse_autoregressive = bool(inverse_autoregressive)
        self.made = MADE(dim, cond_dim, 2, hidden, activation, rngs=rngs)

    def condition(self, c: Array) -> Array:
        """MADE's conditional part; for dim = 1 the outputs themselves (they see only c)."""
        context = self.made.context(c)
        if self.dim == 1:
            return self.made.apply(jnp.zeros(1, c.dtype), context)
        return context

    def _params(self, y: Array, context: Array) -> tuple[Array, Array]:
        out = context if self.dim == 1 else self.made.apply(y, context)
        return out[:, 0], _soft_clamp(out[:, 1], self.scale_clamp)

    def _one_pass(self, y: Array, context: Array, sign: float) -> tuple[Array, Array]:
        """sign = +1: y -> y exp(s) + m; sign = -1: y -> (y - m) exp(-s); params from y."""
        m, s = self._params(y, context)
        out = y * jnp.exp(s) + m if sign > 0 else (y - m) * jnp.exp(-s)
        return out, sign * jnp.sum(s)

    def _sequential(self, y: Array, context: Array, sign: float) -> tuple[Array, Array]:
        """Solve out = map(y; params(out)) coordinate by coordinate: after pass i the first i
        coordinates are exact (dim passes)."""

        def one_pass(_, carry):
            out, _ = carry
            m, s = self._params(out, context)
            return (y * jnp.exp(s) + m if sign > 0 else (y - m) * jnp.exp(-s)), s

        out, s = jax.lax.fori_loop(0, self.dim, one_pass, (jnp.zeros_like(y), jnp.zeros_like(y)))
        return out, sign * jnp.sum(s)

    def forward_given(self, z: Array, context: Array) -> tuple[Array, Array]:
        if self.inverse_autoregressive:
            return self._one_pass(z, context, +1.0)
        return self._sequential(z, context, +1.0)

    def inverse_given(self, x: Array, context: Array) -> tuple[Array, Array]:
        if self.inverse_autoregressive:
            return self._sequential(x, context, -1.0)
        return self._one_pass(x, context, -1.0)


class Reverse(Layer):
    """x = z[::-1]; log|det| = 0."""

    def forward_given(self, z: Array, context: Any) -> tuple[Array, Array]:
        return z[::-1], jnp.zeros((), z.dtype)

    def inverse_given(self, x: Array, context: Any) -> tuple[Array, Array]:
        return x[::-1], jnp.zeros((), x.dtype)


class ActNorm(Layer):
    """x = z * exp(log_scale) + bias; :meth:`initialize` sets both from a batch so that the
    outputs have zero mean and unit variance per coordinate (data-dependent initialisation)."""

    def __init__(self, dim: int):
        self.log_scale = nnx.Param(jnp.zeros((dim,), _float()))
        self.bias = nnx.Param(jnp.zeros((dim,), _float()))

    def initialize(self, inputs: Array) -> None:
        """Set log_scale = -log std(inputs), bias = -mean(inputs) / std(inputs) (batch axis 0)."""
        mean = jnp.mean(inputs, axis=0)
        std = jnp.sqrt(jnp.var(inputs, axis=0) + 1e-6)
        self.log_scale[...] = (-jnp.log(std)).astype(self.log_scale[...].dtype)
        self.bias[...] = (-mean / std).astype(self.bias[...].dtype)

    def forward_given(self, z: Array, context: Any) -> tuple[Array, Array]:
        return z * jnp.exp(self.log_scale[...]) + self.bias[...], jnp.sum(self.log_scale[...])

    def inverse_given(self, x: Array, context: Any) -> tuple[Array, Array]:
        log_scale = self.log_scale[...]
        return (x - self.bias[...]) * jnp.exp(-log_scale), -jnp.sum(log_scale)


class InvertibleLinear(Layer):
    """x = W z with W = P L (U + diag(exp(log_s))): P the reversal, L unit lower triangular,
    U strictly upper triangular; log|det W| = sum log_s. Starts at W = P."""

    def __init__(self, dim: int):
        self.lower = nnx.Param(jnp.zeros((dim, dim), _float()))
        self.upper = nnx.Param(jnp.zeros((dim, dim), _float()))
        self.log_s = nnx.Param(jnp.zeros((dim,), _float()))

    def _factors(self) -> tuple[Array, Array]:
        eye = jnp.eye(self.log_s.shape[0], dtype=self.log_s[...].dtype)
        lower = jnp.tril(self.lower[...], -1) + eye
        upper = jnp.triu(self.upper[...], 1) + jnp.diag(jnp.exp(self.log_s[...]))
        return lower, upper

    def forward_given(self, z: Array, context: Any) -> tuple[Array, Array]:
        lower, upper = self._factors()
        return (lower @ (upper @ z))[::-1], jnp.sum(self.log_s[...])

    def inverse_given(self, x: Array, context: Any) -> tuple[Array, Array]:
        lower, upper = self._factors()
        a = solve_triangular(lower, x[::-1], lower=True, unit_diagonal=True)
        return solve_triangular(upper, a, lower=False), -jnp.sum(self.log_s[...])


# ----------------------------------------------------------------------------- splines


def rational_quadratic_spline(
    inputs: Array,
    unnormalized_widths: Array,
    unnormalized_heights: Array,
    unnormalized_derivatives: Array,
    *,
    inverse: bool,
    tail_bound: float,
    min_bin_width: float,
    min_bin_height: float,
    min_derivative: float,
) -> tuple[Array, Array]:
    """Monotone rational-quadratic spline on [-B, B], identity outside (Durkan et al. 2019).

    Elementwise on ``inputs`` (n,) with per-element parameters (n, K), (n, K), (n, K - 1) for K
    bins. In bin k with xi = (x - x_k) / w_k, s_k = h_k / w_k:
    y = y_k + h_k [s_k xi^2 + d_k xi (1 - xi)] / [s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi)].
    The boundary derivatives are 1 (linear tails). Returns (outputs, log|dy/dx| elementwise)
    for ``inverse=False``, or (x, log|dx/dy|) for ``inverse=True``.
    """
    bound = tail_bound
    num_bins = unnormalized_widths.shape[-1]
    if min_bin_width * num_bins > 1.0 or min_bin_height * num_bins > 1.0:
        raise ValueError(f"min_bin_width/min_bin_height times num_bins={num_bins} must be <= 1")
    dtype = inputs.dtype
    inside = (inputs >= -bound) & (inputs <= bound)
    y_in = jnp.clip(inputs, -bound, bound)  # keeps the untaken branch finite (no NaN grads)

    def knots(unnormalized, minimum):
        size = minimum + (1.0 - minimum * num_bins) * jax.nn.softmax(unnormalized, axis=-1)
        cum = jnp.concatenate([jnp.zeros(size.shape[:-1] + (1,), dtype),
                               jnp.cumsum(size, axis=-1)], axis=-1)
        cum = 2.0 * bound * cum - bound
        cum = cum.at[..., 0].set(-bound).at[..., -1].set(bound)
        return cum, cum[..., 1:] - cum[..., :-1]

    cumwidths, widths = knots(unnormalized_widths, min_bin_width)
    cumheights, heights = knots(unnormalized_heights, min_bin_height)
    # softplus(u + log(e^{1 - min_d} - 1)) + min_d equals 1 at u = 0 (identity at initialisation)
    offset = math.log(math.expm1(1.0 - min_derivative))
    inner = min_derivative + jax.nn.softplus(unnormalized_derivatives + offset)
    ones = jnp.ones(inner.shape[:-1] + (1,), dtype)
    derivatives = jnp.concatenate([ones, inner, ones], axis=-1)

    locations = cumheights if inverse else cumwidths
    index = jnp.sum(y_in[..., None] >= locations[..., :-1], axis=-1) - 1
    index = jnp.clip(index, 0, num_bins - 1)[..., None]

    def pick(a):
        return jnp.take_along_axis(a, index, axis=-1)[..., 0]

    x_k, w_k = pick(cumwidths), pick(widths)
    y_k, h_k = pick(cumheights), pick(heights)
    d_k, d_k1 = pick(derivatives[..., :-1]), pick(derivatives[..., 1:])
    s_k = h_k / w_k
    slope_sum = d_k + d_k1 - 2.0 * s_k

    if inverse:
        dy = y_in - y_k
        a = h_k * (s_k - d_k) + dy * slope_sum
        b = h_k * d_k - dy * slope_sum
        c = -s_k * dy
        disc = jnp.maximum(b * b - 4.0 * a * c, 0.0)
        xi = (2.0 * c) / (-b - jnp.sqrt(disc))
        out = xi * w_k + x_k
    else:
        xi = (y_in - x_k) / w_k
        out = y_k + h_k * (s_k * xi**2 + d_k * xi * (1 - xi)) / (s_k + slope_sum * xi * (1 - xi))
    one_minus = 1.0 - xi
    denominator = s_k + slope_sum * xi * one_minus
    numerator = s_k**2 * (d_k1 * xi**2 + 2.0 * s_k * xi * one_minus + d_k * one_minus**2)
    log_det = jnp.log(numerator) - 2.0 * jnp.log(denominator)
    if inverse:
        log_det = -log_det
    return jnp.where(inside, out, inputs), jnp.where(inside, log_det, 0.0)


class SplineCoupling(_Coupling):
    """x_B = RQS(z_B; theta), x_A = z_A, theta = NN(z_A, c): K widths, K heights, K - 1 inner
    derivatives per transformed coordinate."""

    def __init__(self, dim: int, cond_dim: int, parity: int, hidden: Sequence[int],
                 activation: str, *, num_bins: int, tail_bound: float, min_bin_width: float,
                 min_bin_height: float, min_derivative: float, rngs: nnx.Rngs):
        super().__init__(dim, cond_dim, parity, dim * (3 * num_bins - 1), hidden, activation,
                         rngs=rngs)
        self.num_bins = int(num_bins)
        self.spline_options = (float(tail_bound), float(min_bin_width), float(min_bin_height),
                               float(min_derivative))

    def _apply(self, y: Array, context: Array, inverse: bool) -> tuple[Array, Array]:
        mask = self._mask()
        theta = self._theta(y, context).reshape(self.dim, 3 * self.num_bins - 1)
        k = self.num_bins
        bound, min_w, min_h, min_d = self.spline_options
        out, log_det = rational_quadratic_spline(
            y, theta[:, :k], theta[:, k:2 * k], theta[:, 2 * k:], inverse=inverse,
            tail_bound=bound, min_bin_width=min_w, min_bin_height=min_h, min_derivative=min_d,
        )
        return jnp.where(mask, out, y), jnp.sum(jnp.where(mask, log_det, 0.0))

    def forward_given(self, z: Array, context: Array) -> tuple[Array, Array]:
        return self._apply(z, context, inverse=False)

    def inverse_given(self, x: Array, context: Array) -> tuple[Array, Array]:
        return self._apply(x, context, inverse=True)


# ----------------------------------------------------------------------------- flows


class ConditionalFlow(ConfiguredModule):
    """x = g_L o ... o g_1(z; c) on R^dim; log|det| sums over the layers.

    Subclasses declare ``name`` and ``defaults`` and return the layers (sampling order, the
    final conditional affine layer is appended here) from ``_layers(rngs=..., **hp)``.
    """

    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, *, dim: int, cond_dim: int, rngs: nnx.Rngs, **hyperparameters: Any):
        hp = self._configure({"dim": dim, "cond_dim": cond_dim}, hyperparameters)
        self.dim, self.cond_dim = int(dim), int(cond_dim)
        layers = self._layers(rngs=rngs, **hp)
        layers.append(ConditionalAffine(self.dim, self.cond_dim, hp["hidden"], hp["activation"],
                                        rngs=rngs))
        self.layers = nnx.List(layers)

    def _layers(self, *, rngs: nnx.Rngs, **hyperparameters: Any) -> list[nnx.Module]:
        raise NotImplementedError

    def _check(self, y: Array | None, c: Array | None) -> None:
        """One example: y of shape (dim,) and c of shape (cond_dim,) (None: not given)."""
        if (y is not None and y.shape != (self.dim,)) or (
                c is not None and c.shape != (self.cond_dim,)):
            got = " and ".join(str(None if a is None else a.shape) for a in (y, c))
            raise ValueError(
                f"{self.name}: expects one example, shapes ({self.dim},) and ({self.cond_dim},); "
                f"got {got} (vmap over batches)"
            )

    def condition(self, c: Array) -> tuple[Any, ...]:
        """Every layer's c-only part for one condition c (cond_dim,): compute it once and pass
        it to :meth:`forward_given` / :meth:`inverse_given` for many draws at that condition."""
        self._check(None, c)
        return tuple(layer.condition(c) for layer in self.layers)

    def forward_given(self, z: Array, context: tuple[Any, ...]) -> tuple[Array, Array]:
        """(x, log|det dx/dz|) for one z (dim,) and ``context = condition(c)``."""
        self._check(z, None)
        total = jnp.zeros((), z.dtype)
        for layer, part in zip(self.layers, context, strict=True):
            z, log_det = layer.forward_given(z, part)
            total = total + log_det
        return z, total

    def inverse_given(self, x: Array, context: tuple[Any, ...]) -> tuple[Array, Array]:
        """(z, log|det dz/dx|) for one x (dim,) and ``context = condition(c)``."""
        self._check(x, None)
        total = jnp.zeros((), x.dtype)
        for layer, part in zip(reversed(self.layers), reversed(context), strict=True):
            x, log_det = layer.inverse_given(x, part)
            total = total + log_det
        return x, total

    def forward(self, z: Array, c: Array) -> tuple[Array, Array]:
        """(x, log|det dx/dz|) for one z (dim,) and condition c (cond_dim,)."""
        self._check(z, c)
        return self.forward_given(z, self.condition(c))

    def inverse(self, x: Array, c: Array) -> tuple[Array, Array]:
        """(z, log|det dz/dx|) for one x (dim,) and condition c (cond_dim,)."""
        self._check(x, c)
        return self.inverse_given(x, self.condition(c))

    def initialize(self, z: Array, c: Array) -> None:
        """Data-dependent initialisation: push a batch z (n, dim), c (n, cond_dim) forward and
        let every ActNorm standardise its inputs (nothing to do for flows without ActNorm)."""
        layers = list(self.layers)
        last = max((i for i, layer in enumerate(layers) if isinstance(layer, ActNorm)), default=-1)
        for layer in layers[:last + 1]:
            if isinstance(layer, ActNorm):
                layer.initialize(z)
            z, _ = jax.vmap(layer.forward)(z, c)


_COMMON = {"num_layers": 4, "hidden": (64, 64), "activation": "silu"}


class RealNVPFlow(ConditionalFlow):
    """Affine couplings with alternating masks."""

    name = "realnvp"
    defaults = {**_COMMON, "scale_clamp": DEFAULT_SCALE_CLAMP}

    def _layers(self, *, rngs, num_layers, hidden, activation, scale_clamp):
        return [AffineCoupling(self.dim, self.cond_dim, i % 2, hidden, activation, scale_clamp,
                               rngs=rngs) for i in range(num_layers)]


class _AutoregressiveFlow(ConditionalFlow):
    inverse_autoregressive: ClassVar[bool]
    defaults = {**_COMMON, "scale_clamp": DEFAULT_SCALE_CLAMP}

    def _layers(self, *, rngs, num_layers, hidden, activation, scale_clamp):
        layers: list[nnx.Module] = []
        for i in range(num_layers):
            if i and self.dim > 1:
                layers.append(Reverse())
            layers.append(Autoregressive(self.dim, self.cond_dim, hidden, activation, scale_clamp,
                                         self.inverse_autoregressive, rngs=rngs))
        return layers


class MAFFlow(_AutoregressiveFlow):
    """Masked autoregressive flow: fast density, sequential sampling."""

    name = "maf"
    inverse_autoregressive = False


class IAFFlow(_AutoregressiveFlow):
    """Inverse autoregressive flow: fast sampling, sequential density."""

    name = "iaf"
    inverse_autoregressive = True


class NSFFlow(ConditionalFlow):
    """Rational-quadratic spline couplings with linear tails, alternating masks."""

    name = "nsf"
    defaults = {**_COMMON, "num_bins": 8, "tail_bound": 5.0, "min_bin_width": 1e-3,
                "min_bin_height": 1e-3, "min_derivative": 1e-3}

    def _layers(self, *, rngs, num_layers, hidden, activation, **spline):
        return [SplineCoupling(self.dim, self.cond_dim, i % 2, hidden, activation, rngs=rngs,
                               **spline) for i in range(num_layers)]


class GlowFlow(ConditionalFlow):
    """Steps of ActNorm, LU-parameterised invertible linear map and affine coupling."""

    name = "glow"
    defaults = {**_COMMON, "scale_clamp": DEFAULT_SCALE_CLAMP}

    def _layers(self, *, rngs, num_layers, hidden, activation, scale_clamp):
        layers: list[nnx.Module] = []
        for i in range(num_layers):
            layers += [ActNorm(self.dim), InvertibleLinear(self.dim),
                       AffineCoupling(self.dim, self.cond_dim, i % 2, hidden, activation,
                                      scale_clamp, rngs=rngs)]
        return layers


FLOW_SAMPLER_ARCHITECTURES: dict[str, type[ConditionalFlow]] = {
    cls.name: cls for cls in (RealNVPFlow, MAFFlow, IAFFlow, NSFFlow, GlowFlow)
}


def build_conditional_flow(name: str, dim: int, cond_dim: int, *, rngs: nnx.Rngs,
                           **hyperparameters: Any) -> ConditionalFlow:
    """A conditional flow from ``FLOW_SAMPLER_ARCHITECTURES``; ``flow.config`` rebuilds it:
    ``build_conditional_flow(c["name"], c["dim"], c["cond_dim"], **c["hyperparameters"])``."""
    return build_from_registry(FLOW_SAMPLER_ARCHITECTURES, "flow sampler architecture", name,
                               dim=dim, cond_dim=cond_dim, rngs=rngs, **hyperparameters)

"""Jaxpr equations on constant inputs, evaluated in numpy (no XLA compilation), and the jaxpr
walking helpers of the interpreter.

``NUMPY_RULES`` maps a primitive's name to ``rule(params, ins, shape, dtype)``: the primitive
applied to numpy arrays (None where numpy has no equivalent for these parameters; the caller
then binds the primitive in JAX).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import scipy.special
from jax.extend import core as jcore

# call primitives: their inner jaxpr is evaluated
CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
         "custom_vjp_call_jaxpr", "remat", "checkpoint"}
# primitives that return their operand as it is (shared by the interpreter and nonconjugate.py)
TRANSPARENT = {"convert_element_type", "stop_gradient", "optimization_barrier", "copy",
               "copy_p", "reduce_precision"}


NumpyRule = Callable[[Mapping[str, Any], list[np.ndarray], tuple[int, ...], np.dtype], Any]

NUMPY_ELEMENTWISE: dict[str, Callable[..., np.ndarray]] = {
    "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
    "gt": np.greater, "ge": np.greater_equal, "and": np.logical_and, "or": np.logical_or,
    "not": np.logical_not, "xor": np.logical_xor, "is_finite": np.isfinite,
    "add": np.add, "add_any": np.add, "sub": np.subtract, "mul": np.multiply, "neg": np.negative,
    "log": np.log, "exp": np.exp, "log1p": np.log1p, "sqrt": np.sqrt, "abs": np.abs,
    "max": np.maximum, "min": np.minimum, "sign": np.sign, "floor": np.floor, "ceil": np.ceil,
    "expm1": np.expm1, "tanh": np.tanh, "square": np.square, "exp2": np.exp2,
}
SCIPY_ELEMENTWISE = {"lgamma": "gammaln", "digamma": "digamma", "erf": "erf", "erfc": "erfc",
                     "erf_inv": "erfinv", "logistic": "expit"}
# every elementwise primitive that ``numpy_bind`` evaluates
NUMPY_ELEMENTWISE_ALL = {*NUMPY_ELEMENTWISE, *SCIPY_ELEMENTWISE, "div", "pow", "integer_pow",
                         "rsqrt", "clamp", "rem", "round", "select_n", "convert_element_type"}


def _elementwise(fn: Callable[..., np.ndarray]) -> NumpyRule:
    """fn(*ins)."""
    return lambda params, ins, shape, dtype: fn(*ins)


def _floating(fn: Callable[..., np.ndarray]) -> NumpyRule:
    """fn(*ins) for a floating-point result (integer division and powers round: not here)."""
    return lambda params, ins, shape, dtype: fn(*ins) if dtype.kind == "f" else None


def _integer_pow(params, ins, shape, dtype):
    """x^y for an integer y."""
    y = params["y"]
    return np.power(ins[0], y) if y >= 0 else 1.0 / np.power(ins[0], -y)


def _round(params, ins, shape, dtype):
    """Rounding half to even, or half away from zero."""
    x = ins[0]
    half_even = int(params.get("rounding_method", 0)) == 1
    return np.round(x) if half_even else np.sign(x) * np.floor(np.abs(x) + 0.5)


def _unchanged(params, ins, shape, dtype):
    """The operand (``numpy_bind`` casts it to the dtype and reshapes it to the shape)."""
    return ins[0]


def _reshape(params, ins, shape, dtype):
    """A row-major reshape (one with a ``dimensions`` permutation is left to JAX)."""
    return ins[0] if params.get("dimensions") is None else None


def _broadcast_in_dim(params, ins, shape, dtype):
    """Operand axis k to output axis broadcast_dimensions[k], the others broadcast."""
    expanded = [1] * len(shape)
    for k, d in enumerate(params["broadcast_dimensions"]):
        expanded[d] = ins[0].shape[k]
    return np.broadcast_to(np.reshape(ins[0], expanded), shape)


def _reduction(fn: Callable[..., np.ndarray]) -> NumpyRule:
    """fn over the axes ``axes``."""
    return lambda params, ins, shape, dtype: fn(ins[0], axis=tuple(params["axes"]))


def _select_n(params, ins, shape, dtype):
    """cases[pred] for a boolean predicate and two cases."""
    return np.where(ins[0].astype(bool), ins[2], ins[1]) if len(ins) == 3 else None


def _iota(params, ins, shape, dtype):
    """0, 1, ... along ``dimension``, broadcast over the other axes."""
    dim = params["dimension"]
    return np.broadcast_to(np.arange(shape[dim]).reshape(
        [-1 if k == dim else 1 for k in range(len(shape))]), shape)


def _slice(params, ins, shape, dtype):
    """x[start:limit:stride] on every axis."""
    strides = params.get("strides") or [1] * ins[0].ndim
    return ins[0][tuple(slice(a, b, c) for a, b, c in zip(
        params["start_indices"], params["limit_indices"], strides, strict=True))]


def _pad(params, ins, shape, dtype):
    """Edge padding with the fill value ins[1] (negative or interior padding: left to JAX)."""
    if not all(lo >= 0 and hi >= 0 and mid == 0 for lo, hi, mid in params["padding_config"]):
        return None
    widths = [(lo, hi) for lo, hi, _ in params["padding_config"]]
    return np.pad(ins[0], widths, constant_values=ins[1])


def _cumsum(params, ins, shape, dtype):
    """Running sums along ``axis`` (from the end when ``reverse``)."""
    x = np.flip(ins[0], params["axis"]) if params["reverse"] else ins[0]
    out = np.cumsum(x, axis=params["axis"])
    return np.flip(out, params["axis"]) if params["reverse"] else out


def _batched_take(params, ins, shape, dtype):
    """The gather of ``x[b, i_b : i_b + s]`` per row b (a vmapped dynamic slice of a matrix),
    start clipped into range; other gathers are left to JAX."""
    x, idx = ins
    dn = params["dimension_numbers"]
    size = params["slice_sizes"]
    if not (x.ndim == 2 and idx.shape == (x.shape[0], 1) and size[0] == 1
            and tuple(dn.operand_batching_dims) == (0,)
            and tuple(dn.start_indices_batching_dims) == (0,)
            and tuple(dn.start_index_map) == (1,) and tuple(dn.offset_dims) == (1,)
            and not tuple(dn.collapsed_slice_dims)):
        return None
    start = np.clip(idx[:, 0].astype(np.int64), 0, x.shape[1] - size[1])
    return x[np.arange(x.shape[0])[:, None], start[:, None] + np.arange(size[1])]


def numpy_dot_general(a: np.ndarray, b: np.ndarray, dimension_numbers) -> np.ndarray:
    """lax.dot_general in numpy: batch axes, then a's free axes, then b's free axes."""
    (ca, cb), (ba, bb) = dimension_numbers
    la = list(range(a.ndim))
    lb = list(range(a.ndim, a.ndim + b.ndim))
    for i, j in zip(ca, cb, strict=True):
        lb[j] = la[i]
    for i, j in zip(ba, bb, strict=True):
        lb[j] = la[i]
    out = ([la[i] for i in ba] + [la[i] for i in range(a.ndim) if i not in ca and i not in ba]
           + [lb[j] for j in range(b.ndim) if j not in cb and j not in bb])
    return np.einsum(a, la, b, lb, out)


NUMPY_RULES: dict[str, NumpyRule] = {
    **{name: _elementwise(fn) for name, fn in NUMPY_ELEMENTWISE.items()},
    **{name: _elementwise(getattr(scipy.special, fn)) for name, fn in SCIPY_ELEMENTWISE.items()},
    "div": _floating(np.divide),
    "pow": _floating(np.power),
    "integer_pow": _integer_pow,
    "rsqrt": lambda params, ins, shape, dtype: 1.0 / np.sqrt(ins[0]),
    "clamp": lambda params, ins, shape, dtype: np.minimum(np.maximum(ins[1], ins[0]), ins[2]),
    "rem": _elementwise(np.fmod),
    "round": _round,
    **dict.fromkeys(("convert_element_type", "stop_gradient", "copy", "copy_p", "squeeze",
                     "reduce_precision"), _unchanged),
    "reshape": _reshape,
    "broadcast_in_dim": _broadcast_in_dim,
    "reduce_sum": _reduction(np.sum),
    "reduce_max": _reduction(np.max),
    "reduce_min": _reduction(np.min),
    "reduce_prod": _reduction(np.prod),
    "reduce_and": _reduction(np.all),
    "reduce_or": _reduction(np.any),
    "select_n": _select_n,
    "transpose": lambda params, ins, shape, dtype: np.transpose(ins[0], params["permutation"]),
    "iota": _iota,
    "slice": _slice,
    "rev": lambda params, ins, shape, dtype: np.flip(ins[0], axis=tuple(params["dimensions"])),
    "concatenate": lambda params, ins, shape, dtype: np.concatenate(ins,
                                                                   axis=params["dimension"]),
    "stack": lambda params, ins, shape, dtype: np.stack(ins, axis=params["axis"]),
    "pad": _pad,
    "cumsum": _cumsum,
    "gather": _batched_take,
    "dot_general": lambda params, ins, shape, dtype: numpy_dot_general(
        *ins, params["dimension_numbers"]),
}


def numpy_bind(name: str, params: Mapping[str, Any], ins: Sequence[np.ndarray],
               shape: tuple[int, ...], dtype: Any) -> np.ndarray | None:
    """Primitive ``name`` applied to numpy arrays, giving ``shape`` and ``dtype``; None when it
    has no numpy equivalent here."""
    rule = NUMPY_RULES.get(name)
    if rule is None:
        return None
    dtype = np.dtype(dtype)
    with np.errstate(all="ignore"):
        out = rule(params, [np.asarray(x) for x in ins], shape, dtype)
    if out is None:
        return None
    return np.asarray(out).astype(dtype, copy=False).reshape(shape)


def numpy_fold(eqn: jcore.JaxprEqn, ins: list[np.ndarray]) -> np.ndarray | None:
    """A constant equation evaluated in numpy (no XLA compilation); None where numpy has no
    equivalent (the caller binds the primitive)."""
    if len(eqn.outvars) != 1:
        return None
    aval = eqn.outvars[0].aval
    return numpy_bind(eqn.primitive.name, eqn.params, ins, tuple(aval.shape), aval.dtype)


def bind_constant(eqn: jcore.JaxprEqn, ins: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A constant equation's outputs: in numpy where possible, else by binding the primitive."""
    folded = numpy_fold(eqn, list(ins))
    if folded is not None:
        return [folded]
    outs = eqn.primitive.bind(*[jnp.asarray(x) for x in ins], **eqn.params)
    return [np.asarray(o) for o in (outs if eqn.primitive.multiple_results else [outs])]


def live_equations(jaxpr: jcore.Jaxpr) -> list[jcore.JaxprEqn]:
    """The equations the outputs depend on (NumPyro's argument checks compute values that
    nothing uses: evaluating them on the draws would only cost time)."""
    needed = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    live = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in needed for v in eqn.outvars):
            live.append(eqn)
            needed.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
    return live[::-1]


def inner_jaxpr(params: Mapping[str, Any]) -> jcore.ClosedJaxpr:
    """The jaxpr a call primitive (jit, custom_jvp_call, ...) evaluates."""
    inner = params.get("jaxpr") or params.get("call_jaxpr") or params.get("fun_jaxpr")
    return inner if isinstance(inner, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(inner, ())


def evaluate(closed: jcore.ClosedJaxpr, args: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The outputs of a jaxpr of constant inputs, its live equations in numpy where possible
    (call primitives through their inner jaxprs): no XLA compilation of the whole program."""
    env: dict[Any, np.ndarray] = {}

    def read(v):
        return np.asarray(v.val) if isinstance(v, jcore.Literal) else env[v]

    jaxpr = closed.jaxpr
    env.update(zip(jaxpr.constvars, (np.asarray(c) for c in closed.consts), strict=True))
    env.update(zip(jaxpr.invars, (np.asarray(a) for a in args), strict=True))
    for eqn in live_equations(jaxpr):
        ins = [read(v) for v in eqn.invars]
        if eqn.primitive.name in CALLS:
            outs = evaluate(inner_jaxpr(eqn.params), ins)
        else:
            outs = bind_constant(eqn, ins)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]

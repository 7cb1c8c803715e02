"""Non-conjugate terms: sum_s w_s f(a_s), f elementwise, a an affine function of the sites (a
linear predictor X @ w + b), kept as terms of the log joint instead of refused, and their
expectations under mean field.

During the analysis a value that holds such terms is a :class:`Nonlinear`: a multilinear part
plus terms ``weight * f(arg)`` summed over some axes. Elementwise functions of one predictor
compose (softplus is max(a, 0) + log1p(exp(-|a|)), four primitives, one f), linear maps
(sums, scalings by constants, masks, reshapes) act on the weights, anything else is refused.

Under q the predictor's entries are sums of independent elements; E_q f(a) is taken with
a ~ N(m, v), m = a(E[x]), v = sum_j J_j^T Cov[x_j] J_j (J = da/dx_j): exact when the sites in a
have Gaussian factors, a moment-matched Gaussian otherwise. Gauss-Hermite quadrature gives E f
and, by Bonnet's and Price's theorems, dE/dm = E f'(a) and dE/dv = E f''(a) / 2 (Stein's forms,
which need f alone, where f has a kink): deterministic expectations, so the ELBO and its
natural-gradient messages (Knowles & Minka 2011) are exact up to the quadrature's error. With
``augment``, a logistic term's expectation is replaced by its Polya-Gamma bound.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .algebra import X_ATOM, Poly, SampledBool, Stat, Term, Value, add, fresh, multiply, negate
from .cache import BoundedCache
from .numpy_eval import TRANSPARENT, evaluate

Array = jax.Array

__all__ = ["Nonlinear", "NonlinearTerm", "NonconjugateTerm", "gaussian_expectation",
           "polya_gamma_bound", "GAUSS_HERMITE_NODES"]

GAUSS_HERMITE_NODES = 32
_NODES, _WEIGHTS = np.polynomial.hermite.hermgauss(GAUSS_HERMITE_NODES)
_WEIGHTS = _WEIGHTS / np.sqrt(np.pi)
_NODES = _NODES * np.sqrt(2.0)  # E f(m + sqrt(v) z), z ~ N(0, 1): sum_k w_k f(m + sqrt(v) t_k)


# ----------------------------------------------------------------------------- values


@dataclasses.dataclass(frozen=True, eq=False)
class NonlinearTerm:
    """sum over the axes not in ``kept`` of weight * fn(arg): ``fn`` elementwise on arrays of
    ``arg.shape``, ``arg`` affine in the sites; ``key`` says what fn is (primitives, parameters,
    constants), ``words`` in words."""

    fn: Callable[[Array], Array]
    arg: Poly
    weight: np.ndarray
    kept: tuple[int, ...]
    key: tuple
    words: str

    @property
    def unreduced(self) -> bool:
        return self.kept == tuple(range(len(self.arg.shape)))

    def scaled(self, c: np.ndarray) -> NonlinearTerm:
        """The term times a constant ``c`` of its output's shape (broadcast over summed axes)."""
        shape = self.arg.shape
        c = np.asarray(c, dtype=np.float64)
        c = np.broadcast_to(c, tuple(shape[k] for k in self.kept)) if c.ndim else c
        if c.ndim:
            c = c.reshape([shape[k] if k in self.kept else 1 for k in range(len(shape))])
        return dataclasses.replace(self, weight=self.weight * c)

    def on_draws(self, draws: np.ndarray) -> np.ndarray:
        """The term at draws of its predictor, (M,) + arg.shape -> (M,) + output shape (fn in
        numpy where it can: op by op in JAX each primitive would be an XLA compilation)."""
        from .interpreter import evaluate_in_numpy  # the interpreter imports this module

        (fn_values,) = evaluate_in_numpy(jax.vmap(self.fn), np.asarray(draws))
        values = self.weight * np.asarray(fn_values)
        summed = tuple(k + 1 for k in range(len(self.arg.shape)) if k not in self.kept)
        return values.sum(axis=summed)


@dataclasses.dataclass(frozen=True, eq=False)
class Nonlinear:
    """A site-dependent value poly + sum_k terms[k] (shape ``shape``)."""

    shape: tuple[int, ...]
    poly: Value
    terms: tuple[NonlinearTerm, ...]

    def sites(self) -> set[str]:
        out = self.poly.sites() if isinstance(self.poly, Poly) else set()
        return out.union(*(t.arg.sites() for t in self.terms))

    def at(self, values: Mapping[str, Array]) -> Array:
        """The value at concrete site values."""
        total = self.poly.at(values) if isinstance(self.poly, Poly) else jnp.asarray(self.poly)
        for t in self.terms:
            total = total + jnp.asarray(t.on_draws(np.asarray(t.arg.at(values))[None])[0])
        return total


def affine(p: Poly) -> bool:
    """Whether every term of ``p`` is a constant or a linear function of one site's value."""
    return all(len(t.factors) <= 1 and all(f.stat == Stat.of(X_ATOM) for f in t.factors)
               for t in p.terms)


def start(it: Any, eqn: Any, ins: Sequence[Value], shape: tuple[int, ...], describe: Callable
          ) -> Nonlinear | None:
    """f(a) for an elementwise primitive whose site-dependent inputs are one affine predictor
    ``a`` (or comparisons of it) and constants; None when the equation is not of that kind."""
    if not np.issubdtype(eqn.outvars[0].aval.dtype, np.floating):
        return None
    found = recipe(it, eqn, list(ins), shape)
    if found is None:
        return None
    fn, key, arg = found
    words = f"{eqn.primitive.name} of {describe([arg])}"
    term = NonlinearTerm(fn, arg, np.ones(shape), tuple(range(len(shape))), key, words)
    return Nonlinear(shape, np.zeros(shape), (term,))


def _elementwise(eqn: Any, ins: Sequence[Value], shape: tuple[int, ...]) -> bool:
    return all(tuple(np.shape(x) if not isinstance(x, (Poly, Nonlinear)) else x.shape)
               in ((), shape) for x in ins) and all(
        tuple(v.aval.shape) in ((), shape) for v in eqn.invars)


def _bind_one(eqn: Any, ins: Sequence[Value], pieces: Mapping[int, tuple[Callable, tuple]]
              ) -> tuple[Callable[[Array], Array], tuple]:
    """t -> eqn(inputs), with input k replaced by pieces[k][0](t) and the others constants."""
    prim, params = eqn.primitive, eqn.params
    consts = {k: np.asarray(x) for k, x in enumerate(ins) if k not in pieces}

    def fn(t: Array) -> Array:
        args = []
        for k, v in enumerate(eqn.invars):
            if k in pieces:
                value = pieces[k][0](t)
            else:
                value = jnp.asarray(consts[k], dtype=v.aval.dtype if not np.issubdtype(
                    v.aval.dtype, np.floating) else t.dtype)
            args.append(jnp.broadcast_to(value, t.shape) if jnp.ndim(value) < t.ndim
                        else value)
        return prim.bind(*args, **params)

    key = (prim.name, repr(sorted(params.items(), key=lambda kv: kv[0])),
           tuple(pieces[k][1] if k in pieces else (consts[k].shape, consts[k].tobytes())
                 for k in range(len(ins))))
    return fn, key


# ----------------------------------------------------------------------------- operations


LINEAR = {"add", "add_any", "sub", "neg", "mul", "div", "reduce_sum", "select_n",
          "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose"}


def apply(it: Any, eqn: Any, ins: list[Value], shape: tuple[int, ...]) -> Value:
    """An equation with a Nonlinear input: a linear map acts on its parts, an elementwise
    function of one predictor composes with its f; anything else is refused."""
    name = eqn.primitive.name
    if name in TRANSPARENT:
        return ins[0]
    if eqn.outvars[0].aval.dtype == np.bool_:
        return SampledBool(it.on_draws(eqn, it.sampled_inputs(eqn, ins)),
                           recipe(it, eqn, ins, shape))
    linear = _linear(it, eqn, ins, shape) if name in LINEAR else None
    if linear is not None:
        return linear
    composed = _compose(it, eqn, ins, shape)
    if composed is not None:
        return composed
    terms = [t for x in ins if isinstance(x, Nonlinear) for t in x.terms]
    sites = set().union(*(x.sites() for x in ins if isinstance(x, (Poly, Nonlinear))))
    raise it.error(sites, f"{name} is applied to {terms[0].words}, which CAVI keeps only as a "
                          "term of the log joint (sums, constant multiples, masks)",
                   f"{name} of {terms[0].words}")


def _parts(x: Value) -> tuple[Value, tuple[NonlinearTerm, ...]]:
    """(multilinear part, non-conjugate terms) of a value."""
    if isinstance(x, Nonlinear):
        return x.poly, x.terms
    return x, ()


def _make(shape: tuple[int, ...], poly: Value, terms: Sequence[NonlinearTerm]) -> Value:
    return Nonlinear(shape, poly, tuple(terms)) if terms else poly


def _linear(it: Any, eqn: Any, ins: list[Value], shape: tuple[int, ...]) -> Value | None:
    name = eqn.primitive.name
    if name in ("add", "add_any", "sub"):
        (pa, ta), (pb, tb) = _parts(ins[0]), _parts(ins[1])
        if name == "sub":
            pb, tb = negate(pb), tuple(t.scaled(-1.0) for t in tb)
        return _make(shape, add(pa, pb, shape), ta + tb)
    if name == "neg":
        p, ts = _parts(ins[0])
        return _make(shape, negate(p), [t.scaled(-1.0) for t in ts])
    if name in ("mul", "div"):
        constant = [k for k, x in enumerate(ins) if not isinstance(x, (Poly, Nonlinear,
                                                                         SampledBool))]
        if not constant or (name == "div" and constant != [1]):
            return None
        c = np.broadcast_to(np.asarray(ins[constant[0]], dtype=np.float64), shape)
        c = 1.0 / c if name == "div" else c
        p, ts = _parts(ins[1 - constant[0]])
        return _make(shape, multiply(p, c, shape), [t.scaled(c) for t in ts])
    if name == "select_n":
        return _select(it, eqn, ins, shape)
    if name == "reduce_sum":
        axes = tuple(eqn.params["axes"])
        p, ts = _parts(ins[0])
        p = it.apply(eqn, [p])[0]
        out = [dataclasses.replace(t, kept=tuple(k for i, k in enumerate(t.kept)
                                                 if i not in axes)) for t in ts]
        return _make(shape, p, out)
    # rearrangements: on the predictor and the weight of unreduced terms
    p, ts = _parts(ins[0])
    if len(ins) != 1 or not all(t.unreduced for t in ts):
        return None
    out = []
    for t in ts:
        arg = it.apply(eqn, [t.arg])[0]
        weight = np.asarray(it.apply(eqn, [t.weight])[0])
        if not isinstance(arg, Poly):
            return None
        out.append(dataclasses.replace(t, arg=arg, weight=np.broadcast_to(weight, shape),
                                       kept=tuple(range(len(shape)))))
    return _make(shape, it.apply(eqn, [p])[0], out)


def _select(it: Any, eqn: Any, ins: list[Value], shape: tuple[int, ...]) -> Value | None:
    """cases[pred] = sum_k 1{pred = k} cases[k] for a predicate that is constant (or the same
    on every draw)."""
    pred, cases = ins[0], ins[1:]
    if isinstance(pred, SampledBool):
        if not np.all(pred.draws == pred.draws[:1]):
            return None  # composed, when the predicate has a recipe
        pred = pred.draws[0]
    if isinstance(pred, (Poly, Nonlinear)):
        return None
    pred = np.broadcast_to(np.asarray(pred).astype(np.int64), shape)
    total: Value = np.zeros(shape)
    terms: list[NonlinearTerm] = []
    for k, case in enumerate(cases):
        mask = (pred == k).astype(np.float64)
        if not mask.any():
            continue
        if mask.all():
            return case
        p, ts = _parts(case)
        total = add(total, multiply(p, mask, shape), shape)
        terms += [t.scaled(mask) for t in ts]
    return _make(shape, total, terms)


def recipe(it: Any, eqn: Any, ins: list[Value], shape: tuple[int, ...]
           ) -> tuple[Callable[[Array], Array], tuple, Poly] | None:
    """(g o f, key, a) when the equation g is elementwise and its site-dependent inputs are
    elementwise functions of one linear predictor a; else None."""
    if len(eqn.outvars) != 1 or not _elementwise(eqn, ins, shape):
        return None
    pieces: dict[int, tuple[Callable, tuple]] = {}
    arg: Poly | None = None
    for k, x in enumerate(ins):
        if not isinstance(x, (Poly, Nonlinear, SampledBool)):
            if not isinstance(x, (np.ndarray, np.generic, float, int, bool)):
                return None  # a Switch (a value by cases of a discrete site)
            continue
        single = _as_single(it, x, shape)
        if single is None:
            return None
        fn, key, a = single
        if arg is not None and not _same(it, arg, a):
            return None
        arg = arg if arg is not None else a
        pieces[k] = (fn, key)
    if arg is None:
        return None
    fn, key = _bind_one(eqn, ins, pieces)
    return fn, key, arg


def _compose(it: Any, eqn: Any, ins: list[Value], shape: tuple[int, ...]) -> Value | None:
    """g(f_1(a), ..., constants) = (g o f)(a) for an elementwise primitive g whose
    site-dependent inputs are elementwise functions of one predictor a."""
    found = recipe(it, eqn, ins, shape)
    if found is None:
        return None
    fn, key, arg = found
    words = next(t.words for x in ins if isinstance(x, Nonlinear) for t in x.terms)
    term = NonlinearTerm(fn, arg, np.ones(shape), tuple(range(len(shape))), key,
                         f"{eqn.primitive.name} of {words}")
    return Nonlinear(shape, np.zeros(shape), (term,))


def _as_single(it: Any, x: Value, shape: tuple[int, ...]
               ) -> tuple[Callable[[Array], Array], tuple, Poly] | None:
    """x as (f, key, a) with x = f(a) elementwise: an affine Poly is a = x, f = identity; a
    Nonlinear whose terms are unreduced functions of one predictor a, plus a constant or a
    itself, is f = sum_k w_k f_k + (constant or identity); a SampledBool is its recipe."""
    if isinstance(x, SampledBool):
        return x.recipe if x.shape == shape else None
    if isinstance(x, Poly):
        return (lambda t: t, ("x",), x) if affine(x) and x.shape == shape else None
    if not x.terms or not all(t.unreduced for t in x.terms):
        return None
    if (len(x.terms) == 1 and not isinstance(x.poly, Poly) and not np.any(x.poly)
            and np.all(x.terms[0].weight == 1)):
        return x.terms[0].fn, x.terms[0].key, x.terms[0].arg  # keeps fn's dtype (booleans)
    arg = x.terms[0].arg
    if not all(_same(it, arg, t.arg) for t in x.terms[1:]):
        return None
    if isinstance(x.poly, Poly):
        if not _same(it, arg, x.poly):
            return None
        plus, plus_key = (lambda t: t), ("x",)
    else:
        c = np.broadcast_to(np.asarray(x.poly, dtype=np.float64), shape)
        plus, plus_key = (lambda t: jnp.asarray(c, t.dtype)), (c.tobytes(),)
    terms = x.terms

    def fn(t: Array) -> Array:
        total = plus(t)
        for term in terms:
            total = total + jnp.asarray(term.weight, t.dtype) * term.fn(t)
        return total

    key = ("sum", plus_key, tuple((t.key, t.weight.tobytes()) for t in terms))
    return fn, key, arg


def _same(it: Any, a: Poly, b: Poly) -> bool:
    """Whether two predictors are one (the same object, or equal on the analysis' draws)."""
    if a is b:
        return True
    if a.shape != b.shape or a.sites() != b.sites():
        return False
    return bool(np.allclose(it.sampled(a), it.sampled(b), rtol=1e-12, atol=1e-12))


# ----------------------------------------------------------------------------- expectations


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 3))
def gaussian_expectation(fn: Callable[[Array], Array], m: Array, v: Array,
                         smooth: bool = True) -> Array:
    """E f(a) for a ~ N(m, v) elementwise (Gauss-Hermite, GAUSS_HERMITE_NODES nodes). Its
    derivatives: for a smooth f, dE/dm = E f'(a), dE/dv = E f''(a) / 2 (Bonnet, Price); for a
    kinked one (``smooth=False``: |a|, max(a, 0), whose f'' has a delta autodiff cannot see)
    the Stein forms dE/dm = E[f(a) (a - m)] / v, dE/dv = E[f(a) ((a - m)^2 / v - 1)] / (2 v),
    which use f alone."""
    return _expect(fn, m, v)


def _expect(fn: Callable[[Array], Array], m: Array, v: Array,
            factor: Callable[[Array], Array] = jnp.ones_like) -> Array:
    """E[f(a) factor(z)], a = m + sqrt(v) z, z ~ N(0, 1), by Gauss-Hermite."""
    nodes = jnp.asarray(_NODES, m.dtype).reshape((-1,) + (1,) * m.ndim)
    weights = jnp.asarray(_WEIGHTS, m.dtype).reshape((-1,) + (1,) * m.ndim)
    points = m + jnp.sqrt(jnp.maximum(v, 0.0)) * nodes
    return jnp.sum(weights * factor(nodes) * jax.vmap(fn)(points), axis=0)


def _bonnet_price(fn: Callable[[Array], Array], m: Array, v: Array) -> tuple[Array, Array]:
    """(dE/dm, dE/dv) = (E f'(a), E f''(a) / 2)."""
    first = _derivative(fn)
    return _expect(first, m, v), 0.5 * _expect(_derivative(first), m, v)


def _derivative(fn: Callable[[Array], Array]) -> Callable[[Array], Array]:
    """t -> f'(t) for an elementwise f, by forward-mode autodiff."""
    return lambda t: jax.jvp(fn, (t,), (jnp.ones_like(t),))[1]


def _stein(fn: Callable[[Array], Array], m: Array, v: Array) -> tuple[Array, Array]:
    """(dE/dm, dE/dv) = (E[(f(a) - f(m)) z] / sqrt(v), E[(f(a) - f(m)) (z^2 - 1)] / (2 v)),
    z = (a - m) / sqrt(v): no derivative of f, so a kink's delta is not lost and the rule
    integrates a continuous function (f(m) integrates to zero against both; subtracted, it
    keeps the rounding small); Bonnet-Price where v is zero."""
    tiny = jnp.finfo(m.dtype).tiny
    positive = v > tiny
    safe = jnp.where(positive, v, 1.0)
    centre = fn(m)

    def centred(t):
        return fn(t) - centre

    d_mean = _expect(centred, m, safe, lambda z: z) / jnp.sqrt(safe)
    d_var = _expect(centred, m, safe, lambda z: z**2 - 1) / (2 * safe)
    at_point = _bonnet_price(fn, m, jnp.zeros_like(v))
    return jnp.where(positive, d_mean, at_point[0]), jnp.where(positive, d_var, at_point[1])


@gaussian_expectation.defjvp
def _gaussian_expectation_jvp(fn, smooth, primals, tangents):
    m, v = primals
    dm, dv = tangents
    d_mean, d_var = (_bonnet_price if smooth else _stein)(fn, m, v)
    return _expect(fn, m, v), d_mean * dm + d_var * dv


def kinds(fn: Callable[[Array], Array], shape: tuple[int, ...] = ()) -> tuple[bool, bool]:
    """(smooth, logistic) for an elementwise f on ``shape``, by one probe evaluated in numpy
    (no compilation: the probe runs once per model).

    Each element is probed at points m of PROBE_GRID (the element's m cycles through the grid
    along the flattened elements; every element sees the whole grid when there are fewer
    elements than points). smooth: autodiff's f'' is f's second derivative in the sense of
    distributions (Price's dE/dv and Bonnet's dE/dm agree with Stein's forms at a ~ N(m, 1); a
    kink, |a| or max(a, 0), puts a delta in f'' that autodiff misses). logistic: f(t) = alpha
    softplus(t) + beta t + gamma (a Bernoulli- or Binomial-logit log likelihood): f'' = alpha
    softplus'' at t = 2 m + 1/4 (off 0, where autodiff of a softplus written with |t| has no
    curvature)."""
    count = int(np.prod(shape))
    grid = np.asarray(PROBE_GRID)
    if count >= grid.size:
        m = np.resize(grid, count).reshape((1, *shape))
    else:
        m = np.broadcast_to(grid.reshape((-1,) + (1,) * len(shape)), (grid.size, *shape))

    def probe(m):
        v = jnp.ones_like(m)
        price, stein = _bonnet_price(fn, m, v), _stein(fn, m, v)
        agree = jnp.all(jnp.stack([jnp.all(jnp.abs(p - s) <= 1e-3 * (1.0 + jnp.abs(s)))
                                   for p, s in zip(price, stein, strict=True)]))
        t = 2.0 * m + 0.25
        curvature = _derivative(_derivative(fn))(t)
        expected = _softplus_coefficient(fn, shape) * jax.nn.sigmoid(t) * jax.nn.sigmoid(-t)
        linear = jnp.all(jnp.isfinite(curvature)) & jnp.all(
            jnp.abs(curvature - expected) <= 1e-6 * (1.0 + jnp.abs(expected)))
        return agree, linear

    return tuple(bool(x) for x in evaluate(jax.make_jaxpr(probe)(m), [m]))


PROBE_GRID = np.linspace(-3.0, 3.0, 13)  # the means at which kinds() probes f


def _combined(fns: Sequence[Callable[[Array], Array]], weight: Array
              ) -> Callable[[Array], Array]:
    """t -> sum_k weight_k f_k(t) (the kinks of softplus's pieces cancel in the sum)."""
    return lambda t: sum(weight[k] * fn(t) for k, fn in enumerate(fns))


def _half_softplus_even(t: Array) -> Array:
    """L(t) = log(2 cosh(t / 2)) = softplus(t) - t / 2: even, and concave in t^2."""
    return jnp.logaddexp(0.5 * t, -0.5 * t)


def _softplus_coefficient(fn: Callable[[Array], Array], shape: tuple[int, ...]) -> Array:
    """alpha per element of f(t) = alpha softplus(t) + beta t + gamma: f''(1) / softplus''(1)
    (not at 0, where autodiff of a softplus written with |t| has no curvature)."""
    one = jnp.ones(shape)
    return _derivative(_derivative(fn))(one) / (jax.nn.sigmoid(one) * jax.nn.sigmoid(-one))


def polya_gamma_bound(fn: Callable[[Array], Array], m: Array, v: Array) -> Array:
    """Lower bound of E f(a), a ~ N(m, v), f = alpha softplus + beta t + gamma with alpha <= 0:
    f(m) + alpha (L(c) - L(m)), c = sqrt(m^2 + v) (Polya-Gamma augmentation with q(omega) =
    PG(1, c) at its optimum, i.e. Jaakkola & Jordan's bound; its gradient in (m, v) is the
    conjugate message of the augmented model)."""
    alpha = _softplus_coefficient(fn, m.shape)
    c = jnp.sqrt(m**2 + jnp.maximum(v, 0.0))
    return fn(m) + alpha * (_half_softplus_even(c) - _half_softplus_even(m))


def shared_predictors(it: Any, value: Nonlinear) -> Nonlinear:
    """``value`` with one predictor object for terms whose predictors are equal (the terms of one
    likelihood: softplus(a) and y a), so the analysis groups them."""
    found: list[Poly] = []
    terms = []
    for t in value.terms:
        same = next((a for a in found if _same(it, a, t.arg)), None)
        if same is None:
            found.append(t.arg)
        terms.append(t if same is None else dataclasses.replace(t, arg=same))
    return Nonlinear(value.shape, value.poly, tuple(terms))


@dataclasses.dataclass(frozen=True, eq=False)
class NonconjugateTerm:
    """sum_k sum_s weight_ks f_k(a_s) in the mean-field model, one predictor a = the einsum
    ``arg_terms`` of the sites' values plus a constant. Its arrays (weights, the predictor's
    constant and operands) are data: arguments of the compiled CAVI program."""

    fns: tuple[Callable[[Array], Array], ...]
    smooth: bool  # sum_k weight_k f_k: Bonnet-Price derivatives, else Stein's
    logistic: bool  # sum_k weight_k f_k = alpha softplus + linear: polya_gamma_bound applies
    keys: tuple[tuple, ...]
    words: str
    shape: tuple[int, ...]
    weight: np.ndarray  # (len(fns), *shape)
    constant: np.ndarray
    arg_terms: tuple[Term, ...]

    @classmethod
    def of(cls, terms: Sequence[NonlinearTerm]) -> NonconjugateTerm:
        """The terms (fully summed, one predictor) as one."""
        arg = terms[0].arg
        weight = np.stack([np.broadcast_to(t.weight, arg.shape) for t in terms])
        words = max((t.words for t in terms), key=len)
        keys = tuple(t.key for t in terms)
        # the keys name each fn with its constants, so (keys, weights) names the combined f
        probe_key = (keys, tuple(arg.shape), weight.dtype.str, weight.tobytes())
        found = _KINDS.get(probe_key)
        if found is None:
            combined = _combined(tuple(t.fn for t in terms), jnp.asarray(weight))
            found = _KINDS.put(probe_key, kinds(combined, arg.shape))
        return cls(tuple(t.fn for t in terms), *found, keys, words,
                   tuple(arg.shape), weight, np.broadcast_to(arg.constant, arg.shape).copy(),
                   tuple(arg.terms))

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(sorted({f.site for t in self.arg_terms for f in t.factors}))

    def data(self) -> list[np.ndarray]:
        return [self.weight, self.constant] + [a for t in self.arg_terms for a, _ in t.operands]

    def structure(self) -> tuple:
        """Hashable: equal for equal terms of two analyses (labels renumbered in order)."""
        terms = []
        for t in self.arg_terms:
            order = {lab: k for k, lab in enumerate(dict.fromkeys(
                [i for _, lab in t.operands for i in lab] + [i for f in t.factors
                                                             for i in f.labels] + list(t.out)))}
            t = t.relabel(order)
            terms.append((tuple((a.shape, lab) for a, lab in t.operands), t.factors, t.out))
        return self.keys, self.smooth, self.logistic, self.shape, tuple(terms)

    def predictor(self, values: Mapping[str, Array], data: Sequence[Array]) -> Array:
        """a at site values ``values`` (each of the site's shape), with this term's ``data``."""
        total = jnp.asarray(data[1])
        position = 2
        for t in self.arg_terms:
            ops = tuple((data[position + i], lab) for i, (_, lab) in enumerate(t.operands))
            position += len(t.operands)
            total = total + Term(ops, t.factors, t.out).evaluate(
                lambda f: values[f.site], self.shape)
        return total

    def expected(self, moments: Mapping[str, tuple[Array, Array]], data: Sequence[Array],
                 bound: bool = False) -> Array:
        """E_q of the term from each site's (E[x], Var[x]) (elementwise, site shape) or
        (E[x], Cov[x]) (vector elements: batch + (d,), batch + (d, d)); ``bound``: logistic
        parts f with weight * alpha <= 0 by their Polya-Gamma bound instead."""
        means = {n: m for n, (m, _) in moments.items()}
        m = self.predictor(means, data)
        v = jnp.zeros(self.shape, m.dtype)
        fixed = {n: jax.lax.stop_gradient(x) for n, x in means.items()}
        for name in self.sites:
            mean, spread = moments[name]
            direct = self.variance(name, spread, data)
            if direct is not None:
                v = v + direct
                continue
            jac = jax.jacfwd(lambda x, name=name: self.predictor({**fixed, name: x}, data))(
                fixed[name])
            if spread.ndim == mean.ndim:  # scalar elements: Var per element
                axes = tuple(range(len(self.shape), jac.ndim))
                v = v + jnp.sum(jac**2 * spread, axis=axes)
            else:
                d = mean.shape[-1]
                jac = jac.reshape((*self.shape, -1, d))
                v = v + jnp.einsum("...bi,bij,...bj->...", jac, spread.reshape((-1, d, d)), jac)
        weight = jnp.asarray(data[0])
        value = sum(weight[k] * gaussian_expectation(fn, m, v, self.smooth)
                    for k, fn in enumerate(self.fns))
        if bound and self.logistic:
            combined = _combined(self.fns, weight)
            concave = _softplus_coefficient(combined, self.shape) <= 0
            value = jnp.where(concave, polya_gamma_bound(combined, m, v), value)
        return jnp.sum(value)

    def variance(self, name: str, spread: Array, data: Sequence[Array]) -> Array | None:
        """Site ``name``'s part of Var[a], sum_j J_j Cov[x_j] J_j^T, without differentiating:
        when the site is in one einsum term whose labels are all the output's or the site's
        (an element label not the output's), J = da/dx is the product of the term's operands,
        so the part is the term with the operands twice (the second copy on the element label
        of Cov's second axis) and Cov for x. None otherwise (the caller takes J by forward
        mode)."""
        found = [k for k, t in enumerate(self.arg_terms) if name in {f.site for f in t.factors}]
        if len(found) != 1:
            return None
        t = self.arg_terms[found[0]]
        (factor,) = t.factors
        labels = factor.labels
        if len(set(labels)) != len(labels) or any(
                i not in {*t.out, *labels} for _, lab in t.operands for i in lab):
            return None
        position = 2 + sum(len(u.operands) for u in self.arg_terms[:found[0]])
        ops = tuple((data[position + i], lab) for i, (_, lab) in enumerate(t.operands))
        elements = spread.ndim - len(labels)  # 0 (Var) or 1 (Cov)
        second = dict(zip(labels[len(labels) - elements:] if elements else (), fresh(elements),
                          strict=True))
        if set(second) & set(t.out):  # J is diagonal in the element label: not a product
            return None
        twice = ops + tuple((a, tuple(second.get(i, i) for i in lab)) for a, lab in ops)
        spread_labels = labels + tuple(second.values())
        return Term(twice, (dataclasses.replace(factor, labels=spread_labels),), t.out).evaluate(
            lambda _: spread, self.shape)


# kinds() of the combined terms of past analyses (each probe is a compilation)
_KINDS: BoundedCache[tuple, tuple[bool, bool]] = BoundedCache(128)

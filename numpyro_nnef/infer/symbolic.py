"""Symbolic evaluation of a log density's jaxpr into a multilinear form in the sites' statistics.

Every intermediate value of the jaxpr is represented exactly as a sum of einsum terms

    value[out] = sum_terms einsum(constant operands..., stat_1(x_s1)[labels], ...)[out]

(the canonical form of Hoffman, Johnson & Tran's autoconj, here built on JAX's own trace).  A
*statistic* is a product of atoms of one site, each atom an elementwise function of the site's
value raised to a rational power: x^p, |x|^p, log(x), or f(poly(x)) for a nonlinear primitive f
of a polynomial in that site alone (e.g. log(1 - x)).  Linear maps, sums, broadcasts, products,
integer and fractional powers and logs of monomials stay inside the form; a nonlinear function
of several sites, or of one site with coefficients that differ between its elements, is
non-conjugate and raises :class:`NonConjugateError`.  Comparisons that depend on sites (support
checks in ``log_prob``) are decided on random draws of the sites: a ``select`` whose predicate
is the same on every draw keeps its branch, any other raises.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

Array = jax.Array

__all__ = ["NonConjugateError", "Stat", "Factor", "Term", "Poly", "trace_log_density"]


class NonConjugateError(ValueError):
    """The log density is not multilinear in per-site statistics (names the sites and the cause)."""


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class Atom:
    """An elementwise function of one site's value: ``name`` is its canonical description."""

    name: str
    fn: Callable[[Array], Array] = dataclasses.field(compare=False, hash=False, repr=False)


X_ATOM = Atom("x", lambda x: x)
ABS_ATOM = Atom("abs(x)", jnp.abs)
LOG_ATOM = Atom("log(x)", jnp.log)


@dataclasses.dataclass(frozen=True)
class Stat:
    """A product of atoms raised to rational powers, prod_a atom_a(x)^p_a (the empty product: 1)."""

    atoms: tuple[tuple[Atom, Fraction], ...]

    @classmethod
    def of(cls, atom: Atom, power: Fraction | int = 1) -> Stat:
        return cls(((atom, Fraction(power)),)).normalised()

    def normalised(self) -> Stat:
        powers: dict[Atom, Fraction] = {}
        for atom, p in self.atoms:
            powers[atom] = powers.get(atom, Fraction(0)) + p
        # |x|^p with p even is x^p: one statistic, one name
        for atom in [a for a in powers if a == ABS_ATOM]:
            p = powers[atom]
            if p.denominator == 1 and p.numerator % 2 == 0:
                powers[X_ATOM] = powers.get(X_ATOM, Fraction(0)) + p
                del powers[atom]
        atoms = tuple(sorted(((a, p) for a, p in powers.items() if p != 0),
                             key=lambda ap: (ap[0].name, ap[1])))
        return Stat(atoms)

    def __mul__(self, other: Stat) -> Stat:
        return Stat(self.atoms + other.atoms).normalised()

    def __pow__(self, power: Fraction) -> Stat:
        return Stat(tuple((a, p * power) for a, p in self.atoms)).normalised()

    @property
    def is_one(self) -> bool:
        return not self.atoms

    @property
    def power_of_x(self) -> Fraction | None:
        """p when the statistic is x^p, else None."""
        if len(self.atoms) == 1 and self.atoms[0][0] == X_ATOM:
            return self.atoms[0][1]
        return None

    @property
    def name(self) -> str:
        if not self.atoms:
            return "1"
        parts = []
        for atom, p in self.atoms:
            parts.append(atom.name if p == 1 else f"{atom.name}^{p}")
        return "*".join(parts)

    def __call__(self, x: Array) -> Array:
        out = jnp.ones_like(jnp.asarray(x, dtype=jnp.result_type(x, float)))
        for atom, p in self.atoms:
            value = atom.fn(x)
            if p.denominator == 1:
                out = out * jax.lax.integer_pow(value, int(p.numerator)) if p > 0 else (
                    out / jax.lax.integer_pow(value, int(-p.numerator)))
            else:
                out = out * value ** float(p)
        return out

    def __repr__(self) -> str:
        return f"Stat({self.name})"


# ----------------------------------------------------------------------------- einsum terms

_LABELS = itertools.count()


def fresh(n: int) -> tuple[int, ...]:
    return tuple(next(_LABELS) for _ in range(n))


@dataclasses.dataclass(frozen=True)
class Factor:
    """stat(x_site) with one label per axis of the site's value."""

    site: str
    stat: Stat
    labels: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Term:
    """einsum(operands, factors -> out); an out label absent from both is a broadcast axis."""

    operands: tuple[tuple[np.ndarray, tuple[int, ...]], ...]
    factors: tuple[Factor, ...]
    out: tuple[int, ...]

    def relabel(self, mapping: Mapping[int, int]) -> Term:
        m = lambda labels: tuple(mapping.get(i, i) for i in labels)  # noqa: E731
        return Term(
            tuple((a, m(lab)) for a, lab in self.operands),
            tuple(Factor(f.site, f.stat, m(f.labels)) for f in self.factors),
            m(self.out),
        )

    def labels(self) -> set[int]:
        used = {i for _, lab in self.operands for i in lab}
        return used | {i for f in self.factors for i in f.labels} | set(self.out)

    def fresh_copy(self) -> Term:
        return self.relabel({i: next(_LABELS) for i in self.labels()})

    def sites(self) -> set[str]:
        return {f.site for f in self.factors}

    def merged(self) -> Term:
        """Factors of one site with identical labels multiplied into one statistic."""
        groups: dict[tuple[str, tuple[int, ...]], Stat] = {}
        for f in self.factors:
            key = (f.site, f.labels)
            groups[key] = groups[key] * f.stat if key in groups else f.stat
        factors = tuple(Factor(s, st, lab) for (s, lab), st in groups.items() if not st.is_one)
        scalar = np.prod([a for a, lab in self.operands if not lab]) if self.operands else 1.0
        operands = tuple((a, lab) for a, lab in self.operands if lab)
        if scalar != 1.0 or not operands:
            operands = ((np.asarray(scalar, dtype=np.float64), ()),) + operands
        return Term(operands, factors, self.out)

    def evaluate(self, stat_values: Callable[[Factor], Array], shape: tuple[int, ...]) -> Array:
        """The term's value, given the value of every factor (an array over the factor's labels)."""
        args: list[Any] = []
        for array, lab in self.operands:
            args += [jnp.asarray(array), list(lab)]
        for f in self.factors:
            args += [stat_values(f), list(f.labels)]
        present = {i for _, lab in self.operands for i in lab} | {
            i for f in self.factors for i in f.labels}
        kept = [i for i in self.out if i in present]
        ordered = sorted(present)
        index = {lab: k for k, lab in enumerate(ordered)}
        args = [index_list(a, index) if isinstance(a, list) else a for a in args]
        if args:
            value = jnp.einsum(*args, [index[i] for i in kept], optimize="greedy")
        else:
            value = jnp.ones(())
        # broadcast axes (out labels that appear nowhere)
        expand = [k for k, i in enumerate(self.out) if i not in present]
        value = jnp.expand_dims(value, expand) if expand else value
        return jnp.broadcast_to(value, shape)


def index_list(labels: list[int], index: Mapping[int, int]) -> list[int]:
    return [index[i] for i in labels]


def constant_term(value: np.ndarray) -> Term:
    labels = fresh(np.ndim(value))
    return Term(((np.asarray(value), labels),), (), labels)


# ----------------------------------------------------------------------------- polynomials


@dataclasses.dataclass
class Poly:
    """A site-dependent value: sum of einsum terms, plus a dense constant part."""

    shape: tuple[int, ...]
    terms: list[Term]
    constant: np.ndarray

    @classmethod
    def site(cls, name: str, shape: tuple[int, ...]) -> Poly:
        labels = fresh(len(shape))
        term = Term((), (Factor(name, Stat.of(X_ATOM), labels),), labels)
        return cls(tuple(shape), [term], np.zeros(shape))

    def sites(self) -> set[str]:
        return set().union(*(t.sites() for t in self.terms)) if self.terms else set()

    def evaluate(self, stat_values: Callable[[Factor], Array]) -> Array:
        total = jnp.asarray(self.constant)
        for t in self.terms:
            total = total + t.evaluate(stat_values, self.shape)
        return jnp.broadcast_to(total, self.shape)

    def at(self, values: Mapping[str, Array]) -> Array:
        """The value at concrete site values."""
        return self.evaluate(lambda f: f.stat(values[f.site]))


Value = Any  # np.ndarray | Poly | SampledBool


@dataclasses.dataclass
class SampledBool:
    """A site-dependent boolean, known through its values on random draws: (M,) + shape."""

    draws: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.draws.shape[1:]


def simplify(p: Poly) -> Value:
    """Drop zero terms; a polynomial without terms becomes its constant."""
    terms = [t.merged() for t in p.terms if not any(not np.any(a) for a, _ in t.operands)]
    if not terms:
        return np.broadcast_to(p.constant, p.shape).copy()
    return Poly(p.shape, terms, np.broadcast_to(p.constant, p.shape).copy())


def as_poly(v: Value, shape: tuple[int, ...] | None = None) -> Poly:
    if isinstance(v, Poly):
        return v
    v = np.asarray(v, dtype=np.float64)
    return Poly(v.shape if shape is None else shape, [], np.broadcast_to(v, shape or v.shape))


def add(a: Value, b: Value, shape: tuple[int, ...]) -> Value:
    if not isinstance(a, Poly) and not isinstance(b, Poly):
        return np.asarray(a) + np.asarray(b)
    pa, pb = broadcast_to(a, shape), broadcast_to(b, shape)
    return simplify(Poly(shape, pa.terms + pb.terms, pa.constant + pb.constant))


def scale(p: Poly, c: np.ndarray) -> Value:
    """c * p elementwise, c a constant broadcastable to p.shape."""
    c = np.broadcast_to(np.asarray(c, dtype=np.float64), p.shape)
    if np.all(c == 0):
        return np.zeros(p.shape)
    uniform = np.all(c == c.flat[0]) if c.size else True
    terms = []
    for t in p.terms:
        if uniform:
            op = (np.asarray(c.flat[0] if c.size else 1.0), ())
        else:
            op = (c, t.out)
        terms.append(Term(t.operands + (op,), t.factors, t.out))
    return simplify(Poly(p.shape, terms, c * p.constant))


def multiply(a: Value, b: Value, shape: tuple[int, ...]) -> Value:
    if not isinstance(a, Poly) and not isinstance(b, Poly):
        return np.asarray(a) * np.asarray(b)
    if not isinstance(a, Poly):
        return scale(broadcast_to(b, shape), np.broadcast_to(a, shape))
    if not isinstance(b, Poly):
        return scale(broadcast_to(a, shape), np.broadcast_to(b, shape))
    pa, pb = broadcast_to(a, shape), broadcast_to(b, shape)
    out: list[Term] = []
    for t1 in pa.terms:
        for t2 in pb.terms:
            t2f = t2.fresh_copy()
            t2f = t2f.relabel(dict(zip(t2f.out, t1.out, strict=True)))
            out.append(Term(t1.operands + t2f.operands, t1.factors + t2f.factors, t1.out).merged())
    result = Poly(shape, out, pa.constant * pb.constant)
    if np.any(pb.constant):
        result.terms += as_list(scale(Poly(shape, pa.terms, np.zeros(shape)), pb.constant))
    if np.any(pa.constant):
        result.terms += as_list(scale(Poly(shape, pb.terms, np.zeros(shape)), pa.constant))
    return simplify(result)


def as_list(v: Value) -> list[Term]:
    return v.terms if isinstance(v, Poly) else []


def broadcast_to(v: Value, shape: tuple[int, ...]) -> Poly:
    """numpy-style broadcast of a value to ``shape``."""
    p = as_poly(v)
    if p.shape == tuple(shape):
        return p
    lead = len(shape) - len(p.shape)
    dims = tuple(range(lead, len(shape)))
    return broadcast_in_dim(p, tuple(shape), dims)


def broadcast_in_dim(p: Poly, shape: tuple[int, ...], dims: Sequence[int]) -> Poly:
    """lax.broadcast_in_dim: operand axis k goes to output axis dims[k] (size equal or 1)."""
    shape = tuple(shape)
    terms = []
    for t in p.terms:
        out = list(fresh(len(shape)))
        for k, d in enumerate(dims):
            if p.shape[k] == shape[d]:
                out[d] = t.out[k]
            # size 1 -> n: the old label leaves ``out`` and is summed over its single value
        terms.append(Term(t.operands, t.factors, tuple(out)))
    constant = jax.lax.broadcast_in_dim(p.constant, shape, tuple(dims))
    return Poly(shape, terms, np.asarray(constant))


def linear_map(p: Poly, matrix: np.ndarray, out_shape: tuple[int, ...]) -> Poly:
    """out[j...] = sum_i matrix[j..., i...] p[i...] for a constant matrix (out_shape + p.shape)."""
    terms = []
    for t in p.terms:
        new = fresh(len(out_shape))
        terms.append(Term(t.operands + ((matrix, new + t.out),), t.factors, new))
    constant = np.tensordot(matrix, p.constant, axes=p.constant.ndim) if p.shape else (
        matrix * p.constant)
    return Poly(tuple(out_shape), terms, np.asarray(constant).reshape(out_shape))


# ----------------------------------------------------------------------------- the interpreter

# primitives that are linear in their (single) site-dependent operand, with others constant
LINEAR_BY_BASIS = {
    "slice", "gather", "dynamic_slice", "pad", "rev", "reshape", "squeeze", "expand_dims",
    "copy", "copy_p", "cumsum", "concatenate", "dynamic_update_slice", "select_and_scatter_add",
}
TRANSPARENT = {"convert_element_type", "stop_gradient", "optimization_barrier", "copy",
               "copy_p", "reduce_precision"}
COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge", "is_finite"}
LOGICAL = {"and", "or", "not", "xor"}
CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
         "custom_vjp_call_jaxpr", "remat", "checkpoint"}


class Interpreter:
    """Evaluates a jaxpr on Poly/constant values; ``draws`` are random site values (M, *shape)
    used to decide site-dependent comparisons."""

    def __init__(self, draws: Mapping[str, np.ndarray]):
        self.draws = {k: np.asarray(v) for k, v in draws.items()}

    # -------------------------------------------------------------- helpers
    def sampled(self, v: Value) -> np.ndarray:
        """(M,) + shape values of v on the draws."""
        num = len(next(iter(self.draws.values())))
        if isinstance(v, SampledBool):
            return v.draws
        if not isinstance(v, Poly):
            return np.broadcast_to(np.asarray(v), (num, *np.shape(v)))
        fn = jax.vmap(lambda d: v.at(d))
        return np.asarray(fn({k: jnp.asarray(d) for k, d in self.draws.items()}))

    def error(self, sites: set[str], what: str) -> NonConjugateError:
        names = ", ".join(sorted(sites))
        return NonConjugateError(
            f"the log density is not conjugate in site(s) {names}: {what}. CAVI needs a log "
            f"density that is multilinear in per-site statistics (products of functions of "
            f"single sites)."
        )

    # -------------------------------------------------------------- evaluation
    def run(self, closed: jcore.ClosedJaxpr, args: Sequence[Value]) -> list[Value]:
        jaxpr = closed.jaxpr
        env: dict[Any, Value] = {}

        def read(v):
            if isinstance(v, jcore.Literal):
                return np.asarray(v.val)
            return env[v]

        for var, const in zip(jaxpr.constvars, closed.consts, strict=True):
            env[var] = np.asarray(const)
        for var, arg in zip(jaxpr.invars, args, strict=True):
            env[var] = arg
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self.apply(eqn, ins)
            for var, out in zip(eqn.outvars, outs, strict=True):
                env[var] = out
        return [read(v) for v in jaxpr.outvars]

    def apply(self, eqn, ins: list[Value]) -> list[Value]:
        prim, params = eqn.primitive, eqn.params
        name = prim.name
        out_avals = [v.aval for v in eqn.outvars]
        if not any(isinstance(x, (Poly, SampledBool)) for x in ins):
            outs = prim.bind(*[jnp.asarray(x) for x in ins], **params)
            outs = outs if prim.multiple_results else [outs]
            return [np.asarray(o) for o in outs]
        if name in CALLS:
            inner = params.get("jaxpr") or params.get("call_jaxpr") or params.get("fun_jaxpr")
            if not isinstance(inner, jcore.ClosedJaxpr):
                inner = jcore.ClosedJaxpr(inner, ())
            return self.run(inner, ins)
        shape = tuple(out_avals[0].shape)
        if name in TRANSPARENT:
            return [ins[0]]
        if name in COMPARISONS or name in LOGICAL or out_avals[0].dtype == np.bool_:
            return [self.boolean(eqn, ins)]
        if name == "select_n":
            return [self.select(ins, shape)]
        method = getattr(self, f"p_{name}", None)
        if method is not None:
            return [method(ins, params, shape)]
        if name in LINEAR_BY_BASIS:
            return [self.linear_by_basis(eqn, ins, shape)]
        polys = [x for x in ins if isinstance(x, Poly)]
        if len(ins) == 1 and len(eqn.outvars) == 1 and shape == polys[0].shape:
            return [self.nonlinear(polys[0], lambda v: prim.bind(v, **params), name)]
        sites = set().union(*(p.sites() for p in polys))
        raise self.error(sites, f"primitive {name!r} is applied to them")

    # -------------------------------------------------------------- booleans
    def boolean(self, eqn, ins: list[Value]) -> Value:
        sampled = [jnp.asarray(self.sampled(x)) for x in ins]
        outs = jax.vmap(lambda *xs: eqn.primitive.bind(*xs, **eqn.params))(*sampled)
        return SampledBool(np.asarray(outs))

    def select(self, ins: list[Value], shape: tuple[int, ...]) -> Value:
        pred, cases = ins[0], ins[1:]
        if isinstance(pred, SampledBool):
            draws = pred.draws
            if not np.all(draws == draws[:1]):
                sites = set().union(*(c.sites() for c in cases if isinstance(c, Poly)))
                raise self.error(sites or {"?"}, "a branch (where/select) depends on their value")
            pred = draws[0]
        pred = np.broadcast_to(np.asarray(pred).astype(np.int64), shape)
        total: Value = np.zeros(shape)
        for k, case in enumerate(cases):
            mask = (pred == k)
            if not mask.any():
                continue
            if isinstance(case, Poly):
                part = multiply(case, mask.astype(np.float64), shape)
            else:
                part = np.where(mask, np.broadcast_to(case, shape), 0.0)
            total = add(total, part, shape)
        return total

    # -------------------------------------------------------------- arithmetic
    def p_add(self, ins, params, shape):
        return add(ins[0], ins[1], shape)

    def p_add_any(self, ins, params, shape):
        return add(ins[0], ins[1], shape)

    def p_sub(self, ins, params, shape):
        return add(ins[0], self.p_neg([ins[1]], params, np.shape(ins[1]) if not isinstance(
            ins[1], Poly) else ins[1].shape), shape)

    def p_neg(self, ins, params, shape):
        x = ins[0]
        return scale(x, -1.0) if isinstance(x, Poly) else -np.asarray(x)

    def p_mul(self, ins, params, shape):
        return multiply(ins[0], ins[1], shape)

    def p_div(self, ins, params, shape):
        a, b = ins
        if not isinstance(b, Poly):
            return multiply(a, 1.0 / np.asarray(b, dtype=np.float64), shape)
        return multiply(a, self.power(b, Fraction(-1), "div"), shape)

    def p_integer_pow(self, ins, params, shape):
        return self.power(ins[0], Fraction(int(params["y"])), "integer_pow")

    def p_square(self, ins, params, shape):
        return self.power(ins[0], Fraction(2), "square")

    def p_sqrt(self, ins, params, shape):
        return self.power(ins[0], Fraction(1, 2), "sqrt")

    def p_rsqrt(self, ins, params, shape):
        return self.power(ins[0], Fraction(-1, 2), "rsqrt")

    def p_pow(self, ins, params, shape):
        base, exponent = ins
        if isinstance(exponent, Poly):
            raise self.error(exponent.sites(), "they appear in an exponent")
        e = np.asarray(exponent)
        if e.size and np.all(e == e.flat[0]):
            return self.power(base, Fraction(float(e.flat[0])).limit_denominator(1000), "pow")
        raise self.error(base.sites(), "they are raised to element-dependent powers")

    def p_log(self, ins, params, shape):
        return self.log(ins[0])

    def p_log1p(self, ins, params, shape):
        return self.log(add(ins[0], np.ones(()), shape))

    def p_abs(self, ins, params, shape):
        p = ins[0]
        mono = monomial(p)
        if mono is not None:
            coef, factors, out = mono
            if all(set(a for a, _ in f.stat.atoms) <= {X_ATOM, ABS_ATOM} for f in factors):
                new = tuple(Factor(f.site, Stat(tuple(
                    (ABS_ATOM, q) for _, q in f.stat.atoms)).normalised(), f.labels)
                    for f in factors)
                return simplify(Poly(p.shape, [Term(((np.abs(coef), out),), new, out)],
                                     np.zeros(p.shape)))
        return self.nonlinear(p, jnp.abs, "abs")

    def p_dot_general(self, ins, params, shape):
        a, b = ins
        (ca, cb), (ba, bb) = params["dimension_numbers"]
        pa, pb = as_poly(a), as_poly(b)
        out_terms: list[Term] = []
        const = np.asarray(jax.lax.dot_general(
            jnp.asarray(pa.constant), jnp.asarray(pb.constant), params["dimension_numbers"]))
        a_terms = pa.terms + [constant_term(pa.constant)] if np.any(pa.constant) else pa.terms
        b_terms = pb.terms + [constant_term(pb.constant)] if np.any(pb.constant) else pb.terms
        for t1 in a_terms:
            for t2 in b_terms:
                if not t1.factors and not t2.factors:
                    continue  # the constant x constant part is ``const``
                t2f = t2.fresh_copy()
                mapping = {t2f.out[j]: t1.out[i] for i, j in zip(ca, cb, strict=True)}
                mapping |= {t2f.out[j]: t1.out[i] for i, j in zip(ba, bb, strict=True)}
                t2f = t2f.relabel(mapping)
                free_a = [t1.out[i] for i in range(len(pa.shape)) if i not in ca and i not in ba]
                free_b = [t2f.out[j] for j in range(len(pb.shape)) if j not in cb and j not in bb]
                out = tuple([t1.out[i] for i in ba] + free_a + free_b)
                term = Term(t1.operands + t2f.operands, t1.factors + t2f.factors, out)
                # a contracted broadcast axis appears nowhere: summing it multiplies by its size
                extra = tuple((np.asarray(float(pa.shape[i])), ()) for i in ca
                              if not appears(term, t1.out[i]))
                out_terms.append(Term(term.operands + extra, term.factors, out).merged())
        return simplify(Poly(shape, out_terms, const))

    # -------------------------------------------------------------- structure
    def p_broadcast_in_dim(self, ins, params, shape):
        return broadcast_in_dim(as_poly(ins[0]), shape, params["broadcast_dimensions"])

    def p_transpose(self, ins, params, shape):
        p = as_poly(ins[0])
        perm = params["permutation"]
        terms = [Term(t.operands, t.factors, tuple(t.out[k] for k in perm)) for t in p.terms]
        return Poly(shape, terms, np.transpose(p.constant, perm))

    def p_reduce_sum(self, ins, params, shape):
        p = as_poly(ins[0])
        axes = tuple(params["axes"])
        terms = []
        for t in p.terms:
            extra = [(np.asarray(float(p.shape[k])), ()) for k in axes if not appears(t, t.out[k])]
            out = tuple(lab for k, lab in enumerate(t.out) if k not in axes)
            terms.append(Term(t.operands + tuple(extra), t.factors, out))
        return simplify(Poly(shape, terms, np.sum(p.constant, axis=axes)))

    def linear_by_basis(self, eqn, ins: list[Value], shape: tuple[int, ...]) -> Value:
        """A primitive linear in its one site-dependent operand: its matrix, found by applying it
        to every basis vector of that operand (other operands held at their constants)."""
        positions = [k for k, x in enumerate(ins) if isinstance(x, Poly)]
        if eqn.primitive.name == "concatenate":
            return self.concatenate(ins, eqn.params, shape)
        if len(positions) != 1:
            sites = set().union(*(ins[k].sites() for k in positions))
            raise self.error(sites, f"primitive {eqn.primitive.name!r} mixes them")
        (k,) = positions
        p = ins[k]
        consts = [jnp.zeros(x.shape) if isinstance(x, Poly) else jnp.asarray(x) for x in ins]

        def apply(v):
            args = list(consts)
            args[k] = v
            out = eqn.primitive.bind(*args, **eqn.params)
            return out[0] if eqn.primitive.multiple_results else out

        zero = jnp.zeros(p.shape)
        offset = np.asarray(apply(zero))
        basis = jnp.eye(max(int(np.prod(p.shape)), 1)).reshape((-1, *p.shape))
        columns = np.asarray(jax.vmap(apply)(basis)) - offset  # (in, *out)
        matrix = np.moveaxis(columns.reshape((-1, *shape)), 0, -1).reshape((*shape, *p.shape))
        mapped = linear_map(Poly(p.shape, p.terms, np.zeros(p.shape)), matrix, shape)
        mapped.constant = np.asarray(apply(jnp.asarray(p.constant)))
        return simplify(mapped)

    def concatenate(self, ins, params, shape):
        axis = params["dimension"]
        total: Value = np.zeros(shape)
        start = 0
        for x in ins:
            size = np.shape(x)[axis] if not isinstance(x, Poly) else x.shape[axis]
            if isinstance(x, Poly):
                embed = np.zeros((shape[axis], size))
                embed[start + np.arange(size), np.arange(size)] = 1.0
                part = embed_axis(x, embed, axis)
            else:
                part = np.zeros(shape)
                index = [slice(None)] * len(shape)
                index[axis] = slice(start, start + size)
                part[tuple(index)] = x
            total = add(total, part, shape)
            start += size
        return total

    def p_stack(self, ins, params, shape):
        axis = params["axis"]
        total: Value = np.zeros(shape)
        for k, x in enumerate(ins):
            p = as_poly(x)
            expanded = broadcast_in_dim(
                p, (*p.shape[:axis], 1, *p.shape[axis:]),
                tuple(i if i < axis else i + 1 for i in range(len(p.shape))))
            embed = np.zeros((shape[axis], 1))
            embed[k, 0] = 1.0
            total = add(total, embed_axis(expanded, embed, axis), shape)
        return total

    # -------------------------------------------------------------- powers, logs, nonlinear
    def power(self, p: Value, exponent: Fraction, what: str) -> Value:
        if not isinstance(p, Poly):
            return np.asarray(p, dtype=np.float64) ** float(exponent)
        if exponent.denominator == 1 and exponent > 0:
            result: Value = p
            for _ in range(int(exponent) - 1):
                result = multiply(result, p, p.shape)
            return result
        mono = monomial(p)
        if mono is not None:
            coef, factors, out = mono
            if exponent.denominator != 1 and np.any(coef < 0):
                raise self.error(p.sites(), f"{what} takes a fractional power of a negative "
                                            "coefficient")
            new = tuple(Factor(f.site, f.stat ** exponent, f.labels) for f in factors)
            c = np.sign(coef) ** int(exponent.numerator % 2 if exponent.denominator == 1 else 0)
            c = c * np.abs(coef) ** float(exponent)
            return simplify(Poly(p.shape, [Term(((c, out),), new, out)], np.zeros(p.shape)))
        fn = (lambda v: v ** float(exponent))
        return self.nonlinear(p, fn, f"{what}^{exponent}")

    def log(self, p: Value) -> Value:
        if not isinstance(p, Poly):
            return np.log(np.asarray(p, dtype=np.float64))
        mono = monomial(p)
        if mono is not None:
            coef, factors, out = mono
            if np.all(coef > 0):
                terms = []
                for f in factors:
                    for atom, q in f.stat.atoms:
                        log_atom = log_of(atom)
                        terms.append(Term(((np.asarray(float(q)), ()),),
                                          (Factor(f.site, Stat.of(log_atom), f.labels),), out))
                poly = Poly(p.shape, terms, np.zeros(p.shape))
                return add(poly, np.log(coef), p.shape)
        return self.nonlinear(p, jnp.log, "log")

    def nonlinear(self, p: Poly, fn: Callable[[Array], Array], what: str) -> Value:
        """f(p) for p a polynomial in ONE site, the same function of every element: a new atom."""
        sites = p.sites()
        if len(sites) != 1:
            raise self.error(sites, f"{what} is applied to an expression of several sites")
        (site,) = sites
        scalar = single_site_function(p, site)
        if scalar is None and self.draws[site].shape[1:] == () and p.shape:
            # a scalar site inside an array-valued expression (e.g. log of stack(b, 1 - b)):
            # one vector statistic f(p(x)) with the expression's axes
            atom = Atom(f"{what}(<expression {next(_LABELS)}>)",
                        lambda x, p=p, fn=fn: fn(p.at({site: x})))
            labels = fresh(len(p.shape))
            term = Term((), (Factor(site, Stat.of(atom), labels),), labels)
            return Poly(p.shape, [term], np.zeros(p.shape))
        if scalar is None:
            raise self.error(sites, f"{what} is applied to an expression whose coefficients "
                                    "differ between the site's elements")
        inner, labels, out = scalar
        atom = Atom(f"{what}({inner.name})", lambda x, inner=inner, fn=fn: fn(inner(x)))
        term = Term((), (Factor(site, Stat.of(atom), labels),), out)
        return Poly(p.shape, [term], np.zeros(p.shape))


def appears(t: Term, label: int) -> bool:
    return any(label in lab for _, lab in t.operands) or any(label in f.labels for f in t.factors)


def embed_axis(p: Poly, embed: np.ndarray, axis: int) -> Poly:
    """Map axis ``axis`` of p (size m) into size n with a constant (n, m) matrix."""
    terms = []
    for t in p.terms:
        (new,) = fresh(1)
        out = list(t.out)
        old = out[axis]
        out[axis] = new
        extra = ((embed, (new, old)),)
        if not appears(t, old):  # a broadcast axis: sum the embedding over it
            extra = ((embed.sum(axis=1), (new,)),)
        terms.append(Term(t.operands + extra, t.factors, tuple(out)))
    shape = list(p.shape)
    shape[axis] = embed.shape[0]
    constant = np.moveaxis(np.tensordot(embed, np.moveaxis(p.constant, axis, 0), axes=1), 0, axis)
    return Poly(tuple(shape), terms, constant)


def log_of(atom: Atom) -> Atom:
    if atom == X_ATOM:
        return LOG_ATOM
    if atom == ABS_ATOM:
        return Atom("log(abs(x))", lambda x: jnp.log(jnp.abs(x)))
    return Atom(f"log({atom.name})", lambda x, fn=atom.fn: jnp.log(fn(x)))


def monomial(p: Poly) -> tuple[np.ndarray, tuple[Factor, ...], tuple[int, ...]] | None:
    """(coefficient over p.shape, factors, out labels) when p is one elementwise term (every label
    an out label, no summation) with no constant part; else None."""
    if len(p.terms) != 1 or np.any(p.constant):
        return None
    t = p.terms[0]
    out = set(t.out)
    if len(out) != len(t.out) or any(not set(lab) <= out for _, lab in t.operands):
        return None
    if any(not set(f.labels) <= out for f in t.factors):
        return None
    coef = Term(t.operands, (), t.out).evaluate(lambda f: None, p.shape)
    return np.asarray(coef), t.factors, t.out


def single_site_function(p: Poly, site: str):
    """(Stat-like callable g, labels, out) with p[out] = g(x[labels]) elementwise, when every
    term of p is an elementwise function of the same element of ``site`` with coefficients that
    do not depend on the element; else None."""
    labels = None
    parts: list[tuple[float, Stat]] = []
    for t in p.terms:
        if len(t.factors) != 1:
            return None
        f = t.factors[0]
        if labels is None:
            labels = f.labels
        elif f.labels != labels:
            return None
        if not set(labels) <= set(t.out) or len(set(t.out)) != len(t.out):
            return None
        coef = np.asarray(Term(t.operands, (), t.out).evaluate(lambda f: None, p.shape))
        if not set(lab for _, lab in t.operands for lab in lab) <= set(t.out):
            return None
        if coef.size and not np.all(coef == coef.flat[0]):
            return None
        parts.append((float(coef.flat[0]) if coef.size else 1.0, f.stat))
    c = np.asarray(p.constant)
    if c.size and not np.all(c == c.flat[0]):
        return None
    c0 = float(c.flat[0]) if c.size else 0.0
    name = " + ".join(f"{a:g}*{s.name}" for a, s in parts) + (f" + {c0:g}" if c0 else "")

    class Inner:
        def __init__(self):
            self.name = name

        def __call__(self, x):
            return sum((a * s(x) for a, s in parts), c0)

    return Inner(), labels, p.terms[0].out


# ----------------------------------------------------------------------------- entry point


def trace_log_density(
    log_density: Callable[..., Array],
    sites: Mapping[str, np.ndarray],
    draws: Mapping[str, np.ndarray],
) -> Poly | np.ndarray:
    """The multilinear form of ``log_density(**sites)`` (a scalar function of named site values).

    ``sites`` gives each site's value (for shapes and tracing), ``draws`` M random values of each
    site in its support (for site-dependent support checks).
    """
    names = list(sites)
    closed = jax.make_jaxpr(lambda *vals: log_density(dict(zip(names, vals, strict=True))))(
        *[jnp.asarray(sites[n]) for n in names])
    inputs = [Poly.site(n, tuple(np.shape(sites[n]))) for n in names]
    (out,) = Interpreter(draws).run(closed, inputs)
    return out

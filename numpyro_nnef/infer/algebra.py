"""The multilinear form: values that depend on the sites, as sums of einsum terms in statistics.

A site-dependent array is represented exactly as

    value[out] = sum_terms einsum(constant operands..., stat_1(x_s1)[labels], ...)[out] + constant

(the canonical form of Hoffman, Johnson & Tran's autoconj). A *statistic* is a product of atoms
of one site, each atom an elementwise function of the site's value raised to a rational power:
x^p, |x|^p, log(x), or f(poly(x)) for a nonlinear f of a polynomial in that site alone. This
module holds the form and the operations that keep a value inside it (sums, products, linear
maps, broadcasts, routings of entries); it knows nothing of jaxprs.
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

from .numpy_eval import evaluate, numpy_bind, numpy_dot_general

Array = jax.Array


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class Atom:
    """An elementwise function of one site's value: ``name`` is its canonical description."""

    name: str
    fn: Callable[[Array], Array] = dataclasses.field(compare=False, hash=False, repr=False)
    # False where fn maps one value to a larger array (a vector statistic of a scalar site, the
    # outer product of a vector element)
    elementwise: bool = dataclasses.field(default=True, compare=False, hash=False)

    def on_numpy(self, x: np.ndarray) -> np.ndarray:
        """fn(x) for numpy x: directly for the atoms written for numpy (x, |x|, log x), else
        through fn's jaxpr in numpy (each eager jnp call would compile)."""
        if self in _NUMPY_ATOMS:
            return self.fn(x)
        (out,) = evaluate(jax.make_jaxpr(self.fn)(x), [x])
        return out


X_ATOM = Atom("x", lambda x: x)


def _either(numpy_fn: Callable, jax_fn: Callable) -> Callable[[Array], Array]:
    """numpy on numpy input (analysis: nothing to compile), jax otherwise (inside CAVI)."""
    return lambda x: numpy_fn(x) if isinstance(x, np.ndarray) else jax_fn(x)


ABS_ATOM = Atom("abs(x)", _either(np.abs, jnp.abs))
LOG_ATOM = Atom("log(x)", _either(np.log, jnp.log))
_NUMPY_ATOMS = (X_ATOM, ABS_ATOM, LOG_ATOM)


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
        # the product starts from a scalar 1: an atom may map an element to a larger array
        if isinstance(x, np.ndarray):  # analysis: plain numpy
            out = np.ones(() if self.atoms else x.shape)
            for atom, p in self.atoms:
                out = out * np.asarray(atom.on_numpy(x), dtype=np.float64) ** float(p)
            return out
        dtype = jnp.result_type(x, float)
        out = jnp.ones(() if self.atoms else jnp.shape(x), dtype=dtype)
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


def outer(a: Stat, b: Stat) -> Stat:
    """The statistic a(x)_i b(x)_j of a vector element x (last axis i of a, j of b)."""
    atom = Atom(f"outer({a.name},{b.name})",
                lambda x, a=a, b=b: a(x)[..., :, None] * b(x)[..., None, :], elementwise=False)
    return Stat.of(atom)


def log_of(atom: Atom) -> Atom:
    """The atom log(atom(x))."""
    if atom == X_ATOM:
        return LOG_ATOM
    if atom == ABS_ATOM:
        return Atom("log(abs(x))", _either(lambda x: np.log(np.abs(x)),
                                           lambda x: jnp.log(jnp.abs(x))))
    return Atom(f"log({atom.name})", lambda x, fn=atom.fn: jnp.log(fn(x)))


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
        self = dedupe_routings(squeeze_unit_labels(self))  # noqa: PLW0642
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
        """The term's value, given the value of every factor (an array over the factor's labels);
        computed in numpy when every input is a numpy array (analysis), in JAX otherwise."""
        args: list[Any] = []
        for array, lab in self.operands:
            args += [array, list(lab)]
        for f in self.factors:
            args += [stat_values(f), list(f.labels)]
        xp = np if all(isinstance(a, (np.ndarray, np.generic)) for a in args[::2]) else jnp
        present = {i for _, lab in self.operands for i in lab} | {
            i for f in self.factors for i in f.labels}
        kept = [i for i in self.out if i in present]
        ordered = sorted(present)
        index = {lab: k for k, lab in enumerate(ordered)}
        args = [index_list(a, index) if isinstance(a, list) else a for a in args]
        if args:
            value = xp.einsum(*args, [index[i] for i in kept], optimize="greedy")
        else:
            value = xp.ones(())
        # broadcast axes (out labels that appear nowhere)
        expand = [k for k, i in enumerate(self.out) if i not in present]
        value = xp.expand_dims(value, expand) if expand else value
        return xp.broadcast_to(value, shape)


def squeeze_unit_labels(term: Term) -> Term:
    """Summed labels of size 1 that only constant operands carry (broadcasts from size 1) are
    dropped: sum over one value is that value. Routings that differed only there then match."""
    used = set(term.out) | {i for f in term.factors for i in f.labels}
    unit = {i for a, lab in term.operands for i, n in zip(lab, np.shape(a), strict=True)
            if n == 1 and i not in used}
    unit -= {i for a, lab in term.operands for i, n in zip(lab, np.shape(a), strict=True)
             if n != 1}
    if not unit:
        return term
    operands = []
    for a, lab in term.operands:
        axes = tuple(k for k, i in enumerate(lab) if i in unit)
        operands.append((np.squeeze(np.asarray(a), axis=axes) if axes else a,
                         tuple(i for i in lab if i not in unit)))
    return Term(tuple(operands), term.factors, term.out)


def _one_hot_along(array: np.ndarray, axis: int) -> bool:
    return bool(np.all((array == 0) | (array == 1)) and np.all(array.sum(axis=axis) == 1))


def dedupe_routings(term: Term) -> Term:
    """Two factors of one site whose differing labels are each picked by the same one-hot
    routing operand select the same element: sum_ab R[o,a] R[o,b] g(x_a) h(x_b) =
    sum_a R[o,a] g(x_a) h(x_a). Relabel the second onto the first and drop its routing."""
    changed = True
    while changed:
        changed = False
        for i, f1 in enumerate(term.factors):
            for f2 in term.factors[i + 1:]:
                if f1.site != f2.site or f1.labels == f2.labels:
                    continue
                mapping, drop = {}, []
                for a, b in zip(f1.labels, f2.labels, strict=True):
                    if a == b:
                        continue
                    owners_a = [k for k, (_, lab) in enumerate(term.operands) if a in lab]
                    owners_b = [k for k, (_, lab) in enumerate(term.operands) if b in lab]
                    if len(owners_a) != 1 or len(owners_b) != 1 or a in term.out or (
                            b in term.out):
                        break
                    (ka,), (kb,) = owners_a, owners_b
                    arr_a, lab_a = term.operands[ka]
                    arr_b, lab_b = term.operands[kb]
                    if ka == kb or lab_b != tuple(b if x == a else x for x in lab_a) or (
                            arr_a.shape != arr_b.shape or not np.array_equal(arr_a, arr_b)) or (
                            not _one_hot_along(arr_a, lab_a.index(a))):
                        break
                    if sum(1 for f in term.factors for x in f.labels if x in (a, b)) != 2:
                        break
                    mapping[b] = a
                    drop.append(kb)
                else:
                    if mapping:
                        operands = tuple(o for k, o in enumerate(term.operands) if k not in drop)
                        term = Term(operands, term.factors, term.out).relabel(mapping)
                        changed = True
                if changed:
                    break
            if changed:
                break
    return term


def index_list(labels: list[int], index: Mapping[int, int]) -> list[int]:
    return [index[i] for i in labels]


def constant_term(value: np.ndarray) -> Term:
    labels = fresh(np.ndim(value))
    return Term(((np.asarray(value), labels),), (), labels)


def appears(t: Term, label: int) -> bool:
    return any(label in lab for _, lab in t.operands) or any(label in f.labels for f in t.factors)


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
    """A site-dependent boolean, known through its values on random draws: (M,) + shape;
    ``recipe`` (f, key, a) when it is an elementwise function f of one linear predictor a
    (a comparison inside a non-conjugate term, see nonconjugate.py)."""

    draws: np.ndarray
    recipe: Any = dataclasses.field(default=None, compare=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.draws.shape[1:]


@dataclasses.dataclass
class Switch:
    """sum_k 1{z = k} cases[k] for a discrete site z (the indicators partition unity), kept
    unexpanded so that elementwise functions act casewise: f(sum_k 1_k a_k) = sum_k 1_k f(a_k)."""

    shape: tuple[int, ...]
    indicators: dict[int, Poly]
    cases: dict[int, Any]

    def expand(self) -> Value:
        total: Value = np.zeros(self.shape)
        for k, case in self.cases.items():
            total = add(total, multiply(self.indicators[k], case, self.shape), self.shape)
        return total


# ----------------------------------------------------------------------------- operations


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


def negate(v: Value) -> Value:
    """-v."""
    return scale(v, -1.0) if isinstance(v, Poly) else -np.asarray(v)


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
    constant = numpy_bind("broadcast_in_dim", {"broadcast_dimensions": tuple(dims)},
                          [p.constant], shape, np.float64)
    return Poly(shape, terms, constant)


def linear_map(p: Poly, matrix: np.ndarray, out_shape: tuple[int, ...]) -> Poly:
    """out[j...] = sum_i matrix[j..., i...] p[i...] for a constant matrix (out_shape + p.shape)."""
    terms = []
    for t in p.terms:
        new = fresh(len(out_shape))
        terms.append(Term(t.operands + ((matrix, new + t.out),), t.factors, new))
    constant = np.tensordot(matrix, p.constant, axes=p.constant.ndim) if p.shape else (
        matrix * p.constant)
    return Poly(tuple(out_shape), terms, np.asarray(constant).reshape(out_shape))


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



def dot_general(a: Value, b: Value, dimension_numbers, shape: tuple[int, ...]) -> Value:
    """lax.dot_general of two values: sum over the contracted axes, batch axes shared."""
    (ca, cb), (ba, bb) = dimension_numbers
    pa, pb = as_poly(a), as_poly(b)
    out_terms: list[Term] = []
    const = numpy_dot_general(pa.constant, pb.constant, dimension_numbers)
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

# ----------------------------------------------------------------------------- routings


def batched_values(p: Poly, draws: Mapping[str, np.ndarray], apply_stats: bool = True
                   ) -> np.ndarray:
    """p at every draw, (M,) + p.shape: one numpy einsum per term with the draw axis as an
    extra label (no tracing, no compilation beyond the statistics' elementwise functions).
    With ``apply_stats=False`` the draws are the factors' values themselves."""
    num = len(next(iter(draws.values())))
    total = np.broadcast_to(np.asarray(p.constant, dtype=np.float64), (num, *p.shape)).copy()
    for t in p.terms:
        present = sorted({i for _, lab in t.operands for i in lab}
                         | {i for f in t.factors for i in f.labels})
        index = {lab: k + 1 for k, lab in enumerate(present)}
        args: list[Any] = []
        for array, lab in t.operands:
            args += [np.asarray(array, dtype=np.float64), [index[i] for i in lab]]
        for f in t.factors:
            x = draws[f.site]
            elementwise = all(a.elementwise for a, _ in f.stat.atoms)
            if not apply_stats:
                value = x
            elif elementwise:
                value = f.stat(np.asarray(x))
            else:
                value = jax.vmap(f.stat)(jnp.asarray(x))
            args += [np.asarray(value, dtype=np.float64), [0] + [index[i] for i in f.labels]]
        kept = [index[i] for i in t.out if i in index]
        value = np.einsum(*args, [0] + kept, optimize=True) if args else np.ones((num,))
        if not t.factors:
            value = np.broadcast_to(value, (num, *value.shape[1:]) if value.ndim else (num,))
        expand = [k + 1 for k, i in enumerate(t.out) if i not in index]
        value = np.expand_dims(value, expand) if expand else value
        total = total + np.broadcast_to(value, (num, *p.shape))
    return total


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


def element_reads(p: Poly, site: str, shape: tuple[int, ...]
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """(coef, src) over p.shape with p[o] - p.constant[o] = coef[o] v[src(o)] for every value v
    (of ``shape``) of the terms' factors of ``site`` (src -1 where coef is 0), when every entry
    reads at most one element; else None. Read off at ones and at the elements' numbers, checked
    at random values (a row reading two elements fails the check almost surely)."""
    size = max(int(np.prod(shape)), 1)
    rng = np.random.default_rng(0)
    probes = np.stack([np.ones(size), np.arange(1.0, size + 1), rng.uniform(1.0, 2.0, size)])
    linear = Poly(p.shape, p.terms, np.zeros(p.shape))
    ones, numbers, at_random = batched_values(linear, {site: probes.reshape((3, *shape))},
                                              apply_stats=False)
    reads = ones != 0
    src = np.rint(np.divide(numbers, ones, out=np.zeros(p.shape), where=reads)).astype(
        np.int64) - 1
    if np.any(reads & ((src < 0) | (src >= size))):
        return None
    src = np.where(reads, src, -1)
    expected = np.where(reads, ones * probes[2][np.clip(src, 0, None)], 0.0)
    if not np.allclose(at_random, expected, rtol=1e-9, atol=1e-12 * (1 + np.abs(ones).max(
            initial=0.0))):
        return None
    return ones, src


def entry_routing(src: np.ndarray, valid: np.ndarray, shape: tuple[int, ...],
                  source_shape: tuple[int, ...]
                  ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[np.ndarray,
                                                                        tuple[int, ...]], ...]]:
    """Einsum labels for out[o] = source[src(o)] (flat index; 0 where not ``valid``): (out
    labels, source labels, operands). A source axis whose index equals an output axis's index
    takes that axis's label; the others get fresh labels and one one-hot operand over them and
    the output axes along which they (or ``valid``) vary."""
    out = fresh(len(shape))
    labels = list(fresh(len(source_shape)))
    src_idx = np.unravel_index(np.where(valid, src, 0), source_shape) if source_shape else ()
    grids = np.indices(shape)
    picked = []
    for i, idx in enumerate(src_idx):
        match = [j for j in range(len(shape)) if shape[j] == source_shape[i]
                 and np.array_equal(idx[valid], grids[j][valid])]
        if match:
            labels[i] = out[match[0]]
        else:
            picked.append(i)
    varying = [np.asarray(src_idx[i]) for i in picked] + ([valid] if not valid.all() else [])
    if not varying:
        return out, tuple(labels), ()
    deps = [j for j in range(len(shape))
            if any(not np.all(a == np.take(a, [0], axis=j)) for a in varying)]
    rep = tuple(slice(None) if j in deps else 0 for j in range(len(shape)))
    one_hot = np.zeros([shape[j] for j in deps] + [source_shape[i] for i in picked])
    at = tuple(np.indices(one_hot.shape[:len(deps)]))
    one_hot[at + tuple(np.asarray(src_idx[i])[rep] for i in picked)] = valid[rep]
    operand = (one_hot, tuple(out[j] for j in deps) + tuple(labels[i] for i in picked))
    return out, tuple(labels), (operand,)


def routed(p: Poly) -> tuple[np.ndarray, np.ndarray, Factor, tuple[int, ...]] | None:
    """(coef over p.shape, element read by each entry (flat), factor, its value's shape) when p
    is one term in one factor in which every entry picks exactly one element:
    p[o] = coef[o] s(x)[e(o)]."""
    if len(p.terms) != 1 or np.any(p.constant) or len(p.terms[0].factors) != 1:
        return None
    t = p.terms[0]
    (f,) = t.factors
    sizes = dict(zip(t.out, p.shape, strict=True))
    for a, lab in t.operands:
        sizes.update(zip(lab, np.shape(a), strict=True))
    if not all(i in sizes for i in f.labels):
        return None
    shape = tuple(sizes[i] for i in f.labels)
    reads = element_reads(p, f.site, shape)
    if reads is None or not np.all(reads[0] != 0):
        return None
    return reads[0], reads[1], f, shape


def routed_poly(p: Poly, src: np.ndarray, shape: tuple[int, ...], f: Factor, stat: Stat,
                coef: np.ndarray) -> Poly:
    """coef[o] * stat(x)[src(o)] as a term (``shape``: the shape of stat's value)."""
    out, labels, ops = entry_routing(src, np.ones(p.shape, bool), p.shape, shape)
    term = Term(ops + ((coef, out),), (Factor(f.site, stat, labels),), out)
    return Poly(p.shape, [term], np.zeros(p.shape))


def describe_routing(p: Poly) -> tuple:
    """A hashable fingerprint of an indicator polynomial (its routing and statistic)."""
    (t,) = p.terms
    ops = tuple(a.tobytes() for a, _ in t.operands)
    f = t.factors[0]
    positions = tuple(t.out.index(i) if i in t.out else -1 for i in f.labels)
    return (p.shape, f.stat.name, positions, ops)


# ----------------------------------------------------------------------------- one-site functions


@dataclasses.dataclass(frozen=True)
class AffineStats:
    """x -> sum_s a_s s(x) + b for statistics s of one site's elements."""

    parts: tuple[tuple[float, Stat], ...]
    offset: float

    @property
    def is_constant(self) -> bool:
        return all(a == 0 for a, _ in self.parts)

    @property
    def name(self) -> str:
        parts = [(a, s) for a, s in self.parts if a != 0]
        if len(parts) == 1 and parts[0][0] == 1 and not self.offset:
            return parts[0][1].name  # f(1.0*s) is the atom f(s) of the other rules
        # 15 significant digits: equal coefficients reached by two routes share a name, and
        # float noise (0.04000000000000001) does not reach it
        return " + ".join(f"{float(a):.15g}*{s.name}" for a, s in parts) + (
            f" + {float(self.offset):.15g}" if self.offset else "")

    def __call__(self, x: Array) -> Array:
        return sum((a * s(x) for a, s in self.parts if a != 0), self.offset)


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
    return AffineStats(tuple(parts), c0), labels, p.terms[0].out


MAX_CLASSES = 16  # distinct coefficient vectors under one nonlinearity (one statistic each)


def element_classes(p: Poly, site: str, site_shape: tuple[int, ...]
                    ) -> tuple[list[Stat], np.ndarray, np.ndarray, np.ndarray] | None:
    """(statistics s, element read by each entry (flat; -1 for none), class of each entry
    (p.shape), one row (a_s..., b) per class) with p[o] = sum_s a_s[o] s(x)[e(o)] + b[o] and
    (a[o], b[o]) the row of o's class, when every entry reads at most one element through
    elementwise statistics and there are at most MAX_CLASSES rows; else None."""
    groups: dict[Stat, list[Term]] = {}
    for t in p.terms:
        if len(t.factors) != 1 or t.factors[0].site != site or not all(
                a.elementwise for a, _ in t.factors[0].stat.atoms):
            return None
        groups.setdefault(t.factors[0].stat, []).append(t)
    if not groups:
        return None
    src = np.full(p.shape, -1)
    coefs = []
    for terms in groups.values():
        reads = element_reads(Poly(p.shape, terms, np.zeros(p.shape)), site, site_shape)
        if reads is None:
            return None
        coef, element = reads
        if np.any((element >= 0) & (src >= 0) & (element != src)):
            return None  # two statistics of different elements
        src = np.where(element >= 0, element, src)
        coefs.append(coef.ravel())
    coefs.append(np.broadcast_to(p.constant, p.shape).ravel())
    rows, classes = np.unique(np.stack(coefs, axis=1), axis=0, return_inverse=True)
    if len(rows) > MAX_CLASSES:
        return None
    return list(groups), src, classes.reshape(p.shape), rows

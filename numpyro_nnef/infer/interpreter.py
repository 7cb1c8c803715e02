"""Symbolic evaluation of a log density's jaxpr into a multilinear form in the sites' statistics.

Every intermediate value of the jaxpr is a numpy constant, a :class:`~.algebra.Poly` (a sum of
einsum terms in per-site statistics, see ``algebra.py``), a :class:`~.algebra.SampledBool` or a
:class:`~.algebra.Switch`. Linear maps, sums, broadcasts, products, integer and fractional powers
and logs of monomials stay inside the form; a nonlinear function of several sites, or of one
site with coefficients that differ between its elements, is non-conjugate and raises
:class:`NonConjugateError`. Comparisons that depend on sites (support checks in ``log_prob``)
are decided on random draws of the sites: a ``select`` whose predicate is the same on every
draw keeps its branch, any other raises.

Each primitive has one rule in ``RULES`` (as JAX's own interpreters keep ``ad.primitive_jvps``),
``rule(interpreter, eqn, ins, shape) -> value``. ``Interpreter.apply`` evaluates an equation:

1. a call primitive (``CALLS``: jit, custom_jvp_call, ...) evaluates its inner jaxpr;
2. an equation of constants is evaluated in numpy (``bind_constant``);
3. a Switch input (a value by cases of a discrete site) is mapped casewise by a ``CASEWISE``
   primitive or rearranged by a ``REARRANGEMENTS`` primitive, and expanded for any other;
4. ``rule_of(eqn)``: a boolean output is decided on the draws (unless the primitive passes its
   operand through), else ``RULES[name]``, and for a primitive without a rule ``nonlinear_rule``
   (an elementwise function of one site becomes a new atom; anything else raises).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.extend import core as jcore

from ..oracles.base import trusted_domain
from . import nonconjugate
from .algebra import (
    ABS_ATOM,
    X_ATOM,
    AffineStats,
    Atom,
    Factor,
    Poly,
    SampledBool,
    Stat,
    Switch,
    Term,
    Value,
    add,
    appears,
    as_poly,
    batched_values,
    broadcast_in_dim,
    describe_routing,
    dot_general,
    element_classes,
    element_reads,
    embed_axis,
    entry_routing,
    fresh,
    linear_map,
    log_of,
    monomial,
    multiply,
    negate,
    routed,
    routed_poly,
    simplify,
    single_site_function,
)
from .cache import BoundedCache
from .nonconjugate import Nonlinear
from .numpy_eval import (
    CALLS,
    NUMPY_ELEMENTWISE_ALL,
    TRANSPARENT,
    bind_constant,
    evaluate,
    inner_jaxpr,
    live_equations,
    numpy_bind,
    numpy_fold,
)

Array = jax.Array

__all__ = ["NonConjugateError", "RULES", "Interpreter", "trace_log_density", "evaluate_in_numpy"]


class NonConjugateError(ValueError):
    """The log density is not multilinear in per-site statistics (names the sites and the cause).

    ``sites``: the latent sites involved; ``reason``: what is not conjugate, in words;
    ``term``: the offending term (e.g. "exp of a linear function of w"), empty where the error is
    not about one term."""

    def __init__(self, message: str, sites: Sequence[str] = (), term: str = "",
                 reason: str = ""):
        super().__init__(message)
        self.sites = tuple(sites)
        self.term = term
        self.reason = reason


REMEDY = ("CAVI needs a log joint that is multilinear in per-site statistics (sums of products "
          "of functions of single sites): a conjugate prior/likelihood pair for every latent "
          "site (e.g. Normal mean and Normal likelihood, Gamma precision and Normal likelihood, "
          "Gamma rate and Poisson, Beta and Bernoulli(probs=...)); non-conjugate terms only as "
          "elementwise functions of a linear predictor of real-valued sites (logistic, "
          "Poisson-log or probit likelihoods of X @ w + b).")

# primitives in the words a model's author would use for them
PRIMITIVE_WORDS = {"exp": "exp", "expm1": "exp", "log": "log", "log1p": "log", "max": "max",
                   "min": "min", "clamp": "clip", "abs": "abs", "sign": "sign",
                   "logistic": "sigmoid", "tanh": "tanh", "erf": "erf", "erfc": "erfc",
                   "erf_inv": "inverse erf", "lgamma": "log-gamma", "digamma": "digamma",
                   "sin": "sin", "cos": "cos", "floor": "floor", "ceil": "ceil",
                   "round": "round", "rem": "remainder", "pow": "a power", "div": "division"}


def operation_words(what: str) -> str:
    """An operation (a primitive name, or "<name>^<exponent>" for powers) in words."""
    if "^" in what:
        exponent = Fraction(what.split("^", 1)[1])
        named = {Fraction(-1): "the reciprocal", Fraction(1, 2): "the square root",
                 Fraction(-1, 2): "the reciprocal square root"}
        return named.get(exponent, f"the power {exponent}")
    return PRIMITIVE_WORDS.get(what, f"the operation {what!r}")


def describe(values: Sequence[Any]) -> str:
    """Site-dependent values in words: "a linear function of w", "a function of several sites
    (a and b)"."""
    polys = [v for v in values if isinstance(v, Poly)]
    sites = sorted(set().union(*(p.sites() for p in polys))) if polys else []
    names = " and ".join(sites) if len(sites) <= 2 else f"{', '.join(sites[:-1])} and {sites[-1]}"
    if not sites:
        return "a function of the latent sites"
    linear = all(len(t.factors) == 1 and t.factors[0].stat.power_of_x == 1
                 for p in polys for t in p.terms)
    if linear:
        return f"a linear function of {names}"
    if len(sites) == 1:
        return f"a nonlinear function of {names}"
    return f"a function of several sites ({names})"


# ----------------------------------------------------------------------------- the rule table

Eqn = jcore.JaxprEqn
Shape = tuple[int, ...]
Rule = Callable[["Interpreter", Eqn, list[Value], Shape], Value]
# one rule per primitive name: rule(interpreter, eqn, input values, output shape) -> value
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Registers the decorated function as the rule of the primitives ``names``."""
    def register(fn: Rule) -> Rule:
        for name in names:
            if name in RULES:
                raise ValueError(f"primitive {name!r} has a rule already")
            RULES[name] = fn
        return fn
    return register


# primitives applied to the cases of a Switch one by one: f(sum_k 1_k a_k) = sum_k 1_k f(a_k)
CASEWISE = {"add", "sub", "mul", "div", "neg", "integer_pow", "square", "sqrt", "rsqrt", "pow",
            "log", "log1p", "abs", "exp", "convert_element_type", "stop_gradient", "lgamma",
            "digamma", "expm1", "logistic", "tanh", "max", "min", "clamp", "select_n",
            "eq", "ne", "lt", "le", "gt", "ge", "is_finite", "and", "or", "not", "xor"}
# operations whose every output entry is one input entry
REARRANGEMENTS = {"squeeze", "reshape", "broadcast_in_dim", "transpose"}
COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge", "is_finite"}
LOGICAL = {"and", "or", "not", "xor"}
# primitives that may return their site-dependent operand unchanged, or one constant, on every
# draw (NumPyro's clamping of probabilities, the integer check z % 1 == 0)
IDENTITY_CANDIDATES = {"clamp", "max", "min", "rem", "round", "floor", "ceil", "sign"}
# primitives linear in their one site-dependent operand, with the others constant
LINEAR_BY_BASIS = {"slice", "pad", "rev", "reshape", "squeeze", "cumsum", "dynamic_update_slice",
                   "select_and_scatter_add"}
# primitives that move the entries of their first operand (each output entry one entry or a fill)
SELECTIONS = {"slice", "gather", "dynamic_slice", "pad", "rev", "reshape", "squeeze"}


# ----------------------------------------------------------------------------- the interpreter

class Interpreter:
    """Evaluates a jaxpr on Poly/constant values; ``draws`` are random site values (M, *shape)
    used to decide site-dependent comparisons."""

    def __init__(self, draws: Mapping[str, np.ndarray],
                 finite_supports: Mapping[str, np.ndarray] | None = None):
        self.draws = {k: np.asarray(v) for k, v in draws.items()}
        self.finite_supports = {k: np.asarray(v) for k, v in (finite_supports or {}).items()}
        self.indicator_cache: dict[Any, dict[int, Poly]] = {}
        self._sampled: dict[int, tuple[Poly, np.ndarray]] = {}

    # -------------------------------------------------------------- helpers
    def sampled(self, v: Value) -> np.ndarray:
        """(M,) + shape values of v on the draws."""
        num = len(next(iter(self.draws.values())))
        if isinstance(v, SampledBool):
            return v.draws
        if isinstance(v, Switch):
            v = self.expand(v)
        if isinstance(v, Nonlinear):
            total = self.sampled(v.poly)
            for t in v.terms:
                total = total + t.on_draws(self.sampled(t.arg))
            return total
        if not isinstance(v, Poly):
            return np.broadcast_to(np.asarray(v), (num, *np.shape(v)))
        if id(v) not in self._sampled:  # support checks often test one value several times
            self._sampled[id(v)] = (v, batched_values(v, self.draws))
        return self._sampled[id(v)][1]

    def rearrange_switch(self, eqn: Eqn, sw: Switch) -> Switch:
        """A rearrangement R (each output entry one input entry) of sum_k 1_k c_k:
        sum_k R(1_k) R(c_k)."""
        shape = tuple(eqn.outvars[0].aval.shape)
        indicators = {k: self.apply(eqn, [ind])[0] for k, ind in sw.indicators.items()}
        cases = {k: self.apply(eqn, [c])[0] for k, c in sw.cases.items()}
        (site,) = next(iter(indicators.values())).sites()
        key = (site, tuple(describe_routing(indicators[k]) for k in indicators))
        return Switch(shape, self.indicator_cache.setdefault(key, indicators), cases)

    def expand(self, sw: Switch) -> Value:
        """The switch as one value; a switch of site-dependent booleans (a comparison made
        casewise) as the booleans of the case that each draw's indicators pick."""
        if not any(isinstance(c, SampledBool) for c in sw.cases.values()):
            return sw.expand()
        total = 0
        for k, case in sw.cases.items():
            total = total + self.sampled(sw.indicators[k]) * self.sampled(case)
        return SampledBool(np.asarray(total) != 0)

    def error(self, sites: set[str], what: str, term: str = "") -> NonConjugateError:
        """The error for site(s) ``sites``: ``what`` went wrong; ``term`` (when the cause is one
        operation) says which in words, e.g. "exp of a linear function of w"."""
        names = ", ".join(sorted(sites))
        return NonConjugateError(
            f"the log density is not conjugate in site(s) {names}: {what}. {REMEDY}",
            sorted(sites), term, what)

    def nonlinear_error(self, sites: set[str], what: str, values: Sequence[Value],
                        why: str = "") -> NonConjugateError:
        """Operation ``what`` (a primitive name) applied to site-dependent ``values``."""
        term = f"{operation_words(what)} of {describe(values)}"
        return self.error(sites, term + (f" ({why})" if why else ""), term)

    # -------------------------------------------------------------- evaluation
    def run(self, closed: jcore.ClosedJaxpr, args: Sequence[Value]) -> list[Value]:
        """The jaxpr's outputs for input values ``args``, its live equations applied in order."""
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
        for eqn in live_equations(jaxpr):
            ins = [read(v) for v in eqn.invars]
            outs = self.apply(eqn, ins)
            for var, out in zip(eqn.outvars, outs, strict=True):
                env[var] = out
        return [read(v) for v in jaxpr.outvars]

    def apply(self, eqn: Eqn, ins: list[Value]) -> list[Value]:
        """The equation's outputs (the steps are in the module docstring)."""
        if eqn.primitive.name in CALLS:
            return self.run(inner_jaxpr(eqn.params), ins)
        if not any(isinstance(x, (Poly, SampledBool, Switch, Nonlinear)) for x in ins):
            return bind_constant(eqn, ins)
        shape = tuple(eqn.outvars[0].aval.shape)
        if any(isinstance(x, Nonlinear) for x in ins):
            return [nonconjugate.apply(self, eqn, ins, shape)]
        if (len(eqn.outvars) == 1 and eqn.outvars[0].aval.dtype != np.bool_
                and not any(isinstance(x, (Poly, Switch)) for x in ins)):
            # arithmetic on site-dependent booleans (Bernoulli's guard against infinite
            # logits): known on the draws, a constant when the same on every draw
            values = self.on_draws(eqn, self.sampled_inputs(eqn, ins))
            same = np.all((values == values[:1]) | (np.isnan(values) & np.isnan(values[:1])))
            return [values[0] if same else SampledBool(values)]
        if any(isinstance(x, Switch) for x in ins):
            by_cases = self.casewise(eqn, ins)
            if by_cases is not None:
                return [by_cases]
            ins = [self.expand(x) if isinstance(x, Switch) else x for x in ins]
            if not any(isinstance(x, (Poly, SampledBool)) for x in ins):
                return bind_constant(eqn, ins)
        try:
            return [rule_of(eqn)(self, eqn, ins, shape)]
        except NonConjugateError:
            # an elementwise function of a linear predictor: kept as a non-conjugate term
            kept = nonconjugate.start(self, eqn, ins, shape, describe)
            if kept is None:
                raise
            return [kept]

    def casewise(self, eqn: Eqn, ins: list[Value]) -> Switch | None:
        """The equation on Switch inputs kept by cases: a ``CASEWISE`` primitive of switches of
        one partition, sum_k 1_k f(a_k); a rearrangement R of one switch, sum_k R(1_k) R(a_k);
        else None (the switches are then expanded)."""
        name = eqn.primitive.name
        switches = [x for x in ins if isinstance(x, Switch)]
        if name in CASEWISE and len({id(sw.indicators) for sw in switches}) == 1 and all(
                sw.shape == tuple(eqn.outvars[0].aval.shape) for sw in switches):
            first = switches[0]
            cases = {k: self.apply(eqn, [x.cases[k] if isinstance(x, Switch) else x
                                         for x in ins])[0] for k in first.cases}
            return Switch(first.shape, first.indicators, cases)
        if name in REARRANGEMENTS and len(ins) == 1:
            return self.rearrange_switch(eqn, switches[0])
        return None

    # -------------------------------------------------------------- values on the draws
    @staticmethod
    def on_draws(eqn: Eqn, sampled: list[np.ndarray]) -> np.ndarray:
        """The equation applied to each draw of its inputs (leading axis): in numpy for
        elementwise primitives, else vmapped."""
        aval = eqn.outvars[0].aval
        shape = tuple(aval.shape)
        if len(eqn.outvars) == 1 and all(tuple(v.aval.shape) in ((), shape) for v in eqn.invars):
            num = len(sampled[0])
            full = [np.asarray(x).reshape((num, *[1] * (len(shape) + 1 - x.ndim), *x.shape[1:]))
                    for x in sampled]
            out = numpy_bind(eqn.primitive.name, eqn.params, full, (num, *shape), aval.dtype) if (
                eqn.primitive.name in NUMPY_ELEMENTWISE_ALL) else None
            if out is not None:
                return out
        return np.asarray(jax.vmap(lambda *xs: eqn.primitive.bind(*xs, **eqn.params))(*sampled))

    def sampled_inputs(self, eqn: Eqn, ins: list[Value]) -> list[np.ndarray]:
        """Every input's values on the draws, in the dtype the equation expects."""
        return [np.asarray(self.sampled(x)).astype(v.aval.dtype)
                for x, v in zip(ins, eqn.invars, strict=True)]

    def decided_on_draws(self, eqn: Eqn, ins: list[Value]) -> Value | None:
        """For a primitive of one site-dependent input and constants: that input when the
        primitive returns it unchanged on every draw (NumPyro's clamping of probabilities), a
        constant when it returns the same value on every draw (the integer check z % 1 == 0 of
        a discrete support); else None."""
        polys = [(k, x) for k, x in enumerate(ins) if isinstance(x, Poly)]
        if len(polys) != 1:
            return None
        k, p = polys[0]
        if tuple(eqn.outvars[0].aval.shape) != p.shape:
            return None
        sampled = self.sampled_inputs(eqn, ins)
        out = self.on_draws(eqn, sampled)
        if np.array_equal(out, np.asarray(sampled[k])):
            return p
        return out[0] if np.all(out == out[:1]) else None

    # -------------------------------------------------------------- indexing and linear maps
    def index_by_site(self, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
        """operand[z] (gather or dynamic_slice) with z a site with finite support:
        sum_k 1{z = k} operand[k]; the indicators are statistics of z (one-hot) broadcast over
        the slice's axes, operand[k] a constant-index gather or slice."""
        operand = ins[0]
        if eqn.primitive.name == "gather":
            indices = ins[1]
            sites = indices.sites()
            sampled = self.sampled(indices)  # (M, ..., index vector)
            varying = np.any(sampled != sampled[:1], axis=tuple(range(sampled.ndim - 1)))
            offset = eqn.params["dimension_numbers"].offset_dims
            batch_dims = tuple(d for d in range(len(shape)) if d not in offset)
            if varying.sum() != 1 or len(batch_dims) != len(indices.shape) - 1 or any(
                    shape[d] != n for d, n in zip(batch_dims, indices.shape[:-1], strict=True)):
                raise self.error(sites, "they index an array in a way CAVI does not support")
            (j,) = np.flatnonzero(varying)
            base = sampled[0]
            select = np.zeros((*indices.shape[:-1], *indices.shape))
            flat = np.arange(int(np.prod(indices.shape[:-1])))
            select.reshape(len(flat), -1)[flat, flat * indices.shape[-1] + j] = 1.0
            component = simplify(linear_map(indices, select, tuple(indices.shape[:-1])))

            def fixed(k: int) -> list[Value]:
                idx = base.copy()
                idx[..., j] = k
                return [operand, idx.astype(eqn.invars[1].aval.dtype), *ins[2:]]
        else:  # dynamic_slice: one scalar start index depends on the site
            positions = [k for k in range(1, len(ins)) if isinstance(ins[k], Poly)]
            sites = set().union(*(ins[k].sites() for k in positions))
            if len(positions) != 1:
                raise self.error(sites, "they index an array in a way CAVI does not support")
            (j,) = positions
            component, batch_dims = ins[j], ()

            def fixed(k: int) -> list[Value]:
                return [*ins[:j], np.asarray(k, dtype=eqn.invars[j].aval.dtype), *ins[j + 1:]]
        (site,) = sites if len(sites) == 1 else (None,)
        if site not in self.finite_supports:
            raise self.error(sites, "they are used as indices but are not one discrete site "
                                    "with a finite support")
        cases: dict[int, Value] = {}
        indicators: dict[int, Poly] = {}
        for k in self.finite_supports[site]:
            k = int(k)
            if isinstance(operand, Poly):
                picked = self.linear_by_basis(eqn, fixed(k), shape)
            else:
                picked = np.asarray(eqn.primitive.bind(*[jnp.asarray(x) for x in fixed(k)],
                                                       **eqn.params))
            atom = Atom(f"1{{x={k}}}", lambda v, k=k: (v == k) * 1.0)
            indicator = self.route(component, site, Stat.of(atom))
            indicators[k] = broadcast_in_dim(indicator, shape, batch_dims) if (
                indicator.shape != shape) else indicator
            cases[k] = picked
        key = (site, tuple(describe_routing(indicators[k]) for k in indicators))
        indicators = self.indicator_cache.setdefault(key, indicators)
        return Switch(shape, indicators, cases)

    def route(self, p: Poly, site: str, stat: Stat) -> Poly:
        """stat(p) for p a routing of the site's elements (each entry of p equals one element
        of the site, coefficient 1): the same routing applied to stat(x)."""
        site_shape = self.draws[site].shape[1:]
        reads = None
        if not np.any(p.constant) and all(
                len(t.factors) == 1 and t.factors[0].stat.power_of_x == 1 for t in p.terms):
            reads = element_reads(p, site, site_shape)
        if reads is None or p.sites() != {site} or not np.all(reads[0] == 1):
            raise self.error({site}, "it is used as an index after arithmetic")
        out, labels, ops = entry_routing(reads[1], np.ones(p.shape, bool), p.shape, site_shape)
        return Poly(p.shape, [Term(ops, (Factor(site, stat, labels),), out)], np.zeros(p.shape))

    def select_entries(self, eqn: Eqn, ins: list[Value], shape: Shape) -> Value | None:
        """out[o] = p[src(o)] (or a constant fill where o has no source) for a primitive that
        moves the entries of its operand p: src is read off the primitive applied to the
        entries' numbers, and each term of p is read through ``entry_routing`` (no dense
        matrix); None when p's terms repeat an output label or p has more entries than its
        dtype numbers exactly."""
        p = ins[0]
        size = int(np.prod(p.shape))
        dtype = np.dtype(eqn.invars[0].aval.dtype)
        exact = 2 ** (np.finfo(dtype).nmant + 1) if dtype.kind == "f" else np.iinfo(dtype).max
        if size >= exact or any(len(set(t.out)) != len(t.out) for t in p.terms):
            return None
        numbers = [(np.arange(size) + 1.0).astype(dtype).reshape(p.shape), *ins[1:]]
        if eqn.primitive.name == "pad":
            numbers[1] = np.zeros((), dtype)
        moved = np.asarray(bind_constant(eqn, numbers)[0], dtype=np.float64)
        valid = np.isfinite(moved) & (moved >= 1)  # a fill (pad, out-of-bounds gather): none
        src = np.rint(np.where(valid, moved, 1.0)).astype(np.int64) - 1
        out, labels, ops = entry_routing(src, valid, shape, p.shape)
        terms = []
        for t in p.terms:
            read = t.relabel(dict(zip(t.out, labels, strict=True)))
            terms.append(Term(read.operands + ops, read.factors, out))
        constant = bind_constant(eqn, [np.asarray(p.constant), *ins[1:]])[0]
        return simplify(Poly(shape, terms, np.asarray(constant, dtype=np.float64)))

    def linear_by_basis(self, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
        """A primitive linear in its one site-dependent operand: its matrix, found by applying it
        to every basis vector of that operand (other operands held at their constants)."""
        positions = [k for k, x in enumerate(ins) if isinstance(x, Poly)]
        if len(positions) != 1:
            sites = set().union(*(ins[k].sites() for k in positions))
            raise self.error(sites, f"primitive {eqn.primitive.name!r} mixes them")
        (k,) = positions
        p = ins[k]
        if eqn.primitive.name in SELECTIONS and k == 0:
            moved = self.select_entries(eqn, ins, shape)
            if moved is not None:
                return moved
        consts = [np.zeros(x.shape) if isinstance(x, Poly) else np.asarray(x) for x in ins]

        def apply(v):
            args = list(consts)
            args[k] = v
            return bind_constant(eqn, args)[0]

        offset = apply(np.zeros(p.shape))
        basis = np.eye(max(int(np.prod(p.shape)), 1)).reshape((-1, *p.shape))
        if numpy_fold(eqn, [*consts[:k], basis[0], *consts[k + 1:]]) is not None:
            columns = np.stack([apply(b) for b in basis]) - offset  # (in, *out)
        else:
            jconsts = [jnp.asarray(c) for c in consts]

            def jax_apply(v):
                out = eqn.primitive.bind(*jconsts[:k], v, *jconsts[k + 1:], **eqn.params)
                return out[0] if eqn.primitive.multiple_results else out

            columns = np.asarray(jax.vmap(jax_apply)(jnp.asarray(basis))) - offset
        matrix = np.moveaxis(columns.reshape((-1, *shape)), 0, -1).reshape((*shape, *p.shape))
        mapped = linear_map(Poly(p.shape, p.terms, np.zeros(p.shape)), matrix, shape)
        mapped.constant = apply(np.asarray(p.constant))
        return simplify(mapped)

    # -------------------------------------------------------------- powers, logs, nonlinear
    def power(self, p: Value, exponent: Fraction, what: str) -> Value:
        """p^e: a product for a positive integer e, |c|^e s^e for a monomial or routed entries
        c s(x), else a new atom (``what`` names the operation in errors)."""
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
        route = routed(p)
        if route is not None:
            coef, src, f, f_shape = route
            if exponent.denominator == 1 or np.all(coef > 0):
                return routed_poly(p, src, f_shape, f, f.stat ** exponent,
                                   coef ** float(exponent))
        fn = (lambda v: v ** float(exponent))
        return self.nonlinear(p, fn, f"{what}^{exponent}")

    def log(self, p: Value) -> Value:
        """log p: log c + sum_a q_a log atom_a for a monomial or routed entries c prod_a atom_a^q_a
        with c > 0, else a new atom."""
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
        route = routed(p)
        if route is not None and np.all(route[0] > 0):
            coef, src, f, f_shape = route
            total: Value = np.log(coef)
            for atom, q in f.stat.atoms:  # log(c s) = log c + sum_a q_a log(atom_a)
                part = routed_poly(p, src, f_shape, f, Stat.of(log_of(atom)),
                                   np.full(p.shape, float(q)))
                total = add(total, part, p.shape)
            return total
        return self.nonlinear(p, jnp.log, "log")

    def nonlinear(self, p: Poly, fn: Callable[[Array], Array], what: str) -> Value:
        """f(p) for p a polynomial in ONE site, the same function of every element: a new atom."""
        sites = p.sites()
        if len(sites) != 1:
            raise self.nonlinear_error(sites, what, [p])
        (site,) = sites
        scalar = single_site_function(p, site)
        if scalar is None and self.draws[site].shape[1:] == () and p.shape:
            # a scalar site inside an array-valued expression (e.g. log of stack(b, 1 - b)):
            # one vector statistic f(p(x)) with the expression's axes
            (number,) = fresh(1)
            atom = Atom(f"{what}(<expression {number}>)",
                        lambda x, p=p, fn=fn: fn(p.at({site: x})), elementwise=False)
            labels = fresh(len(p.shape))
            term = Term((), (Factor(site, Stat.of(atom), labels),), labels)
            return Poly(p.shape, [term], np.zeros(p.shape))
        if scalar is None:
            return self.routed_function(p, site, fn, what)
        inner, labels, out = scalar
        atom = Atom(f"{what}({inner.name})", lambda x, inner=inner, fn=fn: fn(inner(x)))
        term = Term((), (Factor(site, Stat.of(atom), labels),), out)
        return Poly(p.shape, [term], np.zeros(p.shape))

    def routed_function(self, p: Poly, site: str, fn: Callable[[Array], Array], what: str
                        ) -> Value:
        """f(p)[o] = f_c(o)(x[e(o)]) with f_c(x) = f(sum_s a_cs s(x) + b_c), for p[o] = sum_s
        a_s[o] s(x)[e(o)] + b[o]: each entry one element e(o), entries grouped in classes c by
        their coefficients (a[o], b[o]); each class is one statistic f_c, routed to its
        entries."""
        found = element_classes(p, site, self.draws[site].shape[1:])
        if found is None:
            raise self.nonlinear_error({site}, what, [p], "it combines several elements of the "
                                       "site, or weighs them differently")
        stats, src, classes, coefs = found
        site_shape = self.draws[site].shape[1:]
        constant = np.zeros(p.shape)
        terms = []
        for c, row in enumerate(coefs):
            mask = classes == c
            inner = AffineStats(tuple(zip(row[:-1], stats, strict=True)), float(row[-1]))
            if inner.is_constant:
                constant = np.where(mask, np.asarray(fn(jnp.asarray(row[-1]))), constant)
                continue
            atom = Atom(f"{what}({inner.name})", lambda x, inner=inner, fn=fn: fn(inner(x)))
            out, labels, ops = entry_routing(src, mask, p.shape, site_shape)
            terms.append(Term(ops, (Factor(site, Stat.of(atom), labels),), out))
        return simplify(Poly(p.shape, terms, constant))


# ----------------------------------------------------------------------------- the rules


@rule(*TRANSPARENT)
def transparent_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """f(x) = x."""
    return ins[0]


@rule(*COMPARISONS, *LOGICAL)
def boolean_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """A site-dependent boolean: the equation on every draw of its inputs (with its recipe
    when it is a function of one linear predictor)."""
    return SampledBool(it.on_draws(eqn, it.sampled_inputs(eqn, ins)),
                       nonconjugate.recipe(it, eqn, ins, shape))


@rule("select_n")
def select_n_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """cases[pred] = sum_k 1{pred = k} cases[k], for a predicate that is the same on every draw."""
    pred, cases = ins[0], ins[1:]
    if isinstance(pred, SampledBool):
        draws = pred.draws
        if not np.all(draws == draws[:1]):
            sites = set().union(*(c.sites() for c in cases if isinstance(c, Poly)))
            raise it.error(sites or {"?"}, "a branch (where/select) depends on the value "
                                            f"of {' and '.join(sorted(sites)) or 'a site'}")
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


@rule("add", "add_any")
def add_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """a + b."""
    return add(ins[0], ins[1], shape)


@rule("sub")
def sub_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """a - b."""
    return add(ins[0], negate(ins[1]), shape)


@rule("neg")
def neg_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """-a."""
    return negate(ins[0])


@rule("mul")
def mul_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """a b."""
    return multiply(ins[0], ins[1], shape)


@rule("div")
def div_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """a / b = a b^-1."""
    a, b = ins
    if not isinstance(b, Poly):
        return multiply(a, 1.0 / np.asarray(b, dtype=np.float64), shape)
    return multiply(a, it.power(b, Fraction(-1), "div"), shape)


@rule("integer_pow")
def integer_pow_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """a^y for the integer parameter y."""
    return it.power(ins[0], Fraction(int(eqn.params["y"])), "integer_pow")


# powers with fixed exponents
EXPONENTS = {"square": Fraction(2), "sqrt": Fraction(1, 2), "rsqrt": Fraction(-1, 2)}


@rule(*EXPONENTS)
def fixed_power_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """a^2, a^(1/2), a^(-1/2)."""
    return it.power(ins[0], EXPONENTS[eqn.primitive.name], eqn.primitive.name)


@rule("pow")
def pow_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """a^e for a constant exponent e, the same for every entry."""
    base, exponent = ins
    if isinstance(exponent, Poly):
        raise it.error(exponent.sites(), "they appear in an exponent")
    e = np.asarray(exponent)
    if e.size and np.all(e == e.flat[0]):
        return it.power(base, Fraction(float(e.flat[0])).limit_denominator(1000), "pow")
    raise it.error(base.sites(), "they are raised to element-dependent powers")


@rule("log")
def log_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """log a."""
    return it.log(ins[0])


@rule("log1p")
def log1p_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """log(1 + a)."""
    return it.log(add(ins[0], np.ones(()), shape))


@rule("abs")
def abs_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """|c prod x^p| = |c| prod |x|^p for a monomial; else a new atom."""
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
    return it.nonlinear(p, jnp.abs, "abs")


@rule("dot_general")
def dot_general_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """sum over the contracted axes of a b."""
    return dot_general(ins[0], ins[1], eqn.params["dimension_numbers"], shape)


@rule("triangular_solve")
def triangular_solve_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """op(a)^{-1} b (left_side) or b op(a)^{-1} for a constant triangular a: a linear map of
    b, the dot product with the constant op(a)^{-1} over a's batch axes."""
    a, b = ins
    params = eqn.params
    if isinstance(a, Poly):
        raise it.error(a.sites(), "a triangular system with them in its matrix is solved")
    a = np.asarray(a, dtype=np.float64)
    inverse = np.empty(a.shape)
    for index in np.ndindex(a.shape[:-2]):  # scipy (no XLA compilation), matrix by matrix
        inverse[index] = scipy.linalg.solve_triangular(
            a[index], np.eye(a.shape[-1]), lower=params["lower"],
            trans=1 if params["transpose_a"] else 0, unit_diagonal=params["unit_diagonal"])
    batch = tuple(range(a.ndim - 2))
    dims = (((len(batch) + 1,), (len(batch),)), (batch, batch))
    pair = [inverse, b] if params["left_side"] else [b, inverse]
    return dot_general(*pair, dims, shape)


@rule("broadcast_in_dim")
def broadcast_in_dim_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """Operand axis k to output axis broadcast_dimensions[k], the others broadcast."""
    return broadcast_in_dim(as_poly(ins[0]), shape, eqn.params["broadcast_dimensions"])


@rule("transpose")
def transpose_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """Axes permuted: out label k is operand label permutation[k]."""
    p = as_poly(ins[0])
    perm = eqn.params["permutation"]
    terms = [Term(t.operands, t.factors, tuple(t.out[k] for k in perm)) for t in p.terms]
    return Poly(shape, terms, np.transpose(p.constant, perm))


@rule("reduce_sum")
def reduce_sum_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """Sum over ``axes``: their labels leave ``out`` (a broadcast axis multiplies by its size)."""
    p = as_poly(ins[0])
    axes = tuple(eqn.params["axes"])
    terms = []
    for t in p.terms:
        extra = [(np.asarray(float(p.shape[k])), ()) for k in axes if not appears(t, t.out[k])]
        out = tuple(lab for k, lab in enumerate(t.out) if k not in axes)
        terms.append(Term(t.operands + tuple(extra), t.factors, out))
    return simplify(Poly(shape, terms, np.sum(p.constant, axis=axes)))


@rule("concatenate")
def concatenate_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """The operands side by side along ``dimension``: the sum of each one embedded there."""
    axis = eqn.params["dimension"]
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


@rule("stack")
def stack_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """The operands stacked along a new axis ``axis``: sum_k e_k (x) operand_k."""
    axis = eqn.params["axis"]
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


@rule(*IDENTITY_CANDIDATES)
def decided_on_draws_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """f(p) = p, or a constant, when so on every draw; else as ``nonlinear_rule``."""
    decided = it.decided_on_draws(eqn, ins)
    return decided if decided is not None else nonlinear_rule(it, eqn, ins, shape)


@rule("gather", "dynamic_slice")
def indexing_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """operand[index]: by cases of a discrete site when the index depends on one (``Switch``),
    else linear in the operand."""
    if any(isinstance(x, Poly) for x in ins[1:]):
        return it.index_by_site(eqn, ins, shape)
    return it.linear_by_basis(eqn, ins, shape)


@rule(*LINEAR_BY_BASIS)
def linear_by_basis_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """A linear map of the one site-dependent operand (its matrix read off a basis)."""
    return it.linear_by_basis(eqn, ins, shape)


def nonlinear_rule(it: Interpreter, eqn: Eqn, ins: list[Value], shape: Shape) -> Value:
    """f(p) for a primitive without a rule: a new atom when f acts elementwise on one operand p
    of one site; else the log density is not conjugate."""
    name = eqn.primitive.name
    polys = [x for x in ins if isinstance(x, Poly)]
    if len(ins) == 1 and len(eqn.outvars) == 1 and shape == polys[0].shape:
        return it.nonlinear(polys[0], lambda v: eqn.primitive.bind(v, **eqn.params), name)
    sites = set().union(*(p.sites() for p in polys))
    raise it.nonlinear_error(sites, name, polys)


def rule_of(eqn: Eqn) -> Rule:
    """The equation's rule: ``boolean_rule`` for a boolean output (known only on the draws,
    whatever the primitive) unless the primitive is transparent, else ``RULES[name]``, else
    ``nonlinear_rule``."""
    found = RULES.get(eqn.primitive.name, nonlinear_rule)
    if found is not transparent_rule and eqn.outvars[0].aval.dtype == np.bool_:
        return boolean_rule
    return found


# ----------------------------------------------------------------------------- entry points


def trace_log_density(
    log_density: Callable[[Sequence[np.ndarray], dict[str, Array]], Array],
    sites: Mapping[str, np.ndarray],
    draws: Mapping[str, np.ndarray],
    finite_supports: Mapping[str, np.ndarray] | None = None,
    data: Sequence[np.ndarray] = (),
    cache_key: Any = None,
) -> Poly | Nonlinear | np.ndarray:
    """The multilinear form of ``log_density(data, sites)`` (with non-conjugate terms: a
    Nonlinear) (a scalar function of the data
    arrays and of named site values).

    ``sites`` gives each site's value (for shapes and tracing), ``draws`` M random values of each
    site in its support (for site-dependent support checks), ``finite_supports`` the values of
    the discrete sites that may index arrays. The jaxpr is traced with the data as inputs and
    kept under ``cache_key`` (when given), so new data of the same shapes skips the tracing; a
    log density that branches on data values in Python is traced with the data as constants.
    """
    names = list(sites)
    values = [jnp.asarray(sites[n]) for n in names]
    data = [np.asarray(a) for a in data]
    closed = _JAXPRS.get(cache_key) if cache_key is not None else None
    if closed is None:
        # a symbolic trace: oracles of EFDistribution sites add no domain check to it
        with trusted_domain():
            try:
                closed = jax.make_jaxpr(lambda d, *vals: log_density(
                    d, dict(zip(names, vals, strict=True))))(data, *values)
            except jax.errors.JAXTypeError:  # Python control flow on data values
                cache_key = None
                closed = jax.make_jaxpr(lambda *vals: log_density(
                    data, dict(zip(names, vals, strict=True))))(*values)
                data = []
        if cache_key is not None:
            _JAXPRS.put(cache_key, closed)
    inputs = [Poly.site(n, tuple(np.shape(sites[n]))) for n in names]
    interpreter = Interpreter(draws, finite_supports)
    (out,) = interpreter.run(closed, [*data, *inputs])
    if isinstance(out, Nonlinear):
        return nonconjugate.shared_predictors(interpreter, out)
    return out.expand() if isinstance(out, Switch) else out


def evaluate_in_numpy(fn: Callable[..., Any], *args: np.ndarray) -> list[np.ndarray]:
    """fn(*args) of numpy arrays through its jaxpr, in numpy where it can (analysis code calls
    small jnp functions on draws: evaluated op by op, each would be an XLA compilation)."""
    with trusted_domain():
        closed = jax.make_jaxpr(fn)(*args)
    return evaluate(closed, args)


MAX_CACHED_JAXPRS = 64
# traced log densities by the caller's key (model, argument structure and shapes)
_JAXPRS: BoundedCache[Any, jcore.ClosedJaxpr] = BoundedCache(MAX_CACHED_JAXPRS)

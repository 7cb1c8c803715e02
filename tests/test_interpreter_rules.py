"""One case per rule of the jaxpr interpreter (``interpreter.RULES``): a tiny log density that
applies the rule's primitive to site values traces to a form equal to the function at random
points; rules that refuse raise NonConjugateError with the reason in words."""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

from numpyro_nnef.infer.algebra import Poly
from numpyro_nnef.infer.interpreter import RULES, NonConjugateError, trace_log_density
from numpyro_nnef.infer.nonconjugate import Nonlinear

NUM_DRAWS = 8
FINITE = {"z": np.arange(3), "c": np.arange(3)}  # discrete sites that may index arrays


def site_draws() -> dict[str, np.ndarray]:
    """x > 0 and w > 0 (so that logs, roots and support checks hold), y real, z and c in {0, 1,
    2}: NUM_DRAWS values of each."""
    rng = np.random.default_rng(0)
    return {"x": rng.uniform(0.5, 2.0, (NUM_DRAWS, 3)), "y": rng.normal(size=(NUM_DRAWS, 3)),
            "w": rng.uniform(0.5, 2.0, (NUM_DRAWS, 2, 3)),
            "z": rng.integers(0, 3, NUM_DRAWS), "c": rng.integers(0, 3, (NUM_DRAWS, 2))}


# copy_p: the name of lax's copy primitive in older JAX versions (now "copy")
COPY_P = jcore.Primitive("copy_p")
COPY_P.def_impl(lambda x: x)
COPY_P.def_abstract_eval(lambda x: x)

A = np.tril(np.random.default_rng(1).normal(size=(3, 3))) + 3 * np.eye(3)
C = np.arange(1.0, 7.0)


def max_pool(v):
    return jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (2,), (2,), "VALID")


@dataclasses.dataclass(frozen=True)
class Case:
    """``fn(s)``: a scalar function of the site values s; ``primitive``: the primitive its jaxpr
    must contain (the rule's key unless said otherwise)."""

    fn: Callable[[dict], jax.Array]
    primitive: str | None = None


def where(predicate: Callable[[dict], jax.Array]) -> Case:
    """x where a site-dependent predicate holds on every draw, else 0."""
    return Case(lambda s: jnp.sum(jnp.where(predicate(s), s["x"], 0.0) * s["y"]))


CASES: dict[str, Case] = {
    # transparent
    "convert_element_type": Case(lambda s: jnp.sum(s["z"].astype(float) * s["x"])),
    "stop_gradient": Case(lambda s: jnp.sum(jax.lax.stop_gradient(s["x"]) * s["y"])),
    "optimization_barrier": Case(lambda s: jnp.sum(jax.lax.optimization_barrier(s["x"]))),
    "copy": Case(lambda s: jnp.sum(jnp.array(s["x"], copy=True) * s["y"])),
    "copy_p": Case(lambda s: jnp.sum(COPY_P.bind(s["x"]) * s["y"])),
    "reduce_precision": Case(lambda s: jnp.sum(jax.lax.reduce_precision(s["x"], 11, 52))),
    # booleans, decided on the draws
    "eq": where(lambda s: s["x"] == s["x"]),
    "ne": where(lambda s: s["x"] != 0.0),
    "lt": where(lambda s: s["x"] < 10.0),
    "le": where(lambda s: s["x"] <= 10.0),
    "gt": where(lambda s: s["x"] > 0.0),
    "ge": where(lambda s: s["x"] >= 0.0),
    "is_finite": where(lambda s: jnp.isfinite(s["x"])),
    "and": where(lambda s: (s["x"] > 0.0) & (s["x"] < 10.0)),
    "or": where(lambda s: (s["x"] > 0.0) | (s["x"] > 10.0)),
    "not": where(lambda s: ~(s["x"] < 0.0)),
    "xor": where(lambda s: (s["x"] > 0.0) ^ (s["x"] < 0.0)),
    "select_n": Case(lambda s: jnp.sum(jnp.where(np.array([True, False, True]), s["x"],
                                                 2.0 * s["y"]))),
    # arithmetic
    "add": Case(lambda s: jnp.sum((s["x"] + s["y"]) * s["x"])),
    "add_any": Case(lambda s: jnp.sum(jax.grad(lambda v: jnp.sum(v * v))(s["x"]) * s["y"])),
    "sub": Case(lambda s: jnp.sum((s["x"] - s["y"]) * s["y"])),
    "neg": Case(lambda s: jnp.sum(-s["x"] * s["y"])),
    "mul": Case(lambda s: jnp.sum(s["x"] * s["y"] * s["w"])),
    "div": Case(lambda s: jnp.sum(s["y"] / s["x"] + 1.0 / s["w"])),
    "integer_pow": Case(lambda s: jnp.sum(s["x"] ** 3 * s["y"])),
    "square": Case(lambda s: jnp.sum(jnp.square(s["y"]))),
    "sqrt": Case(lambda s: jnp.sum(jnp.sqrt(s["x"]) * s["y"])),
    "rsqrt": Case(lambda s: jnp.sum(jax.lax.rsqrt(s["x"]))),
    "pow": Case(lambda s: jnp.sum(s["x"] ** 1.5 * s["y"])),
    "log": Case(lambda s: jnp.sum(jnp.log(2.0 * s["x"]) * s["y"] + jnp.log(s["w"]))),
    "log1p": Case(lambda s: jnp.sum(jnp.log1p(s["x"]))),
    "abs": Case(lambda s: jnp.sum(jnp.abs(-2.0 * s["y"]) * s["x"])),
    "dot_general": Case(lambda s: s["w"] @ s["x"] @ s["y"][:2]),
    "triangular_solve": Case(lambda s: jnp.sum(jax.lax.linalg.triangular_solve(
        A, s["x"][:, None], left_side=True, lower=True) * s["y"][:, None])),
    # structure
    "broadcast_in_dim": Case(lambda s: jnp.sum(jnp.broadcast_to(s["x"], (2, 3)) * s["w"])),
    "transpose": Case(lambda s: jnp.sum(s["w"].T * C.reshape(3, 2))),
    "reduce_sum": Case(lambda s: jnp.sum(s["x"] * C[:3]) * jnp.sum(s["w"], axis=0)[1]),
    "concatenate": Case(lambda s: jnp.concatenate([s["x"], s["y"], np.ones(2)]) @ np.arange(8.0)),
    "stack": Case(lambda s: jnp.sum(jnp.stack([s["x"], s["y"]]) * C.reshape(2, 3))),
    # the operand itself or a constant on every draw, else an elementwise function
    "clamp": Case(lambda s: jnp.sum(jax.lax.clamp(0.0, s["x"], 10.0) * s["y"])),
    "max": Case(lambda s: jnp.sum(jnp.maximum(s["x"], 0.0) * s["y"])),
    "min": Case(lambda s: jnp.sum(jnp.minimum(s["x"], 10.0) * s["y"])),
    "rem": Case(lambda s: jnp.sum(jnp.fmod(s["x"], 10.0) * s["y"])),
    "round": Case(lambda s: jnp.round(s["z"].astype(float)) * s["x"][0]),
    "floor": Case(lambda s: jnp.floor(s["z"].astype(float)) * s["x"][0]),
    "ceil": Case(lambda s: jnp.ceil(s["z"].astype(float) + 0.5) * s["x"][0]),
    "sign": Case(lambda s: jnp.sum(jnp.sign(s["x"]) * s["y"] + jnp.sign(s["y"]))),
    # indexing: by constants (linear), or by a discrete site (by cases)
    "gather": Case(lambda s: jnp.sum(s["x"][np.array([2, 0])]) + jnp.sum(s["y"][s["c"]])),
    "dynamic_slice": Case(lambda s: jnp.sum(jax.lax.dynamic_slice(s["x"], (1,), (2,)))
                          + jnp.log(s["x"][s["z"]])),
    # linear in one operand, read off a basis
    "slice": Case(lambda s: jnp.sum(s["x"][1:] * s["y"][:2])),
    "pad": Case(lambda s: jnp.pad(s["x"], (1, 2)) @ C),
    "rev": Case(lambda s: s["x"][::-1] @ C[:3]),
    "reshape": Case(lambda s: jnp.sum(s["w"].reshape(3, 2) * C.reshape(3, 2))),
    "squeeze": Case(lambda s: jnp.sum(s["x"][None].squeeze(0) * s["y"])),
    "cumsum": Case(lambda s: jnp.cumsum(s["x"]) @ C[:3]),
    "dynamic_update_slice": Case(lambda s: jnp.sum(
        jax.lax.dynamic_update_slice(s["x"], np.ones(2), (1,)) * C[:3]
        + jax.lax.dynamic_update_slice(np.zeros(3), s["y"][:2], (1,)) * s["x"])),
    "select_and_scatter_add": Case(lambda s: jax.vjp(max_pool, jnp.asarray(C[[0, 3, 2, 1, 5, 4]])
                                                     )[1](s["x"])[0] @ C),
}

# a primitive without a rule: an elementwise function of one site is a new atom
DEFAULT_CASES = {"exp": Case(lambda s: jnp.sum(jnp.exp(2.0 * s["x"] + 1.0) * s["y"])),
                 "logistic": Case(lambda s: jnp.sum(jax.nn.sigmoid(s["x"]))),
                 "jit": Case(lambda s: jnp.sum(jax.jit(jnp.sin)(s["x"]))),
                 "custom_jvp_call": Case(lambda s: jnp.sum(jax.nn.relu(s["x"]) * s["y"]))}

# (rule key, log density, words in the error)
REFUSALS = [
    ("select_n", lambda s: jnp.sum(jnp.where(s["x"] > s["y"], s["x"], 0.0)),
     "a branch (where/select) depends on the value of x"),
    ("pow", lambda s: jnp.sum(s["x"] ** s["y"]), "they appear in an exponent"),
    ("pow", lambda s: jnp.sum((s["x"] * s["y"]) ** np.array([1.0, 2.0, 3.0])),
     "they are raised to element-dependent powers"),
    ("log", lambda s: jnp.sum(jnp.log(s["x"] * s["y"] + s["w"][0])),
     "log of a function of several sites (w, x and y)"),
    ("max", lambda s: jnp.sum(jnp.maximum(s["x"], s["y"])), "max of a linear function of x and y"),
    ("triangular_solve", lambda s: jnp.sum(jax.lax.linalg.triangular_solve(
        jnp.diag(s["x"]), np.ones((3, 1)), left_side=True, lower=True)),
     "a triangular system with them in its matrix is solved"),
    ("dynamic_update_slice", lambda s: jnp.sum(jax.lax.dynamic_update_slice(
        s["x"], s["y"][:2], (1,))), "primitive 'dynamic_update_slice' mixes them"),
    ("gather", lambda s: jnp.sum(s["y"][s["x"].astype(int)]),
     "they are used as indices but are not one discrete site with a finite support"),
    ("exp", lambda s: jnp.sum(jnp.exp(s["x"] * s["y"])),
     "exp of a function of several sites (x and y)"),
    ("exp", lambda s: jnp.sum(jnp.exp((s["x"] ** 2) @ C.reshape(3, 2))),
     "it combines several elements of the site, or weighs them differently"),
]

# elementwise functions of a linear predictor: kept as non-conjugate terms (nonconjugate.py)
NONCONJUGATE_TERMS = [
    ("select_n", lambda s: jnp.sum(jnp.where(s["y"] > 0.0, s["y"], 0.0) * C[:3])),
    ("pow", lambda s: jnp.sum(2.0 ** s["x"])),
    ("pow", lambda s: jnp.sum(s["x"] ** np.array([1.0, 2.0, 3.0]))),
    ("log", lambda s: jnp.sum(jnp.log(s["x"] + s["w"][0]))),
    ("exp", lambda s: jnp.sum(jnp.exp(s["x"] + s["y"]))),
    ("exp", lambda s: jnp.sum(jnp.exp(s["x"] @ C.reshape(3, 2)))),
    ("logistic", lambda s: jnp.sum(jax.nn.log_sigmoid(s["y"] @ C.reshape(3, 2)) * C[:2]
                                   + s["y"] @ C[:3])),
]


def primitives(fn: Callable[[dict], jax.Array], values: dict) -> set[str]:
    """The names of the primitives in fn's jaxpr, call primitives' inner jaxprs included."""
    names: set[str] = set()

    def walk(jaxpr: jcore.Jaxpr) -> None:
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for param in eqn.params.values():
                if isinstance(param, jcore.ClosedJaxpr):
                    walk(param.jaxpr)
                elif isinstance(param, jcore.Jaxpr):
                    walk(param)

    walk(jax.make_jaxpr(fn)(values).jaxpr)
    return names


def assert_form_equals_function(name: str, case: Case) -> None:
    draws = site_draws()
    values = {n: v[0] for n, v in draws.items()}
    assert (case.primitive or name) in primitives(case.fn, values)
    form = trace_log_density(lambda data, s: case.fn(s), values, draws, FINITE)
    for k in range(1, 4):
        point = {n: jnp.asarray(v[k]) for n, v in draws.items()}
        value = form.at(point) if isinstance(form, Poly) else form
        np.testing.assert_allclose(float(value), float(case.fn(point)), rtol=1e-9)


def test_every_rule_has_a_case():
    assert set(CASES) == set(RULES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule(name):
    assert_form_equals_function(name, CASES[name])


@pytest.mark.parametrize("name", sorted(DEFAULT_CASES))
def test_primitive_without_a_rule(name):
    assert name not in RULES
    assert_form_equals_function(name, DEFAULT_CASES[name])


@pytest.mark.parametrize("name, fn, words", REFUSALS,
                         ids=[f"{name}-{k}" for k, (name, _, _) in enumerate(REFUSALS)])
def test_refusal(name, fn, words):
    draws = site_draws()
    values = {n: v[0] for n, v in draws.items()}
    assert name in primitives(fn, values)
    with pytest.raises(NonConjugateError, match="not conjugate in site") as info:
        trace_log_density(lambda data, s: fn(s), values, draws, FINITE)
    assert words in str(info.value)


@pytest.mark.parametrize("name, fn", NONCONJUGATE_TERMS,
                         ids=[f"{name}-{k}" for k, (name, _) in enumerate(NONCONJUGATE_TERMS)])
def test_nonconjugate_term(name, fn):
    """An elementwise function of a linear predictor is kept as a term: the traced value equals
    the function at random points."""
    draws = site_draws()
    values = {n: v[0] for n, v in draws.items()}
    form = trace_log_density(lambda data, s: fn(s), values, draws, FINITE)
    assert isinstance(form, Nonlinear)
    for k in range(1, 4):
        point = {n: jnp.asarray(v[k]) for n, v in draws.items()}
        np.testing.assert_allclose(float(form.at(point)), float(fn(point)), rtol=1e-9)

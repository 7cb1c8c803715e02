"""The CAVI kernel: pure functions ``init``, ``step`` (one sweep) and ``elbo`` of one model
structure, in the style of BlackJAX (no state outside their arguments, jit- and loop-able).

A sweep visits the sites from the most factors to the fewest (local before global sites; model
order among equals) and sets each factor to its complete conditional
(``conditional.py``); the ELBO is E_q[log p] + sum_k sum_elements (A_k(eta_k) - eta_k . E[T_k])
(the entropies; the families' base measures are constant).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .conditional import CompleteConditional, complete_conditionals, element_count
from .conjugacy import ConjugateModel

Array = jax.Array

__all__ = ["CAVIState", "CAVIKernel", "cavi_kernel"]


class CAVIState(NamedTuple):
    """mu: each site's expected statistics (batch..., num_stats); eta, mean: its family's
    natural parameter and E[T] (batch..., stat_dim); log_partition: A(eta) (batch...); elbo:
    after the last sweep (-inf before the first); ok: False once a complete conditional left its
    family's natural domain; stalled: per site with non-conjugate terms, whether the last
    sweep's step search found no step that keeps the ELBO from falling."""

    mu: dict[str, Array]
    eta: dict[str, Array]
    mean: dict[str, Array]
    log_partition: dict[str, Array]
    elbo: Array
    ok: dict[str, Array]
    stalled: dict[str, Array] = {}


class CAVIKernel(NamedTuple):
    """``init(mu) -> state`` (factors at the expected statistics ``mu``, e.g. of one point of
    each support), ``step(data, state) -> state`` (one sweep, its ELBO in ``state.elbo``),
    ``elbo(data, state, bound=None) -> ELBO``; ``data`` is the model's
    ``ConjugateModel.data()``."""

    init: Callable[[Mapping[str, np.ndarray]], CAVIState]
    step: Callable[[list[Array], CAVIState], CAVIState]
    elbo: Callable[..., Array]
    conditionals: dict[str, CompleteConditional]


def cavi_kernel(model: ConjugateModel, damping: float = 0.0) -> CAVIKernel:
    """The CAVI kernel of ``model``; ``damping`` rho: eta <- (1 - rho) eta_new + rho eta_old
    after the first sweep (rho = 0: plain coordinate ascent)."""
    if not 0.0 <= damping < 1.0:
        raise ValueError(f"damping must be in [0, 1), got {damping}")
    conditionals = complete_conditionals(model)
    # local sites (many factors, e.g. one per data point) before global ones, as in Blei et
    # al.'s CAVI: the first sweep assigns the locals from the globals' random points, which
    # breaks the symmetry of mixtures instead of averaging random assignments
    order = sorted(conditionals, key=lambda n: -element_count(conditionals[n]))

    def init(mu: Mapping[str, np.ndarray]) -> CAVIState:
        eta, mean, log_z, ok = {}, {}, {}, {}
        for name, cond in conditionals.items():
            batch, dim = cond.site.batch_shape, cond.family.family.stat_dim
            eta[name] = np.zeros((*batch, dim))
            mean[name] = np.zeros((*batch, dim))
            log_z[name] = np.zeros(batch)
            ok[name] = np.asarray(True)
        return CAVIState({n: mu[n] for n in conditionals}, eta, mean, log_z,
                         np.asarray(-np.inf), ok,
                         {n: np.asarray(False) for n, c in conditionals.items() if c.nonconjugate})

    def damped(name: str, eta: Array, state: CAVIState, first: Array, idx=()) -> Array:
        if damping == 0.0:
            return eta
        return jnp.where(first, eta, (1 - damping) * eta + damping * state.eta[name][idx])

    def assign(name: str, state: CAVIState, eta: Array, idx=()) -> CAVIState:
        """Site ``name`` (its element ``idx``; every element for ()) set to natural ``eta``."""
        cond = conditionals[name]
        mean, log_z, ok = cond.factor(eta)

        def put(field: dict[str, Array], value: Array) -> dict[str, Array]:
            return {**field, name: field[name].at[idx].set(value)}

        return state._replace(mu=put(state.mu, cond.family.site_stats(mean)),
                              eta=put(state.eta, eta), mean=put(state.mean, mean),
                              log_partition=put(state.log_partition, log_z),
                              ok={**state.ok, name: state.ok[name] & ok})

    def searched(name: str, data: list[Array], state: CAVIState, first: Array) -> CAVIState:
        """A site with non-conjugate terms: eta <- (1 - rho) eta + rho eta_KM (Knowles-Minka
        message eta_KM), the first rho of 1, 1/2, 1/4, ... whose factor is proper and whose
        ELBO is not lower (conjugate-computation VI's step, Khan & Lin 2017); rho = 1 in the
        first sweep; the state unchanged when no rho is. Only the site's blanket terms and its
        entropy change with its factor, so they alone are compared (the local ELBO)."""
        cond = conditionals[name]
        target, blanket = cond.natural_and_blanket(state.mu, data)
        before = blanket + entropy(name, state)
        slack = ELBO_SLACK_ULPS * jnp.finfo(before.dtype).eps * jnp.maximum(1.0, jnp.abs(before))

        def candidate(carry):
            rho = carry[0] / 2
            eta = jnp.where(first, target, (1 - rho) * state.eta[name] + rho * target)
            new = assign(name, state, eta)
            local = cond.blanket(new.mu, data) + entropy(name, new)
            return rho, new, new.ok[name] & (first | (local >= before - slack))

        # rho = 1, 1/2, ..., MIN_STEP until one is accepted (the carry starts at rho = 2)
        _, new, accepted = jax.lax.while_loop(
            lambda c: ~c[2] & (c[0] > MIN_STEP), candidate,
            (jnp.asarray(2.0), state, jnp.asarray(False)))
        state = jax.tree.map(lambda a, b: jnp.where(accepted, a, b), new, state)
        return state._replace(stalled={**state.stalled, name: ~accepted})

    def entropy(name: str, state: CAVIState) -> Array:
        """H[q_k] up to the base measure: sum over elements of A(eta) - eta . E[T]."""
        return jnp.sum(state.log_partition[name]
                       - jnp.sum(state.eta[name] * state.mean[name], -1))

    def step(data: list[Array], state: CAVIState) -> CAVIState:
        first = ~jnp.isfinite(state.elbo)
        for name in order:
            cond = conditionals[name]
            if cond.nonconjugate:
                state = searched(name, data, state, first)
                continue
            if not cond.sequential:
                eta = damped(name, cond.natural(state.mu, data), state, first)
                state = assign(name, state, eta)
                continue

            def element(i, st, name=name, cond=cond):
                idx = jnp.unravel_index(i, cond.site.batch_shape)
                eta = damped(name, cond.natural(st.mu, data)[idx], st, first, idx)
                return assign(name, st, eta, idx)

            state = jax.lax.fori_loop(0, element_count(cond), element, state)
        return state._replace(elbo=elbo(data, state))

    def elbo(data: list[Array], state: CAVIState, bound: bool | None = None) -> Array:
        """The ELBO (``bound`` None: the model's own, its Polya-Gamma bound when augmented;
        False: q's exact ELBO)."""
        total = model.expected_log_joint(state.mu, data, bound)
        for name in conditionals:
            total = total + entropy(name, state)
        return total

    return CAVIKernel(init, step, elbo, conditionals)


MIN_STEP = 2.0**-10  # the smallest step size the search of a non-conjugate site tries
ELBO_SLACK_ULPS = 16  # rounding allowed in "the ELBO is not lower", in ulps of |ELBO|

"""Complete conditionals: each latent site's mean-field update as a named object.

Under mean field, E_q[log p(x)] is linear in the expected statistics mu_k of every element of
site k (a term never multiplies two statistics of one element), so

    eta_k = B_k^T d E_q[log p] / d mu_k,

the natural parameter of p(x_k | x_-k) averaged over q_-k, depends only on the other sites'
(and the site's other elements') expected statistics. It is computed from the terms of log p
that contain the site (its Markov blanket), never from the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..oracles.base import trusted_domain
from .conjugacy import ConjugateModel, LatentSite, SiteFamily

Array = jax.Array

__all__ = ["CompleteConditional", "complete_conditionals"]


@dataclasses.dataclass(frozen=True, eq=False)
class CompleteConditional:
    """q(x_k) proportional to exp(eta_k . T_k(x_k)) with eta_k = B_k^T d E_q[log p]/d mu_k.

    ``terms``: indices of the model's expected-log-joint terms that contain the site;
    ``neighbours``: the other sites in those terms (the Markov blanket); ``sequential``: the
    terms multiply statistics of two of the site's elements, so its elements are updated one
    after another (each sees the others' new values), else all at once; ``nonconjugate``:
    indices of the model's non-conjugate terms whose predictor holds the site. With those the
    gradient is Knowles & Minka's non-conjugate message (E_q[log p] is then not linear in the
    site's own mu, so the kernel searches a step size along it).
    """

    name: str
    site: LatentSite
    family: SiteFamily
    terms: tuple[int, ...]
    neighbours: tuple[str, ...]
    sequential: bool
    model: ConjugateModel = dataclasses.field(repr=False)
    nonconjugate: tuple[int, ...] = ()

    @property
    def stat_names(self) -> tuple[str, ...]:
        """The site's statistics, in the order of its expected statistics mu_k."""
        return tuple(s.name for s in self.model.stats[self.name])

    def natural(self, mu: Mapping[str, Array], data: list[Array] | None = None) -> Array:
        """eta_k for every element (batch..., stat_dim) from the expected statistics ``mu``
        (site -> (batch..., num_stats)) of the Markov blanket (and of the site itself when it
        is sequential: element i's eta reads the other elements' mu)."""
        return self.natural_and_blanket(mu, data)[0]

    def blanket(self, mu: Mapping[str, Array], data: list[Array] | None = None) -> Array:
        """The terms of E_q[log p] that contain the site (``mu`` holds the site and its
        blanket): the part of E_q[log p] that changes with q_k."""
        data = self.model.data() if data is None else data
        return (self.model.expected_terms(mu, data, self.terms)
                + self.model.expected_nonconjugate(mu, data, self.nonconjugate,
                                                   self.model.augment))

    def natural_and_blanket(self, mu: Mapping[str, Array], data: list[Array] | None = None
                            ) -> tuple[Array, Array]:
        """(``natural``, ``blanket``) from one evaluation of the blanket terms (and their
        gradient in the site's mu); ``blanket`` needs the site's mu in ``mu``."""
        data = self.model.data() if data is None else data
        own = jnp.asarray(mu[self.name]) if self.name in mu else jnp.zeros(
            (*self.site.batch_shape, sum(self.model.stat_sizes(self.name))))
        value, grad = jax.value_and_grad(lambda m: self.blanket({**mu, self.name: m}, data))(own)
        return self.family.natural(grad), value

    def natural_given(self, means: Mapping[str, Array], data: list[Array] | None = None
                      ) -> Array:
        """``natural`` from the neighbours' family means E[T] (site -> (batch..., stat_dim)),
        in each family's own statistics, as a textbook writes the conditional."""
        mu = {n: self.model.families[n].site_stats(jnp.asarray(m)) for n, m in means.items()}
        missing = sorted(set(self.neighbours) - set(mu))
        if missing:
            raise ValueError(f"the conditional of {self.name!r} needs the means of {missing}")
        return self.natural(mu, data)

    def factor(self, eta: Array) -> tuple[Array, Array, Array]:
        """(E[T], A(eta), inside the natural domain) of the factor with natural parameter
        ``eta``; outside the domain the mean and A are those of the oracle's default point."""
        oracle = self.family.oracle
        ok = jnp.all(self.family.family.in_domain(eta))
        safe = jnp.where(ok, eta, jnp.asarray(oracle.default_init(), eta.dtype))
        with trusted_domain():  # safe is inside: no domain check in the compiled sweep
            mean, log_partition = oracle.mean_and_log_partition(safe)
        return mean, log_partition, ok


def complete_conditionals(model: ConjugateModel) -> dict[str, CompleteConditional]:
    """One complete conditional per latent site, in model order."""
    containing: dict[str, list[int]] = {n: [] for n in model.sites}
    blanket: dict[str, set[str]] = {n: set() for n in model.sites}
    for index, term in enumerate(model.terms):
        names = {site for site, *_ in term.factors}
        for name in names:
            containing[name].append(index)
            blanket[name] |= names - {name}
    nonconjugate: dict[str, list[int]] = {n: [] for n in model.sites}
    for index, term in enumerate(model.nonconjugate):
        for name in term.sites:
            nonconjugate[name].append(index)
            blanket[name] |= set(term.sites) - {name}
    return {name: CompleteConditional(
        name, site, model.families[name], tuple(containing[name]), tuple(sorted(blanket[name])),
        bool(model.self_coupled[name] and site.batch_shape and not nonconjugate[name]), model,
        tuple(nonconjugate[name]))
        for name, site in model.sites.items()}


def element_count(conditional: CompleteConditional) -> int:
    """The number of the site's factors (elements)."""
    return int(np.prod(conditional.site.batch_shape))

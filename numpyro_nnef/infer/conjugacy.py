"""Conjugacy analysis of a NumPyro model: its latent sites, their statistics, their families.

``analyse_model`` traces the model, rewrites its log joint into einsum terms in per-site
statistics (``interpreter.py``, into the multilinear form of ``algebra.py``), and returns a
:class:`ConjugateModel` whose ``expected_log_joint(mu)`` is E_q[log p(x)] under the mean-field
q, exact because the log joint is multilinear in the statistics of distinct elements:

- every latent site is factorised over its elements (its batch axes, and the axes an
  ``Independent``/``to_event`` wrapper adds); an element is one draw of the innermost base
  distribution (a scalar for Normal, a vector for Dirichlet and MultivariateNormal), except
  that the event of a ``.to_event(1)`` over a real scalar base is one vector element when the
  log density multiplies two of its coordinates and its statistics are then Gaussian (x, x^2,
  x x^T: one full-covariance MultivariateNormal factor per event); otherwise its coordinates
  are the elements (``event_elements``);
- a product of two factors of one site at different elements, c_ij s_a(x_i) s_b(x_j), has
  expectation sum_ij c_ij mu_a,i mu_b,j - sum_i c_ii mu_a,i mu_b,i + sum_i c_ii E[s_a s_b](x_i):
  the diagonal is rewritten into the product statistic s_a s_b of one element, for vector
  elements the outer product s_a(x_i)_e s_b(x_i)_f over the two factors' coordinates (e, f).

Each site's statistics are matched to a family by a least-squares fit on draws from the site's
support: s(x) = B T(x) + c exactly, so that eta_family = B^T d ELJ / d mu_s and mu_s = B mu + c.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.infer.util import log_density

from .. import families
from ..family import ExponentialFamily, NaturalDomain
from ..oracles import ExactOracle, QuadratureOracle
from .algebra import X_ATOM, Factor, Poly, Stat, Term, as_poly, outer
from .cache import BoundedCache
from .interpreter import REMEDY, NonConjugateError, describe, evaluate_in_numpy, trace_log_density
from .nonconjugate import NonconjugateTerm, Nonlinear

Array = jax.Array
logger = logging.getLogger("numpyro_nnef")

__all__ = ["LatentSite", "SiteFamily", "ConjugateModel", "analyse_model", "NonConjugateError"]

NUM_DRAWS = 32  # support draws for support checks and family matching
FIT_TOLERANCE = 1e-7
# built-in families with exact oracles that CAVI may assign to a site, tried smallest first
NAMED_FAMILIES = ("Gaussian", "GaussLaplace", "Gamma", "Exponential", "InverseGamma",
                  "RectifiedGaussian", "Beta", "VonMises", "Bernoulli", "Categorical",
                  "Dirichlet", "Poisson", "MultivariateNormal", "GIG", "SqrtGIG")


@dataclasses.dataclass(frozen=True)
class LatentSite:
    """A latent sample site: its value's shape split into element axes (factorised) and the
    element's own shape (one q factor per element): the base distribution's event shape, or
    the whole event for a Gaussian ``.to_event(1)`` site (see ``event_elements``)."""

    name: str
    shape: tuple[int, ...]
    element_shape: tuple[int, ...]
    support: constraints.Constraint
    prior: dist.Distribution

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.shape[: len(self.shape) - len(self.element_shape)]


def _base_distribution(fn: dist.Distribution) -> dist.Distribution:
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def support_draws(fn: dist.Distribution, num: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` random points of the support of ``fn``, shape (num, *fn.shape()): the image of
    standard normal draws under biject_to(support), or uniform integers for discrete supports
    (no sampler is compiled: only the support is used)."""
    shape = tuple(fn.shape())
    support = fn.support
    if support.is_discrete:
        low = int(np.min(np.asarray(getattr(support, "lower_bound", 0))))
        high = int(np.max(np.asarray(getattr(support, "upper_bound", low + 20))))
        if support is constraints.boolean:
            low, high = 0, 1
        return rng.integers(low, high + 1, size=(num, *shape))
    base = support.base_constraint if isinstance(support, constraints.independent) else support
    u = rng.normal(size=(num, *shape))
    if base is constraints.real:
        return u
    if base is constraints.positive or base is constraints.nonnegative:
        return np.exp(u)
    if base is constraints.unit_interval:
        return 1.0 / (1.0 + np.exp(-u))
    if base is constraints.simplex:
        return rng.dirichlet(np.ones(shape[-1]), size=(num, *shape[:-1]))
    transform = biject_to(support)
    u = rng.normal(size=(num, *transform.inverse_shape(shape)))
    return np.asarray(transform(jnp.asarray(u)))


def model_sites(model: Callable, args: tuple, kwargs: dict, key: Array
                ) -> tuple[dict[str, LatentSite], dict[str, dict], dict[str, np.ndarray]]:
    """(latent sites in the model's order, a model trace, NUM_DRAWS support draws per site)
    with checks on observed data. Latent values come from ``support_draws``, not the prior's
    sampler, so nothing is sampled (samplers such as Gamma's are slow to compile)."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    draws: dict[str, np.ndarray] = {}

    def draw(msg):
        if msg["type"] != "sample" or msg["is_observed"]:
            return None
        draws[msg["name"]] = support_draws(msg["fn"], NUM_DRAWS + 1, rng)
        return draws[msg["name"]][0]

    # every latent value is substituted, so no random key is needed. The model runs under
    # make_jaxpr: values it computes are abstract (op by op, each would be an XLA compilation);
    # sites, shapes, supports and the arguments stay concrete. Validation is off (the analysis
    # checks the data itself).
    traced = handlers.substitute(model, substitute_fn=draw)
    trace: dict[str, dict] = {}
    try:
        with numpyro.validation_enabled(False):
            jax.make_jaxpr(lambda: trace.update(handlers.trace(traced).get_trace(
                *args, **kwargs)))()
    except ValueError as err:
        raise ValueError(f"running the model with these arguments failed: {err}. Check that "
                         "every plate's size matches the data observed inside it.") from err
    latent: dict[str, LatentSite] = {}
    for name, site in trace.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            value = site["value"]
            if not isinstance(value, jax.core.Tracer):  # else computed by the model: abstract
                value = np.asarray(value)
                if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                    raise ValueError(
                        f"observed site {name!r} contains NaN or infinite values "
                        f"({int((~np.isfinite(value)).sum())} of {value.size}); remove or mask "
                        f"them")
            expected = tuple(site["fn"].shape())
            try:
                fits = np.broadcast_shapes(value.shape, expected) == expected
            except ValueError:
                fits = False
            if not fits:
                raise ValueError(
                    f"observed site {name!r}: data of shape {value.shape} where the model's "
                    f"distribution (inside its plates) has shape {expected}. Check that every "
                    f"plate's size matches the data observed inside it.")
            continue
        base = _base_distribution(site["fn"])
        value = np.asarray(site["value"])
        latent[name] = LatentSite(name, value.shape, tuple(base.event_shape),
                                  site["fn"].support, site["fn"])
    if not latent:
        raise ValueError("the model has no latent sample sites: nothing to infer")
    return latent, trace, {n: draws[n][1:] for n in latent}


def check_finite_arguments(model: Callable, args: tuple, kwargs: dict) -> None:
    """ValueError naming every floating-point array argument of the model (covariates included,
    at any depth of a pytree) that holds NaN or infinite values, with their count."""
    try:
        bound = inspect.signature(model).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):  # no signature, or one that does not take these arguments
        bound = {**{f"#{i}": a for i, a in enumerate(args)}, **kwargs}
    bad = []
    for name, value in bound.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
            if not isinstance(leaf, (np.ndarray, jax.Array, float)):
                continue
            leaf = np.asarray(leaf)
            if leaf.dtype.kind not in "fc":
                continue
            count = int((~np.isfinite(leaf)).sum())
            if count:
                label = (f"argument {int(name[1:])}" if name.startswith("#")
                         else f"argument {name!r}") + jax.tree_util.keystr(path)
                bad.append(f"{label} ({count} of {leaf.size} values)")
    if bad:
        raise ValueError(f"NaN or infinite values in the model's data: {'; '.join(bad)}. CAVI "
                         f"needs finite data: impute, drop or mask them")


def finite_supports(sites: Mapping[str, LatentSite]) -> dict[str, np.ndarray]:
    """The values of every site with a finite integer support (Categorical, Bernoulli, ...)."""
    out = {}
    for name, site in sites.items():
        support = site.support
        if support is constraints.boolean:
            out[name] = np.arange(2)
        elif hasattr(support, "lower_bound") and hasattr(support, "upper_bound") and (
                getattr(support, "is_discrete", False)):
            out[name] = np.arange(int(support.lower_bound), int(support.upper_bound) + 1)
    return out


# ----------------------------------------------------------------------------- families


@dataclasses.dataclass
class SiteFamily:
    """A site's family and the affine map between the site's statistics and the family's:
    s(x) = B T(x) + c (s flattened to ``num_stats`` numbers per element)."""

    family: ExponentialFamily
    oracle: Any
    B: np.ndarray  # (num_stats, stat_dim)
    c: np.ndarray  # (num_stats,)

    def natural(self, grad_s: Array) -> Array:
        """eta = B^T d ELJ / d s, per element: (..., num_stats) -> (..., stat_dim)."""
        return grad_s @ jnp.asarray(self.B)

    def site_stats(self, mean: Array) -> Array:
        """E[s] = B E[T] + c, per element."""
        return mean @ jnp.asarray(self.B).T + jnp.asarray(self.c)


def _base_constraint(support: constraints.Constraint) -> constraints.Constraint:
    """The constraint on each coordinate: an independent-event support's base constraint."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support


def _compatible(site_support: constraints.Constraint, family: ExponentialFamily) -> bool:
    """Whether the family's support is the site's (independent-event supports compare like
    their base supports; element shapes are checked by the caller)."""
    site_support, family_support = _base_constraint(site_support), _base_constraint(
        family.support)
    a, b = type(site_support).__name__, type(family_support).__name__
    positive = {"_GreaterThan", "_Positive", "_GreaterThanEq", "_Nonnegative"}
    if a in positive and b in positive:
        return True
    if a != b:
        return False
    if hasattr(site_support, "upper_bound") and hasattr(family_support, "upper_bound"):
        return np.all(np.asarray(site_support.upper_bound) == np.asarray(
            family_support.upper_bound)) and np.all(np.asarray(site_support.lower_bound) ==
                                                     np.asarray(family_support.lower_bound))
    return True


def candidate_families(site: LatentSite) -> list[ExponentialFamily]:
    """Built-in families with an exact oracle whose support and element shape fit the site."""
    base = _base_distribution(site.prior)
    k = site.element_shape[0] if site.element_shape else None
    out: list[ExponentialFamily] = []
    for name in NAMED_FAMILIES:
        if name not in families.REGISTRY:
            continue
        if name == "Categorical":
            if not hasattr(base.support, "upper_bound"):
                continue
            fam = families.get_family(name, num_categories=int(base.support.upper_bound) + 1)
        elif name in ("Dirichlet", "MultivariateNormal"):
            if k is None:
                continue
            fam = families.get_family(name, dim=k)
        else:
            fam = families.get_family(name)
        if tuple(fam.event_shape) == site.element_shape and _compatible(site.support, fam):
            out.append(fam)
    return sorted(out, key=lambda f: f.stat_dim)


def fit_statistics(stats: Callable[[np.ndarray], np.ndarray], family: ExponentialFamily,
                   elements: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(B, c) with stats(x) = B T(x) + c on every element draw (``stats`` maps a batch of
    elements to (N, num_stats)), or None when no exact fit."""
    s = np.asarray(stats(elements))
    (t,) = evaluate_in_numpy(family.sufficient_statistics, elements)
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(t))):
        return None
    design = np.concatenate([t, np.ones((len(t), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, s, rcond=None)
    resid = np.abs(design @ coef - s).max()
    if resid > FIT_TOLERANCE * max(1.0, np.abs(s).max()):
        return None
    # the exact coefficients are simple numbers: drop the least-squares round-off (it would
    # also make the fit, and so the compiled program's cache key, depend on the draws)
    coef = np.round(coef, 9) + 0.0
    return coef[:-1].T, coef[-1]


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass
class ExpandedTerm:
    """einsum of constant operands and expectations: ``factors`` are (site, stat index, labels),
    multilinear in the per-element expectations (a factor is never multiplied by itself)."""

    operands: tuple[tuple[np.ndarray, tuple[int, ...]], ...]
    factors: tuple[tuple[str, int, tuple[int, ...]], ...]


@dataclasses.dataclass
class ConjugateModel:
    """The mean-field form of a model: sites, their statistics and families, and E_q[log p]."""

    sites: dict[str, LatentSite]
    stats: dict[str, list[Stat]]
    terms: list[ExpandedTerm]
    constant: float
    families: dict[str, SiteFamily]
    self_coupled: dict[str, bool]
    initial_values: dict[str, np.ndarray]  # one random point of every site's support
    # sum_s w_s f(a_s) of a linear predictor a: expectations by Gauss-Hermite (nonconjugate.py)
    nonconjugate: list[NonconjugateTerm] = dataclasses.field(default_factory=list)
    # logistic terms by their Polya-Gamma bound in E_q[log p] (the augmented model's ELBO)
    augment: bool = False

    def site_stat_batch(self, name: str, elements: np.ndarray) -> np.ndarray:
        """The statistics of a batch of elements (N, *element_shape) -> (N, num_stats), in
        numpy where the statistics are elementwise (nothing to compile)."""
        elements = np.asarray(elements)
        parts = []
        for stat in self.stats[name]:
            if all(a.elementwise for a, _ in stat.atoms):
                value = np.asarray(stat(elements))
            else:
                (value,) = evaluate_in_numpy(jax.vmap(stat), elements)
            parts.append(value.reshape(len(elements), -1))
        return np.concatenate(parts, axis=1)

    def stat_shapes(self, name: str) -> list[tuple[int, ...]]:
        """The shape of each of the site's statistics on one element."""
        shapes = self.__dict__.setdefault("_stat_shapes", {})
        if name not in shapes:
            probe = np.full(self.sites[name].element_shape, 0.5)
            shapes[name] = [tuple(jax.eval_shape(s, probe).shape) for s in self.stats[name]]
        return shapes[name]

    def stat_sizes(self, name: str) -> list[int]:
        """How many numbers each of the site's statistics has per element."""
        return [int(np.prod(shape)) for shape in self.stat_shapes(name)]

    def split(self, name: str, flat: Array) -> list[Array]:
        """(batch..., num_stats) -> one array per statistic, (batch..., *stat element shape)."""
        batch = self.sites[name].batch_shape
        out, start = [], 0
        for shape, size in zip(self.stat_shapes(name), self.stat_sizes(name), strict=True):
            out.append(flat[..., start:start + size].reshape((*batch, *shape)))
            start += size
        return out

    def data(self) -> list[np.ndarray]:
        """The data-dependent constants: every term's operands, then the constant of log p. They
        are arguments (not constants) of the compiled CAVI loop, so new data of the same shapes
        reuses the compilation."""
        return ([a for t in self.terms for a, _ in t.operands]
                + [a for t in self.nonconjugate for a in t.data()] + [np.asarray(self.constant)])

    def signature(self) -> tuple:
        """Hashable structure: equal signatures give the same CAVI program (given ``data``)."""
        terms = tuple((tuple((a.shape, lab) for a, lab in t.operands), t.factors)
                      for t in self.terms)
        sites = tuple((n, s.shape, s.element_shape, self.self_coupled[n],
                       tuple(st.name for st in self.stats[n])) for n, s in self.sites.items())
        fams = tuple((n, f.family.cache_key(), f.B.tobytes(), f.c.tobytes(), oracle_key(f.oracle))
                     for n, f in self.families.items())
        return (terms, sites, fams, tuple(t.structure() for t in self.nonconjugate),
                self.augment)

    def expected_log_joint(self, mu: Mapping[str, Array], data: list[Array] | None = None,
                           bound: bool | None = None) -> Array:
        """E_q[log p(x)] from every site's expected statistics mu[site] (batch..., num_stats);
        ``data`` replaces ``self.data()`` (same shapes); ``bound`` (default ``augment``): the
        logistic terms by their Polya-Gamma bound."""
        data = self.data() if data is None else data
        bound = self.augment if bound is None else bound
        return (jnp.asarray(data[-1]) + self.expected_terms(mu, data, range(len(self.terms)))
                + self.expected_nonconjugate(mu, data, range(len(self.nonconjugate)), bound))

    def expected_nonconjugate(self, mu: Mapping[str, Array], data: list[Array],
                              indices: Iterable[int], bound: bool = False) -> Array:
        """The sum of the non-conjugate terms ``indices`` of E_q[log p]; ``mu`` needs only the
        sites in their predictors; ``bound``: logistic terms by their Polya-Gamma bound."""
        start = sum(len(t.operands) for t in self.terms)
        starts = np.cumsum([start] + [len(t.data()) for t in self.nonconjugate])
        total = jnp.zeros(())
        for index in indices:
            term = self.nonconjugate[index]
            moments = {n: self.moments(n, mu[n]) for n in term.sites}
            total = total + term.expected(moments, data[starts[index]:starts[index + 1]], bound)
        return total

    def moments(self, name: str, mu: Array) -> tuple[Array, Array]:
        """(E[x], Var[x]) per element of a site with scalar elements (site shape each), or
        (E[x], Cov[x]) for vector elements (batch + (d,), batch + (d, d)), from its expected
        statistics (which hold x and x^2, or x and x x^T)."""
        parts = dict(zip((s.name for s in self.stats[name]), self.split(name, mu), strict=True))
        mean = parts["x"]
        if self.sites[name].element_shape:
            return mean, parts["outer(x,x)"] - mean[..., :, None] * mean[..., None, :]
        return mean, parts["x^2"] - mean**2

    def expected_terms(self, mu: Mapping[str, Array], data: list[Array],
                       indices: Iterable[int]) -> Array:
        """The sum of the terms ``indices`` of E_q[log p] (without its constant); ``mu`` needs
        only the sites in those terms."""
        starts = np.cumsum([0] + [len(t.operands) for t in self.terms])
        parts: dict[str, list[Array]] = {}
        total = jnp.zeros(())
        for index in indices:
            term = self.terms[index]
            args: list[Any] = []
            for position, (_, labels) in enumerate(term.operands, start=int(starts[index])):
                args += [jnp.asarray(data[position]), list(labels)]
            for site, k, labels in term.factors:
                if site not in parts:
                    parts[site] = self.split(site, mu[site])
                args += [parts[site][k], list(labels)]
            total = total + jnp.einsum(*args, [], optimize="greedy")
        return total


def oracle_key(oracle: Any) -> tuple:
    """Exact oracles of equal families are interchangeable; any other oracle is itself."""
    if isinstance(oracle, ExactOracle):
        return ("exact", oracle.family.cache_key())
    return ("object", id(oracle))


def _expand(term: Term, sites: Mapping[str, LatentSite], stat_index: Callable[[str, Stat], int]
            ) -> list[ExpandedTerm]:
    """A symbolic term as signed multilinear terms in expectations (diagonals rewritten).

    Two factors of one site at elements i and j: s_a(x_i) s_b(x_j) = [i != j] s_a(x_i) s_b(x_j)
    + [i = j] (s_a s_b)(x_i), whose expectation is mu_a,i mu_b,j - [i = j] mu_a,i mu_b,i
    + [i = j] E[s_a s_b](x_i). The diagonal renames j onto i in the WHOLE term (operands, the
    factors already expanded and those of sites still to expand), so a bilinear term such as
    (sum_k z_k w_k)^2 gets its diagonal in z and in w, and their product. For a vector element
    (labels: batch axes, then one event axis) the element's product statistic at coordinates
    (e, f) is outer(s_a, s_b)(x_i)[e, f] = s_a(x_i)[e] s_b(x_i)[f].
    """
    out: list[ExpandedTerm] = []

    def rename(mapping, ops, done, todo):
        m = lambda lab: tuple(mapping.get(i, i) for i in lab)  # noqa: E731
        return (tuple((a, m(lab)) for a, lab in ops),
                [(n, k, m(lab)) for n, k, lab in done],
                [Factor(f.site, f.stat, m(f.labels)) for f in todo])

    def expand(sign, ops, done, todo):
        if not todo:
            out.append(canonical(ExpandedTerm(ops + ((np.asarray(sign), ()),), tuple(done))))
            return
        name = todo[0].site
        rank = len(sites[name].element_shape)
        mine = [f for f in todo if f.site == name]
        rest = [f for f in todo if f.site != name]
        # factors at the same element are one statistic
        merged: dict[tuple[int, ...], Stat] = {}
        for f in mine:
            merged[f.labels] = merged[f.labels] * f.stat if f.labels in merged else f.stat
        mine = [Factor(name, st, lab) for lab, st in merged.items() if not st.is_one]
        if len(mine) <= 1:
            expand(sign, ops, done + [(name, stat_index(name, f.stat), f.labels) for f in mine],
                   rest)
            return
        if len(mine) > 2 or rank > 1:
            raise NonConjugateError(
                f"site {name!r}: a term multiplies {len(mine)} factors of it at different "
                f"elements ({', '.join(f.stat.name for f in mine)}); mean-field CAVI handles at "
                f"most pairwise products of scalar or vector elements of one site")
        a, b = sorted(mine, key=lambda f: f.stat.name) if rank else mine
        batch = len(a.labels) - rank
        if rank and a.labels[:batch] == b.labels[:batch]:  # two coordinates of one element
            outer_factor = Factor(name, outer(a.stat, b.stat), a.labels + b.labels[batch:])
            expand(sign, ops, done, [outer_factor] + rest)
            return
        expand(sign, ops, done + [(name, stat_index(name, a.stat), a.labels),
                                  (name, stat_index(name, b.stat), b.labels)], rest)
        diag = dict(zip(b.labels[:batch], a.labels[:batch], strict=True))
        dops, ddone, drest = rename(diag, ops, done, rest)
        b_diag = a.labels[:batch] + tuple(diag.get(i, i) for i in b.labels[batch:])
        expand(-sign, dops, ddone + [(name, stat_index(name, a.stat), a.labels),
                                     (name, stat_index(name, b.stat), b_diag)], drest)
        expand(sign, dops, ddone, [a, Factor(name, b.stat, b_diag)] + drest)

    expand(1.0, term.operands, [], list(term.factors))
    return out


MAX_DENSE = 4_000_000  # entries of a term's precontracted coefficient array


def contract_operands(term: ExpandedTerm) -> ExpandedTerm:
    """The term with its constant operands contracted into one array over the labels the
    factors use (e.g. X_ni X_nj -> (X^T X)_ij), when that array is not too large: the compiled
    CAVI program then has fewer, cheaper einsums."""
    sizes: dict[int, int] = {}
    for a, lab in term.operands:
        sizes.update(zip(lab, np.shape(a), strict=True))
    factor_labels = list(dict.fromkeys(i for *_, lab in term.factors for i in lab))
    keep = [i for i in factor_labels if i in sizes]
    if int(np.prod([sizes[i] for i in keep])) > MAX_DENSE:
        return term
    args: list[Any] = []
    for a, lab in term.operands:
        args += [np.asarray(a, dtype=np.float64), list(lab)]
    dense = np.einsum(*args, keep, optimize=True)
    return canonical(ExpandedTerm(((dense, tuple(keep)),), term.factors))


def merge_terms(terms: list[ExpandedTerm]) -> list[ExpandedTerm]:
    """Terms with one operand and the same factors and labels, summed into one."""
    merged: dict[tuple, ExpandedTerm] = {}
    rest = []
    for t in terms:
        if len(t.operands) != 1:
            rest.append(t)
            continue
        (a, lab), = t.operands
        key = (lab, np.shape(a), t.factors)
        if key in merged:
            b = merged[key].operands[0][0]
            merged[key] = ExpandedTerm(((b + a, lab),), t.factors)
        else:
            merged[key] = t
    return list(merged.values()) + rest


def canonical(term: ExpandedTerm) -> ExpandedTerm:
    """The term with its einsum labels renamed 0, 1, ... in order of first appearance."""
    index: dict[int, int] = {}
    for lab in [lab for _, lab in term.operands] + [lab for *_, lab in term.factors]:
        for i in lab:
            index.setdefault(i, len(index))
    return ExpandedTerm(
        tuple((np.asarray(a), tuple(index[i] for i in lab)) for a, lab in term.operands),
        tuple((s, k, tuple(index[i] for i in lab)) for s, k, lab in term.factors))


def analyse_model(
    model: Callable,
    *args: Any,
    key: Array,
    oracles: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> ConjugateModel:
    """Trace ``model(*args, **kwargs)`` and return its mean-field :class:`ConjugateModel`.

    ``oracles`` maps site names to user-supplied oracles (their family must span the site's
    statistics); every other site gets the smallest built-in named family that does.
    """
    oracles = dict(oracles or {})
    sites, trace, draws = model_sites(model, args, kwargs, key)  # names NaN in observed sites
    check_finite_arguments(model, args, kwargs)
    unknown = set(oracles) - set(sites)
    if unknown:
        raise ValueError(f"oracles given for {sorted(unknown)}, which are not latent sites of "
                         f"the model (latent: {sorted(sites)})")
    values = {n: np.asarray(trace[n]["value"]) for n in sites}
    leaves, treedef = jax.tree.flatten((args, kwargs))
    is_array = [isinstance(x, (np.ndarray, jax.Array)) for x in leaves]
    data = [np.asarray(x) for x, a in zip(leaves, is_array, strict=True) if a]

    def log_joint(arrays, vals):
        arrays = iter(arrays)
        a, k = jax.tree.unflatten(treedef, [next(arrays) if is_arr else x
                                            for x, is_arr in zip(leaves, is_array, strict=True)])
        return log_density(model, a, k, vals)[0]

    statics = tuple(None if a else x for x, a in zip(leaves, is_array, strict=True))
    cache_key = (model, treedef, statics, tuple((d.shape, d.dtype.str) for d in data),
                 tuple((n, v.shape) for n, v in values.items()))
    try:
        hash(cache_key)
    except TypeError:  # an unhashable static argument: no caching
        cache_key = None
    try:
        poly = trace_log_density(log_joint, values, draws, finite_supports(sites), data,
                                 cache_key)
    except NonConjugateError as err:
        raise locate_non_conjugacy(model, args, kwargs, trace, values, draws,
                                   finite_supports(sites), err) from err
    nonconjugate: list[NonconjugateTerm] = []
    if isinstance(poly, Nonlinear):
        by_predictor: dict[int, list] = {}
        for t in poly.terms:
            by_predictor.setdefault(id(t.arg), []).append(t)
        nonconjugate = [NonconjugateTerm.of(ts) for ts in by_predictor.values()]
        poly = as_poly(poly.poly, ())
        check_predictor_sites(nonconjugate, sites)
    if not isinstance(poly, Poly):
        raise ValueError("the model's log density does not depend on its latent sites")
    scalar_sites = sites
    vector = event_elements(sites, poly, oracles)
    sites = {n: dataclasses.replace(s, element_shape=tuple(s.prior.event_shape)) if n in vector
             else s for n, s in sites.items()}
    terms, stats, self_coupled = expand_terms(poly, sites, nonconjugate)
    not_gaussian = {n for n in vector if n not in oracles and not gaussian_statistics(stats[n])}
    if not_gaussian:  # these events stay factorised into their scalar coordinates
        sites = {n: scalar_sites[n] if n in not_gaussian else s for n, s in sites.items()}
        terms, stats, self_coupled = expand_terms(poly, sites, nonconjugate)
    missing = [n for n, s in stats.items() if not s]
    if missing:
        raise ValueError(f"latent site(s) {missing} do not appear in the log density")
    model_ = ConjugateModel(sites, stats, terms, float(np.sum(poly.constant)), {}, self_coupled,
                            values, nonconjugate)
    for name, site in sites.items():
        model_.families[name] = resolve_family(model_, site, draws[name], oracles.get(name))
    return model_


def expand_terms(poly: Poly, sites: Mapping[str, LatentSite],
                 nonconjugate: Sequence[NonconjugateTerm] = ()
                 ) -> tuple[list[ExpandedTerm], dict[str, list[Stat]], dict[str, bool]]:
    """(the multilinear terms of E_q[log p], every site's statistics, whether a term multiplies
    two of a site's factors) for the elements that ``sites`` define; a site in the predictor of
    a non-conjugate term also gets the statistics of its mean and variance (x and x^2, or x and
    x x^T for a vector element)."""
    stats: dict[str, list[Stat]] = {n: [] for n in sites}

    def stat_index(name: str, stat: Stat) -> int:
        if stat not in stats[name]:
            stats[name].append(stat)
        return stats[name].index(stat)

    terms = [e for term in poly.terms for e in _expand(term, sites, stat_index)]
    x = Stat.of(X_ATOM)
    for name in sorted({n for t in nonconjugate for n in t.sites}):
        stat_index(name, x)
        stat_index(name, outer(x, x) if sites[name].element_shape else Stat.of(X_ATOM, 2))
    self_coupled = dict.fromkeys(sites, False)
    for term in terms:
        names = [n for n, *_ in term.factors]
        for name in set(names):
            self_coupled[name] |= names.count(name) > 1
    return merge_terms([contract_operands(t) for t in terms]), stats, self_coupled


def event_elements(sites: Mapping[str, LatentSite], poly: Poly, oracles: Mapping[str, Any]
                   ) -> set[str]:
    """Sites whose event, one axis over a scalar real base (``Normal(...).to_event(1)``), is a
    candidate vector element: the log density multiplies two of its coordinates (x_i x_j), or
    the user's oracle is for the whole event. The candidate stays a vector element when its
    statistics are Gaussian (x, x^2, x x^T: one MultivariateNormal factor per event), else
    its coordinates are the elements; an oracle's event shape decides for its site."""
    out = set()
    for name, site in sites.items():
        event = tuple(site.prior.event_shape)
        if site.element_shape or len(event) != 1 or _base_constraint(site.support) is not (
                constraints.real):
            continue
        if name in oracles:
            if tuple(oracles[name].family.event_shape) == event:
                out.add(name)
            continue
        if any(f.site == g.site == name and f.labels[-1] != g.labels[-1]
               for t in poly.terms for f, g in itertools.combinations(t.factors, 2)):
            out.add(name)
    return out


def check_predictor_sites(nonconjugate: Sequence[NonconjugateTerm],
                          sites: Mapping[str, LatentSite]) -> None:
    """Non-conjugate terms need real-valued sites in their predictors (a Gaussian under q)."""
    for term in nonconjugate:
        bad = [n for n in term.sites if _base_constraint(sites[n].support) is not constraints.real]
        if bad:
            raise NonConjugateError(
                f"the log joint is not conjugate in site(s) {bad}: it contains {term.words}, "
                f"a non-conjugate term that CAVI handles only for sites with real support (a "
                f"Gaussian linear predictor); {bad[0]!r} has support {sites[bad[0]].support}",
                bad, term.words, term.words)


GAUSSIAN_STATISTICS = frozenset({"x", "x^2", "outer(x,x)"})


def gaussian_statistics(stats: list[Stat]) -> bool:
    """Whether a vector element's statistics are spanned by a Gaussian's (x, x x^T)."""
    return {s.name for s in stats} <= GAUSSIAN_STATISTICS


def fit_elements(site: LatentSite, elements: np.ndarray, stat_dim: int) -> np.ndarray:
    """``elements`` topped up to 2 (stat_dim + 1) with draws of the site's support (fixed
    seed): an exact least-squares fit with fewer draws than coefficients proves nothing."""
    need = 2 * (stat_dim + 1) - len(elements)
    if need <= 0:
        return elements
    per_draw = max(int(np.prod(site.batch_shape)), 1)
    extra = support_draws(site.prior, -(-need // per_draw), np.random.default_rng(0))
    return np.concatenate([elements, extra.reshape((-1, *site.element_shape))])


# distributions whose log density is a log-sigmoid / log-softmax of their logits
_LOGIT_WORDS = {"BernoulliLogits": "log-sigmoid", "BinomialLogits": "log-sigmoid",
                "CategoricalLogits": "log-softmax", "MultinomialLogits": "log-softmax"}


def locate_non_conjugacy(model: Callable, args: tuple, kwargs: dict, trace: dict,
                         values: Mapping[str, np.ndarray], draws: Mapping[str, np.ndarray],
                         finite: Mapping[str, np.ndarray], err: NonConjugateError
                         ) -> NonConjugateError:
    """``err`` restated for the sample site whose own log density is not conjugate: that
    site, its distribution, and the term in words (log-sigmoid of the logits of a Bernoulli,
    exp of the linear predictor of a Poisson, ...); ``err`` itself when no single site's term
    is (the model's log joint is not one sum of site terms)."""

    def site_value(name: str, what: Callable[[dict], Array]) -> Callable:
        def fn(_data, vals):
            with numpyro.validation_enabled(False):
                tr = handlers.trace(handlers.substitute(model, data=vals)).get_trace(
                    *args, **kwargs)
            return what(tr[name])
        return fn

    for name, site in trace.items():
        if site["type"] != "sample":
            continue
        log_prob = site_value(name, lambda s: jnp.sum(s["fn"].log_prob(s["value"])))
        try:
            trace_log_density(log_prob, values, draws, finite)
            continue
        except NonConjugateError as site_err:
            cause = site_err
        base = _base_distribution(site["fn"])
        term = cause.term
        words = _LOGIT_WORDS.get(type(base).__name__)
        if words is not None:
            try:
                logits = trace_log_density(site_value(name, lambda s: _base_distribution(
                    s["fn"]).logits), values, draws, finite)
                if isinstance(logits, Poly):
                    term = f"{words} of {describe([logits])}"
            except NonConjugateError:
                pass
        sites = ", ".join(repr(n) for n in (cause.sites or err.sites))
        kind = "observed" if site["is_observed"] else "latent"
        where = f"the log density of {kind} site {name!r} ({_distribution_name(base)})"
        what = f"{where} contains {term}" if term else f"in {where}, {cause.reason}"
        return NonConjugateError(f"the log joint is not conjugate in site(s) {sites}: {what}. "
                                 f"{REMEDY}", cause.sites or err.sites, term, what)
    return err


def _distribution_name(fn: dist.Distribution) -> str:
    """Bernoulli for BernoulliLogits and BernoulliProbs (the name the user wrote)."""
    name = type(fn).__name__
    for suffix in ("Logits", "Probs"):
        name = name.removesuffix(suffix)
    return name


MAX_RESOLVED = 256
# resolved named families by (statistic names, support, element shape)
_RESOLVED: BoundedCache[tuple, tuple[ExponentialFamily, np.ndarray, np.ndarray]] = BoundedCache(
    MAX_RESOLVED)


def resolve_family(model: ConjugateModel, site: LatentSite, draws: np.ndarray, oracle: Any
                   ) -> SiteFamily:
    """The site's family: the user's oracle, else the smallest named family spanning its stats."""
    elements = draws.reshape((-1, *site.element_shape))
    stats = lambda x: model.site_stat_batch(site.name, x)  # noqa: E731
    names = ", ".join(s.name for s in model.stats[site.name])
    if oracle is not None:
        fit = fit_statistics(stats, oracle.family, fit_elements(site, elements,
                                                                oracle.family.stat_dim))
        if fit is None:
            raise ValueError(
                f"site {site.name!r}: the oracle's family {oracle.family.name} does not span the "
                f"statistics [{names}] that the model gives this site")
        return SiteFamily(oracle.family, oracle, *fit)
    atoms = [a for st in model.stats[site.name] for a, _ in st.atoms]
    key = None
    if all(a.elementwise for a in atoms):  # the names then say what the statistics are
        key = (tuple(s.name for s in model.stats[site.name]), type(site.support).__name__,
               str(site.support), site.element_shape)
        resolved = _RESOLVED.get(key)
        if resolved is not None:
            fam, B, c = resolved
            return SiteFamily(fam, ExactOracle(fam), B, c)
    for fam in candidate_families(site):
        (log_h,) = evaluate_in_numpy(fam.log_base_measure, elements)
        if np.ptp(log_h) > 0:  # E_q[log h] is not in the ELBO: only constant base measures
            continue
        fit = fit_statistics(stats, fam, fit_elements(site, elements, fam.stat_dim))
        if fit is not None and np.all(np.any(fit[0] != 0, axis=0)):
            # (a statistic of the family that no statistic of the site uses would have
            # eta_j = 0 in every conditional: GIG for Gamma's [x, log x] is improper there)
            if key is not None:
                _RESOLVED.put(key, (fam, *fit))
            return SiteFamily(fam, ExactOracle(fam), *fit)
    if not site.element_shape:
        return quadrature_family(model, site, elements)
    raise NonConjugateError(
        f"site {site.name!r} (support {site.support}, element shape {site.element_shape}): no "
        f"named family has the statistics [{names}] that its complete conditional has, and "
        f"automatic (quadrature) families exist only for scalar elements. Define the family, "
        f"e.g. ExponentialFamily.from_statistics('MyFamily', lambda x: {{...}}, "
        f"event_shape={site.element_shape}, support=...), generate a dataset "
        f"(generate_dataset), train an oracle (train_oracle) and pass it as "
        f"CAVIGuide(model, oracles={{{site.name!r}: oracle}})."
    )


MAX_AUTOMATIC = 64
# automatic quadrature families by (statistic names, support, fingerprint of the statistics)
# (statistics with data in them, such as |y_i - x|, make one per data set)
_AUTOMATIC: BoundedCache[tuple, tuple[ExponentialFamily, QuadratureOracle, np.ndarray,
                                      np.ndarray]] = BoundedCache(MAX_AUTOMATIC)


def scalar_support(support: constraints.Constraint) -> constraints.Constraint | None:
    """``support`` with scalar bounds, when QuadratureOracle can integrate over it (continuous,
    event_dim 0, a bijection to the real line or a circle, the same bounds for every element);
    else None."""
    if support.is_discrete or support.event_dim != 0:
        return None
    bounds = {k: np.asarray(getattr(support, k)) for k in ("lower_bound", "upper_bound")
              if hasattr(support, k)}
    if any(b.size == 0 or np.ptp(b) > 0 for b in bounds.values()):
        return None
    if any(b.ndim for b in bounds.values()):
        support = copy.copy(support)
        for k, b in bounds.items():
            setattr(support, k, float(b.flat[0]))
    if isinstance(support, constraints._Circular):
        return support
    try:
        biject_to(support)
    except NotImplementedError:
        return None
    return support


def independent_columns(values: np.ndarray, elementwise: np.ndarray, rtol: float = 1e-8
                        ) -> list[int]:
    """Indices of the columns of ``values`` (N points, k statistics) that make a family's
    statistics. A column of an elementwise statistic (an analytic function of x but for a few
    points, such as x^p, log x, log(1 + x^2)) is kept when it is linearly independent of the
    constant and of the columns kept before it, on the N points (greedy Gram-Schmidt on columns
    scaled to unit norm); any other column (a vector statistic such as |y_i - x|, whose kinks
    may fall between the points) unless it is constant or equal to a kept column."""
    n = len(values)
    basis = [np.ones(n) / np.sqrt(n)]
    keep: list[int] = []
    for j in range(values.shape[1]):
        v = values[:, j].astype(np.float64)
        if elementwise[j]:
            v = v / max(np.linalg.norm(v), 1e-300)
            for _ in range(2):  # twice is enough (Kahan)
                v = v - np.stack(basis, 1) @ (np.stack(basis, 1).T @ v)
            if np.linalg.norm(v) > rtol:
                basis.append(v / np.linalg.norm(v))
                keep.append(j)
            continue
        others = [np.full(n, v[0])] + [values[:, k] for k in keep]
        atol = 1e-12 * np.abs(v).max()
        if not any(np.allclose(v, w, rtol=1e-12, atol=atol) for w in others):
            keep.append(j)
    return keep


def probe_points(support: constraints.Constraint, draws: np.ndarray) -> np.ndarray:
    """Points of a scalar support on which statistics are compared: the image of a uniform grid
    u in [-8, 8] (x in [-8, 8], [3e-4, 3e3], ...; the circle in 2 pi; the first PROBE_GRID
    points), then ``draws``."""
    if isinstance(support, constraints._Circular):
        grid = np.linspace(-np.pi, np.pi, PROBE_GRID, endpoint=False)
    else:
        (grid,) = evaluate_in_numpy(biject_to(support), np.linspace(-8.0, 8.0, PROBE_GRID))
    return np.concatenate([grid, np.asarray(draws, np.float64).reshape(-1)])


PROBE_GRID = 1601


def quadrature_family(model: ConjugateModel, site: LatentSite, elements: np.ndarray
                      ) -> SiteFamily:
    """A family for a scalar site whose statistics no named family spans: T(x) = the
    linearly independent statistics s_j(x) of its complete conditional, h = 1, the site's
    support, natural domain {eta : A(eta) < inf}, with a QuadratureOracle (no training)."""
    stats = model.stats[site.name]
    names = ", ".join(st.name for st in stats)
    support = scalar_support(_base_distribution(site.prior).support)
    if support is None:
        raise NonConjugateError(
            f"site {site.name!r} (support {site.support}): no named family has the statistics "
            f"[{names}] that its complete conditional has, and an automatic quadrature family "
            f"needs a continuous scalar support with the same bounds for every element")
    points = probe_points(support, elements)
    values = model.site_stat_batch(site.name, points)
    if not np.all(np.isfinite(values)):
        raise NonConjugateError(
            f"site {site.name!r}: the statistics [{names}] of its complete conditional are not "
            f"finite on its support {support}")
    elementwise = [all(a.elementwise for a, _ in st.atoms) for st in stats]
    flags = np.repeat(elementwise, _stat_sizes(stats))
    columns = independent_columns(values, flags)
    # names of elementwise statistics say what they are; those of vector ones do not, and their
    # values on the grid (not at the random draws) fingerprint them: another analysis key reuses
    # the family, its oracle and so the compiled CAVI program
    key = (tuple(st.name if e else "vector" for st, e in zip(stats, elementwise, strict=True)),
           str(support), tuple(columns), values[:PROBE_GRID].tobytes())
    entry = _AUTOMATIC.get(key)
    if entry is None:
        family = _statistics_family(stats, columns, support)
        oracle = QuadratureOracle(family)
        family.natural_constraint = NaturalDomain(
            oracle.integrable, "A(eta) finite: exp(eta . T(x)) integrable on the support, as "
            "far as the quadrature's search grid tells", _feasible(oracle))
        fit = fit_statistics(lambda x: model.site_stat_batch(site.name, x), family, points)
        if fit is None:
            raise NonConjugateError(
                f"site {site.name!r}: the automatic family's statistics do not reproduce "
                f"[{names}] (a fit s = B T + c failed); please report it")
        entry = _AUTOMATIC.put(key, (family, oracle, *fit))
    logger.info("site %r: no named family has [%s]; using a quadrature family", site.name, names)
    family, oracle, B, c = entry
    return SiteFamily(family, oracle, B, c)


def _stat_sizes(stats: list[Stat]) -> list[int]:
    """The number of values of each statistic of a scalar element."""
    return [int(np.prod(jax.eval_shape(st, np.float64(0.5)).shape)) for st in stats]


def _statistics_family(stats: list[Stat], columns: list[int], support: constraints.Constraint
                       ) -> ExponentialFamily:
    """The family T(x) = (selected flat statistics of the site)(x), a function of scalar x."""
    sizes = _stat_sizes(stats)
    labels = [st.name if n == 1 else f"{st.name}[{i}]" for st, n in zip(stats, sizes,
                                                                           strict=True)
              for i in range(n)]
    elementwise = all(a.elementwise for st in stats for a, _ in st.atoms)

    def flat(x: Array) -> Array:
        parts = [jnp.reshape(st(x), (*jnp.shape(x), -1)) for st in stats]
        flat = jnp.concatenate(parts, axis=-1)
        return jnp.stack([flat[..., j] for j in columns], axis=-1)  # slices: numpy-evaluable

    def statistics(x: Array) -> dict[str, Array]:
        x = jnp.asarray(x)
        if elementwise:
            t = flat(x)
        else:  # vector statistics of a scalar element: one element at a time
            t = jax.vmap(flat)(x.reshape(-1)).reshape((*x.shape, len(columns)))
        return {labels[j]: t[..., k] for k, j in enumerate(columns)}

    return ExponentialFamily.from_statistics(f"Quadrature[{', '.join(labels[j] for j in columns)}]",
                                             statistics, event_shape=(), support=support)


def _feasible(oracle: QuadratureOracle) -> np.ndarray:
    """A natural parameter with A(eta) < inf: the first integrable one of 0 (bounded supports),
    -e_k for each statistic, and -1 (all statistics); zeros when none is."""
    d = oracle.family.stat_dim
    candidates = np.concatenate([np.zeros((1, d)), -np.eye(d), -np.ones((1, d))])
    (ok,) = evaluate_in_numpy(jax.vmap(oracle.integrable_single), candidates)
    return candidates[int(np.argmax(ok))] if ok.any() else np.zeros(d)

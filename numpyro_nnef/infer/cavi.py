"""Mean-field CAVI on NumPyro models, and the guide that holds its factors.

``CAVI`` is a thin SVI-shaped wrapper (init / update / evaluate / get_params / run) around the
pure kernel of ``kernel.py``, compiled once per model structure; ``CAVIGuide`` holds one
exponential-family factor per element of every latent site; ``CAVIResult.check_elbo`` compares
the engine's ELBO with a Monte Carlo estimate from q's own draws.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro

from .._jit import quick_jit
from ..oracles import QuadratureOracle
from .augment import augmented
from .cache import BoundedCache
from .conditional import CompleteConditional, complete_conditionals
from .conjugacy import ConjugateModel, analyse_model, support_draws
from .kernel import MIN_STEP, CAVIKernel, CAVIState, cavi_kernel

Array = jax.Array

__all__ = ["CAVIGuide", "CAVI", "CAVIResult", "ELBOCheck", "monte_carlo_elbo"]


ROUNDING_ULPS = 100  # rounding of the ELBO's sums, in units of its dtype's eps times |ELBO|


class ELBOCheck(NamedTuple):
    """The engine's ELBO next to a Monte Carlo estimate E_q[log p(x) - log q(x)] from q's own
    draws, with its Monte Carlo standard error; ``z`` = (engine - estimate) / sqrt(mcse^2 +
    rounding^2), ``rounding`` the rounding error of the ELBO's sums in their dtype (where q is
    the exact posterior, log p - log q is constant and the mcse is only rounding noise)."""

    engine: float
    monte_carlo: float
    mcse: float
    num_samples: int
    rounding: float = 0.0

    @property
    def z(self) -> float:
        scale = float(np.hypot(self.mcse, self.rounding))
        return (self.engine - self.monte_carlo) / scale if scale > 0 else (
            0.0 if self.engine == self.monte_carlo else float("inf"))

    def passed(self, num_mcse: float = 4.0) -> bool:
        """Whether the engine's ELBO is within ``num_mcse`` Monte Carlo standard errors (with
        the rounding allowance)."""
        return bool(abs(self.z) <= num_mcse)

    def __str__(self) -> str:
        verdict = "passed" if self.passed() else "FAILED"
        return (f"engine ELBO {self.engine:.6g}, Monte Carlo {self.monte_carlo:.6g} +- "
                f"{self.mcse:.2g} (rounding {self.rounding:.2g}; {self.num_samples} draws of q; "
                f"{self.z:+.2f} MCSE): {verdict}")


def monte_carlo_elbo(model: Callable, guide: CAVIGuide, params: Mapping[str, Array],
                     rng_key: Array, num_samples: int, *args: Any, **kwargs: Any
                     ) -> tuple[float, float]:
    """(E_q[log p(x) - log q(x)], its Monte Carlo standard error) from ``num_samples`` draws of
    the guide's q (the model's log joint by NumPyro's ``log_density``)."""
    from numpyro.infer.util import log_density

    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    cm = guide._require()
    draws = guide.sample_posterior(rng_key, params, sample_shape=(num_samples,))

    def log_ratio(values):
        log_p = log_density(model, args, kwargs, values)[0]
        log_q = sum(jnp.sum(guide.distribution(n, jnp.asarray(params[f"{n}_eta"])).log_prob(
            values[n])) for n in cm.sites)
        return log_p - log_q

    ratios = np.asarray(quick_jit(jax.vmap(log_ratio))(draws), dtype=np.float64)
    if not np.all(np.isfinite(ratios)):
        bad = int((~np.isfinite(ratios)).sum())
        raise FloatingPointError(f"log p - log q is not finite on {bad} of {num_samples} draws "
                                 "of q: q puts mass where the model has none")
    return float(ratios.mean()), float(ratios.std(ddof=1) / np.sqrt(num_samples))


@dataclasses.dataclass
class CAVIResult:
    """What ``CAVI.run`` returns: ``params`` (site -> natural parameters, for the guide),
    the ELBO after every sweep, whether it converged, and the wall time.
    ``check_elbo(rng_key, num_samples)`` compares the final ELBO with a Monte Carlo estimate."""

    params: dict[str, Array]
    elbo: np.ndarray
    converged: bool
    num_steps: int
    wall_time_s: float
    state: CAVIState
    model: Callable | None = dataclasses.field(default=None, repr=False)
    guide: CAVIGuide | None = dataclasses.field(default=None, repr=False)
    args: tuple = dataclasses.field(default=(), repr=False)
    kwargs: dict = dataclasses.field(default_factory=dict, repr=False)
    # with CAVIGuide(augment=True): computes q's own ELBO (see ``exact_elbo``)
    exact_elbo_fn: Callable[[], Array] | None = dataclasses.field(default=None, repr=False)

    @functools.cached_property
    def exact_elbo(self) -> float | None:
        """With ``CAVIGuide(augment=True)``: q's own ELBO (``elbo`` traces the augmented
        model's bound, which is lower), compiled and computed on first use; else None."""
        return None if self.exact_elbo_fn is None else float(self.exact_elbo_fn())

    def check_elbo(self, rng_key: Array, num_samples: int = 2000) -> ELBOCheck:
        """The final engine ELBO (q's own, ``exact_elbo``, when augmented) against
        E_q[log p - log q] from ``num_samples`` draws of q, +- its Monte Carlo standard error
        (``.passed()``: within 4 MCSE)."""
        if self.model is None or self.guide is None:
            raise RuntimeError("this result does not know its model: use the CAVIResult that "
                               "CAVI.run returned")
        estimate, mcse = monte_carlo_elbo(self.guide.traced_model, self.guide, self.params, rng_key,
                                          num_samples, *self.args, **self.kwargs)
        engine = float(self.elbo[-1]) if self.exact_elbo is None else self.exact_elbo
        eps = float(np.finfo(np.asarray(self.state.elbo).dtype).eps)
        rounding = ROUNDING_ULPS * eps * max(1.0, abs(engine))
        return ELBOCheck(engine, estimate, mcse, num_samples, rounding)

    def _guide(self) -> CAVIGuide:
        if self.guide is None:
            raise RuntimeError("this result does not know its guide: use the CAVIResult that "
                               "CAVI.run returned")
        return self.guide

    def to_arviz(self, rng_key: Array, num_samples: int = 1000, num_chains: int = 4):
        """``arviz.InferenceData`` with posterior (independent draws of q, ``num_chains`` x
        ``num_samples``), posterior_predictive, log_likelihood and observed_data groups."""
        return self._guide().to_arviz(rng_key, self.params, *self.args, num_samples=num_samples,
                                      num_chains=num_chains, **self.kwargs)

    def print_summary(self, rng_key: Array, num_samples: int = 2000, prob: float = 0.9) -> None:
        """NumPyro's ``print_summary`` table (mean, sd, median, ``prob`` interval) of q's sites,
        from ``num_samples`` independent draws of q."""
        from numpyro.diagnostics import print_summary

        draws = self._guide().sample_posterior(rng_key, self.params, sample_shape=(num_samples,))
        print_summary({k: np.asarray(v) for k, v in draws.items()}, prob=prob,
                      group_by_chain=False)


class CAVIGuide:
    """A NumPyro guide with one exponential-family factor per element of every latent site.

    ``oracles`` maps site names to oracles of families that the automatic resolution would not
    find (learned families). ``samplers`` maps site names to learned samplers (``FlowSampler``)
    of the site's family: q(x | eta) for that site is then sampled by the sampler (in
    ``sample_posterior``, ``to_arviz`` and ``Predictive``) instead of the family's exact sampler
    or NUTS. Call ``guide(*args, **kwargs)`` inside NumPyro (e.g. ``Predictive``) with ``params``
    from ``CAVI.run``; the parameters are named ``"<site>_eta"``.

    ``augment=True``: auxiliary variables make two kinds of term conjugate (``augment.py``).
    Bernoulli- and Binomial-logit terms take their Polya-Gamma augmentation (Polson, Scott &
    Windle 2013) with q(omega) = PG(1, c) at its optimum c^2 = E[a^2] (Jaakkola & Jordan's
    bound): the updates of the predictor's sites are conjugate and the traced ELBO is the
    augmented model's (a lower bound of q's own, which ``CAVIResult.exact_elbo`` holds and
    ``check_elbo`` checks). A latent HalfCauchy(A) site becomes tau^2 | a ~ InverseGamma(1/2,
    1/a) with a new site ``<name>_mixing`` ~ InverseGamma(1/2, 1/A^2). Default: the direct
    updates (Knowles-Minka messages with Gauss-Hermite expectations; an automatic quadrature
    family for the HalfCauchy site's exact complete conditional).
    """

    def __init__(self, model: Callable, *, oracles: Mapping[str, Any] | None = None,
                 samplers: Mapping[str, Any] | None = None, augment: bool = False):
        self.model = model
        self.oracles = dict(oracles or {})
        self.samplers = dict(samplers or {})
        self.augment = bool(augment)
        # the model CAVI analyses: with its HalfCauchy sites as scale mixtures when augmented
        self.traced_model = augmented(model) if augment else model
        self.conjugate: ConjugateModel | None = None

    def structure(self, *args: Any, key: Array, **kwargs: Any) -> ConjugateModel:
        """The conjugacy analysis of the model for these arguments (not kept)."""
        cm = analyse_model(self.traced_model, *args, key=key, oracles=self.oracles, **kwargs)
        cm.augment = self.augment
        return cm

    def analyse(self, *args: Any, key: Array, **kwargs: Any) -> ConjugateModel:
        """Run the conjugacy analysis for these model arguments (kept for the guide's use);
        ValueError naming the site for a sampler of a missing site or of another family."""
        cm = self.structure(*args, key=key, **kwargs)
        unknown = sorted(set(self.samplers) - set(cm.sites))
        if unknown:
            raise ValueError(f"samplers given for {unknown}, which are not latent sites of the "
                             f"model (latent: {sorted(cm.sites)})")
        for name, sampler in self.samplers.items():
            want, got = cm.families[name].family, getattr(sampler, "family", None)
            if got is None or (got.name, tuple(got.stat_labels)) != (want.name,
                                                                     tuple(want.stat_labels)):
                what = (f"{got.name} {list(got.stat_labels)}" if got is not None
                        else f"a {type(sampler).__name__} without a family")
                raise ValueError(f"the sampler for site {name!r} is for {what}, but the site's "
                                 f"family is {want.name} {list(want.stat_labels)}")
        self.conjugate = cm
        return cm

    @property
    def conditionals(self) -> dict[str, CompleteConditional]:
        """Each latent site's complete conditional (after the analysis)."""
        return complete_conditionals(self._require())

    def _require(self) -> ConjugateModel:
        if self.conjugate is None:
            raise RuntimeError("the guide has not been set up: run CAVI(model, guide).run(...) "
                               "or guide.analyse(*args, key=...) first")
        return self.conjugate

    def distribution(self, name: str, eta: Array):
        """q for site ``name`` as a NumPyro distribution with the model site's shapes (sampled
        by the site's sampler when ``samplers`` names one, else by its QuadratureOracle when it
        has one)."""
        cm = self._require()
        site, fam = cm.sites[name], cm.families[name]
        sampler = self.samplers.get(name)
        if sampler is None and isinstance(fam.oracle, QuadratureOracle):
            sampler = fam.oracle  # inverse-CDF draws on the quadrature window, not NUTS
        if sampler is None and hasattr(fam.family, "to_numpyro"):
            q = fam.family.to_numpyro(eta)
        else:
            from ..distribution import EFDistribution
            q = EFDistribution(fam.family, eta, oracle=fam.oracle, sampler=sampler)
        extra = len(site.batch_shape) - len(site.prior.batch_shape)
        return q.to_event(extra) if extra > 0 else q

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Array]:
        cm = self._require()
        out = {}
        for name, site in cm.sites.items():
            fam = cm.families[name]
            eta = numpyro.param(f"{name}_eta", lambda _k, s=site, f=fam: jnp.broadcast_to(
                f.oracle.default_init(), (*s.batch_shape, f.family.stat_dim)))
            out[name] = numpyro.sample(name, self.distribution(name, eta))
        return out

    def sample_posterior(self, rng_key: Array, params: Mapping[str, Array], *args: Any,
                         sample_shape: tuple[int, ...] = (), **kwargs: Any) -> dict[str, Array]:
        """Draws from q: {site: sample_shape + site shape}."""
        cm = self._require()
        keys = jax.random.split(rng_key, len(cm.sites))
        return {name: self.distribution(name, jnp.asarray(params[f"{name}_eta"])).sample(
            k, tuple(sample_shape)) for name, k in zip(cm.sites, keys, strict=True)}

    def quantiles(self, params: Mapping[str, Array], quantiles: Sequence[float], *,
                  rng_key: Array | None = None, num_samples: int = 10_000) -> dict[str, Array]:
        """q's quantiles per site, shape (len(quantiles), *site shape): F^-1(q) by bisection of
        the factor's cdf for scalar continuous factors (exact), else from ``num_samples`` draws
        of q (then ``rng_key`` is required)."""
        cm = self._require()
        qs = jnp.asarray(quantiles, dtype=float)
        if qs.ndim != 1 or not bool(jnp.all((qs > 0) & (qs < 1))):
            raise ValueError(f"quantiles must be a list of numbers in (0, 1), got {quantiles}")
        out = {}
        for name, site in cm.sites.items():
            q = self.distribution(name, jnp.asarray(params[f"{name}_eta"]))
            inverse = None if site.element_shape or q.support.is_discrete else _bisect_cdf(q, qs)
            if inverse is None:
                if rng_key is None:
                    raise ValueError(f"site {name!r}: q has no cdf to invert; pass rng_key= to "
                                     "estimate its quantiles from draws")
                rng_key, sub = jax.random.split(rng_key)
                draws = q.sample(sub, (num_samples,))
                inverse = jnp.quantile(draws, qs, axis=0, method="inverted_cdf"
                                       if q.support.is_discrete else "linear")
            out[name] = jnp.broadcast_to(inverse, (len(qs), *site.shape))
        return out

    def median(self, params: Mapping[str, Array], *, rng_key: Array | None = None
               ) -> dict[str, Array]:
        """q's median per site (see ``quantiles``)."""
        return {k: v[0] for k, v in self.quantiles(params, [0.5], rng_key=rng_key).items()}

    def to_arviz(self, rng_key: Array, params: Mapping[str, Array], *args: Any,
                 num_samples: int = 1000, num_chains: int = 1, **kwargs: Any):
        """An ``arviz.InferenceData`` of ``num_chains`` x ``num_samples`` independent draws of q
        (group ``posterior``); given the model's arguments also ``posterior_predictive``
        (observed sites redrawn from the model), ``log_likelihood`` (per observation, for
        ``az.loo``/``az.waic``) and ``observed_data``."""
        import arviz as az
        from numpyro.infer import Predictive
        from numpyro.infer.util import log_likelihood

        if num_samples < 1 or num_chains < 1:
            raise ValueError(f"num_samples and num_chains must be >= 1, got {num_samples} and "
                             f"{num_chains}")
        key_q, key_pred = jax.random.split(rng_key)
        total = num_chains * num_samples
        flat = self.sample_posterior(key_q, params, sample_shape=(total,))
        chains = lambda d: {k: np.asarray(v).reshape(  # noqa: E731
            (num_chains, num_samples, *np.shape(v)[1:])) for k, v in d.items()}
        groups = {"posterior": chains(flat)}
        if args or kwargs:
            trace = numpyro.handlers.trace(numpyro.handlers.substitute(
                self.model, data={k: v[0] for k, v in flat.items()})).get_trace(*args, **kwargs)
            observed = {n: np.asarray(s["value"]) for n, s in trace.items()
                        if s["type"] == "sample" and s["is_observed"]}
            predictive = Predictive(self.model, posterior_samples=flat,
                                    return_sites=list(observed))(key_pred, *args, **kwargs)
            groups["posterior_predictive"] = chains(predictive)
            groups["log_likelihood"] = chains(log_likelihood(self.model, flat, *args, **kwargs))
            groups["observed_data"] = observed
        return az.from_dict(**groups)


def _bisect_cdf(q: Any, levels: Array, num_steps: int = 100) -> Array | None:
    """F^-1(levels) for a scalar continuous q by bisection in the unconstrained space of its
    support (shape (len(levels), *q.batch_shape)); None when q has no cdf."""
    from numpyro.distributions.transforms import biject_to

    to_support = biject_to(q.support)
    shape = (len(levels), *q.batch_shape)
    try:
        q.cdf(to_support(jnp.zeros(q.batch_shape)))
    except (NotImplementedError, ImportError, AttributeError):
        return None
    target = levels.reshape((-1,) + (1,) * len(q.batch_shape))

    def step(_, bounds):
        low, high = bounds
        mid = 0.5 * (low + high)
        below = q.cdf(to_support(mid)) < target
        return jnp.where(below, mid, low), jnp.where(below, high, mid)

    low, high = jax.lax.fori_loop(0, num_steps, step, (jnp.full(shape, -1e4),
                                                       jnp.full(shape, 1e4)))
    return to_support(0.5 * (low + high))


class CAVI:
    """Coordinate-ascent variational inference: ``init``/``update``/``run``/``evaluate``.

    ``tol``: stop when |ELBO change| <= tol * |ELBO|; ``damping`` rho in [0, 1): eta <- (1 - rho)
    eta_new + rho eta_old (for learned oracles whose errors make plain updates oscillate).
    """

    def __init__(self, model: Callable, guide: CAVIGuide, *, tol: float = 1e-10,
                 damping: float = 0.0):
        if not 0.0 <= damping < 1.0:
            raise ValueError(f"damping must be in [0, 1), got {damping}")
        if guide.model is not model:
            raise ValueError("the guide was built for another model")
        self.model, self.guide, self.tol, self.damping = model, guide, float(tol), float(damping)
        self._program: _Program | None = None
        self._data: list[Array] = []

    # -------------------------------------------------------------- the pieces
    def init(self, rng_key: Array, *args: Any, **kwargs: Any) -> CAVIState:
        """Analyse the model and start every factor at the statistics of one random point of
        its support (point masses; the first sweep replaces them in model order)."""
        cm = self.guide.analyse(*args, key=rng_key, **kwargs)
        key = (cm.signature(), self.damping)
        program = _PROGRAMS.get(key)
        if program is None:
            program = _PROGRAMS.put(key, _Program(cavi_kernel(cm, self.damping)))
        self._program, self._program_key, self._analysis_key = program, key, rng_key
        self._data = [np.asarray(a) for a in cm.data()]
        self._data_args = _leaves(args, kwargs)
        return self._start(cm.initial_values)

    def _start(self, values: Mapping[str, np.ndarray]) -> CAVIState:
        """Every factor at the statistics of the point ``values`` (in numpy until the first
        compiled sweep: eager jnp calls would each compile)."""
        cm = self.guide._require()
        return self._program_or_raise().kernel.init({name: cm.site_stat_batch(name, np.asarray(
            values[name]).reshape((-1, *site.element_shape))).reshape(
            (*site.batch_shape, -1)) for name, site in cm.sites.items()})

    def _random_starts(self, rng_key: Array, num: int) -> list[CAVIState]:
        """``num`` states at further random points of the sites' supports."""
        cm = self.guide._require()
        rng = np.random.default_rng(np.asarray(jax.random.key_data(rng_key)).ravel().tolist())
        return [self._start({name: support_draws(site.prior, 1, rng)[0]
                             for name, site in cm.sites.items()}) for _ in range(num)]

    def _data_for(self, args: tuple, kwargs: dict) -> list[Array]:
        """The compiled program's data arguments for these model arguments (those of ``init``
        when none are given); ValueError when they give the model another structure."""
        if self._program is None:
            raise RuntimeError("call CAVI.init(rng_key, *model_args) first")
        leaves = _leaves(args, kwargs)
        if (not args and not kwargs) or (len(leaves) == len(self._data_args) and all(
                a is b for a, b in zip(leaves, self._data_args, strict=True))):
            return self._data
        cm = self.guide.structure(*args, key=self._analysis_key, **kwargs)
        if (cm.signature(), self.damping) != self._program_key:
            raise ValueError("these model arguments give the model another structure (shapes, "
                             "statistics or families) than the arguments CAVI.init analysed: "
                             "call init (or run) with them")
        self._data, self._data_args = [np.asarray(a) for a in cm.data()], leaves
        return self._data

    def update(self, state: CAVIState, *args: Any, **kwargs: Any) -> tuple[CAVIState, Array]:
        """One sweep over all sites on the data of ``args``/``kwargs`` (the model's arguments;
        those of ``init`` when none are given): (new state, its ELBO)."""
        state = self._program_or_raise().step(self._data_for(args, kwargs), state)
        return state, state.elbo

    def evaluate(self, state: CAVIState, *args: Any, **kwargs: Any) -> Array:
        """The ELBO of ``state`` on the data of ``args``/``kwargs`` (as ``update``)."""
        return self._program_or_raise().elbo(self._data_for(args, kwargs), state)

    def get_params(self, state: CAVIState) -> dict[str, Array]:
        """The guide's parameters ``{"<site>_eta": natural parameters}`` of ``state``."""
        return {f"{name}_eta": eta for name, eta in state.eta.items()}

    def _program_or_raise(self) -> _Program:
        if self._program is None:
            raise RuntimeError("call CAVI.init(rng_key, *model_args) first")
        return self._program

    # -------------------------------------------------------------- the loop
    def run(self, rng_key: Array, num_steps: int, *args: Any, progress_bar: bool = True,
            init_state: CAVIState | None = None, num_starts: int | None = None,
            **kwargs: Any) -> CAVIResult:
        """Up to ``num_steps`` sweeps from a random point of the support (or ``init_state``);
        stops when |ELBO change| <= tol max(1, |ELBO|). The sweeps run in a compiled
        ``lax.while_loop``, in chunks of up to CHUNK sweeps between progress-bar updates.

        ``num_starts`` random starting points each get PILOT_SWEEPS sweeps and the run goes on
        from the one with the highest ELBO (the sweeps of the others are not counted); the
        default is NUM_STARTS_DISCRETE for models with a discrete latent site (mixtures, topic
        models and HMMs have symmetric saddles a start can fall into), 1 otherwise."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if num_starts is not None and num_starts < 1:
            raise ValueError(f"num_starts must be >= 1, got {num_starts}")
        start = time.perf_counter()
        if init_state is None:
            state = self.init(rng_key, *args, **kwargs)
            data = self._data
        else:
            state, data = init_state, self._data_for(args, kwargs)
        program = self._program_or_raise()
        if num_starts is None:
            num_starts = 1 if init_state is not None or not any(
                site.support.is_discrete for site in self.guide._require().sites.values()
            ) else NUM_STARTS_DISCRETE
        previous = jnp.full((), -jnp.inf, dtype=jnp.result_type(float))
        history, done, stopped = [], 0, False
        from tqdm.auto import tqdm
        with tqdm(total=num_steps, desc="CAVI", disable=not progress_bar) as bar:
            if num_starts > 1:
                pilot = min(PILOT_SWEEPS, num_steps)
                runs = [program.loop(data, s, previous, pilot, self.tol) for s in
                        [state, *self._random_starts(jax.random.fold_in(rng_key, 1),
                                                     num_starts - 1)]]
                state, previous, trace, steps = max(runs, key=lambda r: _final_elbo(r[0]))
                done = int(steps)
                history, stopped = [np.asarray(trace)[:done]], done < pilot
                bar.update(done)
            while done < num_steps and not stopped:
                size = min(CHUNK, num_steps - done)
                state, previous, trace, steps = program.loop(data, state, previous, size,
                                                             self.tol)
                steps = int(steps)
                history.append(np.asarray(trace)[:steps])
                done += steps
                bar.update(steps)
                if steps:
                    bar.set_postfix(elbo=f"{history[-1][-1]:.6g}")
                if steps < size:
                    break
        elbo = np.concatenate(history)
        jax.block_until_ready(state.elbo)
        wall = time.perf_counter() - start
        self._check(state, elbo, data)
        converged = len(elbo) >= 2 and bool(_converged(elbo[-2], elbo[-1], self.tol, np))
        if not converged and done == num_steps:
            warnings.warn(
                f"CAVI: not converged after {num_steps} sweeps (last ELBO change "
                f"{float(np.diff(elbo)[-1]) if len(elbo) >= 2 else float('nan'):.3g}); "
                f"continue with run(..., init_state=result.state), or try num_starts > 1 if it "
                f"creeps away from a saddle", RuntimeWarning, stacklevel=2)
        exact = (functools.partial(program.exact_elbo, data, state)
                 if self.guide.augment and done else None)
        return CAVIResult(self.get_params(state), elbo, converged, done, wall, state,
                          self.model, self.guide, tuple(args), dict(kwargs), exact)

    def _distance_to_target(self, name: str, state: CAVIState, data: list[Array]) -> float:
        """How far the Knowles-Minka target of a stalled site is from its factor: the largest
        |mean change| / sd and |sd ratio - 1| over its coordinates (inf if improper)."""
        cm, cond = self.guide._require(), self._program_or_raise().kernel.conditionals[name]
        mean, _, ok = cond.factor(cond.natural(state.mu, data))
        if not bool(ok):
            return float("inf")
        before = cm.moments(name, state.mu[name])
        after = cm.moments(name, cond.family.site_stats(mean))
        sd_before, sd_after = (np.sqrt(np.asarray(v) if v.ndim == before[0].ndim else
                                       np.diagonal(np.asarray(v), axis1=-2, axis2=-1))
                               for v in (before[1], after[1]))
        return float(max(np.max(np.abs(np.asarray(after[0]) - before[0]) / sd_before),
                         np.max(np.abs(sd_after / sd_before - 1))))

    def _check(self, state: CAVIState, elbo: np.ndarray, data: list[Array]) -> None:
        cm = self.guide._require()
        bad = [name for name, ok in state.ok.items() if not bool(ok)]
        if bad:
            raise ValueError(
                f"the complete conditional of site(s) {bad} left the natural domain of its "
                f"family ({', '.join(cm.families[n].family.name for n in bad)}): the posterior "
                f"factor is improper (check the priors of these sites)")
        stalled = {name: self._distance_to_target(name, state, data)
                   for name, flag in state.stalled.items() if bool(flag)}
        stalled = {name: d for name, d in stalled.items() if not d <= STALL_TOLERANCE}
        if stalled:
            warnings.warn(
                f"CAVI: the step search of site(s) {sorted(stalled)} (non-conjugate terms) found "
                f"no step down to {MIN_STEP:g} that keeps the ELBO from falling, so the run "
                f"stopped there, {max(stalled.values()):.3g} sd of q from its fixed-point "
                f"update (rounding of the ELBO, or a term whose expectation its quadrature "
                f"resolves poorly, can cause it)", RuntimeWarning, stacklevel=3)
        # rounding of the ELBO's sums: a few hundred ulps of its magnitude in its dtype
        dtype = np.asarray(state.elbo).dtype
        eps = 1e-9 if dtype == np.float64 else 100 * float(np.finfo(dtype).eps)
        drops = np.flatnonzero(np.diff(elbo) < -eps * np.maximum(1.0, np.abs(elbo[1:])))
        if drops.size:
            learned = [n for n, f in cm.families.items()
                       if type(f.oracle).__name__ != "ExactOracle"]
            cause = (f"the learned or quadrature oracle(s) of site(s) {learned} are not exact; "
                     f"try damping=0.5 or a more accurate oracle" if learned else "this should "
                     "not happen with exact oracles; please report it")
            warnings.warn(f"CAVI: the ELBO decreased at sweep(s) {(drops + 2).tolist()} "
                          f"(by up to {float(-np.diff(elbo).min()):.3g}); {cause}",
                          RuntimeWarning, stacklevel=3)


def _final_elbo(state: CAVIState) -> float:
    """A run's ELBO for choosing among starts (-inf if a factor left its domain)."""
    ok = all(bool(v) for v in state.ok.values())
    return float(state.elbo) if ok and np.isfinite(float(state.elbo)) else -np.inf


def _converged(previous: Array, current: Array, tol: float, xp: Any = jnp) -> Array:
    """|ELBO change| <= tol max(1, |ELBO|), in jnp (inside the loop) or numpy (``xp``)."""
    return xp.abs(current - previous) <= tol * xp.maximum(1.0, xp.abs(current))


class _Program:
    """The compiled kernel of one model structure (shared by every run on data of that
    structure): ``step``, ``elbo``, and ``loop``: up to ``num`` (<= CHUNK) steps in a
    ``lax.while_loop`` that stops at convergence or when a factor leaves its domain."""

    def __init__(self, kernel: CAVIKernel):
        self.kernel = kernel
        self.step = quick_jit(kernel.step)
        self.elbo = quick_jit(kernel.elbo)
        self.exact_elbo = quick_jit(functools.partial(kernel.elbo, bound=False))
        self.loop = quick_jit(self._loop)

    def _loop(self, data, state, previous, num, tol):
        """(state, ELBO before the last sweep, ELBO trace (CHUNK,), sweeps done)."""
        def cond(carry):
            st, prev, _, i = carry
            ok = jnp.all(jnp.stack(list(st.ok.values())))
            return (i < num) & ok & ~_converged(prev, st.elbo, tol)

        def body(carry):
            st, _, trace, i = carry
            new = self.kernel.step(data, st)
            return new, st.elbo, trace.at[i].set(new.elbo), i + 1

        state = state._replace(elbo=jnp.asarray(state.elbo, previous.dtype))
        trace = jnp.full((CHUNK,), jnp.nan, previous.dtype)
        carry = (state, previous, trace, jnp.asarray(0))
        return jax.lax.while_loop(cond, body, carry)


def _leaves(args: tuple, kwargs: dict) -> list[Any]:
    return jax.tree.leaves((args, kwargs))


STALL_TOLERANCE = 0.05  # a stall this close (sd of q) to the fixed point is convergence
CHUNK = 256  # sweeps per compiled loop call (between progress-bar updates)
NUM_STARTS_DISCRETE = 8  # default starting points for models with a discrete latent site
PILOT_SWEEPS = 10  # sweeps from each starting point before the best one is kept
MAX_PROGRAMS = 32
# compiled programs by (model structure, damping): new data of the same shapes reuses them
_PROGRAMS: BoundedCache[tuple, _Program] = BoundedCache(MAX_PROGRAMS)

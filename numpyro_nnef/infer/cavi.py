"""Mean-field CAVI on NumPyro models, and the guide that holds its factors.

For latent site k with statistics s_k and family T_k (s_k = B_k T_k + c_k), a coordinate update
sets eta_k = B_k^T d E_q[log p] / d E[s_k] and E[T_k] = oracle_k.mean(eta_k); the ELBO is
E_q[log p] + sum_k (A_k(eta_k) - eta_k . E[T_k]) (the families' base measures are constant).
Sites are updated in model order; the elements of a site are updated together unless the log
density couples them (then one after another, which keeps the ELBO non-decreasing).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro

from .conjugacy import ConjugateModel, analyse_model

Array = jax.Array

__all__ = ["CAVIGuide", "CAVI", "CAVIState", "CAVIResult", "ELBOCheck", "monte_carlo_elbo"]


class CAVIState(NamedTuple):
    """mu: each site's expected statistics (batch..., num_stats); eta, mean: its family's
    natural parameter and E[T] (batch..., stat_dim); log_partition: A(eta) (batch...); elbo:
    after the last sweep; ok: False once a complete conditional left its family's natural
    domain."""

    mu: dict[str, Array]
    eta: dict[str, Array]
    mean: dict[str, Array]
    log_partition: dict[str, Array]
    elbo: Array
    ok: dict[str, Array]


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
        return (f"engine ELBO {self.engine:.6g}, Monte Carlo {self.monte_carlo:.6g} +- "
                f"{self.mcse:.2g} (rounding {self.rounding:.2g}; {self.num_samples} draws of q; "
                f"{self.z:+.2f} MCSE)")


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

    ratios = np.asarray(jax.jit(jax.vmap(log_ratio))(draws), dtype=np.float64)
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

    def check_elbo(self, rng_key: Array, num_samples: int = 2000) -> ELBOCheck:
        """The final engine ELBO against E_q[log p - log q] from ``num_samples`` draws of q,
        +- its Monte Carlo standard error (``.passed()``: within 4 MCSE)."""
        if self.model is None or self.guide is None:
            raise RuntimeError("this result does not know its model: use the CAVIResult that "
                               "CAVI.run returned")
        estimate, mcse = monte_carlo_elbo(self.model, self.guide, self.params, rng_key,
                                          num_samples, *self.args, **self.kwargs)
        engine = float(self.elbo[-1])
        eps = float(np.finfo(np.asarray(self.state.elbo).dtype).eps)
        rounding = ROUNDING_ULPS * eps * max(1.0, abs(engine))
        return ELBOCheck(engine, estimate, mcse, num_samples, rounding)


class CAVIGuide:
    """A NumPyro guide with one exponential-family factor per element of every latent site.

    ``oracles`` maps site names to oracles of families that the automatic resolution would not
    find (learned families). ``samplers`` maps site names to learned samplers (``FlowSampler``)
    of the site's family: q(x | eta) for that site is then sampled by the sampler (in
    ``sample_posterior``, ``to_arviz`` and ``Predictive``) instead of the family's exact sampler
    or NUTS. Call ``guide(*args, **kwargs)`` inside NumPyro (e.g. ``Predictive``) with ``params``
    from ``CAVI.run``; the parameters are named ``"<site>_eta"``.
    """

    def __init__(self, model: Callable, *, oracles: Mapping[str, Any] | None = None,
                 samplers: Mapping[str, Any] | None = None):
        self.model = model
        self.oracles = dict(oracles or {})
        self.samplers = dict(samplers or {})
        self.conjugate: ConjugateModel | None = None

    def analyse(self, *args: Any, key: Array, **kwargs: Any) -> ConjugateModel:
        """Run the conjugacy analysis for these model arguments (kept for the guide's use);
        ValueError naming the site for a sampler of a missing site or of another family."""
        cm = analyse_model(self.model, *args, key=key, oracles=self.oracles, **kwargs)
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

    def _require(self) -> ConjugateModel:
        if self.conjugate is None:
            raise RuntimeError("the guide has not been set up: run CAVI(model, guide).run(...) "
                               "or guide.analyse(*args, key=...) first")
        return self.conjugate

    def distribution(self, name: str, eta: Array):
        """q for site ``name`` as a NumPyro distribution with the model site's shapes (sampled
        by the site's sampler when ``samplers`` names one)."""
        cm = self._require()
        site, fam = cm.sites[name], cm.families[name]
        sampler = self.samplers.get(name)
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

    def to_arviz(self, rng_key: Array, params: Mapping[str, Array], num_samples: int = 1000):
        """An ``arviz.InferenceData`` with ``num_samples`` posterior draws of every site."""
        import arviz as az
        draws = self.sample_posterior(rng_key, params, sample_shape=(1, num_samples))
        return az.from_dict(posterior={k: np.asarray(v) for k, v in draws.items()})


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
        mu, eta, mean, log_z, ok = {}, {}, {}, {}, {}
        for name, site in cm.sites.items():
            x = np.asarray(cm.initial_values[name]).reshape((-1, *site.element_shape))
            # numpy until the first compiled sweep (eager jnp calls would each compile)
            mu[name] = cm.site_stat_batch(name, x).reshape((*site.batch_shape, -1))
            d = cm.families[name].family.stat_dim
            eta[name] = np.zeros((*site.batch_shape, d))
            mean[name] = np.zeros((*site.batch_shape, d))
            log_z[name] = np.zeros(site.batch_shape)
            ok[name] = np.asarray(True)
        key = (cm.signature(), self.damping)
        if key not in _PROGRAMS:
            _PROGRAMS[key] = _Program(self._make_sweep(cm), partial(self._elbo, cm))
        self._program = _PROGRAMS[key]
        self._data = [np.asarray(a) for a in cm.data()]
        return CAVIState(mu, eta, mean, log_z, np.asarray(-np.inf), ok)

    def _make_sweep(self, cm: ConjugateModel) -> Callable[[list[Array], CAVIState], CAVIState]:
        """The sweep over all sites, a pure function of (data, state) for this structure."""
        rho = self.damping

        def site_update(name, data, state, first):
            fam = cm.families[name]
            grad = jax.grad(lambda m: cm.expected_log_joint({**state.mu, name: m}, data))(
                state.mu[name])
            eta = fam.natural(grad)
            eta = jnp.where(first | (rho == 0.0), eta, (1 - rho) * eta + rho * state.eta[name])
            return eta

        def apply(name, state, eta, idx=()):
            """Set site ``name`` (its element ``idx``; all elements for ()) to natural ``eta``."""
            fam = cm.families[name]
            ok = jnp.all(fam.family.in_domain(eta))
            safe = jnp.where(ok, eta, jnp.asarray(fam.oracle.default_init(), eta.dtype))
            mean, log_z = fam.oracle.mean_and_log_partition(safe)
            return state._replace(
                mu={**state.mu, name: state.mu[name].at[idx].set(fam.site_stats(mean))},
                eta={**state.eta, name: state.eta[name].at[idx].set(eta)},
                mean={**state.mean, name: state.mean[name].at[idx].set(mean)},
                log_partition={**state.log_partition,
                               name: state.log_partition[name].at[idx].set(log_z)},
                ok={**state.ok, name: state.ok[name] & ok})

        def sweep(data: list[Array], state: CAVIState) -> CAVIState:
            first = ~jnp.isfinite(state.elbo)
            for name, site in cm.sites.items():
                if not cm.self_coupled[name] or not site.batch_shape:
                    state = apply(name, state, site_update(name, data, state, first))
                    continue
                size = int(np.prod(site.batch_shape))

                def element(i, st, name=name, site=site):
                    idx = jnp.unravel_index(i, site.batch_shape)
                    return apply(name, st, site_update(name, data, st, first)[idx], idx)

                state = jax.lax.fori_loop(0, size, element, state)
            return state._replace(elbo=self._elbo(cm, data, state))

        return sweep

    @staticmethod
    def _elbo(cm: ConjugateModel, data: list[Array], state: CAVIState) -> Array:
        """E_q[log p] + sum over factors of the entropy A(eta) - eta . E[T]."""
        total = cm.expected_log_joint(state.mu, data)
        for name in cm.families:
            eta, mean = state.eta[name], state.mean[name]
            total = total + jnp.sum(state.log_partition[name] - jnp.sum(eta * mean, -1))
        return total

    def update(self, state: CAVIState) -> tuple[CAVIState, Array]:
        """One sweep over all sites: (new state, its ELBO)."""
        if self._program is None:
            raise RuntimeError("call CAVI.init(rng_key, *model_args) before update")
        state = self._program.sweep(self._data, state)
        return state, state.elbo

    def evaluate(self, state: CAVIState) -> Array:
        """The ELBO of ``state``."""
        if self._program is None:
            raise RuntimeError("call CAVI.init(rng_key, *model_args) before evaluate")
        return self._program.elbo(self._data, state)

    # -------------------------------------------------------------- the loop
    def run(self, rng_key: Array, num_steps: int, *args: Any, progress_bar: bool = False,
            init_state: CAVIState | None = None, **kwargs: Any) -> CAVIResult:
        """Up to ``num_steps`` sweeps from a prior draw (or ``init_state``); stops when the
        relative ELBO change falls below ``tol``. Compiled (``lax.while_loop``) unless
        ``progress_bar``."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        start = time.perf_counter()
        state = self.init(rng_key, *args, **kwargs) if init_state is None else init_state
        program, data, tol = self._program, self._data, self.tol
        if progress_bar:
            from tqdm.auto import tqdm
            history, steps = [], 0
            for _ in (bar := tqdm(range(num_steps), desc="CAVI")):
                previous = state.elbo
                state = program.sweep(data, state)
                steps += 1
                history.append(float(state.elbo))
                bar.set_postfix(elbo=f"{history[-1]:.6g}")
                if _converged(float(previous), history[-1], tol, np) or not all(
                        bool(v) for v in state.ok.values()):
                    break
            elbo = np.asarray(history)
        else:
            state, trace, steps = program.run(num_steps, tol)(data, state)
            steps = int(steps)
            elbo = np.asarray(trace)[:steps]
        jax.block_until_ready(state.elbo)
        wall = time.perf_counter() - start
        self._check(state, elbo)
        converged = len(elbo) >= 2 and bool(_converged(elbo[-2], elbo[-1], tol, np))
        params = {f"{name}_eta": eta for name, eta in state.eta.items()}
        return CAVIResult(params, elbo, converged, steps, wall, state, self.model, self.guide,
                          tuple(args), dict(kwargs))

    def _check(self, state: CAVIState, elbo: np.ndarray) -> None:
        cm = self.guide._require()
        bad = [name for name, ok in state.ok.items() if not bool(ok)]
        if bad:
            raise ValueError(
                f"the complete conditional of site(s) {bad} left the natural domain of its "
                f"family ({', '.join(cm.families[n].family.name for n in bad)}): the posterior "
                f"factor is improper (check the priors of these sites)")
        # rounding of the ELBO's sums: a few hundred ulps of its magnitude in its dtype
        dtype = np.asarray(state.elbo).dtype
        eps = 1e-9 if dtype == np.float64 else 100 * float(np.finfo(dtype).eps)
        drops = np.flatnonzero(np.diff(elbo) < -eps * np.maximum(1.0, np.abs(elbo[1:])))
        if drops.size:
            learned = [n for n, f in cm.families.items()
                       if type(f.oracle).__name__ != "ExactOracle"]
            cause = (f"the learned oracle(s) of site(s) {learned} are not exact; try damping="
                     f"0.5 or a more accurate oracle" if learned else "this should not happen "
                     "with exact oracles; please report it")
            warnings.warn(f"CAVI: the ELBO decreased at sweep(s) {(drops + 2).tolist()} "
                          f"(by up to {float(-np.diff(elbo).min()):.3g}); {cause}",
                          RuntimeWarning, stacklevel=3)


def _converged(previous: Array, current: Array, tol: float, xp: Any = jnp) -> Array:
    """|ELBO change| <= tol max(1, |ELBO|), in jnp (inside the loop) or numpy (``xp``)."""
    return xp.abs(current - previous) <= tol * xp.maximum(1.0, xp.abs(current))


class _Program:
    """The compiled pieces for one model structure (shared by every run on data of that
    structure): the sweep, the ELBO and the while-loop per (num_steps, tol)."""

    def __init__(self, sweep: Callable, elbo: Callable):
        self.raw_sweep = sweep
        self.sweep = jax.jit(sweep)
        self.elbo = jax.jit(elbo)
        self._runs: dict[tuple[int, float], Callable] = {}

    def run(self, num_steps: int, tol: float) -> Callable:
        """jit((data, state) -> (state, ELBO trace, steps)) for up to num_steps sweeps."""
        if (num_steps, tol) not in self._runs:
            sweep = self.raw_sweep

            def loop(data, state):
                def cond(carry):
                    st, prev, _, i = carry
                    ok = jnp.all(jnp.stack(list(st.ok.values())))
                    return (i < num_steps) & ok & ((i < 2) | ~_converged(prev, st.elbo, tol))

                def body(carry):
                    st, _, trace, i = carry
                    new = sweep(data, st)
                    return new, st.elbo, trace.at[i].set(new.elbo), i + 1

                trace = jnp.full((num_steps,), jnp.nan)
                carry = (state, jnp.asarray(-jnp.inf), trace, jnp.asarray(0))
                state, _, trace, steps = jax.lax.while_loop(cond, body, carry)
                return state, trace, steps

            self._runs[(num_steps, tol)] = jax.jit(loop)
        return self._runs[(num_steps, tol)]


# compiled programs by (model structure, damping): new data of the same shapes reuses them
_PROGRAMS: dict[tuple, _Program] = {}

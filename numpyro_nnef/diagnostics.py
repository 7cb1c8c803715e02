"""Vectorised MCMC diagnostics matching ArviZ 0.23 (``az.ess``, ``az.rhat``, ``az.mcse``).

Every function takes draws of shape ``(chain, draw, *rest)`` and returns an array of shape
``rest`` holding what ArviZ's defaults compute for each ``x[:, :, *i]`` separately:

- :func:`ess_bulk`: ``az.ess(method="bulk")``, ESS of the rank-normalised split chains;
- :func:`ess_tail`: ``az.ess(method="tail")``, min of the ESS of the indicators x <= q_0.05 and
  x <= q_0.95 (type-7 quantiles of all draws) over split chains;
- :func:`rhat`: ``az.rhat(method="rank")``, max of the rank-normalised split R-hat of x and of
  |x - median(x)| (Vehtari et al. 2021);
- :func:`mcse_mean`: ``az.mcse(method="mean")``, std(x, ddof=1) / sqrt(ESS of the split chains).

ArviZ's conventions are kept: chains are split into their first and last ``draw // 2`` draws (the
middle draw of an odd count is dropped); ranks are averaged over ties and mapped through
``Phi^-1((rank - 3/8) / (n + 1/4))``; an ESS of a series whose range is below float resolution
is its size (e.g. a constant series); NaN anywhere in a series, fewer than 4 draws, or (R-hat)
a single chain give NaN. All series are processed together by array operations (no Python
loop over series or lags); results agree with ArviZ to float rounding (~1e-14 relative).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special
from scipy.fftpack import next_fast_len  # the padding ArviZ uses

__all__ = ["ess_bulk", "ess_tail", "mcse_mean", "rhat"]

_MIN_DRAWS = 4


# ---------------------------------------------------------------------------------------------
# helpers on arrays of shape (m, chain, draw): m independent series
# ---------------------------------------------------------------------------------------------
def _split(a):
    """(m, C, D) -> (m, 2C, D // 2): first halves of all chains, then their last halves."""
    half = a.shape[-1] // 2
    return np.concatenate([a[..., :half], a[..., a.shape[-1] - half:]], axis=1)


def _z_scale(a):
    """Rank-normalise each series over all its chains and draws as ArviZ does: average ranks of
    ties, then ``Phi^-1((rank - 3/8) / (n + 1/4))``. Phi^-1 (``ndtri``, which ``norm.ppf`` calls)
    is evaluated once per possible average rank (k / 2 + 1, k = 0..2n-2), not once per draw."""
    m, c, d = a.shape
    n = c * d
    x = a.reshape(m, n)
    order = np.argsort(x, axis=-1)
    s = np.take_along_axis(x, order, axis=-1)
    new = np.ones(x.shape, bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]  # sorted position starts a run of ties (or a row)
    starts = np.flatnonzero(new)  # runs of the flattened (m * n) array, never across rows
    ends = np.append(starts[1:], new.size) - 1
    run = np.cumsum(new.ravel()) - 1
    twice_rank = (starts[run] + ends[run]).reshape(m, n) - 2 * n * np.arange(m)[:, None]
    rank = np.arange(2 * n - 1) / 2 + 1  # (first + last) / 2 + 1 of a run, 0-based positions
    table = special.ndtri((rank - 3 / 8) / (n - 2 * 3 / 8 + 1))
    z = np.empty(x.shape)
    np.put_along_axis(z, order, table[twice_rank], axis=-1)
    return np.where(np.isnan(x), np.nan, z).reshape(a.shape)  # NaN: as nan_policy="omit"


def _pooled(a):
    """(m, C, D) -> (m, C * D), each row contiguous (so reductions match ArviZ's ``np.std``)."""
    return np.ascontiguousarray(a.reshape(a.shape[0], -1))


def _quantiles(a, probs):
    """Type-7 quantiles of each pooled series, (m, len(probs)), with the exact arithmetic of
    ``scipy.stats.mstats.mquantiles(alphap=1, betap=1)`` (which ArviZ uses)."""
    x = np.sort(_pooled(a), axis=-1)
    n = x.shape[-1]
    p = np.asarray(probs, dtype=np.float64)
    alphap = betap = 1  # R's type 7
    aleph = n * p + (alphap + p * (1.0 - alphap - betap))
    k = np.floor(aleph.clip(1, n - 1)).astype(int)
    gamma = (aleph - k).clip(0, 1)
    return (1.0 - gamma) * x[:, k - 1] + gamma * x[:, k]


def _mean_autocov(a):
    """ArviZ's FFT autocovariance (lags 0..D-1, divided by D) averaged over chains, (m, D);
    the chain average is taken before the inverse FFT (it is linear)."""
    n = a.shape[-1]
    size = next_fast_len(2 * n)
    f = np.fft.rfft(a - a.mean(axis=-1, keepdims=True), n=size, axis=-1)
    power = (f.real**2 + f.imag**2).mean(axis=1)
    return np.fft.irfft(power, n=size, axis=-1)[..., :n] / n


def _ess(a):
    """ESS of each (chain, draw) series of ``a`` (m, C, D): Geyer's initial positive then
    initial monotone sequence on the multi-chain autocorrelations, as in ArviZ's ``_ess``."""
    a = np.asarray(a, dtype=np.float64)
    _, n_chain, n = a.shape
    size = n_chain * n
    acov = _mean_autocov(a)  # (m, D)
    mean_var = acov[:, :1] * n / (n - 1.0)
    var_plus = mean_var * (n - 1.0) / n
    if n_chain > 1:
        var_plus = var_plus + np.var(a.mean(axis=-1), axis=-1, ddof=1)[:, None]
    rho = 1.0 - (mean_var - acov) / var_plus  # (m, D); rho[:, 0] is taken as exactly 1
    rho[:, 0] = 1.0

    # pair sums P_k = rho(2k) + rho(2k+1) for the pairs ArviZ's loop can reach (k <= k_max)
    k_max = max((n - 3) // 2, 0)
    even, odd = rho[:, 0:2 * k_max + 1:2], rho[:, 1:2 * k_max + 2:2]
    pairs = even + odd  # (m, k_max + 1)
    # the loop visits pair k >= 1 while all of P_0..P_{k-1} > 0; last = index of the last pair
    # it read (0 if none): pairs 0..last-1 are kept (monotone: running min), pair `last`
    # contributes its even lag only if P_last >= 0 or rho(2 last) > 0
    last = np.sum(np.cumprod(pairs[:, :k_max] > 0, axis=1), axis=1)
    kept = np.arange(k_max + 1) < last[:, None]
    monotone = np.minimum.accumulate(pairs, axis=1)
    rows = np.arange(len(last))
    even_last, pair_last = even[rows, last], pairs[rows, last]
    rho_last = np.where((pair_last >= 0) | (even_last > 0), even_last, 0.0)
    tau = -1.0 + 2.0 * np.sum(np.where(kept, monotone, 0.0), axis=1) + rho_last
    ess = size / np.maximum(tau, 1 / np.log10(size))
    ess = np.where(np.isnan(rho[:, 1]), np.nan, ess)
    # a series whose range is below float resolution (e.g. constant) has ESS = its size
    span = a.max(axis=(1, 2)) - a.min(axis=(1, 2))
    return np.where(span < np.finfo(float).resolution, float(size), ess)


def _rhat(a):
    """Split R-hat of each (chain, draw) series of ``a`` (m, C, D), as ArviZ's ``_rhat``."""
    n = a.shape[-1]
    between = n * np.var(a.mean(axis=-1), axis=-1, ddof=1)
    within = np.mean(np.var(a, axis=-1, ddof=1), axis=-1)
    return np.sqrt((between / within + n - 1) / n)


def _max(first, second):
    """Elementwise builtin ``max(first, second)`` as ArviZ calls it: NaN in ``first`` wins."""
    return np.where(second > first, second, first)


def _min(first, second):
    """Elementwise builtin ``min(first, second)`` as ArviZ calls it: NaN in ``first`` wins."""
    return np.where(second < first, second, first)


def _diagnostic(x, fn, min_chains=1):
    """Apply ``fn`` ((m, C, D) -> (m,)) to ``x`` (chain, draw, *rest); NaN where ArviZ would
    refuse the series (any NaN, fewer than 4 draws, fewer than ``min_chains`` chains)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"draws must have shape (chain, draw, *rest), got {x.shape}")
    chains, draws, *rest = x.shape
    if draws < _MIN_DRAWS or chains < min_chains or math.prod(rest) == 0:
        return np.full(rest, np.nan)
    a = np.moveaxis(x, (0, 1), (-2, -1)).reshape(-1, chains, draws)  # (m, chain, draw), one copy
    with np.errstate(all="ignore"):
        out = fn(np.ascontiguousarray(a))
    return np.where(np.isnan(a).any(axis=(1, 2)), np.nan, out).reshape(rest)


# ---------------------------------------------------------------------------------------------
# public diagnostics: (chain, draw, *rest) -> rest
# ---------------------------------------------------------------------------------------------
def ess_bulk(x):
    """Bulk ESS, ``az.ess(x, method="bulk")`` per series: ESS of rank-normalised split chains."""
    return _diagnostic(x, lambda a: _ess(_z_scale(_split(a))))


def ess_tail(x):
    """Tail ESS, ``az.ess(x, method="tail")`` per series: min over the 5% and 95% quantiles of
    the ESS of the split-chain indicators x <= quantile."""
    def fn(a):
        below = a[:, None] <= _quantiles(a, (0.05, 0.95))[:, :, None, None]  # (m, 2, C, D)
        ess = _ess(_split(below.reshape((-1,) + a.shape[1:]))).reshape(-1, 2)
        return _min(ess[:, 0], ess[:, 1])

    return _diagnostic(x, fn)


def rhat(x):
    """Rank-normalised split R-hat, ``az.rhat(x)`` per series (NaN for a single chain)."""
    def fn(a):
        split = _split(a)
        folded = np.abs(split - np.median(_pooled(split), axis=-1)[:, None, None])
        return _max(_rhat(_z_scale(split)), _rhat(_z_scale(folded)))

    return _diagnostic(x, fn, min_chains=2)


def mcse_mean(x):
    """Monte Carlo standard error of the mean, ``az.mcse(x, method="mean")`` per series:
    std over all draws (ddof=1) / sqrt(ESS of the raw split chains)."""
    return _diagnostic(x, lambda a: np.std(_pooled(a), axis=-1, ddof=1) / np.sqrt(_ess(_split(a))))

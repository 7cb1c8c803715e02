"""Conditional normalizing flows as learned samplers against NUTS, on families with exact answers.

For each family (LaplaceProduct 2-d, GaussLaplace, RectifiedGaussian, MultivariateNormal 3-d) a
set of N test eta is drawn from the family's box (the boxes of ``benchmarks/oracles.py`` where
the families overlap). In one run, per family:

* NUTS unit: ``generate_dataset`` on the test eta (4 chains x (500 warm-up + 1000 draws), no
  retries, so that every eta costs the same), after an untimed warm-up call on the first chunk
  (compilation excluded). NUTS s/eta = timed wall time / N. nRMSE of its means against
  ``ExactOracle``. Draws/s: ``sample_family(family, etas, sample_shape=(DRAWS,))`` with its
  defaults (2 chains, 300 warm-up steps) on the N eta, after a warm-up call with the same shapes
  ("NUTS draws/s"); the dataset run's kept draws / s is recorded too.
* flow unit, for each architecture of ``FLOW_SAMPLER_ARCHITECTURES``: ``train_flow_sampler`` on
  the box (default hyperparameters, TRAIN settings below; train s is its wall time, compilation
  included). Then ``importance_dataset`` on the N test eta at S = 1000 and S = 4000 draws per eta
  (the package default), each timed after an untimed warm-up call on one chunk of eta (same
  compiled shapes). The two timings give IS s/eta = a + b S (a fixed cost per eta, host work of
  the PSIS fit, plus a cost per draw), from which S_eq = (NUTS s/eta - a) / b, rounded down to a
  multiple of 500 and capped at S_MAX, is the number of draws per eta that costs NUTS's wall time;
  ``importance_dataset`` is then run (and timed) at S_eq. Draws/s: ``sampler.sample(key, etas,
  (DRAWS,))`` on the N eta, compiled, median of 3 calls after a warm-up call.

Definitions:

* nRMSE = sqrt(mean_j (RMSE_j / sd_j)^2): RMSE_j of statistic j over the test eta, sd_j the
  standard deviation of the exact E[T_j] over the same eta (as in ``benchmarks/oracles.py``).
  For importance sampling all N eta count, whatever their k-hat; an eta without a finite
  estimate makes the nRMSE infinite (counted in the "no estimate" column).
* Equal wall time, amortised view (the goal): the flow is trained once per family and reused for
  any number of eta, so its training is not charged to these N eta; importance sampling gets
  S_eq draws per eta, whose measured cost is reported next to NUTS's (ratio "IS/NUTS time").
* Equal wall time, training included: training plus importance sampling on the N eta must cost
  no more than NUTS on the N eta; the largest measured S (of 1000, 4000, S_eq) that fits is
  used, or none ("-") when training alone costs more; "break-even N" is the number of eta above
  which training once plus S = 4000 draws per eta costs less than NUTS.
* k-hat: ArviZ PSIS k-hat per eta (``importance_dataset``'s extras), at S_eq (goal: < 0.7 on at
  least 95% of the eta) and at S = 4000.
* draws/s ratio = flow draws/s / NUTS draws/s (goal >= 100).

Results are cached per unit (family, NUTS or architecture) in the JSON file, written atomically
after every unit, so an interrupted run resumes where it stopped; ``--rerun`` runs the selected
units again. The unit keys include a hash of the package files the units use, so a changed
sampler or NUTS code is re-measured. The markdown is always rewritten from the JSON.

    python benchmarks/flows.py [--families ...] [--architectures ...] [--quick] [--rerun]
                               [--report-only]

``--quick`` is a smoke test (30 eta, 200 training steps, short NUTS; a few minutes), written to
/tmp/flows_quick/.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import time
import traceback
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from plots import plot_flows
from results_cache import read_results, save_result, write_atomic

import numpyro_nnef as nnef
from numpyro_nnef import families
from numpyro_nnef.nn.bijections import FLOW_SAMPLER_ARCHITECTURES

jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES = tuple(FLOW_SAMPLER_ARCHITECTURES)
DEFAULT_ARCHITECTURE = inspect.signature(nnef.train_flow_sampler).parameters["architecture"].default
DEFENSIVE = inspect.signature(nnef.importance_dataset).parameters["defensive"].default

# label -> (family factory, eta low, eta high); uniform boxes
FAMILIES = {
    "LaplaceProduct-2d": (  # (a_1, a_2, b_1, b_2) in [0.5, 3] (benchmarks/oracles.py)
        lambda: families.LaplaceProduct(2), [0.5] * 4, [3.0] * 4,
    ),
    "GaussLaplace": (  # a Gaussian times exp(eta3 |x|), eta3 <= 0 (benchmarks/oracles.py)
        families.GaussLaplace, [-2.0, -2.0, -2.0], [2.0, -0.25, 0.0],
    ),
    "RectifiedGaussian": (  # (benchmarks/oracles.py)
        families.RectifiedGaussian, [-2.0, -2.0], [2.0, -0.25],
    ),
    "MultivariateNormal-3d": (  # h in [-2, 2]^3, precision diagonal in [0.5, 5], |offdiag| <= 0.2
        # (the 2-d box of benchmarks/oracles.py with |offdiag| <= 0.2 instead of 0.3, so that
        # every corner of the 3-d box is positive definite: smallest eigenvalue >= 0.1)
        lambda: families.MultivariateNormal(3),
        [-2.0, -2.0, -2.0, -2.5, -0.2, -0.2, -2.5, -0.2, -2.5],
        [2.0, 2.0, 2.0, -0.25, 0.2, 0.2, -0.25, 0.2, -0.25],
    ),
}

FULL = {
    "num_etas": 200,
    "nuts": {"num_chains": 4, "num_warmup": 500, "num_samples": 1000, "max_retries": 0,
             "chunk_size": 50},
    "train": {"num_steps": 2000, "batch_size": 256, "learning_rate": 1e-3},
    "draws": 1000, "few_draws": 10, "s_max": 65536, "output": "benchmarks/results/flows",
    "defensive": DEFENSIVE,  # importance_dataset's default, recorded
}
QUICK = {
    "num_etas": 30,
    "nuts": {"num_chains": 2, "num_warmup": 200, "num_samples": 200, "max_retries": 0,
             "chunk_size": 15},
    "train": {"num_steps": 200, "batch_size": 128, "learning_rate": 3e-3},
    "draws": 200, "few_draws": 10, "s_max": 8000, "output": "/tmp/flows_quick/flows",
    "defensive": DEFENSIVE,
}
SEED = 0
CALIBRATION = (1000, 4000)  # importance draws per eta timed to fit a + b S
DRAWS_PER_CHUNK = 2**18  # importance_dataset chunk_size = this // S (memory), at most 64
GOAL_RMSE_RATIO, GOAL_KHAT_FRACTION, GOAL_SPEEDUP = 0.5, 0.95, 100.0
PACKAGE_FILES = ("samplers.py", "sampling.py", "nn/bijections.py", "family.py", "dataset.py",
                 "_io.py", "families", "oracles/exact.py")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def load_average() -> float:
    return os.getloadavg()[0]


def eval_etas(label: str, config: dict) -> np.ndarray:
    make, low, high = FAMILIES[label]
    key = jax.random.fold_in(jax.random.key(SEED), list(FAMILIES).index(label))
    return nnef.sample_etas(make(), key=key, low=low, high=high, num=config["num_etas"])


def normalised_rmse(pred: np.ndarray, exact: np.ndarray, spread: np.ndarray
                    ) -> tuple[list[float], float]:
    """(RMSE per statistic, sqrt(mean_j (RMSE_j / spread_j)^2)); inf if pred has a NaN."""
    if not np.all(np.isfinite(pred)):
        return [float("inf")] * exact.shape[1], float("inf")
    rmse = np.sqrt(np.mean((pred - exact) ** 2, axis=0))
    return rmse.tolist(), float(np.sqrt(np.mean((rmse / spread) ** 2)))


def exact_means(label: str, etas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    family = FAMILIES[label][0]()
    mu = np.asarray(nnef.ExactOracle(family).mean(jnp.asarray(etas)))
    return mu, mu.std(axis=0)


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    """(median wall time of ``repeats`` calls, the last result), results blocked on."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def khat_summary(khat: np.ndarray) -> dict:
    finite = khat[~np.isnan(khat)]  # -inf (q = p to rounding) counts as a good fit
    return {
        "median": float(np.median(finite)) if finite.size else None,
        "q90": float(np.quantile(finite, 0.9)) if finite.size else None,
        "max": float(np.max(khat)) if not np.isnan(khat).any() else float("nan"),
        "frac_below_0.7": float(np.mean(khat < 0.7)),  # NaN (degenerate fit) counts as failed
        "num_nan": int(np.isnan(khat).sum()),
    }


# ---------------------------------------------------------------------------------------------
# units
# ---------------------------------------------------------------------------------------------
def unit_nuts(label: str, config: dict) -> dict:
    family = FAMILIES[label][0]()
    etas = eval_etas(label, config)
    exact, spread = exact_means(label, etas)
    nuts = config["nuts"]
    key = jax.random.fold_in(jax.random.key(SEED + 1), list(FAMILIES).index(label))
    load_before = load_average()
    start = time.perf_counter()
    nnef.generate_dataset(family, etas[:nuts["chunk_size"]], key=jax.random.fold_in(key, 99),
                          progress=False, **nuts)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    data = nnef.generate_dataset(family, etas, key=key, progress=False, **nuts)
    seconds = time.perf_counter() - start
    rmse, nrmse = normalised_rmse(data.mean, exact, spread)
    draws = config["draws"]

    def draw():
        return nnef.sample_family(family, jnp.asarray(etas), key=jax.random.fold_in(key, 7),
                                  sample_shape=(draws,))

    start = time.perf_counter()
    jax.block_until_ready(draw())  # compile
    draws_warmup_s = time.perf_counter() - start
    draws_s, _ = timed(draw)
    few = config["few_draws"]

    def draw_few():
        return nnef.sample_family(family, jnp.asarray(etas), key=jax.random.fold_in(key, 8),
                                  sample_shape=(few,))

    jax.block_until_ready(draw_few())  # compile
    few_s, _ = timed(draw_few)
    ess = np.min(data.ess_bulk, axis=1)
    return {
        "family": label, "kind": "nuts", "num_etas": len(etas), "nrmse": nrmse, "rmse": rmse,
        "spread": spread.tolist(), "seconds": seconds, "s_per_eta": seconds / len(etas),
        "warmup_call_s": warmup_s, "failed": int((~data.passed).sum()),
        "diverged": int((data.divergences > 0).sum()),
        "median_min_ess": float(np.median(ess)),
        "dataset_draws_per_s": nuts["num_chains"] * nuts["num_samples"] * len(etas) / seconds,
        "ess_per_s": float(np.sum(ess) / seconds),
        "draws_per_s": draws * len(etas) / draws_s, "draws_call_s": draws_s,
        "draws_warmup_call_s": draws_warmup_s,
        "few_draws_per_s": few * len(etas) / few_s,
        "load_before": load_before, "load_after": load_average(),
    }


def run_importance(family, sampler, etas: np.ndarray, num_samples: int, key) -> tuple[float,
                                                                                      object]:
    """(seconds for importance_dataset on all etas, dataset), after an untimed warm-up call on
    one chunk (the same compiled shapes)."""
    chunk = int(max(1, min(64, DRAWS_PER_CHUNK // num_samples, len(etas))))
    kwargs = {"num_samples": int(num_samples), "chunk_size": chunk, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # dropped draws: recorded in extras
        nnef.importance_dataset(family, sampler, etas[:chunk], key=jax.random.fold_in(key, 1),
                                **kwargs)
        start = time.perf_counter()
        data = nnef.importance_dataset(family, sampler, etas, key=key, **kwargs)
        return time.perf_counter() - start, data


def importance_row(data, seconds: float, exact: np.ndarray, spread: np.ndarray) -> dict:
    finite = np.all(np.isfinite(data.mean), axis=1)
    rmse, nrmse = normalised_rmse(data.mean, exact, spread)
    ok_rmse = (normalised_rmse(data.mean[finite], exact[finite], spread)[1]
               if finite.any() else float("inf"))
    return {
        "num_samples": int(data.metadata["sampler"]["num_samples"]), "seconds": seconds,
        "s_per_eta": seconds / len(data), "nrmse": nrmse, "rmse": rmse,
        "nrmse_finite": ok_rmse, "no_estimate": int((~finite).sum()),
        "khat": khat_summary(np.asarray(data.extras["khat"], np.float64)),
        "dropped_draws": int(np.sum(data.extras["dropped"])),
        "median_ess": float(np.median(data.ess_bulk[:, 0])),
        "ess_per_s": float(np.sum(data.ess_bulk[:, 0]) / seconds),
    }


def unit_flow(label: str, architecture: str, config: dict, nuts_s_per_eta: float) -> dict:
    family = FAMILIES[label][0]()
    _, low, high = FAMILIES[label]
    etas = eval_etas(label, config)
    exact, spread = exact_means(label, etas)
    index = list(FAMILIES).index(label) * 100 + ARCHITECTURES.index(architecture)
    key = jax.random.fold_in(jax.random.key(SEED + 2), index)
    k_train, k_is, k_draw = jax.random.split(key, 3)
    load_before = load_average()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # dropped/skipped: in the report
        sampler = nnef.train_flow_sampler(
            family, {"low": low, "high": high}, key=k_train, architecture=architecture,
            progress=False, out_of_range="error", **config["train"])
    report = sampler.report
    rungs = {}
    for s in CALIBRATION:
        seconds, data = run_importance(family, sampler, etas, s, jax.random.fold_in(k_is, s))
        rungs[s] = importance_row(data, seconds, exact, spread)
    (s0, s1) = CALIBRATION
    per_draw = max((rungs[s1]["s_per_eta"] - rungs[s0]["s_per_eta"]) / (s1 - s0), 1e-12)
    fixed = max(rungs[s0]["s_per_eta"] - per_draw * s0, 0.0)
    s_eq_raw = (nuts_s_per_eta - fixed) / per_draw
    s_eq = int(min(config["s_max"], max(500, 500 * int(s_eq_raw // 500))))
    if s_eq in rungs:
        eq = rungs[s_eq]
    else:
        seconds, data = run_importance(family, sampler, etas, s_eq,
                                       jax.random.fold_in(k_is, s_eq))
        eq = importance_row(data, seconds, exact, spread)
    e = jnp.asarray(etas)
    draws = config["draws"]
    timed(lambda: sampler.sample(jax.random.fold_in(k_draw, 0), e, (draws,)))  # compile
    draws_s, _ = timed(lambda: sampler.sample(jax.random.fold_in(k_draw, 1), e, (draws,)), 3)
    few = config["few_draws"]
    timed(lambda: sampler.sample(jax.random.fold_in(k_draw, 2), e, (few,)))  # compile
    few_s, _ = timed(lambda: sampler.sample(jax.random.fold_in(k_draw, 3), e, (few,)), 3)
    return {
        "family": label, "kind": "flow", "architecture": architecture,
        "num_etas": len(etas), "train_s": report.seconds,
        "final_loss": report.history["loss"][-1] if report.history["loss"] else None,
        "train_dropped_draws": report.dropped_draws, "train_skipped_steps": report.skipped_steps,
        "calibration": {str(s): r for s, r in rungs.items()},
        "is_fixed_s_per_eta": fixed, "is_s_per_draw": per_draw,
        "nuts_s_per_eta_used": nuts_s_per_eta, "s_eq_unrounded": s_eq_raw,
        "s_eq_capped": bool(s_eq_raw >= config["s_max"] + 500), "equal_time": eq,
        "draws_per_s": draws * len(etas) / draws_s, "draws_call_s": draws_s,
        "few_draws_per_s": few * len(etas) / few_s,
        "load_before": load_before, "load_after": load_average(),
    }


# ---------------------------------------------------------------------------------------------
# results file
# ---------------------------------------------------------------------------------------------
def code_version() -> dict:
    pkg = Path(nnef.__file__).resolve().parent
    digest = hashlib.sha256()
    paths = []
    for name in PACKAGE_FILES:
        p = pkg / name
        paths += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    for p in paths:
        digest.update(str(p.relative_to(pkg)).encode() + b"\0" + p.read_bytes())
    head, dirty = "unknown", []
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "numpyro_nnef"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package_dir": str(pkg), "git_head": head, "package_sha": digest.hexdigest()[:12],
            "uncommitted": sorted(line[3:] for line in dirty if line.strip())}


def unit_key(label: str, unit: str, config: dict, package_sha: str) -> str:
    relevant = {k: v for k, v in config.items() if k != "output"}
    digest = hashlib.sha256(json.dumps([relevant, package_sha, SEED, CALIBRATION,
                                        FAMILIES[label][1:]], sort_keys=True).encode()
                            ).hexdigest()[:12]
    return f"{label}|{unit}|{digest}"


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def fmt(x, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "-"
    if isinstance(x, float) and np.isinf(x):
        return "inf"
    return format(x, spec)


def pass_miss(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def training_included(row: dict, nuts: dict) -> dict | None:
    """The largest measured importance run that, with training, fits in NUTS's time on the N
    eta; None if none does."""
    budget = nuts["seconds"] - row["train_s"]
    runs = [*row["calibration"].values(), row["equal_time"]]
    fits = [r for r in runs if r["seconds"] <= budget]
    return max(fits, key=lambda r: r["num_samples"]) if fits else None


def break_even(row: dict, nuts: dict) -> float:
    """Eta count above which training once + 4000 draws per eta costs less than NUTS."""
    saving = nuts["s_per_eta"] - row["calibration"]["4000"]["s_per_eta"]
    return row["train_s"] / saving if saving > 0 else float("inf")


def score(row: dict, nuts: dict) -> tuple:
    """Sort key: the fraction of eta with k-hat < 0.7 at S_eq, counted up to the goal's 95%
    (flows meeting the goal tie), then the nRMSE ratio at equal wall time."""
    eq = row["equal_time"]
    ratio = eq["nrmse"] / nuts["nrmse"]
    frac = min(eq["khat"]["frac_below_0.7"], GOAL_KHAT_FRACTION)
    return (-frac, ratio if np.isfinite(ratio) else np.inf)


def markdown(rows: dict, config: dict, labels: list[str], archs: list[str], version: dict,
             note: str) -> str:
    loads = [r[k] for r in rows.values() for k in ("load_before", "load_after") if k in r]
    run_s = sum(r.get("unit_s", 0.0) for r in rows.values())
    nuts_cfg, train = config["nuts"], config["train"]
    shas = sorted({r.get("code", {}).get("package_sha", "?") for r in rows.values()})
    text = [
        "# Conditional normalizing flows as learned samplers, against NUTS",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, "
        f"Python {platform.python_version()}, JAX {jax.__version__} on "
        f"{jax.default_backend()}; float64. 1-minute load average at the start and end of the "
        f"units: {fmt(min(loads)) if loads else '-'} to {fmt(max(loads)) if loads else '-'} "
        "(2 cores: a load above 2 means the measurements shared the CPU, which inflates NUTS's "
        "and the flows' wall times alike). The units shown took "
        f"{run_s / 60:.1f} min in all (the sum of their wall times). " + note,
        "",
        f"Code: numpyro_nnef git {version['git_head']}"
        + (f" with uncommitted changes in {', '.join(version['uncommitted'])}"
           if version["uncommitted"] else "")
        + f"; hash of the files the units use ({', '.join(PACKAGE_FILES)}): "
        f"{', '.join(shas)} (every unit in this report ran on "
        + ("that version)." if len(shas) == 1 else "one of these versions).") + "",
        "",
        f"Setup: per family N = {config['num_etas']} test eta drawn uniformly from the box "
        f"below (seed {SEED}). NUTS: `generate_dataset` with {nuts_cfg['num_chains']} chains x "
        f"({nuts_cfg['num_warmup']} warm-up + {nuts_cfg['num_samples']} draws), chunks of "
        f"{nuts_cfg['chunk_size']} eta, no retries (every eta costs the same; the default "
        "retries would re-run failing points with 2x and 4x the draws), timed after an untimed "
        "warm-up call on the first chunk (compilation excluded). Flows: `train_flow_sampler` "
        f"on the box with each architecture's default hyperparameters, {train['num_steps']} "
        f"steps, batch {train['batch_size']}, learning rate {train['learning_rate']} (cosine "
        "decay); train s includes compilation. Importance sampling: `importance_dataset` on the "
        "same N eta with its defaults (defensive proposal: a share "
        f"{config.get('defensive', 'n/a')} of the draws from a Student-t "
        "twice as wide as the flow, in the unconstrained coordinates), each call timed after "
        "an untimed warm-up call on one chunk (compilation excluded). Draws/s: flow = "
        "`sampler.sample(key, etas, "
        f"({config['draws']},))` on the N eta (median of 3 calls after a warm-up call); NUTS = "
        f"`sample_family(family, etas, sample_shape=({config['draws']},))` with its defaults "
        "(2 chains, 300 warm-up steps; one call after a warm-up call). The goal column uses "
        f"{config['draws']} draws per eta; the last column repeats the measurement with "
        f"{config['few_draws']} draws per eta (as when drawing a few samples at many eta, e.g. "
        "`Predictive`), where NUTS's warm-up is spread over fewer draws.",
        "",
        "Equal wall time: NUTS's measured cost per eta (s/eta, compilation excluded) is the "
        "budget. Importance sampling's cost per eta was timed at S = "
        f"{CALIBRATION[0]} and {CALIBRATION[1]} draws and fitted as a + b S (a: a fixed cost "
        "per eta, host work: the PSIS fit and estimates; b: per draw); S_eq = (NUTS s/eta - a) "
        f"/ b, rounded down to a multiple of 500 and capped at {config['s_max']}, and the "
        "dataset at S_eq was made and timed (its time over NUTS's is shown: near 1 means "
        "equal time held; below 1 means the cap or rounding gave importance sampling less "
        "time). Amortised view (the goal): the flow is trained once per family and serves any "
        "number of eta, so training is not charged to these N eta. Training-included view: "
        "training + importance sampling on the N eta must fit in NUTS's time on the N eta; the "
        f"largest measured S ({CALIBRATION[0]}, {CALIBRATION[1]} or S_eq) that fits is used. "
        "Break-even N = the number of eta above which training once plus 4000 draws per eta "
        "costs less than NUTS.",
        "",
        "nRMSE = sqrt(mean_j (RMSE_j / sd_j)^2) over the N eta, sd_j the sd of the exact E[T_j] "
        "over them (`ExactOracle`), as in `benchmarks/oracles.py`; importance-sampled nRMSE "
        "counts every eta, whatever its k-hat. k-hat = ArviZ's PSIS k-hat per eta (-inf where "
        "all weights are equal counts as < 0.7, NaN as failed).",
        "",
    ]
    goals = [
        "## Goals",
        "",
        "| family | best flow | k-hat < 0.7 on >= 95% of eta (at S_eq) | nRMSE IS / NUTS <= "
        "0.5 at equal wall time (amortised) | same, training included | draws/s flow / NUTS "
        f">= 100 ({config['draws']} draws per eta) |",
        "|---|---|---|---|---|---|",
    ]
    misses, summary, best_arch = [], [], {}
    for label in labels:
        nuts = rows.get((label, "nuts"))
        flows = [rows[(label, a)] for a in archs if (label, a) in rows]
        make, low, high = FAMILIES[label]
        text += [f"## {label}", "", f"eta box low={low}, high={high} "
                 f"({make().stat_dim} natural parameters).", ""]
        if nuts is None or "error" in nuts:
            text += [f"NUTS unit missing or failed: {(nuts or {}).get('error', 'not run')}", ""]
            continue
        text += [
            f"NUTS: {nuts['seconds']:.1f} s for {nuts['num_etas']} eta = "
            f"{nuts['s_per_eta']:.3g} s/eta (warm-up call on the first chunk "
            f"{nuts['warmup_call_s']:.1f} s); nRMSE {fmt(nuts['nrmse'])}; "
            f"{nuts['failed']} eta fail the default diagnostics (r-hat <= 1.01, ESS >= 400, no "
            f"divergence; {nuts['diverged']} with divergences); median min-over-statistics "
            f"bulk ESS {nuts['median_min_ess']:.0f}; dataset draws/s "
            f"{nuts['dataset_draws_per_s']:.3g}; `sample_family` draws/s "
            f"{nuts['draws_per_s']:.3g} ({config['draws']} per eta), "
            f"{nuts['few_draws_per_s']:.3g} ({config['few_draws']} per eta).",
            "",
            "| flow | train s | k-hat median / 90% / max (S_eq) | k-hat < 0.7 (S_eq) | k-hat < "
            "0.7 (S=4000) | nRMSE S=4000 | S_eq | IS/NUTS time | nRMSE IS (S_eq) | nRMSE NUTS | "
            "ratio (amortised) | ratio (training incl., S) | break-even N | draws/s | draws/s "
            f"/ NUTS | ESS/s IS / NUTS | draws/s / NUTS ({config['few_draws']} per eta) |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        ok = [r for r in flows if "error" not in r]
        for r in flows:
            if "error" in r:
                text.append(f"| {r['architecture']} | failed: "
                            f"{r['error'].splitlines()[-1][:150]} |" + " |" * 15)
        for r in sorted(ok, key=lambda r: score(r, nuts)):
            eq, c4 = r["equal_time"], r["calibration"]["4000"]
            k = eq["khat"]
            inc = training_included(r, nuts)
            inc_cell = (f"{fmt(inc['nrmse'] / nuts['nrmse'])} ({inc['num_samples']})"
                        if inc else f"- (training + {CALIBRATION[0]} draws/eta > NUTS time)")
            nrmse_eq = fmt(eq["nrmse"]) + (f" ({eq['no_estimate']} no estimate)"
                                           if eq["no_estimate"] else "")
            text.append(
                f"| {r['architecture']} | {r['train_s']:.1f} | {fmt(k['median'], '.2f')} / "
                f"{fmt(k['q90'], '.2f')} / {fmt(k['max'], '.2f')} | "
                f"{k['frac_below_0.7']:.1%} | {c4['khat']['frac_below_0.7']:.1%} | "
                f"{fmt(c4['nrmse'])} | {eq['num_samples']}{'*' if r['s_eq_capped'] else ''} | "
                f"{eq['seconds'] / nuts['seconds']:.2f} | {nrmse_eq} | {fmt(nuts['nrmse'])} | "
                f"{fmt(eq['nrmse'] / nuts['nrmse'])} | {inc_cell} | "
                f"{fmt(break_even(r, nuts), '.0f')} | {r['draws_per_s']:.3g} | "
                f"{fmt(r['draws_per_s'] / nuts['draws_per_s'])} | "
                f"{fmt(eq['ess_per_s'] / nuts['ess_per_s'])} | "
                f"{fmt(r['few_draws_per_s'] / nuts['few_draws_per_s'])} |")
        text += [""]
        if any(r["s_eq_capped"] for r in ok):
            text += [f"\\* S_eq capped at {config['s_max']} draws per eta (memory and run "
                     "time): importance sampling got less time than NUTS.", ""]
        if not ok:
            continue
        best = min(ok, key=lambda r: score(r, nuts))
        best_arch[label] = best["architecture"]
        eq = best["equal_time"]
        frac = eq["khat"]["frac_below_0.7"]
        ratio = eq["nrmse"] / nuts["nrmse"]
        inc = training_included(best, nuts)
        inc_ratio = inc["nrmse"] / nuts["nrmse"] if inc else float("inf")
        speed = best["draws_per_s"] / nuts["draws_per_s"]
        goals.append(
            f"| {label} | {best['architecture']} | {pass_miss(frac >= GOAL_KHAT_FRACTION)} "
            f"({frac:.1%}) | {pass_miss(ratio <= GOAL_RMSE_RATIO)} ({fmt(ratio)}, S_eq "
            f"{eq['num_samples']}) | {pass_miss(inc_ratio <= GOAL_RMSE_RATIO)} "
            + (f"({fmt(inc_ratio)}, S {inc['num_samples']})" if inc else
               f"(training {best['train_s']:.0f} s + {CALIBRATION[0]} draws/eta > NUTS "
               f"{nuts['seconds']:.0f} s; break-even "
               f"N {fmt(break_even(best, nuts), '.0f')})")
            + f" | {pass_miss(speed >= GOAL_SPEEDUP)} ({speed:.3g}; "
            f"{fmt(best['few_draws_per_s'] / nuts['few_draws_per_s'])} at "
            f"{config['few_draws']} draws per eta) |")
        summary.append((label, best, nuts, frac, ratio, speed))
        if frac < GOAL_KHAT_FRACTION:
            misses.append(f"- {label}: the best flow ({best['architecture']}) has k-hat < 0.7 "
                          f"on {frac:.1%} of the eta at S_eq (goal 95%); max k-hat "
                          f"{fmt(eq['khat']['max'])}.")
        if ratio > GOAL_RMSE_RATIO:
            misses.append(f"- {label}: at equal wall time the best flow's nRMSE is "
                          f"{fmt(eq['nrmse'])} against NUTS's {fmt(nuts['nrmse'])} (ratio "
                          f"{fmt(ratio)} > {GOAL_RMSE_RATIO}).")
        if speed < GOAL_SPEEDUP:
            misses.append(f"- {label}: flow draws/s {best['draws_per_s']:.3g} is {speed:.3g}x "
                          f"NUTS's {nuts['draws_per_s']:.3g} (goal 100x).")
    text += goals + [""]
    text += ["Best flow per family (also the row order of the family tables): the one meeting "
             "the k-hat goal, else the one with the most eta with k-hat < 0.7 (an estimate at "
             "an eta with k-hat >= 0.7 is not to be trusted, however small this benchmark "
             "finds its error), then the lowest nRMSE ratio at equal wall time (amortised).",
             ""]
    ranks: dict[str, list[int]] = {}
    for label in labels:
        nuts = rows.get((label, "nuts"))
        ok = [rows[(label, a)] for a in archs
              if (label, a) in rows and "error" not in rows[(label, a)]]
        if nuts is None or "error" in nuts:
            continue
        for i, r in enumerate(sorted(ok, key=lambda r: score(r, nuts))):
            ranks.setdefault(r["architecture"], []).append(i + 1)
    if ranks:
        text += ["## Ranking over the families", "",
                 "| flow | mean rank | wins | families | mean k-hat < 0.7 (S_eq) | median ratio "
                 "(amortised) | median train s |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        order = sorted(ranks, key=lambda a: (len(ranks[a]) < len(labels), np.mean(ranks[a])))
        for a in order:
            wins = sum(1 for v in best_arch.values() if v == a)
            train_s = np.median([rows[(lbl, a)]["train_s"] for lbl in labels
                                 if (lbl, a) in rows and "error" not in rows[(lbl, a)]])
            mine = [(rows[(lbl, a)], rows[(lbl, "nuts")]) for lbl in labels
                    if (lbl, a) in rows and "error" not in rows[(lbl, a)]
                    and (lbl, "nuts") in rows and "error" not in rows[(lbl, "nuts")]]
            frac = np.mean([r["equal_time"]["khat"]["frac_below_0.7"] for r, _ in mine])
            ratio = np.median([r["equal_time"]["nrmse"] / n["nrmse"] for r, n in mine])
            text.append(f"| {a} | {np.mean(ranks[a]):.1f} | {wins} | {len(ranks[a])} | "
                        f"{frac:.1%} | {fmt(ratio)} | {train_s:.1f} |")
        text += ["", f"Recommended default architecture: **{order[0]}** (best mean rank by the "
                 "same order as the family tables: k-hat first, then the nRMSE ratio at equal "
                 "time). "
                 f"`train_flow_sampler`'s default is `{DEFAULT_ARCHITECTURE}`"
                 + (" (the same)." if order[0] == DEFAULT_ARCHITECTURE else
                    "; this table suggests changing it."), ""]
    text += ["## Misses", ""] + (misses or ["None."]) + [""]
    text += ["## Notes", ""] + notes(rows, config, labels, archs) + [""]
    return "\n".join(text)


def notes(rows: dict, config: dict, labels: list[str], archs: list[str]) -> list[str]:
    """Observations computed from the rows (so that they stay true after a rerun)."""
    out = []
    fractions = {}
    for label in labels:
        for a in archs:
            r = rows.get((label, a))
            if r and "error" not in r:
                fractions[(label, a)] = r["equal_time"]["khat"]["frac_below_0.7"]
    if fractions:
        top_arch = max({a for _, a in fractions}, key=lambda a: np.mean(
            [v for (_, b), v in fractions.items() if b == a]))
        per_family = []
        for label in labels:
            f = {a: fractions[(label, a)] for a in archs if (label, a) in fractions}
            if f:
                per_family.append(f"{label}: " + ", ".join(f"{a} {v:.0%}" for a, v in f.items()))
        out.append(
            "- k-hat < 0.7 (at S_eq) per flow: " + "; ".join(per_family) + f" (highest mean "
            f"over the families: {top_arch}). Every flow pushes a standard normal base through "
            "maps that are affine (realnvp, maf, iaf, glow) or linear outside the spline "
            "interval (nsf), so q has Gaussian tails in the unconstrained coordinate u, while "
            "some targets' tails there are exponential: RectifiedGaussian through "
            "`biject_to(nonnegative)` (x = exp u) has density ~ e^u as u -> -inf (p(0) > 0), "
            "LaplaceProduct has Laplace tails. Reverse KL hardly notices the missing tail mass "
            "(about 1% below u = -5 for RectifiedGaussian), and with q alone the weights p/q "
            "are unbounded there (k-hat > 0.7 at many eta: 63% below 0.7 for nsf on "
            "RectifiedGaussian in a side run). `importance_dataset`'s defensive proposal (the "
            "flow mixed with a Student-t twice as wide, in u) bounds them; what remains above "
            "0.7 is where the flow misses the bulk itself.")
    speeds, few = [], []
    for label in labels:
        nuts = rows.get((label, "nuts"))
        if not nuts or "error" in nuts:
            continue
        for a in archs:
            r = rows.get((label, a))
            if r and "error" not in r:
                speeds.append(r["draws_per_s"] / nuts["draws_per_s"])
                few.append(r["few_draws_per_s"] / nuts["few_draws_per_s"])
    if speeds:
        out.append(
            f"- Draws/s: flows over NUTS range {min(speeds):.3g}x to {max(speeds):.3g}x with "
            f"{config['draws']} draws per eta, {min(few):.3g}x to {max(few):.3g}x with "
            f"{config['few_draws']} per eta. On this CPU a flow draw costs a few microseconds "
            "for d >= 2 (the coupling networks run per draw; their eta part runs once per eta), "
            "well under one for d = 1 (all network work runs once per eta; a draw costs the "
            "spline or affine maps only), while NUTS, vectorised over eta and chains, needs only "
            "a few gradient steps per draw once its 300 warm-up steps are spread over many "
            "draws"
            + (f"; the 100x goal is out of reach here at {config['draws']} draws per eta"
               if max(speeds) < GOAL_SPEEDUP else "")
            + ", and the ratio grows as fewer draws are wanted per eta.")
    out.append(
        "- The importance-sampled nRMSE counts every eta, also those with k-hat >= 0.7, whose "
        "estimates may be biased; a dataset from `importance_dataset` flags them "
        "(passed=False) so that they can be dropped or re-done by NUTS "
        "(`redo_with_nuts=True`, not used here). The NUTS datasets here "
        "ran without retries; eta failing the default diagnostics are counted in each "
        "family's NUTS line and included in its nRMSE as well.")
    return out


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--architectures", nargs="*", default=list(ARCHITECTURES),
                        choices=list(ARCHITECTURES))
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: few eta and steps, output under /tmp/flows_quick/")
    parser.add_argument("--rerun", action="store_true", help="ignore cached units")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the markdown from the JSON, run nothing")
    parser.add_argument("--note", default="", help="a sentence added to the report's header")
    parser.add_argument("--output", default=None, help="output stem (.md and .json are added)")
    args = parser.parse_args()

    config = json.loads(json.dumps(QUICK if args.quick else FULL))
    stem = Path(args.output or config["output"])
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    results = read_results(json_path)
    version = code_version()
    start = time.perf_counter()
    wanted = [(label, unit) for label in args.families
              for unit in ["nuts", *args.architectures]]
    for i, (label, unit) in enumerate(wanted):
        if args.report_only:
            break
        key = unit_key(label, unit, config, version["package_sha"])
        if key in results and not args.rerun:
            print(f"[flows] {label}/{unit}: cached", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            if unit == "nuts":
                row = unit_nuts(label, config)
            else:
                nuts = results.get(unit_key(label, "nuts", config, version["package_sha"]))
                if nuts is None or "error" in nuts:
                    raise RuntimeError("the family's NUTS unit is missing or failed")
                row = unit_flow(label, unit, config, nuts["s_per_eta"])
        except Exception as err:
            traceback.print_exc()
            row = {"family": label, "kind": "nuts" if unit == "nuts" else "flow",
                   "architecture": unit,
                   "error": "".join(traceback.format_exception_only(err)).strip()}
        row["unit_s"] = time.perf_counter() - t0
        row["code"] = version
        row["config_key"] = key
        results = save_result(json_path, key, row)
        if "error" in row:
            summary = row["error"].splitlines()[-1][:160]
        elif unit == "nuts":
            summary = (f"{row['s_per_eta']:.3g} s/eta, nRMSE {row['nrmse']:.3g}, "
                       f"{row['draws_per_s']:.3g} draws/s")
        else:
            eq = row["equal_time"]
            summary = (f"train {row['train_s']:.0f} s, S_eq {eq['num_samples']}, k-hat<0.7 "
                       f"{eq['khat']['frac_below_0.7']:.0%}, nRMSE {eq['nrmse']:.3g}, "
                       f"{row['draws_per_s']:.3g} draws/s")
        print(f"[flows] {i + 1}/{len(wanted)} {label}/{unit}: {summary} "
              f"({row['unit_s']:.0f} s, total {(time.perf_counter() - start) / 60:.1f} min)",
              flush=True)
    version = code_version()
    rows = {}
    for label in args.families:
        for unit in ["nuts", *args.architectures]:
            k = unit_key(label, unit, config, version["package_sha"])
            if k in results:
                rows[(label, unit)] = results[k]
    missing = [f"{lbl}/{u}" for lbl, u in wanted if (lbl, u) not in rows]
    if missing:
        print(f"[flows] not run on the current package ({version['package_sha']}): "
              f"{', '.join(missing)}", flush=True)
    note = args.note + (" QUICK SMOKE TEST: tiny sizes, numbers mean little."
                        if args.quick else "")
    write_atomic(md_path, markdown(rows, config, args.families, args.architectures, version,
                                   note))
    plot_flows(rows, md_path.with_suffix(".png"))
    print(f"[flows] wrote {md_path}, its figure and {json_path}", flush=True)


if __name__ == "__main__":
    main()

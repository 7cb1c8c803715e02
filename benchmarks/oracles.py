"""Neural-oracle benchmark: every family x protocol x architecture, measured against exact answers.

For each built-in family (all have closed forms) a NUTS dataset of N eta from a moderate box is
generated once and cached in ``benchmarks/data/<family>.npz`` (its generation wall time is kept
in the dataset's metadata). Every protocol x architecture pair is trained on it with
``train_oracle``'s default 80/10/10 split and evaluated on the test split's eta:

* nRMSE: RMSE of E[T] against the exact oracle, per statistic divided by the standard deviation
  of that statistic's exact E[T] over the test eta, then the root mean square over statistics;
* data nRMSE: the same for the dataset's own NUTS means at those eta; ratio = nRMSE / data nRMSE
  (goal <= 0.5 for the best pair of each family: the network averages out Monte Carlo noise);
* max rel. err: max over test eta and statistics of |error| / max(|exact E[T]|, sd of that
  statistic over the test eta) (the floor keeps statistics whose mean crosses 0 meaningful);
* Cov rel. err: median over test eta of ||Cov_net - Cov_exact||_F / ||Cov_exact||_F;
* |dA| max: max over test eta of |A_net(eta) - A(eta)| (absolute log-partition; goal < 0.01 on
  the families with scalar x);
* eval: seconds per eta of ``oracle.mean`` on a batch of 10^4 eta (jit warm-up excluded, median
  of 5 runs), against the NUTS cost per dataset point (generation wall time / N): goal >= 10^4.

Results are cached per (family, protocol, architecture, settings) in the JSON file, written
atomically after every pair, so an interrupted run resumes where it stopped; ``--rerun`` runs the
selected pairs again (after a code change) and replaces their cached rows. The markdown report
shows the selected families and pairs: regenerate it with no selection after a partial run.

    python benchmarks/oracles.py [--families ...] [--protocols ...] [--architectures ...]
                                 [--max-epochs N] [--quick] [--rerun]
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import statistics
import time
import traceback
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from plots import plot_oracles

from numpyro_nnef import ExactOracle, ExpectationDataset, families, generate_dataset, sample_etas
from numpyro_nnef.nn import ARCHITECTURES, FLOW_ARCHITECTURES
from numpyro_nnef.oracles.neural import NEAREST_ANCHORS
from numpyro_nnef.training import PROTOCOLS, train_oracle, usable_points
from numpyro_nnef.training.trainer import DEFAULT_NUM_ANCHORS

jax.config.update("jax_enable_x64", True)

# label -> (family factory, eta low, eta high, scale, x is scalar)
FAMILIES = {
    "Gaussian": (  # mean -eta1/(2 eta2) in [-4, 4], sd in [0.5, 1.4]
        families.Gaussian, [-2.0, -2.0], [2.0, -0.25], "uniform", True,
    ),
    "Gamma": (  # shape in [1, 10], rate in [0.5, 5] (log-uniform)
        families.Gamma, [0.0, -5.0], [9.0, -0.5], ["uniform", "log-uniform"], True,
    ),
    "Beta": (  # concentrations a, b in [1, 9]
        families.Beta, [0.0, 0.0], [8.0, 8.0], "uniform", True,
    ),
    "VonMises": (  # kappa in [0, 4.2], every direction
        families.VonMises, [-3.0, -3.0], [3.0, 3.0], "uniform", True,
    ),
    "RectifiedGaussian": (
        families.RectifiedGaussian, [-2.0, -2.0], [2.0, -0.25], "uniform", True,
    ),
    "GaussLaplace": (  # a Gaussian times a Laplace factor exp(eta3 |x|), eta3 <= 0
        families.GaussLaplace, [-2.0, -2.0, -2.0], [2.0, -0.25, 0.0], "uniform", True,
    ),
    "LaplaceProduct-2d": (  # (a_1, a_2, b_1, b_2) in [0.5, 3]
        lambda: families.LaplaceProduct(2), [0.5] * 4, [3.0] * 4, "uniform", False,
    ),
    "MultivariateNormal-2d": (  # h in [-2, 2]^2, precision diag in [0.5, 5], |offdiag| <= 0.3
        lambda: families.MultivariateNormal(2),
        [-2.0, -2.0, -2.5, -0.3, -2.5], [2.0, 2.0, -0.25, 0.3, -0.25], "uniform", False,
    ),
}

FULL = {
    "num_etas": 300, "nuts": {"num_chains": 4, "num_warmup": 500, "num_samples": 1000},
    "data_dir": "benchmarks/data", "output": "benchmarks/results/oracles",
    "regression": {"max_epochs": 1500, "patience": 300},
    "flow": {"max_epochs": 300, "patience": 100, "sobolev_weight": 0.0},
}
QUICK = {
    "num_etas": 60, "nuts": {"num_chains": 2, "num_warmup": 300, "num_samples": 500,
                             "max_retries": 0, "min_ess": 50, "max_rhat": 1.05},
    "data_dir": "benchmarks/data/quick", "output": "/tmp/oracles_quick/oracles",
    "regression": {"max_epochs": 20, "patience": 20},
    "flow": {"max_epochs": 10, "patience": 10, "sobolev_weight": 0.0},
}
COMMON = {"learning_rate": 1e-2, "batch_size": 256, "eval_every": 10, "weighting": "mcse",
          "sobolev_weight": 1.0}
EVAL_BATCH = 10_000
EVAL_REPEATS = 3  # timed runs after the warm-up, fewer once they add up to EVAL_SECONDS
EVAL_SECONDS = 1.0
GOAL_RATIO, GOAL_LOGZ, GOAL_SPEEDUP = 0.5, 0.01, 1e4


def combos(protocols: list[str], architectures: list[str] | None) -> list[tuple[str, str]]:
    """(protocol, architecture) pairs: regression x ARCHITECTURES, flows x FLOW_ARCHITECTURES."""
    out = []
    for proto in protocols:
        names = ARCHITECTURES if proto == "regression" else FLOW_ARCHITECTURES
        out += [(proto, a) for a in names if architectures is None or a in architectures]
    return out


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------
def load_or_generate(label: str, config: dict, seed: int) -> ExpectationDataset:
    """The cached dataset of ``label``, or a fresh NUTS one (saved with its generation time)."""
    make_family, low, high, scale, _ = FAMILIES[label]
    family = make_family()
    spec = {"low": low, "high": high, "scale": scale, "num_etas": config["num_etas"],
            "seed": seed, "nuts": config["nuts"]}
    path = Path(config["data_dir"]) / f"{label}.npz"
    if path.exists():
        dataset = ExpectationDataset.load(path, family)
        if dataset.metadata.get("benchmark", {}).get("spec") == json.loads(json.dumps(spec)):
            return dataset
        print(f"[oracles] {path} was made with other settings; regenerating", flush=True)
    key = jax.random.fold_in(jax.random.key(seed), list(FAMILIES).index(label))
    k_eta, k_nuts = jax.random.split(key)
    etas = sample_etas(family, key=k_eta, low=low, high=high, num=config["num_etas"],
                       scale=scale)
    print(f"[oracles] generating {label}: {len(etas)} eta, NUTS {config['nuts']}", flush=True)
    start = time.perf_counter()
    dataset = generate_dataset(family, etas, key=k_nuts, progress=False, **config["nuts"])
    seconds = time.perf_counter() - start
    meta = {**dataset.metadata, "benchmark": {"spec": spec, "generation_wall_time_s": seconds}}
    dataset = dataclasses.replace(dataset, metadata=meta)
    dataset.save(path)
    print(f"[oracles] {label}: {seconds:.1f} s, {int((~dataset.passed).sum())} failed points",
          flush=True)
    return dataset


def test_split(dataset: ExpectationDataset) -> ExpectationDataset:
    """The test part of train_oracle's default split (its usable points, fractions and seed)."""
    usable, _ = usable_points(dataset)
    return dataset.subset(np.flatnonzero(usable)).split((0.8, 0.1, 0.1), seed=0)[2]


# ---------------------------------------------------------------------------------------------
# one (family, protocol, architecture)
# ---------------------------------------------------------------------------------------------
def normalised_rmse(pred: np.ndarray, exact: np.ndarray, spread: np.ndarray
                    ) -> tuple[list[float], float]:
    """(RMSE per statistic, sqrt(mean_j (RMSE_j / spread_j)^2))."""
    rmse = np.sqrt(np.mean((pred - exact) ** 2, axis=0))
    return rmse.tolist(), float(np.sqrt(np.mean((rmse / spread) ** 2)))


def eval_seconds_per_eta(oracle, low: np.ndarray, high: np.ndarray, key: jax.Array) -> float:
    """Median wall time of oracle.mean on EVAL_BATCH eta in the box, divided by EVAL_BATCH
    (EVAL_REPEATS timed runs after a warm-up call, or fewer once EVAL_SECONDS are spent)."""
    etas = jnp.asarray(low + (high - low) * np.asarray(
        jax.random.uniform(key, (EVAL_BATCH, low.size), jnp.float64)))
    oracle.mean(etas).block_until_ready()  # compile
    times = []
    while len(times) < EVAL_REPEATS and sum(times) < EVAL_SECONDS:
        start = time.perf_counter()
        oracle.mean(etas).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / EVAL_BATCH


def run_combo(label: str, dataset: ExpectationDataset, protocol: str, architecture: str,
              settings: dict, seed: int) -> dict:
    family = FAMILIES[label][0]()
    exact = ExactOracle(family)
    test = test_split(dataset)
    key = jax.random.fold_in(jax.random.key(seed), 1000 + list(FAMILIES).index(label))
    k_train, k_eval = jax.random.split(key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # excluded points, PSIS k-hat: recorded
        oracle = train_oracle(dataset, key=k_train, family=family, architecture=architecture,
                              protocol=protocol, out_of_range="ignore", progress=False,
                              **settings)
    report = oracle.report
    eta = jnp.asarray(test.eta)
    mu_exact = np.asarray(exact.mean(eta))
    spread = mu_exact.std(axis=0)
    mu_net = np.asarray(oracle.mean(eta))
    rmse, nrmse = normalised_rmse(mu_net, mu_exact, spread)
    data_rmse, data_nrmse = normalised_rmse(test.mean, mu_exact, spread)
    rel = np.abs(mu_net - mu_exact) / np.maximum(np.abs(mu_exact), spread)
    cov_rel = np.full(1, np.nan)  # the Jacobian through a flow's ODE: too slow to compile here
    if protocol == "regression":
        cov_exact = np.asarray(exact.covariance(eta))
        cov_net = np.asarray(oracle.covariance(eta))
        cov_rel = np.linalg.norm(cov_net - cov_exact, axis=(1, 2)) / np.linalg.norm(
            cov_exact, axis=(1, 2))
    logz_err = np.abs(np.asarray(oracle.log_partition(eta)) - np.asarray(exact.log_partition(eta)))
    eval_s = eval_seconds_per_eta(oracle, oracle.eta_low, oracle.eta_high, k_eval)
    anchors = oracle.anchors
    khats = [a.khat for a in anchors if a.khat is not None]
    return {
        "family": label, "protocol": protocol, "architecture": architecture,
        "num_test": len(test), "rmse": rmse, "nrmse": nrmse, "data_rmse": data_rmse,
        "data_nrmse": data_nrmse, "ratio": nrmse / data_nrmse,
        "max_rel_err": float(rel.max()), "cov_rel_err": float(np.median(cov_rel)),
        "logz_max_err": float(logz_err.max()),
        "anchors": {"count": len(anchors), "method": anchors[0].method if anchors else None,
                    "max_stderr": max((a.stderr for a in anchors), default=None),
                    "max_khat": max(khats, default=None)},
        "train_s": report.wall_time_s, "best_epoch": report.best_epoch,
        "last_epoch": int(report.history["epoch"][-1]), "stopped_early": report.stopped_early,
        "eval_s_per_eta": eval_s,
    }


# ---------------------------------------------------------------------------------------------
# results file and tables
# ---------------------------------------------------------------------------------------------
def settings_for(protocol: str, config: dict) -> dict:
    group = config["regression"] if protocol == "regression" else config["flow"]
    return {**COMMON, **group}


def result_key(label: str, protocol: str, architecture: str, settings: dict,
               dataset: ExpectationDataset) -> str:
    digest = hashlib.sha256(json.dumps(
        [settings, np.asarray(dataset.eta).tobytes().hex()[:64], len(dataset)], sort_keys=True
    ).encode()).hexdigest()[:12]
    return f"{label}|{protocol}|{architecture}|{digest}"


def read_results(path: Path) -> dict:
    return json.loads(path.read_text())["results"] if path.exists() else {}


def save_result(path: Path, key: str, row: dict) -> dict:
    """Add one row to the results file (read, merge, atomic replace, under a file lock so that
    runs on disjoint families can share the file) and return all results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = read_results(path)
        results[key] = row
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"results": results}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    return results


def fmt(x: float, spec: str = ".3g") -> str:
    return "-" if x is None or not np.isfinite(x) else format(x, spec)


def ratio_of(row: dict) -> float:
    """The row's ratio, +inf for a failed pair or an undefined ratio (for sorting)."""
    value = row.get("ratio", np.inf)
    return value if np.isfinite(value) else np.inf


def single_anchor(row: dict) -> str:
    """"*" for a row run before multi-anchor log-partitions (it records "anchor", not
    "anchors"), else ""."""
    return "" if "anchors" in row else "*"


def family_table(rows: list[dict], nuts_s: float) -> list[str]:
    lines = [
        "| protocol | architecture | nRMSE | data nRMSE | ratio | max rel. err | Cov rel. err | "
        "abs dA max | train s | best/last epoch | eval us/eta | NUTS s/eta / eval |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (ratio_of(r), r["protocol"])):
        if "error" in r:
            lines.append(f"| {r['protocol']} | {r['architecture']} | failed: "
                         f"{r['error'].splitlines()[-1][:80]} |" + " |" * 10)
            continue
        nrmse = fmt(r["nrmse"]) if np.isfinite(r["nrmse"]) else "non-finite"
        lines.append(
            f"| {r['protocol']} | {r['architecture']} | {nrmse} | "
            f"{fmt(r['data_nrmse'])} | {fmt(r['ratio'])} | {fmt(r['max_rel_err'])} | "
            f"{fmt(r['cov_rel_err'])} | {fmt(r['logz_max_err'])}{single_anchor(r)} | "
            f"{r['train_s']:.1f} | "
            f"{r['best_epoch']}/{r['last_epoch']} | {r['eval_s_per_eta'] * 1e6:.3g} | "
            f"{nuts_s / r['eval_s_per_eta']:.2g} |"
        )
    return lines


def overall_ranking(by_family: dict[str, list[dict]]) -> tuple[list[str], str]:
    """Tables of the mean rank (by ratio) of each pair over the families and its number of
    wins, and of each protocol; plus a sentence naming the best pair and protocol."""
    ranks: dict[tuple[str, str], list[int]] = {}
    wins: dict[tuple[str, str], int] = {}
    for rows in by_family.values():
        ok = sorted((r for r in rows if "error" not in r), key=ratio_of)
        for i, r in enumerate(ok):
            ranks.setdefault((r["protocol"], r["architecture"]), []).append(i + 1)
        if ok:
            best = (ok[0]["protocol"], ok[0]["architecture"])
            wins[best] = wins.get(best, 0) + 1
    n_fam = len(by_family)
    table = sorted(ranks.items(), key=lambda kv: (np.mean(kv[1]) if len(kv[1]) == n_fam
                                                  else np.inf, -wins.get(kv[0], 0)))
    lines = ["| rank | protocol | architecture | mean rank | median ratio | wins | families |",
             "|---:|---|---|---:|---:|---:|---:|"]
    ratios = {}
    for rows in by_family.values():
        for r in rows:
            if "error" not in r:
                ratios.setdefault((r["protocol"], r["architecture"]), []).append(ratio_of(r))
    for i, (pair, rk) in enumerate(table):
        lines.append(f"| {i + 1} | {pair[0]} | {pair[1]} | {np.mean(rk):.1f} | "
                     f"{fmt(np.median(ratios[pair]))} | {wins.get(pair, 0)} | {len(rk)} |")
    protocol_ranks: dict[str, list[float]] = {}
    for pair, rk in ranks.items():
        protocol_ranks.setdefault(pair[0], []).extend(rk)
    lines += ["", "| protocol | mean rank of its pairs | wins |", "|---|---:|---:|"]
    by_protocol = sorted(protocol_ranks.items(), key=lambda kv: np.mean(kv[1]))
    for proto, rk in by_protocol:
        w = sum(v for k, v in wins.items() if k[0] == proto)
        lines.append(f"| {proto} | {np.mean(rk):.1f} | {w} |")
    if not table:
        return lines, ""
    (top, top_ranks), most_wins = table[0], max(wins, key=wins.get)
    sentence = (
        f"Best overall: {top[0]}/{top[1]} by mean rank ({np.mean(top_ranks):.1f} over "
        f"{len(top_ranks)} families, {wins.get(top, 0)} wins); most wins: "
        f"{most_wins[0]}/{most_wins[1]} ({wins[most_wins]}). Best protocol: {by_protocol[0][0]} "
        f"(mean rank of its pairs {np.mean(by_protocol[0][1]):.1f}, "
        f"{sum(v for k, v in wins.items() if k[0] == by_protocol[0][0])} of {len(by_family)} "
        "wins)."
    )
    return lines, sentence


def markdown(results: dict, config: dict, datasets: dict, labels: list[str], elapsed: float,
             note: str = "") -> str:
    by_family = {label: [r for r in results.values() if r["family"] == label]
                 for label in labels}
    pair_minutes = sum(r.get("pair_s", 0.0) for r in results.values()) / 60
    reg, flow = config["regression"], config["flow"]
    text = [
        "# Neural expectation oracles against exact answers",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, "
        f"JAX {jax.__version__} on {jax.default_backend()}, float64. One run, one seed per "
        f"family. The {len(results)} pairs took {pair_minutes:.1f} min (training plus "
        f"evaluation, summed over pairs; the last invocation ran {elapsed / 60:.1f} min, "
        "counting only the pairs it did not find cached). " + note,
        "",
        f"Data: per family {config['num_etas']} eta drawn from the box below, NUTS "
        f"{config['nuts']} (`generate_dataset` defaults otherwise: points failing r-hat/ESS "
        "are retried, then excluded by the trainer). Split 80/10/10 (`train_oracle` default, "
        "seed 0); all numbers are on the test split's eta.",
        "",
        f"Training: default hyperparameters of every architecture and protocol; Adam, learning "
        f"rate {COMMON['learning_rate']} with cosine decay, batch {COMMON['batch_size']} (the "
        f"whole training set), MCSE weighting, validation every {COMMON['eval_every']} epochs, "
        "best weights kept. Regression: "
        f"max_epochs {reg['max_epochs']}, patience {reg['patience']}, Sobolev weight "
        f"{reg.get('sobolev_weight', COMMON['sobolev_weight'])} (Jacobian matched to the "
        f"dataset's Cov[T]). Flow protocols (fm, ct, df): max_epochs {flow['max_epochs']}, "
        f"patience {flow['patience']}, Sobolev weight {flow['sobolev_weight']} (the Jacobian "
        "through the ODE solve makes the Sobolev term too slow for this budget). Log-partition "
        "anchors: `anchor=\"auto\"` with the default `num_anchors` "
        f"({DEFAULT_NUM_ANCHORS['quadrature']} training eta by quadrature for scalar x, "
        f"{DEFAULT_NUM_ANCHORS['importance']} by importance sampling for the 2-d families); "
        f"A(eta) blends the continuations from the {NEAREST_ANCHORS} nearest anchors (a "
        "24-point path quadrature of the predicted mean, or the learned A of the gradient "
        "networks).",
        "",
        "Definitions (E[T]_exact from `ExactOracle`): nRMSE = sqrt(mean_j (RMSE_j / sd_j)^2) "
        "with RMSE_j the RMSE of statistic j over the test eta and sd_j the standard deviation "
        "of the exact E[T_j] over the same eta; data nRMSE is the same for the dataset's NUTS "
        "means; ratio = nRMSE / data nRMSE (goal <= 0.5 for the best pair). max rel. err = "
        "max |error| / max(|E[T_j]|, sd_j). Cov rel. err = median ||Cov_net - Cov||_F / ||Cov||_F."
        " (regression only: compiling the Jacobian through a flow's ODE solve for every flow pair "
        "did not fit the time budget). abs dA max = max |A_net - A| (goal < 0.01 on scalar-x "
        "families; * marks rows cached from before multi-anchor log-partitions: one anchor at "
        "the central training eta). eval = oracle.mean "
        f"on a batch of {EVAL_BATCH} eta in the training box, median of {EVAL_REPEATS} runs "
        f"after a warm-up call (fewer once they add up to {EVAL_SECONDS:g} s), per eta. "
        "NUTS s/eta = the dataset's generation wall time "
        "(compilation and retries included) / N; the last column is NUTS s/eta over eval "
        "s/eta (goal >= 10^4). train s includes compilation and the anchor estimate.",
        "",
    ]
    summary = ["| family | best pair | nRMSE | data nRMSE | ratio <= 0.5 | abs dA max < 0.01 "
               "(scalar x) | NUTS s/eta | eval us/eta | speed-up >= 1e4 |",
               "|---|---|---:|---:|---|---|---:|---:|---|"]
    misses = []
    nuts_per_eta = {}
    for label in labels:
        rows = by_family[label]
        ds = datasets[label]
        bench = ds.metadata["benchmark"]
        nuts_s = bench["generation_wall_time_s"] / len(ds)
        nuts_per_eta[label] = nuts_s
        _, low, high, scale, scalar = FAMILIES[label]
        failed = ~ds.passed
        diverged = int((failed & (ds.divergences > 0)).sum())
        num_test = len(test_split(ds))
        text += [f"## {label}", "",
                 f"eta box low={low}, high={high}, scale={scale}; N={len(ds)}, "
                 f"{int(failed.sum())} failed the diagnostics after retries ({diverged} with "
                 f"divergences) and are excluded by the trainer, leaving {num_test} test eta; "
                 f"generation {bench['generation_wall_time_s']:.1f} s = {nuts_s:.3g} s per eta.",
                 ""]
        if failed.mean() > 0.1:
            misses.append(
                f"- {label}: {int(failed.sum())} of {len(ds)} NUTS points failed the diagnostics "
                f"({diverged} with divergences, the rest on r-hat/ESS); the trainer drops them, so "
                f"training and the {num_test} test eta cover only the part of the box where NUTS "
                "passes.")
        text += family_table(rows, nuts_s) + [""]
        ok = [r for r in rows if "error" not in r]
        if not ok:
            continue
        best = min(ok, key=ratio_of)
        best_logz_row = min(ok, key=lambda r: r["logz_max_err"])
        best_logz = best_logz_row["logz_max_err"]
        ratio_pass = best["ratio"] <= GOAL_RATIO
        logz_pass = best["logz_max_err"] < GOAL_LOGZ
        speedup = nuts_s / best["eval_s_per_eta"]
        speed_pass = speedup >= GOAL_SPEEDUP
        logz_cell = (f"{'PASS' if logz_pass else 'MISS'} ({fmt(best['logz_max_err'])}"
                     f"{single_anchor(best)}; best of any pair {fmt(best_logz)}"
                     f"{single_anchor(best_logz_row)})" if scalar
                     else f"n/a ({fmt(best['logz_max_err'])}{single_anchor(best)})")
        summary.append(
            f"| {label} | {best['protocol']}/{best['architecture']} | {fmt(best['nrmse'])} | "
            f"{fmt(best['data_nrmse'])} | {'PASS' if ratio_pass else 'MISS'} "
            f"({best['ratio']:.3g}) | {logz_cell} | {nuts_s:.3g} | "
            f"{best['eval_s_per_eta'] * 1e6:.3g} | {'PASS' if speed_pass else 'MISS'} "
            f"({speedup:.2g}) |"
        )
        if not ratio_pass:
            misses.append(f"- {label}: the best ratio is {best['ratio']:.3g} "
                          f"({best['protocol']}/{best['architecture']}, nRMSE "
                          f"{best['nrmse']:.3g} against the data's {best['data_nrmse']:.3g}), "
                          f"above {GOAL_RATIO}.")
        if scalar and not logz_pass:
            misses.append(f"- {label}: the best pair's max |dA| is {best['logz_max_err']:.3g} "
                          f"(lowest of any pair {best_logz:.3g}, "
                          f"{best_logz_row['protocol']}/{best_logz_row['architecture']}), above "
                          f"{GOAL_LOGZ}.")
        if not speed_pass:
            misses.append(f"- {label}: the best pair's speed-up is {speedup:.3g} < 10^4.")
    text += ["## Summary (best pair per family, by ratio)", ""] + summary + [""]
    flows = [r for rows in by_family.values() for r in rows
             if "error" not in r and r["protocol"] != "regression"]
    if flows:
        best_flow = {label: min((r for r in flows if r["family"] == label), key=ratio_of)
                     for label in labels if any(r["family"] == label for r in flows)}
        misses.append(
            f"- Flow protocols (fm/ct/df, {flow['max_epochs']} epochs, no Sobolev term): the "
            "best flow pair per family has ratio " + ", ".join(
                f"{label} {fmt(r['ratio'])} ({r['protocol']}/{r['architecture']})"
                for label, r in best_flow.items()) + "; their speed-up is " + ", ".join(
                f"{fmt(nuts_per_eta[label] / r['eval_s_per_eta'], '.2g')}"
                for label, r in best_flow.items()) + " (an ODE solve per eta).")
        broken: dict[tuple[str, str], list[str]] = {}
        for r in flows:
            if not np.isfinite(r["nrmse"]):
                broken.setdefault((r["protocol"], r["architecture"]), []).append(r["family"])
        for (proto, arch), fams in sorted(broken.items()):
            misses.append(f"- {proto}/{arch}: non-finite predictions on {len(fams)} of "
                          f"{len(labels)} families ({', '.join(fams)}).")
    text += ["## Misses", "", *(misses or ["None: every goal is met by the best pair."]), ""]
    ranking, sentence = overall_ranking(by_family)
    text += ["## Overall ranking of the pairs (by ratio within each family)", "", sentence, ""]
    text += ranking + [""]
    return "\n".join(text)


# ---------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=None, choices=list(FAMILIES))
    parser.add_argument("--protocols", nargs="*", default=list(PROTOCOLS),
                        choices=list(PROTOCOLS))
    parser.add_argument("--architectures", nargs="*", default=None,
                        choices=sorted(set(ARCHITECTURES) | set(FLOW_ARCHITECTURES)))
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="max_epochs of every protocol (default: the settings above)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: Gaussian and LaplaceProduct-2d, tiny data and training,"
                             " output under /tmp/oracles_quick/")
    parser.add_argument("--data-only", action="store_true",
                        help="only generate (or check) the cached datasets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rerun", action="store_true",
                        help="run the selected pairs even if cached (replacing their rows)")
    parser.add_argument("--note", default="", help="a sentence added to the report's header")
    parser.add_argument("--output", default=None, help="output stem (.md and .json are added)")
    args = parser.parse_args()

    config = json.loads(json.dumps(QUICK if args.quick else FULL))
    if args.max_epochs is not None:
        for group in ("regression", "flow"):
            config[group]["max_epochs"] = args.max_epochs
            config[group]["patience"] = min(config[group]["patience"], args.max_epochs)
    labels = args.families or (["Gaussian", "LaplaceProduct-2d"] if args.quick else list(FAMILIES))
    pairs = combos(args.protocols, args.architectures)
    if args.quick and args.architectures is None:
        pairs = [p for p in pairs if p[1] in ("mlp", "logz_icnn", "potential_flow")]
    stem = Path(args.output or config["output"])
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    results = read_results(json_path)

    start = time.perf_counter()
    datasets = {label: load_or_generate(label, config, args.seed) for label in labels}
    if args.data_only:
        return
    wanted = {}
    for label in labels:
        for protocol, architecture in pairs:
            settings = settings_for(protocol, config)
            key = result_key(label, protocol, architecture, settings, datasets[label])
            wanted[key] = (label, protocol, architecture, settings)
    todo = [k for k in wanted if args.rerun or k not in results]
    print(f"[oracles] {len(wanted)} pairs, {len(wanted) - len(todo)} cached, {len(todo)} to run",
          flush=True)
    for i, key in enumerate(todo):
        label, protocol, architecture, settings = wanted[key]
        if not args.rerun and key in read_results(json_path):  # done meanwhile by another run
            continue
        t0 = time.perf_counter()
        try:
            row = run_combo(label, datasets[label], protocol, architecture, settings, args.seed)
        except Exception as err:  # a failing pair is reported in the table, the run goes on
            row = {"family": label, "protocol": protocol, "architecture": architecture,
                   "error": "".join(traceback.format_exception_only(err)).strip()}
            traceback.print_exc()
        row["settings"] = settings
        row["pair_s"] = time.perf_counter() - t0
        results = save_result(json_path, key, row)
        summary = (f"ratio {row['ratio']:.3g} dA {row['logz_max_err']:.2g} "
                   f"train {row['train_s']:.1f}s epochs {row['best_epoch']}/{row['last_epoch']}"
                   if "error" not in row else row["error"].splitlines()[-1])
        print(f"[oracles] {i + 1}/{len(todo)} {label} {protocol}/{architecture}: {summary} "
              f"({time.perf_counter() - t0:.1f} s, total {(time.perf_counter() - start) / 60:.1f}"
              " min)", flush=True)
    results = read_results(json_path)
    shown = {k: results[k] for k in wanted if k in results}
    md_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = md_path.with_name(md_path.name + ".tmp")
    tmp.write_text(markdown(shown, config, datasets, labels, time.perf_counter() - start,
                            args.note))
    os.replace(tmp, md_path)
    plot_oracles(shown, md_path.with_suffix(".png"))
    print(f"[oracles] wrote {md_path}, its figure and {json_path}", flush=True)


if __name__ == "__main__":
    main()

"""Data-generation benchmark: adaptive NUTS (generate_dataset) against naive fixed-step HMC, and
hard boxes (boundary mass, a circle, double wells) against quadrature.

Speed cases: for each family, 200 eta from the issue's box; both methods estimate E[T | eta] for
the same eta in one run; errors are measured against the exact (closed-form) oracle. Reported
side by side: wall time (compilation included), eta per second, RMSE of the means, RMSE of the
means in units of the exact posterior sd of each statistic (scale-free), and the RMSE the
adaptive sampler reaches at the baseline's wall time, measured by a second, shorter adaptive run
whose number of draws is scaled to the baseline's time.

Hard cases: generate_dataset with its defaults (NUTS, retries, tempered-SMC fallback) or with
sampler="smc"; reported: pass rate, points that needed SMC, and the fraction of (eta, statistic)
means within 4 reported MCSE of the quadrature oracle (over the points that passed).

    python benchmarks/datagen.py [--num-etas 200] [--num-hard 200] [--cases ...]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints

from numpyro_nnef import families
from numpyro_nnef.family import ExponentialFamily, NaturalDomain
from numpyro_nnef.oracles.exact import ExactOracle
from numpyro_nnef.oracles.quadrature import QuadratureOracle
from numpyro_nnef.sampling import generate_dataset, sample_etas

jax.config.update("jax_enable_x64", True)

CASES = {
    "LaplaceProduct 1-d": (
        lambda: families.LaplaceProduct(1), [0.5, 0.5], [3.0, 3.0], "uniform",
    ),
    "Gamma": (  # shape in [0.5, 20] (eta1 = shape - 1), rate in [0.1, 100] (eta2 = -rate)
        families.Gamma, [-0.5, -100.0], [19.0, -0.1], ["uniform", "log-uniform"],
    ),
    "MultivariateNormal 2-d": (  # eta = [x1, x2, xx00, xx01, xx11]; precision diag in [0.5, 5]
        lambda: families.MultivariateNormal(2),
        [-2.0, -2.0, -2.5, -0.3, -2.5], [2.0, 2.0, -0.25, 0.3, -0.25], "uniform",
    ),
    # not in the issue: a wide range of scales, where one fixed step size cannot fit every eta
    "Gaussian, sd in [0.01, 100]": (  # eta2 = -1/(2 sd^2) log-uniform, eta1 = loc / sd^2
        families.Gaussian, [-0.01, -5000.0], [0.01, -5e-5], ["uniform", "log-uniform"],
    ),
    "LaplaceProduct 2-d": (lambda: families.LaplaceProduct(2), [0.5] * 4, [3.0] * 4, "uniform"),
}



def quartic(stats: tuple[int, ...]) -> ExponentialFamily:
    """T = x^k for k in ``stats`` (highest 4, its natural parameter < 0): double wells."""
    labels = {1: "x", 2: "x2", 4: "x4"}
    return ExponentialFamily.from_statistics(
        "DoubleWell" + "".join(str(k) for k in stats),
        lambda x: {labels[k]: x**k for k in stats}, event_shape=(), support=constraints.real,
        natural_constraint=NaturalDomain(lambda e: e[..., -1] < 0, "eta[x4] < 0",
                                         [0.0] * (len(stats) - 1) + [-1.0]),
    )


# label -> (family factory, low, high, scale, generate_dataset keywords)
HARD = {
    "RectifiedGaussian (oracle box)": (
        families.RectifiedGaussian, [-2.0, -2.0], [2.0, -0.25], "uniform", {},
    ),
    "VonMises (oracle box)": (families.VonMises, [-3.0, -3.0], [3.0, 3.0], "uniform", {}),
    "double well T = [x^2, x^4]": (
        lambda: quartic((2, 4)), [0.5, -1.0], [3.0, -0.1], "uniform", {},
    ),
    # not in the issue: unequal wells (eta[x] != 0), where chains that all stick in one well
    # pass every diagnostic with the wrong answer; sampler="smc" is the engine for such boxes
    "unequal wells T = [x, x^2, x^4], NUTS": (
        lambda: quartic((1, 2, 4)), [-0.5, 0.5, -1.0], [0.5, 3.0, -0.1], "uniform", {},
    ),
    "unequal wells T = [x, x^2, x^4], SMC": (
        lambda: quartic((1, 2, 4)), [-0.5, 0.5, -1.0], [0.5, 3.0, -0.1], "uniform",
        {"sampler": "smc"},
    ),
}

BASELINE = dict(num_chains=5, num_warmup=500, num_samples=1000, step_size=0.1, num_steps=10)


def baseline_means(family, etas: jax.Array, key: jax.Array) -> np.ndarray:
    """Fixed-step HMC, no adaptation, unit mass: 5 chains x (500 warm-up + 1000 draws) per eta,
    on log p(u | eta) with x = biject_to(support)(u) (the speed cases have no x >= 0 support)."""
    from numpyro.distributions.transforms import biject_to

    transform = biject_to(family.support)
    u_shape = tuple(transform.inverse_shape(family.event_shape))
    b = BASELINE

    def one_eta(key, eta):
        def logdensity(u):
            x = transform(u)
            log_det = jnp.sum(transform.log_abs_det_jacobian(u, x))
            return family.unnormalized_log_prob(eta, x) + log_det
        kernel = blackjax.hmc(
            logdensity, b["step_size"], jnp.ones(int(np.prod(u_shape, dtype=int))),
            b["num_steps"],
        )

        def one_chain(key):
            k_init, k_run = jax.random.split(key)
            u0 = jax.random.uniform(k_init, u_shape, minval=-2.0, maxval=2.0)

            def step(state, k):
                state, _ = kernel.step(k, state)
                return state, family.sufficient_statistics(transform(state.position))

            keys = jax.random.split(k_run, b["num_warmup"] + b["num_samples"])
            _, stats = jax.lax.scan(step, kernel.init(u0), keys)
            return stats[b["num_warmup"]:]

        stats = jax.vmap(one_chain)(jax.random.split(key, b["num_chains"]))
        return jnp.nanmean(stats.reshape(-1, stats.shape[-1]), axis=0)

    keys = jax.random.split(key, etas.shape[0])
    return np.asarray(jax.jit(jax.vmap(one_eta))(keys, etas))


def errors(means: np.ndarray, exact_mean: np.ndarray, exact_sd: np.ndarray) -> tuple[float, float]:
    """(RMSE, RMSE in exact-sd units); a non-finite estimate counts as an infinite error."""
    err = means - exact_mean
    if not np.all(np.isfinite(err)):
        return float("inf"), float("inf")
    return float(np.sqrt(np.mean(err**2))), float(np.sqrt(np.mean((err / exact_sd) ** 2)))


def run_case(name: str, num_etas: int, key: jax.Array) -> dict:
    make_family, low, high, scale = CASES[name]
    family = make_family()
    k_eta, k_base, k_ours, k_equal = jax.random.split(key, 4)
    etas = sample_etas(family, key=k_eta, low=low, high=high, num=num_etas, scale=scale)
    oracle = ExactOracle(family)
    exact_mean = np.asarray(oracle.mean(etas))
    exact_sd = np.sqrt(np.diagonal(np.asarray(oracle.covariance(etas)), axis1=-2, axis2=-1))

    start = time.perf_counter()
    base = baseline_means(family, etas, k_base)
    t_base = time.perf_counter() - start

    start = time.perf_counter()
    ours = generate_dataset(family, etas, key=k_ours, progress=False)
    t_ours = time.perf_counter() - start

    # the adaptive sampler again, with its draws scaled so that its wall time is the baseline's
    settings = ours.metadata["sampler"]
    ratio = min(1.0, t_base / t_ours)
    num_samples = max(100, int(settings["num_samples"] * ratio))
    num_warmup = max(100, int(settings["num_warmup"] * ratio))
    start = time.perf_counter()
    equal = generate_dataset(  # NUTS alone: no retries, no SMC fallback
        family, etas, key=k_equal, num_samples=num_samples, num_warmup=num_warmup,
        max_retries=0, fallback=None, progress=False,
    )
    t_equal = time.perf_counter() - start

    row = {"family": name, "stat_dim": family.stat_dim, "num_etas": num_etas}
    for label, means, seconds in (
        ("baseline", base, t_base), ("nuts", ours.mean, t_ours), ("nuts_equal", equal.mean, t_equal)
    ):
        rmse, zrmse = errors(np.asarray(means), exact_mean, exact_sd)
        row[label] = {"time": seconds, "eta_per_s": num_etas / seconds, "rmse": rmse,
                      "zrmse": zrmse}
    by_smc = int(ours.extras["tempered_smc"].sum())
    row["nuts"]["failed"] = f"{int((~ours.passed).sum())} ({by_smc} by SMC)"
    row["nuts"]["settings"] = f"{settings['num_chains']}x({settings['num_warmup']}+" \
                              f"{settings['num_samples']})"
    row["nuts_equal"]["settings"] = f"{settings['num_chains']}x({num_warmup}+{num_samples})"
    row["nuts_equal"]["failed"] = int((~equal.passed).sum())
    return row


def run_hard(name: str, num_etas: int, key: jax.Array) -> dict:
    make_family, low, high, scale, kwargs = HARD[name]
    family = make_family()
    k_eta, k_run = jax.random.split(key)
    etas = sample_etas(family, key=k_eta, low=low, high=high, num=num_etas, scale=scale)
    start = time.perf_counter()
    data = generate_dataset(family, etas, key=k_run, progress=False, **kwargs)
    seconds = time.perf_counter() - start
    exact = np.asarray(QuadratureOracle(family).mean(jnp.asarray(etas)))
    z = np.abs(data.mean - exact) / data.mcse
    ok = data.passed
    return {"case": name, "num_etas": num_etas, "time": seconds,
            "passed": int(ok.sum()), "smc": int(data.extras["tempered_smc"].sum()),
            "retried": int((data.retries > 0).sum()),
            "within4": float(np.mean(z[ok] < 4)) if ok.any() else float("nan"),
            "max_z": float(np.max(z[ok])) if ok.any() else float("nan"),
            "causes": sorted({f["cause"].split(" for ")[0].split(":")[0]
                              for f in data.metadata["failures"]})}


def hard_table(rows: list[dict]) -> str:
    lines = [
        "| case | eta | wall s | passed | needed SMC | retried | means within 4 MCSE "
        "(passed points) | max z | goal (>= 99% pass, >= 95% within) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rate = r["passed"] / r["num_etas"]
        met = "met" if rate >= 0.99 and r["within4"] >= 0.95 else "missed"
        lines.append(f"| {r['case']} | {r['num_etas']} | {r['time']:.1f} | {rate:.1%} | "
                     f"{r['smc']} | {r['retried']} | {r['within4']:.1%} | {r['max_z']:.3g} | "
                     f"{met} |")
    causes = [f"{r['case']}: {', '.join(r['causes'])}" for r in rows if r["causes"]]
    if causes:
        lines += ["", "Failure causes: " + "; ".join(causes) + "."]
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = [
        "| family | method | settings | wall s | eta/s | RMSE | RMSE / sd | failed diag. |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    b = BASELINE
    base_settings = f"{b['num_chains']}x({b['num_warmup']}+{b['num_samples']}), eps 0.1, L 10"
    for row in rows:
        for label, title in (("baseline", "fixed-step HMC"), ("nuts", "adaptive NUTS (default)"),
                             ("nuts_equal", "adaptive NUTS, baseline's time")):
            r = row[label]
            lines.append(
                f"| {row['family']} | {title} | {r.get('settings', base_settings)} | "
                f"{r['time']:.1f} | {r['eta_per_s']:.1f} | {r['rmse']:.3g} | {r['zrmse']:.3g} | "
                f"{r.get('failed', '-')} |"
            )
    lines += [
        "",
        "| family | RMSE ratio at equal time (NUTS / baseline) | RMSE/sd ratio | goal <= 0.5 |",
        "|---|---:|---:|---|",
    ]
    for row in rows:
        ratio = row["nuts_equal"]["rmse"] / row["baseline"]["rmse"]
        zratio = row["nuts_equal"]["zrmse"] / row["baseline"]["zrmse"]
        met = "met" if max(ratio, zratio) <= 0.5 else "missed"
        lines.append(f"| {row['family']} | {ratio:.3g} | {zratio:.3g} | {met} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-etas", type=int, default=200)
    parser.add_argument("--num-hard", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/datagen.md")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--hard", nargs="*", default=list(HARD))
    args = parser.parse_args()

    load_start = os.getloadavg()[0]
    key = jax.random.key(args.seed)
    rows, hard_rows = [], []
    for i, name in enumerate(args.cases):
        print(f"[datagen] {name} ...", flush=True)
        rows.append(run_case(name, args.num_etas, jax.random.fold_in(key, i)))
        print(table(rows[-1:]), flush=True)
    for i, name in enumerate(args.hard):
        print(f"[datagen] {name} ...", flush=True)
        hard_rows.append(run_hard(name, args.num_hard, jax.random.fold_in(key, 100 + i)))
        print(hard_table(hard_rows[-1:]), flush=True)
    load_end = os.getloadavg()[0]
    text = (
        "# Data generation: adaptive NUTS vs fixed-step HMC; hard boxes vs quadrature\n\n"
        f"Measured on this machine ({jax.device_count()} {jax.default_backend()} device(s), "
        f"{os.cpu_count()} cores, float64), 1-minute load {load_start:.2f} at start and "
        f"{load_end:.2f} at end (the machine is shared: wall times are noisy). One run; "
        "wall times include compilation.\n\n"
    )
    if rows:
        text += (
            f"## Speed: {args.num_etas} eta per family, errors against the exact oracle\n\n"
            "'RMSE / sd' divides each error by the exact standard deviation of that statistic. "
            "'baseline's time' reruns adaptive NUTS with its draws scaled down so that its wall "
            "time matches the baseline's; failing points are neither retried nor handed to SMC "
            "there. The default row counts failed points after retries and the tempered-SMC "
            "fallback, and how many points SMC estimated.\n\n"
            + table(rows) + "\n\n"
        )
    if hard_rows:
        text += (
            f"## Hard boxes: {args.num_hard} eta each, default generate_dataset (NUTS "
            "4x(500+1000), 2 retries, tempered-SMC fallback) unless the case says SMC; means "
            "against QuadratureOracle\n\n" + hard_table(hard_rows) + "\n"
        )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

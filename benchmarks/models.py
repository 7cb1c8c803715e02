"""CAVI against NUTS and SVI (AutoNormal) on the textbook models of ``textbook.py``.

Every (model, method) unit runs in a fresh Python process (no persistent compilation cache), so
first-call times include tracing and compilation; imports and data generation are not timed.

* cavi: ``nnef.CAVI(model, nnef.CAVIGuide(model)).run(key, MAX_STEPS, **data)`` (first call),
  then the same object's ``run`` again (repeated); ``result.check_elbo`` (engine ELBO against
  E_q[log p - log q] from q's draws, in Monte Carlo standard errors); compared quantities from
  draws of q. A refusal records the error message.
* nuts: ``MCMC(NUTS(model), num_warmup, num_samples)`` on the NUTS model of the entry (the
  model itself, or its discrete sites summed out by hand), first call and a repeated call of
  the same object; the reference means and sds pool these two chains and ``reference_chains``
  - 2 more (untimed) of the same object, with split r-hat and MCSE/sd over the chains (one
  chain's reference moved probabilistic PCA's gap between 0.40 and 0.65).
* svi_at_cavi_time: the same SVI, jitted ``svi.update`` steps until CAVI's first-call wall
  time is spent (compilation included): the non-conjugate goal "closer to NUTS than SVI at
  equal time" compares with it.
* svi: ``SVI(model, AutoNormal(model), Adam(lr), Trace_ELBO())`` for ``svi_steps`` steps (on
  the NUTS model), compared quantities from draws of the guide.

Columns: max |dmean|/sd = max over compared scalars of |mean - mean_NUTS| / sd_NUTS; sd ratio =
the range of sd / sd_NUTS over the compared scalars; ELBO z = (engine - Monte Carlo) / MCSE;
first ratio = NUTS first s / CAVI first s.

    python benchmarks/models.py [--models ...] [--methods ...] [--quick] [--rerun]

Results are cached per unit in ``benchmarks/results/models.json`` (written atomically after
every unit; an interrupted run resumes), the table goes to ``benchmarks/results/models.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from results_cache import read_results, save_result, write_atomic

ROOT = Path(__file__).resolve().parents[1]
FULL = {"nuts": {"num_warmup": 1000, "num_samples": 1000}, "reference_chains": 4,
        "cavi_steps": 1000,
        "svi_steps": 5000, "svi_lr": 0.01, "draws": 4000, "unit_timeout_s": 900,
        "output": "benchmarks/results/models"}
QUICK = {"nuts": {"num_warmup": 100, "num_samples": 100}, "reference_chains": 2,
         "cavi_steps": 100, "svi_steps": 300,
         "svi_lr": 0.01, "draws": 500, "unit_timeout_s": 300, "output": "/tmp/models_quick/models"}
METHODS = ("cavi", "nuts", "svi", "svi_at_cavi_time")
GOAL_FIRST, GOAL_Z = 10.0, 0.5
GOAL_NONCONJUGATE_Z, GOAL_SD_RATIO, GOAL_NONCONJUGATE_FIRST = 0.3, (0.6, 1.1), 5.0


def setup_jax():
    os.environ.setdefault("TQDM_DISABLE", "1")
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_enable_compilation_cache", False)
    return jax


def model_data(name: str) -> dict:
    import numpy as np
    from textbook import MODELS

    entry = MODELS[name]
    return entry.data(np.random.default_rng([0, sorted(MODELS).index(entry.data_of or name)]))


def quantities(name: str, draws: dict) -> dict:
    """The compared quantities (mean, sd) from draws with a leading sample axis."""
    import numpy as np
    from textbook import MODELS

    entry = MODELS[name]
    draws = {k: np.asarray(v, dtype=float) for k, v in draws.items()}
    picked = entry.compare(draws) if entry.compare else {
        k: v for k, v in draws.items() if not k.startswith("z")}
    return {k: {"mean": v.mean(0).tolist(), "sd": v.std(0).tolist()} for k, v in picked.items()}


def unit_cavi(name: str, config: dict) -> dict:
    jax = setup_jax()
    import numpy as np
    from textbook import MODELS

    import numpyro_nnef as nnef

    model, data = MODELS[name].model, model_data(name)
    start = time.perf_counter()
    guide = nnef.CAVIGuide(model, **MODELS[name].guide_options)
    cavi = nnef.CAVI(model, guide)
    try:
        result = cavi.run(jax.random.key(0), config["cavi_steps"], **data)
    except (ValueError, NotImplementedError, TypeError) as err:
        return {"handled": False, "error": f"{type(err).__name__}: {err}"[:400]}
    first = time.perf_counter() - start
    start = time.perf_counter()
    cavi.run(jax.random.key(1), config["cavi_steps"], **data)
    repeated = time.perf_counter() - start
    check = result.check_elbo(jax.random.key(2), config["draws"])
    draws = guide.sample_posterior(jax.random.key(3), result.params,
                                   sample_shape=(config["draws"],))
    elbo = np.asarray(result.elbo)
    return {"handled": True, "first_s": first, "repeated_s": repeated,
            "steps": result.num_steps, "converged": result.converged,
            "monotone": bool(np.all(np.diff(elbo) >= -1e-9 * np.maximum(1, np.abs(elbo[1:])))),
            "families": {n: f.family.name for n, f in guide.conjugate.families.items()},
            "elbo": check.engine, "elbo_mc": check.monte_carlo, "elbo_mcse": check.mcse,
            "elbo_z": check.z, "elbo_passed": check.passed(), "quantities": quantities(name, draws)}


def unit_nuts(name: str, config: dict) -> dict:
    jax = setup_jax()
    import numpy as np
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
    from numpyro.infer import MCMC, NUTS
    from textbook import MODELS

    entry = MODELS[name]
    data = model_data(name)
    mcmc = MCMC(NUTS(entry.nuts_model or entry.model), **config["nuts"], progress_bar=True)
    start = time.perf_counter()
    mcmc.run(jax.random.key(0), **data)
    chains = [jax.device_get(mcmc.get_samples())]
    first = time.perf_counter() - start
    start = time.perf_counter()
    mcmc.run(jax.random.key(1), **data)
    chains.append(jax.device_get(mcmc.get_samples()))
    repeated = time.perf_counter() - start
    divergences = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    for chain in range(2, config["reference_chains"]):  # untimed: more chains for the reference
        mcmc.run(jax.random.key(chain), **data)
        chains.append(jax.device_get(mcmc.get_samples()))
        divergences += int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    pooled = {k: np.concatenate([c[k] for c in chains]) for k in chains[0]}
    q = quantities(name, pooled)
    per_chain = [entry.compare(c) if entry.compare else c for c in chains]
    for k in q:
        stacked = np.stack([np.asarray(c[k], dtype=float) for c in per_chain])
        ess = np.asarray(effective_sample_size(stacked))
        q[k]["mcse"] = (np.asarray(q[k]["sd"]) / np.sqrt(ess)).tolist()
        q[k]["rhat"] = np.asarray(split_gelman_rubin(stacked)).tolist()
    return {"first_s": first, "repeated_s": repeated, "quantities": q,
            "divergences": divergences}


def svi_setup(name: str, config: dict):
    """(jax, AutoNormal guide, SVI, data) on the NUTS model of the entry."""
    jax = setup_jax()
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal
    from numpyro.optim import Adam
    from textbook import MODELS

    entry = MODELS[name]
    model = entry.nuts_model or entry.model
    guide = AutoNormal(model)
    return jax, guide, SVI(model, guide, Adam(config["svi_lr"]), Trace_ELBO()), model_data(name)


def unit_svi(name: str, config: dict) -> dict:
    jax, guide, svi, data = svi_setup(name, config)
    start = time.perf_counter()
    result = svi.run(jax.random.key(0), config["svi_steps"], progress_bar=False, **data)
    jax.block_until_ready(result.params)
    seconds = time.perf_counter() - start
    draws = guide.sample_posterior(jax.random.key(1), result.params,
                                   sample_shape=(config["draws"],))
    return {"first_s": seconds, "quantities": quantities(name, draws)}


def unit_svi_at_cavi_time(name: str, config: dict) -> dict:
    """SVI AutoNormal with CAVI's first-call wall time (``config["budget_s"]``), compilation
    included: jitted ``svi.update`` steps until the budget is spent."""
    if config.get("budget_s") is None:
        return {"error": "no CAVI first-call time to match (run the cavi unit first)"}
    jax, guide, svi, data = svi_setup(name, config)
    start = time.perf_counter()
    state = svi.init(jax.random.key(0), **data)
    update = jax.jit(lambda st: svi.update(st, **data))
    steps = 0
    while time.perf_counter() - start < config["budget_s"]:
        state, loss = update(state)
        jax.block_until_ready(loss)
        steps += 1
    seconds = time.perf_counter() - start
    draws = guide.sample_posterior(jax.random.key(1), svi.get_params(state),
                                   sample_shape=(config["draws"],))
    return {"first_s": seconds, "steps": steps, "quantities": quantities(name, draws)}


UNITS = {"cavi": unit_cavi, "nuts": unit_nuts, "svi": unit_svi,
         "svi_at_cavi_time": unit_svi_at_cavi_time}


# ----------------------------------------------------------------------------- driver


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_unit_subprocess(name: str, method: str, config: dict) -> dict:
    """One unit in a fresh interpreter: its row, or the error."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--unit", f"{name}:{method}",
               "--config-json", json.dumps(config), "--unit-output", str(out)]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=config["unit_timeout_s"])
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {config['unit_timeout_s']} s"}
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
            return {"error": f"unit failed (rc {proc.returncode}): " + " | ".join(tail)}
        return json.loads(out.read_text())


def versus(row: dict, reference: dict) -> dict | None:
    """max |mean - mean_ref| / sd_ref (and where) and the range of sd / sd_ref."""
    import numpy as np

    if "quantities" not in row or "quantities" not in reference:
        return None
    worst, where, ratios = -1.0, "", []
    for k, ref in reference["quantities"].items():
        sd = np.asarray(ref["sd"])
        z = np.abs(np.asarray(row["quantities"][k]["mean"]) - np.asarray(ref["mean"])) / sd
        ratios.append((np.asarray(row["quantities"][k]["sd"]) / sd).ravel())
        if z.max() > worst:
            worst, where = float(z.max()), k
    ratios = np.concatenate(ratios)
    return {"z": worst, "where": where, "sd_min": float(ratios.min()),
            "sd_max": float(ratios.max())}


def fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def span(v: dict | None) -> str:
    return f"{v['sd_min']:.2f}-{v['sd_max']:.2f}" if v else "-"


def elbo_cell(c: dict) -> str:
    """z in MCSE; "exact" where q is the posterior (log p - log q constant, MCSE zero)."""
    if "elbo_z" not in c:
        return "-"
    exact = c["elbo_passed"] and abs(c["elbo_z"]) > 4
    return "exact" if exact else f"{c['elbo_z']:+.2f}" + ("" if c["elbo_passed"] else " FAIL")


def where(v: dict | None) -> str:
    return f" ({v['where']})" if v else ""


def markdown(rows: dict, config: dict, names: list[str], load: tuple[str, str]) -> str:
    from textbook import MODELS

    lines = [
        "# CAVI against NUTS and SVI on textbook models", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; float64; commit {code_version()}. 1-minute load average "
        f"at the start and end: {load[0]} and {load[1]} (2 cores: above 2 the units shared the "
        f"CPU). NUTS {config['nuts']['num_warmup']} + {config['nuts']['num_samples']}, one "
        f"chain timed, {config['reference_chains']} pooled for the reference; SVI AutoNormal, "
        f"Adam({config['svi_lr']}), {config['svi_steps']} steps; CAVI up "
        f"to {config['cavi_steps']} sweeps, default tol. Every unit in a fresh process. "
        "Definitions: the docstring of `benchmarks/models.py`.", "",
        "| model | source | CAVI | families | CAVI max abs dmean/sd | CAVI sd ratio | ELBO z "
        "(MCSE) | CAVI first s | CAVI repeated s | NUTS first s | NUTS repeated s | first "
        "ratio | SVI max abs dmean/sd | SVI sd ratio | SVI s | SVI at CAVI's time: max abs "
        "dmean/sd (steps) | NUTS MCSE/sd | r-hat |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    ratios, handled, elbo_ok, refused = [], 0, 0, []
    conjugate = [n for n in names if MODELS[n].conjugate]
    nonconjugate: list[str] = []  # (issue goals: 0.3 sd, sd ratio 0.6-1.1, 5x, closer than SVI)
    for n in names:
        c, nu, s, se = (rows.get(f"{n}|{m}", {}) for m in METHODS)
        cv, sv, sev = versus(c, nu), versus(s, nu), versus(se, nu)
        mcse = rhat = None
        if "quantities" in nu:
            import numpy as np
            mcse = max(float(np.max(np.asarray(q["mcse"]) / np.asarray(q["sd"])))
                       for q in nu["quantities"].values())
            rhat = max(float(np.nanmax(q["rhat"])) for q in nu["quantities"].values())
        ratio = nu["first_s"] / c["first_s"] if c.get("first_s") and "first_s" in nu else None
        if c.get("handled"):
            status = "yes" + ("" if c["converged"] else " (not converged)")
            handled += MODELS[n].conjugate
            elbo_ok += c["elbo_passed"]
            families = ", ".join(f"{k}: {v}" for k, v in c["families"].items())
            if "first_s" in nu and MODELS[n].conjugate:
                ratios.append(nu["first_s"] / c["first_s"])
            if MODELS[n].nonconjugate_goals and cv:
                met = [cv["z"] <= GOAL_NONCONJUGATE_Z,
                       GOAL_SD_RATIO[0] <= cv["sd_min"] and cv["sd_max"] <= GOAL_SD_RATIO[1],
                       ratio is not None and ratio >= GOAL_NONCONJUGATE_FIRST,
                       sev is None or cv["z"] < sev["z"]]
                nonconjugate.append(f"{n}: " + ", ".join(
                    f"{goal} {'met' if ok else 'MISSED'}" for goal, ok in zip(
                        ("means", "sd ratio", "first call", "closer than SVI at equal time"), met,
                        strict=True)))
        else:
            status = "refused" if "handled" in c else "error"
            families = (c.get("error") or "").replace("|", "/").replace("\n", " ")[:160]
            refused.append(n)
        lines.append(
            f"| {n} | {MODELS[n].source} | {status} | {families} | "
            f"{fmt(cv and cv['z'])}{where(cv)} | {span(cv)} | "
            f"{elbo_cell(c)} | {fmt(c.get('first_s'), '.2f')} | "
            f"{fmt(c.get('repeated_s'), '.3f')} | {fmt(nu.get('first_s'), '.1f')} | "
            f"{fmt(nu.get('repeated_s'), '.1f')} | "
            f"{fmt(ratio, '.1f')} | {fmt(sv and sv['z'])} | {span(sv)} | "
            f"{fmt(s.get('first_s'), '.1f')} | {fmt(sev and sev['z'])}"
            f"{' (' + str(se['steps']) + ')' if 'steps' in se else ''} | {fmt(mcse)} | "
            f"{fmt(rhat, '.3f')} |")
    median_ratio = statistics.median(ratios) if ratios else None
    lines += [
        "", "## Goals", "",
        f"- conditionally conjugate models handled: {handled} of {len(conjugate)}"
        f"{' (refused: ' + ', '.join(refused) + ')' if refused else ''};",
        f"- engine ELBO within 4 MCSE of the Monte Carlo check: {elbo_ok} of the handled;",
        f"- CAVI first call vs NUTS first call on the median handled model: "
        f"{fmt(median_ratio, '.1f')}x (goal {GOAL_FIRST:g}x: "
        f"{'met' if median_ratio and median_ratio >= GOAL_FIRST else 'MISSED'}).", "",
        f"Non-conjugate models and HalfCauchy scales (goals: max |dmean|/sd <= "
        f"{GOAL_NONCONJUGATE_Z:g}, sd ratio in "
        f"{GOAL_SD_RATIO[0]:g}-{GOAL_SD_RATIO[1]:g}, first call >= "
        f"{GOAL_NONCONJUGATE_FIRST:g}x NUTS's, closer to NUTS than SVI AutoNormal):", ""]
    lines += [f"- {line};" for line in nonconjugate] + [""]
    return "\n".join(lines)


def main() -> None:
    from plots import plot_models
    from textbook import MODELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=sorted(MODELS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rerun", action="store_true", help="ignore cached units")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                        help="the methods whose units run (with --rerun: rerun)")
    parser.add_argument("--unit")
    parser.add_argument("--config-json")
    parser.add_argument("--unit-output")
    args = parser.parse_args()
    if args.unit:
        name, method = args.unit.split(":")
        try:
            row = UNITS[method](name, json.loads(args.config_json))
        except Exception as err:  # noqa: BLE001 (the unit's failure is part of the result)
            row = {"error": f"{type(err).__name__}: {err}"[:400],
                   "traceback": traceback.format_exc()[-2000:]}
        write_atomic(Path(args.unit_output), json.dumps(row))
        return
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; known: {sorted(MODELS)}")
    config = QUICK if args.quick else FULL
    cache = ROOT / (config["output"] + ".json")
    rows = read_results(cache)
    done = set() if args.rerun else set(rows)
    load_start = f"{os.getloadavg()[0]:.2f}"
    for name in args.models:
        for method in args.methods:
            key = f"{name}|{method}"
            if key in done:
                continue
            print(f"{key} ...", flush=True)
            unit_config = dict(config, budget_s=rows.get(f"{name}|cavi", {}).get("first_s"))
            rows = save_result(cache, key, run_unit_subprocess(name, method, unit_config))
    order = [n for n in MODELS if n in args.models]
    table = markdown(rows, config, order, (load_start, f"{os.getloadavg()[0]:.2f}"))
    write_atomic(ROOT / (config["output"] + ".md"), table)
    plot_models({k: rows[k] for k in rows if k.split("|")[0] in order},
                ROOT / (config["output"] + ".png"))
    print(table)


if __name__ == "__main__":
    main()

"""Cost of the oracles' natural-domain check (no silent NaN) per call.

The same ``oracle.mean`` call with the check (the default) and without it (traced or called
inside ``trusted_domain()``), jitted, jitted under vmap, and eager; every call is waited for,
and each time is the minimum over alternating repeats (other processes inflate some repeats).

    python benchmarks/domain_check.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import numpyro_nnef as nnef
from numpyro_nnef.families import Gamma, Gaussian
from numpyro_nnef.oracles import Oracle, trusted_domain


def per_call_us(functions: list[Callable], arg: jax.Array, calls: int, repeats: int
                ) -> list[float]:
    """Minimum microseconds per call of each function, timed alternately."""
    for fn in functions:
        jax.block_until_ready(fn(arg))
    best = [np.inf] * len(functions)
    for _ in range(repeats):
        for i, fn in enumerate(functions):
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(fn(arg))
            best[i] = min(best[i], (time.perf_counter() - start) / calls * 1e6)
    return best


def variants(oracle: Oracle) -> dict[str, tuple[Callable, Callable]]:
    """mode -> (unchecked, checked) versions of ``oracle.mean``."""
    def call(e):
        return oracle.mean(e)

    def trusted_call(e):
        with trusted_domain():
            return oracle.mean(e)

    with trusted_domain():  # traced here: compiled without the check
        unchecked = jax.jit(call), jax.jit(jax.vmap(call))
        for fn in unchecked:
            jax.eval_shape(fn, jnp.zeros((1, oracle.family.stat_dim)))
    return {"jit": (unchecked[0], jax.jit(call)),
            "jit(vmap)": (unchecked[1], jax.jit(jax.vmap(call))),
            "eager": (trusted_call, call)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    cases = [(nnef.ExactOracle(Gamma()), 1, 2000), (nnef.ExactOracle(Gamma()), 1000, 300),
             (nnef.QuadratureOracle(Gaussian()), 16, 100)]
    print(f"{'oracle.mean':30s} {'batch':>5s} {'mode':>9s} {'unchecked us':>13s} "
          f"{'checked us':>11s} {'overhead us':>12s}")
    for oracle, batch, calls in cases:
        feasible = jnp.asarray(oracle.family.natural_constraint.feasible, jnp.float64)
        eta = jnp.tile(feasible + jnp.asarray([0.3, -0.7]), (batch, 1))
        for mode, pair in variants(oracle).items():
            n = calls if mode != "eager" else max(calls // 5, 20)
            plain, checked = per_call_us(list(pair), eta, n, args.repeats)
            print(f"{oracle.family.name + ' ' + type(oracle).__name__:30s} {batch:5d} "
                  f"{mode:>9s} {plain:13.1f} {checked:11.1f} {checked - plain:+12.1f}")


if __name__ == "__main__":
    main()

"""CAVI with a GIG factor against NUTS on the Park & Casella Bayesian lasso of tests/test_cavi.py.

Model ``bayesian_lasso`` (imported from tests/test_cavi.py): sigma2 ~ InverseGamma(1, 1),
tau2_j ~ Exponential(lam^2 / 2), w_j ~ Normal(0, sqrt(sigma2 tau2_j)), y ~ Normal(X w,
sqrt(sigma2)), lam = 1; the test's data (n = 30, p = 4, w = (1.5, 0, -0.7, 0), noise sd 0.5).
CAVI resolves tau2 to GIG. NUTS: 500 warm-up + 500 draws, one chain, float64. Prints the
posterior means and sds of w and max |CAVI mean - NUTS mean| / NUTS sd (goal < 0.5).

    python benchmarks/gig_lasso.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
from numpyro.infer import MCMC, NUTS

import numpyro_nnef as nnef

jax.config.update("jax_enable_x64", True)


def main() -> None:
    path = Path(__file__).resolve().parents[1] / "tests" / "test_cavi.py"
    spec = importlib.util.spec_from_file_location("test_cavi", path)
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    model = tests.bayesian_lasso
    rng = np.random.default_rng(1)                      # the lasso_data fixture of the tests
    X = rng.normal(size=(30, 4))
    y = X @ np.array([1.5, 0.0, -0.7, 0.0]) + 0.5 * rng.normal(size=30)
    X, y = jax.numpy.asarray(X), jax.numpy.asarray(y)

    guide = nnef.CAVIGuide(model)
    result = nnef.CAVI(model, guide).run(jax.random.key(0), 200, X, y)
    print({name: fam.family.name for name, fam in guide.conjugate.families.items()})
    print(f"CAVI: {result.num_steps} sweeps, converged {result.converged}, "
          f"{result.check_elbo(jax.random.key(1), 2000)}")
    draws = guide.sample_posterior(jax.random.key(3), result.params, sample_shape=(20000,))

    mcmc = MCMC(NUTS(model), num_warmup=500, num_samples=500, num_chains=1, progress_bar=False)
    mcmc.run(jax.random.key(2), X, y)
    nuts = mcmc.get_samples()
    nuts_mean, nuts_sd = np.asarray(nuts["w"].mean(0)), np.asarray(nuts["w"].std(0))
    cavi_mean, cavi_sd = np.asarray(draws["w"].mean(0)), np.asarray(draws["w"].std(0))
    np.set_printoptions(precision=4)
    print(f"w mean: NUTS {nuts_mean}, CAVI {cavi_mean}")
    print(f"w sd:   NUTS {nuts_sd}, CAVI {cavi_sd}")
    for name in ("sigma2", "tau2"):
        print(f"{name} mean: NUTS {np.asarray(nuts[name].mean(0))}, "
              f"CAVI {np.asarray(draws[name].mean(0))}")
    print(f"max |CAVI mean - NUTS mean| / NUTS sd of w: "
          f"{np.max(np.abs(cavi_mean - nuts_mean) / nuts_sd):.3f} (goal < 0.5)")


if __name__ == "__main__":
    main()

"""The CAVI ELBO checked against Monte Carlo estimates from q's own draws, on bilinear models and
on randomly generated conditionally conjugate models; bilinear fixed points against hand-derived
complete conditionals; the fixed points of random models and PPCA against the complete
conditionals read off the model's own log density (regression on T(x) at draws of q); q on random
single-site models against the closed-form posterior and NUTS."""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import log_density

import numpyro_nnef as nnef

# the textbook models of the benchmark, written as their sources write them
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from textbook import factor_analysis, ppca  # noqa: E402


@pytest.fixture(scope="module")
def ppca_result():
    X = np.random.default_rng(0).normal(size=(10, 3))
    guide = nnef.CAVIGuide(ppca)
    cavi = nnef.CAVI(ppca, guide, tol=1e-12)
    result = cavi.run(jax.random.key(1), 300, X)
    return X, guide, result, cavi


def test_ppca_fixed_point_is_the_hand_derived_complete_conditional(ppca_result):
    """eta(Z_nk) = (E tau sum_d E W_dk (X_nd - sum_{l != k} E Z_nl E W_dl),
    -(1 + E tau sum_d E W_dk^2) / 2): the bilinear term's diagonal needs E[W^2]."""
    X, guide, result, cavi = ppca_result
    assert {n: f.family.name for n, f in guide.conjugate.families.items()} == {
        "tau": "Gamma", "W": "Gaussian", "Z": "Gaussian"}
    mean = {n: np.asarray(v) for n, v in result.state.mean.items()}
    e_tau = mean["tau"][1]
    ez, ew, ew2 = mean["Z"][..., 0], mean["W"][..., 0], mean["W"][..., 1]
    residual = X - ez @ ew.T  # (n, d)
    # add back each k's own contribution: sum_{l != k} = full - own
    eta1 = e_tau * (residual @ ew + ez * (ew**2).sum(0))
    eta2 = -0.5 * (1 + e_tau * ew2.sum(0))
    # the engine's complete conditional of Z at the final state (a collapsing component
    # converges sublinearly, so the last sweep's Z saw slightly older W and tau)
    data = [jnp.asarray(a) for a in guide.conjugate.data()]
    natural = cavi._program.kernel.conditionals["Z"].natural(result.state.mu, data)
    np.testing.assert_allclose(np.asarray(natural),
                               np.stack([eta1, np.broadcast_to(eta2, eta1.shape)], -1),
                               rtol=1e-6, atol=1e-9)
    assert result.converged
    assert np.all(np.diff(result.elbo) >= -1e-9 * np.abs(result.elbo[1:]))


def test_ppca_elbo_agrees_with_monte_carlo(ppca_result):
    _, _, result, _ = ppca_result
    check = result.check_elbo(jax.random.key(2), 4000)
    assert check.passed(), str(check)
    assert check.mcse < 0.1


def test_factor_analysis_precisions_are_gamma_with_the_hand_derived_conditional():
    """q(psi_d) = Gamma(2 + n/2, 1 + sum_n E[(X_nd - sum_k Z_nk W_dk)^2] / 2) (the scale
    1/sqrt(psi_d), broadcast over rows, once gave a spurious psi^1/2 statistic)."""
    X = np.random.default_rng(1).normal(size=(8, 3))
    guide = nnef.CAVIGuide(factor_analysis)
    result = nnef.CAVI(factor_analysis, guide, tol=1e-13).run(jax.random.key(0), 500, X)
    assert guide.conjugate.families["psi"].family.name == "Gamma"
    mean = {n: np.asarray(v) for n, v in result.state.mean.items()}
    ez, ez2, ew, ew2 = mean["Z"][..., 0], mean["Z"][..., 1], mean["W"][..., 0], mean["W"][..., 1]
    fit = ez @ ew.T
    # E[(sum_k z_k w_k)^2] = (sum_k Ez Ew)^2 - sum_k (Ez Ew)^2 + sum_k E[z^2] E[w^2]
    square = fit**2 - (ez**2) @ (ew**2).T + ez2 @ ew2.T
    rate = 1 + 0.5 * (X**2 - 2 * X * fit + square).sum(0)
    np.testing.assert_allclose(np.asarray(result.params["psi_eta"]),
                               np.stack([np.full(3, 1 + 8 / 2), -rate], -1), rtol=1e-6)
    check = result.check_elbo(jax.random.key(2), 3000)
    assert check.passed(), str(check)


# ----------------------------------------------------------------------------- random models


def random_model(seed: int):
    """A random small conditionally conjugate model and its data: two or three of a linear
    regression with a shared noise precision, a bilinear (matrix factorisation) block, a
    Beta-Binomial block, a Dirichlet-Categorical mixture and a Poisson-Gamma block, with random
    plate sizes and hyperparameters."""
    rng = np.random.default_rng(seed)
    parts = rng.choice(["linear", "bilinear", "beta", "mixture", "poisson"],
                       size=int(rng.integers(2, 4)), replace=False).tolist()
    size = lambda: int(rng.integers(2, 5))  # noqa: E731
    hyper = lambda: float(rng.uniform(0.5, 3.0))  # noqa: E731
    data, spec = {}, {}
    if "linear" in parts or "bilinear" in parts:
        spec["tau"] = (hyper() + 1, hyper())
    if "linear" in parts:
        n, p = 3 * size(), size()
        spec["linear"] = (rng.normal(size=p), hyper())
        data["X"] = rng.normal(size=(n, p))
        data["y"] = data["X"] @ rng.normal(size=p) + 0.5 * rng.normal(size=n)
    if "bilinear" in parts:
        rows, cols, k = size() + 2, size() + 2, int(rng.integers(1, 3))
        data["Y"] = rng.normal(size=(rows, k)) @ rng.normal(size=(k, cols)) + 0.3 * rng.normal(
            size=(rows, cols))
        spec["bilinear"] = k
    if "beta" in parts:
        groups = size()
        spec["beta"] = (hyper(), hyper())
        data["trials"] = rng.integers(1, 8, size=groups).astype(float)
        data["successes"] = rng.binomial(data["trials"].astype(int), 0.4).astype(float)
    if "mixture" in parts:
        k = int(rng.integers(2, 4))
        spec["mixture"] = (k, hyper())
        data["m"] = np.concatenate([rng.normal(3.0 * j, 0.5, size=4) for j in range(k)])
    if "poisson" in parts:
        spec["poisson"] = (hyper(), hyper())
        data["counts"] = rng.poisson(3.0, size=size()).astype(float)

    def model(**d):
        if "tau" in spec:
            tau = numpyro.sample("tau", dist.Gamma(*spec["tau"]))
        if "linear" in spec:
            loc, scale = spec["linear"]
            with numpyro.plate("features", len(loc)):  # (not "p": the Beta site)
                w = numpyro.sample("w", dist.Normal(loc, scale))
            with numpyro.plate("n", len(d["y"])):
                numpyro.sample("y", dist.Normal(d["X"] @ w, 1 / jnp.sqrt(tau)), obs=d["y"])
        if "bilinear" in spec:
            rows, cols = d["Y"].shape
            with numpyro.plate("k", spec["bilinear"]):
                with numpyro.plate("rows", rows, dim=-2):
                    u = numpyro.sample("u", dist.Normal(0.0, 1.0))
                with numpyro.plate("cols", cols, dim=-2):
                    v = numpyro.sample("v", dist.Normal(0.0, 1.0))
            numpyro.sample("Y", dist.Normal(u @ v.T, 1 / jnp.sqrt(tau)), obs=d["Y"])
        if "beta" in spec:
            p = numpyro.sample("p", dist.Beta(*spec["beta"]))
            with numpyro.plate("g", len(d["trials"])):
                numpyro.sample("s", dist.Binomial(d["trials"], p), obs=d["successes"])
        if "mixture" in spec:
            k, prior_scale = spec["mixture"]
            pi = numpyro.sample("pi", dist.Dirichlet(jnp.ones(k)))
            with numpyro.plate("c", k):
                mu = numpyro.sample("mu", dist.Normal(0.0, 3.0 * prior_scale))
            with numpyro.plate("m_obs", len(d["m"])):
                z = numpyro.sample("z", dist.Categorical(pi))
                numpyro.sample("m", dist.Normal(mu[z], 0.5), obs=d["m"])
        if "poisson" in spec:
            rate = numpyro.sample("rate", dist.Gamma(*spec["poisson"]))
            with numpyro.plate("i", len(d["counts"])):
                numpyro.sample("counts", dist.Poisson(rate), obs=d["counts"])

    return model, data, parts


@pytest.mark.parametrize("seed", range(5))
def test_random_conjugate_models_elbo_agrees_with_monte_carlo(seed):
    model, data, parts = random_model(seed)
    guide = nnef.CAVIGuide(model)
    result = nnef.CAVI(model, guide).run(jax.random.key(seed), 30, **data)
    assert np.all(np.diff(result.elbo) >= -1e-9 * np.abs(result.elbo[1:])), parts
    check = result.check_elbo(jax.random.key(100 + seed), 3000)
    assert check.passed(), f"{parts}: {check}"


# ----------------------------------------------------------------------------- fixed points


@functools.lru_cache(maxsize=8)
def _regression_program(model, guide, num_draws: int, defensive: float):
    """The compiled estimate of ``conditional_natural_by_regression`` for one model and guide (one
    compilation per model: the perturbed-eta test reuses PPCA's)."""
    cm = guide._require()

    def draws_and_grids(params, key):
        values, grids, log_w = {}, {}, jnp.zeros(num_draws)
        for name, k in zip(cm.sites, jax.random.split(key, len(cm.sites)), strict=True):
            site, family = cm.sites[name], cm.families[name].family
            size = int(np.prod(site.batch_shape))
            q = guide.distribution(name, params[f"{name}_eta"])
            if q.support.is_discrete and q.has_enumerate_support and not site.element_shape:
                support = q.enumerate_support(expand=False).reshape(-1)  # (K,)
                log_q = q.log_prob(support.reshape((-1,) + (1,) * len(site.batch_shape)))
                log_r = jnp.log((1 - defensive) * jnp.exp(log_q) + defensive / len(support))
                idx = dist.Categorical(logits=jnp.moveaxis(log_r, 0, -1)).sample(k, (num_draws,))
                values[name] = support[idx]
                ratio = jnp.moveaxis(log_q - log_r, 0, -1)  # (*batch, K)
                picked = jnp.take_along_axis(jnp.broadcast_to(ratio, (*idx.shape, ratio.shape[-1])),
                                             idx[..., None], -1)
                log_w = log_w + picked.reshape(num_draws, -1).sum(1)
                grids[name] = jnp.broadcast_to(support, (size, len(support)))
            else:
                values[name] = q.sample(k, (num_draws,))
                # the grid: the first draws of the element's own factor (any points will do)
                grid = values[name][: 2 * family.stat_dim + 4]
                grids[name] = jnp.swapaxes(grid.reshape((-1, size, *site.element_shape)), 0, 1)
        return values, grids, jax.nn.softmax(log_w)

    def estimate(params, key, args, kwargs):
        log_joint = lambda values: log_density(model, args, kwargs, values)[0]  # noqa: E731
        values, grids, weights = draws_and_grids(params, key)
        out = {}
        for name, site in cm.sites.items():
            family, grid = cm.families[name].family, grids[name]  # (size, G, *element)
            size, d = grid.shape[0], family.stat_dim
            stats = family.sufficient_statistics(grid)  # (size, G, d)
            centred = stats - stats.mean(1, keepdims=True)
            pinv = jnp.linalg.pinv(centred)  # (size, d, G)

            def at_draw(draw, name=name, site=site, grid=grid, size=size):
                flat = draw[name].reshape((size, *site.element_shape))

                def at_point(i, point):
                    return log_joint({**draw, name: flat.at[i].set(point).reshape(site.shape)})

                return jax.vmap(jax.vmap(at_point, (None, 0)), (0, 0))(jnp.arange(size), grid)

            y = jax.vmap(at_draw)(values) - family.log_base_measure(grid)  # (S, size, G)
            eta = jnp.einsum("idg,sig->sid", pinv, y - y.mean(-1, keepdims=True))
            mean = jnp.einsum("s,sid->id", weights, eta)
            mcse = jnp.sqrt(jnp.einsum("s,sid->id", weights**2, (eta - mean) ** 2))
            shape = (*site.batch_shape, d)
            out[name] = (mean.reshape(shape), mcse.reshape(shape),
                         (pinv @ centred).reshape((*shape, d)))
        return out, 1 / jnp.sum(weights**2)

    return jax.jit(estimate)


def conditional_natural_by_regression(model, guide, params, rng_key, num_draws, *args,
                                      defensive=0.1, **kwargs):
    """E_{q_-k}[eta_k(x_-k)] for every element of every latent site, read off the model's own log
    density (NumPyro's ``log_density``, not the engine's algebra), with its Monte Carlo error.

    The identity: in a conditionally conjugate model, for any fixed values x_-k of everything else
    (the other sites, and the other elements of site k: under q they are independent of element
    i), log p(x_k, x_-k) - log h_k(x_k) = eta_k(x_-k) . T_k(x_k) + c(x_-k) exactly, as a function
    of x_k; CAVI's fixed point is eta_k = E_{q_-k}[eta_k(x_-k)] for every element. So for each of
    ``num_draws`` joint draws x^(s) of q, each site k and each element i, the log joint is
    evaluated with element i at each point of a grid in its support (2 stat_dim + 4 draws of its
    own factor; the whole support of a discrete one) and everything else at x^(s); regressing the
    centred values on the centred T_k (least squares, exact per draw) gives P eta^(s), P the
    projector onto the directions of eta that the grid identifies (the identity unless T_k is
    over-parametrised, as Categorical's one-hot, where eta and eta + c 1 are one distribution).

    Discrete sites are drawn from the defensive mixture r = (1 - defensive) q + defensive
    uniform, and the draws weighted by q / r (self-normalised): a category of probability 1e-6
    under q still moves E[eta] by 1e-6 times its effect, which plain draws of q would almost never
    show, nor their spread. Returns ({site: (weighted mean of P eta^(s), its MCSE, P)} with shapes
    (*batch, d), (*batch, d), (*batch, d, d); the effective sample size of the weights)."""
    program = _regression_program(model, guide, int(num_draws), float(defensive))
    out, ess = program({k: jnp.asarray(v) for k, v in params.items()}, rng_key, args, kwargs)
    return {k: tuple(np.asarray(a) for a in v) for k, v in out.items()}, float(ess)


def fixed_point_table(result, rng_key, num_draws=300, params=None):
    """{site: (P eta of the engine (or of ``params``), regression mean, MCSE, z)} with z = (engine
    - regression) / hypot(MCSE, 1e-6 (1 + |eta|)): the small absolute allowance covers sites whose
    conditional does not depend on q (zero spread; the least-squares fit's rounding)."""
    params = dict(result.params if params is None else params)
    estimate, ess = conditional_natural_by_regression(result.model, result.guide, params, rng_key,
                                                      num_draws, *result.args, **result.kwargs)
    assert ess > num_draws / 3, f"importance weights of the discrete sites degenerate: ESS {ess}"
    table = {}
    for name, (mean, mcse, proj) in estimate.items():
        engine = np.einsum("...de,...e->...d", proj, np.asarray(params[f"{name}_eta"]))
        z = (engine - mean) / np.hypot(mcse, 1e-6 * (1 + np.abs(engine)))
        table[name] = (engine, mean, mcse, z)
    return table


def assert_fixed_point(table, what, residual=None, num_mcse=5.0):
    """Every element's |z| <= num_mcse; the one-sweep change of eta (``residual``, where given)
    well inside the allowance, so that the run is at its fixed point."""
    for name, (engine, mean, mcse, z) in table.items():
        worst = np.unravel_index(np.argmax(np.abs(z)), z.shape)
        assert abs(z[worst]) <= num_mcse, (
            f"{what}: site {name!r} element {worst[:-1]} statistic {worst[-1]}: engine eta "
            f"{engine[worst]:.6g}, model's conditional {mean[worst]:.6g} +- {mcse[worst]:.2g} "
            f"({z[worst]:+.1f} MCSE)")
        if residual is not None:
            allowance = np.hypot(mcse, 1e-6 * (1 + np.abs(engine)))
            assert np.all(residual[name] <= 0.2 * allowance), (what, name, residual[name].max())


def converged_run(model, seed, **data):
    """CAVI to tol 1e-13 and the change of every eta in one more sweep."""
    guide = nnef.CAVIGuide(model)
    cavi = nnef.CAVI(model, guide, tol=1e-13)
    result = cavi.run(jax.random.key(seed), 2000, progress_bar=False, **data)
    again = cavi.run(jax.random.key(seed), 1, init_state=result.state, progress_bar=False, **data)
    residual = {n: np.abs(np.asarray(again.params[f"{n}_eta"])
                          - np.asarray(result.params[f"{n}_eta"])) for n in guide.conjugate.sites}
    return result, residual


@pytest.mark.parametrize("seed", range(5))
def test_random_conjugate_models_fixed_point_is_the_model_conditional(seed):
    model, data, parts = random_model(seed)
    result, residual = converged_run(model, seed, **data)
    table = fixed_point_table(result, jax.random.key(200 + seed))
    assert_fixed_point(table, str(parts), residual)


PPCA_DRAWS = 1000  # q(W)'s conditional varies much over q(Z): power to see a 10% change


def test_ppca_fixed_point_is_the_model_conditional(ppca_result):
    _, _, result, _ = ppca_result
    assert_fixed_point(fixed_point_table(result, jax.random.key(5), PPCA_DRAWS), "PPCA")


def test_fixed_point_check_detects_a_perturbed_eta(ppca_result):
    """The same check on PPCA with q(W)'s natural parameters scaled by 1.1: W's own comparison
    (its conditional depends on q(Z) and q(tau) only) fails."""
    _, _, result, _ = ppca_result
    perturbed = {**result.params, "W_eta": 1.1 * np.asarray(result.params["W_eta"])}
    table = fixed_point_table(result, jax.random.key(5), PPCA_DRAWS, params=perturbed)
    print("W perturbed by 1.1: z =", np.round(table["W"][3].ravel(), 1))
    with pytest.raises(AssertionError, match="site 'W'"):
        assert_fixed_point({"W": table["W"]}, "PPCA, W perturbed")


# ----------------------------------------------------------------------------- one latent site

SINGLE_SITE_KINDS = ("gaussian", "beta", "gamma", "dirichlet")


def random_single_site_model(seed: int):
    """A random model with one latent site, where mean field is exact and the posterior has a
    closed form: a Gaussian vector (``.to_event`` Normal or MultivariateNormal prior, random
    covariance) in a linear regression with known noise, a Beta-Binomial, a Gamma precision of
    Normal data (or a Gamma-Poisson rate), a Dirichlet-Categorical. The kind is
    SINGLE_SITE_KINDS[seed % 4]; sizes, hyperparameters and data come from the seed. Returns
    (model, data, site name, the exact posterior as a NumPyro distribution)."""
    rng = np.random.default_rng(1000 + seed)
    kind = SINGLE_SITE_KINDS[seed % len(SINGLE_SITE_KINDS)]
    hyper = lambda: float(rng.uniform(0.5, 3.0))  # noqa: E731
    if kind == "gaussian":
        n, p, noise = int(rng.integers(4, 12)), int(rng.integers(2, 5)), hyper()
        X, loc = rng.normal(size=(n, p)), rng.normal(size=p)
        y = X @ rng.normal(size=p) + noise * rng.normal(size=n)
        if rng.random() < 0.5:
            scale = rng.uniform(0.5, 2.0, size=p)
            prior = dist.Normal(loc, scale).to_event(1)
            prior_cov = np.diag(scale**2)
        else:
            a = rng.normal(size=(p, p))
            prior_cov = a @ a.T / p + 0.5 * np.eye(p)
            prior = dist.MultivariateNormal(loc, prior_cov)

        def model(X, y):
            w = numpyro.sample("w", prior)
            with numpyro.plate("n", len(y)):
                numpyro.sample("y", dist.Normal(X @ w, noise), obs=y)

        precision = np.linalg.inv(prior_cov) + X.T @ X / noise**2
        cov = np.linalg.inv(precision)
        post_mean = cov @ (np.linalg.solve(prior_cov, loc) + X.T @ y / noise**2)
        return model, {"X": X, "y": y}, "w", dist.MultivariateNormal(post_mean, cov)
    if kind == "beta":
        a, b = hyper(), hyper()
        trials = rng.integers(1, 10, size=int(rng.integers(2, 8))).astype(float)
        successes = rng.binomial(trials.astype(int), rng.uniform(0.2, 0.8)).astype(float)

        def model(trials, successes):
            p = numpyro.sample("p", dist.Beta(a, b))
            with numpyro.plate("g", len(trials)):
                numpyro.sample("s", dist.Binomial(trials, p), obs=successes)

        return (model, {"trials": trials, "successes": successes}, "p",
                dist.Beta(a + successes.sum(), b + (trials - successes).sum()))
    if kind == "gamma":
        a, b, n = hyper() + 1, hyper(), int(rng.integers(3, 12))
        if rng.random() < 0.5:
            centre = float(rng.normal())
            y = centre + rng.normal(size=n) / rng.uniform(0.5, 2.0)

            def model(y):
                tau = numpyro.sample("tau", dist.Gamma(a, b))
                with numpyro.plate("n", len(y)):
                    numpyro.sample("y", dist.Normal(centre, 1 / jnp.sqrt(tau)), obs=y)

            return model, {"y": y}, "tau", dist.Gamma(a + n / 2, b + ((y - centre) ** 2).sum() / 2)
        y = rng.poisson(rng.uniform(1.0, 5.0), size=n).astype(float)

        def model(y):
            rate = numpyro.sample("tau", dist.Gamma(a, b))
            with numpyro.plate("n", len(y)):
                numpyro.sample("y", dist.Poisson(rate), obs=y)

        return model, {"y": y}, "tau", dist.Gamma(a + y.sum(), b + n)
    k = int(rng.integers(3, 6))  # (two categories would be the Beta case again)
    alpha = rng.uniform(0.5, 3.0, size=k)
    c = rng.choice(k, size=int(rng.integers(3, 15)), p=rng.dirichlet(np.ones(k)))

    def model(c):
        pi = numpyro.sample("pi", dist.Dirichlet(alpha))
        with numpyro.plate("n", len(c)):
            numpyro.sample("c", dist.Categorical(pi), obs=c)

    return model, {"c": c}, "pi", dist.Dirichlet(alpha + np.bincount(c, minlength=k))


@pytest.mark.parametrize("seed", range(4))
def test_single_site_q_is_the_exact_posterior_and_agrees_with_nuts(seed):
    """q's mean and sd equal the closed-form posterior's (1e-6); NUTS (300 + 1000 draws, one
    chain) agrees with them within 4 Monte Carlo standard errors: for the mean sd / sqrt(ESS), for
    the sd that of the mean of (x - mean)^2 (its own ESS) divided by 2 sd."""
    from numpyro.diagnostics import effective_sample_size
    from numpyro.infer import MCMC, NUTS

    model, data, name, exact = random_single_site_model(seed)
    guide = nnef.CAVIGuide(model)
    result = nnef.CAVI(model, guide, tol=1e-13).run(jax.random.key(seed), 50, progress_bar=False,
                                                    **data)
    q = guide.distribution(name, result.params[f"{name}_eta"])
    mean, sd = np.asarray(q.mean), np.sqrt(np.asarray(q.variance))
    np.testing.assert_allclose(mean, exact.mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sd, np.sqrt(exact.variance), rtol=1e-6)
    if name == "w":  # the MultivariateNormal factor keeps the posterior correlation
        np.testing.assert_allclose(q.covariance_matrix, exact.covariance_matrix, rtol=1e-6,
                                   atol=1e-12)

    mcmc = MCMC(NUTS(model), num_warmup=300, num_samples=1000, progress_bar=False)
    mcmc.run(jax.random.key(300 + seed), **data)
    x = np.asarray(mcmc.get_samples()[name]).reshape(1000, -1)
    nuts_mean = x.mean(0)
    squares = (x - nuts_mean) ** 2
    nuts_sd = np.sqrt(squares.mean(0))
    mean_mcse = x.std(0) / np.sqrt(effective_sample_size(x[None]))
    sd_mcse = squares.std(0) / np.sqrt(effective_sample_size(squares[None])) / (2 * nuts_sd)
    z_mean = (nuts_mean - mean.ravel()) / mean_mcse
    z_sd = (nuts_sd - sd.ravel()) / sd_mcse
    what = (f"{type(q).__name__} q of site {name!r}: z(mean) {z_mean.round(2)}, "
            f"z(sd) {z_sd.round(2)}")
    print(what)
    assert np.all(np.abs(z_mean) <= 4) and np.all(np.abs(z_sd) <= 4), what


# ----------------------------------------------------------------------------- NumPyro surface


def test_quantiles_invert_the_cdf_and_arviz_export_has_every_group(ppca_result, capsys):
    X, guide, result, _ = ppca_result
    qs = guide.quantiles(result.params, [0.05, 0.5, 0.95])
    median = guide.median(result.params)
    for name in ("tau", "W", "Z"):
        q = guide.distribution(name, result.params[f"{name}_eta"])
        assert qs[name].shape == (3, *q.shape())
        np.testing.assert_allclose(q.cdf(qs[name]), np.broadcast_to(
            np.array([0.05, 0.5, 0.95]).reshape(3, *[1] * len(q.shape())), qs[name].shape),
            atol=1e-6)
        np.testing.assert_allclose(median[name], qs[name][1])
    with pytest.raises(ValueError, match=r"quantiles must be .* \(0, 1\)"):
        guide.quantiles(result.params, [0.5, 1.5])
    idata = result.to_arviz(jax.random.key(3), num_samples=50, num_chains=2)
    assert idata.posterior["Z"].shape == (2, 50, *X.shape[:1], 2)
    assert idata.posterior_predictive["X"].shape == (2, 50, *X.shape)
    assert idata.log_likelihood["X"].shape == (2, 50, *X.shape)
    np.testing.assert_array_equal(idata.observed_data["X"], X)
    result.print_summary(jax.random.key(4), num_samples=200)
    assert "tau" in capsys.readouterr().out


def test_discrete_quantiles_need_a_key():
    from test_cavi import mixture

    y = jnp.asarray(np.r_[np.full(5, -3.0), np.full(5, 3.0)])
    guide = nnef.CAVIGuide(mixture)
    result = nnef.CAVI(mixture, guide).run(jax.random.key(0), 20, y, 2)
    with pytest.raises(ValueError, match="site 'pi'.*rng_key"):
        guide.median(result.params)
    median = guide.median(result.params, rng_key=jax.random.key(1))
    assert set(np.unique(np.asarray(median["z"]))) <= {0, 1}
    assert median["pi"].shape == (2,)


def test_elbo_check_allows_rounding_only():
    """q equal to the posterior: log p - log q is constant, the MCSE is zero, and only the
    float64 rounding of the engine's sums separates the two numbers."""
    exact = nnef.ELBOCheck(-24.4141, -24.4141 + 3e-14, 3e-16, 2000, rounding=100 * 2.2e-16 * 24.4)
    assert exact.passed()
    assert not nnef.ELBOCheck(-24.4141, -24.4141 + 3e-14, 3e-16, 2000).passed()
    assert not nnef.ELBOCheck(-10.0, -10.5, 0.01, 2000).passed()
    assert nnef.ELBOCheck(-10.0, -10.03, 0.01, 2000).passed()


def test_update_takes_the_data_as_svi_does():
    """init/update/get_params as SVI's: update(state, *args) sweeps on the data it is given,
    so a loop of updates on new data equals a run on that data (here of another length: the
    normal-gamma model's structure does not depend on it)."""
    from test_cavi import lasso, normal_gamma

    rng = np.random.default_rng(3)
    y1, y2 = jnp.asarray(rng.normal(size=12)), jnp.asarray(rng.normal(2.0, 1.0, size=7))
    reference = nnef.CAVI(normal_gamma, nnef.CAVIGuide(normal_gamma), tol=1e-13).run(
        jax.random.key(0), 30, y2, progress_bar=False)
    cavi = nnef.CAVI(normal_gamma, nnef.CAVIGuide(normal_gamma), tol=1e-13)
    state = cavi.init(jax.random.key(0), y1)
    for _ in range(reference.num_steps):
        state, elbo = cavi.update(state, y2)
    np.testing.assert_allclose(cavi.get_params(state)["mu_eta"], reference.params["mu_eta"],
                               rtol=1e-9)
    np.testing.assert_allclose(cavi.evaluate(state, y2), reference.elbo[-1], rtol=1e-9)
    X = rng.normal(size=(10, 3))
    cavi = nnef.CAVI(lasso, nnef.CAVIGuide(lasso))
    state = cavi.init(jax.random.key(0), X, X @ np.ones(3))
    with pytest.raises(ValueError, match="another structure.*call init"):
        cavi.update(state, X[:, :2], X[:, :2] @ np.ones(2))

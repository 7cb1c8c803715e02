"""NUTS data generation: accuracy, diagnostics, retries, checkpoints, keys, sharding.

Kept fast: every NUTS call here shares one of three compiled configurations (module fixtures).
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_nnef import sampling
from numpyro_nnef.family import ExponentialFamily, NaturalDomain, OutOfDomainError
from numpyro_nnef.sampling import (
    compute_diagnostics,
    generate_dataset,
    passes_diagnostics,
    run_nuts,
    sample_etas,
    sample_family,
)

ROOT = Path(__file__).resolve().parents[1]

# one compiled configuration for the Gaussian: 2 chains x (150 + 300), batches of 4 etas
SETTINGS = dict(num_chains=2, num_warmup=150, num_samples=300)
GEN = dict(SETTINGS, chunk_size=4, max_retries=0, min_ess=50, max_rhat=1.1, progress=False,
           fallback=None)
ETAS = np.array([[0.0, -0.5], [1.0, -1.0], [-1.0, -2.0], [0.5, -0.3],
                 [2.0, -1.5], [-0.5, -0.8], [0.2, -2.5], [1.5, -0.6]])


def _gaussian():
    return ExponentialFamily.from_statistics(
        "TestGaussian", lambda x: {"x": x, "x2": x * x},
        natural_constraint=NaturalDomain(lambda e: e[..., 1] < 0, "eta[x2] < 0", [0.0, -0.5]),
    )


def gaussian_moments(eta):
    """E[x], E[x^2] for eta = (m / s^2, -1 / (2 s^2))."""
    var = -0.5 / eta[:, 1]
    m = eta[:, 0] * var
    return np.stack([m, m * m + var], axis=-1)


@pytest.fixture(scope="module")
def gauss():
    return _gaussian()


@pytest.fixture(scope="module")
def data(gauss):
    return generate_dataset(gauss, ETAS, key=jax.random.key(7), **GEN)


@pytest.fixture(scope="module")
def draws(gauss):
    return run_nuts(gauss, ETAS[:4], key=jax.random.key(3), **SETTINGS)


# ------------------------------------------------------------------------------- accuracy
def test_dataset_means_match_closed_form(data):
    exact = gaussian_moments(data.eta)
    z = np.abs(data.mean - exact) / data.mcse
    assert np.mean(z < 4) >= 0.9, z
    assert np.all(z < 8), z
    var = -0.5 / data.eta[:, 1]
    np.testing.assert_allclose(data.cov[:, 0, 0], var, rtol=0.3)


def test_dataset_fields_and_shapes(data):
    n, d = ETAS.shape
    assert len(data) == n and data.stat_labels == ("x", "x2")
    np.testing.assert_array_equal(data.eta, ETAS)
    for name in ("mean", "ess_bulk", "ess_tail", "rhat", "mcse"):
        assert getattr(data, name).shape == (n, d) and getattr(data, name).dtype == np.float64
    assert data.cov.shape == (n, d, d)
    for name in ("divergences", "num_samples", "retries"):
        assert getattr(data, name).shape == (n,) and getattr(data, name).dtype == np.int64
    assert data.passed.dtype == np.bool_ and data.passed.all()
    assert np.all(data.num_samples == 300) and np.all(data.retries == 0)
    assert np.all(data.divergences == 0)
    assert np.all(data.rhat < 1.1) and np.all(data.ess_bulk > 50)
    np.testing.assert_allclose(data.cov, np.swapaxes(data.cov, 1, 2))
    meta = data.metadata
    assert meta["sampler"]["num_chains"] == 2 and meta["family"]["name"] == "TestGaussian"
    assert json.loads(json.dumps(meta)) == meta


def test_run_nuts_shapes(draws, gauss):
    assert draws.statistics.shape == (4, 2, 300, 2)
    assert draws.divergences.shape == (4,) and draws.step_size.shape == (4, 2)
    assert draws.x is None
    # T(x) really is (x, x^2) of the draws
    s = np.asarray(draws.statistics)
    np.testing.assert_allclose(s[..., 1], s[..., 0] ** 2, rtol=1e-10)


def test_diagnostics_match_arviz(draws):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    s = np.asarray(draws.statistics, dtype=np.float64)
    diag = compute_diagnostics(s, draws.divergences)
    for i in range(s.shape[0]):
        for j in range(s.shape[-1]):
            x = s[i, :, :, j]
            assert diag["ess_bulk"][i, j] == pytest.approx(az.ess(x, method="bulk"), rel=1e-10)
            assert diag["ess_tail"][i, j] == pytest.approx(az.ess(x, method="tail"), rel=1e-10)
            assert diag["rhat"][i, j] == pytest.approx(az.rhat(x), rel=1e-10)
            assert diag["mcse"][i, j] == pytest.approx(az.mcse(x), rel=1e-10)
        flat = s[i].reshape(-1, s.shape[-1])
        np.testing.assert_allclose(diag["mean"][i], flat.mean(0))
        np.testing.assert_allclose(diag["cov"][i], np.cov(flat.T), rtol=1e-10)
    np.testing.assert_array_equal(diag["divergences"], np.asarray(draws.divergences))
    ok = passes_diagnostics(diag, min_ess=50, max_rhat=1.1)
    assert ok.shape == (4,) and ok.all()
    assert not passes_diagnostics(diag, min_ess=1e9).any()
    diag["divergences"][0] = 1
    assert not passes_diagnostics(diag, min_ess=50, max_rhat=1.1)[0]


# ------------------------------------------------------------------------------- keys
def test_fixed_key_reproduces(gauss, data):
    again = generate_dataset(gauss, ETAS, key=jax.random.key(7), **GEN)
    for name in ("mean", "cov", "ess_bulk", "ess_tail", "rhat", "mcse", "divergences"):
        np.testing.assert_array_equal(getattr(again, name), getattr(data, name))
    other = generate_dataset(gauss, ETAS[:4], key=jax.random.key(8), **GEN)
    assert not np.array_equal(other.mean, data.mean[:4])
    # legacy uint32 keys are accepted and mean the same key
    legacy = generate_dataset(gauss, ETAS[:4], key=jax.random.PRNGKey(7), **GEN)
    np.testing.assert_array_equal(legacy.mean, data.mean[:4])


def test_run_nuts_keys_are_per_point(gauss, draws):
    """Point i's draws depend on (key, i) only, not on which other etas share its batch."""
    swapped = ETAS[:4].copy()
    swapped[2:] = ETAS[4:6]
    again = run_nuts(gauss, swapped, key=jax.random.key(3), **SETTINGS)
    np.testing.assert_allclose(np.asarray(again.statistics[:2]),
                               np.asarray(draws.statistics[:2]), atol=1e-8)


# ------------------------------------------------------------------------------- retries
def test_retry_reruns_the_same_eta(gauss, monkeypatch):
    calls = []
    real = sampling._run_flat

    def spy(family, etas, keys, **kw):
        calls.append((np.asarray(etas).copy(), kw["num_samples"], kw["num_warmup"]))
        return real(family, etas, keys, **kw)

    monkeypatch.setattr(sampling, "_run_flat", spy)
    compiled = len(sampling._SAMPLER_CACHE)
    # ess >= 1e9 is impossible: every point fails, is retried once with twice the chains (two
    # replicas of each point, new keys), and stays flagged; the rerun uses the same etas through
    # the first attempt's compiled program (same batch shape and settings: no new compilation)
    settings = dict(GEN, max_retries=1, min_ess=1e9)
    result = generate_dataset(gauss, ETAS[:4], key=jax.random.key(7), **settings)
    assert len(calls) == 3
    np.testing.assert_array_equal(calls[0][0], ETAS[:4])
    np.testing.assert_array_equal(np.concatenate([c[0] for c in calls[1:]]),
                                  np.repeat(ETAS[:4], 2, axis=0))
    assert all(c[0].shape == (4, 2) and c[1:] == (300, 150) for c in calls)
    assert len(sampling._SAMPLER_CACHE) <= compiled + 1
    np.testing.assert_array_equal(result.eta, ETAS[:4])
    assert np.all(result.retries == 1) and np.all(result.num_samples == 300)
    assert not result.passed.any()
    # the retried draws are new ones (fold_in per attempt), still accurate
    z = np.abs(result.mean - gaussian_moments(ETAS[:4])) / result.mcse
    assert np.mean(z < 4) >= 0.75


# ------------------------------------------------------------------------------- checkpoints
class Interrupt(Exception):
    pass


def test_resume_after_interruption(gauss, data, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"

    def stop_after_first(chunk, done, total):
        if chunk == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        generate_dataset(gauss, ETAS, key=jax.random.key(7), checkpoint_dir=ckpt,
                         callback=stop_after_first, **GEN)
    assert sorted(p.name for p in ckpt.iterdir()) == ["chunk_00000.npz", "manifest.json"]

    computed = []
    real = sampling._run_flat
    monkeypatch.setattr(sampling, "_run_flat",
                        lambda f, e, k, **kw: computed.append(np.asarray(e)) or real(f, e, k, **kw))
    resumed = generate_dataset(gauss, ETAS, key=jax.random.key(7), checkpoint_dir=ckpt, **GEN)
    assert len(computed) == 1  # only the second chunk was sampled
    np.testing.assert_array_equal(computed[0], ETAS[4:])
    for name in ("mean", "cov", "ess_bulk", "rhat", "mcse", "passed", "num_samples"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(data, name))
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["chunk_00000.npz", "chunk_00001.npz", "manifest.json"]  # no tmp files

    # everything finished: a rerun samples nothing
    computed.clear()
    generate_dataset(gauss, ETAS, key=jax.random.key(7), checkpoint_dir=ckpt, **GEN)
    assert computed == []

    # a different run must not reuse this directory
    with pytest.raises(ValueError, match="different run.*key"):
        generate_dataset(gauss, ETAS, key=jax.random.key(8), checkpoint_dir=ckpt, **GEN)
    with pytest.raises(ValueError, match="different run"):
        generate_dataset(gauss, ETAS[::-1], key=jax.random.key(7), checkpoint_dir=ckpt, **GEN)
    with pytest.raises(ValueError, match="different run.*settings"):
        generate_dataset(gauss, ETAS, key=jax.random.key(7), checkpoint_dir=ckpt,
                         **dict(GEN, num_samples=200))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"something": "else"}')
    with pytest.raises(ValueError, match="does not hold generate_dataset checkpoints"):
        generate_dataset(gauss, ETAS, key=jax.random.key(7), checkpoint_dir=foreign, **GEN)


# ------------------------------------------------------------------------------- validation
def test_out_of_domain_and_bad_statistics_raise(gauss):
    with pytest.raises(OutOfDomainError, match="eta\\[x2\\] < 0"):
        generate_dataset(gauss, [[0.0, 0.5]], key=jax.random.key(0), **GEN)
    with pytest.raises(OutOfDomainError):
        run_nuts(gauss, jnp.array([[0.0, 1.0]]), key=jax.random.key(0))
    with pytest.raises(ValueError, match="shape"):
        generate_dataset(gauss, [[0.0, -1.0, 2.0]], key=jax.random.key(0), **GEN)
    # log x on the real line: T is NaN for x < 0
    bad = ExponentialFamily.from_statistics("BadLog", lambda x: {"x2": x * x, "log": jnp.log(x)})
    with pytest.raises(ValueError, match="BadLog.*not finite"):
        generate_dataset(bad, [[-1.0, 0.0]], key=jax.random.key(0), **GEN)
    with pytest.raises(ValueError, match="num_samples"):
        generate_dataset(gauss, ETAS, key=jax.random.key(0), **dict(GEN, num_samples=0))


# ------------------------------------------------------------------------------- positive support
@pytest.fixture(scope="module")
def gamma():
    families = pytest.importorskip("numpyro_nnef.families")
    exact = pytest.importorskip("numpyro_nnef.oracles.exact")
    family = families.Gamma()
    return family, exact.ExactOracle(family)


def test_unconstrained_log_density_has_jacobian(gamma):
    family, _ = gamma
    eta = jnp.array([1.5, -2.0])
    logdensity = sampling.unconstrained_log_density(family, eta)
    u = jnp.array(0.3)
    x = jnp.exp(u)  # biject_to(positive) = exp, log|dx/du| = u
    expected = eta[0] * jnp.log(x) + eta[1] * x + u
    assert float(logdensity(u)) == pytest.approx(float(expected), rel=1e-12)


def test_positive_support_samples_in_unconstrained_space(gamma):
    family, oracle = gamma
    etas = jnp.array([[0.0, -1.0], [2.0, -3.0], [-0.5, -0.5], [4.0, -1.0]])
    out = run_nuts(family, etas, key=jax.random.key(1), return_x=True, **SETTINGS)
    x = np.asarray(out.x)
    assert x.shape == (4, 2, 300) and np.all(x > 0) and np.all(np.isfinite(x))
    np.testing.assert_allclose(np.asarray(out.statistics),
                               np.stack([np.log(x), x], axis=-1), rtol=1e-10)
    diag = compute_diagnostics(out.statistics, out.divergences)
    exact = np.asarray(oracle.mean(etas))
    z = np.abs(diag["mean"] - exact) / diag["mcse"]
    assert np.mean(z < 4) >= 0.85, z
    assert np.all(z < 8), z
    # sample_family: x ~ p(x | eta), shape sample_shape + batch, same compiled sampler
    draws = sample_family(family, etas, key=jax.random.key(2), sample_shape=(20, 30),
                          num_chains=2, num_warmup=150)
    assert draws.shape == (20, 30, 4) and bool(jnp.all(draws > 0))
    shape, rate = np.asarray(etas[:, 0]) + 1, -np.asarray(etas[:, 1])
    np.testing.assert_allclose(np.asarray(draws).reshape(600, 4).mean(0), shape / rate,
                               rtol=0.25)


# ------------------------------------------------------------------------------- eta boxes
def test_sample_etas_uniform_and_log_uniform(gauss):
    etas = sample_etas(gauss, key=jax.random.key(0), low=[-1, -3], high=[2, -0.5], num=500)
    assert etas.shape == (500, 2) and etas.dtype == np.float64
    assert np.all(etas >= [-1, -3]) and np.all(etas <= [2, -0.5])
    assert abs(etas[:, 0].mean() - 0.5) < 0.2
    again = sample_etas(gauss, key=jax.random.key(0), low=[-1, -3], high=[2, -0.5], num=500)
    np.testing.assert_array_equal(etas, again)

    logs = sample_etas(gauss, key=jax.random.key(1), low=[0.01, -100], high=[100, -0.01],
                       num=2000, scale="log-uniform")
    assert np.all(logs[:, 0] > 0) and np.all(logs[:, 1] < 0)
    # log|eta| is uniform on [log 0.01, log 100]: median |eta| near 1
    assert 0.5 < np.median(logs[:, 0]) < 2 and 0.5 < np.median(-logs[:, 1]) < 2
    mixed = sample_etas(gauss, key=jax.random.key(1), low=[-1, -100], high=[1, -0.01], num=2000,
                        scale=["uniform", "log-uniform"])
    assert mixed[:, 0].min() < 0 < mixed[:, 0].max() and 0.5 < np.median(-mixed[:, 1]) < 2


def test_sample_etas_rejects_bad_boxes(gauss):
    with pytest.raises(OutOfDomainError, match="TestGaussian.*eta\\[x2\\] < 0"):
        sample_etas(gauss, key=jax.random.key(0), low=[-1, -1], high=[1, 0.5], num=10)
    with pytest.raises(ValueError, match="one sign"):
        sample_etas(gauss, key=jax.random.key(0), low=[-1, -2], high=[1, -1], num=10,
                    scale="log-uniform")
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        sample_etas(gauss, key=jax.random.key(0), low=[-1], high=[1], num=10)
    with pytest.raises(ValueError, match="low <= high"):
        sample_etas(gauss, key=jax.random.key(0), low=[1, -1], high=[-1, -2], num=10)
    with pytest.raises(ValueError, match="scale"):
        sample_etas(gauss, key=jax.random.key(0), low=[0, -2], high=[1, -1], num=10,
                    scale="normal")


# ------------------------------------------------------------------------------- sharding
SHARDED_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from test_sampling import ETAS, SETTINGS, _gaussian
    from numpyro_nnef.sampling import generate_dataset, run_nuts
    assert jax.local_device_count() == 4, jax.devices()
    family = _gaussian()
    # 5 etas: padded to 8 (a multiple of the device count), then cut back
    out = run_nuts(family, ETAS[:5], key=jax.random.key(3), **SETTINGS)
    assert out.statistics.shape == (5, 2, 300, 2)
    assert len(out.statistics.sharding.device_set) == 4
    data = generate_dataset(family, ETAS[:5], key=jax.random.key(9), **dict(SETTINGS,
                            chunk_size=5, max_retries=0, min_ess=50, max_rhat=1.1,
                            progress=False))
    assert len(data) == 5 and data.passed.all()
    np.save(sys.argv[1], np.asarray(out.statistics))
""")


def test_sharded_over_four_host_devices(tmp_path, draws):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                   [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT, str(tmp_path / "s.npy"), str(ROOT / "tests")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = np.load(tmp_path / "s.npy")
    # per-point keys: the same draws as on one device, up to rounding
    np.testing.assert_allclose(sharded[:4], np.asarray(draws.statistics), atol=1e-6)

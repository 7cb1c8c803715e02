"""Cheaper NUTS data: warm-started adaptation and the ChEES-HMC kernel (sampler="chees")."""

import jax
import numpy as np
import pytest
from test_sampling import ETAS, GEN, Interrupt, _gaussian, gaussian_moments, stop_after_first

from numpyro_nnef import sampling
from numpyro_nnef.sampling import generate_dataset

STRICT = dict(GEN, min_ess=100, max_rhat=1.05)


@pytest.fixture(scope="module")
def gauss():
    return _gaussian()


def _within(data):
    """|mean - closed form| / MCSE of the points that passed."""
    z = np.abs(data.mean - gaussian_moments(ETAS)) / data.mcse
    return z[data.passed]


def test_warm_start_adapts_later_chunks_from_the_first(gauss, monkeypatch):
    calls = []
    real = sampling._run_flat

    def spy(f, e, k, **kw):
        calls.append((np.asarray(e), kw["num_warmup"], kw.get("warm")))
        return real(f, e, k, **kw)

    monkeypatch.setattr(sampling, "_run_flat", spy)
    data = generate_dataset(gauss, ETAS, key=jax.random.key(7), warm_start=True, **STRICT)
    first, later = calls[0], calls[1]
    assert first[1] == GEN["num_warmup"] and first[2] is None  # the first chunk: full windows
    np.testing.assert_array_equal(later[0], ETAS[4:])
    assert later[1] == GEN["num_warmup"] // 5  # step size alone, a fifth of the steps
    step, imm = later[2]
    assert np.all(np.isfinite(step)) and np.all(step > 0) and np.asarray(imm).shape == (4, 1)
    assert data.metadata["sampler"]["warm_start"] is True
    assert data.passed.mean() >= 0.75
    assert np.all(_within(data) < 4.0)  # means within 4 MCSE of the closed form


def test_warm_start_resumes_bit_identically(gauss, tmp_path):
    kwargs = dict(STRICT, warm_start=True)
    whole = generate_dataset(gauss, ETAS, key=jax.random.key(7), **kwargs)
    with pytest.raises(Interrupt):
        generate_dataset(gauss, ETAS, key=jax.random.key(7), checkpoint_dir=tmp_path,
                         callback=stop_after_first, **kwargs)
    resumed = generate_dataset(gauss, ETAS, key=jax.random.key(7), checkpoint_dir=tmp_path,
                               **kwargs)  # warm-starts from the saved first chunk
    for name in ("mean", "cov", "ess_bulk", "rhat", "mcse", "passed"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(whole, name))


def test_options_validated(gauss):
    with pytest.raises(ValueError, match="warm_start must be True or False"):
        generate_dataset(gauss, ETAS, key=jax.random.key(0), warm_start="yes", **GEN)
    with pytest.raises(ValueError, match="warm_start=True needs sampler='nuts'"):
        generate_dataset(gauss, ETAS, key=jax.random.key(0), warm_start=True, sampler="chees",
                         **GEN)
    with pytest.raises(ValueError, match="'nuts', 'chees' or 'smc'"):
        generate_dataset(gauss, ETAS, key=jax.random.key(0), sampler="mala", **GEN)


def test_chees_gives_the_same_fields_and_honest_errors(gauss):
    nuts = generate_dataset(gauss, ETAS[:4], key=jax.random.key(7), **STRICT)
    chees = generate_dataset(gauss, ETAS, key=jax.random.key(7), sampler="chees",
                             **dict(STRICT, num_chains=8))
    for name in ("mean", "cov", "ess_bulk", "ess_tail", "rhat", "mcse", "divergences",
                 "num_samples", "retries", "passed"):
        assert getattr(chees, name).shape[1:] == getattr(nuts, name).shape[1:], name
        assert getattr(chees, name).dtype == getattr(nuts, name).dtype, name
    assert chees.metadata["sampler"]["sampler"] == "blackjax.dynamic_hmc+chees_adaptation"
    assert chees.passed.mean() >= 0.75
    assert np.all(_within(chees) < 4.0)

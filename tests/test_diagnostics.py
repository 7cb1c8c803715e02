"""numpyro_nnef.diagnostics reproduces ArviZ's ess (bulk, tail), rhat (rank) and mcse (mean)."""

import warnings

import numpy as np
import pytest

from numpyro_nnef import diagnostics

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

PAIRS = [
    (diagnostics.ess_bulk, lambda ds: az.ess(ds, method="bulk")),
    (diagnostics.ess_tail, lambda ds: az.ess(ds, method="tail")),
    (diagnostics.rhat, lambda ds: az.rhat(ds)),
    (diagnostics.mcse_mean, lambda ds: az.mcse(ds, method="mean")),
]


def assert_matches_arviz(x):
    """Each diagnostic of x (chain, draw, *rest) equals ArviZ's to rtol 1e-6, NaN/inf alike."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's own warnings on NaN, inf, short chains
        dataset = az.convert_to_dataset({"x": x})
        expected_all = [np.asarray(theirs(dataset)["x"].values, np.float64) for _, theirs in PAIRS]
    for (ours, _), expected in zip(PAIRS, expected_all, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # ours warns about nothing
            got = ours(x)
        assert got.shape == expected.shape == x.shape[2:], ours.__name__
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=ours.__name__)
        np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=ours.__name__)


def ar1(rng, chains, draws, rest, phi, heavy=False):
    """AR(1) chains x_t = phi x_{t-1} + e_t (phi broadcast over rest), e ~ N(0, 1) or t(2)."""
    shape = (chains, draws) + rest
    e = rng.standard_t(2, shape) if heavy else rng.standard_normal(shape)
    x = np.empty(shape)
    x[:, 0] = e[:, 0]
    for t in range(1, draws):
        x[:, t] = phi * x[:, t - 1] + e[:, t]
    return x


@pytest.mark.parametrize(
    "chains, draws, rest, heavy",
    [
        (4, 1000, (), False),
        (4, 1001, (3,), False),  # odd draws: ArviZ drops the middle draw when splitting
        (1, 500, (3,), True),  # one chain (R-hat NaN), heavy tails
        (4, 301, (2, 3), True),
        (1, 1001, (2, 3), False),
        (2, 9, (2, 3), False),  # short chains: Geyer's sequence stops on the lag bound
    ],
)
def test_matches_arviz_on_ar1_chains(chains, draws, rest, heavy):
    rng = np.random.default_rng(draws + 10 * chains)
    # autocorrelations from antithetic to sticky, one per series
    phi = np.linspace(-0.7, 0.99, max(np.prod(rest, dtype=int), 1)).reshape(rest) if rest else 0.9
    assert_matches_arviz(ar1(rng, chains, draws, rest, phi, heavy))


def test_matches_arviz_on_special_series():
    rng = np.random.default_rng(0)
    x = ar1(rng, 4, 200, (8,), 0.5)
    x[:, :, 0] = 1.5  # constant: ESS = number of split draws, R-hat NaN, mcse 0
    x[:, :, 1] = np.round(x[:, :, 1])  # many ties
    x[:, :, 2] = x[:, :, 2] > 0.8  # binary
    x[:, :, 3] = np.arange(4)[:, None]  # constant chains with different values: huge R-hat
    x[2, 17, 4] = np.nan  # NaN anywhere: all NaN
    x[1, 3, 5] = np.inf
    x[:, :120, 6] = np.inf  # median inf: folded R-hat NaN, so R-hat is the bulk one
    x[:, :150, 7] = -np.inf
    out = diagnostics.ess_bulk(x)
    assert out[0] == 4 * 2 * 100 and np.isnan(out[4])
    assert np.isnan(diagnostics.rhat(x)[0]) and diagnostics.rhat(x)[3] > 1e6
    assert diagnostics.mcse_mean(x)[0] == 0
    assert_matches_arviz(x)


def test_too_short_or_empty():
    rng = np.random.default_rng(1)
    assert_matches_arviz(ar1(rng, 4, 3, (2,), 0.3))  # fewer than 4 draws: NaN
    assert_matches_arviz(ar1(rng, 2, 4, (2,), 0.3))  # the fewest draws ArviZ accepts
    assert diagnostics.ess_bulk(np.zeros((4, 10, 0))).shape == (0,)
    with pytest.raises(ValueError, match="chain, draw"):
        diagnostics.rhat(np.zeros(10))

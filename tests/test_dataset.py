"""ExpectationDataset: validation, npz round trip (never unpickled), split, subset, summary."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_nnef.dataset import FORMAT_NAME, ExpectationDataset
from numpyro_nnef.family import ExponentialFamily


def make_dataset(n=20, d=2, seed=0, **overrides):
    rng = np.random.default_rng(seed)
    fields = dict(
        family_name="Toy",
        stat_labels=tuple(f"t{i}" for i in range(d)),
        eta=rng.normal(size=(n, d)),
        mean=rng.normal(size=(n, d)),
        cov=np.broadcast_to(np.eye(d), (n, d, d)) * 2.0,
        ess_bulk=rng.uniform(300, 2000, size=(n, d)),
        ess_tail=rng.uniform(300, 2000, size=(n, d)),
        rhat=rng.uniform(0.999, 1.02, size=(n, d)),
        mcse=rng.uniform(0.01, 0.05, size=(n, d)),
        divergences=rng.integers(0, 2, size=n),
        num_samples=np.full(n, 1000),
        retries=rng.integers(0, 3, size=n),
        passed=rng.uniform(size=n) < 0.8,
        metadata={"sampler": {"min_ess": 400, "max_rhat": 1.01}, "note": "test"},
    )
    fields.update(overrides)
    return ExpectationDataset(**fields)


def toy_family(labels=("t0", "t1"), name="Toy"):
    return ExponentialFamily.from_statistics(
        name, lambda x: {lab: x ** (i + 1) for i, lab in enumerate(labels)}
    )


def assert_same(a, b):
    assert a.family_name == b.family_name and a.stat_labels == b.stat_labels
    for name in ("eta", "mean", "cov", "ess_bulk", "ess_tail", "rhat", "mcse", "divergences",
                 "num_samples", "retries", "passed"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)
    assert a.metadata == b.metadata
    assert set(a.extras) == set(b.extras)
    for k in a.extras:
        np.testing.assert_array_equal(a.extras[k], b.extras[k])


def test_fields_are_typed_and_read_only():
    ds = make_dataset(divergences=np.zeros(20, np.int32), passed=np.ones(20, bool))
    assert len(ds) == 20 and ds.stat_dim == 2
    assert ds.eta.dtype == np.float64 and ds.divergences.dtype == np.int64
    assert ds.passed.dtype == np.bool_
    assert ds.ess is ds.ess_bulk
    with pytest.raises(ValueError):
        ds.mean[0, 0] = 1.0
    with pytest.raises(AttributeError):
        ds.eta = ds.eta  # frozen


def test_validation_on_construction():
    with pytest.raises(ValueError, match="cov must have shape"):
        make_dataset(cov=np.zeros((20, 2, 3)))
    with pytest.raises(ValueError, match="points"):
        make_dataset(mean=np.zeros((19, 2)))
    with pytest.raises(ValueError, match="eta must be finite"):
        make_dataset(eta=np.full((20, 2), np.nan))
    with pytest.raises(ValueError, match="finite at points that passed"):
        make_dataset(mean=np.full((20, 2), np.inf), passed=np.ones(20, bool))
    with pytest.raises(ValueError, match="boolean"):
        make_dataset(passed=np.ones(20))
    with pytest.raises(ValueError, match="integer"):
        make_dataset(num_samples=np.full(20, 1000.0))
    with pytest.raises(ValueError, match="JSON"):
        make_dataset(metadata={"bad": object()})
    # NaN diagnostics are allowed (a point that failed), non-finite means where not passed too
    ds = make_dataset(rhat=np.full((20, 2), np.nan), mean=np.full((20, 2), np.nan),
                      passed=np.zeros(20, bool))
    assert np.isnan(ds.rhat).all()


def test_save_load_round_trip(tmp_path):
    ds = make_dataset(extras={"khat": np.linspace(0, 1, 20)})
    path = ds.save(tmp_path / "sub" / "data.npz")
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["data.npz"]  # no tmp file left
    back = ExpectationDataset.load(path)
    assert_same(ds, back)
    back = ExpectationDataset.load(str(path), family=toy_family())
    assert_same(ds, back)
    # plain npz of plain arrays: readable without pickle, metadata is JSON
    with np.load(path, allow_pickle=False) as z:
        assert str(z["__format__"]) == FORMAT_NAME
        assert json.loads(str(z["__metadata__"]))["note"] == "test"
        assert all(z[k].dtype != object for k in z.files)


def test_load_rejects_wrong_family(tmp_path):
    path = make_dataset().save(tmp_path / "d.npz")
    with pytest.raises(ValueError, match="family 'Toy', not 'Other'"):
        ExpectationDataset.load(path, family=toy_family(name="Other"))
    with pytest.raises(ValueError, match="statistics"):
        ExpectationDataset.load(path, family=toy_family(labels=("a", "b")))


def test_load_rejects_truncated_file(tmp_path):
    path = make_dataset().save(tmp_path / "d.npz")
    raw = path.read_bytes()
    for cut in (len(raw) // 2, 100, 0):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            ExpectationDataset.load(bad)


def test_load_rejects_foreign_files(tmp_path):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.arange(3), y=np.ones(2))
    with pytest.raises(ValueError, match="not an ExpectationDataset file"):
        ExpectationDataset.load(foreign)
    npy = tmp_path / "plain.npy"
    np.save(npy, np.arange(3))
    with pytest.raises(ValueError, match="not an ExpectationDataset"):
        ExpectationDataset.load(npy)
    text = tmp_path / "text.npz"
    text.write_text("hello, world\n" * 10)
    with pytest.raises(ValueError, match="not an .npz file"):
        ExpectationDataset.load(text)
    with pytest.raises(FileNotFoundError):
        ExpectationDataset.load(tmp_path / "missing.npz")


def _rewrite(path, out, **changes):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del arrays[k]
    np.savez(out, **arrays)
    return out


def test_load_validates_contents(tmp_path):
    path = make_dataset().save(tmp_path / "d.npz")
    cases = {
        "version": (dict(__format_version__=np.array(99)), "format version 99"),
        "missing": (dict(rhat=None), "missing arrays \\['rhat'\\]"),
        "shape": (dict(mean=np.zeros((20, 3))), "mean must have shape"),
        "dtype": (dict(divergences=np.zeros(20)), "divergences has dtype float64"),
        "nonfinite": (dict(eta=np.full((20, 2), np.inf)), "eta must be finite"),
        "metadata": (dict(__metadata__=np.array("{not json")), "not valid JSON"),
        "extra": (dict(surprise=np.zeros(3)), "unexpected arrays"),
        "labels": (dict(stat_labels=np.arange(2)), "stat_labels"),
    }
    for name, (changes, message) in cases.items():
        bad = _rewrite(path, tmp_path / f"{name}.npz", **changes)
        with pytest.raises(ValueError, match=message):
            ExpectationDataset.load(bad)


def test_load_never_unpickles(tmp_path, monkeypatch):
    path = make_dataset().save(tmp_path / "d.npz")
    # an object array inside an otherwise valid file: numpy would need pickle to read it
    bad = _rewrite(path, tmp_path / "obj.npz", mean=np.array([{"a": 1}] * 20, dtype=object))
    import pickle

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(ValueError, match="pickled \\(object\\) arrays"):
        ExpectationDataset.load(bad)
    # a pickle file renamed to .npz
    pkl = tmp_path / "pickle.npz"
    pkl.write_bytes(pickle.dumps({"eta": np.zeros(3)}))
    with pytest.raises(ValueError, match="never done"):
        ExpectationDataset.load(pkl)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "d.npz"
    make_dataset(seed=1).save(path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        make_dataset(seed=2).save(path)
    assert path.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["d.npz"]  # and no tmp file is left


def test_split_is_deterministic_and_partitions():
    ds = make_dataset(n=53)
    train, val, test = ds.split()
    assert (len(train), len(val), len(test)) == (42, 6, 5)
    again = ds.split()
    for a, b in zip((train, val, test), again, strict=True):
        assert_same(a, b)
    rows = np.concatenate([train.eta, val.eta, test.eta])
    assert sorted(map(tuple, rows)) == sorted(map(tuple, ds.eta))
    other = ds.split(seed=1)[0]
    assert not np.array_equal(other.eta, train.eta)
    a, b = ds.split(fractions=(0.5, 0.5))
    assert len(a) + len(b) == 53 and abs(len(a) - len(b)) <= 1
    with pytest.raises(ValueError, match="sum to 1"):
        ds.split(fractions=(0.5, 0.4))
    tiny = make_dataset(n=10).split()
    assert [len(t) for t in tiny] == [8, 1, 1]


def test_subset():
    ds = make_dataset(extras={"k": np.arange(20)})
    sub = ds.subset([3, 1])
    np.testing.assert_array_equal(sub.eta, ds.eta[[3, 1]])
    np.testing.assert_array_equal(sub.extras["k"], [3, 1])
    assert len(ds.subset(ds.passed)) == int(ds.passed.sum())
    assert len(ds.subset(np.array([], dtype=int))) == 0
    with pytest.raises(IndexError):
        ds.subset([20])


def test_summary_table():
    ds = make_dataset(divergences=np.array([0] * 18 + [3, 1]),
                      rhat=np.full((20, 2), 1.001), passed=np.array([True] * 17 + [False] * 3))
    text = ds.summary()
    lines = text.splitlines()
    assert "Toy: 20 points, 2 statistics" in lines[0]
    assert lines[1].split()[0] == "statistic"
    assert [ln.split()[0] for ln in lines[2:4]] == ["t0", "t1"]
    assert "failed points: 3 of 20" in text and "divergences: 4 in 2 points" in text
    for j, ln in enumerate(lines[2:4]):
        cols = ln.split()
        assert float(cols[2]) == pytest.approx(ds.ess_bulk[:, j].min(), abs=0.5)
        assert float(cols[4]) == pytest.approx(1.001)


def test_dataset_from_jax_arrays():
    ds = make_dataset(eta=jnp.ones((20, 2)), mean=jnp.zeros((20, 2)))
    assert isinstance(ds.eta, np.ndarray) and ds.eta.dtype == np.float64

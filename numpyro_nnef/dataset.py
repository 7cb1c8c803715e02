"""ExpectationDataset: NUTS estimates of mu(eta) = E[T | eta] and Cov[T | eta] with diagnostics.

Stored as one ``.npz`` file of plain float64/int64/bool/unicode arrays plus the metadata as a JSON
string; written atomically (temporary file + ``os.replace``) and loaded with
``allow_pickle=False`` only, validating keys, shapes, dtypes and finiteness.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write
from .family import ExponentialFamily

__all__ = ["ExpectationDataset", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "numpyro_nnef.ExpectationDataset"
FORMAT_VERSION = 1

# name -> (dtype kind, trailing shape as a function of D: "D" or "DD" or "")
_ARRAYS: dict[str, tuple[type, str]] = {
    "eta": (np.float64, "D"),
    "mean": (np.float64, "D"),
    "cov": (np.float64, "DD"),
    "ess_bulk": (np.float64, "D"),
    "ess_tail": (np.float64, "D"),
    "rhat": (np.float64, "D"),
    "mcse": (np.float64, "D"),
    "divergences": (np.int64, ""),
    "num_samples": (np.int64, ""),
    "retries": (np.int64, ""),
    "passed": (np.bool_, ""),
}
_KINDS = {np.float64: "f", np.int64: "iu", np.bool_: "b"}
_EXTRA_PREFIX = "extra."


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


@dataclasses.dataclass(frozen=True, eq=False)
class ExpectationDataset:
    """NUTS estimates per natural parameter eta (N points, D = stat_dim statistics).

    eta, mean = E[T | eta], mcse (Monte Carlo standard error of the mean), ess_bulk, ess_tail,
    rhat: (N, D); cov = Cov[T | eta]: (N, D, D); divergences, num_samples (draws per chain
    used), retries: (N,) int; passed: (N,) bool (all diagnostics within the thresholds).
    ``metadata`` is JSON-able (sampler settings, key, versions, family description);
    ``extras`` holds optional per-point float/int/bool arrays of leading size N (e.g. a PSIS
    k-hat). Arrays are read-only copies. ``family`` is the family object itself when known
    (kept in memory by ``generate_dataset``, ``importance_dataset``, ``subset`` and ``load(...,
    family=)``, never written to the file), so ``train_oracle`` needs no ``family=`` for a user
    family.
    """

    family_name: str
    stat_labels: tuple[str, ...]
    eta: np.ndarray
    mean: np.ndarray
    cov: np.ndarray
    ess_bulk: np.ndarray
    ess_tail: np.ndarray
    rhat: np.ndarray
    mcse: np.ndarray
    divergences: np.ndarray
    num_samples: np.ndarray
    retries: np.ndarray
    passed: np.ndarray
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    extras: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    family: ExponentialFamily | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        if not isinstance(self.family_name, str) or not self.family_name:
            raise ValueError(f"family_name must be a non-empty string, got {self.family_name!r}")
        labels = tuple(str(s) for s in self.stat_labels)
        object.__setattr__(self, "stat_labels", labels)
        dim = len(labels)
        if dim == 0:
            raise ValueError("stat_labels must name at least one statistic")
        n = None
        for name, (dtype, trailing) in _ARRAYS.items():
            value = np.asarray(getattr(self, name))
            if dtype is np.bool_ and value.dtype.kind != "b":
                raise ValueError(f"{name} must be boolean, got dtype {value.dtype}")
            if value.dtype.kind not in "fiub":
                raise ValueError(f"{name} must be numeric, got dtype {value.dtype}")
            if dtype is np.int64 and value.dtype.kind == "f":
                raise ValueError(f"{name} must be integer, got dtype {value.dtype}")
            expected_tail = {"": (), "D": (dim,), "DD": (dim, dim)}[trailing]
            if value.ndim != 1 + len(expected_tail) or value.shape[1:] != expected_tail:
                raise ValueError(
                    f"{name} must have shape (N,{''.join(f' {d},' for d in expected_tail)}) "
                    f"for {dim} statistics, got {value.shape}"
                )
            if n is None:
                n = value.shape[0]
            elif value.shape[0] != n:
                raise ValueError(f"{name} has {value.shape[0]} points, eta has {n}")
            object.__setattr__(self, name, _readonly(value.astype(dtype)))
        if not np.all(np.isfinite(self.eta)):
            raise ValueError("eta must be finite")
        ok = self.passed
        if not (np.all(np.isfinite(self.mean[ok])) and np.all(np.isfinite(self.cov[ok]))):
            raise ValueError("mean and cov must be finite at points that passed")
        if np.any(self.num_samples < 0) or np.any(self.retries < 0) or np.any(self.divergences < 0):
            raise ValueError("divergences, num_samples and retries must be non-negative")
        extras = {}
        for name, value in dict(self.extras).items():
            value = np.asarray(value)
            if not isinstance(name, str) or not name:
                raise ValueError(f"extras names must be non-empty strings, got {name!r}")
            if value.dtype.kind not in "fiub" or value.ndim < 1 or value.shape[0] != n:
                raise ValueError(
                    f"extras[{name!r}] must be a numeric array with {n} rows, got "
                    f"{value.dtype}{list(value.shape)}"
                )
            kind = {"f": np.float64, "i": np.int64, "u": np.int64, "b": np.bool_}
            extras[name] = _readonly(value.astype(kind[value.dtype.kind]))
        object.__setattr__(self, "extras", extras)
        try:
            metadata = json.loads(json.dumps(dict(self.metadata)))
        except (TypeError, ValueError) as err:
            raise ValueError(f"metadata must be JSON-serialisable: {err}") from err
        object.__setattr__(self, "metadata", metadata)
        if self.family is not None:
            if not isinstance(self.family, ExponentialFamily):
                raise TypeError(f"family must be an ExponentialFamily, got "
                                f"{type(self.family).__name__}")
            self.check_family(self.family)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.eta.shape[0])

    @property
    def stat_dim(self) -> int:
        return len(self.stat_labels)

    @property
    def ess(self) -> np.ndarray:
        """The bulk effective sample size (alias of ``ess_bulk``)."""
        return self.ess_bulk

    def __repr__(self) -> str:
        return (f"ExpectationDataset(family={self.family_name!r}, points={len(self)}, "
                f"statistics={self.stat_labels}, passed={int(self.passed.sum())})")

    def subset(self, indices) -> ExpectationDataset:
        """A dataset with the points ``indices`` (integer array or boolean mask), in that order."""
        idx = np.asarray(indices)
        if idx.dtype.kind == "b":
            if idx.shape != (len(self),):
                raise ValueError(f"boolean mask must have shape ({len(self)},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        elif idx.dtype.kind not in "iu" and idx.size:
            raise ValueError(f"indices must be integers or a boolean mask, got {idx.dtype}")
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"indices out of range for a dataset of {len(self)} points")
        arrays = {name: getattr(self, name)[idx] for name in _ARRAYS}
        return ExpectationDataset(
            family_name=self.family_name, stat_labels=self.stat_labels, metadata=self.metadata,
            extras={k: v[idx] for k, v in self.extras.items()}, family=self.family, **arrays,
        )

    def split(self, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
              ) -> tuple[ExpectationDataset, ...]:
        """Deterministic random split into ``len(fractions)`` parts (default train/val/test).

        The points are permuted by ``jax.random.permutation(jax.random.key(seed), N)``; part k gets
        the points between round(N * cumsum(fractions)[k-1]) and round(N * cumsum(fractions)[k]).
        """
        import jax

        fractions = np.asarray(fractions, dtype=np.float64)
        if fractions.ndim != 1 or fractions.size == 0 or np.any(fractions < 0):
            raise ValueError(f"fractions must be non-negative numbers, got {fractions.tolist()}")
        if not math.isclose(float(fractions.sum()), 1.0, abs_tol=1e-9):
            raise ValueError(f"fractions must sum to 1, got {fractions.tolist()}")
        perm = np.asarray(jax.random.permutation(jax.random.key(seed), len(self)))
        bounds = np.round(np.cumsum(fractions) * len(self)).astype(int)
        bounds[-1] = len(self)
        edges = np.concatenate([[0], bounds])
        return tuple(self.subset(perm[a:b])
                     for a, b in zip(edges[:-1], edges[1:], strict=True))

    # ------------------------------------------------------------------ summary
    def summary(self, *, min_ess: float | None = None, max_rhat: float | None = None) -> str:
        """A text table per statistic: median/min ess_bulk, min ess_tail, max r_hat, max mcse
        and the number of points where that statistic fails the thresholds (defaults: the
        sampler settings in the metadata, else 400 and 1.01); then failed points and
        divergences overall."""
        sampler = self.metadata.get("sampler", {}) if isinstance(self.metadata, dict) else {}
        min_ess = float(sampler.get("min_ess", 400) if min_ess is None else min_ess)
        max_rhat = float(sampler.get("max_rhat", 1.01) if max_rhat is None else max_rhat)
        n = len(self)
        header = ("statistic", "ess_bulk med", "ess_bulk min", "ess_tail min", "r_hat max",
                  "mcse max", "failing")
        rows = []
        for j, label in enumerate(self.stat_labels):
            fails = ~((self.ess_bulk[:, j] >= min_ess) & (self.ess_tail[:, j] >= min_ess)
                      & (self.rhat[:, j] <= max_rhat))
            rows.append((label, _fmt(np.median(self.ess_bulk[:, j]) if n else np.nan, ".0f"),
                         _fmt(_amin(self.ess_bulk[:, j]), ".0f"),
                         _fmt(_amin(self.ess_tail[:, j]), ".0f"),
                         _fmt(_amax(self.rhat[:, j]), ".4f"),
                         _fmt(_amax(self.mcse[:, j]), ".3g"), str(int(fails.sum()))))
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        line = lambda r: "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                            strict=True)))
        failed = int((~self.passed).sum())
        retried = int((self.retries > 0).sum())
        lines = [
            f"{self.family_name}: {n} points, {self.stat_dim} statistics "
            f"(thresholds: ess >= {min_ess:g}, r_hat <= {max_rhat:g}, no divergences)",
            line(header),
            *(line(r) for r in rows),
            f"failed points: {failed} of {n}; retried: {retried}; divergences: "
            f"{int(self.divergences.sum())} in {int((self.divergences > 0).sum())} points",
        ]
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def _payload(self) -> dict[str, np.ndarray]:
        payload = {
            "__format__": np.array(FORMAT_NAME),
            "__format_version__": np.array(FORMAT_VERSION, dtype=np.int64),
            "__metadata__": np.array(json.dumps(self.metadata, sort_keys=True)),
            "family_name": np.array(self.family_name),
            "stat_labels": np.array(self.stat_labels, dtype=str),
        }
        payload.update({name: getattr(self, name) for name in _ARRAYS})
        payload.update({_EXTRA_PREFIX + k: v for k, v in self.extras.items()})
        return payload

    def save(self, path: str | os.PathLike) -> Path:
        """Write one ``.npz`` file at exactly ``path`` atomically (tmp file + os.replace)."""
        payload = self._payload()
        return atomic_write(path, lambda f: np.savez(f, **payload))

    @classmethod
    def load(cls, path: str | os.PathLike,
             family: ExponentialFamily | str | None = None) -> ExpectationDataset:
        """Read a file written by :meth:`save` (``np.load(allow_pickle=False)``, never unpickles).

        ``family`` (a family or a ``"package.module:attribute"`` reference) is checked against
        the file and kept by the dataset. Raises ValueError naming the cause for a
        missing/truncated/foreign file, wrong keys, shapes or dtypes, non-finite eta, an unknown
        format version, or a different family name or statistic layout.
        """
        path = Path(path)
        where = f"{str(path)!r}"
        if not path.is_file():
            raise FileNotFoundError(f"no dataset file at {where}")
        try:
            archive = np.load(path, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            with archive as z:
                data = {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            raise ValueError(f"{where} is not a readable .npz file (truncated or corrupt?): "
                             f"{err}") from err
        except ValueError as err:
            if "pickle" in str(err) and zipfile.is_zipfile(path):
                raise ValueError(
                    f"{where} contains pickled (object) arrays, which are never loaded; "
                    "not an ExpectationDataset file"
                ) from err
            if "pickle" in str(err):
                raise ValueError(
                    f"{where} is not an .npz file (neither zip nor .npy; it would have to be "
                    "unpickled, which is never done)"
                ) from err
            raise ValueError(f"{where} is not an ExpectationDataset file: {err}") from err
        fmt = data.get("__format__")
        if fmt is None or fmt.dtype.kind != "U" or str(fmt) != FORMAT_NAME:
            raise ValueError(
                f"{where} is not an ExpectationDataset file (no {FORMAT_NAME!r} marker; keys: "
                f"{sorted(data)[:8]})"
            )
        version = data.get("__format_version__")
        if version is None or version.shape != () or version.dtype.kind not in "iu":
            raise ValueError(f"{where}: missing or malformed __format_version__")
        if int(version) != FORMAT_VERSION:
            raise ValueError(f"{where}: format version {int(version)} is not supported "
                             f"(this version reads {FORMAT_VERSION})")
        required = {"__metadata__", "family_name", "stat_labels", *_ARRAYS}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{where}: missing arrays {missing}")
        known = required | {"__format__", "__format_version__"}
        unknown = sorted(k for k in data if k not in known and not k.startswith(_EXTRA_PREFIX))
        if unknown:
            raise ValueError(f"{where}: unexpected arrays {unknown}")
        for name in ("__metadata__", "family_name"):
            if data[name].dtype.kind != "U" or data[name].shape != ():
                raise ValueError(f"{where}: {name} must be a string")
        labels = data["stat_labels"]
        if labels.dtype.kind != "U" or labels.ndim != 1:
            raise ValueError(f"{where}: stat_labels must be a 1-d string array")
        for name, (dtype, _) in _ARRAYS.items():
            kind = data[name].dtype.kind
            if kind not in _KINDS[dtype]:
                raise ValueError(f"{where}: {name} has dtype {data[name].dtype}, expected "
                                 f"{np.dtype(dtype).name}")
        try:
            metadata = json.loads(str(data["__metadata__"]))
        except ValueError as err:
            raise ValueError(f"{where}: metadata is not valid JSON ({err})") from err
        if not isinstance(metadata, dict):
            raise ValueError(f"{where}: metadata must be a JSON object")
        try:
            dataset = cls(
                family_name=str(data["family_name"]),
                stat_labels=tuple(str(s) for s in labels),
                metadata=metadata,
                extras={k[len(_EXTRA_PREFIX):]: v for k, v in data.items()
                        if k.startswith(_EXTRA_PREFIX)},
                **{name: data[name] for name in _ARRAYS},
            )
        except ValueError as err:
            raise ValueError(f"{where}: invalid dataset: {err}") from err
        if family is not None:
            from .families import resolve_family

            dataset = dataclasses.replace(dataset, family=resolve_family(family))
        return dataset

    def check_family(self, family) -> None:
        """Raise ValueError unless ``family`` has this dataset's name and statistic layout."""
        if family.name != self.family_name:
            raise ValueError(f"dataset is for family {self.family_name!r}, not {family.name!r}")
        if tuple(family.stat_labels) != self.stat_labels:
            raise ValueError(
                f"dataset statistics {self.stat_labels} do not match the family's "
                f"{tuple(family.stat_labels)}"
            )


def _fmt(value, spec: str) -> str:
    value = float(value)
    return "nan" if not math.isfinite(value) else format(value, spec)


def _amin(a: np.ndarray) -> float:
    return float(np.min(a)) if a.size else float("nan")


def _amax(a: np.ndarray) -> float:
    return float(np.max(a)) if a.size else float("nan")

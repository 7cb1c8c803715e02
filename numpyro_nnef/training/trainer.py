"""``train_oracle``: fit an architecture x protocol to an ExpectationDataset -> NeuralOracle.

The trainer knows the iteration (split, standardise, minibatches, Adam, early stopping on the
validation error of the prediction, learning curves); the protocol knows the mathematics of its
objective and of its prediction (``protocols.py``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import numbers
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from .._io import atomic_write
from ..dataset import ExpectationDataset
from ..families import family_from_description, resolve_family
from ..family import ExponentialFamily
from ..oracles.anchor import estimate_log_partitions, resolve_method
from ..oracles.neural import NeuralOracle, Standardization, has_learned_log_partition
from .losses import WEIGHTINGS, sobolev_loss, standardised_covariance, target_weights
from .protocols import get_protocol

__all__ = ["TrainingReport", "farthest_points", "train_oracle", "usable_points"]

ANCHORS = ("auto", "quadrature", "importance", None)
# Anchors per method when num_anchors is None: quadrature costs one batched call; importance
# sampling a NUTS run per anchor, and its Monte Carlo error would vary between anchors.
DEFAULT_NUM_ANCHORS = {"quadrature": 32, "importance": 1}


@dataclasses.dataclass(frozen=True)
class TrainingReport:
    """What happened during training: per-evaluation learning curves and the final errors.

    ``history`` maps "epoch", "train_loss" (the protocol's objective) and "val_rmse" (RMSE of
    the standardised prediction on the validation split) to arrays; ``test_rmse`` is the RMSE of
    E[T] on the test split per statistic, in the dataset's units.
    """

    history: dict[str, np.ndarray]
    best_epoch: int
    best_val_rmse: float
    stopped_early: bool
    wall_time_s: float
    num_train: int
    num_val: int
    num_test: int
    excluded: dict[str, int]
    test_rmse: list[float]

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["history"] = {k: np.asarray(v).tolist() for k, v in self.history.items()}
        return data


def usable_points(dataset: ExpectationDataset, drop_failed: bool = True
                  ) -> tuple[np.ndarray, dict[str, int]]:
    """Mask of the points train_oracle uses, and the counts of points excluded and why."""
    finite = (np.isfinite(dataset.mean).all(1) & np.isfinite(dataset.cov).all((1, 2))
              & np.isfinite(dataset.mcse).all(1))
    keep = finite & (dataset.passed if drop_failed else True)
    excluded = {"non_finite": int((~finite).sum()),
                "failed_diagnostics": int((finite & ~dataset.passed).sum()) if drop_failed else 0}
    return keep, excluded


def _resolve_family(dataset: ExpectationDataset, family: ExponentialFamily | str | None
                    ) -> ExponentialFamily:
    """``family`` (a family or a reference), else the family the dataset keeps, else a built-in
    family rebuilt from the dataset's record; checked against the dataset."""
    if family is not None:
        family = resolve_family(family)
    elif dataset.family is not None:
        family = dataset.family
    else:
        description = dataset.metadata.get("family")
        if not isinstance(description, dict):
            raise ValueError("the dataset does not record its family; pass family= (a family or a "
                             "'package.module:attribute' reference)")
        family = family_from_description(description)
    dataset.check_family(family)
    return family


def train_oracle(
    dataset: ExpectationDataset,
    *,
    key: jax.Array,
    family: ExponentialFamily | str | None = None,
    architecture: str = "mlp",
    protocol: str = "regression",
    hyperparameters: dict[str, Any] | None = None,
    protocol_options: dict[str, Any] | None = None,
    learning_rate: float = 1e-2,
    batch_size: int = 256,
    max_epochs: int = 2000,
    patience: int = 500,
    eval_every: int = 10,
    weighting: str = "mcse",
    sobolev_weight: float = 1.0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    split_seed: int = 0,
    drop_failed: bool = True,
    anchor: str | None = "auto",
    num_anchors: int | None = None,
    anchor_options: dict[str, Any] | None = None,
    out_of_range: str = "warn",
    output_dir: str | Path | None = None,
    progress: bool = True,
) -> NeuralOracle:
    """Train an expectation oracle on ``dataset`` and return it (``oracle.report`` says how).

    Points that are not finite, or (``drop_failed``) failed the sampler's diagnostics, are
    excluded with a warning. The rest are split ``fractions`` (train/validation/test, seeded by
    ``split_seed``); training minimises the protocol's loss with targets weighted by
    1/MCSE^2 (``weighting``), plus ``sobolev_weight`` times the squared error of the Jacobian
    against the dataset's Cov[T]; it stops when the validation RMSE has not improved for
    ``patience`` epochs and keeps the best weights. The log-partition is anchored at
    ``num_anchors`` training etas (default 32 for quadrature, 1 for importance sampling) chosen
    by farthest-point selection in standardised eta, starting from the eta nearest the centre
    (``anchor``: "auto" is quadrature for scalar x, else importance sampling; None for no
    anchor; ``anchor_options`` go to the importance sampler). With ``output_dir`` the oracle and
    its learning curves (CSV, PNG) are written there. ``family`` is needed only for a dataset
    read from a file of a user family (a family object or a ``"package.module:attribute"``
    reference); a dataset from ``generate_dataset`` or ``importance_dataset`` keeps its family.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    if num_anchors is not None and (isinstance(num_anchors, bool) or not isinstance(
            num_anchors, numbers.Integral) or num_anchors < 1):
        raise ValueError(f"num_anchors must be None or an integer >= 1, got {num_anchors!r}")
    for name, value in [("batch_size", batch_size), ("max_epochs", max_epochs),
                        ("patience", patience), ("eval_every", eval_every)]:
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not (learning_rate > 0 and sobolev_weight >= 0):
        raise ValueError("learning_rate must be > 0 and sobolev_weight >= 0")
    family = _resolve_family(dataset, family)
    start = time.perf_counter()
    proto = get_protocol(protocol, **(protocol_options or {}))
    hyperparameters = dict(hyperparameters or {})

    keep, excluded = usable_points(dataset, drop_failed)
    if keep.sum() < 10:
        raise ValueError(f"only {int(keep.sum())} usable points in the dataset (excluded: "
                         f"{excluded}); need at least 10")
    if any(excluded.values()):
        warnings.warn(f"train_oracle: excluded {excluded} of {len(dataset)} dataset points",
                      RuntimeWarning, stacklevel=2)
    train, val, test = dataset.subset(np.flatnonzero(keep)).split(fractions, seed=split_seed)
    if min(len(train), len(val)) < 1:
        raise ValueError(f"the split {fractions} leaves an empty training or validation set")

    dim = family.stat_dim
    k_init, k_train, k_anchor = jax.random.split(key, 3)
    model = proto.build_model(architecture, eta_dim=dim, stat_dim=dim, rngs=nnx.Rngs(k_init),
                              **hyperparameters)
    gradient = has_learned_log_partition(proto, model, dim)
    st = Standardization.fit(train.eta, train.mean, gradient=gradient)

    def standardise(part):
        s = (part.eta - st.eta_shift) / st.eta_scale
        y = (part.mean - st.mean_shift) / st.mean_scale
        jac = standardised_covariance(part.cov, st.eta_scale, st.mean_scale)
        return s, y, jac

    s_train, y_train, j_train = standardise(train)
    w_train = target_weights(train.mcse / st.mean_scale, weighting)
    s_val, y_val, _ = standardise(val)
    w_val = target_weights(val.mcse / st.mean_scale, weighting)
    centre = int(np.argmin(np.sum(s_train**2, axis=1)))
    if hasattr(model, "set_anchor"):
        model.set_anchor(jnp.asarray(s_train[centre]), jnp.asarray(y_train[centre]))

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_train = len(train)
    batch = min(int(batch_size), n_train)
    steps_per_epoch = math.ceil(n_train / batch)
    schedule = optax.cosine_decay_schedule(learning_rate, max_epochs * steps_per_epoch, 0.01)
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(params)
    data = tuple(jnp.asarray(a) for a in (s_train, y_train, w_train, j_train))

    def loss_fn(p, s, y, w, j, k):
        m = nnx.merge(graphdef, p, rest)
        loss = proto.loss(m, s, y, w, k)
        if sobolev_weight > 0:
            loss = loss + sobolev_weight * sobolev_loss(lambda e: proto.predict(m, e), s, j)
        return loss

    @jax.jit
    def epoch(p, o, k):
        k_perm, k_steps = jax.random.split(k)
        order = jax.random.permutation(k_perm, n_train)
        order = jnp.concatenate([order, order])[: steps_per_epoch * batch]
        order = order.reshape(steps_per_epoch, batch)

        def step(carry, xs):
            p, o = carry
            idx, k_step = xs
            value, grads = jax.value_and_grad(loss_fn)(p, *(a[idx] for a in data), k_step)
            updates, o = optimizer.update(grads, o, p)
            return (optax.apply_updates(p, updates), o), value

        (p, o), losses = jax.lax.scan(
            step, (p, o), (order, jax.random.split(k_steps, steps_per_epoch))
        )
        return p, o, jnp.mean(losses)

    @jax.jit
    def validation_rmse(p):
        m = nnx.merge(graphdef, p, rest)
        pred = jax.vmap(lambda e: proto.predict(m, e))(jnp.asarray(s_val))
        return jnp.sqrt(jnp.mean(jnp.asarray(w_val) * (pred - jnp.asarray(y_val)) ** 2))

    history: dict[str, list[float]] = {"epoch": [], "train_loss": [], "val_rmse": []}
    best = (np.inf, 0, params)
    stopped_early = False
    bar = tqdm(range(1, max_epochs + 1), desc=f"train {architecture}/{protocol}",
               disable=not progress, leave=False)
    for ep in bar:
        params, opt_state, train_loss = epoch(params, opt_state, jax.random.fold_in(k_train, ep))
        if ep % eval_every and ep != max_epochs:
            continue
        val_rmse = float(validation_rmse(params))
        train_loss = float(train_loss)
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"train_oracle: the {architecture}/{protocol} loss became {train_loss} at epoch "
                f"{ep}; lower learning_rate (now {learning_rate})"
            )
        history["epoch"].append(ep)
        history["train_loss"].append(train_loss)
        history["val_rmse"].append(val_rmse)
        bar.set_postfix(train=f"{train_loss:.3g}", val=f"{val_rmse:.3g}")
        if val_rmse < best[0]:
            best = (val_rmse, ep, params)
        elif ep - best[1] >= patience:
            stopped_early = True
            break
    bar.close()
    model = nnx.merge(graphdef, best[2], rest)

    anchors = ()
    if anchor is not None:
        method = resolve_method(family, anchor)
        count = DEFAULT_NUM_ANCHORS[method] if num_anchors is None else int(num_anchors)
        chosen = farthest_points(s_train, count, start=centre)
        anchors = estimate_log_partitions(family, train.eta[chosen], key=k_anchor, method=method,
                                          **(anchor_options or {}))
    oracle = NeuralOracle(
        family, proto, architecture, hyperparameters, model, st,
        train.eta.min(0), train.eta.max(0), anchors=anchors, out_of_range=out_of_range,
    )
    with warnings.catch_warnings():  # test etas may lie just outside the training box
        warnings.simplefilter("ignore", RuntimeWarning)
        test_rmse = (np.sqrt(np.mean((np.asarray(oracle.mean(test.eta)) - test.mean) ** 2, 0))
                     if len(test) else np.full(dim, np.nan))
    report = TrainingReport(
        history={k: np.asarray(v) for k, v in history.items()},
        best_epoch=int(best[1]), best_val_rmse=float(best[0]), stopped_early=stopped_early,
        wall_time_s=time.perf_counter() - start, num_train=len(train), num_val=len(val),
        num_test=len(test), excluded=excluded, test_rmse=test_rmse.tolist(),
    )
    oracle.report = report
    oracle.metadata["training"] = {
        k: v for k, v in report.to_json().items() if k != "history"
    } | {"dataset_size": len(dataset), "learning_rate": learning_rate,
         "batch_size": batch, "weighting": weighting, "sobolev_weight": sobolev_weight,
         "fractions": list(fractions), "split_seed": split_seed,
         "drop_failed": drop_failed}
    if output_dir is not None:
        oracle.save(output_dir)
        save_learning_curves(report, output_dir)
    return oracle


def farthest_points(points: np.ndarray, num: int, start: int) -> np.ndarray:
    """Indices of up to ``num`` distinct rows of ``points``: ``start``, then repeatedly the row
    farthest from those chosen (greedy k-centre: the largest distance from any row to its
    nearest chosen row is within a factor 2 of the best possible). Stops early when every row
    coincides with a chosen one."""
    chosen = [int(start)]
    distance = np.linalg.norm(points - points[start], axis=1)
    while len(chosen) < num and distance.max() > 0:
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(points - points[chosen[-1]], axis=1))
    return np.asarray(chosen)


def save_learning_curves(report: TrainingReport, directory: str | Path) -> tuple[Path, Path]:
    """Write ``learning_curves.csv`` and ``learning_curves.png`` (training loss and validation
    RMSE per evaluated epoch, log scale) into ``directory``."""
    from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

    directory = Path(directory)
    text = io.StringIO()
    writer = csv.writer(text)
    names = list(report.history)
    writer.writerow(names)
    writer.writerows(zip(*(report.history[n].tolist() for n in names), strict=True))
    csv_path = atomic_write(directory / "learning_curves.csv",
                            lambda f: f.write(text.getvalue().encode()))
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.semilogy(report.history["epoch"], report.history["train_loss"], label="train loss")
    ax.semilogy(report.history["epoch"], report.history["val_rmse"], label="validation RMSE")
    ax.axvline(report.best_epoch, color="grey", ls=":", label="best")
    ax.set_xlabel("epoch")
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    png_path = atomic_write(directory / "learning_curves.png", lambda f: f.write(png.getvalue()))
    return csv_path, png_path

"""Command line: ``python -m numpyro_nnef <subcommand>``.

``generate [--config FILE] [--output PATH]`` samples etas in a box, runs NUTS for each, saves an
:class:`~numpyro_nnef.dataset.ExpectationDataset` and prints its diagnostics (and, when the family
has an exact or quadrature oracle, the error of the NUTS means against it). ``train --dataset
PATH --output DIR`` fits a neural oracle (the config's ``[train]`` table: ``train_oracle``'s
keyword arguments) and ``evaluate --oracle DIR [--dataset PATH]`` prints its error table against
the test split and the exact/quadrature oracle. ``demo`` runs generate, train and evaluate with
the built-in ``configs/demo.toml``. ``summary FILE`` prints a saved dataset's diagnostics;
``families`` lists the built-in families. Configuration and input errors exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "build_parser",
    "load_config",
    "main",
    "parse_generate_config",
    "parse_train_config",
]

DEMO_CONFIG = "demo.toml"


class ConfigError(ValueError):
    """A configuration file is missing, malformed or inconsistent (exit status 2)."""


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file into a dict."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"{path}: config files must end in .toml, .yaml or .yml")
    try:
        text = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        if suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text.decode("utf-8"))
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError
        raise ConfigError(f"{path}: not valid {suffix[1:].upper()}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a table/mapping")
    return raw


def _demo_config_path() -> Path:
    from importlib.resources import files

    return Path(str(files("numpyro_nnef") / "configs" / DEMO_CONFIG))


_SAMPLER_KEYS: dict[str, type] = {
    "num_chains": int, "num_warmup": int, "num_samples": int, "chunk_size": int,
    "max_retries": int, "min_ess": float, "max_rhat": float, "target_acceptance_rate": float,
    "engine": str, "fallback": str,
}
_TOP_KEYS = {"family", "etas", "sampler", "train", "seed", "output", "checkpoint_dir", "x64"}
# [train] keys: train_oracle's keyword arguments ("seed" makes its key; "anchor" may be "none").
_TRAIN_KEYS: dict[str, type] = {
    "architecture": str, "protocol": str, "hyperparameters": dict, "protocol_options": dict,
    "learning_rate": float, "batch_size": int, "max_epochs": int, "patience": int,
    "eval_every": int, "weighting": str, "sobolev_weight": float, "fractions": list,
    "split_seed": int, "drop_failed": bool, "anchor": str, "num_anchors": int,
    "anchor_options": dict,
    "out_of_range": str, "seed": int, "output_dir": str,
}
_TRAIN_CHOICES: dict[str, tuple[str, ...]] = {
    "weighting": ("mcse", "none"),
    "anchor": ("auto", "quadrature", "importance", "none"),
    "out_of_range": ("warn", "error", "ignore"),
}


def _typed(value: Any, kind: type, where: str) -> Any:
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
        return value
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table/mapping, got {value!r}")
        return dict(value)
    raise AssertionError(kind)  # pragma: no cover


def _table(raw: dict, name: str, required: bool) -> dict:
    if name not in raw:
        if required:
            raise ConfigError(f"missing [{name}] section")
        return {}
    value = raw[name]
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table/mapping, got {value!r}")
    return value


def _numbers(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of numbers, got {value!r}")
    return [_typed(v, float, f"{where}[{i}]") for i, v in enumerate(value)]


def parse_generate_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate a ``generate`` config dict; returns a normalised dict (raises ConfigError).

    Keys: ``[family] name = ...`` plus constructor keyword arguments (``name`` may also be
    ``"package.module:attribute"`` for a user family or factory); ``[etas] low, high, num,
    scale``; ``[sampler] num_chains, num_warmup, num_samples, chunk_size, max_retries, min_ess,
    max_rhat, target_acceptance_rate, engine ("nuts" or "smc"), fallback ("smc" or "none")``;
    top level ``seed``, ``output``, ``checkpoint_dir``,
    ``x64`` (default true: float64 sampling).
    """
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    family = _family_spec(raw, required=True)

    etas = _table(raw, "etas", True)
    unknown = sorted(set(etas) - {"low", "high", "num", "scale"})
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [etas]; allowed: low, high, num, scale")
    for k in ("low", "high", "num"):
        if k not in etas:
            raise ConfigError(f"missing key {k!r} in [etas]")
    low = _numbers(etas["low"], "[etas] low")
    high = _numbers(etas["high"], "[etas] high")
    if len(low) != len(high):
        raise ConfigError(f"[etas] low and high must have the same length, got {len(low)} and "
                          f"{len(high)}")
    num = _typed(etas["num"], int, "[etas] num")
    if num < 1:
        raise ConfigError(f"[etas] num must be positive, got {num}")
    scale = etas.get("scale", "uniform")
    scales = [scale] if isinstance(scale, str) else scale
    if not isinstance(scales, list) or not all(
            isinstance(s, str) and s in ("uniform", "log-uniform") for s in scales):
        raise ConfigError(f"[etas] scale must be 'uniform', 'log-uniform' or a list of those, got "
                          f"{scale!r}")

    sampler = _table(raw, "sampler", False)
    unknown = sorted(set(sampler) - set(_SAMPLER_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [sampler]; allowed: "
                          f"{', '.join(_SAMPLER_KEYS)}")
    sampler = {k: _typed(v, _SAMPLER_KEYS[k], f"[sampler] {k}") for k, v in sampler.items()}
    for k in ("num_chains", "num_warmup", "num_samples", "chunk_size"):
        if k in sampler and sampler[k] < 1:
            raise ConfigError(f"[sampler] {k} must be positive, got {sampler[k]}")
    if sampler.get("max_retries", 0) < 0:
        raise ConfigError(f"[sampler] max_retries must be >= 0, got {sampler['max_retries']}")
    if sampler.get("engine", "nuts") not in ("nuts", "smc"):
        raise ConfigError(f"[sampler] engine must be 'nuts' or 'smc', got {sampler['engine']!r}")
    if sampler.get("fallback", "smc") not in ("smc", "none"):
        raise ConfigError(f"[sampler] fallback must be 'smc' or 'none', got "
                          f"{sampler['fallback']!r}")
    if "engine" in sampler:
        sampler["sampler"] = sampler.pop("engine")
    if "fallback" in sampler:
        sampler["fallback"] = None if sampler["fallback"] == "none" else "smc"

    seed = _typed(raw.get("seed", 0), int, "seed")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    output = _typed(raw["output"], str, "output") if "output" in raw else None
    checkpoint = (_typed(raw["checkpoint_dir"], str, "checkpoint_dir")
                  if "checkpoint_dir" in raw else None)
    return {
        "family": family,
        "etas": {"low": low, "high": high, "num": num, "scale": scale},
        "sampler": sampler,
        "seed": seed,
        "output": output,
        "checkpoint_dir": checkpoint,
        "x64": _typed(raw.get("x64", True), bool, "x64"),
        "train": _train_table(raw),
    }


def _family_spec(raw: dict, required: bool) -> dict[str, Any] | None:
    """{"name": ..., "kwargs": {...}} from the [family] table (None when absent and optional)."""
    if "family" not in raw and not required:
        return None
    family = dict(_table(raw, "family", True))
    if "name" not in family:
        raise ConfigError("missing key 'name' in [family]")
    name = _typed(family.pop("name"), str, "[family] name")
    return {"name": name, "kwargs": family}


def _train_table(raw: dict) -> dict[str, Any]:
    """The validated [train] table (types, ranges, choices; model names are checked later)."""
    train = _table(raw, "train", False)
    unknown = sorted(set(train) - set(_TRAIN_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [train]; allowed: {', '.join(_TRAIN_KEYS)}")
    out: dict[str, Any] = {}
    for k, v in train.items():
        where = f"[train] {k}"
        if k == "anchor" and v is None:
            out[k] = None
            continue
        if k == "fractions":
            v = _numbers(v, where)
            if len(v) != 3 or min(v) < 0 or not math.isclose(sum(v), 1.0, abs_tol=1e-9):
                raise ConfigError(f"{where} must be three non-negative numbers (train, "
                                  f"validation, test) summing to 1, got {v}")
            out[k] = tuple(v)
            continue
        v = _typed(v, _TRAIN_KEYS[k], where)
        if k in _TRAIN_CHOICES and v not in _TRAIN_CHOICES[k]:
            raise ConfigError(f"{where} must be one of {list(_TRAIN_CHOICES[k])}, got {v!r}")
        if k in ("batch_size", "max_epochs", "patience", "eval_every", "num_anchors") and v < 1:
            raise ConfigError(f"{where} must be >= 1, got {v}")
        if k in ("seed", "split_seed") and v < 0:
            raise ConfigError(f"{where} must be >= 0, got {v}")
        if (k == "learning_rate" and v <= 0) or (k == "sobolev_weight" and v < 0):
            raise ConfigError(f"{where} must be {'> 0' if k == 'learning_rate' else '>= 0'}, "
                              f"got {v}")
        out[k] = None if (k == "anchor" and v == "none") else v
    return out


def parse_train_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate a ``train`` config dict (the same file format as ``generate``'s).

    Keys: ``[train]`` with ``train_oracle``'s keyword arguments (architecture, protocol,
    hyperparameters and protocol_options (tables), learning_rate, batch_size, max_epochs,
    patience, eval_every, weighting, sobolev_weight, fractions, split_seed, drop_failed, anchor
    ("none": no anchor), num_anchors, anchor_options, out_of_range, output_dir) plus ``seed``
    (default: the top-level seed); optional ``[family]`` (needed for a user family); top level
    ``output`` (the dataset path written by ``generate``), ``seed`` and ``x64``. Other sections
    are ignored.
    """
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    seed = _typed(raw.get("seed", 0), int, "seed")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    return {
        "train": _train_table(raw),
        "family": _family_spec(raw, required=False),
        "dataset": _typed(raw["output"], str, "output") if "output" in raw else None,
        "seed": seed,
        "x64": _typed(raw.get("x64", True), bool, "x64"),
    }


def check_model_choice(architecture: str, protocol: str,
                       protocol_options: dict[str, Any] | None = None) -> None:
    """ConfigError unless ``protocol`` is known, accepts ``architecture`` and its options."""
    from .nn import ARCHITECTURES, FLOW_ARCHITECTURES
    from .training import PROTOCOLS, get_protocol

    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; known protocols: "
                          f"{', '.join(PROTOCOLS)}")
    valid = PROTOCOLS[protocol].architectures
    if architecture not in valid:
        if architecture not in set(ARCHITECTURES) | set(FLOW_ARCHITECTURES):
            groups: dict[tuple[str, ...], list[str]] = {}
            for name, cls in PROTOCOLS.items():
                groups.setdefault(tuple(cls.architectures), []).append(name)
            listing = "; ".join(f"{', '.join(names)}: {', '.join(archs)}"
                                for archs, names in groups.items())
            raise ConfigError(f"unknown architecture {architecture!r}; known architectures by "
                              f"protocol: {listing}")
        raise ConfigError(f"architecture {architecture!r} does not work with protocol "
                          f"{protocol!r}; it takes {', '.join(valid)}")
    try:
        get_protocol(protocol, **(protocol_options or {}))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"[train] protocol_options: {err}") from None


def resolve_family(name: str, kwargs: dict[str, Any]):
    """A built-in family by registry name, or ``"module:attribute"`` (an instance, a class or a
    factory called with ``kwargs``); see ``families.resolve_family``."""
    from .families import resolve_family as resolve

    try:
        return resolve(name, kwargs)
    except ValueError as err:
        raise ConfigError(f"[family] {err}") from None


# ---------------------------------------------------------------------------------------------
# subcommands
# ---------------------------------------------------------------------------------------------
def _oracle_for(family):
    """(oracle, label) for the exact closed form when available, else quadrature, else None."""
    if getattr(family, "has_closed_form", False):
        try:
            from .oracles.exact import ExactOracle

            return ExactOracle(family), "exact"
        except Exception:  # noqa: BLE001 - fall through to quadrature
            pass
    try:
        from .oracles.quadrature import QuadratureOracle

        return QuadratureOracle(family), "quadrature"
    except Exception:  # noqa: BLE001 - no oracle for this family
        return None, None


def oracle_report(dataset, family) -> str | None:
    """RMSE of the dataset means against an exact/quadrature oracle and the fraction of
    (point, statistic) pairs with |mean - oracle| <= 3 mcse; None if no oracle applies."""
    import jax.numpy as jnp
    import numpy as np

    oracle, label = _oracle_for(family)
    if oracle is None:
        return None
    try:
        reference = np.asarray(oracle.mean(jnp.asarray(dataset.eta)), dtype=np.float64)
    except Exception as err:  # noqa: BLE001
        return f"({label} oracle unavailable for this family: {err})"
    error = dataset.mean - reference
    rmse = np.sqrt(np.mean(error**2, axis=0))
    within = np.abs(error) <= 3 * dataset.mcse
    per_stat = ", ".join(f"{s} {r:.3g}" for s, r in zip(dataset.stat_labels, rmse, strict=True))
    return (
        f"means vs {label} oracle: RMSE {float(np.sqrt(np.mean(error**2))):.4g} "
        f"(per statistic: {per_stat}); within 3 MCSE: {100 * within.mean():.1f}% of "
        f"{within.size} (point, statistic) pairs"
    )


def _enable_x64(flag: bool) -> None:
    import jax

    jax.config.update("jax_enable_x64", flag)


def _persistent_compilation_cache() -> None:
    """For :func:`entry_point` only (not in-process callers of :func:`main`): XLA programs
    that took over a second to compile are kept in ``$NNEF_CACHE/xla`` (default
    ``~/.cache/numpyro_nnef/xla``), so a rerun (a resume after Ctrl-C, the next box of the same
    family) skips compilation; ``NNEF_CACHE=off`` disables it, and a directory already set via
    ``JAX_COMPILATION_CACHE_DIR`` is kept."""
    import jax

    root = os.environ.get("NNEF_CACHE", str(Path.home() / ".cache" / "numpyro_nnef"))
    if root.lower() == "off" or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(Path(root) / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _run_generate(config_path: Path, *, output: str | None, seed: int | None,
                  checkpoint: str | None, progress: bool) -> Path:
    """Generate and save the dataset described by ``config_path``; returns its path."""
    config = parse_generate_config(load_config(config_path))
    if config["train"]:  # report a bad [train] table now, not after the NUTS run
        train = config["train"]
        check_model_choice(train.get("architecture", "mlp"), train.get("protocol", "regression"),
                           train.get("protocol_options"))
    _enable_x64(config["x64"])
    import dataclasses

    import jax

    from .family import OutOfDomainError
    from .sampling import CheckpointMismatchError, generate_dataset, sample_etas

    family = resolve_family(config["family"]["name"], config["family"]["kwargs"])
    seed = config["seed"] if seed is None else seed
    root = jax.random.key(seed)
    e = config["etas"]
    try:
        etas = sample_etas(family, key=jax.random.fold_in(root, 0), low=e["low"], high=e["high"],
                           num=e["num"], scale=e["scale"])
    except (OutOfDomainError, ValueError) as err:
        raise ConfigError(f"[etas]: {err}") from None
    path = Path(output or config["output"] or f"{family.name}_dataset.npz")
    checkpoint = checkpoint or config["checkpoint_dir"]
    print(f"{family!r}: {len(etas)} etas, statistics {family.stat_labels}, "
          f"{len(jax.local_devices())} device(s); config {config_path}", flush=True)
    try:
        dataset = generate_dataset(family, etas, key=jax.random.fold_in(root, 1),
                                   checkpoint_dir=checkpoint, progress=progress,
                                   **config["sampler"])
    except CheckpointMismatchError as err:
        raise ConfigError(str(err)) from None
    except KeyboardInterrupt:
        if checkpoint:
            print(f"finished chunks are kept in {checkpoint}; run the same command again to "
                  "resume", file=sys.stderr)
        raise
    provenance = {"config": str(config_path), "seed": int(seed), "etas": e,
                  "eta_key": "fold_in(key(seed), 0)", "sampler_key": "fold_in(key(seed), 1)"}
    dataset = dataclasses.replace(dataset, metadata={**dataset.metadata, "cli": provenance})
    dataset.save(path)
    print(f"saved {len(dataset)} points to {path}")
    print(dataset.summary())
    report = oracle_report(dataset, family)
    if report:
        print(report)
    return path


def _generate(args: argparse.Namespace) -> int:
    _run_generate(Path(args.config) if args.config else _demo_config_path(), output=args.output,
                  seed=args.seed, checkpoint=args.checkpoint_dir, progress=not args.no_progress)
    return 0


def _load_dataset(path: str | os.PathLike):
    from .dataset import ExpectationDataset

    try:
        return ExpectationDataset.load(path)
    except (OSError, ValueError) as err:
        raise ConfigError(str(err)) from None


def _dataset_family(dataset, spec: dict[str, Any] | None, where: str):
    """The dataset's family: the config's [family] (checked against the dataset) or rebuilt
    from the dataset's metadata."""
    from .families import family_from_description

    if spec is not None:
        family = resolve_family(spec["name"], spec["kwargs"])
        try:
            dataset.check_family(family)
        except ValueError as err:
            raise ConfigError(f"{where}: {err} (the config's [family] is {family!r})") from None
        return family
    description = dataset.metadata.get("family")
    try:
        if not isinstance(description, dict):
            raise ValueError(f"the dataset does not record its family ({dataset.family_name})")
        return family_from_description(description)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}; name it in a config file: [family] name = "
                          "\"package.module:attribute\" (with --config)") from None


def _run_train(config: dict[str, Any], *, dataset_path: str | os.PathLike,
               output_dir: str | os.PathLike, seed: int, progress: bool):
    """Train an oracle on the dataset with the options ``config["train"]``, save it to
    ``output_dir`` and print the learning summary; returns the oracle."""
    options = {k: v for k, v in config["train"].items() if k not in ("seed", "output_dir")}
    architecture = options.setdefault("architecture", "mlp")
    protocol = options.setdefault("protocol", "regression")
    check_model_choice(architecture, protocol, options.get("protocol_options"))
    _enable_x64(config["x64"])
    import jax

    from .training import train_oracle

    dataset = _load_dataset(dataset_path)
    family = _dataset_family(dataset, config["family"], str(dataset_path))
    print(f"training {architecture}/{protocol} on {dataset_path} ({len(dataset)} points, "
          f"{family!r}), seed {seed}", flush=True)
    try:
        oracle = train_oracle(dataset, key=jax.random.key(seed), family=family,
                              output_dir=output_dir, progress=progress, **options)
    except (ValueError, FloatingPointError) as err:  # unknown hyperparameters, few points, ...
        raise ConfigError(f"cannot train: {err}") from None
    print(training_summary(oracle, output_dir))
    return oracle


def training_summary(oracle, output_dir: str | os.PathLike) -> str:
    """Best epoch, validation and test errors, excluded points, the log-partition anchors and
    the files written, as text."""
    report, anchors = oracle.report, oracle.anchors
    excluded = {k: v for k, v in report.excluded.items() if v}
    test = ", ".join(f"{s} {r:.4g}" for s, r in zip(oracle.family.stat_labels, report.test_rmse,
                                                     strict=True))
    if not anchors:
        anchor_line = "log-partition anchor: none (A(eta) known up to a constant)"
    else:
        khats = [a.khat for a in anchors if a.khat is not None]
        khat = f"{max(khats):.3f}" if khats else "n/a"
        values = [a.value for a in anchors]
        anchor_line = (f"log-partition anchors: {len(anchors)} training eta ({anchors[0].method}), "
                       f"A from {min(values):.6g} to {max(values):.6g}, max stderr "
                       f"{max(a.stderr for a in anchors):.2g}, max k-hat {khat}")
    out = Path(output_dir)
    epochs = int(report.history["epoch"][-1]) if len(report.history["epoch"]) else 0
    return "\n".join([
        f"points: {report.num_train} train / {report.num_val} validation / {report.num_test} "
        f"test; excluded: {excluded or 'none'}",
        f"best epoch {report.best_epoch} of {epochs} run"
        f"{' (stopped early)' if report.stopped_early else ''}; validation RMSE "
        f"(standardised) {report.best_val_rmse:.4g}; {report.wall_time_s:.1f} s",
        f"test RMSE per statistic: {test}",
        anchor_line,
        f"oracle written to {out}/ (oracle.json, weights.npz); learning curves: "
        f"{out / 'learning_curves.csv'}, {out / 'learning_curves.png'}",
    ])


def _train(args: argparse.Namespace) -> int:
    raw = load_config(args.config) if args.config else {}
    config = parse_train_config(raw)
    train = config["train"]
    # hyperparameters belong to the config's architecture, protocol_options to its protocol
    for flag, default, tied in (("architecture", "mlp", "hyperparameters"),
                                ("protocol", "regression", "protocol_options")):
        value = getattr(args, flag)
        if value is not None and value != train.get(flag, default):
            if train.pop(tied, None):
                print(f"note: [train] {tied} are for {flag} {train.get(flag, default)!r}, not "
                      f"{value!r}; using the defaults of {value!r}", file=sys.stderr)
            train[flag] = value
    if args.max_epochs is not None:
        train["max_epochs"] = args.max_epochs
    if train.get("max_epochs", 1) < 1:
        raise ConfigError(f"--max-epochs must be >= 1, got {train['max_epochs']}")
    dataset = args.dataset or config["dataset"]
    if dataset is None:
        raise ConfigError("no dataset: pass --dataset PATH (or a config with output = PATH)")
    output = args.output or train.get("output_dir")
    if output is None:
        raise ConfigError("no output directory: pass --output DIR (or [train] output_dir)")
    seed = args.seed if args.seed is not None else train.get("seed", config["seed"])
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    _run_train(config, dataset_path=dataset, output_dir=output, seed=seed,
               progress=not args.no_progress)
    return 0


EVAL_BATCH = 10_000


def _evaluation_points(oracle, dataset):
    """(eta, data means or None, description): the dataset's test split when the dataset is
    the training one (same size: same split), else all its finite points; without a dataset,
    256 etas uniform in the training box (those inside the natural domain)."""
    import jax
    import numpy as np

    if dataset is None:
        u = np.asarray(jax.random.uniform(jax.random.key(0), (256, oracle.family.stat_dim)))
        eta = oracle.eta_low + u * (oracle.eta_high - oracle.eta_low)
        eta = eta[np.asarray(oracle.family.in_domain(eta))]
        return eta, None, f"{len(eta)} etas uniform in the training box"
    from .training.trainer import usable_points

    training = oracle.metadata.get("training", {})
    if training.get("dataset_size") == len(dataset):
        keep, _ = usable_points(dataset, bool(training.get("drop_failed", True)))
        test = dataset.subset(np.flatnonzero(keep)).split(
            tuple(training["fractions"]), seed=int(training["split_seed"]))[-1]
        return test.eta, test.mean, f"the test split ({len(test)} of {len(dataset)} points)"
    keep, _ = usable_points(dataset, False)
    return (dataset.eta[keep], dataset.mean[keep],
            f"all {int(keep.sum())} finite points (not the training dataset: "
            f"{len(dataset)} points, training used {training.get('dataset_size')})")


def evaluation_table(oracle, dataset=None) -> str:
    """Markdown error table per statistic of ``oracle`` (RMSE against the data and, when the
    family has one, against the exact/quadrature oracle, the data's own RMSE against it and
    the max relative error |mu_hat - mu| / max(|mu|, sd(T))), the max log-partition error and
    the evaluation time per eta in a batch of 10^4."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    eta, data_mean, where = _evaluation_points(oracle, dataset)
    if len(eta) == 0:
        raise ConfigError("no points to evaluate on")
    labels = oracle.family.stat_labels
    lines = [f"{oracle!r} evaluated on {where}:"]
    outside = int(len(eta) - np.asarray(oracle.in_training_range(eta)).sum())
    if outside:
        lines.append(f"warning: {outside} of {len(eta)} eta lie outside the training range "
                     f"[{np.round(oracle.eta_low, 4).tolist()}, "
                     f"{np.round(oracle.eta_high, 4).tolist()}]; the network extrapolates there")
    pred = np.asarray(oracle.mean(jnp.asarray(eta)))
    reference, label = _oracle_for(oracle.family)
    exact = exact_sd = None
    if reference is not None:
        try:
            exact = np.asarray(reference.mean(jnp.asarray(eta)))
            exact_sd = np.sqrt(np.diagonal(np.asarray(reference.covariance(jnp.asarray(eta))),
                                           axis1=-2, axis2=-1))
        except Exception as err:  # noqa: BLE001 - the reference does not cover this family
            lines.append(f"({label} oracle unavailable for this family: {err})")
            exact = None
    if data_mean is None and exact is None:
        raise ConfigError(f"nothing to compare {oracle!r} with: no exact or quadrature oracle "
                          "for its family; pass --dataset")
    rmse = lambda a, b: np.sqrt(np.mean((a - b) ** 2, axis=0))
    header, columns = ["statistic"], []
    if data_mean is not None:
        header.append("RMSE vs data")
        columns.append(rmse(pred, data_mean))
    if exact is not None:
        header.append(f"RMSE vs {label}")
        columns.append(rmse(pred, exact))
        if data_mean is not None:
            header.append(f"data RMSE vs {label}")
            columns.append(rmse(data_mean, exact))
        header.append(f"max rel. error vs {label}")
        columns.append(np.max(np.abs(pred - exact) / np.maximum(np.abs(exact), exact_sd), axis=0))
    lines += ["", "| " + " | ".join(header) + " |",
              "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join([s] + [f"{c[j]:.3g}" for c in columns]) + " |"
              for j, s in enumerate(labels)]
    lines.append("")
    if exact is not None:
        lines.append(f"max rel. error: max over the points of |mu_hat - mu| / max(|mu|, sd(T)), "
                     f"mu and sd(T) from the {label} oracle")
    if exact is not None and oracle.anchors:
        error = np.abs(np.asarray(oracle.log_partition(jnp.asarray(eta)))
                       - np.asarray(reference.log_partition(jnp.asarray(eta))))
        lines.append(f"log-partition: max |A error| vs {label} {np.max(error):.3g} "
                     f"({len(oracle.anchors)} {oracle.anchors[0].method} anchors)")
    elif not oracle.anchors:
        lines.append("log-partition: no anchor (known up to a constant)")
    batch = jnp.asarray(np.resize(eta, (EVAL_BATCH, eta.shape[1])))
    mean = jax.jit(jax.vmap(oracle.mean_single))
    mean(batch).block_until_ready()
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        mean(batch).block_until_ready()
        seconds.append(time.perf_counter() - start)
    lines.append(f"evaluation time: {1e6 * min(seconds) / EVAL_BATCH:.3g} us per eta "
                 f"(E[T], batch of {EVAL_BATCH}, jit, {jax.default_backend()}, {batch.dtype})")
    return "\n".join(lines)


def _run_evaluate(oracle_dir: str | os.PathLike, dataset_path: str | os.PathLike | None,
                  family_spec: dict[str, Any] | None = None) -> None:
    from .oracles.neural import load_oracle

    family = None
    if family_spec is not None:
        family = resolve_family(family_spec["name"], family_spec["kwargs"])
    try:
        oracle = load_oracle(oracle_dir, family, out_of_range="ignore")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"cannot load the oracle in {oracle_dir}: {err}") from None
    dataset = None
    if dataset_path is not None:
        dataset = _load_dataset(dataset_path)
        try:
            dataset.check_family(oracle.family)
        except ValueError as err:
            raise ConfigError(f"{dataset_path}: {err} (the oracle in {oracle_dir} is for "
                              f"{oracle.family!r})") from None
    print(evaluation_table(oracle, dataset))


def _evaluate(args: argparse.Namespace) -> int:
    config = parse_train_config(load_config(args.config)) if args.config else None
    _enable_x64(config["x64"] if config else True)
    _run_evaluate(args.oracle, args.dataset, config["family"] if config else None)
    return 0


def _demo(args: argparse.Namespace) -> int:
    config_path = _demo_config_path()
    config = parse_train_config(load_config(config_path))
    dataset = _run_generate(config_path, output=args.output, seed=None, checkpoint=None,
                            progress=not args.no_progress)
    output = args.oracle or config["train"].get("output_dir", "runs/demo/oracle")
    print()
    _run_train(config, dataset_path=dataset, output_dir=output,
               seed=config["train"].get("seed", config["seed"]), progress=not args.no_progress)
    print()
    _run_evaluate(output, dataset)
    print()
    _run_cavi_demo(output)
    return 0


def _run_cavi_demo(oracle_dir: str | os.PathLike) -> None:
    """CAVI on a model whose latent x has the trained (unnamed) family as complete conditional:
    x ~ LaplaceProduct(eta0), s ~ Gamma(4, 4), factor s (T_1(x) + T_2(x)); so
    q(x) has eta = eta0 + E[s] (1, 1) and q(s) = Gamma(4 + 1, 4 - E[T_1 + T_2])."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    from .distribution import EFDistribution
    from .infer import CAVI, CAVIGuide
    from .oracles import ExactOracle
    from .oracles.neural import load_oracle

    learned = load_oracle(oracle_dir)
    family = learned.family
    eta0 = jnp.full(family.stat_dim, 0.5)

    def model():
        x = numpyro.sample("x", EFDistribution(family, eta0, oracle=ExactOracle(family)))
        s = numpyro.sample("s", dist.Gamma(4.0, 4.0))
        numpyro.factor("scaled", s * jnp.sum(family.sufficient_statistics(x)))

    print(f"CAVI with the learned {family.name} oracle (x) and a Gamma scale (s):")
    rows = []
    for label, oracle in (("learned", learned), ("exact", ExactOracle(family))):
        guide = CAVIGuide(model, oracles={"x": oracle})
        result = CAVI(model, guide).run(jax.random.key(0), 50, progress_bar=False)
        rows.append((label, result))
        shape, rate = guide.conjugate.families["s"].family.shape_rate_from_natural(
            result.params["s_eta"])
        print(f"  {label:8s} eta_x = {[round(float(v), 5) for v in result.params['x_eta']]}  "
              f"E[s] = {float(shape / rate):.5f}  sweeps {result.num_steps}  "
              f"converged {result.converged}  {result.wall_time_s:.2f} s")
    gap = float(jnp.max(jnp.abs(rows[0][1].params["x_eta"] - rows[1][1].params["x_eta"])))
    print(f"  max |eta_x(learned) - eta_x(exact)| = {gap:.2e}")


def _summary(args: argparse.Namespace) -> int:
    from .dataset import ExpectationDataset

    try:
        dataset = ExpectationDataset.load(args.path)
    except (OSError, ValueError) as err:
        raise ConfigError(str(err)) from None
    print(dataset.summary())
    return 0


def _families(args: argparse.Namespace) -> int:
    from .families import REGISTRY

    for name, cls in sorted(REGISTRY.items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name:20s} {doc[0] if doc else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m numpyro_nnef",
        description="numpyro-nnef: expectation data, neural oracles and CAVI for exponential "
                    "families defined by their sufficient statistics.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    gen = sub.add_parser(
        "generate", help="NUTS dataset eta -> E[T], Cov[T] with diagnostics (from a config)",
        description="Sample etas in a box, run NUTS per eta, save the dataset (.npz) and print "
                    "its diagnostics. Without --config the built-in demo config is used.",
    )
    gen.add_argument("--config", help="TOML or YAML config file (default: built-in demo.toml)")
    gen.add_argument("--output", help="dataset path (.npz); overrides the config's output")
    gen.add_argument("--checkpoint-dir", help="checkpoint directory (resumable); overrides the "
                                              "config's checkpoint_dir")
    gen.add_argument("--seed", type=int, help="overrides the config's seed")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(handler=_generate)
    train = sub.add_parser(
        "train", help="train a neural expectation oracle on a dataset",
        description="Fit an architecture x protocol to a dataset written by 'generate' (80/10/10 "
                    "split, early stopping), save the oracle and its learning curves to --output "
                    "and print the learning summary. Options come from the config's [train] "
                    "table (train_oracle's keyword arguments); flags override it.",
    )
    train.add_argument("--dataset", help="dataset file (.npz); default: the config's output")
    train.add_argument("--output", help="oracle directory; default: [train] output_dir")
    train.add_argument("--config", help="TOML or YAML config with a [train] table (and [family] "
                                        "for a user family)")
    train.add_argument("--architecture", help="overrides [train] architecture (default mlp)")
    train.add_argument("--protocol", help="overrides [train] protocol (default regression)")
    train.add_argument("--seed", type=int, help="overrides [train] seed")
    train.add_argument("--max-epochs", type=int, help="overrides [train] max_epochs")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train)
    evaluate = sub.add_parser(
        "evaluate", help="error table of a trained oracle (test split, exact oracle)",
        description="Load an oracle saved by 'train' and print a markdown table of its errors per "
                    "statistic: against the dataset's test split and, when the family has one, "
                    "against the exact or quadrature oracle; plus the log-partition error and "
                    "the evaluation time per eta. Without --dataset: etas in the training box.",
    )
    evaluate.add_argument("--oracle", required=True, help="oracle directory written by train")
    evaluate.add_argument("--dataset", help="dataset file (.npz), e.g. the training dataset")
    evaluate.add_argument("--config", help="config with [family] (needed for a user family)")
    evaluate.set_defaults(handler=_evaluate)
    demo = sub.add_parser(
        "demo", help="generate, train and evaluate with the built-in demo config",
        description="A small LaplaceProduct(dim=1) dataset from the built-in configs/demo.toml "
                    "(checked against the exact oracle), a neural oracle trained on it and its "
                    "error table.",
    )
    demo.add_argument("--output", help="dataset path (.npz); default runs/demo/dataset.npz")
    demo.add_argument("--oracle", help="oracle directory; default runs/demo/oracle")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo)
    summ = sub.add_parser("summary", help="print the diagnostics of a saved dataset")
    summ.add_argument("path", help="dataset file written by generate")
    summ.set_defaults(handler=_summary)
    fam = sub.add_parser("families", help="list the built-in families")
    fam.set_defaults(handler=_families)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for configuration and input errors, without
    traceback; 130 when interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args))
    except ConfigError as err:
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    """``python -m numpyro_nnef`` and the ``numpyro-nnef`` script: :func:`main` with the
    persistent compilation cache, exiting with its status."""
    _persistent_compilation_cache()
    status = main()
    if status == 130:  # a sampling thread may still be inside XLA: leave without joining it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry_point()

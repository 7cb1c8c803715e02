"""Command line: ``python -m numpyro_nnef <subcommand>``.

``generate [--config FILE] [--output PATH]`` samples etas in a box, runs NUTS for each, saves an
:class:`~numpyro_nnef.dataset.ExpectationDataset` and prints its diagnostics (and, when the family
has an exact or quadrature oracle, the error of the NUTS means against it). Without ``--config``
the built-in ``configs/demo.toml`` is used; ``demo`` is the same thing. ``summary FILE`` prints a
saved dataset's diagnostics; ``families`` lists the built-in families. Configuration errors exit
with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "build_parser", "load_config", "main", "parse_generate_config"]

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
}
_TOP_KEYS = {"family", "etas", "sampler", "seed", "output", "checkpoint_dir", "x64"}


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
    max_rhat, target_acceptance_rate``; top level ``seed``, ``output``, ``checkpoint_dir``,
    ``x64`` (default true: float64 sampling).
    """
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    family = dict(_table(raw, "family", True))
    if "name" not in family:
        raise ConfigError("missing key 'name' in [family]")
    family_name = _typed(family.pop("name"), str, "[family] name")

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

    seed = _typed(raw.get("seed", 0), int, "seed")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    output = _typed(raw["output"], str, "output") if "output" in raw else None
    checkpoint = (_typed(raw["checkpoint_dir"], str, "checkpoint_dir")
                  if "checkpoint_dir" in raw else None)
    return {
        "family": {"name": family_name, "kwargs": family},
        "etas": {"low": low, "high": high, "num": num, "scale": scale},
        "sampler": sampler,
        "seed": seed,
        "output": output,
        "checkpoint_dir": checkpoint,
        "x64": _typed(raw.get("x64", True), bool, "x64"),
    }


def resolve_family(name: str, kwargs: dict[str, Any]):
    """A built-in family by registry name, or ``"module:attribute"`` (an instance, a class or a
    factory called with ``kwargs``)."""
    from .family import ExponentialFamily

    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"[family] name {name!r}: cannot import it ({err})") from None
        if not isinstance(obj, ExponentialFamily):
            try:
                obj = obj(**kwargs)
            except TypeError as err:
                raise ConfigError(f"[family] {name}: bad arguments {kwargs}: {err}") from None
        elif kwargs:
            raise ConfigError(f"[family] {name} is an instance; it takes no arguments")
    else:
        try:
            from .families import REGISTRY
        except ImportError as err:  # pragma: no cover - families not installed
            raise ConfigError(f"built-in families are unavailable: {err}") from None
        if name not in REGISTRY:
            raise ConfigError(f"unknown family {name!r}; known families: "
                              f"{', '.join(sorted(REGISTRY))} (or 'package.module:attribute')")
        try:
            obj = REGISTRY[name](**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"[family] {name}: bad arguments {kwargs}: {err}") from None
    if not isinstance(obj, ExponentialFamily):
        raise ConfigError(f"[family] {name} did not give an ExponentialFamily "
                          f"(got {type(obj).__name__})")
    return obj


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


def _generate(args: argparse.Namespace) -> int:
    config_path = Path(args.config) if args.config else _demo_config_path()
    config = parse_generate_config(load_config(config_path))
    if config["x64"]:
        import jax

        jax.config.update("jax_enable_x64", True)
    import jax

    from .family import OutOfDomainError
    from .sampling import generate_dataset, sample_etas

    family = resolve_family(config["family"]["name"], config["family"]["kwargs"])
    root = jax.random.key(config["seed"] if args.seed is None else args.seed)
    e = config["etas"]
    try:
        etas = sample_etas(family, key=jax.random.fold_in(root, 0), low=e["low"], high=e["high"],
                           num=e["num"], scale=e["scale"])
    except (OutOfDomainError, ValueError) as err:
        raise ConfigError(f"[etas]: {err}") from None
    output = Path(args.output or config["output"] or f"{family.name}_dataset.npz")
    checkpoint = args.checkpoint_dir or config["checkpoint_dir"]
    print(f"{family!r}: {len(etas)} etas, statistics {family.stat_labels}, "
          f"{len(jax.local_devices())} device(s); config {config_path}", flush=True)
    try:
        dataset = generate_dataset(family, etas, key=jax.random.fold_in(root, 1),
                                   checkpoint_dir=checkpoint, progress=not args.no_progress,
                                   **config["sampler"])
    except KeyboardInterrupt:
        where = f"; finished chunks are kept in {checkpoint}" if checkpoint else ""
        print(f"interrupted{where}", file=sys.stderr)
        return 130
    import dataclasses

    provenance = {"config": str(config_path), "seed": int(args.seed if args.seed is not None
                                                          else config["seed"]),
                  "etas": e, "eta_key": "fold_in(key(seed), 0)",
                  "sampler_key": "fold_in(key(seed), 1)"}
    dataset = dataclasses.replace(dataset, metadata={**dataset.metadata, "cli": provenance})
    dataset.save(output)
    print(f"saved {len(dataset)} points to {output}")
    print(dataset.summary())
    report = oracle_report(dataset, family)
    if report:
        print(report)
    return 0


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
        description="numpyro-nnef: expectation data, oracles and CAVI for exponential families "
                    "defined by their sufficient statistics.",
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
    demo = sub.add_parser(
        "demo", help="generate with the built-in demo config (small LaplaceProduct dataset)",
        description="Same as 'generate' without --config: a small LaplaceProduct(dim=1) "
                    "dataset from the built-in configs/demo.toml, saved and checked against "
                    "the exact oracle.",
    )
    demo.add_argument("--output", help="dataset path (.npz); default runs/demo/dataset.npz")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_generate, config=None, checkpoint_dir=None, seed=None)
    summ = sub.add_parser("summary", help="print the diagnostics of a saved dataset")
    summ.add_argument("path", help="dataset file written by generate")
    summ.set_defaults(handler=_summary)
    fam = sub.add_parser("families", help="list the built-in families")
    fam.set_defaults(handler=_families)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for configuration errors, without traceback)."""
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


if __name__ == "__main__":
    sys.exit(main())

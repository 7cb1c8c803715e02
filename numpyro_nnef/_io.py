"""Files and learned-map plumbing shared by oracles and samplers: atomic writes (a temporary
file beside the target, fsync, then os.replace), weights as .npz plus a JSON config checked by
SHA-256 (never pickled), and the training-range check."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through ``write(fileobj)``: either the whole file appears or nothing does."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


# ----------------------------------------------------------------------------- weights + config
def tree_to_npz_bytes(tree: Any) -> bytes:
    """The leaves of a pytree as an .npz payload, each under its key path."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    buffer = io.BytesIO()
    np.savez(buffer, **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves})
    return buffer.getvalue()


def restore_tree(template: Any, payload: bytes, where: Path) -> Any:
    """``template`` with its leaves replaced by the arrays stored under their key paths (no
    pickle; names and shapes must match the template)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [jax.tree_util.keystr(path) for path, _ in leaves]
    with np.load(io.BytesIO(payload), allow_pickle=False) as stored:
        if set(names) != set(stored.files):
            raise ValueError(f"{where}: stored arrays do not match the recorded architecture")
        arrays = []
        for name, (_, leaf) in zip(names, leaves, strict=True):
            value = stored[name]
            if value.shape != np.shape(leaf):
                raise ValueError(f"{where}: {name} has shape {value.shape}, expected "
                                 f"{np.shape(leaf)}")
            arrays.append(jnp.asarray(value, dtype=jnp.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, arrays)


def save_weights_and_config(directory: str | os.PathLike, tree: Any, config: dict[str, Any],
                            weights_file: str, config_file: str) -> Path:
    """Write the weights (.npz) then the JSON config with the weights' SHA-256, atomically: a
    config on disk always describes complete weights."""
    directory = Path(directory)
    payload = tree_to_npz_bytes(tree)
    atomic_write(directory / weights_file, lambda f: f.write(payload))
    config = {**config, "weights_sha256": hashlib.sha256(payload).hexdigest()}
    text = json.dumps(config, indent=2, sort_keys=True).encode()
    atomic_write(directory / config_file, lambda f: f.write(text))
    return directory


def read_record(directory: str | os.PathLike, *, what: str, config_file: str, weights_file: str,
                format_name: str, versions: tuple[int, ...], family: Any = None
                ) -> tuple[dict[str, Any], bytes, Any]:
    """(config, weights payload, family) of a saved learned map, each part validated: both
    files present, the JSON's format and version, the weights' SHA-256, and the family (a
    family, a ``"package.module:attribute"`` reference, or None to rebuild a built-in one from
    the record) equal to the recorded one."""
    directory = Path(directory)
    config_path, weights_path = directory / config_file, directory / weights_file
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: incomplete {what} directory, {path.name} "
                                    f"missing")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("format") != format_name:
        raise ValueError(f"{config_path}: not a {format_name} record")
    if config.get("version") not in versions:
        readable = (f"version {versions[0]}" if len(versions) == 1
                    else f"versions {min(versions)} to {max(versions)}")
        raise ValueError(f"{config_path}: format version {config.get('version')!r}, this "
                         f"package reads {readable}")
    payload = read_checked_weights(weights_path, config, config_file)
    recorded = config["family"]
    from .families import family_from_description, resolve_family

    family = family_from_description(recorded) if family is None else resolve_family(family)
    if family.name != recorded["name"] or list(family.stat_labels) != recorded["stat_labels"]:
        raise ValueError(f"{directory}: {what} is for {recorded['name']} "
                         f"{recorded['stat_labels']}, got {family.name} "
                         f"{list(family.stat_labels)}")
    return config, payload, family


def read_checked_weights(weights_path: Path, config: dict[str, Any], config_file: str) -> bytes:
    """The weights payload, checked against the SHA-256 recorded in the config."""
    payload = weights_path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != config.get("weights_sha256"):
        raise ValueError(f"{weights_path}: weights do not match {config_file} (changed or "
                         f"partial)")
    return payload


# ----------------------------------------------------------------------------- training range
class TrainingRange:
    """Mixin for learned maps of eta: warn, raise or stay silent (``out_of_range``) when eta
    leaves the training box [eta_low, eta_high]; subclasses set ``extrapolation_hint``."""

    eta_low: np.ndarray
    eta_high: np.ndarray
    out_of_range: str
    extrapolation_hint: str = "pass out_of_range='ignore' to silence, or train on a wider box"

    def check_range(self, eta: Array) -> Array:
        """eta, after reporting the points outside the training box (also under jit)."""
        if self.out_of_range != "ignore":
            outside = jnp.sum(~self._in_box(eta))
            if isinstance(outside, jax.core.Tracer):
                jax.debug.callback(self._report_outside, outside)
            else:
                self._report_outside(outside)
        return eta

    def in_training_range(self, eta: Array) -> Array:
        """Boolean mask (batch shape): True where eta lies inside the training box."""
        return self._in_box(self.family.check_eta(jnp.asarray(eta)))

    def _in_box(self, eta: Array) -> Array:
        """eta_low <= eta <= eta_high per point, with a relative tolerance of 1e-9."""
        tol = 1e-9 * (self.eta_high - self.eta_low + 1.0)
        return jnp.all((eta >= self.eta_low - tol) & (eta <= self.eta_high + tol), axis=-1)

    def _report_outside(self, outside) -> None:
        count = int(outside)
        if count == 0:
            return
        message = (f"{self!r}: {count} eta outside the training range "
                   f"[{np.round(self.eta_low, 4).tolist()}, "
                   f"{np.round(self.eta_high, 4).tolist()}]; {self.extrapolation_hint}")
        if self.out_of_range == "error":
            raise ValueError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

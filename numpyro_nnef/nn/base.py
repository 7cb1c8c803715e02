"""Shared pieces of the Flax NNX networks: activations, JSON-configured modules, batching."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "softplus": jax.nn.softplus,
    "elu": jax.nn.elu,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------- batch helpers


@partial(jax.jit, static_argnums=(0, 2))
def _apply(graphdef: Any, state: Any, method: str, eta: Array) -> Array:
    return getattr(nnx.merge(graphdef, state), method)(eta)


def compiled(net: nnx.Module, method: str, eta: Array) -> Array:
    """Run ``net.<method>(eta)`` under one ``jax.jit`` (via nnx.split/merge: no state write-back,
    so it is safe inside outer jit/grad/vmap and avoids op-by-op compilation when eager)."""
    graphdef, state = nnx.split(net)
    return _apply(graphdef, state, method, eta)


def per_example(fn: Callable[[Array], Array], eta: Array, eta_dim: int) -> Array:
    """Apply ``fn`` (defined on a single eta of shape (eta_dim,)) over any batch shape."""
    eta = jnp.asarray(eta)
    if eta.ndim == 0 or eta.shape[-1] != eta_dim:
        raise ValueError(f"eta must have shape (..., {eta_dim}), got {eta.shape}")
    batch_shape = eta.shape[:-1]
    flat = eta.reshape((-1, eta_dim))
    out = jax.vmap(fn)(flat)
    return out.reshape(batch_shape + out.shape[1:])



class ConfiguredModule(nnx.Module):
    """A module rebuilt from JSON: subclasses declare ``name`` and ``defaults`` (hyperparameter
    defaults) and implement ``_build(rngs=..., **hyperparameters)``; ``config`` holds the
    dimensions passed to ``__init__`` plus every hyperparameter."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

    def _configure(self, dims: dict[str, int], hyperparameters: dict[str, Any]) -> dict[str, Any]:
        """Check hyperparameters, store the JSON config, return the merged hyperparameters."""
        unknown = set(hyperparameters) - set(self.defaults)
        if unknown:
            raise ValueError(
                f"unknown hyperparameters {sorted(unknown)} for {self.name!r}; "
                f"known: {sorted(self.defaults)}"
            )
        bad = {k: v for k, v in dims.items() if int(v) < 1}
        if bad:
            raise ValueError(f"{self.name!r}: dimensions must be >= 1, got {bad}")
        hp = {**self.defaults, **hyperparameters}
        # Stored as a JSON string: module attributes end up in the (hashed) nnx graphdef.
        self.config_json = json.dumps(
            {"name": self.name, **{k: int(v) for k, v in dims.items()},
             "hyperparameters": jsonable(hp)}
        )
        return hp

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable {name, dimensions..., hyperparameters} (a fresh copy)."""
        return json.loads(self.config_json)


def build_from_registry(registry: dict[str, type], kind: str, name: str, **kwargs: Any) -> Any:
    """``registry[name](**kwargs)`` with an error listing the known names."""
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; known: {sorted(registry)}")
    return registry[name](**kwargs)


def jsonable(value: Any) -> Any:
    """Tuples -> lists, numpy scalars -> Python scalars (so ``config`` survives json.dumps)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    return value

"""Exponential families defined by their sufficient statistics.

p(x | eta) = h(x) exp(eta . T(x) - A(eta)) on a support; eta lives in the natural domain
{eta : A(eta) < inf}. A family names its statistics T(x) (a dict of arrays) and exposes a flat
view of shape ``batch + (stat_dim,)`` used by oracles, datasets and networks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints

Array = jax.Array
StatisticsFn = Callable[[Array], Mapping[str, Array]]


class NaturalDomain(constraints.Constraint):
    """Constraint on a flat natural parameter eta of shape ``batch + (stat_dim,)``.

    ``check(eta)`` returns a boolean array of shape ``batch``; ``description`` says in words what
    the domain is (used in error messages); ``feasible`` is one point inside the domain.
    """

    event_dim = 1

    def __init__(self, check: Callable[[Array], Array], description: str, feasible: Array):
        self.check_fn = check
        self.description = description
        self.feasible = np.asarray(feasible, dtype=np.float32)

    def __call__(self, eta: Array) -> Array:
        eta = jnp.asarray(eta)
        finite = jnp.all(jnp.isfinite(eta), axis=-1)
        return finite & self.check_fn(eta)

    def feasible_like(self, prototype: Array) -> Array:
        return jnp.broadcast_to(jnp.asarray(self.feasible, prototype.dtype), prototype.shape)

    def tree_flatten(self):
        return (), ((), {"check_fn": self.check_fn, "description": self.description,
                         "feasible": self.feasible})

    def __repr__(self) -> str:
        return f"NaturalDomain({self.description})"


def whole_space(stat_dim: int) -> NaturalDomain:
    """The natural domain R^stat_dim (e.g. the von Mises family)."""
    return NaturalDomain(
        lambda eta: jnp.ones(eta.shape[:-1], bool), "all finite eta", np.zeros(stat_dim)
    )


class OutOfDomainError(ValueError):
    """Raised when a natural parameter lies outside its family's natural domain."""


class ExponentialFamily:
    """Base class: subclass and implement :meth:`statistics` (and optionally the log base measure).

    Class attributes (or instance attributes set in ``__init__``): name, event_shape, support
    (a numpyro constraint), natural_constraint (a NaturalDomain). Subclasses with a closed-form
    log-partition set ``has_closed_form = True`` and implement
    ``closed_form_log_partition(eta)`` for one flat eta (``ExactOracle`` uses it), and may
    implement ``closed_form_mean(eta)`` (= grad A, a smaller program than autodiff) and
    ``closed_form_mean_and_log_partition(eta)`` (both from one computation),
    ``closed_form_covariance(eta)`` (= Hessian A, where the Jacobian of the mean cancels
    digits), ``closed_form_natural_from_mean(mu)`` and ``sample_exact(key, eta, sample_shape)``.
    """

    name: str = "ExponentialFamily"
    event_shape: tuple[int, ...] = ()
    support: constraints.Constraint = constraints.real
    natural_constraint: NaturalDomain | None = None
    has_closed_form: bool = False
    has_exact_sampler: bool = False
    # Points of x where T is not smooth (e.g. 0 for |x|); quadrature splits its panels there.
    breakpoints: tuple[float, ...] = ()
    # Attributes that determine the family completely (opt-in): instances with equal values are
    # equal and share compiled samplers. None (the default) means equal only to itself.
    identity_attributes: tuple[str, ...] | None = None

    # ------------------------------------------------------------------ to implement
    def statistics(self, x: Array) -> dict[str, Array]:
        """Named statistics T(x); each value has shape ``batch + stat_shape``."""
        raise NotImplementedError(f"{type(self).__name__} must implement statistics(x)")

    def log_base_measure(self, x: Array) -> Array:
        """log h(x), shape ``batch``; the default is h = 1."""
        x = jnp.asarray(x)
        return jnp.zeros(x.shape[: x.ndim - len(self.event_shape)], dtype=_float_dtype(x))

    # ------------------------------------------------------------------ layout
    @property
    def stat_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each named statistic for a single x (no batch dimensions)."""
        cached = self.__dict__.get("_stat_shapes")
        if cached is None:
            order: list[str] = []  # the user's order; pytrees would sort dict keys

            def probe(x):
                out = self.statistics(x)
                if not isinstance(out, Mapping) or not out:
                    raise TypeError(
                        f"{self.name}: statistics(x) must return a non-empty dict of arrays, "
                        f"got {type(out).__name__}"
                    )
                order.extend(out)
                return {k: jnp.asarray(v) for k, v in out.items()}

            out = jax.eval_shape(probe, jax.ShapeDtypeStruct(self.event_shape, jnp.float32))
            cached = {str(k): tuple(out[k].shape) for k in order}
            self.__dict__["_stat_shapes"] = cached
        return dict(cached)

    @property
    def stat_names(self) -> tuple[str, ...]:
        return tuple(self.stat_shapes)

    @property
    def stat_dim(self) -> int:
        return sum(math.prod(s) for s in self.stat_shapes.values())

    @property
    def stat_labels(self) -> tuple[str, ...]:
        """One label per flat coordinate, e.g. ``('x', 'x2')`` or ``('a[0]', 'a[1]')``."""
        labels = []
        for name, shape in self.stat_shapes.items():
            if shape == ():
                labels.append(name)
            else:
                labels.extend(f"{name}[{','.join(map(str, i))}]" for i in np.ndindex(*shape))
        return tuple(labels)

    def flatten(self, stats: Mapping[str, Array]) -> Array:
        """dict of statistics -> flat array of shape ``batch + (stat_dim,)``."""
        shapes = self.stat_shapes
        missing = set(shapes) - set(stats)
        if missing:
            raise KeyError(f"{self.name}: statistics {sorted(missing)} are missing")
        parts, batch = [], None
        for name, shape in shapes.items():
            value = jnp.asarray(stats[name])
            if value.ndim < len(shape) or value.shape[value.ndim - len(shape):] != shape:
                raise ValueError(
                    f"{self.name}: statistic {name!r} should end in shape {shape}, "
                    f"got {value.shape}"
                )
            value_batch = value.shape[: value.ndim - len(shape)]
            batch = value_batch if batch is None else jnp.broadcast_shapes(batch, value_batch)
            parts.append((value, value_batch, shape))
        flat = [
            jnp.broadcast_to(v, batch + s).reshape(batch + (math.prod(s),)) for v, _, s in parts
        ]
        return jnp.concatenate(flat, axis=-1)

    def unflatten(self, flat: Array) -> dict[str, Array]:
        """flat array of shape ``batch + (stat_dim,)`` -> dict of statistics."""
        flat = jnp.asarray(flat)
        if flat.ndim < 1 or flat.shape[-1] != self.stat_dim:
            raise ValueError(
                f"{self.name}: expected a last dimension of size stat_dim={self.stat_dim}, "
                f"got shape {flat.shape}"
            )
        batch, out, start = flat.shape[:-1], {}, 0
        for name, shape in self.stat_shapes.items():
            size = math.prod(shape)
            out[name] = flat[..., start:start + size].reshape(batch + shape)
            start += size
        return out

    def sufficient_statistics(self, x: Array) -> Array:
        """T(x) flat: shape ``batch + (stat_dim,)`` for x of shape ``batch + event_shape``."""
        x = self._check_x(x)
        return self.flatten(self.statistics(x))

    def unnormalized_log_prob(self, eta: Array, x: Array) -> Array:
        """eta . T(x) + log h(x), broadcasting the batch shapes of eta and x."""
        t = self.sufficient_statistics(x)
        return jnp.sum(jnp.asarray(eta) * t, axis=-1) + self.log_base_measure(x)

    # ------------------------------------------------------------------ natural domain
    def in_domain(self, eta: Array) -> Array:
        """Boolean array of shape ``batch``: is eta inside the natural domain?"""
        eta = self.check_eta(eta)
        if self.natural_constraint is None:
            return jnp.all(jnp.isfinite(eta), axis=-1)
        return self.natural_constraint(eta)

    def validate_natural(self, eta: Array) -> Array:
        """Return eta as an array, raising :class:`OutOfDomainError` if any eta is outside."""
        eta = self.check_eta(eta)
        if isinstance(eta, jax.core.Tracer):
            return eta
        ok = np.asarray(self.in_domain(eta))
        if not ok.all():
            bad = np.asarray(eta).reshape(-1, self.stat_dim)[~ok.reshape(-1)][:3]
            where = self.natural_constraint.description if self.natural_constraint else "finite"
            raise OutOfDomainError(
                f"{self.name}: {int((~ok).sum())} natural parameter(s) outside the natural "
                f"domain ({where}); e.g. eta = {bad.tolist()}"
            )
        return eta

    @property
    def domain_description(self) -> str:
        """The natural domain in words (for messages)."""
        if self.natural_constraint is None:
            return "A(eta) < inf; the family has no natural_constraint"
        return self.natural_constraint.description

    def first_outside(self, eta: np.ndarray, inside: np.ndarray) -> str:
        """Where the first eta with ``inside`` False is, e.g. "batch index (1,): eta = (x=1,
        x2=2)" (``eta`` of shape ``batch + (stat_dim,)``, ``inside`` of shape ``batch``)."""
        inside = np.asarray(inside, bool)
        index = np.unravel_index(int(np.argmin(inside.reshape(-1))), inside.shape)
        values = np.asarray(eta).reshape(inside.shape + (self.stat_dim,))[index]
        coordinates = ", ".join(f"{label}={float(v):.6g}"
                                for label, v in zip(self.stat_labels, values, strict=True))
        return f"batch index {tuple(int(i) for i in index)}: eta = ({coordinates})"

    def check_statistics(self, key: Array, num_points: int = 256, scale: float = 3.0) -> None:
        """Raise ValueError if T(x) or log h(x) is not finite at random points of the support.

        Points are ``biject_to(support)(u)`` with u ~ Normal(0, scale) in unconstrained space.
        """
        from numpyro.distributions.transforms import biject_to

        transform = biject_to(self.support)
        shape = transform.inverse_shape(self.event_shape)
        u = scale * jax.random.normal(key, (num_points,) + tuple(shape))
        x = transform(u)
        t = self.sufficient_statistics(x)
        logh = self.log_base_measure(x)
        bad_t = ~np.asarray(jnp.all(jnp.isfinite(t), axis=-1))
        bad_h = ~np.asarray(jnp.isfinite(logh))
        if bad_t.any() or bad_h.any():
            i = int(np.argmax(bad_t | bad_h))
            what = "T(x)" if bad_t[i] else "log h(x)"
            raise ValueError(
                f"{self.name}: {what} is not finite at x = {np.asarray(x[i]).tolist()}, a point "
                f"of the support {self.support}; statistics must be finite on the whole support"
            )

    def check_eta(self, eta: Array) -> Array:
        """eta as an array, after checking its shape is ``batch + (stat_dim,)``."""
        eta = jnp.asarray(eta)
        if eta.ndim < 1 or eta.shape[-1] != self.stat_dim:
            raise ValueError(
                f"{self.name}: eta must have shape batch + ({self.stat_dim},) "
                f"(statistics {self.stat_labels}), got {eta.shape}"
            )
        return eta

    def _check_x(self, x: Array) -> Array:
        x = jnp.asarray(x)
        k = len(self.event_shape)
        if x.ndim < k or x.shape[x.ndim - k:] != self.event_shape:
            raise ValueError(
                f"{self.name}: x must have shape batch + {self.event_shape}, got {x.shape}"
            )
        return x

    def describe(self) -> dict[str, Any]:
        """JSON-able record of the family: name, class, statistics, support, natural domain and
        the constructor arguments (``identity_attributes``; None for an ad-hoc family)."""
        domain = self.natural_constraint
        attrs = self.identity_attributes
        return {
            "name": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "repr": repr(self),
            "event_shape": list(self.event_shape),
            "support": repr(self.support),
            "natural_domain": domain.description if domain is not None else "all finite eta",
            "stat_labels": list(self.stat_labels),
            "stat_shapes": {k: list(v) for k, v in self.stat_shapes.items()},
            "init_kwargs": None if attrs is None else {a: getattr(self, a) for a in attrs},
        }

    def cache_key(self) -> tuple:
        """Hashable key; equal keys mean the same family (same T, h, support and domain)."""
        if self.identity_attributes is None:
            return (type(self), id(self))
        return (type(self),) + tuple(getattr(self, a) for a in self.identity_attributes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExponentialFamily) and self.cache_key() == other.cache_key()

    def __hash__(self) -> int:
        return hash(self.cache_key())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, event_shape={self.event_shape}, "
            f"statistics={self.stat_shapes})"
        )

    # ------------------------------------------------------------------ user families
    @classmethod
    def from_statistics(
        cls,
        name: str,
        statistics: StatisticsFn,
        *,
        event_shape: tuple[int, ...] = (),
        support: constraints.Constraint = constraints.real,
        natural_constraint: NaturalDomain | None = None,
        log_base_measure: Callable[[Array], Array] | None = None,
        breakpoints: tuple[float, ...] = (),
    ) -> ExponentialFamily:
        """A family from a user function ``statistics(x) -> dict`` (or a single array).

        ``statistics`` must map x of shape ``batch + event_shape`` to arrays with the same batch
        dimensions in front. A fixed neural network is fine: close over frozen parameters. A
        function written for one x only can be wrapped with ``jax.vmap`` by the caller.
        """
        return StatisticsFamily(
            name, statistics, event_shape=tuple(event_shape), support=support,
            natural_constraint=natural_constraint, log_base_measure=log_base_measure,
            breakpoints=tuple(breakpoints),
        )


class StatisticsFamily(ExponentialFamily):
    """A family given by a user's statistics function (see ``from_statistics``)."""

    def __init__(self, name, statistics, *, event_shape, support, natural_constraint,
                 log_base_measure, breakpoints):
        if not callable(statistics):
            raise TypeError(f"{name}: statistics must be callable, got {type(statistics).__name__}")
        if not isinstance(support, constraints.Constraint):
            raise TypeError(f"{name}: support must be a numpyro constraint, got {support!r}")
        self.name = name
        self._statistics = statistics
        self.event_shape = event_shape
        self.support = support
        self._log_base_measure = log_base_measure
        self.breakpoints = breakpoints
        self.stat_shapes  # noqa: B018 - fail early on a malformed statistics function
        self.natural_constraint = natural_constraint

    def statistics(self, x: Array) -> dict[str, Array]:
        out = self._statistics(x)
        if not isinstance(out, Mapping):
            out = {"T": jnp.asarray(out)}
        return dict(out)

    def log_base_measure(self, x: Array) -> Array:
        if self._log_base_measure is None:
            return super().log_base_measure(x)
        return self._log_base_measure(x)


def _float_dtype(x: Array):
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)

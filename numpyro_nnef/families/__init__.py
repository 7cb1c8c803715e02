"""Built-in exponential families, each with a closed-form log-partition and an exact sampler.

Families with a standard NumPyro equivalent also have ``to_numpyro(eta)`` (all but
RectifiedGaussian, LaplaceProduct, GaussLaplace, GIG and SqrtGIG). Categorical, Bernoulli and
Poisson are discrete: ``ExactOracle`` and ``sample_exact`` only (quadrature and NUTS need a
continuous x).

``REGISTRY`` maps class names to classes; ``get_family(name, **kwargs)`` builds one by name and
``resolve_family(reference)`` also accepts a ``"package.module:attribute"`` reference (a user
family, its class or a factory).
"""

from __future__ import annotations

import importlib
from typing import Any

from ..family import ExponentialFamily
from .circular import VonMises
from .discrete import Bernoulli, Categorical, Poisson
from .gamma_beta import Beta, Gamma
from .gaussian import Gaussian, MultivariateNormal
from .gig import GIG, SqrtGIG
from .laplace import LaplaceProduct
from .positive import Exponential, InverseGamma
from .rectified import GaussLaplace, RectifiedGaussian
from .simplex import Dirichlet

REGISTRY: dict[str, type[ExponentialFamily]] = {
    cls.__name__: cls
    for cls in (
        Gaussian,
        MultivariateNormal,
        Gamma,
        Beta,
        VonMises,
        RectifiedGaussian,
        LaplaceProduct,
        GaussLaplace,
        Exponential,
        InverseGamma,
        Dirichlet,
        Categorical,
        Bernoulli,
        Poisson,
        GIG,
        SqrtGIG,
    )
}


def get_family(name: str, **kwargs) -> ExponentialFamily:
    """Instantiate the built-in family called ``name`` (a key of ``REGISTRY``) with ``kwargs``."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown family {name!r}; known families: {', '.join(sorted(REGISTRY))}"
        ) from None
    return cls(**kwargs)


def resolve_family(reference: str | ExponentialFamily, kwargs: dict[str, Any] | None = None
                   ) -> ExponentialFamily:
    """A family from a reference: a family object (returned as it is), a built-in family's
    name (a key of ``REGISTRY``), or ``"package.module:attribute"`` naming an instance, a class
    or a factory (called with ``kwargs``). ValueError naming the reference when it fails."""
    kwargs = dict(kwargs or {})
    if isinstance(reference, ExponentialFamily):
        if kwargs:
            raise ValueError(f"{reference!r} is a family object; it takes no arguments")
        return reference
    if not isinstance(reference, str):
        raise TypeError(f"a family reference must be a family or a string, got "
                        f"{type(reference).__name__}")
    if ":" in reference:
        module_name, _, attribute = reference.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"family {reference!r}: cannot import it ({err})") from None
        if isinstance(obj, ExponentialFamily):
            if kwargs:
                raise ValueError(f"family {reference!r} is an instance; it takes no arguments")
        else:
            try:
                obj = obj(**kwargs)
            except TypeError as err:
                raise ValueError(f"family {reference!r}: bad arguments {kwargs}: {err}") from None
    else:
        if reference not in REGISTRY:
            raise ValueError(f"unknown family {reference!r}; known families: "
                             f"{', '.join(sorted(REGISTRY))} (or 'package.module:attribute')")
        try:
            obj = REGISTRY[reference](**kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"family {reference!r}: bad arguments {kwargs}: {err}") from None
    if not isinstance(obj, ExponentialFamily):
        raise ValueError(f"family {reference!r} did not give an ExponentialFamily (got "
                         f"{type(obj).__name__})")
    return obj


def family_from_description(description: dict) -> ExponentialFamily:
    """Rebuild a built-in family from ``family.describe()``; ValueError for any other family."""
    cls = REGISTRY.get(str(description.get("class", "")).rsplit(".", 1)[-1])
    kwargs = description.get("init_kwargs")
    if cls is None or kwargs is None:
        raise ValueError(
            f"family {description.get('name')!r} is not a built-in family that can be rebuilt "
            "from its description; pass the family object (family=...) or a "
            "'package.module:attribute' reference to it"
        )
    family = cls(**kwargs)
    if list(family.stat_labels) != list(description.get("stat_labels", [])):
        raise ValueError(
            f"rebuilt {family!r} has statistics {list(family.stat_labels)}, the record says "
            f"{description.get('stat_labels')}"
        )
    return family


__all__ = [
    "REGISTRY",
    "Bernoulli",
    "Beta",
    "Categorical",
    "Dirichlet",
    "Exponential",
    "GIG",
    "GaussLaplace",
    "Gamma",
    "Gaussian",
    "InverseGamma",
    "LaplaceProduct",
    "MultivariateNormal",
    "Poisson",
    "RectifiedGaussian",
    "SqrtGIG",
    "VonMises",
    "family_from_description",
    "get_family",
    "resolve_family",
]

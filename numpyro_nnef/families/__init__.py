"""Built-in exponential families, each with a closed-form log-partition and an exact sampler.

``REGISTRY`` maps class names to classes; ``get_family(name, **kwargs)`` builds one by name.
"""

from __future__ import annotations

from ..family import ExponentialFamily
from .circular import VonMises
from .gamma_beta import Beta, Gamma
from .gaussian import Gaussian, MultivariateNormal
from .laplace import LaplaceProduct
from .rectified import GaussLaplace, RectifiedGaussian

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


__all__ = [
    "REGISTRY",
    "Beta",
    "GaussLaplace",
    "Gamma",
    "Gaussian",
    "LaplaceProduct",
    "MultivariateNormal",
    "RectifiedGaussian",
    "VonMises",
    "get_family",
]

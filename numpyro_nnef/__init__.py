"""numpyro-nnef: unnamed exponential families, expectation oracles and CAVI for NumPyro."""

from . import families
from .family import ExponentialFamily, NaturalDomain, OutOfDomainError
from .oracles import Oracle

__version__ = "0.1.0"

__all__ = [
    "ExponentialFamily",
    "NaturalDomain",
    "OutOfDomainError",
    "Oracle",
    "families",
    "__version__",
]

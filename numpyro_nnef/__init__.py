"""numpyro-nnef: unnamed exponential families, expectation oracles and CAVI for NumPyro."""

from . import families
from .dataset import ExpectationDataset
from .distribution import EFDistribution
from .family import ExponentialFamily, NaturalDomain, OutOfDomainError, whole_space
from .oracles import ExactOracle, Oracle, QuadratureOracle
from .sampling import generate_dataset, run_nuts, sample_etas, sample_family

__version__ = "0.1.0"

__all__ = [
    "EFDistribution",
    "ExactOracle",
    "ExpectationDataset",
    "ExponentialFamily",
    "NaturalDomain",
    "Oracle",
    "OutOfDomainError",
    "QuadratureOracle",
    "families",
    "generate_dataset",
    "run_nuts",
    "sample_etas",
    "sample_family",
    "whole_space",
    "__version__",
]

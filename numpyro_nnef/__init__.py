"""numpyro-nnef: unnamed exponential families, expectation oracles and CAVI for NumPyro."""

from . import families
from .dataset import ExpectationDataset
from .distribution import EFDistribution
from .family import ExponentialFamily, NaturalDomain, OutOfDomainError, whole_space
from .infer import CAVI, CAVIGuide, CAVIResult, ELBOCheck, NonConjugateError, analyse_model
from .oracles import (
    ExactOracle,
    LogPartitionEstimate,
    NeuralOracle,
    Oracle,
    QuadratureOracle,
    estimate_log_partition,
    load_oracle,
)
from .samplers import FlowSampler, importance_dataset, load_flow_sampler, train_flow_sampler
from .sampling import generate_dataset, run_nuts, sample_etas, sample_family
from .training import TrainingReport, train_oracle

__version__ = "0.1.0"

__all__ = [
    "CAVI",
    "CAVIGuide",
    "CAVIResult",
    "ELBOCheck",
    "NonConjugateError",
    "analyse_model",
    "EFDistribution",
    "ExactOracle",
    "ExpectationDataset",
    "ExponentialFamily",
    "FlowSampler",
    "LogPartitionEstimate",
    "NaturalDomain",
    "NeuralOracle",
    "Oracle",
    "OutOfDomainError",
    "QuadratureOracle",
    "TrainingReport",
    "estimate_log_partition",
    "families",
    "generate_dataset",
    "importance_dataset",
    "load_flow_sampler",
    "load_oracle",
    "run_nuts",
    "sample_etas",
    "sample_family",
    "train_flow_sampler",
    "train_oracle",
    "whole_space",
    "__version__",
]

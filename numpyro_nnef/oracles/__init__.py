"""Expectation oracles: eta -> E[T], Cov[T], A(eta), and the inverse map."""

from .anchor import LogPartitionEstimate, estimate_log_partition
from .base import Oracle, map_over_batch, newton_natural_from_mean, trusted_domain
from .exact import ExactOracle
from .neural import NeuralOracle, Standardization, load_oracle
from .quadrature import QuadratureOracle

__all__ = ["ExactOracle", "LogPartitionEstimate", "NeuralOracle", "Oracle", "QuadratureOracle",
           "Standardization", "estimate_log_partition", "load_oracle", "map_over_batch",
           "newton_natural_from_mean", "trusted_domain"]

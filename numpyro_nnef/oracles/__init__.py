"""Expectation oracles: eta -> E[T], Cov[T], A(eta), and the inverse map."""

from .base import Oracle, map_over_batch, newton_natural_from_mean
from .exact import ExactOracle
from .quadrature import QuadratureOracle

__all__ = ["ExactOracle", "Oracle", "QuadratureOracle", "map_over_batch",
           "newton_natural_from_mean"]

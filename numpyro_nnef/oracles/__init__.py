"""Expectation oracles: eta -> E[T], Cov[T], A(eta), and the inverse map."""

from .base import Oracle, map_over_batch, newton_natural_from_mean

__all__ = ["Oracle", "map_over_batch", "newton_natural_from_mean"]

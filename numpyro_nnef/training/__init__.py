"""Training neural expectation oracles: protocols (one registry), losses and the trainer."""

from .losses import sobolev_loss, standardised_covariance, target_weights
from .protocols import PROTOCOLS, Protocol, get_protocol
from .trainer import TrainingReport, save_learning_curves, train_oracle, usable_points

__all__ = [
    "PROTOCOLS",
    "Protocol",
    "TrainingReport",
    "get_protocol",
    "save_learning_curves",
    "sobolev_loss",
    "standardised_covariance",
    "target_weights",
    "train_oracle",
    "usable_points",
]

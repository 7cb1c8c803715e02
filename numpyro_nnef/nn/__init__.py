"""Network architectures (Flax NNX) for neural expectation oracles: eta -> E[T | eta]."""

from numpyro_nnef.nn.architectures import (
    ARCHITECTURES,
    GLU,
    MLP,
    DirectNetwork,
    ExpectationNetwork,
    GLULayer,
    GradientNetwork,
    LayerStack,
    LogZICNN,
    LogZMLP,
    Quadratic,
    QuadraticLayer,
    build_network,
)
from numpyro_nnef.nn.base import ACTIVATIONS, ConfiguredModule

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "ConfiguredModule",
    "GLU",
    "MLP",
    "DirectNetwork",
    "ExpectationNetwork",
    "GLULayer",
    "GradientNetwork",
    "LayerStack",
    "LogZICNN",
    "LogZMLP",
    "Quadratic",
    "QuadraticLayer",
    "build_network",
]

"""Network architectures (Flax NNX) for neural expectation oracles: eta -> E[T | eta]."""

from numpyro_nnef.nn.architectures import (
    ACTIVATIONS,
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

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
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

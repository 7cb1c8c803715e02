"""Network architectures (Flax NNX) for neural expectation oracles: eta -> E[T | eta]."""

from numpyro_nnef.nn.architectures import (
    ARCHITECTURES,
    GLU,
    MLP,
    Anchor,
    DirectNetwork,
    ExpectationNetwork,
    GeometricFlow,
    Glow,
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
from numpyro_nnef.nn.flows import (
    FLOW_ARCHITECTURES,
    FlowField,
    build_flow_field,
    time_embedding,
)

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "ConfiguredModule",
    "GLU",
    "MLP",
    "Anchor",
    "DirectNetwork",
    "ExpectationNetwork",
    "GeometricFlow",
    "GLULayer",
    "Glow",
    "GradientNetwork",
    "LayerStack",
    "LogZICNN",
    "LogZMLP",
    "Quadratic",
    "QuadraticLayer",
    "build_network",
    "FLOW_ARCHITECTURES",
    "FlowField",
    "build_flow_field",
    "time_embedding",
]

"""Network architectures (Flax NNX): neural expectation oracles eta -> E[T | eta] and
conditional normalizing flows x | eta (``bijections``)."""

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
from numpyro_nnef.nn.bijections import (
    FLOW_SAMPLER_ARCHITECTURES,
    ConditionalFlow,
    build_conditional_flow,
)
from numpyro_nnef.nn.flows import (
    FLOW_ARCHITECTURES,
    FlowField,
    build_flow_field,
    time_embedding,
)

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "ConditionalFlow",
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
    "FLOW_SAMPLER_ARCHITECTURES",
    "FlowField",
    "build_conditional_flow",
    "build_flow_field",
    "time_embedding",
]

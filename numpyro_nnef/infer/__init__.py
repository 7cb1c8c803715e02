"""Inference: conjugacy analysis of NumPyro models, complete conditionals, the pure CAVI kernel
and the SVI-shaped CAVI wrapper."""

from .cavi import CAVI, CAVIGuide, CAVIResult, ELBOCheck, monte_carlo_elbo
from .conditional import CompleteConditional, complete_conditionals
from .conjugacy import ConjugateModel, LatentSite, analyse_model
from .interpreter import NonConjugateError
from .kernel import CAVIKernel, CAVIState, cavi_kernel

__all__ = ["CAVI", "CAVIGuide", "CAVIKernel", "CAVIResult", "CAVIState", "CompleteConditional",
           "ConjugateModel", "ELBOCheck", "LatentSite", "NonConjugateError", "analyse_model",
           "cavi_kernel", "complete_conditionals", "monte_carlo_elbo"]

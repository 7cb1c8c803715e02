"""Inference: conjugacy analysis of NumPyro models and mean-field CAVI."""

from .cavi import CAVI, CAVIGuide, CAVIResult, CAVIState, ELBOCheck, monte_carlo_elbo
from .conjugacy import ConjugateModel, LatentSite, analyse_model
from .interpreter import NonConjugateError

__all__ = ["CAVI", "CAVIGuide", "CAVIResult", "CAVIState", "ConjugateModel", "ELBOCheck",
           "LatentSite", "NonConjugateError", "analyse_model", "monte_carlo_elbo"]

"""Loss ingredients shared by every training protocol, in standardised coordinates.

- heteroscedastic weights w_ij proportional to 1 / MCSE_ij^2 (the inverse noise variance of each
  target), clipped to a factor ``max_ratio`` around their median and normalised to mean 1 per
  statistic, so that precise points count more without a few points dominating;
- the Sobolev term ||d mu_hat / d eta - Cov[T]||^2, matching the network's Jacobian to the
  dataset's covariance (Cov[T] = d E[T] / d eta).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
WEIGHTINGS = ("mcse", "none")


def target_weights(mcse_std: np.ndarray, weighting: str = "mcse", max_ratio: float = 100.0
                   ) -> np.ndarray:
    """Per-target weights (N, D), mean 1 per statistic: 1 / MCSE^2 (``"mcse"``) or ones."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    mcse_std = np.asarray(mcse_std, dtype=np.float64)
    if weighting == "none":
        return np.ones_like(mcse_std)
    variance = np.maximum(mcse_std, 1e-300) ** 2
    raw = np.median(variance, axis=0) / variance
    raw = np.clip(raw, 1.0 / max_ratio, max_ratio)
    return raw / raw.mean(axis=0)


def standardised_covariance(cov: np.ndarray, eta_scale: np.ndarray, mean_scale: np.ndarray
                            ) -> np.ndarray:
    """d s_mu / d s_eta = diag(1/mean_scale) Cov diag(eta_scale), the Jacobian target in
    standardised coordinates."""
    return cov / mean_scale[:, None] * eta_scale[None, :]


def sobolev_loss(predict: Callable[[Array], Array], eta: Array, jacobian_target: Array) -> Array:
    """Mean over the batch and entries of (d predict / d eta - target)^2."""
    jac = jax.vmap(jax.jacfwd(predict))(eta)
    return jnp.mean((jac - jacobian_target) ** 2)

"""Conditional flows: exact inverses, log-determinants against jax.jacfwd, the per-condition
split (condition / forward_given) against the direct maps, spline tails."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from numpyro_nnef.nn.bijections import (
    FLOW_SAMPLER_ARCHITECTURES,
    ActNorm,
    SplineCoupling,
    build_conditional_flow,
    rational_quadratic_spline,
)

SMALL = {"num_layers": 2, "hidden": (8,)}
COND_DIM = 2


def random_module(make, seed: int, scale: float = 0.5) -> nnx.Module:
    """``make()`` with every parameter drawn from scale * N(0, 1) (numpy: no compilation)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    rng = np.random.default_rng(seed)
    values = [jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype) for leaf in leaves]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(FLOW_SAMPLER_ARCHITECTURES))
def test_inverse_and_log_det(name, dim):
    flow = random_module(
        lambda: build_conditional_flow(name, dim, COND_DIM, rngs=nnx.Rngs(0), **SMALL), dim)
    graphdef, state = nnx.split(flow)
    rng = np.random.default_rng(10 + dim)
    z, c = jnp.asarray(1.5 * rng.standard_normal(dim)), jnp.asarray(rng.standard_normal(COND_DIM))

    @jax.jit
    def check(state, z, c):
        f = nnx.merge(graphdef, state)
        x, log_det = f.forward(z, c)
        z_back, log_det_inverse = f.inverse(x, c)
        jacobian = jax.jacfwd(lambda v: f.forward(v, c)[0])(z)
        # many draws at one condition: the c-only part computed once, then per draw
        context = f.condition(c)
        draws = jnp.stack([z, 0.5 * z[::-1] - 0.3])
        given = jax.vmap(lambda v: f.forward_given(v, context))(draws)
        direct = jax.vmap(lambda v: f.forward(v, c))(draws)
        back = jax.vmap(lambda v: f.inverse_given(v, context))(given[0])
        return (x, z_back, log_det, log_det_inverse, jnp.linalg.slogdet(jacobian)[1],
                (draws, given, direct, back))

    x, z_back, log_det, log_det_inverse, expected, (draws, given, direct, back) = check(
        state, z, c)
    for a, b in zip(given, direct, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-12, rtol=0)
    np.testing.assert_allclose(back[0], draws, atol=1e-10, rtol=0)
    np.testing.assert_allclose(back[1], -given[1], atol=1e-10, rtol=0)
    assert z.dtype == x.dtype == jnp.float64
    assert np.max(np.abs(np.asarray(x - z))) > 1e-3  # the random flow is not the identity
    np.testing.assert_allclose(z_back, z, atol=1e-10, rtol=0)
    np.testing.assert_allclose(log_det, expected, atol=1e-10, rtol=0)
    # log|det dz/dx| at x = g(z) is -log|det dx/dz| (the inverse has its own code path)
    np.testing.assert_allclose(log_det_inverse, -expected, atol=1e-10, rtol=0)


def test_flow_rebuilds_from_config():
    config = nnx.eval_shape(
        lambda: build_conditional_flow("nsf", 2, COND_DIM, rngs=nnx.Rngs(0), num_bins=4)).config
    rebuilt = nnx.eval_shape(lambda: build_conditional_flow(
        config["name"], config["dim"], config["cond_dim"], rngs=nnx.Rngs(1),
        **config["hyperparameters"]))
    assert rebuilt.config == config
    assert config["hyperparameters"]["num_bins"] == 4
    with pytest.raises(ValueError, match="unknown flow sampler architecture"):
        build_conditional_flow("nope", 2, COND_DIM, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        build_conditional_flow("maf", 2, COND_DIM, rngs=nnx.Rngs(0), num_bins=4)


def test_spline_is_identity_outside_the_tail_bound():
    bound, bins = 2.0, 5
    options = {"tail_bound": bound, "min_bin_width": 1e-3, "min_bin_height": 1e-3,
               "min_derivative": 1e-3}
    layer = random_module(lambda: SplineCoupling(1, COND_DIM, 0, (8,), "tanh", num_bins=bins,
                                                 rngs=nnx.Rngs(0), **options), 3, scale=1.0)
    graphdef, state = nnx.split(layer)
    values = jnp.array([-7.5, -bound - 1e-9, bound + 1e-9, 4.0, 0.5, -1.0])
    theta = jnp.asarray(np.random.default_rng(4).standard_normal((2, 3 * bins - 1)))
    edges = jnp.array([-bound, bound])

    @jax.jit
    def run(state, values):
        f = nnx.merge(graphdef, state)
        c = jnp.array([0.3, -0.7])
        forward = jax.vmap(lambda v: f.forward(v[None], c))(values)
        inverse = jax.vmap(lambda v: f.inverse(v[None], c))(values)
        at_edges = rational_quadratic_spline(edges, theta[:, :bins], theta[:, bins:2 * bins],
                                             theta[:, 2 * bins:], inverse=False, **options)
        return forward, inverse, at_edges

    (x, log_det), (back, log_det_inverse), (out, log_d) = run(state, values)
    outside = np.abs(np.asarray(values)) > bound
    np.testing.assert_array_equal(x[outside, 0], values[outside])
    np.testing.assert_array_equal(back[outside, 0], values[outside])
    np.testing.assert_array_equal(log_det[outside], 0.0)
    np.testing.assert_array_equal(log_det_inverse[outside], 0.0)
    assert np.all(np.abs(x[~outside, 0] - values[~outside]) > 1e-3)  # interior points move
    # continuity at the boundary: the spline maps +-B to +-B with derivative 1
    np.testing.assert_allclose(out, edges, atol=1e-12)
    np.testing.assert_allclose(log_d, 0.0, atol=1e-12)


def test_actnorm_data_dependent_initialisation():
    flow = random_module(
        lambda: build_conditional_flow("glow", 2, COND_DIM, rngs=nnx.Rngs(0), **SMALL), 5)
    rng = np.random.default_rng(0)
    z = jnp.asarray(3.0 + 2.0 * rng.standard_normal((400, 2)))
    c = jnp.asarray(rng.standard_normal((400, COND_DIM)))
    flow.initialize(z, c)
    for layer in flow.layers:  # every ActNorm now outputs standardised activations
        if isinstance(layer, ActNorm):
            out, _ = jax.vmap(layer.forward)(z, c)
            np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-10)
            np.testing.assert_allclose(out.std(0), 1.0, atol=1e-5)
        z, _ = jax.vmap(layer.forward)(z, c)

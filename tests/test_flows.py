"""Conditional flow fields f(z, t, eta) for the flow protocols (numpyro_nnef.nn.flows)."""

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from numpyro_nnef.nn import FLOW_ARCHITECTURES, build_flow_field, time_embedding

DIM = 3
N = 8  # rows per batch: one shape, so fields of one config share their jit compilations
NAMES = sorted(FLOW_ARCHITECTURES)
POTENTIAL = ["convex_potential_flow", "potential_flow"]
MATRIX = ["geometric_flow", "natural_flow"]
SMALL = {"width": 8, "depth": 2, "time_features": 2}
TRANSFORMS = {
    "value": lambda f: f,
    "grad": jax.grad,
    "hessian": jax.hessian,
    "jacobian_of_jacobian": lambda f: jax.jacfwd(jax.jacrev(f)),
}


def _field(name, dim=DIM, eta_dim=DIM, seed=0, **hp):
    return build_flow_field(name, dim=dim, eta_dim=eta_dim, rngs=nnx.Rngs(seed), **{**SMALL, **hp})


@partial(jax.jit, static_argnums=(0, 1, 2))
def _run(graphdef, method, transform, state, z, t, eta):
    fn = getattr(nnx.merge(graphdef, state), method)
    return jax.vmap(TRANSFORMS[transform](fn))(z, t, eta)


def _batched(field, method="__call__", transform="value"):
    """vmap of ``transform(field.<method>)`` over (z, t, eta) rows, under one jit through
    nnx.split / nnx.merge (as the trainer runs it); fields of one config share the compilation."""
    graphdef, state = nnx.split(field)
    return lambda z, t, eta: _run(graphdef, method, transform, state, z, t, eta)


def _inputs(n=N, dim=DIM, eta_dim=DIM, seed=1, scale=1.0):
    kz, kt, ke = jax.random.split(jax.random.key(seed), 3)
    z = scale * jax.random.normal(kz, (n, dim))
    t = jax.random.uniform(kt, (n,))
    eta = scale * jax.random.normal(ke, (n, eta_dim))
    return z, t, eta


def test_registry_contents():
    assert set(NAMES) == {
        "potential_flow", "geometric_flow", "natural_flow", "convex_potential_flow",
        "conditional_resnet_mlp", "convex_conditional_resnet", "bilinear_conditional_resnet",
    }
    assert {n for n in NAMES if FLOW_ARCHITECTURES[n].square} == set(MATRIX)
    for name in NAMES:
        hp = FLOW_ARCHITECTURES[name].defaults
        assert (hp["width"], hp["depth"], hp["activation"]) == (64, 2, "silu")


def test_time_embedding():
    t = 0.25
    angles = np.pi * np.array([1.0, 2.0]) * t
    expected = [t, *np.sin(angles), *np.cos(angles)]
    np.testing.assert_allclose(time_embedding(t, 2), expected, rtol=1e-12)
    np.testing.assert_allclose(time_embedding(jnp.asarray(0.5), 0), [0.5])


@pytest.mark.parametrize("name", NAMES)
def test_shapes_vmap_jit_and_gradients(name):
    field = _field(name)
    z, t, eta = _inputs()
    out = _batched(field)(z, t, eta)
    assert out.shape == (N, DIM)
    assert jnp.all(jnp.isfinite(out))
    single = jax.jit(field)  # one example, closing over the module
    for i in (0, N - 1):  # vmap == per example
        assert single(z[i], t[i], eta[i]).shape == (DIM,)
        np.testing.assert_allclose(out[i], single(z[i], t[i], eta[i]), rtol=1e-10, atol=1e-12)
    # the output moves with each input (no input is ignored)
    for args in ((z[1], t[0], eta[0]), (z[0], t[1], eta[0]), (z[0], t[0], eta[1])):
        assert not np.allclose(single(*args), out[0])
    # every nnx.Param gets a finite, nonzero gradient (no dead weights)
    graphdef, params, rest = nnx.split(field, nnx.Param, ...)

    @jax.jit
    def loss(p):
        return jnp.sum(jax.vmap(nnx.merge(graphdef, p, rest))(z, t, eta) ** 2)

    grads = jax.tree.leaves(jax.grad(loss)(params))
    assert len(grads) == len(jax.tree.leaves(params)) > 0
    assert all(jnp.all(jnp.isfinite(g)) and jnp.any(g != 0) for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name):
    field = _field(name, seed=3)
    cfg = json.loads(json.dumps(field.config))
    assert cfg["name"] == name and cfg["dim"] == DIM and cfg["eta_dim"] == DIM
    hp = cfg["hyperparameters"]
    assert {k: hp[k] for k in SMALL} == SMALL and hp["activation"] == "silu"
    assert hp == {**FLOW_ARCHITECTURES[name].defaults, **SMALL}
    rebuilt = build_flow_field(
        cfg["name"], dim=cfg["dim"], eta_dim=cfg["eta_dim"], rngs=nnx.Rngs(3), **hp
    )
    other = build_flow_field(name, dim=DIM, eta_dim=DIM, rngs=nnx.Rngs(4), **hp)
    z, t, eta = _inputs()
    out = _batched(field)(z, t, eta)
    np.testing.assert_array_equal(_batched(rebuilt)(z, t, eta), out)
    assert not np.allclose(_batched(other)(z, t, eta), out)


@pytest.mark.parametrize("name", POTENTIAL)
def test_potential_fields_are_minus_gradients(name):
    field = _field(name)
    z, t, eta = _inputs(seed=2)
    v = _batched(field)(z, t, eta)
    pot = _batched(field, "potential")
    assert pot(z, t, eta).shape == (N,)
    np.testing.assert_allclose(v, -_batched(field, "potential", "grad")(z, t, eta), rtol=1e-12)
    h = 1e-5  # central differences of the potential
    fd = [(pot(z + h * e, t, eta) - pot(z - h * e, t, eta)) / (2 * h) for e in jnp.eye(DIM)]
    np.testing.assert_allclose(v, -np.stack(fd, axis=1), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", MATRIX)
def test_matrix_fields_are_psd_matrix_times_eta(name):
    field = _field(name)
    z, t, eta = _inputs(seed=3, scale=2.0)
    mats = _batched(field, "matrix")(z, t, eta)
    assert mats.shape == (N, DIM, DIM)
    np.testing.assert_allclose(mats, jnp.swapaxes(mats, -1, -2), atol=1e-12)
    floor = field.eps if name == "geometric_flow" else 0.0
    assert jnp.linalg.eigvalsh(mats).min() >= floor - 1e-10
    np.testing.assert_allclose(
        _batched(field)(z, t, eta), jnp.einsum("nij,nj->ni", mats, eta), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("name", MATRIX)
def test_matrix_fields_are_bounded_in_z(name):
    """Sigma sees z through a soft clip: the field stays bounded as |z| grows (no blow-up of
    the probability-flow ODE, which gave NaN in the df protocol)."""
    field = _field(name)
    z, t, eta = _inputs(seed=5)
    # at these scales every entry of z is saturated: the field has reached its bound
    norms = [jnp.abs(_batched(field)(s * z, t, eta)).max() for s in (1e8, 1e12)]
    assert np.all(np.isfinite(norms))
    np.testing.assert_allclose(norms[1], norms[0], rtol=1e-6)


def test_geometric_eps_and_natural_rank():
    z, t, eta = _inputs(seed=4)
    geo = _field("geometric_flow", eps=0.5)
    assert jnp.linalg.eigvalsh(_batched(geo, "matrix")(z, t, eta)).min() >= 0.5 - 1e-10
    assert _field("natural_flow").rank == DIM  # rank=None means dim
    nat = _field("natural_flow", rank=1)
    assert _batched(nat, "factor")(z, t, eta).shape == (N, DIM, 1)
    eig = jnp.linalg.eigvalsh(_batched(nat, "matrix")(z, t, eta))
    np.testing.assert_allclose(eig[:, :-1], 0.0, atol=1e-10)  # rank one
    assert eig[:, -1].min() > 1e-8


def test_convex_potential_is_convex_in_z():
    z, t, eta = _inputs(100, seed=5, scale=3.0)
    field = _field("convex_potential_flow")
    # switch off the 0.5 softplus(q(u)) |z|^2 term so that the ICNN part alone is checked
    field.curvature.kernel[...] = 0.0
    field.curvature.bias[...] = -100.0
    eig = jnp.linalg.eigvalsh(_batched(field, "potential", "hessian")(z, t, eta))
    assert eig.min() >= -1e-10
    assert eig.max() > 1e-4  # genuinely curved, not affine
    # control: the same check finds non-convexity in the unconstrained potential
    free = _field("potential_flow")
    assert jnp.linalg.eigvalsh(_batched(free, "potential", "hessian")(z, t, eta)).min() < -1e-6
    # convexity along segments: V((1 - s) a + s b) <= (1 - s) V(a) + s V(b)
    pot = _batched(field, "potential")
    a, b, t, eta = z[:50], z[50:], t[:50], eta[:50]
    for s in np.linspace(0.0, 1.0, 6):
        lhs = pot((1 - s) * a + s * b, t, eta)
        assert jnp.all(lhs <= (1 - s) * pot(a, t, eta) + s * pot(b, t, eta) + 1e-10)


def test_convex_resnet_coordinates_are_convex_in_z():
    z, t, eta = _inputs(100, seed=6, scale=3.0)
    field = _field("convex_conditional_resnet")
    hess = _batched(field, transform="jacobian_of_jacobian")(z, t, eta)  # (n, out, dim, dim)
    assert hess.shape == (100, DIM, DIM, DIM)
    eig = jnp.linalg.eigvalsh(hess)
    assert eig.min() >= -1e-10
    assert eig.max() > 1e-4  # genuinely curved, not affine
    # control: an unconstrained field has coordinates with negative curvature
    free = _field("conditional_resnet_mlp")
    free_hess = _batched(free, transform="jacobian_of_jacobian")(z, t, eta)
    assert jnp.linalg.eigvalsh(free_hess).min() < -1e-6


def test_errors():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="unknown flow architecture 'nope'.*potential_flow"):
        build_flow_field("nope", dim=2, eta_dim=2, rngs=rngs)
    for name in NAMES:
        with pytest.raises(ValueError, match="unknown hyperparameters.*'widht'"):
            build_flow_field(name, dim=2, eta_dim=2, rngs=rngs, widht=3)
        for bad in ({"width": 0}, {"depth": 0}, {"time_features": -1}, {"activation": "nope"}):
            with pytest.raises(ValueError, match="must be >= |unknown activation"):
                build_flow_field(name, dim=2, eta_dim=2, rngs=rngs, **bad)
        with pytest.raises(ValueError, match="dimensions must be >= 1"):
            build_flow_field(name, dim=0, eta_dim=2, rngs=rngs)
    for name in MATRIX:
        with pytest.raises(ValueError, match="dim == eta_dim"):
            build_flow_field(name, dim=2, eta_dim=3, rngs=rngs)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        build_flow_field("geometric_flow", dim=2, eta_dim=2, rngs=rngs, eps=-1.0)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        build_flow_field("natural_flow", dim=2, eta_dim=2, rngs=rngs, rank=0)
    field = _field("conditional_resnet_mlp")
    z, t, eta = jnp.zeros(DIM), 0.5, jnp.zeros(DIM)
    for args in ((jnp.zeros(2), t, eta), (z, jnp.zeros(1), eta), (z, t, jnp.zeros(2)),
                 (jnp.zeros((4, DIM)), t, eta)):
        with pytest.raises(ValueError, match="acts on one example"):
            field(*args)
    with pytest.raises(ValueError, match="acts on one example"):
        _field("potential_flow").potential(jnp.zeros(2), t, eta)

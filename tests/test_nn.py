"""Network architectures for neural expectation oracles (numpyro_nnef.nn)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from numpyro_nnef.nn import ARCHITECTURES, build_network

ETA_DIM = 3
NAMES = sorted(ARCHITECTURES)
GRADIENT = [n for n in NAMES if ARCHITECTURES[n].kind == "gradient"]
DIRECT = [n for n in NAMES if ARCHITECTURES[n].kind == "direct"]
SMALL = {"hidden": (16, 16)}


def _net(name, eta_dim=ETA_DIM, stat_dim=None, seed=0, **hp):
    stat_dim = eta_dim if stat_dim is None else stat_dim
    return build_network(
        name, eta_dim=eta_dim, stat_dim=stat_dim, rngs=nnx.Rngs(seed), **{**SMALL, **hp}
    )


def test_registry_contents():
    assert set(NAMES) == {"mlp", "glu", "quadratic", "logz_mlp", "logz_icnn"}
    assert set(DIRECT) == {"mlp", "glu", "quadratic"}
    assert set(GRADIENT) == {"logz_mlp", "logz_icnn"}


@pytest.mark.parametrize("name", NAMES)
def test_defaults_and_config(name):
    net = build_network(name, eta_dim=2, stat_dim=2, rngs=nnx.Rngs(0))
    cfg = json.loads(json.dumps(net.config))
    assert cfg["name"] == name and cfg["eta_dim"] == 2 and cfg["stat_dim"] == 2
    assert cfg["hyperparameters"]["hidden"] == [64, 64]
    rebuilt = build_network(
        cfg["name"],
        eta_dim=cfg["eta_dim"],
        stat_dim=cfg["stat_dim"],
        rngs=nnx.Rngs(0),
        **cfg["hyperparameters"],
    )
    eta = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)
    np.testing.assert_allclose(rebuilt(eta), net(eta))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch", [(), (5,), (2, 3)])
def test_shapes_and_covariance_is_jacobian(name, batch):
    stat_dim = ETA_DIM if name in GRADIENT else 2
    net = _net(name, stat_dim=stat_dim)
    eta = jax.random.normal(jax.random.key(1), batch + (ETA_DIM,))
    mean = net(eta)
    cov = net.covariance(eta)
    assert mean.shape == batch + (stat_dim,)
    assert cov.shape == batch + (stat_dim, ETA_DIM)
    if batch == (2, 3):  # covariance == jacfwd of the mean, per example
        jac = jax.vmap(jax.jacfwd(net))(eta.reshape(-1, ETA_DIM)).reshape(cov.shape)
        np.testing.assert_allclose(cov, jac, rtol=1e-6, atol=1e-9)
    if batch == (5,):  # batched == per-example
        np.testing.assert_allclose(mean[2], net(eta[2]), rtol=1e-12)


@pytest.mark.parametrize("name", GRADIENT)
def test_gradient_nets_mean_is_grad_log_partition(name):
    net = _net(name)
    eta = jax.random.normal(jax.random.key(2), (2, 4, ETA_DIM))
    logz = net.log_partition(eta)
    assert logz.shape == (2, 4)
    grad = jax.grad(lambda e: net.log_partition(e).sum())(eta)
    np.testing.assert_allclose(net(eta), grad, rtol=1e-10, atol=1e-12)
    cov = net.covariance(eta)
    np.testing.assert_allclose(cov, jnp.swapaxes(cov, -1, -2), atol=1e-10)


@pytest.mark.parametrize("name", DIRECT)
def test_direct_nets_have_no_log_partition(name):
    with pytest.raises(TypeError, match="log-partition"):
        _net(name).log_partition(jnp.zeros(ETA_DIM))


def test_icnn_hessian_psd_and_convex_along_segments():
    net = _net("logz_icnn", hidden=(16, 16, 16), eps=0.0)
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    eta = 3.0 * jax.random.normal(k1, (200, ETA_DIM))
    eig = jnp.linalg.eigvalsh(net.covariance(eta))
    assert eig.min() >= -1e-10
    # convexity: A((1-t) a + t b) <= (1-t) A(a) + t A(b)
    a = 3.0 * jax.random.normal(k2, (200, 1, ETA_DIM))
    b = 3.0 * jax.random.normal(k3, (200, 1, ETA_DIM))
    t = jnp.linspace(0.0, 1.0, 11)[:, None]
    lhs = net.log_partition((1 - t) * a + t * b)
    rhs = (1 - t[:, 0]) * net.log_partition(a) + t[:, 0] * net.log_partition(b)
    assert jnp.all(lhs <= rhs + 1e-10)


def test_icnn_eps_makes_strictly_convex():
    eps = 0.1
    net = _net("logz_icnn", eps=eps)
    eta = jax.random.normal(jax.random.key(4), (50, ETA_DIM))
    assert jnp.linalg.eigvalsh(net.covariance(eta)).min() >= eps - 1e-10


def test_errors():
    with pytest.raises(ValueError, match="unknown architecture 'nope'.*logz_icnn"):
        build_network("nope", eta_dim=2, stat_dim=2, rngs=nnx.Rngs(0))
    for name in GRADIENT:
        with pytest.raises(ValueError, match="stat_dim == eta_dim"):
            build_network(name, eta_dim=2, stat_dim=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        build_network("mlp", eta_dim=2, stat_dim=2, rngs=nnx.Rngs(0), widht=3)
    with pytest.raises(ValueError, match="unknown activation"):
        build_network("mlp", eta_dim=2, stat_dim=2, rngs=nnx.Rngs(0), activation="nope")
    with pytest.raises(ValueError, match="eta must have shape"):
        _net("mlp")(jnp.zeros((4, ETA_DIM + 1)))


@pytest.mark.parametrize("name", NAMES)
def test_jit(name):
    net = _net(name)
    eta = jax.random.normal(jax.random.key(5), (4, ETA_DIM))
    out = nnx.jit(lambda m, e: m.covariance(e))(net, eta)
    np.testing.assert_allclose(out, net.covariance(eta), rtol=1e-10, atol=1e-12)
    graphdef, state = nnx.split(net)
    out = jax.jit(lambda s, e: nnx.merge(graphdef, s)(e))(state, eta)
    np.testing.assert_allclose(out, net(eta), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "logz_icnn"])
def test_tiny_fit(name):
    """200 adam steps on eta -> 2 eta (the Gaussian-like map grad |eta|^2) cut the loss 10x."""
    net = _net(name, eta_dim=2, hidden=(32, 32))
    eta = jax.random.normal(jax.random.key(6), (128, 2))
    target = 2.0 * eta
    graphdef, params = nnx.split(net)

    def loss_fn(p):
        return jnp.mean((nnx.merge(graphdef, p)(eta) - target) ** 2)

    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    loss0 = loss_fn(params)
    for _ in range(200):
        params, opt_state, _ = step(params, opt_state)
    assert loss_fn(params) < loss0 / 10

"""Network architectures for neural expectation oracles (numpyro_nnef.nn)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from numpyro_nnef.nn import ARCHITECTURES, Anchor, build_network

ETA_DIM = 3
NAMES = sorted(ARCHITECTURES)
GRADIENT = [n for n in NAMES if ARCHITECTURES[n].kind == "gradient"]
DIRECT = [n for n in NAMES if ARCHITECTURES[n].kind == "direct"]
SQUARE = [*GRADIENT, "geometric_flow"]  # architectures that need stat_dim == eta_dim
SMALL = {"hidden": (16, 16)}
BATCH = (2, 3)  # one shared batch shape, so equal networks reuse their compiled functions


def _net(name, eta_dim=ETA_DIM, stat_dim=None, seed=0, **hp):
    stat_dim = eta_dim if stat_dim is None else stat_dim
    return build_network(
        name, eta_dim=eta_dim, stat_dim=stat_dim, rngs=nnx.Rngs(seed), **{**SMALL, **hp}
    )


def _eta(seed):
    return jax.random.normal(jax.random.key(seed), BATCH + (ETA_DIM,))


def test_registry_contents():
    assert set(NAMES) == {
        "mlp", "glu", "quadratic", "glow", "geometric_flow", "logz_mlp", "logz_icnn"
    }
    assert set(DIRECT) == {"mlp", "glu", "quadratic", "glow", "geometric_flow"}
    assert set(GRADIENT) == {"logz_mlp", "logz_icnn"}


@pytest.mark.parametrize("name", NAMES)
def test_defaults_and_config(name):
    """The JSON config rebuilds the same graph (static attributes) and, with the same seed,
    the same weights."""
    net = build_network(name, eta_dim=2, stat_dim=2, rngs=nnx.Rngs(0))
    cfg = json.loads(json.dumps(net.config))
    assert cfg["name"] == name and cfg["eta_dim"] == 2 and cfg["stat_dim"] == 2
    assert cfg["hyperparameters"] == json.loads(json.dumps(ARCHITECTURES[name].defaults))
    rebuilt = build_network(
        cfg["name"],
        eta_dim=cfg["eta_dim"],
        stat_dim=cfg["stat_dim"],
        rngs=nnx.Rngs(0),
        **cfg["hyperparameters"],
    )
    graphdef, state = nnx.split(net)
    rebuilt_graphdef, rebuilt_state = nnx.split(rebuilt)
    assert rebuilt_graphdef == graphdef
    jax.tree.map(np.testing.assert_array_equal, rebuilt_state, state)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_covariance_is_jacobian(name):
    stat_dim = ETA_DIM if name in SQUARE else 2
    net = _net(name, stat_dim=stat_dim)
    eta = _eta(1)
    mean, cov = net(eta), net.covariance(eta)
    assert mean.shape == BATCH + (stat_dim,)
    assert cov.shape == BATCH + (stat_dim, ETA_DIM)
    # one eta without batch dimensions == its entry in the batch
    np.testing.assert_allclose(net(eta[1, 2]), mean[1, 2], rtol=1e-12)
    # covariance == d mean / d eta: central differences
    h = 1e-5
    for j, step in enumerate(h * jnp.eye(ETA_DIM)):
        fd = (net(eta + step) - net(eta - step)) / (2 * h)
        np.testing.assert_allclose(cov[..., j], fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", GRADIENT)
def test_gradient_nets_mean_is_grad_log_partition(name):
    net = _net(name)
    eta = _eta(2)
    logz = net.log_partition(eta)
    assert logz.shape == BATCH
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
    t = jnp.linspace(0.0, 1.0, 11)
    lhs = net.log_partition((1 - t[:, None]) * a + t[:, None] * b)  # (200, 11); t = 0, 1 exact
    rhs = (1 - t) * lhs[:, :1] + t * lhs[:, -1:]
    assert jnp.all(lhs <= rhs + 1e-10)


def test_icnn_eps_makes_strictly_convex():
    eps = 0.1
    net = _net("logz_icnn", eps=eps)
    eta = 3.0 * _eta(4)
    assert jnp.linalg.eigvalsh(net.covariance(eta)).min() >= eps - 1e-10


def test_errors():
    with pytest.raises(ValueError, match="unknown architecture 'nope'.*logz_icnn"):
        build_network("nope", eta_dim=2, stat_dim=2, rngs=nnx.Rngs(0))
    for name in SQUARE:
        with pytest.raises(ValueError, match="stat_dim == eta_dim"):
            build_network(name, eta_dim=2, stat_dim=3, rngs=nnx.Rngs(0))
    for hp, match in [
        ({"width": 5}, "width must be even"),
        ({"width": 2}, "width must be even and >= eta_dim=3"),
        ({"num_layers": 0}, "num_layers >= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            _net("glow", **hp)
    with pytest.raises(ValueError, match="quadrature_order"):
        _net("geometric_flow", quadrature_order=0)
    with pytest.raises(ValueError, match="eps"):
        _net("geometric_flow", eps=-1.0)
    with pytest.raises(ValueError, match="set_anchor needs"):
        _net("geometric_flow").set_anchor(jnp.zeros(ETA_DIM), jnp.zeros(ETA_DIM + 1))
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        build_network("mlp", eta_dim=2, stat_dim=2, rngs=nnx.Rngs(0), widht=3)
    with pytest.raises(ValueError, match="unknown activation"):
        build_network("mlp", eta_dim=2, stat_dim=2, rngs=nnx.Rngs(0), activation="nope")
    with pytest.raises(ValueError, match="eta must have shape"):
        _net("mlp")(jnp.zeros((4, ETA_DIM + 1)))


@pytest.mark.parametrize("name", NAMES)
def test_jit(name):
    net = _net(name)
    eta = _eta(5)
    out = nnx.jit(lambda m, e: m.covariance(e))(net, eta)
    np.testing.assert_allclose(out, net.covariance(eta), rtol=1e-10, atol=1e-12)
    graphdef, state = nnx.split(net)
    out = jax.jit(lambda s, e: nnx.merge(graphdef, s)(e))(state, eta)
    np.testing.assert_allclose(out, net(eta), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "logz_icnn", "glow", "geometric_flow"])
def test_tiny_fit(name):
    """200 adam steps on eta -> 2 eta (the Gaussian-like map grad |eta|^2) cut the loss 10x."""
    net = _net(name, eta_dim=2, hidden=(32, 32))
    eta = jax.random.normal(jax.random.key(6), (128, 2))
    target = 2.0 * eta
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)

    def loss_fn(p):
        return jnp.mean((nnx.merge(graphdef, p, rest)(eta) - target) ** 2)

    opt = optax.adam(1e-2)

    @jax.jit
    def train(p):
        def step(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            updates, s = opt.update(g, s, p)
            return (optax.apply_updates(p, updates), s), loss

        (p, _), losses = jax.lax.scan(step, (p, opt.init(p)), length=200)
        return losses[0], loss_fn(p)

    loss0, loss = train(params)
    assert loss < loss0 / 10


@pytest.mark.parametrize("name", ["glow", "geometric_flow"])
def test_scalar_eta(name):
    """eta_dim == 1: glow pads to width 2, geometric_flow has a 1 x 1 factor."""
    net = _net(name, eta_dim=1)
    eta = jnp.linspace(-2.0, 2.0, 5)[:, None]
    assert net(eta).shape == (5, 1)
    h = 1e-6  # the mean is a non-constant smooth function of eta: central differences
    fd = (net(eta + h) - net(eta - h)) / (2 * h)
    np.testing.assert_allclose(net.covariance(eta)[..., 0], fd, rtol=1e-5, atol=1e-8)
    assert jnp.abs(fd).min() > 1e-3


def test_glow_couplings_are_invertible():
    """det(d flow / dx) == exp(sum of log scales) > 0 (jacfwd) at any x in R^width."""
    net = _net("glow")
    width = net.width
    x = 2.0 * jax.random.normal(jax.random.key(7), (20, width))

    @jax.jit
    def check(x):
        log_det = jax.vmap(net.flow)(x)[1]
        jac = jax.vmap(jax.jacfwd(lambda v: net.flow(v)[0]))(x)
        padded = x.at[:, ETA_DIM:].set(0.0)  # the mean is the read-out of the flow of [eta, 0]
        return log_det, jnp.linalg.slogdet(jac), net.readout(jax.vmap(net.flow)(padded)[0])

    log_det, (sign, logabsdet), readout = check(x)
    assert width == 2 * ETA_DIM
    np.testing.assert_array_equal(sign, 1.0)
    np.testing.assert_allclose(logabsdet, log_det, rtol=1e-10, atol=1e-10)
    assert jnp.abs(log_det).min() > 1e-3  # the scales are not trivially 1
    np.testing.assert_allclose(net(x[:, :ETA_DIM]), readout, rtol=1e-12)


def _geometric(seed=0, **hp):
    net = _net("geometric_flow", seed=seed, **hp)
    k1, k2 = jax.random.split(jax.random.key(seed + 100))
    eta0, m0 = jax.random.normal(k1, (ETA_DIM,)), jax.random.normal(k2, (ETA_DIM,))
    net.set_anchor(eta0, m0)
    return net, eta0, m0


def test_geometric_flow_factor_is_cholesky_of_pd_matrix():
    net = _geometric()[0]
    eta = 3.0 * jax.random.normal(jax.random.key(8), (100, ETA_DIM))
    factor = jax.jit(jax.vmap(net.factor))(eta)
    np.testing.assert_array_equal(jnp.triu(factor, 1), 0.0)
    assert jnp.diagonal(factor, axis1=-2, axis2=-1).min() >= 1e-4
    cov = factor @ jnp.swapaxes(factor, -1, -2)
    assert jnp.linalg.eigvalsh(cov).min() > 0
    np.testing.assert_allclose(jnp.linalg.cholesky(cov), factor, rtol=1e-6, atol=1e-12)


def test_geometric_flow_anchor():
    net, eta0, m0 = _geometric()
    np.testing.assert_array_equal(net.eta0[...], eta0)
    np.testing.assert_array_equal(net(eta0), m0)  # mean(eta0) == m0 exactly
    factor = jax.jit(net.factor)(eta0)  # Jacobian at the anchor == L L^T(eta0) (weights sum to 1)
    np.testing.assert_allclose(net.covariance(eta0), factor @ factor.T, rtol=1e-10)
    # eta0 is state but not trainable; m0 is trainable
    params = nnx.state(net, nnx.Param)
    assert "eta0" not in params and "m0" in params
    np.testing.assert_array_equal(nnx.state(net, Anchor)["eta0"][...], eta0)
    # config + full state rebuild the anchored network exactly
    cfg = net.config
    rebuilt = build_network(
        cfg["name"], eta_dim=ETA_DIM, stat_dim=ETA_DIM, rngs=nnx.Rngs(1), **cfg["hyperparameters"]
    )
    eta = jax.random.normal(jax.random.key(9), (4, ETA_DIM))
    assert not np.allclose(rebuilt(eta), net(eta))
    nnx.update(rebuilt, nnx.state(net))
    np.testing.assert_array_equal(rebuilt(eta), net(eta))


def test_geometric_flow_is_the_path_integral_of_the_covariance():
    """mean(eta) = m0 + int_0^1 L L^T(eta0 + t (eta - eta0)) (eta - eta0) dt: a 32-point rule
    in the network against an independent 64-point Gauss-Legendre reference."""
    net, eta0, m0 = _geometric(quadrature_order=32)
    eta = 2.0 * jax.random.normal(jax.random.key(10), (6, ETA_DIM))
    x, w = np.polynomial.legendre.leggauss(64)
    t, w = (x + 1) / 2, w / 2

    @jax.jit
    @jax.vmap
    def reference(e):
        factors = jax.vmap(net.factor)(eta0 + t[:, None] * (e - eta0))
        integrand = factors @ jnp.swapaxes(factors, -1, -2) @ (e - eta0)
        return m0 + jnp.sum(w[:, None] * integrand, axis=0)

    np.testing.assert_allclose(net(eta), reference(eta), rtol=1e-6, atol=1e-8)
    low = _geometric(quadrature_order=1)[0]  # midpoint rule: a different (cruder) answer
    assert not np.allclose(low(eta), net(eta), rtol=1e-3)

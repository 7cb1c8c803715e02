"""Training protocols (numpyro_nnef.training.protocols) and noise schedules (training.schedules)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from numpyro_nnef.nn.architectures import ARCHITECTURES
from numpyro_nnef.nn.flows import FLOW_ARCHITECTURES
from numpyro_nnef.training.protocols import (
    PROTOCOLS,
    TABLEAUS,
    DenoisingModel,
    get_protocol,
    integrate_flow,
    integrate_probability_flow,
)
from numpyro_nnef.training.schedules import (
    SCHEDULES,
    LinearSchedule,
    build_schedule,
    denoiser_drift,
    eps_drift,
)

DIM = 2
FLOWS = ("fm", "ct", "df")
Y = jnp.array([0.7, -1.3])


def _schedule(name, gamma_min=-6.0, gamma_max=6.0):
    sched = build_schedule(name, gamma_min=gamma_min, gamma_max=gamma_max)
    if name == "learnable":  # a bent schedule, not the initial near-sigmoid one
        sched.logits[...] = jax.random.normal(jax.random.key(3), sched.logits.shape)
    return sched


def _truth(eta):
    """The toy target: y(eta) = eta / 2 + 0.3."""
    return 0.5 * eta + 0.3


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_endpoints_monotone_and_inverse(name):
    sched = _schedule(name)
    t = jnp.linspace(0.0, 1.0, 201)
    lam = sched.log_snr(t)
    np.testing.assert_allclose(lam[jnp.array([0, -1])], [-6.0, 6.0], atol=1e-12)
    assert np.all(np.diff(lam) > 0)
    assert np.all(sched.log_snr_rate(t) > 0)
    np.testing.assert_allclose(sched.time(lam), t, atol=1e-12)
    a, s = sched.signal_noise(t)
    np.testing.assert_allclose(a**2, sched.alpha_bar(t), rtol=1e-12)
    np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-12)
    # the rates used by the loss weights, against central differences
    inner, h = jnp.linspace(0.05, 0.95, 7), 1e-6
    fd = (sched.log_snr(inner + h) - sched.log_snr(inner - h)) / (2 * h)
    np.testing.assert_allclose(sched.log_snr_rate(inner), fd, rtol=1e-6)
    snr = lambda u: jnp.exp(sched.log_snr(u))
    np.testing.assert_allclose(sched.snr_rate(inner), (snr(inner + h) - snr(inner - h)) / (2 * h),
                               rtol=1e-6)


def test_fixed_schedules_match_their_formulas():
    t = jnp.linspace(0.0, 1.0, 11)
    ab0, ab1 = jax.nn.sigmoid(-6.0), jax.nn.sigmoid(6.0)
    np.testing.assert_allclose(
        _schedule("linear").alpha_bar(t), ab0 + (ab1 - ab0) * t, rtol=1e-12
    )
    u0, u1 = (2 / np.pi * np.arctan(np.exp(-g / 2)) for g in (-6.0, 6.0))
    np.testing.assert_allclose(
        _schedule("cosine").alpha_bar(t), np.cos(np.pi / 2 * (u0 + (u1 - u0) * t)) ** 2,
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        _schedule("sigmoid").alpha_bar(t), jax.nn.sigmoid(-6.0 + 12.0 * t), rtol=1e-12
    )


def test_learnable_schedule_inverse_derivatives():
    """time(lambda) carries d t / d logits = -(d lambda / d logits) / lambda' (implicit
    function theorem), checked by central differences."""
    sched = _schedule("learnable")
    graphdef, params = nnx.split(sched)
    lam = jnp.array([-4.0, 0.5, 3.0])
    time_of = lambda p: nnx.merge(graphdef, p).time(lam)
    jac = jax.jacrev(time_of)(params)["logits"].value
    logits = params["logits"].value
    h = 1e-6
    for i in range(logits.shape[0]):
        up, down = jax.tree.map(lambda x: x, params), jax.tree.map(lambda x: x, params)
        up["logits"].value = logits.at[i].add(h)
        down["logits"].value = logits.at[i].add(-h)
        fd = (time_of(up) - time_of(down)) / (2 * h)
        np.testing.assert_allclose(jac[:, i], fd, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(jax.jacfwd(sched.time)(lam).diagonal(),
                               1.0 / sched.log_snr_rate(sched.time(lam)), rtol=1e-10)


def test_schedule_errors():
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        build_schedule("cosine", gamma_min=2.0, gamma_max=-2.0)
    with pytest.raises(ValueError, match="'quadratic'"):
        build_schedule("quadratic", gamma_min=-2.0, gamma_max=2.0)


# ----------------------------------------------------------------------------- drifts


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_drifts_are_the_path_derivative(name):
    """Along z_t = a(t) y + s(t) eps, both drifts with the true eps / y equal d z_t / dt."""
    sched = _schedule(name)
    k1, k2 = jax.random.split(jax.random.key(1))
    y, eps = jax.random.normal(k1, (DIM,)), jax.random.normal(k2, (DIM,))
    path = lambda u: sched.signal_noise(u)[0] * y + sched.signal_noise(u)[1] * eps
    for t in [0.0, 0.01, 0.3, 0.7, 0.99, 1.0]:
        t = jnp.asarray(t)
        z, dz = jax.jvp(path, (t,), (jnp.ones_like(t),))
        np.testing.assert_allclose(eps_drift(sched, z, t, eps), dz, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(denoiser_drift(sched, z, t, y), dz, rtol=1e-8, atol=1e-10)


def test_drift_for_alpha_bar_equal_t():
    """alpha_bar(t) = t: dz/dt = z / (2t) - eps_hat / (2 t sqrt(1 - t)), not 0.5 z - eps_hat."""
    sched = LinearSchedule(gamma_min=-40.0, gamma_max=40.0)  # ab_0 ~ 4e-18, ab_1 = 1 - 4e-18
    np.testing.assert_allclose(sched.alpha_bar(jnp.array([0.3, 0.8])), [0.3, 0.8], rtol=1e-14)
    z, eps_hat = jnp.array([0.4, -1.1]), jnp.array([-0.3, 0.9])
    for t in [0.1, 0.3, 0.8]:
        drift = eps_drift(sched, z, jnp.asarray(t), eps_hat)
        expected = z / (2 * t) - eps_hat / (2 * t * np.sqrt(1 - t))
        np.testing.assert_allclose(drift, expected, rtol=1e-10)
        assert np.max(np.abs(drift - (0.5 * z - eps_hat))) > 0.1


# ----------------------------------------------------------------------------- ODE solvers


def _fm_field(y, tau, c=1.0):
    """Exact marginal velocity for source N(0, c^2 I), target N(y, tau^2 I) under the linear
    interpolant: z_t ~ N(t y, sd^2), v = y + (sd'/sd) (z - t y); tau -> 0: (y - z) / (1 - t)."""

    def velocity(z, t):
        var = (1 - t) ** 2 * c**2 + t**2 * tau**2
        return y + (-(1 - t) * c**2 + t * tau**2) / var * (z - t * y)

    return velocity


def _gaussian_eps(sched, y, tau):
    """E[eps | z_t] for target N(y, tau^2 I): s (z - a y) / (a^2 tau^2 + s^2)."""

    def eps_hat(z, t):
        a, s = sched.signal_noise(t)
        return s * (z - a * y) / (a**2 * tau**2 + s**2)

    return eps_hat


def _gaussian_end(sched, y, tau, z0):
    """The probability-flow end point a1 y + sqrt(a1^2 tau^2 + s1^2) xi, xi fixed by z0."""
    (a0, s0), (a1, s1) = sched.signal_noise(0.0), sched.signal_noise(1.0)
    xi = (z0 - a0 * y) / np.sqrt(a0**2 * tau**2 + s0**2)
    return a1 * y + np.sqrt(a1**2 * tau**2 + s1**2) * xi


@pytest.mark.parametrize("solver", sorted(TABLEAUS))
def test_flow_matching_ode_lands_on_target(solver):
    z0 = jnp.zeros(DIM)
    # the deterministic start z(0) = 0 follows z_t = t y exactly
    for tau in [0.0, 0.2]:
        v = _fm_field(Y, tau) if tau else (lambda z, t: Y + 0.0 * z)  # (y - z)/(1 - t) on z = t y
        np.testing.assert_allclose(integrate_flow(v, z0, 4, solver), Y, atol=1e-12)
    # from z(0) = xi: z(1) = y + tau xi, with the solver's order of convergence
    xi, tau = jnp.array([0.8, -0.5]), 0.2
    order = {"euler": 1, "heun": 2, "rk4": 4}[solver]
    errors = [np.max(np.abs(integrate_flow(_fm_field(Y, tau), xi, n, solver) - (Y + tau * xi)))
              for n in (16, 64)]
    assert errors[1] < errors[0] / 4**order * 2
    if solver == "rk4":
        assert errors[0] < 1e-4


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("solver", sorted(TABLEAUS))
def test_probability_flow_lands_on_target(name, solver):
    sched = _schedule(name)
    z0 = jnp.array([0.2, 0.5])
    # perfect eps / y predictions for a deterministic target: exact for every solver and grid
    eps_hat = _gaussian_eps(sched, Y, 0.0)
    for drift in [lambda z, t: eps_drift(sched, z, t, eps_hat(z, t)),
                  lambda z, t: denoiser_drift(sched, z, t, Y)]:
        end = integrate_probability_flow(sched, drift, z0, 4, solver)
        np.testing.assert_allclose(end, _gaussian_end(sched, Y, 0.0, z0), atol=1e-10)
    # a Gaussian target N(y, tau^2): converges at the solver's order
    tau, order = 0.3, {"euler": 1, "heun": 2, "rk4": 4}[solver]
    eps_hat = _gaussian_eps(sched, Y, tau)
    drift = lambda z, t: eps_drift(sched, z, t, eps_hat(z, t))
    errors = [np.max(np.abs(integrate_probability_flow(sched, drift, z0, n, solver)
                            - _gaussian_end(sched, Y, tau, z0))) for n in (32, 128)]
    assert errors[1] < errors[0] / 4**order * 2


class _ExactField(nnx.Module):
    """The ideal field of each protocol for the deterministic target y(eta) = eta / 2 + 0.3."""

    def __init__(self, kind, schedule=None, tau=0.0):
        self.kind, self.schedule, self.tau, self.dim = kind, schedule, tau, DIM

    def __call__(self, z, t, eta):
        y = _truth(eta)
        if self.kind == "fm":  # (y - z)/(1 - t) for tau = 0; tau > 0 keeps it finite at t = 1
            return _fm_field(y, self.tau)(z, t)
        if self.kind == "ct":
            return y
        return _gaussian_eps(self.schedule, y, 0.0)(z, t)


def _exact_model(protocol, tau=0.0):
    if protocol.name == "fm":
        return _ExactField("fm", tau=tau)
    sched = _schedule(protocol.options["schedule"])
    return DenoisingModel(_ExactField(protocol.name, sched), sched)


@pytest.mark.parametrize("name,schedule", [("fm", None)] + [
    (p, s) for p in ("ct", "df") for s in sorted(SCHEDULES)
])
def test_exact_field_predicts_target_and_has_zero_loss(name, schedule):
    protocol = get_protocol(name, num_steps=4, **({"schedule": schedule} if schedule else {}))
    eta = jax.random.normal(jax.random.key(4), (64, DIM))
    model = _exact_model(protocol, tau=1e-3)
    for e in eta[:3]:
        np.testing.assert_allclose(protocol.predict(model, e), _truth(e), atol=1e-9)
    model = _exact_model(protocol)
    y, w = _truth(eta), jnp.ones_like(eta)
    assert protocol.loss(model, eta, y, w, jax.random.key(5)) < 1e-12
    assert protocol.loss(model, eta, y + 0.1, w, jax.random.key(5)) > 1e-4


# ----------------------------------------------------------------------------- every combination

COMBOS = [("regression", a) for a in sorted(ARCHITECTURES)] + [
    (p, a) for p in FLOWS for a in sorted(FLOW_ARCHITECTURES)
]
TINY = {"regression": {"hidden": (8, 8)}, "flow": {"width": 8, "depth": 1}}


@pytest.mark.parametrize("name,architecture", COMBOS)
def test_every_protocol_and_architecture_trains(name, architecture):
    protocol = get_protocol(name, **({} if name == "regression" else {"num_steps": 4}))
    hp = TINY["regression" if name == "regression" else "flow"]
    model = protocol.build_model(architecture, eta_dim=DIM, stat_dim=DIM, rngs=nnx.Rngs(0), **hp)
    eta = jax.random.normal(jax.random.key(6), (32, DIM))
    y, w = _truth(eta), jnp.ones_like(eta)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adam(1e-2)
    eval_keys = jax.random.split(jax.random.key(7), 4)

    def loss_fn(p, key):
        return protocol.loss(nnx.merge(graphdef, p, rest), eta, y, w, key)

    def mean_loss(p):
        return jnp.mean(jax.vmap(lambda k: loss_fn(p, k))(eval_keys))

    @jax.jit
    def run(p):
        grads = jax.grad(loss_fn)(p, eval_keys[0])

        def step(carry, key):
            p, o = carry
            updates, o = optimizer.update(jax.grad(loss_fn)(p, key), o, p)
            return (optax.apply_updates(p, updates), o), None

        keys = jax.random.split(jax.random.key(8), 30)
        (p1, _), _ = jax.lax.scan(step, (p, optimizer.init(p)), keys)
        predict = lambda e: protocol.predict(nnx.merge(graphdef, p1, rest), e)
        return mean_loss(p), grads, mean_loss(p1), predict(eta[0]), predict(eta[0]), \
            jax.jacfwd(predict)(eta[1])

    loss0, grads, loss1, pred_a, pred_b, jac = run(params)
    assert loss0.shape == () and np.isfinite(loss0)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
    assert sum(float(jnp.sum(g**2)) for g in leaves) > 0
    assert loss1 < 0.95 * loss0, (float(loss0), float(loss1))
    assert pred_a.shape == (DIM,) and np.all(np.isfinite(pred_a))
    np.testing.assert_array_equal(pred_a, pred_b)
    assert jac.shape == (DIM, DIM) and np.all(np.isfinite(jac))
    if name in ("ct",) or (name == "df" and protocol.options["schedule"] == "learnable"):
        assert float(jnp.sum(grads["schedule"]["logits"].value ** 2)) > 0


def test_log_partition():
    protocol = get_protocol("regression")
    eta = jnp.array([0.3, -0.2])
    for architecture in sorted(ARCHITECTURES):
        net = protocol.build_model(architecture, eta_dim=DIM, stat_dim=DIM, rngs=nnx.Rngs(1),
                                   hidden=(8,))
        value = protocol.log_partition(net, eta)
        if net.kind == "gradient":
            assert value.shape == ()
            grad = jax.grad(lambda e, net=net: protocol.log_partition(net, e))(eta)
            np.testing.assert_allclose(grad, protocol.predict(net, eta), rtol=1e-12)
        else:
            assert value is None
    for name in FLOWS:
        flow = get_protocol(name)
        model = flow.build_model("conditional_resnet_mlp", eta_dim=DIM, stat_dim=DIM,
                                 rngs=nnx.Rngs(1), width=8, depth=1)
        assert flow.log_partition(model, eta) is None


def test_df_learnable_schedule_gets_gradient():
    protocol = get_protocol("df", schedule="learnable", num_steps=4)
    model = protocol.build_model("conditional_resnet_mlp", eta_dim=DIM, stat_dim=DIM,
                                 rngs=nnx.Rngs(0), width=8, depth=1)
    eta = jax.random.normal(jax.random.key(6), (16, DIM))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.grad(lambda p: protocol.loss(nnx.merge(graphdef, p, rest), eta, _truth(eta),
                                             jnp.ones_like(eta), jax.random.key(0)))(params)
    assert float(jnp.sum(grads["schedule"]["logits"].value ** 2)) > 0
    jac = jax.jacrev(lambda p: protocol.predict(nnx.merge(graphdef, p, rest), eta[0]))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(jac))


# ----------------------------------------------------------------------------- options


def test_registry_and_options_round_trip():
    assert set(PROTOCOLS) == {"regression", "fm", "ct", "df"}
    assert set(get_protocol("regression").architectures) == set(ARCHITECTURES)
    for name in FLOWS:
        assert set(get_protocol(name).architectures) == set(FLOW_ARCHITECTURES)
    protocol = get_protocol("df", schedule="linear", num_steps=8, gamma_min=-5)
    options = json.loads(json.dumps(protocol.options))
    assert options == {"num_steps": 8, "solver": "rk4", "schedule": "linear",
                       "gamma_min": -5.0, "gamma_max": 6.0}
    assert get_protocol("df", **options).options == options
    protocol.options["num_steps"] = 1  # a copy
    assert protocol.options["num_steps"] == 8


def test_option_errors():
    with pytest.raises(ValueError, match="'warmup'"):
        get_protocol("fm", warmup=3)
    with pytest.raises(ValueError, match="'exponential'"):
        get_protocol("df", schedule="exponential")
    with pytest.raises(ValueError, match="'rk45'"):
        get_protocol("ct", solver="rk45")
    with pytest.raises(ValueError, match="num_steps"):
        get_protocol("fm", num_steps=0)
    with pytest.raises(ValueError, match="source_scale"):
        get_protocol("fm", source_scale=-1.0)
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        get_protocol("ct", gamma_min=3.0, gamma_max=1.0)
    with pytest.raises(ValueError, match="'sgd'"):
        get_protocol("sgd")
    with pytest.raises(ValueError, match="'mlp'.*'fm'"):
        get_protocol("fm").build_model("mlp", eta_dim=2, stat_dim=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'potential_flow'.*'regression'"):
        get_protocol("regression").build_model("potential_flow", eta_dim=2, stat_dim=2,
                                               rngs=nnx.Rngs(0))

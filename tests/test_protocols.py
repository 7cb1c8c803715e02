"""Training protocols (numpyro_nnef.training.protocols) and noise schedules (training.schedules)."""

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

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


# Tiny one-shot programs: XLA's backend optimisation saves no run time here, doubles compile time.
_jit = partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _key(seed):
    """Test keys: the "rbg" generator is one XLA op, which keeps the compiled programs small."""
    return jax.random.key(seed, impl="rbg")


def _truth(eta):
    """The toy target: y(eta) = eta / 2 + 0.3."""
    return 0.5 * eta + 0.3


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_endpoints_monotone_and_inverse(name):
    sched = _schedule(name)
    t = jnp.linspace(0.0, 1.0, 201)
    inner, h = jnp.linspace(0.05, 0.95, 7), 1e-6
    snr = lambda u: jnp.exp(sched.log_snr(u))

    @_jit
    def evaluate():
        lam = sched.log_snr(t)
        return dict(
            lam=lam, time=sched.time(lam), rate=sched.log_snr_rate(t),
            alpha_bar=sched.alpha_bar(t), signal_noise=sched.signal_noise(t),
            inner_rate=sched.log_snr_rate(inner), inner_snr_rate=sched.snr_rate(inner),
            fd=(sched.log_snr(inner + h) - sched.log_snr(inner - h)) / (2 * h),
            fd_snr=(snr(inner + h) - snr(inner - h)) / (2 * h),
        )

    out = evaluate()
    lam = out["lam"]
    np.testing.assert_allclose(lam[jnp.array([0, -1])], [-6.0, 6.0], atol=1e-12)
    assert np.all(np.diff(lam) > 0) and np.all(out["rate"] > 0)
    np.testing.assert_allclose(out["time"], t, atol=1e-12)
    a, s = out["signal_noise"]
    np.testing.assert_allclose(a**2, out["alpha_bar"], rtol=1e-12)
    np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-12)
    # the rates used by the loss weights, against central differences
    np.testing.assert_allclose(out["inner_rate"], out["fd"], rtol=1e-6)
    np.testing.assert_allclose(out["inner_snr_rate"], out["fd_snr"], rtol=1e-6)


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
    logits = params["logits"][...]

    def time_of(x):
        return nnx.merge(graphdef, jax.tree.map(lambda _: x, params)).time(lam)

    h = 1e-6
    jac, fd, dt = _jit(lambda: (
        jax.jacrev(time_of)(logits),
        jax.vmap(lambda d: (time_of(logits + d) - time_of(logits - d)) / (2 * h), out_axes=1)(
            h * jnp.eye(logits.shape[0])),
        jax.vmap(jax.grad(sched.time))(lam),
    ))()
    assert np.max(np.abs(jac)) > 1e-3
    np.testing.assert_allclose(jac, fd, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(dt, 1.0 / sched.log_snr_rate(sched.time(lam)), rtol=1e-10)


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
    t = jnp.array([0.0, 0.01, 0.3, 0.7, 0.99, 1.0])[:, None]

    def path(u):
        a, s = sched.signal_noise(u)
        return a * y + s * eps

    @_jit
    def evaluate():
        z, dz = jax.jvp(path, (t,), (jnp.ones_like(t),))
        rates = sched.rates(t)
        return dz, eps_drift(rates, z, eps), denoiser_drift(rates, z, y)

    dz, from_eps, from_y = evaluate()
    np.testing.assert_allclose(from_eps, dz, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(from_y, dz, rtol=1e-8, atol=1e-10)


def test_drift_for_alpha_bar_equal_t():
    """alpha_bar(t) = t: dz/dt = z / (2t) - eps_hat / (2 t sqrt(1 - t)), not 0.5 z - eps_hat."""
    sched = LinearSchedule(gamma_min=-40.0, gamma_max=40.0)  # ab_0 ~ 4e-18, ab_1 = 1 - 4e-18
    t = jnp.array([0.1, 0.3, 0.8])[:, None]
    z, eps_hat = jnp.array([0.4, -1.1]), jnp.array([-0.3, 0.9])
    alpha_bar, drift = _jit(lambda: (sched.alpha_bar(t), eps_drift(sched.rates(t), z, eps_hat)))()
    np.testing.assert_allclose(alpha_bar, t, rtol=1e-14)
    np.testing.assert_allclose(drift, z / (2 * t) - eps_hat / (2 * t * np.sqrt(1 - t)),
                               rtol=1e-10)
    assert np.all(np.max(np.abs(drift - (0.5 * z - eps_hat)), axis=1) > 0.1)


# ----------------------------------------------------------------------------- ODE solvers

ORDER = {"euler": 1, "heun": 2, "rk4": 4}


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
    xi, tau = jnp.array([0.8, -0.5]), 0.2

    @_jit
    def ends():
        # from z(0) = 0 the exact field keeps z_t = t y (velocity y; (y - z)/(1 - t) for tau = 0)
        exact = integrate_flow(_fm_field(Y, tau), jnp.zeros(DIM), 4, solver)
        # from z(0) = xi: z(1) = y + tau xi
        return exact, [integrate_flow(_fm_field(Y, tau), xi, n, solver) for n in (16, 64)]

    exact, noisy = ends()
    np.testing.assert_allclose(exact, Y, atol=1e-12)
    errors = [np.max(np.abs(end - (Y + tau * xi))) for end in noisy]
    assert errors[1] < errors[0] / 4 ** ORDER[solver] * 2
    assert errors[0] < {"euler": 0.1, "heun": 0.01, "rk4": 1e-4}[solver]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_probability_flow_is_exact_for_perfect_fields(name):
    """Perfect eps / y predictions for a deterministic target: every solver lands on the exact
    end point of the flow a1 y + s1 (z0 - a0 y) / s0 (on a 4-step grid)."""
    sched = _schedule(name)
    z0 = jnp.array([0.2, 0.5])
    eps_hat = _gaussian_eps(sched, Y, 0.0)
    drifts = [lambda z, t, rates: eps_drift(rates, z, eps_hat(z, t)),
              lambda z, t, rates: denoiser_drift(rates, z, Y)]
    ends = _jit(lambda: jnp.stack([
        integrate_probability_flow(sched, drift, z0, 4, solver)
        for solver in sorted(TABLEAUS) for drift in drifts
    ]))()
    np.testing.assert_allclose(ends, jnp.broadcast_to(_gaussian_end(sched, Y, 0.0, z0), ends.shape),
                               atol=1e-10)


@pytest.mark.parametrize("solver", sorted(TABLEAUS))
def test_probability_flow_converges_at_solver_order(solver):
    """A Gaussian target N(y, tau^2) with its exact E[eps | z_t] field (the flow depends on the
    schedule only through lambda, so one schedule suffices here)."""
    sched, z0, tau = _schedule("sigmoid"), jnp.array([0.2, 0.5]), 0.3
    eps_hat = _gaussian_eps(sched, Y, tau)
    drift = lambda z, t, rates: eps_drift(rates, z, eps_hat(z, t))
    ends = _jit(lambda: [integrate_probability_flow(sched, drift, z0, n, solver)
                            for n in (32, 128)])()
    errors = [np.max(np.abs(end - _gaussian_end(sched, Y, tau, z0))) for end in ends]
    assert errors[1] < errors[0] / 4 ** ORDER[solver] * 2
    assert errors[0] < {"euler": 0.1, "heun": 0.01, "rk4": 1e-4}[solver]


class _ExactField(nnx.Module):
    """The ideal field of each protocol for the deterministic target y(eta) = eta / 2 + 0.3,
    plus a constant ``offset`` (an error of known size)."""

    def __init__(self, kind, schedule=None, tau=0.0, offset=0.0):
        self.kind, self.schedule, self.tau, self.offset, self.dim = kind, schedule, tau, offset, DIM

    def __call__(self, z, t, eta):
        y = _truth(eta)
        if self.kind == "fm":  # (y - z)/(1 - t) for tau = 0; tau > 0 keeps it finite at t = 1
            exact = _fm_field(y, self.tau)(z, t)
        elif self.kind == "ct":
            exact = y
        else:
            exact = _gaussian_eps(self.schedule, y, 0.0)(z, t)
        return exact + self.offset


def _exact_model(protocol, **kwargs):
    if protocol.name == "fm":
        return _ExactField("fm", **kwargs)
    sched = _schedule(protocol.options["schedule"])
    return DenoisingModel(_ExactField(protocol.name, sched, **kwargs), sched)


@pytest.mark.parametrize("name,schedule", [
    ("fm", None), ("ct", "learnable"), ("ct", "linear"), ("df", "cosine"), ("df", "learnable"),
])
def test_exact_field_predicts_target_and_loss_is_normalised(name, schedule):
    """The ideal field predicts y and has zero loss; an error delta in its output costs
    delta^2 (exactly for fm and fixed-schedule df; on average over t for the weighted losses)."""
    protocol = get_protocol(name, num_steps=4, **({"schedule": schedule} if schedule else {}))
    eta = jax.random.normal(jax.random.key(4), (4096, DIM))
    y, w, key, delta = _truth(eta), jnp.ones_like(eta), _key(5), 0.1

    @_jit
    def run():
        predict = jax.vmap(lambda e: protocol.predict(_exact_model(protocol, tau=1e-3), e))
        loss = lambda **kw: protocol.loss(_exact_model(protocol, **kw), eta, y, w, key)
        return (predict(eta[:3]), predict(eta[:3].astype(jnp.float32)), loss(),
                loss(offset=delta))

    pred, pred32, loss, off = run()
    np.testing.assert_allclose(pred, y[:3], atol=1e-9)
    np.testing.assert_allclose(pred32, y[:3], atol=1e-4)
    assert loss < 1e-12
    weighted = name == "ct" or schedule == "learnable"
    np.testing.assert_allclose(off, delta**2, rtol=0.15 if weighted else 1e-10)


# ----------------------------------------------------------------------------- every combination

FAST = {"num_steps": 4, "solver": "euler"}
COMBOS = [("regression", a, {}) for a in sorted(ARCHITECTURES)] + [
    (p, a, FAST if p == "fm" else {**FAST, "schedule": sorted(SCHEDULES)[(i + j) % 4]})
    for j, p in enumerate(FLOWS) for i, a in enumerate(sorted(FLOW_ARCHITECTURES))
]  # ct and df cycle through the schedules: each one meets each schedule at least once


@pytest.mark.parametrize("name,architecture,options", COMBOS,
                         ids=[f"{p}-{a}{'-' + o['schedule'] if 'schedule' in o else ''}"
                              for p, a, o in COMBOS])
def test_every_protocol_and_architecture_trains(name, architecture, options):
    """Build; 30 Adam steps on y = eta/2 + 0.3: finite gradients (schedule logits included), the
    loss (at one fixed noise draw) goes down; predict is deterministic, shape (stat_dim,)."""
    protocol = get_protocol(name, **options)
    hp = {"hidden": (8, 8)} if name == "regression" else {"width": 8, "depth": 1}
    model = protocol.build_model(architecture, eta_dim=DIM, stat_dim=DIM, rngs=nnx.Rngs(0), **hp)
    eta = jax.random.normal(jax.random.key(6), (32, DIM))
    y, w = _truth(eta), jnp.ones_like(eta)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat, unravel = ravel_pytree(params)  # one array: Adam's update is a few ops, not per leaf
    optimizer = optax.adam(1e-2)
    key = _key(7)  # one noise draw for all steps: a deterministic objective that must go down

    def loss_fn(p):
        return protocol.loss(nnx.merge(graphdef, unravel(p), rest), eta, y, w, key)

    @_jit
    def run(p0):
        def step(carry, _):
            p, o = carry
            loss, grads = jax.value_and_grad(loss_fn)(p)
            updates, o = optimizer.update(grads, o, p)
            return (optax.apply_updates(p, updates), o), (loss, grads)

        (p1, _), (losses, grads) = jax.lax.scan(step, (p0, optimizer.init(p0)), length=30)
        return losses, grads, protocol.predict(nnx.merge(graphdef, unravel(p1), rest), eta[0])

    losses, grads, pred = run(flat)
    assert losses.shape == (30,) and np.all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0], losses
    assert np.all(np.isfinite(grads)) and np.sum(grads[0] ** 2) > 0  # every step's gradient
    assert pred.shape == (DIM,) and np.all(np.isfinite(pred))
    np.testing.assert_array_equal(run(flat)[2], pred)
    if options.get("schedule") == "learnable":
        assert np.sum(unravel(grads[0])["schedule"]["logits"][...] ** 2) > 0


@pytest.mark.parametrize("name", FLOWS)
def test_flow_prediction_jacobian(name):
    """d predict / d eta by forward-mode autodiff through the ODE solver = central differences."""
    protocol = get_protocol(name, num_steps=2)
    model = protocol.build_model("potential_flow", eta_dim=DIM, stat_dim=DIM, rngs=nnx.Rngs(2),
                                 width=8, depth=1)
    eta, h = jnp.array([0.4, -0.7]), 1e-5
    predict = lambda e: protocol.predict(model, e)
    jac, fd = _jit(lambda: (jax.jacfwd(predict)(eta), jax.vmap(
        lambda d: (predict(eta + d) - predict(eta - d)) / (2 * h), out_axes=1)(h * jnp.eye(DIM))
    ))()
    assert np.max(np.abs(jac)) > 1e-3
    np.testing.assert_allclose(jac, fd, rtol=1e-6, atol=1e-9)


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


# ----------------------------------------------------------------------------- options


def test_registry_and_options_round_trip():
    assert set(PROTOCOLS) == {"regression", "fm", "ct", "df"}
    assert set(get_protocol("regression").architectures) == set(ARCHITECTURES)
    for name in FLOWS:
        assert set(get_protocol(name).architectures) == set(FLOW_ARCHITECTURES)
    protocol = get_protocol("df", schedule="linear", num_steps=12, gamma_min=-5)
    options = json.loads(json.dumps(protocol.options))
    assert options == {"num_steps": 12, "solver": "rk4", "schedule": "linear",
                       "gamma_min": -5.0, "gamma_max": 6.0}
    assert get_protocol("df", **options).options == options
    protocol.options["num_steps"] = 1  # a copy
    assert protocol.options["num_steps"] == 12


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

"""Shared test set-up: float64 for ground-truth accuracy checks, fixed keys, and how ``pytest -n``
distributes the tests."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)

# Modules whose tests share expensive module fixtures (a NUTS dataset, a trained oracle, importance
# estimates) or compiled functions (one batch shape per family or network, one NUTS sampler per
# configuration). Compilation is most of the suite's time, so each of them runs on one worker.
SHARED_MODULES = (
    "test_anchor.py",
    "test_cli.py",
    "test_families.py",
    "test_flows.py",
    "test_named_families.py",
    "test_nn.py",
    "test_quadrature_oracle.py",
    "test_sampling.py",
    "test_training.py",
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``pytest -n N`` ("--dist load") hands tests to the workers in chunks, so a module's tests
    can be split over workers, and then each of them builds the module's fixtures and compiles
    its shared functions again. Here the modules in SHARED_MODULES are single work units (sent
    first, largest first) and every other test is a unit of its own, which keeps the workers
    balanced at the end. An explicit ``--dist`` other than "load" is left as it is."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return module if module.rsplit("/", 1)[-1] in SHARED_MODULES else nodeid

    return SharedModuleScheduling(config, log)


@pytest.fixture
def key():
    return jax.random.key(0)

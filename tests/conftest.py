"""Backend selection and numerics for the whole suite.

Backends come from ``--backend jax,torch`` or ``NTKCORE_TEST_BACKENDS``; a backend asked for
explicitly but not installed is an error (a broken install cannot pass green), one not asked
for and missing is skipped. Numerics are set here and only here: float32 matmuls at full
precision (no TF32) and float64 enabled, for every framework under test. Frameworks are
imported in the order of ``ntkcore/builtin_backends.py`` (torch before TensorFlow, the order that
works in one process).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest

from ntkcore.registry import BUILTIN
from tests.models import FRAMEWORK_MODULES

ALL_BACKENDS = tuple(BUILTIN)
FRAMEWORK_PACKAGE = {name: framework for name, (framework, _) in BUILTIN.items()}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        default=None,
        help="comma-separated backends to test (jax,torch,tensorflow); default: $NTKCORE_TEST_BACKENDS, "
        "else every installed one",
    )


def _requested(config: pytest.Config) -> tuple[list[str], bool]:
    value = config.getoption("--backend") or os.environ.get("NTKCORE_TEST_BACKENDS")
    if not value:
        return list(ALL_BACKENDS), False
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in ALL_BACKENDS]
    if unknown:
        raise pytest.UsageError(f"--backend: unknown backend(s) {unknown}; expected some of {list(ALL_BACKENDS)}")
    return names, True


def pytest_configure(config: pytest.Config) -> None:
    names, explicit = _requested(config)
    missing = [n for n in names if importlib.util.find_spec(FRAMEWORK_PACKAGE[n]) is None]
    if explicit and missing:
        raise pytest.UsageError(f"backend(s) {missing} were requested but their framework is not installed")
    active = [n for n in ALL_BACKENDS if n in names and n not in missing]
    config.ntkcore_backends = active
    config.ntkcore_skipped = {
        n: ("not requested" if n not in names else "not installed") for n in ALL_BACKENDS if n not in active
    }
    for name in active:  # import order matters: torch before TensorFlow
        importlib.import_module(FRAMEWORK_MODULES[name]).setup_numerics()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        config = metafunc.config
        params = [
            pytest.param(name, id=name, marks=pytest.mark.skip(reason=f"{name}: {config.ntkcore_skipped[name]}"))
            if name in config.ntkcore_skipped
            else pytest.param(name, id=name)
            for name in ALL_BACKENDS
        ]
        metafunc.parametrize("backend", params, scope="session")


@pytest.fixture(scope="session")
def active_backends(pytestconfig: pytest.Config) -> list[str]:
    """The backends under test in this run."""
    return list(pytestconfig.ntkcore_backends)


@pytest.fixture(scope="session")
def zoo(backend: str):
    """The zoo module of ``backend`` (see tests/models/__init__.py)."""
    return importlib.import_module(FRAMEWORK_MODULES[backend])


def zoo_for(name: str):
    """The zoo module of backend ``name`` (for tests over several backends)."""
    return importlib.import_module(FRAMEWORK_MODULES[name])

"""nox sessions: one test environment per framework, all three together, none, lint, demo.

``nox`` (no arguments) runs every test session and lint: the README's test command and CI.
Installs use pip, which finds the local torch 2.13.0 CPU wheel (uv does not look there).
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["core", "tests", "cross", "lint"]
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
BACKENDS = {
    # backend -> (extras to install, extra dependency groups)
    "jax": ("jax", ("test-jax-extras",)),
    "torch": ("torch", ()),
    "tensorflow": ("tensorflow", ()),
}
ENV = {"PYTHONHASHSEED": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _install(session: nox.Session, extras: str | None, *groups: str) -> None:
    session.install(f".[{extras}]" if extras else ".")
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))


@nox.session
@nox.parametrize("backend", list(BACKENDS))
def tests(session: nox.Session, backend: str) -> None:
    """The whole suite against one framework, in its own environment."""
    extras, groups = BACKENDS[backend]
    _install(session, extras, "test", *groups)
    session.run("pytest", f"--backend={backend}", *session.posargs, env=ENV)


@nox.session
def cross(session: nox.Session) -> None:
    """All three frameworks in one environment: the cross-framework agreement tests."""
    _install(session, "all", "test")
    session.run(
        "pytest", "--backend=torch,jax,tensorflow", "tests/cross_backend", "tests/core", *session.posargs, env=ENV
    )


@nox.session
def core(session: nox.Session) -> None:
    """No framework installed: import isolation, numpy and array-api-strict paths, plugins."""
    _install(session, None, "test")
    session.run("pytest", "tests/core", *session.posargs, env=ENV)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: ``ntkcore demo`` with every framework."""
    _install(session, "all")
    session.run("ntkcore", "demo", *session.posargs, env=ENV)

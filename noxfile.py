"""nox sessions: one test environment per framework, all three together, none, lint, demo, examples, bench.

``nox`` (no arguments) runs every test session and lint: the README's test command and CI.
Installs use pip, which finds the local torch 2.13.0 CPU wheel (uv does not look there).
"""

from __future__ import annotations

import runpy
import shlex
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["core", "tests", "cross", "lint"]
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
# The one list of backends (ntkcore/builtin_backends.py, read without installing ntkcore):
# backend -> (its extra, its optional test group "test-<backend>-extras" where pyproject has one)
BACKENDS = {
    name: (name, tuple(g for g in (f"test-{name}-extras",) if g in PYPROJECT["dependency-groups"]))
    for name in runpy.run_path("ntkcore/builtin_backends.py")["BUILTIN"]
}
ENV = {"PYTHONHASHSEED": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
# The suites run on pytest-xdist workers, one per core (CI has 2), each framework confined to one
# thread: two workers whose frameworks both spread over every core slow each other down many
# times over (torch's threads above all), while most of the suite's time is single-threaded
# tracing and compiling, which parallel workers halve.
WORKERS = ["-n", "2"]
ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}
# neural-tangents 0.6.5 and what it works with (newer JAX breaks its import or its structured derivatives).
ANCHOR = ["neural-tangents==0.6.5", "jax==0.4.25", "jaxlib==0.4.25", "numpy<2", "tf2jax==0.3.6", "tensorflow<2.18"]


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
    session.run("pytest", *WORKERS, f"--backend={backend}", *session.posargs, env={**ENV, **ONE_THREAD})


@nox.session
def cross(session: nox.Session) -> None:
    """All three frameworks in one environment: the cross-framework agreement tests."""
    _install(session, "all", "test", "bench", "test-jax-extras")  # flax: the transfer tests' JAX side
    backends = f"--backend={','.join(BACKENDS)}"
    session.run(
        "pytest", *WORKERS, backends, "tests/cross_backend", "tests/core", *session.posargs, env={**ENV, **ONE_THREAD}
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


@nox.session
def examples(session: nox.Session) -> None:
    """The examples, with every framework: they write their tables and plots under examples/results."""
    _install(session, "all")
    session.run("python", "examples/dimensionality_reduction.py", *session.posargs, env=ENV)


@nox.session(name="bench-anchor", default=False)
def bench_anchor(session: nox.Session) -> None:
    """neural-tangents 0.6.5 in an environment of its own: the benchmark's JAX anchor."""
    session.install(*ANCHOR)
    session.run("python", "-c", "import neural_tangents", env=ENV)


@nox.session(requires=["bench-anchor"], default=False)
def bench(session: nox.Session) -> None:
    """The benchmark harness against neural-tangents and torch.func, then the calibration of
    "auto" to its results; rewrites benchmarks/RESULTS.md."""
    _install(session, "all", "bench")
    anchor = Path(session.virtualenv.location).parent / "bench-anchor" / "bin" / "python"
    command = shlex.join(["nox", "-s", "bench", *(["--", *session.posargs] if session.posargs else [])])
    env = {**ENV, "NTKCORE_BENCH_COMMAND": command}
    session.run("python", "-m", "benchmarks", "--anchor-python", str(anchor), *session.posargs, env=env)
    if not session.posargs:  # a full run: refit auto's cost model to it (ntkcore/calibration.json)
        session.run("python", "-m", "benchmarks.calibrate", "--write", env=ENV)

"""Every Python block of the README runs, in order, in one namespace (as a reader pastes them
one after the other), in a scratch directory: the README cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.cross
README = Path(__file__).resolve().parents[2] / "README.md"


def blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    assert len(blocks()) >= 8


def test_readme_python_blocks_run(active_backends, tmp_path, monkeypatch):
    if set(active_backends) != {"jax", "torch", "tensorflow"}:
        pytest.skip("the README's blocks use all three frameworks")
    for library in ("flax", "equinox", "haiku", "zarr", "scipy", "matplotlib"):
        pytest.importorskip(library)
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks()):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README python block {i + 1} fails: {error!r}\n{block}") from error

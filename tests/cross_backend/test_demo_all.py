"""The main job across every framework of this run, as the README's first command runs it."""

from __future__ import annotations

import pytest

from ntkcore.cli import main

pytestmark = pytest.mark.cross


def test_demo_cross_checks_frameworks(active_backends, capsys):
    if len(active_backends) < 2:
        pytest.skip(f"needs two frameworks in this run, have {active_backends}")
    assert main(["demo", "--backends", ",".join(active_backends), "--n", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in active_backends)

"""The main job, ``ntkcore demo``, on a small MLP: every implementation, cross-checked."""

from __future__ import annotations

from ntkcore.cli import main


def test_demo_runs_and_agrees(backend, capsys):
    assert main(["demo", "--backends", backend, "--widths", "5,16,3", "--n", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "OK: all kernels agree" in out
    for implementation in ("jacobian_contraction", "ntk_vector_products", "auto"):
        assert f"{backend:<11} {implementation}" in out

"""The examples run end to end (in their quick form) with the frameworks installed here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dimensionality_reduction_quick(tmp_path: Path, active_backends: list[str]) -> None:
    script = ROOT / "examples" / "dimensionality_reduction.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    # exit 1 also when the frameworks' λ_min disagree: one kernel, computed in each framework
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "dimensionality_reduction.md").read_text()
    assert (tmp_path / "dimensionality_reduction.png").stat().st_size > 10_000
    for backend in active_backends:
        assert f"NTK ms ({backend})" in table
    assert "U·V, V fixed (train U), m = 1024, k = 16" in table and "dense, m = 1024" in table

"""A smoke run of the benchmark harness on a tiny workload (the real runs are `nox -s bench`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.cross
def test_the_harness_runs_checks_and_reports(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    report = tmp_path / "RESULTS.md"
    command = [sys.executable, "-m", "benchmarks", "--smoke", "--backends", "torch", "--repeats", "1"]
    command += ["--scaling-repeats", "1", "--out-dir", str(tmp_path), "--report", str(report)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ}, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    outcome = json.loads((tmp_path / "bench.json").read_text())
    assert not outcome["failed"] and not outcome["rejected"]
    table = {(r["runner"], r["implementation"]) for r in outcome["results"] if r["sweep"] is None}
    assert table == {
        ("ntkcore", "jacobian_contraction"),
        ("ntkcore", "ntk_vector_products"),
        ("ntkcore", "structured"),
        ("torch.func", "jacobian_contraction"),
        ("torch.func", "ntk_vector_products"),
    }
    assert all(r["max_rel_diff"] <= outcome["meta"]["tolerance"] for r in outcome["results"])
    assert {r["sweep"] for r in outcome["results"]} == {None, "width", "n"}
    text = report.read_text()
    assert "### Ratios" in text and "### Scaling" in text and "torch.func" in text
    assert (tmp_path / "scaling_width.png").stat().st_size > 0 and (tmp_path / "scaling_n.png").exists()

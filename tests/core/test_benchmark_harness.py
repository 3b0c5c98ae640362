"""The benchmark harness's checks, without any framework: refusal of disagreeing kernels, report merging."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import report
from benchmarks.harness import TOLERANCE, Harness, parse

ROOT = Path(__file__).resolve().parents[2]


def _harness(tmp_path: Path) -> Harness:
    harness = Harness(parse(["--out-dir", str(tmp_path)]))
    harness.reference_backend, harness.peak_flops = "jax", 1e11
    return harness


@pytest.mark.parametrize("error", [0.0, TOLERANCE / 2, 10 * TOLERANCE, "shape"])
def test_a_kernel_is_reported_only_when_it_agrees_with_the_reference(tmp_path, error):
    harness = _harness(tmp_path)
    expected = np.random.default_rng(0).normal(size=(4, 4, 3, 3))
    np.save(harness.kernels / "reference-jax-structured-smoke.npy", expected)
    kernel = expected[:, :, 0, 0] if error == "shape" else expected + error * np.abs(expected).max()
    np.save(harness.kernels / "torchfunc-torch-jacobian_contraction-smoke.npy", kernel)
    result = {"runner": "torch.func", "backend": "torch", "implementation": "jacobian_contraction"}
    harness.check({**result, "workload": "smoke", "median_s": 0.01, "first_s": 0.1, "peak_mb": 1.0})
    accepted = error != "shape" and error <= TOLERANCE
    assert len(harness.results) == int(accepted) and len(harness.rejected) == int(not accepted)


def test_rewriting_the_report_keeps_the_hand_written_text(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nanalysis before\n")
    report.write(path, f"{report.BEGIN}\nfirst\n{report.END}\n")
    text = path.read_text()
    path.write_text(text + "\nanalysis after\n")
    report.write(path, f"{report.BEGIN}\nsecond\n{report.END}\n")
    text = path.read_text()
    assert "analysis before" in text and "analysis after" in text
    assert "second" in text and "first" not in text and text.count(report.BEGIN) == 1


def test_help_and_bad_workloads(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "--anchor-python" in done.stdout
    with pytest.raises(SystemExit, match="unknown"):
        Harness(parse(["--workloads", "nonesuch", "--out-dir", str(tmp_path)])).run()
